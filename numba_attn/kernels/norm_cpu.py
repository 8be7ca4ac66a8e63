"""RMSNorm (alone, or after the residual add: add_rmsnorm) and the SwiGLU gate on the CPU.
Twin: norm_cuda.py.

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


@njit(fastmath=True, cache=True)
def _add_rmsnorm_rows(out, x, y, weight, eps, r0, r1):
    # rows r0..r1-1: x += y (the residual stream, in place), out = rmsnorm(x) * weight; out may
    # be y (each row of y is read before that row of out is written)
    n = x.shape[1]
    for r in range(r0, r1):
        ss = float32(0)
        for j in range(n):
            v = x[r, j] + y[r, j]
            x[r, j] = v
            ss += v * v
        inv = float32(1) / math.sqrt(ss / float32(n) + float32(eps))
        for j in range(n):
            out[r, j] = x[r, j] * inv * weight[j]


@njit(parallel=True, cache=True)
def _add_rmsnorm_parallel(out, x, y, weight, eps):
    for r in prange(x.shape[0]):
        _add_rmsnorm_rows(out, x, y, weight, eps, r, r + 1)


def add_rmsnorm(out, x, y, weight, eps):
    # x, y, out: (m, n); weight: (n,). x += y, then out = rmsnorm(x) * weight
    if x.size < PARALLEL_MIN:
        _add_rmsnorm_rows(out, x, y, weight, eps, 0, x.shape[0])
    else:
        _add_rmsnorm_parallel(out, x, y, weight, eps)


@njit(fastmath=True, error_model="numpy", cache=True)
def _silu_mul_range(out, gate, up, i0, i1, into):
    # elements i0..i1-1 of gate, up, out: (n,). silu(gate) * up into out (into 0), gate (into 1)
    # or up (into 2). In place gets its own loop: with out the same memory as gate, the loop
    # would fail its runtime overlap check and run scalar (3x slower). error_model="numpy": no
    # division-by-zero check (1 + e^-x > 0). Loops run over views from 0: an index from
    # range(i0, i1) might be negative to Numba, and its wraparound check blocks vectorising
    g, u = gate[i0:i1], up[i0:i1]
    if into == 1:
        for i in range(g.shape[0]):
            g[i] = silu_vec(g[i]) * u[i]
    elif into == 2:
        for i in range(g.shape[0]):
            u[i] = silu_vec(g[i]) * u[i]
    else:
        o = out[i0:i1]
        for i in range(g.shape[0]):
            o[i] = silu_vec(g[i]) * u[i]


@njit(parallel=True, cache=True)
def _silu_mul_parallel(out, gate, up, into):
    n = gate.shape[0]
    for c in prange((n + SILU_CHUNK - 1) // SILU_CHUNK):
        _silu_mul_range(out, gate, up, c * SILU_CHUNK, min(n, (c + 1) * SILU_CHUNK), into)


def silu_mul(out, gate, up):
    # gate, up, out: (n,); out may be gate or up (the same memory, not just overlapping)
    at = out.ctypes.data
    into = 1 if at == gate.ctypes.data else 2 if at == up.ctypes.data else 0
    if gate.size < PARALLEL_MIN:
        _silu_mul_range(out, gate, up, 0, gate.shape[0], into)
    else:
        _silu_mul_parallel(out, gate, up, into)
