"""RMSNorm (alone, or after the residual add: add_rmsnorm) and SwiGLU's silu(gate) * up on the
GPU. Twin: norm_cpu.py.

Both are memory-bound: each element is read once and written once, in chunks of 8 (16-byte
loads and stores) when the rows allow it.
rmsnorm: one block per row; a block-wide sum of squares, then a second pass over the row (an L1
hit) writes the normalised values. silu_mul: one thread per chunk of 8."""
import functools
import math

from numba import cuda

from .scalar import FASTMATH_INF, silu
from .util_cuda import (CHUNK, aligned, flat, float32, group_sum, load8, load8_tail,
                        scratch_size, store8, wide_ok)

MAX_THREADS = 256          # rmsnorm threads per block (a multiple of 32, at most 1024)
MAX_WARPS = MAX_THREADS // 32
SILU_THREADS = 256         # silu_mul threads per block, one chunk of 8 elements each
SCRATCH = scratch_size(MAX_THREADS)


@functools.cache
def rmsnorm_kernel(wide, residual=False):
    """The rmsnorm kernel; wide: rows allow 16-byte loads (n % 8 == 0, aligned bases);
    residual: first x += y (add_rmsnorm), each thread writing back the chunks it reads."""
    ld = load8 if wide else load8_tail

    @cuda.jit(fastmath=FASTMATH_INF)
    def rmsnorm(out, x, y, weight, eps, n):
        # x, y, out: (m * n,) rows of n (y unused without residual); weight: (n,); one block
        # per row, blockDim.x threads
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        row0 = cuda.blockIdx.x * n                   # int64 offsets: m * n may pass 2**31
        partial = cuda.shared.array(MAX_WARPS, float32)
        scratch = cuda.shared.array(SCRATCH, float32)

        # pass 1: this thread's sum of squares over chunks tid, tid + nthreads, ...
        ss = float32(0)
        for j in range(tid * CHUNK, n, nthreads * CHUNK):
            v = ld(x, row0 + j, row0 + n)
            if residual:                             # x += y, written back by this thread
                u = ld(y, row0 + j, row0 + n)
                v = (v[0] + u[0], v[1] + u[1], v[2] + u[2], v[3] + u[3], v[4] + u[4],
                     v[5] + u[5], v[6] + u[6], v[7] + u[7])
                if wide:
                    store8(x, row0 + j, v)
                else:
                    for c in range(CHUNK):
                        if j + c < n:
                            x[row0 + j + c] = v[c]
            ss += (v[0] * v[0] + v[1] * v[1]) + (v[2] * v[2] + v[3] * v[3]) + \
                (v[4] * v[4] + v[5] * v[5]) + (v[6] * v[6] + v[7] * v[7])

        # block sum: within each warp, then across the warps
        ss = group_sum(ss, 32, scratch, tid)
        if tid % 32 == 0:
            partial[tid // 32] = ss
        cuda.syncthreads()      # every warp's partial is in shared memory
        total = float32(0)
        for w in range(nthreads // 32):
            total += partial[w]
        inv = float32(1) / math.sqrt(total / float32(n) + eps)

        # pass 2: normalise and scale (x is read again, from L1; with residual, the values
        # this same thread wrote)
        for j in range(tid * CHUNK, n, nthreads * CHUNK):
            v = ld(x, row0 + j, row0 + n)
            g = ld(weight, j, n)
            if wide:
                store8(out, row0 + j, (v[0] * inv * g[0], v[1] * inv * g[1], v[2] * inv * g[2],
                                       v[3] * inv * g[3], v[4] * inv * g[4], v[5] * inv * g[5],
                                       v[6] * inv * g[6], v[7] * inv * g[7]))
            else:
                for c in range(CHUNK):
                    if j + c < n:
                        out[row0 + j + c] = v[c] * inv * g[c]

    return rmsnorm


@functools.cache
def silu_mul_kernel(wide):
    """The silu_mul kernel; wide: all three bases are 16-byte aligned."""

    @cuda.jit(fastmath=FASTMATH_INF)
    def silu_mul(out, gate, up, n):
        # out, gate, up: (n,); thread i handles elements [8i, 8i + 8)
        j = (cuda.blockIdx.x * SILU_THREADS + cuda.threadIdx.x) * CHUNK
        if j >= n:                                   # bounds guard
            return
        if wide and j + CHUNK <= n:
            g = load8(gate, j, n)
            u = load8(up, j, n)
            store8(out, j, (silu(g[0]) * u[0], silu(g[1]) * u[1], silu(g[2]) * u[2],
                            silu(g[3]) * u[3], silu(g[4]) * u[4], silu(g[5]) * u[5],
                            silu(g[6]) * u[6], silu(g[7]) * u[7]))
        else:
            g = load8_tail(gate, j, n)
            u = load8_tail(up, j, n)
            for c in range(CHUNK):
                if j + c < n:
                    out[j + c] = silu(g[c]) * u[c]

    return silu_mul


def _threads_for(n):
    # enough threads for one chunk of 8 each, a power of two in [32, MAX_THREADS]
    t = 32
    while t < MAX_THREADS and t * CHUNK < n:
        t *= 2
    return t


def rmsnorm(out, x, weight, eps, *, stream=0):
    # x, out: (m, n); weight: (n,)
    m, n = x.shape
    if m == 0 or n == 0:
        return
    wide = wide_ok(x, n) and wide_ok(out, n) and wide_ok(weight, n)
    xf = flat(x)
    rmsnorm_kernel(wide)[m, _threads_for(n), stream](flat(out), xf, xf, weight, float32(eps), n)


def add_rmsnorm(out, x, y, weight, eps, *, stream=0):
    # x, y, out: (m, n); weight: (n,). x += y, then out = rmsnorm(x) * weight (out may be y)
    m, n = x.shape
    if m == 0 or n == 0:
        return
    wide = wide_ok(x, n) and wide_ok(y, n) and wide_ok(out, n) and wide_ok(weight, n)
    rmsnorm_kernel(wide, True)[m, _threads_for(n), stream](flat(out), flat(x), flat(y), weight,
                                                           float32(eps), n)


def silu_mul(out, gate, up, *, stream=0):
    # out, gate, up: (n,)
    n = gate.shape[0]
    if n == 0:
        return
    wide = aligned(out) and aligned(gate) and aligned(up)
    blocks = (n + SILU_THREADS * CHUNK - 1) // (SILU_THREADS * CHUNK)
    silu_mul_kernel(wide)[blocks, SILU_THREADS, stream](out, gate, up, n)
