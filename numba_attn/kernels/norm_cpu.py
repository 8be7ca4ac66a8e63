"""RMSNorm and the SwiGLU gate on the CPU. Twin: norm_cuda.py."""
import math

from numba import float32, njit, prange

from .scalar import silu


@njit(parallel=True, fastmath=True, cache=True)
def rmsnorm(out, x, weight, eps):
    # x, out: (m, n); weight: (n,). out = x / sqrt(mean(x^2) + eps) * weight
    m, n = x.shape
    for r in prange(m):
        ss = float32(0)
        for j in range(n):
            ss += x[r, j] * x[r, j]
        inv = float32(1) / math.sqrt(ss / float32(n) + float32(eps))
        for j in range(n):
            out[r, j] = x[r, j] * inv * weight[j]


SILU_CHUNK = 4096  # elements per parallel task


@njit(parallel=True, fastmath=True, cache=True)
def silu_mul(out, gate, up):
    # gate, up, out: (n,). out = silu(gate) * up
    n = gate.shape[0]
    for c in prange((n + SILU_CHUNK - 1) // SILU_CHUNK):
        for i in range(c * SILU_CHUNK, min(n, (c + 1) * SILU_CHUNK)):
            out[i] = silu(gate[i]) * up[i]
