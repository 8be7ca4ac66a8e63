"""CUDA masked_softmax and fill_causal_mask against the float64 references and the CPU kernels."""
import numpy as np
import pytest

from numba_attn.kernels import softmax_cpu, softmax_cuda
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn, rel_err
from tests.reference import causal_mask_ref, softmax_ref

GPU = MODE == "gpu"

# (b, q, kv, causal, mask): q < kv, q > kv (rows that see nothing), kv not a multiple of 8 or
# of the block, masks with fully hidden rows
SOFTMAX = [(2, 3, 5, True, False), (1, 4, 64, True, True), (1, 3, 300, False, True),
           (1, 1, 17, True, False), (1, 5, 3, True, False), (1, 1, 2100, True, True)]
SOFTMAX_FULL = [(32, 128, 128, True, False), (32, 1, 8192, True, False),
                (8, 512, 1000, True, True), (4, 1024, 2048, False, True), (2, 3, 20000, True, True)]


def mask_for(rng, q, kv):
    m = np.where(rng.random((q, kv)) < 0.3, -np.inf, rng.standard_normal((q, kv)))
    if q > 1:
        m[0, :] = -np.inf                            # a row that sees nothing
    return m.astype(np.float32)


@pytest.mark.parametrize("case", SOFTMAX + (SOFTMAX_FULL if GPU else []))
def test_masked_softmax(case):
    b, q, kv, causal, use_mask = case
    rng = np.random.default_rng(b * 31 + q * 7 + kv)
    s = randn(rng, b, q, kv) * 3
    mask = mask_for(rng, q, kv) if use_mask else None
    mask_arg = mask if use_mask else np.zeros((0, 0), np.float32)
    out = poisoned(s.shape)
    softmax_cuda.masked_softmax(out, dev(s), dev(mask_arg), 0.7, causal)
    got = out.copy_to_host()
    ref = softmax_ref(s, 0.7, causal, mask)
    assert rel_err(got, ref) < 1e-5
    assert np.abs(got - ref).max() < 1e-5
    cpu = np.empty_like(s)
    softmax_cpu.masked_softmax(cpu, s, mask_arg, 0.7, causal)
    np.testing.assert_allclose(got, cpu, rtol=1e-5, atol=1e-6)
    sd = dev(s)                                      # in place
    softmax_cuda.masked_softmax(sd, sd, dev(mask_arg), 0.7, causal)
    np.testing.assert_allclose(sd.copy_to_host(), got, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("q,kv", [(3, 5), (5, 3), (1, 1), (7, 7)] + ([(2048, 4096)] if GPU else []))
def test_fill_causal_mask(q, kv):
    out = poisoned((q, kv))
    softmax_cuda.fill_causal_mask(out)
    np.testing.assert_array_equal(out.copy_to_host(), causal_mask_ref(q, kv))


@pytest.mark.parametrize("shape", [(5,), (1, 5), (3, 1), (1, 1), (3, 5)])
def test_broadcast_mask(shape):
    m = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = softmax_cuda.broadcast_mask(dev(m), 3, 5).copy_to_host()
    np.testing.assert_array_equal(got, np.broadcast_to(m, (3, 5)))


@pytest.mark.parametrize("kv,wide", [(900, False), (1000, True)])
def test_softmax_rows_kernel_four_chunks_per_thread(kv, wide):
    # the register-resident kernel with 32 threads: each holds 4 chunks of the row
    rng = np.random.default_rng(kv)
    s = randn(rng, 2, 2, kv)
    mask = mask_for(rng, 2, kv)
    out = poisoned(s.shape)
    softmax_cuda.softmax_rows_kernel(wide)[4, 32](out.reshape(-1), dev(s).reshape(-1),
                                                  dev(mask).reshape(-1), np.float32(0.5),
                                                  True, 2, kv)
    assert np.abs(out.copy_to_host() - softmax_ref(s, 0.5, True, mask)).max() < 1e-6
