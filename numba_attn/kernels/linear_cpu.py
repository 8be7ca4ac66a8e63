"""y = x @ w.T + bias on the CPU, w stored (out, in) as in checkpoints. Twin: linear_cuda.py.

Decode (one row) is a matrix-vector product bound by reading w once: a parallel loop of
vectorised dot products; a few rows (a short prompt) the same, every row of x against each
block of w while it is in cache. Prefill (many rows) is compute-bound: NumPy's BLAS sgemm."""
import numpy as np
from numba import float32, njit, prange

from . import cpu_pool
from .scalar import dots_4x1, dots_4x2

GEMV_ROWS = 4  # rows of w per inner step: x is loaded once for 4 dot products
# up to this many rows of x, our kernel streams w once and beats BLAS sgemm (12288x4096 on 2
# cores: 8 rows 13 ms against 25 ms, 16 rows 20 against 27; even at 24, behind at 32)
GEMV_MAX_ROWS = 16


@njit(inline="always", fastmath=True, cache=True)
def _tail_rows(out, x, w, r0):
    # rows r0..n-1 of w (fewer than GEMV_ROWS) against every row of x: out (m, n)
    for r in range(r0, w.shape[0]):
        wr = w[r]
        for i in range(x.shape[0]):
            xi = x[i]
            acc = float32(0)
            for j in range(wr.shape[0]):
                acc += wr[j] * xi[j]
            out[i, r] = acc


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(out, x, w):
    # x: (1, k); w: (n, k); out: (1, n). Four rows of w per pass over x
    n = w.shape[0]
    xr, o = x[0], out[0]
    for blk in prange((n + GEMV_ROWS - 1) // GEMV_ROWS):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            o[r0], o[r0 + 1], o[r0 + 2], o[r0 + 3] = dots_4x1(w[r0], w[r0 + 1], w[r0 + 2],
                                                              w[r0 + 3], xr)
        else:
            _tail_rows(out, x, w, r0)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_rows(out, x, w):
    # x: (m, k) a few rows; w: (n, k); out: (m, n). w streamed from memory once: each block of
    # 4 rows of w (in cache) meets every row of x, two at a time (8 dot products per pass)
    n = w.shape[0]
    m = x.shape[0]
    for blk in prange((n + GEMV_ROWS - 1) // GEMV_ROWS):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            w0, w1, w2, w3 = w[r0], w[r0 + 1], w[r0 + 2], w[r0 + 3]
            for i in range(0, m - 1, 2):
                (out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3],
                 out[i + 1, r0], out[i + 1, r0 + 1], out[i + 1, r0 + 2],
                 out[i + 1, r0 + 3]) = dots_4x2(w0, w1, w2, w3, x[i], x[i + 1])
            if m % 2:
                i = m - 1
                out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3] = dots_4x1(
                    w0, w1, w2, w3, x[i])
        else:
            _tail_rows(out, x, w, r0)


@njit(parallel=True, fastmath=True, cache=True)
def _add_bias(out, bias):
    # out: (m, n); bias: (n,)
    m, n = out.shape
    for r in prange(m):
        for j in range(n):
            out[r, j] += bias[j]


def linear(out, x, w, bias):
    # x: (m, k); w: (n, k); bias: (n,) or (0,); out: (m, n)
    m = x.shape[0]
    if m == 1:
        cpu_pool.run(_gemv, w.size, out, x, w)
    elif m <= GEMV_MAX_ROWS:
        cpu_pool.run(_gemv_rows, m * w.size, out, x, w)
    else:
        np.matmul(x, w.T, out=out)  # BLAS sgemm; w.T is a view, no copy
    if bias.shape[0]:
        cpu_pool.run(_add_bias, out.size, out, bias)
