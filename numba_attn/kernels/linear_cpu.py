"""y = x @ w.T + bias on the CPU, w stored (out, in) as in checkpoints. Twin: linear_cuda.py.

Decode (one row) is a matrix-vector product bound by reading w once: a parallel loop of
vectorised dot products; a few rows (a short prompt) the same, every row of x against each
block of w while it is in cache. Prefill (many rows) is compute-bound: NumPy's BLAS sgemm."""
import numpy as np
from numba import float32, njit, prange

from . import cpu_pool

GEMV_ROWS = 4  # rows of w per inner step: x is loaded once for 4 dot products
# up to this many rows of x, our kernel streams w once and beats BLAS sgemm (12288x4096 on 2
# cores: 8 rows 13 ms against 25 ms, 16 rows 20 against 27; even at 24, behind at 32)
GEMV_MAX_ROWS = 16


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(out, x, w):
    # x: (k,); w: (n, k); out: (n,)
    n, k = w.shape
    for blk in prange((n + GEMV_ROWS - 1) // GEMV_ROWS):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            a0 = float32(0)
            a1 = float32(0)
            a2 = float32(0)
            a3 = float32(0)
            for j in range(k):
                xj = x[j]
                a0 += w[r0, j] * xj
                a1 += w[r0 + 1, j] * xj
                a2 += w[r0 + 2, j] * xj
                a3 += w[r0 + 3, j] * xj
            out[r0], out[r0 + 1], out[r0 + 2], out[r0 + 3] = a0, a1, a2, a3
        else:  # tail rows
            for r in range(r0, n):
                acc = float32(0)
                for j in range(k):
                    acc += w[r, j] * x[j]
                out[r] = acc


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_rows(out, x, w):
    # x: (m, k) a few rows; w: (n, k); out: (m, n). w streamed from memory once: each block of
    # 4 rows of w (in cache) meets every row of x, two at a time (8 dot products per pass)
    n, k = w.shape
    m = x.shape[0]
    for blk in prange((n + GEMV_ROWS - 1) // GEMV_ROWS):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            w0, w1, w2, w3 = w[r0], w[r0 + 1], w[r0 + 2], w[r0 + 3]
            for i in range(0, m - 1, 2):
                xa, xb = x[i], x[i + 1]
                a0 = float32(0)
                a1 = float32(0)
                a2 = float32(0)
                a3 = float32(0)
                b0 = float32(0)
                b1 = float32(0)
                b2 = float32(0)
                b3 = float32(0)
                for j in range(k):
                    p, q = xa[j], xb[j]
                    a0 += w0[j] * p
                    a1 += w1[j] * p
                    a2 += w2[j] * p
                    a3 += w3[j] * p
                    b0 += w0[j] * q
                    b1 += w1[j] * q
                    b2 += w2[j] * q
                    b3 += w3[j] * q
                out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3] = a0, a1, a2, a3
                out[i + 1, r0], out[i + 1, r0 + 1] = b0, b1
                out[i + 1, r0 + 2], out[i + 1, r0 + 3] = b2, b3
            if m % 2:
                xa = x[m - 1]
                a0 = float32(0)
                a1 = float32(0)
                a2 = float32(0)
                a3 = float32(0)
                for j in range(k):
                    p = xa[j]
                    a0 += w0[j] * p
                    a1 += w1[j] * p
                    a2 += w2[j] * p
                    a3 += w3[j] * p
                out[m - 1, r0], out[m - 1, r0 + 1] = a0, a1
                out[m - 1, r0 + 2], out[m - 1, r0 + 3] = a2, a3
        else:  # tail rows of w
            for r in range(r0, n):
                wr = w[r]
                for i in range(m):
                    xi = x[i]
                    acc = float32(0)
                    for j in range(k):
                        acc += wr[j] * xi[j]
                    out[i, r] = acc


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
        cpu_pool.run(_gemv, w.size, out[0], x[0], w)
    elif m <= GEMV_MAX_ROWS:
        cpu_pool.run(_gemv_rows, m * w.size, out, x, w)
    else:
        np.matmul(x, w.T, out=out)  # BLAS sgemm; w.T is a view, no copy
    if bias.shape[0]:
        cpu_pool.run(_add_bias, out.size, out, bias)
