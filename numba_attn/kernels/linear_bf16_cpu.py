"""y = x @ w.T + bias on the CPU for 16-bit float weights (bfloat16, float16), w stored (out, in);
the kernels take its bits (uint16) and a flag, half (float16) or not (bfloat16). Twin of
linear_cpu.py, function for function; x, out and the sums are float32.

Decode and a few rows (up to GEMV_MAX_ROWS) read w once, 2 bytes a weight, and are bound by
memory: each weight is widened to float32 exactly (bfloat16: its bits moved up 16; float16:
the F16C conversion) and multiplied in float32 FMAs; decode reads w one row at a time (one read
stream a thread, 16 weights a vector; on Zen 4 against a copy of x 16 bytes off a 32-byte
boundary, DECODE_X_SKEW) on AMD Zen, elsewhere as a few rows do, 4 rows of w a
pass over x as linear_cpu's _dots4 (bfloat16 32 weights a vector, two instructions widening
them against x's even and odd elements). x is not rounded: vdpbf16ps would
round it to bfloat16 (2^-9 relative) for no gain where memory is the limit (12288x4096 on 2
Zen 4 cores with the caches flushed: 1.8-1.9 ms = 2.6-2.8x our float32 GEMV, 53-56 GB/s). The
portable path is the same loop in plain numba (the widening as integer arithmetic), which
LLVM vectorises.

Prefill (more rows): x rounded to bfloat16 once, then with AMX-BF16 tiles (gemm_amx,
several times float32's FMA rate), else with AVX-512 BF16 a blocked vdpbf16ps GEMM (gemm_bf16,
twice float32's rate); otherwise (and for float16) tiles of w widened to float32 in cache and
NumPy's BLAS sgemm. Products of bfloat16s are exact in float32 and summed in float32 on every
path."""
import numpy as np
from llvmlite import ir
from numba import float32, get_num_threads, int32, njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu_pool
from .linear_cpu import GEMV_MAX_ROWS, GEMV_ROWS, PREFETCH_BYTES, STREAM_LOCALITY, \
    STREAM_PREFETCH_BYTES, _add_bias
from .llvm_cpu import F32 as _F32, HOST_CPU, I32 as _I32, I64 as _I64, ONE_STREAM_DECODE, \
    amx_path, bits_as_float32, copy_lines, dpbf16ps, fast_path, float32_bits, fma, \
    store_transposed16, prefetch, row_sums, tile_config, tile_config_bytes, tile_dpbf16ps, \
    tile_load, tile_release, tile_store, tile_zero, widen16
from .cpu_pool import PRANGE

_VEC = 16     # weights per vector in _make_dots16 (32 bytes, widened to 512 bits)
_UNROLL = 4   # vectors per row per loop step in _dots4_f16 (4 accumulators a row, 2 lines)
# ... and in decode's one-row bfloat16 dots: 8 on Zen 4 (TinyLlama's bfloat16 decode step, A/B
# token by token in one process: 4-12% faster than 4 in three runs; 2 and 16 no faster than 4;
# float16's 8 was 4.6% slower, so it keeps 4); 4 elsewhere (Zen 5 measured with 4 only)
_STREAM_UNROLL_BF16 = 8 if HOST_CPU == "znver4" else _UNROLL
_UNROLL_BF16 = 2   # 64-byte chunks per row per loop step in _dots4_bf16 (2 lines)
# decode (one row of x) on AMD Zen reads w one row at a time, so each thread streams one address
# range: 4 rows interleaved held 2 cores to ~40 GB/s where one stream reached 53-56 (12288x4096);
# on an Intel Xeon 4 rows interleaved streamed faster (llvm_cpu.ONE_STREAM_DECODE)
# On Zen 4 the one-row GEMV reads x from a copy 16 bytes past a 32-byte boundary
# (cpu_pool.skewed_row): an x on a 32-byte boundary held it to 21-25 GB/s against 30-35 (2 cores,
# the same weights in turn in one process; TinyLlama's bfloat16 GEMVs 78.6 against 57.6-60.2 ms
# a token with x at 0x10, 0x1c, 0x30, 0x4 or 0x8 past a page, 73.9 at 0x20; float32's and q8_0's
# GEMVs alike at every offset). Measured on Zen 4 alone
DECODE_X_SKEW = 16 if HOST_CPU == "znver4" else 0
# prefill without BF16: rows of w widened per BLAS call (their float32 tile about TILE_BYTES)
TILE_BYTES = 1 << 23
# prefill with BF16 (gemm_bf16): a micro-kernel computes MR rows of x against NR rows of w, in
# MR * NR / 16 = 24 accumulators of 16 floats (of 32 registers); KC_PAIRS pairs of the input
# axis per pass: a packed panel of w (KC_PAIRS * NR * 4 = 192 KB, L2) meets every block of
# rows of x. 2 Zen 4 cores, 512 x 2048 x (2048, 5632), KC_PAIRS 256: 8 x 48 at 357-381 /
# 363-374 GFLOP/s; 12 x 32 332-340 / 311-335; 6 x 64 375 / 366 (sgemm 180-204). 2 Zen 5 cores,
# TinyLlama's four prefill-512 GEMMs, 8 x 48: KC_PAIRS 1024 711-740 GFLOP/s, 512 685-691, 256
# 645-662, 128 584-616 (the tile alone in L1: 510 a core; sgemm 220-229)
MR = 8
NR = 48
KC_PAIRS = 1024
# prefill with AMX-BF16 (gemm_amx): 32 rows of w are two A tiles (16 rows x 32 bfloat16
# each), 32 rows of x packed in pairs (pack_x_bf16, 16 rows a block) two B tiles, and four
# 16 x 16 float32 tiles accumulate their products along the whole input axis (w's packed rows
# in L2, x's tiles prefetched AMX_PREFETCH steps ahead). 2 cores, 512 rows, weights from
# memory: 1.07-1.17x the same tiles in slices of 8 steps (their accumulators stored and
# reloaded each slice) at three of four TinyLlama shapes, the fourth within the noise; 1, 2
# or 3 steps ahead alike, none 1.2x slower at k = 5632
AMX_PREFETCH = 2
# the next block of w packed while the current one multiplies, where a block has up to this
# many steps of 32 (2 cores, 512 rows, weights from memory: k = 2048 1.03-1.33x, 3072 1.07x,
# 4096 1.00-1.10x, 5632 0.90-0.94x: two packed blocks and x's stream crowd L2)
AMX_PIPELINE_STEPS = 128
_AMX_CFG = tile_config_bytes()
# from this many rows of x the BF16 GEMMs, below it the few-rows kernel (5632x2048: 16 rows
# 3.0 against 3.6 ms, 24 rows 4.7 against 4.1)
GEMM_BF16_MIN_ROWS = GEMV_MAX_ROWS + 1


