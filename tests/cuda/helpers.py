"""Shared helpers of the CUDA tests: random data, device round trips, 16-bit storage."""
import numpy as np
from numba import cuda


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def poisoned(shape):
    """A device output filled with NaN: an element the kernel forgets to write shows up."""
    return cuda.to_device(np.full(shape, np.nan, np.float32))


def bf16_bits(a):
    """float32 -> bfloat16 raw bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    """bfloat16 raw bits (uint16) -> their float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def stored(a, dtype):
    """(array as stored in dtype 'f32'/'f16'/'bf16', the float64 values it holds)."""
    if dtype == "f16":
        s = a.astype(np.float16)
        return s, s.astype(np.float64)
    if dtype == "bf16":
        s = bf16_bits(a)
        return s, bf16_value(s).astype(np.float64)
    return a.astype(np.float32), a.astype(np.float64)


def rel_err(got, ref):
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), "NaN in the output (an element not written?)"
    return np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
