"""y = x @ w.T + bias on the CPU, w stored (out, in) as in checkpoints. Twin: linear_cuda.py.

Decode (one row) is a matrix-vector product bound by reading w once: a parallel loop over
blocks of 4 rows of w, each block's dot products in explicit vector IR with software prefetch
(_dots4); a few rows (a short prompt) a parallel loop of vectorised dot products, every row
of x against each block of w while it is in cache. Prefill (many rows) is compute-bound:
NumPy's BLAS sgemm."""
import numpy as np
from llvmlite import ir
from numba import float32, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu_pool
from .llvm_cpu import F32 as _F32, HOST_CPU, I64 as _I64, fma, prefetch, row_sums
from .llvm_cpu import ONE_STREAM_DECODE_F32 as ONE_STREAM_DECODE     # float32's own choice
from .scalar import dots_4x1, dots_4x2
from .cpu_pool import PRANGE

GEMV_ROWS = 4  # rows of w per inner step: x is loaded once for 4 dot products
# up to this many rows of x, our kernel streams w once and beats BLAS sgemm (12288x4096 on 2
# cores: 8 rows 13 ms against 25 ms, 16 rows 20 against 27; even at 24, behind at 32)
GEMV_MAX_ROWS = 16
# decode GEMV: how far ahead (bytes) each row of w is prefetched (the hardware's streams stop
# at every 4 KB page). 1, 2 and 3 KB measured alike here; the same loop without it 1-2% slower
PREFETCH_BYTES = 2048
# decode reading w one row a thread (llvm_cpu.ONE_STREAM_DECODE): 16-bit and 8-bit rows
# prefetched this far ahead (TinyLlama's GEMVs back to back on 2 Zen 5 cores, alternated:
# bfloat16 56-62 GB/s against 45-46 without, 50-52 at 2 KB; q8_0 63-72 against 59; 8 KB alike),
# 1 KB on Zen 3 (bench/tune_decode_gemv.py, 7-11 rounds a run: bfloat16 33.0 / 35.3 / 37.7
# against 29.8 / 33.0 / 32.1 GB/s at 4 KB, 31.1 at 2 KB, 31.6 at 512 B; q8_0 33.9 / 32.6
# against 30.3 / 32.3, 34.4 / 34.1 at 2 KB; TinyLlama's bfloat16 decode 17.9 / 15.8 against
# 14.0 / 14.3 tokens/s, q8_0 within the noise)
STREAM_PREFETCH_BYTES = 1024 if HOST_CPU == "znver3" else 4096
# ... and non-temporally (prefetchnta, llvm_cpu.prefetch's locality 0): w is read once a token,
# and lines fetched so leave L2 and L3 to the KV cache and the activations (TinyLlama's decode
# on 2 Zen 5 cores, against prefetching into every level, in turn in one process
# (bench/ab_stream_locality.py): bfloat16 0.6-1.9% faster at context 16 and 3.4-4.1% at 2000,
# q8_0 0-0.9% and 1.3-3.0%, float32 about even)
STREAM_LOCALITY = 0
_VEC = 8      # floats per vector in _dots4 (256 bits; 512-bit vectors measured no faster)
_UNROLL = 4   # vectors per row per loop step (4 accumulators a row, 128 bytes = 2 lines)



