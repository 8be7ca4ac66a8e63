"""rmsnorm and silu_mul (SwiGLU gate) against the float64 references."""
import numpy as np
import pytest

from numba_attn import add_rmsnorm, rmsnorm, silu_mul
from numba_attn.kernels import llvm_cpu, norm_cpu
from tests.reference import rmsnorm_ref, silu_mul_ref

RTOL, ATOL = 1e-5, 1e-6


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------- rmsnorm

@pytest.mark.parametrize("shape", [(64,), (1, 2048), (7, 129), (2, 3, 5, 64), (600, 70)])
def test_add_rmsnorm_matches_reference(shape):
    """x += y in place, out = rmsnorm(x) * w; into y itself (the model's use) or a new array."""
    x, y = randn(shape[-1], *shape), randn(shape[-1] + 1, *shape)
    w = randn(2, shape[-1])
    total = x.astype(np.float64) + y
    want = rmsnorm_ref(total, w, 1e-5)
    x1, y1 = x.copy(), y.copy()
    out = add_rmsnorm(x1, y1, w, 1e-5)
    np.testing.assert_allclose(x1, total, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    x2, y2 = x.copy(), y.copy()
    assert add_rmsnorm(x2, y2, w, 1e-5, out=y2) is y2
    np.testing.assert_allclose(y2, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(x2, x1)
    assert not np.allclose(out, rmsnorm_ref(x, w, 1e-5), rtol=1e-3)   # the add happened


def test_add_rmsnorm_refuses_out_x_and_bad_shapes():
    x, y, w = randn(0, 3, 8), randn(1, 3, 8), randn(2, 8)
    with pytest.raises(ValueError, match="out must not be x"):
        add_rmsnorm(x, y, w, out=x)
    with pytest.raises(ValueError, match="same shape"):
        add_rmsnorm(x, randn(1, 3, 9), w)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(x, y, randn(2, 9))

@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("shape", [(64,), (1, 4096), (7, 129), (2, 7, 128), (2, 3, 5, 64)])
def test_rmsnorm_matches_reference(shape, eps):
    x, w = randn(len(shape) * 100 + shape[-1], *shape), randn(1, shape[-1])
    x_before = x.copy()
    y = rmsnorm(x, w, eps)
    assert y.shape == x.shape and y.dtype == np.float32 and y is not x
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_allclose(y, rmsnorm_ref(x, w, eps), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("magnitude", [1e-4, 1e-2, 1e3, 1e4])
def test_rmsnorm_magnitudes(magnitude):
    """Large rows are normalised exactly; tiny rows are where eps dominates the denominator."""
    x = randn(2, 7, 256) * np.float32(magnitude)
    w = randn(3, 256)
    y = rmsnorm(x, w, 1e-6)
    np.testing.assert_allclose(y, rmsnorm_ref(x, w, 1e-6), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(7, 129), (2, 3, 64)])
def test_rmsnorm_in_place(shape):
    x, w = randn(4, *shape), randn(5, shape[-1])
    want = rmsnorm_ref(x, w, 1e-5)
    y = rmsnorm(x, w, 1e-5, out=x)
    assert y is x
    np.testing.assert_allclose(x, want, rtol=RTOL, atol=ATOL)


def test_rmsnorm_into_out_buffer_and_integer_eps():
    x, w = randn(6, 3, 64), randn(7, 64)
    out = np.full_like(x, np.nan)
    assert rmsnorm(x, w, 1, out=out) is out
    np.testing.assert_allclose(out, rmsnorm_ref(x, w, 1.0), rtol=RTOL, atol=ATOL)


def test_rmsnorm_wrong_reference_is_detected():
    x, w = randn(8, 5, 64) * np.float32(1e-3), randn(9, 64)
    y = rmsnorm(x, w, 1e-6)
    for wrong in (rmsnorm_ref(x, w, 1e-5),                           # another eps
                  rmsnorm_ref(x, np.ones(64), 1e-6),                 # weight ignored
                  x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=0) + 1e-6) * w):  # wrong axis
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(y, wrong, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- silu_mul

@pytest.mark.parametrize("shape", [(1,), (7, 129), (10000,), (2, 3, 4101)])
def test_silu_mul_matches_reference(shape):
    gate, up = randn(10, *shape) * np.float32(3), randn(11, *shape)
    y = silu_mul(gate, up)
    assert y.shape == gate.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, silu_mul_ref(gate, up), rtol=RTOL, atol=ATOL)