@njit(inline="always", cache=True)
def bf16_to_float32(h):
    # the float32 of bfloat16 bits h (uint16): the same bits in the upper half
    return bits_as_float32(int32(h) << 16)


@njit(inline="always", cache=True)
def f16_to_float32(h):
    # the float32 of float16 bits h (uint16), exact, without branches (so loops vectorise): the
    # exponent and mantissa moved into float32's places and scaled by 2^(127 - 15), which
    # rebiases normals and turns subnormals (exponent 0) into float32's own; inf and NaN keep
    # the top exponent
    b = int32(h)
    mag = (b & 0x7FFF) << 13
    f = bits_as_float32(mag) * float32(5.192296858534828e33)     # 2^112
    f = bits_as_float32(mag | 0x7F800000) if (b & 0x7C00) == 0x7C00 else f
    return -f if b & 0x8000 else f


@njit(inline="always", cache=True)
def to_float32(h, half):
    # the float32 of 16-bit float bits: float16 when half, else bfloat16
    return f16_to_float32(h) if half else bf16_to_float32(h)


def _make_dots16(n_rows, prefetch_bytes, half, locality=3, unroll=_UNROLL):
    @intrinsic
    def dots(typingctx, x, w, ldw, nv):
        """The dot products of n_rows rows of w (float16 when half, else bfloat16) with x
        (float32) over their first 16 nv elements, a tuple; each 16 weights widened exactly
        (widen16: F16C's conversion, or bfloat16's bits moved up 16). x, w are byte addresses
        (x contiguous; row i of w at w + 2 i ldw). With prefetch_bytes, each row's line that
        far ahead is prefetched (llvm_cpu.prefetch's locality) as the loop reaches a line, past
        the row's end the same line n_rows rows below (the next block of rows)."""
        sig = types.UniTuple(types.float32, n_rows)(x, w, ldw, nv)

        def codegen(context, builder, signature, args):
            x, w, ldw, nv = [context.cast(builder, v, t, types.int64)
                             for v, t in zip(args, signature.args)]
            vf, vh = ir.VectorType(_F32, _VEC), ir.VectorType(ir.IntType(16), _VEC)
            i16p = ir.PointerType(ir.IntType(16))
            xp = builder.inttoptr(x, ir.PointerType(_F32))
            rows = [builder.gep(builder.inttoptr(w, i16p), [builder.mul(ldw, ir.Constant(_I64, i))])
                    for i in range(n_rows)]
            vfma = fma(builder, vf)
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * _VEC))
                    for _ in range(unroll)] for _ in range(n_rows)]

            def step(c, u, pf):
                # elements c..c+15 of x and of each row into accumulator u
                xv = builder.load(builder.bitcast(builder.gep(xp, [c]), ir.PointerType(vf)),
                                  align=4)
                ahead = builder.add(c, ir.Constant(_I64, prefetch_bytes // 2))
                below = builder.add(ahead, builder.mul(ldw, ir.Constant(_I64, n_rows - 1)))
                ahead = builder.select(builder.icmp_signed(">=", ahead, ldw), below, ahead)
                for i in range(n_rows):
                    if pf and prefetch_bytes:
                        prefetch(builder, builder.ptrtoint(builder.gep(rows[i], [ahead]), _I64), 0,
                                 locality)
                    wv = builder.load(builder.bitcast(builder.gep(rows[i], [c]),
                                                      ir.PointerType(vh)), align=2)
                    builder.store(builder.call(vfma, [widen16(builder, wv, half), xv,
                                                      builder.load(acc[i][u])]), acc[i][u])

            n_main = builder.udiv(nv, ir.Constant(_I64, unroll))
            with cgutils.for_range(builder, n_main) as loop:
                base = builder.mul(loop.index, ir.Constant(_I64, unroll * _VEC))
                for u in range(unroll):   # one prefetch per 64-byte line (32 elements)
                    step(builder.add(base, ir.Constant(_I64, u * _VEC)), u, u % 2 == 0)
            done = builder.mul(n_main, ir.Constant(_I64, unroll))
            with cgutils.for_range(builder, builder.sub(nv, done)) as loop:
                step(builder.mul(builder.add(done, loop.index), ir.Constant(_I64, _VEC)), 0, True)
            return context.make_tuple(builder, signature.return_type, row_sums(builder, acc))
        return sig, codegen
    return dots


_dots4_f16 = _make_dots16(4, PREFETCH_BYTES, True)    # few rows: 4 rows of w a pass over x
# decode: one row, one read stream. bfloat16 this way too, not as _dot1 of _make_dots_bf16
# (TinyLlama's GEMVs back to back on 2 Zen 5 cores, alternated: 57-61 against 45-46 GB/s)
_dot1_f16 = _make_dots16(1, STREAM_PREFETCH_BYTES, True, STREAM_LOCALITY)
_dot1_bf16 = _make_dots16(1, STREAM_PREFETCH_BYTES, False, STREAM_LOCALITY, _STREAM_UNROLL_BF16)


def _make_dots_bf16(rows, unroll, prefetch_bytes=0):
    @intrinsic
    def dots(typingctx, xr, w, ldw, nc):
        """The dot products of `rows` rows of w (bfloat16) with x over their first 32 nc
        elements, a tuple. 64 bytes of a row are 16 words, each a pair (w[2i] low, w[2i+1]
        high): the word shifted up 16 is w[2i] as a float32, the word with its low half
        cleared is w[2i+1], two instructions for 32 weights; x comes rearranged to match, xr =
        for each 32 elements the 16 even ones then the 16 odd ones (float32). Byte addresses:
        xr, w (row i at w + 2 i ldw). `unroll` chunks a row per loop step. With prefetch_bytes,
        each row's line that far ahead is prefetched, past a row's end the next block's."""
        sig = types.UniTuple(types.float32, rows)(xr, w, ldw, nc)

        def codegen(context, builder, signature, args):
            xr, w, ldw, nc = [context.cast(builder, v, t, types.int64)
                              for v, t in zip(args, signature.args)]
            vi, vf = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
            sixteen = ir.Constant(vi, [16] * 16)
            high = ir.Constant(vi, [-65536] * 16)                   # 0xFFFF0000
            vfma = fma(builder, vf)
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16))
                    for _ in range(2 * unroll)] for _ in range(rows)]
            rowb = builder.mul(ldw, ir.Constant(_I64, 2))           # bytes per row

            def load(addr, t):
                return builder.load(builder.inttoptr(addr, ir.PointerType(t)), align=4)

            def step(c, u):
                # chunk c (32 elements) of x and of each row into accumulators 2u, 2u + 1
                xa = builder.add(xr, builder.mul(c, ir.Constant(_I64, 128)))
                xe, xo = load(xa, vf), load(builder.add(xa, ir.Constant(_I64, 64)), vf)
                off = builder.mul(c, ir.Constant(_I64, 64))
                if prefetch_bytes:
                    ahead = builder.add(off, ir.Constant(_I64, prefetch_bytes))
                    ahead = builder.select(builder.icmp_signed(">=", ahead, rowb), builder.add(
                        ahead, builder.mul(rowb, ir.Constant(_I64, rows - 1))), ahead)
                for i in range(rows):
                    row = builder.add(w, builder.mul(rowb, ir.Constant(_I64, i)))
                    if prefetch_bytes:
                        prefetch(builder, builder.add(row, ahead), 0)
                    wv = load(builder.add(row, off), vi)
                    even = builder.bitcast(builder.shl(wv, sixteen), vf)
                    odd = builder.bitcast(builder.and_(wv, high), vf)
                    for a, (wf, xv) in zip(acc[i][2 * u:2 * u + 2], ((even, xe), (odd, xo))):
                        builder.store(builder.call(vfma, [wf, xv, builder.load(a)]), a)

            n_main = builder.udiv(nc, ir.Constant(_I64, unroll))
            with cgutils.for_range(builder, n_main) as loop:
                base = builder.mul(loop.index, ir.Constant(_I64, unroll))
                for u in range(unroll):
                    step(builder.add(base, ir.Constant(_I64, u)), u)
            done = builder.mul(n_main, ir.Constant(_I64, unroll))
            with cgutils.for_range(builder, builder.sub(nc, done)) as loop:
                step(builder.add(done, loop.index), 0)
            return context.make_tuple(builder, signature.return_type, row_sums(builder, acc))
        return sig, codegen
    return dots


