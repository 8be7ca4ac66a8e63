"""linear (GEMV for one row, the few-rows kernel up to GEMV_MAX_ROWS, GEMM beyond) against the
float64 reference."""
import math

import numpy as np
import pytest

from numba_attn import linear
from numba_attn.kernels import linear_cpu
from numba_attn.kernels.linear_cpu import GEMV_MAX_ROWS
from tests.reference import linear_ref


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_matmul_close(y, want, k):
    """float32 dot products of k standard-normal terms: results are about sqrt(k) in size and the
    rounding error grows like sqrt(k) too, so the bound is relative 3e-5 of that scale."""
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=3e-5 * math.sqrt(k))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("m,k,n", [
    (1, 64, 48),        # decode: GEMV, n a multiple of its 4-row step
    (1, 129, 7),        # GEMV with tail rows (7 = 4 + 3) and an odd length
    (1, 4096, 12),      # GEMV with a long reduction
    (2, 64, 48),        # a few rows: every row of x against each 4-row block of w
    (7, 129, 65),       # a few rows, odd count, tail rows of w, awkward sizes
    (GEMV_MAX_ROWS, 130, 9),        # the most rows the few-rows kernel takes
    (GEMV_MAX_ROWS + 1, 129, 65),   # one more: BLAS sgemm
    (129, 128, 96),
])
def test_linear_matches_reference(m, k, n, bias):
    x, w = randn(m * 7 + k, m, k), randn(n + k, n, k)
    b = randn(n, n) if bias else None
    y = linear(x, w, b)
    assert y.shape == (m, n) and y.dtype == np.float32
    assert_matmul_close(y, linear_ref(x, w, b), k)


@pytest.mark.parametrize("x_shape", [(129,), (1, 1, 129), (2, 7, 129), (2, 3, 5, 129), (1, 1, 1, 129)])
def test_linear_leading_axes(x_shape):
    x, w, b = randn(1, *x_shape), randn(2, 33, 129), randn(3, 33)
    y = linear(x, w, b)
    assert y.shape == x_shape[:-1] + (33,)
    assert_matmul_close(y, linear_ref(x, w, b), 129)


@pytest.mark.parametrize("m", [1, 9])
def test_linear_into_out_buffer(m):
    x, w, b = randn(4, m, 64), randn(5, 40, 64), randn(6, 40)
    out = np.full((m, 40), np.nan, np.float32)
    y = linear(x, w, b, out=out)
    assert y is out
    assert_matmul_close(out, linear_ref(x, w, b), 64)


def test_fused_qkv_projection_is_three_projections():
    hidden, heads, kv_heads, d = 256, 8, 2, 32
    wq, wk, wv = randn(7, heads * d, hidden), randn(8, kv_heads * d, hidden), randn(9, kv_heads * d, hidden)
    w = np.concatenate([wq, wk, wv])                     # (q + 2 kv features, hidden)
    for m in (1, 7):
        x = randn(10 + m, m, hidden)
        qkv = linear(x, w)
        q, kk, v = np.split(qkv, [heads * d, (heads + kv_heads) * d], axis=-1)
        for part, wp in ((q, wq), (kk, wk), (v, wv)):
            assert_matmul_close(part, linear_ref(x, wp), hidden)


def _not_this_path(*args):
    raise AssertionError("the other decode kernel ran")


@pytest.mark.parametrize("one_stream", [True, False], ids=["one_row", "four_rows"])
@pytest.mark.parametrize("k,n", [(1, 5), (7, 9), (64, 48), (129, 7), (4103, 13)])
def test_decode_reads_one_or_four_rows(monkeypatch, one_stream, k, n):
    """Decode's two ways through w (one row a step on AMD Zen, 4 rows elsewhere), each on any
    CPU; the other kernel raises."""
    monkeypatch.setattr(linear_cpu, "ONE_STREAM_DECODE", one_stream)
    monkeypatch.setattr(linear_cpu, "_gemv" if one_stream else "_gemv_one", _not_this_path)
    monkeypatch.setattr(linear_cpu, "_gemv_rows", _not_this_path)
    x, w = randn(k + n, 1, k), randn(n * k, n, k)
    assert_matmul_close(linear(x, w), linear_ref(x, w), k)


def test_decode_row_agrees_with_prefill_rows():
    x, w = randn(11, 5, 300), randn(12, 70, 300)
    many = linear(x, w)
    for r in range(5):
        one = linear(x[r:r + 1], w)
        assert_matmul_close(one, many[r:r + 1], 300)


def test_wrong_reference_is_detected():
    """Sanity: transposing w, dropping the bias or one input feature is outside the bound."""
    x, w, b = randn(13, 3, 64), randn(14, 64, 64), randn(15, 64)
    for m in (1, 3):
        y = linear(x[:m], w, b)
        for wrong in (x[:m].astype(np.float64) @ w + b,            # w used as (in, out)
                      linear_ref(x[:m], w),                          # bias forgotten
                      linear_ref(x[:m, :-1], w[:, :-1], b)):         # one feature short
            with pytest.raises(AssertionError):
                assert_matmul_close(y, wrong, 64)