def test_bound_silu_mul_reads_the_buffers_at_each_call():
    """norm_cpu.bind_silu_mul (a decode step's, bound to its buffers once) computes from the
    values the buffers hold when it is called, in place into gate as the model runs it."""
    gate, up = randn(12, 1, 5632) * np.float32(3), randn(13, 1, 5632)
    g, u = gate.reshape(-1), up.reshape(-1)
    f = norm_cpu.bind_silu_mul(g, g, u)
    for seed in (14, 15):
        g[:] = randn(seed, 5632) * np.float32(3)
        u[:] = randn(seed + 10, 5632)
        want = silu_mul_ref(g.copy(), u.copy())
        f()
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)


def test_silu_mul_extreme_gates_stay_finite():
    gate = np.array([-1e4, -200.0, -88.0, -30.0, -1.0, -1e-8, 0.0, 1e-8, 1.0, 30.0, 88.0, 200.0, 1e4],
                    np.float32)
    up = np.linspace(-2.0, 2.0, gate.size).astype(np.float32)
    y = silu_mul(gate, up)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, silu_mul_ref(gate, up), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("path", ["fast", "portable"])
@pytest.mark.parametrize("into", ["new", "gate", "up"])
@pytest.mark.parametrize("shape", [(7,), (1, 45), (1, 5632), (norm_cpu.PARALLEL_MIN + 7,),
                                   (3, 20011), (512, 5632)])
def test_silu_mul_paths(shape, into, path, monkeypatch):
    """A decode step's sizes (one thread) and sizes that take the parallel kernels, each
    chunk's last elements off the 16-lane blocks: AVX-512 (fast: vrcp14ps and a Newton step for
    the division) and the plain loop, into a new array or in place, with extreme gates spread
    through them."""
    monkeypatch.setattr(llvm_cpu, "CPU_PATH", path)
    gate, up = randn(20, *shape) * np.float32(4), randn(21, *shape)
    flat = gate.reshape(-1)
    flat[::997] = np.float32(-1e4)
    flat[5::1009] = np.float32(95.0)
    flat[-1], flat[-2] = np.float32(-88.5), np.float32(1e4)
    want = silu_mul_ref(gate, up)
    out = {"new": None, "gate": gate, "up": up}[into]
    y = silu_mul(gate, up) if out is None else silu_mul(gate, up, out=out)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("into", ["gate", "up"])
def test_silu_mul_in_place(into):
    gate, up = randn(12, 7, 129), randn(13, 7, 129)
    want = silu_mul_ref(gate, up)
    out = gate if into == "gate" else up
    assert silu_mul(gate, up, out=out) is out
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_silu_mul_into_out_buffer():
    gate, up = randn(14, 5, 64), randn(15, 5, 64)
    out = np.full_like(gate, np.nan)
    assert silu_mul(gate, up, out=out) is out
    np.testing.assert_allclose(out, silu_mul_ref(gate, up), rtol=RTOL, atol=ATOL)


def test_silu_mul_wrong_reference_is_detected():
    gate, up = randn(16, 100), randn(17, 100)
    y = silu_mul(gate, up)
    for wrong in (silu_mul_ref(up, gate),                               # arguments swapped
                  gate / (1 + np.exp(-gate.astype(np.float64)))):       # up forgotten
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(y, wrong, rtol=RTOL, atol=ATOL)