# few rows: 4 rows of w a pass over x, the hardware's prefetch alone (12288x4096 on 2 Zen 4
# cores: 2.70-2.76 ms, 3.07-3.21 with _dots4_f16's software prefetch, alternated runs)
_dots4_bf16 = _make_dots_bf16(4, _UNROLL_BF16)
# the same with each row's line PREFETCH_BYTES ahead prefetched: where one read stream is not
# the fastest (ONE_STREAM_DECODE false) the hardware's streams stop at each 4 KB page, one
# row of 2048 here (Xeon, 2 cores, caches flushed: 4 rows 26-30 GB/s without, 33-38 with)
_dots4_bf16_pf = _make_dots_bf16(4, _UNROLL_BF16, PREFETCH_BYTES)


@njit(inline="always", fastmath=True, cache=True)
def _tail_rows(out, x, w, r0, half):
    # rows r0..n-1 of w (fewer than GEMV_ROWS) against every row of x: out (m, n)
    for r in range(r0, w.shape[0]):
        for i in range(x.shape[0]):
            acc = float32(0)
            for j in range(w.shape[1]):
                acc += to_float32(w[r, j], half) * x[i, j]
            out[i, r] = acc


@njit(fastmath=True, cache=True)
def _gemv(part, parts, out, x, w, half):
    # decode: x (1, k) float32; w: (n, k) 16-bit float bits, float16 when half; out: (1, n).
    # One row of w per step: one read stream a thread. In parts (cpu_pool): rows of w
    n, k = w.shape
    k0 = k - k % _VEC
    o = out[0]
    xa, wa = x.ctypes.data, w.ctypes.data
    r_start, r_stop = cpu_pool.share(n, part, parts)
    for r in range(r_start, r_stop):
        if half:
            s, = _dot1_f16(xa, wa + 2 * r * k, k, k0 // _VEC)
        else:
            s, = _dot1_bf16(xa, wa + 2 * r * k, k, k0 // _VEC)
        o[r] = s
    if k0 < k:      # the last k % 16 columns: a pass of their own, the row loop kept tight
        for r in range(r_start, r_stop):
            s = o[r]
            for j in range(k0, k):
                s += to_float32(w[r, j], half) * x[0, j]
            o[r] = s


@njit(fastmath=True, cache=True)
def _gemv_rows(part, parts, out, x, xr, w, half, pf):
    # x: (m, k) float32; w: (n, k) 16-bit float bits (uint16), float16 when half; out: (m, n);
    # bfloat16: xr (m, k - k % 32) = x's rows rearranged for _dots4_bf16 (even_odd), w's
    # lines prefetched when pf. Each block of 4 rows of w (in cache after the first row of x)
    # meets every row of x, the first k0 columns in the dots4 intrinsics, the rest here; one
    # row is decode's GEMV. In parts (cpu_pool): blocks of rows of w
    n, k = w.shape
    m = x.shape[0]
    step = _VEC if half else 32
    nv = k // step
    k0 = nv * step
    xa, xra, wa = x.ctypes.data, xr.ctypes.data, w.ctypes.data
    blk_start, blk_stop = cpu_pool.share((n + GEMV_ROWS - 1) // GEMV_ROWS, part, parts)
    for blk in range(blk_start, blk_stop):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            for i in range(m):
                if half:
                    s0, s1, s2, s3 = _dots4_f16(xa + 4 * i * k, wa + 2 * r0 * k, k, nv)
                elif pf:
                    s0, s1, s2, s3 = _dots4_bf16_pf(xra + 4 * i * k0, wa + 2 * r0 * k, k, nv)
                else:
                    s0, s1, s2, s3 = _dots4_bf16(xra + 4 * i * k0, wa + 2 * r0 * k, k, nv)
                for j in range(k0, k):
                    xj = x[i, j]
                    s0 += to_float32(w[r0, j], half) * xj
                    s1 += to_float32(w[r0 + 1, j], half) * xj
                    s2 += to_float32(w[r0 + 2, j], half) * xj
                    s3 += to_float32(w[r0 + 3, j], half) * xj
                out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3] = s0, s1, s2, s3
        else:
            _tail_rows(out, x, w, r0, half)


def even_odd(x):
    """x (m, k) float32 -> (m, k - k % 32): per 32 elements, the 16 at even offsets, then the
    16 at odd ones (the order _dots4_bf16 meets a row's bfloat16 pairs in)."""
    m, k = x.shape
    k0 = k - k % 32
    return np.ascontiguousarray(
        x[:, :k0].reshape(m, k0 // 32, 16, 2).transpose(0, 1, 3, 2)).reshape(m, k0)


@njit(fastmath=True, cache=True)
def _gemv_rows_portable(part, parts, out, x, w, half):
    # as _gemv_rows in plain loops
    n, k = w.shape
    m = x.shape[0]
    blk_start, blk_stop = cpu_pool.share((n + GEMV_ROWS - 1) // GEMV_ROWS, part, parts)
    for blk in range(blk_start, blk_stop):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            w0, w1, w2, w3 = w[r0], w[r0 + 1], w[r0 + 2], w[r0 + 3]
            for i in range(m):
                xi = x[i]
                s0 = float32(0)
                s1 = float32(0)
                s2 = float32(0)
                s3 = float32(0)
                for j in range(k):
                    u = uint64(j)    # unsigned: no negative-index wrap, so the loop vectorises
                    xj = xi[u]
                    s0 += to_float32(w0[u], half) * xj
                    s1 += to_float32(w1[u], half) * xj
                    s2 += to_float32(w2[u], half) * xj
                    s3 += to_float32(w3[u], half) * xj
                out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3] = s0, s1, s2, s3
        else:
            _tail_rows(out, x, w, r0, half)


@njit(cache=True)
def widen_rows(out, w, r0, half):
    # out: (rows, k) float32 = rows r0.. of w (16-bit float bits, float16 when half) widened.
    # On the calling thread (see linear_q8_cpu._gemm)
    rows, k = out.shape
    for r in range(rows):
        for j in range(k):
            u = uint64(j)      # unsigned: no negative-index wrap, so the loop vectorises
            out[r, u] = to_float32(w[r0 + r, u], half)


def _gemm_widened(out, x, w, half):
    # x: (m, k) float32; w: (n, k) bits; out: (m, n). Tiles of w widened to float32, then sgemm
    n, k = w.shape
    step = max(GEMV_ROWS, min(n, TILE_BYTES // (4 * k)))
    tile = np.empty((step, k), np.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        t = tile[:r1 - r0]
        widen_rows(t, w, r0, half)
        np.matmul(x, t.T, out=out[:, r0:r1])


@njit(inline="always", cache=True)
def round_bf16(f):
    # float32 -> bfloat16 bits (uint32 < 2^16), rounded to nearest, ties to even
    b = np.uint32(float32_bits(f))
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(parallel=PRANGE, cache=True)
def pack_x_bf16(ap, x):
    # x: (m, k) float32 -> ap: (ceil(m / MR), ceil(k / 2), MR) uint32: for each block of MR rows
    # and each pair p of the input axis, the rows' bfloat16 pairs (x[i, 2p] low, x[i, 2p+1]
    # high); rows and columns past x are zeros
    m, k = x.shape
    mb, kp, mr = ap.shape
    for ib in prange(mb):
        for p in range(kp):
            for i in range(mr):
                r = ib * mr + i
                lo = np.uint32(0)
                hi = np.uint32(0)
                if r < m:
                    lo = round_bf16(x[r, 2 * p])
                    if 2 * p + 1 < k:
                        hi = round_bf16(x[r, 2 * p + 1])
                ap[ib, p, i] = lo | (hi << np.uint32(16))


@intrinsic
def _tile_bf16(typingctx, c, ldc, a, b, kc, accumulate):
    """C (+)= A B^T for one MR x NR tile over kc pairs of the input axis, with vdpbf16ps. Byte
    addresses: c the tile's first float32 (row i at c + 4 i ldc), added to when accumulate,
    else written; a the (kc, MR) bfloat16 pairs of x's rows (pack_x_bf16); b the (kc, NR)
    pairs of w's rows. Each step broadcasts a row's pair against NR / 16 vectors of w's."""
    sig = types.void(c, ldc, a, b, kc, accumulate)

    def codegen(context, builder, signature, args):
        c, ldc, a, b, kc = [context.cast(builder, v, t, types.int64)
                            for v, t in zip(args[:5], signature.args[:5])]
        accumulate = context.cast(builder, args[5], signature.args[5], types.boolean)
        vi, vf = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
        nv = NR // 16
        dot = dpbf16ps(builder)
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16))
                for _ in range(nv)] for _ in range(MR)]
        ip = ir.PointerType(_I32)
        with cgutils.for_range(builder, kc) as loop:
            p = loop.index
            bp = builder.add(b, builder.mul(p, ir.Constant(_I64, 4 * NR)))
            bv = [builder.load(builder.inttoptr(builder.add(bp, ir.Constant(_I64, 64 * v)),
                                                ir.PointerType(vi)), align=4)
                  for v in range(nv)]
            ap = builder.add(a, builder.mul(p, ir.Constant(_I64, 4 * MR)))
            for i in range(MR):
                ai = builder.load(builder.inttoptr(builder.add(ap, ir.Constant(_I64, 4 * i)), ip),
                                  align=4)
                splat = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(vi, None), ai, ir.Constant(_I32, 0)),
                    ir.Constant(vi, None), ir.Constant(vi, [0] * 16))
                for v in range(nv):
                    builder.store(builder.call(dot, [builder.load(acc[i][v]), splat, bv[v]]),
                                  acc[i][v])
        for i in range(MR):
            row = builder.add(c, builder.mul(ldc, ir.Constant(_I64, 4 * i)))
            for v in range(nv):
                ptr = builder.inttoptr(builder.add(row, ir.Constant(_I64, 64 * v)),
                                       ir.PointerType(vf))
                val = builder.load(acc[i][v])
                with builder.if_then(accumulate):
                    builder.store(builder.fadd(builder.load(ptr, align=4), val), ptr, align=4)
                with builder.if_then(builder.not_(accumulate)):
                    builder.store(val, ptr, align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", cache=True)
def _pack_panel(bp, w2, j0, p0):
    # bp: (kc, NR) uint32 = pair p0 + p of row j0 + c of w2 at [p, c]; rows past w2 zeros.
    # Eight rows at a time: eight read streams, each line read serving 16 pairs
    kc = bp.shape[0]
    nr = min(NR, w2.shape[0] - j0)
    for c0 in range(0, NR, 8):
        if c0 + 8 <= nr:
            for p in range(kc):
                for c in range(8):
                    bp[p, c0 + c] = w2[j0 + c0 + c, p0 + p]
        else:
            for p in range(kc):
                for c in range(8):
                    bp[p, c0 + c] = w2[j0 + c0 + c, p0 + p] if c0 + c < nr else np.uint32(0)


@njit(parallel=PRANGE, cache=True)
def _gemm_bf16(out, ap, w2, kc_pairs):
    # out: (m, n) float32; ap: x packed by pack_x_bf16; w2: (n, kp) uint32, w's bfloat16 bits
    # two a word. For each slice of kc_pairs (KC_PAIRS) pairs of the input axis, a parallel
    # loop over panels of NR rows of w: the panel packed (kc, NR) in L1, then every MR block of
    # x's rows against it, the tile written (first slice) or added into out; tiles cut off by
    # out's edges go through a scratch tile
    m, n = out.shape
    mb, kp, _ = ap.shape
    ap_a, out_a, ldc = ap.ctypes.data, out.ctypes.data, out.strides[0] // 4
    for p0 in range(0, kp, kc_pairs):
        kc = min(kc_pairs, kp - p0)
        first = p0 == 0
        for jb in prange((n + NR - 1) // NR):
            j0 = jb * NR
            nr = min(NR, n - j0)
            bp = np.empty((kc, NR), np.uint32)
            _pack_panel(bp, w2, j0, p0)
            tile = np.empty((MR, NR), np.float32)
            for ib in range(mb):
                i0 = ib * MR
                a_blk = ap_a + 4 * (ib * kp + p0) * MR
                if i0 + MR <= m and nr == NR:
                    _tile_bf16(out_a + 4 * (i0 * ldc + j0), ldc, a_blk, bp.ctypes.data, kc,
                               not first)
                else:
                    _tile_bf16(tile.ctypes.data, NR, a_blk, bp.ctypes.data, kc, False)
                    for i in range(min(MR, m - i0)):
                        for c in range(nr):
                            if first:
                                out[i0 + i, j0 + c] = tile[i, c]
                            else:
                                out[i0 + i, j0 + c] += tile[i, c]


def packed_x_bf16(x):
    """x (m, k) float32 rounded to bfloat16 and packed for gemm_bf16's micro-kernel."""
    m, k = x.shape
    ap = np.empty(((m + MR - 1) // MR, (k + 1) // 2, MR), np.uint32)
    pack_x_bf16(ap, x)
    return ap


def gemm_bf16(out, x, w, ap=None):
    # x: (m, k) float32; w: (n, k) bfloat16 bits (uint16); out: (m, n), C-contiguous rows
    # (any row stride); ap: x already packed (packed_x_bf16), or None. x rounded to bfloat16
    # once, then the blocked vdpbf16ps GEMM (products of bfloat16s exact in float32, sums float32)
    k = x.shape[1]
    if k % 2:   # pairs along the input axis: an odd length gets a zero column
        w = np.concatenate([w, np.zeros((w.shape[0], 1), np.uint16)], axis=1)
    _gemm_bf16(out, packed_x_bf16(x) if ap is None else ap, w.view(np.uint32), KC_PAIRS)


@intrinsic
def _amx_tiles(typingctx, acc, a, b, ldb, ksteps, o, ldo):
    """The four accumulator tiles (C00 C01 C10 C11: rows of w by rows of x) = A B over ksteps
    steps of 32 along the input axis, stored at acc (1 KB each): A0, A1 the 16-row halves of
    w's 32 rows, packed (a step: 2 KB at a, A1 1 KB in), B0, B1 the packed pairs of x's two
    16-row blocks at b and b + ldb (a step: 16 pairs x 64 bytes). Each step prefetches B's
    tiles AMX_PREFETCH steps ahead into L1 (x's block comes from L2 or L3; w's 32 rows, used by
    every block of x, stay in L2), and step i < 32 the two lines of row i of the output block
    at o (rows ldo bytes apart) for writing. Tiles: 0-3 C, 4-5 A, 6-7 B."""
    sig = types.void(acc, a, b, ldb, ksteps, o, ldo)

    def codegen(context, builder, signature, args):
        acc, a, b, ldb, ks, o, ldo = [context.cast(builder, v, t, types.int64)
                                      for v, t in zip(args, signature.args)]

        def c(v):
            return ir.Constant(_I64, v)
        for t in range(4):
            tile_zero(builder, t)
        with cgutils.for_range(builder, ks) as loop:
            ak = builder.add(a, builder.mul(loop.index, c(2048)))
            bk = builder.add(b, builder.mul(loop.index, c(1024)))
            # both B tiles first, then A0's two products, A1's load under them, A1's two
            # (one core, data in L1: 2.0 TFLOP/s; loading A0, B0, B1, A1 each just before its
            # first product: 0.96)
            tile_load(builder, 6, bk, c(64))
            tile_load(builder, 7, builder.add(bk, ldb), c(64))
            tile_load(builder, 4, ak, c(64))
            tile_dpbf16ps(builder, 0, 4, 6)
            tile_dpbf16ps(builder, 1, 4, 7)
            tile_load(builder, 5, builder.add(ak, c(1024)), c(64))
            tile_dpbf16ps(builder, 2, 5, 6)
            tile_dpbf16ps(builder, 3, 5, 7)
            ahead = builder.add(bk, c(1024 * AMX_PREFETCH))     # past the end: harmless
            for line in range(16):
                prefetch(builder, builder.add(ahead, c(64 * line)), 0)
                prefetch(builder, builder.add(builder.add(ahead, ldb), c(64 * line)), 0)
            # the output block's row i, for writing (its two lines), at step i < 32
            with builder.if_then(builder.icmp_signed("<", loop.index, c(32))):
                orow = builder.add(o, builder.mul(loop.index, ldo))
                prefetch(builder, orow, 1)
                prefetch(builder, builder.add(orow, c(64)), 1)
        for t in range(4):
            tile_store(builder, t, builder.add(acc, c(1024 * t)), c(64))
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", cache=True)
def _pack_rows_amx(ak, w, wq, wd, j0, r0, r1):
    # ak: (k / 32, 32, 32) uint16 = rows j0 .. j0 + 31 of the weights as bfloat16 (zeros past
    # their end), step s of 32 along the input axis at ak[s]: one 2 KB block, its 16-row halves
    # the A tiles; here its rows r0 .. r1 - 1. The weights: w (n, k) bfloat16 bits, or when w
    # is empty Q8_0 blocks, wq (n, k) int8 codes and wd (n, k / 32) float16 scale bits,
    # dequantized and rounded to bfloat16. Row by row, each row of w read front to back (the
    # hardware's prefetchers follow one stream; step-major order read 32 rows at once and
    # waited on memory); bfloat16 rows 64 bytes a vector load and store (element by element,
    # the copy took a quarter of the GEMM's time)
    nk = ak.shape[0]
    q8 = w.shape[0] == 0
    n = wq.shape[0] if q8 else w.shape[0]
    nr = min(32, n - j0)
    at = ak.ctypes.data
    for r in range(r0, r1):
        if r >= nr:
            for s in range(nk):
                for e in range(32):
                    ak[s, r, e] = 0
        elif q8:
            for s in range(nk):
                d = f16_to_float32(wd[j0 + r, s])
                for e in range(32):
                    ak[s, r, e] = round_bf16(float32(wq[j0 + r, 32 * s + e]) * d)
        else:
            copy_lines(at + 64 * r, w[j0 + r].ctypes.data, nk, 2048, 64)


@njit(parallel=PRANGE, cache=True)
def _gemm_amx(out, ap, w, wq, wd, cfg, threads):
    # out: (m, n) float32; ap: (mt, kp, 16) uint32, x packed by pack_x_bf16 (mt even, rows past
    # m zeros); the weights as _pack_rows_amx takes them, k a multiple of 32; cfg: the tile
    # configuration. Each of `threads` tasks takes a run of blocks of 32 rows of w, each block
    # packed (w's rows lie apart: 32 of them share a few L1 sets) and met by every 32-row
    # block of x along the whole input axis, the four output tiles staying in tile registers.
    # Up to AMX_PIPELINE_STEPS steps, the next block is packed a few rows after each block of
    # x, its copy from memory overlapping the tiles' products
    m, n = out.shape
    mt, kp, _ = ap.shape
    nk, nxb = 2 * kp // 32, mt // 2
    nblk = (n + 31) // 32
    pipelined = nk <= AMX_PIPELINE_STEPS
    o_p, ld = np.int64(out.ctypes.data), out.strides[0] // 4     # out's rows, ld floats apart
    unit = out.strides[1] == 4 and out.strides[0] % 4 == 0
    for t in prange(threads):
        b0, b1 = t * nblk // threads, (t + 1) * nblk // threads
        if b0 == b1:
            continue
        ak = np.empty((2, nk, 32, 32), np.uint16)   # this block's rows packed, the next's
        acc = np.empty((4, 16, 16), np.float32)     # acc[2 ti + tj, i, c]: w row 16 ti + i,
        tile_config(cfg.ctypes.data)                # x row 16 tj + c
        for jb in range(b0, b1):
            j0 = 32 * jb
            nr = min(32, n - j0)
            cur, nxt = ak[(jb - b0) % 2], ak[(jb - b0 + 1) % 2]
            if jb == b0 or not pipelined:
                _pack_rows_amx(cur, w, wq, wd, j0, 0, 32)
            for xb in range(nxb):
                _amx_tiles(acc.ctypes.data, cur.ctypes.data, ap.ctypes.data + 64 * 2 * xb * kp,
                           64 * kp, nk, o_p + 4 * (32 * xb * ld + j0), 4 * ld)
                if pipelined and jb + 1 < b1:       # the next block's share of rows
                    _pack_rows_amx(nxt, w, wq, wd, j0 + 32, 32 * xb // nxb,
                                   32 * (xb + 1) // nxb)
                if 32 * xb + 32 <= m and nr == 32 and unit:
                    for q in range(4):      # whole tiles: transposed in registers
                        store_transposed16(o_p + 4 * ((32 * xb + 16 * (q % 2)) * ld + j0 +
                                                      16 * (q // 2)), ld, acc[q].ctypes.data)
                    continue
                for tj in range(2):
                    for c in range(16):
                        r = 32 * xb + 16 * tj + c
                        if r < m:
                            for ti in range(2):
                                for i in range(min(16, nr - 16 * ti)):
                                    out[r, j0 + 16 * ti + i] = acc[2 * ti + tj, i, c]
        tile_release()


_NO_Q8 = (np.zeros((0, 0), np.int8), np.zeros((0, 0), np.uint16))
_NO_BF16 = np.zeros((0, 0), np.uint16)


def gemm_amx(out, x, w=None, q8=None):
    # x: (m, k) float32, k a multiple of 32; out: (m, n); the weights w: (n, k) bfloat16 bits
    # (uint16), or q8 = (codes (n, k) int8, scales (n, k / 32) float16 bits). x rounded to
    # bfloat16 and packed once, then the AMX tiles
    if not amx_path("amx-bf16"):      # also asks the kernel for the tile state, once
        raise RuntimeError("AMX-BF16 tiles are not available to this process")
    m, k = x.shape
    mt = (m + 15) // 16
    ap = np.empty((mt + mt % 2, k // 2, 16), np.uint32)
    pack_x_bf16(ap, x)
    wq, wd = _NO_Q8 if q8 is None else q8
    _gemm_amx(out, ap, _NO_BF16 if w is None else w, wq, wd, _AMX_CFG, get_num_threads())


def linear(out, x, w, bias):
    # x: (m, k) float32; w: (n, k) bfloat16 (ml_dtypes) or float16; bias: (n,) or (0,);
    # out: (m, n)
    m = x.shape[0]
    half = w.dtype == np.float16
    bits = w.view(np.uint16)
    if m <= GEMV_MAX_ROWS:
        _bind_gemv(bits, half, m)(out, x)
    elif not half and m >= GEMM_BF16_MIN_ROWS and x.shape[1] % 32 == 0 \
            and amx_path("amx-bf16"):
        gemm_amx(out, x, bits)
    elif not half and m >= GEMM_BF16_MIN_ROWS and fast_path("avx512bf16"):
        gemm_bf16(out, x, bits)
    else:
        _gemm_widened(out, x, bits, half)
    if bias.shape[0]:
        cpu_pool.run(_add_bias, out.size, out, bias)


def _decode_gemv(bits, half):
    # the one-row GEMV over w's bits as decode_gemv gives it
    if not (fast_path("f16c") if half else fast_path()):
        return _gemv_rows_portable, bits.size, (bits, half), 0, None
    if ONE_STREAM_DECODE:
        return _gemv, bits.size, (bits, half), DECODE_X_SKEW, None
    return _gemv_rows, bits.size, (bits, half, True), 0, "x" if half else "even_odd"


def _bind_gemv(bits, half, m):
    # gemv(out, x) for m rows of x (m <= GEMV_MAX_ROWS) over w's bits
    work = m * bits.size
    if not (fast_path("f16c") if half else fast_path()):
        return cpu_pool.bind_parts(_gemv_rows_portable, work, bits, half)
    if m == 1 and ONE_STREAM_DECODE:
        return cpu_pool.bind_gemv(*_decode_gemv(bits, half))
    rows = cpu_pool.bind_parts(_gemv_rows, work, bits, half, not ONE_STREAM_DECODE)
    return lambda out, x: rows(out, x, x if half else even_odd(x))


def bind_gemv(w):
    """gemv(out, x) = linear(out, x, w, no bias) for one row of x, its kernel and w's bits
    picked once (linear_cpu.bind_gemv)."""
    return _bind_gemv(w.view(np.uint16), w.dtype == np.float16, 1)


def decode_gemv(w):
    """The one-row GEMV over w as a compiled decode step calls it (linear_cpu.decode_gemv)."""
    return _decode_gemv(w.view(np.uint16), w.dtype == np.float16)


@njit(cache=True)
def even_odd_into(xr, x):
    # xr (1, k - k % 32) = even_odd(x) for x (1, k)
    for b in range(xr.shape[1] // 32):
        for i in range(16):
            xr[0, 32 * b + i] = x[0, 32 * b + 2 * i]
            xr[0, 32 * b + 16 + i] = x[0, 32 * b + 2 * i + 1]


def embedding(out, table, tokens):
    # out: (seq, hidden) float32; table: (vocab, hidden) bfloat16 or float16; tokens: (seq,)
    # int64, clipped to [0, vocab): the picked rows widened
    ids = np.clip(tokens, 0, table.shape[0] - 1)
    np.copyto(out, table[ids], casting="unsafe")