def _make_dots(n_rows, locality=3):
    @intrinsic
    def dots(typingctx, x, w, ldw, nv):
        """The dot products of n_rows rows of w with x over their first 8 nv floats, a tuple.
        x, w are byte addresses (x contiguous; row i of w at w + 4 i ldw, contiguous). Each
        row's line PREFETCH_BYTES ahead is prefetched (llvm_cpu.prefetch's locality) as the
        loop reaches a line."""
        sig = types.UniTuple(types.float32, n_rows)(x, w, ldw, nv)

        def codegen(context, builder, signature, args):
            x, w, ldw, nv = [context.cast(builder, v, t, types.int64)
                             for v, t in zip(args, signature.args)]
            vt = ir.VectorType(_F32, _VEC)
            fp, vp = ir.PointerType(_F32), ir.PointerType(vt)
            xp = builder.inttoptr(x, fp)
            rows = [builder.gep(builder.inttoptr(w, fp),
                                [builder.mul(ldw, ir.Constant(_I64, i))]) for i in range(n_rows)]
            vfma = fma(builder, vt)
            acc = [[cgutils.alloca_once(builder, vt) for _ in range(_UNROLL)]
                   for _ in range(n_rows)]
            for row in acc:
                for a in row:
                    builder.store(ir.Constant(vt, [0.0] * _VEC), a)

            def vec(base, c):
                return builder.load(builder.bitcast(builder.gep(base, [c]), vp), align=4)

            def step(c, u, pf):
                # vector at float offset c of x and of each row into accumulator u
                xv = vec(xp, c)
                # PREFETCH_BYTES ahead in the row; past its end (a row of ldw floats), the same
                # offset in the row n_rows below: the next block's rows (none past the last: a
                # prefetch does not fault)
                ahead = builder.add(c, ir.Constant(_I64, PREFETCH_BYTES // 4))
                below = builder.add(ahead, builder.mul(ldw, ir.Constant(_I64, n_rows - 1)))
                ahead = builder.select(builder.icmp_signed(">=", ahead, ldw), below, ahead)
                for i in range(n_rows):
                    if pf:
                        line = builder.gep(rows[i], [ahead])
                        prefetch(builder, builder.ptrtoint(line, _I64), 0, locality)
                    builder.store(builder.call(vfma, [vec(rows[i], c), xv,
                                                      builder.load(acc[i][u])]), acc[i][u])

            n_main = builder.udiv(nv, ir.Constant(_I64, _UNROLL))
            with cgutils.for_range(builder, n_main) as loop:
                base = builder.mul(loop.index, ir.Constant(_I64, _UNROLL * _VEC))
                for u in range(_UNROLL):   # one prefetch per 64-byte line
                    step(builder.add(base, ir.Constant(_I64, u * _VEC)), u,
                         (u * _VEC * 4) % 64 == 0)
            done = builder.mul(n_main, ir.Constant(_I64, _UNROLL))
            with cgutils.for_range(builder, builder.sub(nv, done)) as loop:
                step(builder.mul(builder.add(done, loop.index), ir.Constant(_I64, _VEC)), 0, True)
            return context.make_tuple(builder, signature.return_type, row_sums(builder, acc))
        return sig, codegen
    return dots


_dots4 = _make_dots(GEMV_ROWS)
_dot1 = _make_dots(1, STREAM_LOCALITY)


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


@njit(fastmath=True, cache=True)
def _gemv(part, parts, out, x, w):
    # x: (1, k); w: (n, k); out: (1, n). Four rows of w per pass over x: the first k - k % 8
    # columns in _dots4, the rest here. In parts (cpu_pool): blocks of rows of w
    n, k = w.shape
    xr, o = x[0], out[0]
    nv = k // _VEC
    k0 = nv * _VEC
    ldw = w.strides[0] // 4
    xa, wa = xr.ctypes.data, w.ctypes.data
    blk_start, blk_stop = cpu_pool.share((n + GEMV_ROWS - 1) // GEMV_ROWS, part, parts)
    for blk in range(blk_start, blk_stop):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            s0, s1, s2, s3 = _dots4(xa, wa + 4 * r0 * ldw, ldw, nv)
            for j in range(k0, k):
                xj = xr[j]
                s0 += w[r0, j] * xj
                s1 += w[r0 + 1, j] * xj
                s2 += w[r0 + 2, j] * xj
                s3 += w[r0 + 3, j] * xj
            o[r0], o[r0 + 1], o[r0 + 2], o[r0 + 3] = s0, s1, s2, s3
        else:
            _tail_rows(out, x, w, r0)


@njit(fastmath=True, cache=True)
def _gemv_one(part, parts, out, x, w):
    # as _gemv, one row of w per step: one read stream a thread (llvm_cpu.ONE_STREAM_DECODE)
    n, k = w.shape
    xr, o = x[0], out[0]
    nv = k // _VEC
    k0 = nv * _VEC
    ldw = w.strides[0] // 4
    xa, wa = xr.ctypes.data, w.ctypes.data
    r_start, r_stop = cpu_pool.share(n, part, parts)
    for r in range(r_start, r_stop):
        s, = _dot1(xa, wa + 4 * r * ldw, ldw, nv)
        for j in range(k0, k):
            s += w[r, j] * xr[j]
        o[r] = s


@njit(fastmath=True, cache=True)
def _gemv_rows(part, parts, out, x, w):
    # x: (m, k) a few rows; w: (n, k); out: (m, n). w streamed from memory once: each block of
    # 4 rows of w (in cache) meets every row of x, two at a time (8 dot products per pass)
    n = w.shape[0]
    m = x.shape[0]
    blk_start, blk_stop = cpu_pool.share((n + GEMV_ROWS - 1) // GEMV_ROWS, part, parts)
    for blk in range(blk_start, blk_stop):
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


@njit(parallel=PRANGE, fastmath=True, cache=True)
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
        bind_gemv(w)(out, x)
    elif m <= GEMV_MAX_ROWS:
        cpu_pool.run_parts(_gemv_rows, m * w.size, out, x, w)
    else:
        np.matmul(x, w.T, out=out)  # BLAS sgemm; w.T is a view, no copy
    if bias.shape[0]:
        cpu_pool.run(_add_bias, out.size, out, bias)


def bind_gemv(w):
    """gemv(out, x) = linear(out, x, w, no bias) for one row of x, its kernel picked once: a
    decode step calls it for every weight, every token, each time with the caches cold from
    the weights streamed before (each Python step costs microseconds there)."""
    return cpu_pool.bind_gemv(*decode_gemv(w))


def decode_gemv(w):
    """The one-row GEMV over w as a compiled decode step calls it (cpu_decode.py): (kernel in
    parts, multiply-adds, w's arguments after out and x, x's skew in bytes or 0, and what the
    kernel takes after x: None for nothing, "x" for x again, "even_odd" for
    linear_bf16_cpu.even_odd(x))."""
    return _gemv_one if ONE_STREAM_DECODE else _gemv, w.size, (w,), 0, None
