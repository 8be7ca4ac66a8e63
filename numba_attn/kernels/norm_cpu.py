"""RMSNorm and the SwiGLU gate on the CPU. Twin: norm_cuda.py.

Each kernel is a serial function over a range of rows (or elements) and a thin parallel driver
over ranges; small inputs (a decode step's single row) skip the thread pool, whose wake-up costs
more than the work."""
import math

from numba import float32, njit, prange

from .scalar import silu_vec

PARALLEL_MIN = 1 << 15  # elements below which the serial function runs alone
SILU_CHUNK = 4096       # elements per parallel task


@njit(fastmath=True, cache=True)
def _rmsnorm_rows(out, x, weight, eps, r0, r1):
    # rows r0..r1-1 of x, out: (m, n); weight: (n,). out = x / sqrt(mean(x^2) + eps) * weight
    n = x.shape[1]
    for r in range(r0, r1):
        ss = float32(0)
        for j in range(n):
            ss += x[r, j] * x[r, j]
        inv = float32(1) / math.sqrt(ss / float32(n) + float32(eps))
        for j in range(n):
            out[r, j] = x[r, j] * inv * weight[j]


@njit(parallel=True, cache=True)
def _rmsnorm_parallel(out, x, weight, eps):
    for r in prange(x.shape[0]):
        _rmsnorm_rows(out, x, weight, eps, r, r + 1)


def rmsnorm(out, x, weight, eps):
    # x, out: (m, n); weight: (n,)
    if x.size < PARALLEL_MIN:
        _rmsnorm_rows(out, x, weight, eps, 0, x.shape[0])
    else:
        _rmsnorm_parallel(out, x, weight, eps)


@njit(fastmath=True, error_model="numpy", cache=True)
def _silu_mul_range(out, gate, up, i0, i1):
    # elements i0..i1-1 of gate, up, out: (n,). out = silu(gate) * up. error_model="numpy": no
    # division-by-zero check (1 + e^-x > 0), which kept the loop from vectorising (8x slower)
    for i in range(i0, i1):
        out[i] = silu_vec(gate[i]) * up[i]


@njit(parallel=True, cache=True)
def _silu_mul_parallel(out, gate, up):
    n = gate.shape[0]
    for c in prange((n + SILU_CHUNK - 1) // SILU_CHUNK):
        _silu_mul_range(out, gate, up, c * SILU_CHUNK, min(n, (c + 1) * SILU_CHUNK))


def silu_mul(out, gate, up):
    # gate, up, out: (n,)
    if gate.size < PARALLEL_MIN:
        _silu_mul_range(out, gate, up, 0, gate.shape[0])
    else:
        _silu_mul_parallel(out, gate, up)
