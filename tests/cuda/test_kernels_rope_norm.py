"""CUDA rope, rmsnorm and silu_mul kernels against the float64 references and the CPU kernels."""
import numpy as np
import pytest

from numba_attn.kernels import norm_cpu, norm_cuda, rope_cpu, rope_cuda
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn, rel_err
from tests.reference import (inv_freq_ref, rmsnorm_ref, rope_half_ref, rope_interleaved_ref,
                             silu_mul_ref)

GPU = MODE == "gpu"

# (batch, seq, heads, d, start_pos): seq 1, nonzero offsets, pairs not a multiple of the block
ROPE = [(1, 1, 3, 16, 0), (2, 3, 2, 8, 5), (1, 5, 3, 64, 11), (1, 2, 5, 128, 1000)]
ROPE_FULL = [(1, 129, 32, 128, 7), (2, 1, 8, 128, 8000), (1, 2048, 32, 128, 0)]


def tables(d, max_pos):
    angles = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq_ref(d))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("shape", ROPE + (ROPE_FULL if GPU else []))
def test_rope(shape, style):
    b, s, h, d, start = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    x = randn(rng, b, s, h, d)
    cos, sin = tables(d, start + s + 3)
    ref_fn = rope_half_ref if style == "half" else rope_interleaved_ref
    ref = ref_fn(x, inv_freq_ref(d), start)
    kern = rope_cuda.rope_half if style == "half" else rope_cuda.rope_interleaved
    out = poisoned(x.shape)
    kern(out, dev(x), dev(cos), dev(sin), start)
    got = out.copy_to_host()
    assert rel_err(got, ref) < 1e-5
    cpu = np.empty_like(x)
    (rope_cpu.rope_half if style == "half" else rope_cpu.rope_interleaved)(cpu, x, cos, sin,
                                                                           start)
    np.testing.assert_allclose(got, cpu, rtol=1e-5, atol=1e-5)
    xd = dev(x)                                      # in place
    kern(xd, xd, dev(cos), dev(sin), start)
    np.testing.assert_array_equal(xd.copy_to_host(), got)


# (rows, n): n not a multiple of 8 (scalar path), of the block, single row
NORM = [(1, 64), (3, 37), (2, 1000), (1, 8)]
NORM_FULL = [(1, 4096), (129, 4096), (7, 5120), (3, 11008), (64, 4097)]


@pytest.mark.parametrize("shape", NORM + (NORM_FULL if GPU else []))
def test_rmsnorm(shape):
    m, n = shape
    rng = np.random.default_rng(m * 7919 + n)
    x = randn(rng, m, n) * 3
    w = randn(rng, n)
    out = poisoned((m, n))
    norm_cuda.rmsnorm(out, dev(x), dev(w), 1e-5)
    got = out.copy_to_host()
    assert rel_err(got, rmsnorm_ref(x, w, 1e-5)) < 1e-5
    cpu = np.empty_like(x)
    norm_cpu.rmsnorm(cpu, x, w, 1e-5)
    np.testing.assert_allclose(got, cpu, rtol=1e-4, atol=1e-5)
    xd = dev(x)                                      # in place
    norm_cuda.rmsnorm(xd, xd, dev(w), 1e-5)
    np.testing.assert_allclose(xd.copy_to_host(), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", NORM + (NORM_FULL if GPU else []))
def test_add_rmsnorm(shape):
    """x += y on the device, out = rmsnorm(x) * w, into y (the model's use) and the CPU's."""
    m, n = shape
    rng = np.random.default_rng(m * 31 + n)
    x, y, w = randn(rng, m, n) * 3, randn(rng, m, n), randn(rng, n)
    total = x.astype(np.float64) + y
    xd, yd = dev(x), dev(y)
    norm_cuda.add_rmsnorm(yd, xd, yd, dev(w), 1e-5)
    np.testing.assert_allclose(xd.copy_to_host(), total, rtol=1e-6, atol=1e-6)
    got = yd.copy_to_host()
    assert rel_err(got, rmsnorm_ref(total, w, 1e-5)) < 1e-5
    xc, yc = x.copy(), y.copy()
    norm_cpu.add_rmsnorm(yc, xc, yc, w, 1e-5)
    np.testing.assert_allclose(got, yc, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 13, 2048, 2053] + ([11008, 14336 * 8 + 3] if GPU else []))
def test_silu_mul(n):
    rng = np.random.default_rng(n)
    g, u = randn(rng, n) * 4, randn(rng, n)
    out = poisoned((n,))
    norm_cuda.silu_mul(out, dev(g), dev(u))
    got = out.copy_to_host()
    assert rel_err(got, silu_mul_ref(g, u)) < 1e-5
    cpu = np.empty_like(g)
    norm_cpu.silu_mul(cpu, g, u)
    np.testing.assert_allclose(got, cpu, rtol=1e-5, atol=1e-6)
    # an unaligned view (offset 1 element): the scalar path
    g2, u2 = dev(np.concatenate([[0], g]).astype(np.float32)), dev(u)
    out2 = poisoned((n,))
    norm_cuda.silu_mul(out2, g2[1:], u2)
    np.testing.assert_allclose(out2.copy_to_host(), got, rtol=1e-6, atol=1e-7)
