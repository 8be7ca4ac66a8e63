"""y = x @ w.T + bias on the CPU, w stored (out, in) as in checkpoints. Twin: linear_cuda.py.

Decode (one row) is a matrix-vector product bound by reading w once: a parallel loop of
vectorised dot products. Prefill (many rows) is compute-bound: NumPy's BLAS sgemm."""
import numpy as np
from numba import float32, njit, prange

from . import cpu_pool

GEMV_ROWS = 4  # rows of w per inner step: x is loaded once for 4 dot products


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
def _add_bias(out, bias):
    # out: (m, n); bias: (n,)
    m, n = out.shape
    for r in prange(m):
        for j in range(n):
            out[r, j] += bias[j]


def linear(out, x, w, bias):
    # x: (m, k); w: (n, k); bias: (n,) or (0,); out: (m, n)
    if x.shape[0] == 1:
        cpu_pool.run(_gemv, w.size, out[0], x[0], w)
    else:
        np.matmul(x, w.T, out=out)  # BLAS sgemm; w.T is a view, no copy
    if bias.shape[0]:
        cpu_pool.run(_add_bias, out.size, out, bias)
