"""y = x @ w.T + bias on the CPU for Q8_0 weights (formats.Q8Matrix: int8 codes qs (n, k) and a
float16 scale d per 32 weights, (n, k // 32)). Twin of linear_cpu.py, function for function, as
llama2.c's runq.c mirrors run.c.

Decode and a few rows (up to GEMV_MAX_ROWS) read w once, 34 bytes per 32 weights. x is
quantized the same way first (per 32 values: int8 codes and a float32 scale), so each block's
dot product is exact in int32 and a row's result is the sum over blocks of d_w d_x isum, as
llama.cpp's Q8_0 x Q8_0 dot product. Three paths:
  - AVX-512 VNNI (fast_path("avx512vnni")): vpdpbusd multiplies 64 unsigned bytes by 64 signed
    bytes and adds each 4 products into an int32 lane, so one instruction covers two blocks of
    a row. w's codes are made unsigned by flipping their top bit (w + 128), and the excess,
    128 sum(x codes) per block, is taken off by starting the int32 lanes at -16 sum (8 lanes a
    block); then each lane's int32 is scaled by its block's d_w d_x into a float accumulator.
  - AVX2 (CPUs without AVX-512, as AMD's Zen 3): the same loop, each 32 bytes multiplied by
    vpmaddubsw (|w| unsigned, x signed by w) and vpmaddwd into the same int32 lanes
    (_isums_avx2; 2.2-2.4x the portable loops on a Zen 3).
  - portable: plain loops, x's codes as float32: a block's 32 products and their sum are
    integers below 2^24, exact in float32 in any order, so LLVM vectorises them freely.
Both give the same block sums; only the order of the scaled float32 additions differs. Decode
reads w one row at a time on AMD Zen, two rows a pass elsewhere; a few rows of x, four.
(2 cores, 12288x4096 with the caches flushed: VNNI 1.1 ms = 4.5x our float32 GEMV, 48 GB/s,
one row of w at a time; portable 2.5-3.3 ms.)

Prefill (more rows) is compute-bound. With AMX-BF16 tiles, each block of 32 rows of w is
dequantized and rounded to bfloat16 (2^-9 relative, below the codes' own rounding of up to
d / 2) and goes through linear_bf16_cpu's AMX GEMM with x rounded to bfloat16, at about 3x
the float32 sgemm; with AVX-512 BF16 (AMD Zen 4 and 5) tiles of w are dequantized and rounded
to bfloat16 the same way and multiplied by linear_bf16_cpu's vdpbf16ps GEMM (TinyLlama's
prefill-512 on 2 Zen 5 cores 2.7-3.1x our float32's); elsewhere tiles of w are dequantized into
a float32 buffer that stays in cache and multiplied by NumPy's BLAS sgemm (512x5632x2048:
0.95-0.97x sgemm on the float32 weights)."""
import numpy as np
from llvmlite import ir
from numba import float32, float64, int32, njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import cpu_pool
from .linear_bf16_cpu import NR, f16_to_float32, gemm_amx, gemm_bf16, packed_x_bf16, round_bf16
from .linear_cpu import GEMV_MAX_ROWS, GEMV_ROWS, PREFETCH_BYTES, STREAM_LOCALITY, \
    STREAM_PREFETCH_BYTES, _add_bias
from .llvm_cpu import F32 as _F32, HOST_CPU, I8 as _I8, I32 as _I32, I64 as _I64, \
    ONE_STREAM_DECODE, amx_path, fast_path, fma, hsum, prefetch, vpdpbusd
from ..formats import Q8_BLOCK
from .scalar import FASTMATH_INF
from .cpu_pool import PRANGE

# prefill: rows of w dequantized per BLAS call (their float32 tile about TILE_BYTES, in L3)
TILE_BYTES = 1 << 23
_UNROLL = 2   # block pairs per loop step in VNNI's 4-row dots (2 accumulators a row; best of
#               1, 2, 4 by best times on a busy machine)
# ... and in VNNI's one-row decode dots: one on Zen 4 (TinyLlama's GEMVs back to back on 2
# cores, 15 rounds in turn: 33.7 GB/s against 30.3 with 4; 12288x4096 alike, +8%); 4 elsewhere
# (Zen 5 measured with 4 only)
_STREAM_UNROLL = 1 if HOST_CPU == "znver4" else 4


@intrinsic
def _absmax32(typingctx, addr):
    """max |x| over the 32 float32 at byte address addr: the largest of their bits with the
    sign cleared (non-negative floats order as their bits do, and any NaN lies above infinity,
    so a NaN stays), one vector reduction."""
    sig = types.float32(addr)

    def codegen(context, builder, signature, args):
        a = context.cast(builder, args[0], signature.args[0], types.int64)
        vt = ir.VectorType(_I32, 32)
        v = builder.load(builder.inttoptr(a, ir.PointerType(vt)), align=4)
        v = builder.and_(v, ir.Constant(vt, [0x7FFFFFFF] * 32))
        smax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [vt]),
                                              "llvm.vector.reduce.smax.v32i32")
        return builder.bitcast(builder.call(smax, [v]), ir.FloatType())
    return sig, codegen


@njit(cache=True)
def _quantize_x(xq, xc, xd, x):
    # x: (m, k) float32, rows contiguous -> per block of 32, by the Q8_0 rule: codes xq (m, k)
    # (int8, or float32 for the portable path) and float32 scales xd (m, k // 32); xc (m, k //
    # 32) int32 = -16 * (sum of the block's codes), the VNNI path's starting lanes (8 lanes a
    # block take off 128 * sum). A block's max |x| is one vector reduction (_absmax32; a NaN
    # stays: its block's scale is NaN, so is y) and its codes' loop vectorises (no branch).
    # Exact under the fastmath of the GEMVs that call it (numba compiles it with their flags)
    m, k = x.shape
    if k > 1 and x.strides[1] != 4:
        raise ValueError("x's rows must be contiguous")
    for i in range(m):
        xi, qi = x[i], xq[i]
        for b in range(k // 32):
            j0 = b * 32
            # d = amax / 127 rounded once to float32: a float64 quotient (even as a product by
            # 1 / 127, which the GEMVs' fastmath allows) is far closer than float32's half-ulp
            d = float32(float64(_absmax32(xi.ctypes.data + 4 * j0)) / float64(127))
            inv = float32(1) / d if d != 0 else float32(0)
            s = int32(0)
            for j in range(32):
                u = uint64(j0) + uint64(j)  # unsigned: no negative-index wrap
                v = xi[u] * inv
                t = np.trunc(v)             # roundf: halves away from zero; |v| - |t| = |v - t|,
                # exact, and not fused with the product into one rounding
                t += np.copysign(float32(1), v) * float32(abs(v) - abs(t) >= float32(0.5))
                q = int32(t)
                qi[u] = q
                s += q
            xd[i, b] = d
            xc[i, b] = -16 * s


@njit(inline="always", cache=True)
def _codes(x, xq):
    # x quantized (_quantize_x) into xq, its block sums and scales allocated here: (xc, xd). The
    # GEMVs quantize x themselves, on the calling thread before their parallel loop: one call
    # from Python a GEMV, no scratch to pass (TinyLlama's decode makes 111 a token). Their
    # fastmath keeps NaN and inf (FASTMATH_INF): a NaN in x must reach y
    m, k = x.shape
    xc = np.empty((m, k // Q8_BLOCK), np.int32)
    xd = np.empty((m, k // Q8_BLOCK), np.float32)
    _quantize_x(xq, xc, xd, x)
    return xc, xd


def _isums_avx2(builder, xv, wv):
    """AVX2: the int32 sums of 4 products of x's and w's signed bytes (<64 x i8> each: a block
    pair) per lane, <16 x i32>. Per 32 bytes, as llama.cpp's AVX2 path: vpmaddubsw of |w|
    (unsigned; 128 for a code of -128) with x signed by w (vpsignb; x's codes lie in [-127,
    127]) adds product pairs into int16 lanes (at most 2 * 128 * 127, no saturation), and
    vpmaddwd by ones adds those pairs into int32."""
    v32, v16, v8 = ir.VectorType(_I8, 32), ir.VectorType(ir.IntType(16), 16), \
        ir.VectorType(_I32, 8)
    mod = builder.module
    absb = cgutils.get_or_insert_function(mod, ir.FunctionType(v32, [v32, ir.IntType(1)]),
                                          "llvm.abs.v32i8")
    sign = cgutils.get_or_insert_function(mod, ir.FunctionType(v32, [v32, v32]),
                                          "llvm.x86.avx2.psign.b")
    maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(v16, [v32, v32]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(mod, ir.FunctionType(v8, [v16, v16]),
                                            "llvm.x86.avx2.pmadd.wd")
    ones = ir.Constant(v16, [1] * 16)
    sums = []
    for h in (0, 1):
        half = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32)))
        xh, wh = (builder.shuffle_vector(v, v, half) for v in (xv, wv))
        pairs = builder.call(maddubs, [builder.call(absb, [wh, ir.Constant(ir.IntType(1), 0)]),
                                       builder.call(sign, [xh, wh])])
        sums.append(builder.call(maddwd, [pairs, ones]))
    return builder.shuffle_vector(sums[0], sums[1], ir.Constant(ir.VectorType(_I32, 16),
                                                                  list(range(16))))


def _make_block_dots(isa, rows, unroll, prefetch_bytes, locality=3):
    @intrinsic
    def dots(typingctx, xq, xc, xd, wq, wd, k, nb2):
        """The dot products of `rows` rows of w with one row of x over their first 2 nb2 blocks,
        a tuple; isa "vnni" (vpdpbusd, AVX-512) or "avx2" (_isums_avx2). Byte addresses: xq
        the row's int8 codes, xc its int32 starting lanes (VNNI's) and xd its float32 scales
        (one per block); wq row r0's codes (row i at wq + i k), wd row r0's float16 scales
        (row i at wd + i k / 16). `unroll` block pairs per loop step. With prefetch_bytes, each
        row's line that far ahead is prefetched (llvm_cpu.prefetch's locality), past the row's
        end the same line `rows` rows below (the next block of rows)."""
        sig = types.UniTuple(types.float32, rows)(xq, xc, xd, wq, wd, k, nb2)

        def codegen(context, builder, signature, args):
            xq, xc, xd, wq, wd, k, nb2 = [context.cast(builder, v, t, types.int64)
                                          for v, t in zip(args, signature.args)]
            vi, vf, vb = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16), ir.VectorType(_I8, 64)
            v2i, v2f = ir.VectorType(_I32, 2), ir.VectorType(_F32, 2)
            v2h = ir.VectorType(ir.HalfType(), 2)
            flip = ir.Constant(vi, [0x80808080 - (1 << 32)] * 16)              # each byte's top bit
            vfma = fma(builder, vf)
            dot = vpdpbusd(builder) if isa == "vnni" else None
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16))
                    for _ in range(rows)]
                   for _ in range(unroll)]

            def load(addr, t, align):
                return builder.load(builder.inttoptr(addr, ir.PointerType(t)), align=align)

            nb = builder.udiv(k, ir.Constant(_I64, 32))

            def pair_lanes(v, j):
                # lanes 2j, 2j + 1 of v, each repeated over 8 lanes: block 0 | block 1 of pair j
                return builder.shuffle_vector(v, v, ir.Constant(
                    ir.VectorType(_I32, 16), [2 * j] * 8 + [2 * j + 1] * 8))

            def step(p, u, pf, group=None):
                # block pair p (64 bytes of each row) into accumulators u. group: the x starting
                # lanes and each row's scale products of the loop step's pairs, loaded once for
                # them; else this pair's alone
                off = builder.mul(p, ir.Constant(_I64, 64))          # byte offset in the rows
                xv = load(builder.add(xq, off), vi if dot else vb, 1)  # 2 blocks of x codes
                if group is None:
                    c = load(builder.add(xc, builder.mul(p, ir.Constant(_I64, 8))), v2i, 4)
                    dx = load(builder.add(xd, builder.mul(p, ir.Constant(_I64, 8))), v2f, 4)
                    j = 0
                else:
                    c, dx, j = group[0], group[1], u
                init = pair_lanes(c, j)                              # -16 sum per lane of a block
                ahead = builder.add(off, ir.Constant(_I64, prefetch_bytes))
                ahead = builder.select(builder.icmp_signed(">=", ahead, k),
                                       builder.add(ahead, builder.mul(k, ir.Constant(_I64, rows - 1))),
                                       ahead)
                for i in range(rows):
                    row = builder.add(wq, builder.mul(k, ir.Constant(_I64, i)))
                    if pf and prefetch_bytes:
                        prefetch(builder, builder.add(row, ahead), 0, locality)
                    if dot:                                                      # exact block sums
                        wv = builder.xor(load(builder.add(row, off), vi, 1), flip)  # codes + 128
                        isum = builder.call(dot, [init, wv, xv])
                    else:
                        isum = _isums_avx2(builder, xv, load(builder.add(row, off), vb, 1))
                    if group is None:
                        # this row's two float16 scales, times x's
                        dw = builder.add(wd, builder.add(
                            builder.mul(nb, ir.Constant(_I64, 2 * i)),
                            builder.mul(p, ir.Constant(_I64, 4))))
                        s = builder.fmul(builder.fpext(load(dw, v2h, 2), v2f), dx)
                    else:
                        s = group[2][i]
                    scale = pair_lanes(s, j)                     # one per lane of its block
                    builder.store(builder.call(vfma, [builder.sitofp(isum, vf), scale,
                                                      builder.load(acc[u][i])]), acc[u][i])

            # the loop step's 2 unroll blocks: x's starting lanes and scales, and each row's
            # float16 scales times x's, loaded and converted once for its `unroll` pairs
            vgi, vgf = ir.VectorType(_I32, 2 * unroll), ir.VectorType(_F32, 2 * unroll)
            vgh = ir.VectorType(ir.HalfType(), 2 * unroll)
            n_main = builder.udiv(nb2, ir.Constant(_I64, unroll))
            with cgutils.for_range(builder, n_main) as loop:
                base = builder.mul(loop.index, ir.Constant(_I64, unroll))
                b8 = builder.mul(base, ir.Constant(_I64, 8))        # bytes to block 2 base, 4 B
                c = load(builder.add(xc, b8), vgi, 4)
                dx = load(builder.add(xd, b8), vgf, 4)
                prods = []
                for i in range(rows):
                    dw = builder.add(wd, builder.add(builder.mul(nb, ir.Constant(_I64, 2 * i)),
                                                     builder.mul(base, ir.Constant(_I64, 4))))
                    prods.append(builder.fmul(builder.fpext(load(dw, vgh, 2), vgf), dx))
                for u in range(unroll):
                    step(builder.add(base, ir.Constant(_I64, u)), u, True, (c, dx, prods))
            done = builder.mul(n_main, ir.Constant(_I64, unroll))
            with cgutils.for_range(builder, builder.sub(nb2, done)) as loop:
                step(builder.add(done, loop.index), 0, True)
            for u in range(1, unroll):
                for i in range(rows):
                    builder.store(builder.fadd(builder.load(acc[0][i]), builder.load(acc[u][i])),
                                  acc[0][i])
            sums = [hsum(builder, builder.load(a)) for a in acc[0]]
            return context.make_tuple(builder, signature.return_type, sums)
        return sig, codegen
    return dots


# the GEMVs' kernel families, as the drivers take them: an empty array whose dtype names the
# instruction set (a dtype itself as an argument costs numba's dispatch a few us a call)
FAMILIES = {"vnni": np.empty(0, np.uint8), "avx2": np.empty(0, np.int8)}
# (rows a pass, block pairs a loop step, prefetch distance, locality) of decode (one row, one
# read stream; two rows a pass on a Xeon) and a few rows (4 rows); AVX2 has 16 vector
# registers, so fewer block pairs a step
_SHAPES = {"vnni": ((1, _STREAM_UNROLL, STREAM_PREFETCH_BYTES, STREAM_LOCALITY),
                    (2, _UNROLL, PREFETCH_BYTES, 3), (4, _UNROLL, PREFETCH_BYTES, 3)),
           "avx2": ((1, 2, STREAM_PREFETCH_BYTES, STREAM_LOCALITY), (2, 1, PREFETCH_BYTES, 3),
                    (4, 1, PREFETCH_BYTES, 3))}
_BLOCK_DOTS = {(isa, shape[0]): _make_block_dots(isa, *shape)
               for isa, shapes in _SHAPES.items() for shape in shapes}


def _dots_of(rows):
    """dots(family, xq, xc, xd, wq, wd, k, nb2): the family's `rows`-row kernel
    (_make_block_dots), picked while numba types the caller: only that one compiles."""
    def dots(family, xq, xc, xd, wq, wd, k, nb2):
        raise NotImplementedError("called from numba-compiled code only")

    @overload(dots, inline="always")
    def _impl(family, xq, xc, xd, wq, wd, k, nb2):
        kernel = _BLOCK_DOTS["vnni" if family.dtype == types.uint8 else "avx2", rows]

        def call(family, xq, xc, xd, wq, wd, k, nb2):
            return kernel(xq, xc, xd, wq, wd, k, nb2)
        return call
    return dots


_dot1, _dots2, _dots4 = (_dots_of(r) for r in (1, 2, 4))


@njit(inline="always", fastmath=True, cache=True)
def _block_dot(wq, wd, r, xq, xd, i, b):
    # block b of row r of w against block b of row i of x: d_w d_x isum. The products of codes
    # and their sums (|sum| <= 32 * 127^2 < 2^24) are exact in float32, in any order
    j0 = uint64(b * 32)
    s = float32(0)
    for j in range(32):
        u = j0 + uint64(j)     # unsigned: no negative-index wrap, so the 32 steps vectorise
        s += float32(wq[r, u]) * float32(xq[i, u])
    return s * (f16_to_float32(wd[r, b]) * xd[i, b])


@njit(inline="always", fastmath=True, cache=True)
def _dots4_portable(wq, wd, r0, xq, xd, i, nb):
    # rows r0..r0+3 of w against row i of x (codes as float32) over their first nb blocks.
    # Each block's 32 products summed in float32 are exact (integers below 2^24), the same
    # block sums as VNNI's int32
    w0, w1, w2, w3, x = wq[r0], wq[r0 + 1], wq[r0 + 2], wq[r0 + 3], xq[i]
    s0 = float32(0)
    s1 = float32(0)
    s2 = float32(0)
    s3 = float32(0)
    for b in range(nb):
        j0 = uint64(b * 32)
        t0 = float32(0)
        t1 = float32(0)
        t2 = float32(0)
        t3 = float32(0)
        for j in range(32):
            u = j0 + uint64(j)     # unsigned: no negative-index wrap, so the 32 steps vectorise
            xj = x[u]
            t0 += float32(w0[u]) * xj
            t1 += float32(w1[u]) * xj
            t2 += float32(w2[u]) * xj
            t3 += float32(w3[u]) * xj
        dx = xd[i, b]
        s0 += t0 * (f16_to_float32(wd[r0, b]) * dx)
        s1 += t1 * (f16_to_float32(wd[r0 + 1, b]) * dx)
        s2 += t2 * (f16_to_float32(wd[r0 + 2, b]) * dx)
        s3 += t3 * (f16_to_float32(wd[r0 + 3, b]) * dx)
    return s0, s1, s2, s3


@njit(inline="always", fastmath=True, cache=True)
def _odd_block(out, xq, xd, wq, wd, r_start, r_stop):
    # an odd block count: the last block of rows r_start..r_stop-1 of w against every row of x,
    # added to out after the pairs' sums. A pass of its own: inside the row loop, its inlined
    # loop cost the one-row decode GEMV 3.6-5.5% (12288x4096 q8_0 on 2 Zen 4 cores)
    nb = wd.shape[1]
    if nb % 2 == 0:
        return
    b = nb - 1
    for r in range(r_start, r_stop):
        for i in range(xq.shape[0]):
            out[i, r] += _block_dot(wq, wd, r, xq, xd, i, b)


@njit(inline="always", fastmath=True, cache=True)
def _tail_rows(out, xq, xd, wq, wd, r0):
    # rows r0..n-1 of w (fewer than GEMV_ROWS) against every row of x: out (m, n)
    for r in range(r0, wq.shape[0]):
        for i in range(xq.shape[0]):
            s = float32(0)
            for b in range(wd.shape[1]):
                s += _block_dot(wq, wd, r, xq, xd, i, b)
            out[i, r] = s


@njit(fastmath=FASTMATH_INF, cache=True)
def _gemv(part, parts, out, x, wq, wd, family):
    # decode on AMD Zen (ONE_STREAM_DECODE): as _gemv_rows for one row of x, w
    # read one row at a time (one read stream a thread: 4 rows interleaved held 2 Zen 4 cores to
    # ~40 GB/s where one stream reached 53-56, 12288x4096; on a Xeon 4 rows streamed faster)
    xq = np.empty(x.shape, np.int8)
    xc, xd = _codes(x, xq)
    n, k = wq.shape
    nb = xd.shape[1]
    nb2 = nb // 2
    xqa, xca, xda = xq.ctypes.data, xc.ctypes.data, xd.ctypes.data
    wqa, wda = wq.ctypes.data, wd.ctypes.data
    r_start, r_stop = cpu_pool.share(n, part, parts)
    for r in range(r_start, r_stop):
        s, = _dot1(family, xqa, xca, xda, wqa + r * k, wda + 2 * r * nb, k, nb2)
        out[0, r] = s
    _odd_block(out, xq, xd, wq, wd, r_start, r_stop)


@njit(fastmath=FASTMATH_INF, cache=True)
def _gemv_pairs(part, parts, out, x, wq, wd, family):
    # decode elsewhere: as _gemv_rows for one row of x, w read 2 rows at a time
    # (TinyLlama's 111 GEMVs of a token back to back on 2 Xeon cores: 29.3-30.5 GB/s against
    # 26.5-29.7 with 4 rows, 25.7-27.8 with 8, 23-26 one row at a time)
    xq = np.empty(x.shape, np.int8)
    xc, xd = _codes(x, xq)
    n, k = wq.shape
    nb = xd.shape[1]
    nb2 = nb // 2
    xqa, xca, xda = xq.ctypes.data, xc.ctypes.data, xd.ctypes.data
    wqa, wda = wq.ctypes.data, wd.ctypes.data
    p_start, p_stop = cpu_pool.share((n + 1) // 2, part, parts)
    r_stop = min(n, 2 * p_stop) // 2 * 2           # the rows taken in pairs
    for p in range(p_start, p_stop):
        r0 = 2 * p
        if r0 + 2 <= n:
            s0, s1 = _dots2(family, xqa, xca, xda, wqa + r0 * k, wda + 2 * r0 * nb, k, nb2)
            out[0, r0], out[0, r0 + 1] = s0, s1
        else:
            _tail_rows(out, xq, xd, wq, wd, r0)
    _odd_block(out, xq, xd, wq, wd, 2 * p_start, r_stop)


@njit(fastmath=FASTMATH_INF, cache=True)
def _gemv_rows(part, parts, out, x, wq, wd, family):
    # x: (m, k) float32, quantized first (_codes: xq (m, k) int8, xc (m, nb) int32, xd (m, nb)
    # float32, nb = k // 32); wq: (n, k) int8; wd: (n, nb) float16 bits (uint16); out: (m, n);
    # family: FAMILIES' array of the instruction set. Each block of 4 rows of w (in cache
    # after the first row of x) meets every row of x; one row is decode's GEMV. In parts
    # (cpu_pool): blocks of rows of w, each part quantizing x (k values) for itself
    xq = np.empty(x.shape, np.int8)
    xc, xd = _codes(x, xq)
    n, k = wq.shape
    m, nb = xd.shape
    nb2 = nb // 2
    xqa, xca, xda = xq.ctypes.data, xc.ctypes.data, xd.ctypes.data
    wqa, wda = wq.ctypes.data, wd.ctypes.data
    blk_start, blk_stop = cpu_pool.share((n + GEMV_ROWS - 1) // GEMV_ROWS, part, parts)
    for blk in range(blk_start, blk_stop):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            for i in range(m):
                s0, s1, s2, s3 = _dots4(family, xqa + i * k, xca + 4 * i * nb,
                                        xda + 4 * i * nb, wqa + r0 * k, wda + 2 * r0 * nb, k,
                                        nb2)
                out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3] = s0, s1, s2, s3
        else:
            _tail_rows(out, xq, xd, wq, wd, r0)
    _odd_block(out, xq, xd, wq, wd, blk_start * GEMV_ROWS,       # the rows taken in blocks
               min(blk_stop * GEMV_ROWS, n // GEMV_ROWS * GEMV_ROWS))


@njit(fastmath=FASTMATH_INF, cache=True)
def _gemv_rows_portable(part, parts, out, x, wq, wd, family):
    # as _gemv_rows in plain loops (family unused); x's codes xq as float32 (xc unused)
    xq = np.empty(x.shape, np.float32)
    xc, xd = _codes(x, xq)
    n = wq.shape[0]
    m, nb = xd.shape
    blk_start, blk_stop = cpu_pool.share((n + GEMV_ROWS - 1) // GEMV_ROWS, part, parts)
    for blk in range(blk_start, blk_stop):
        r0 = blk * GEMV_ROWS
        if r0 + GEMV_ROWS <= n:
            for i in range(m):
                out[i, r0], out[i, r0 + 1], out[i, r0 + 2], out[i, r0 + 3] = _dots4_portable(
                    wq, wd, r0, xq, xd, i, nb)
        else:
            _tail_rows(out, xq, xd, wq, wd, r0)


@njit(fastmath=True, cache=True)
def dequantize_rows(out, wq, wd, r0):
    # out: (rows, k) float32 = rows r0.. of w dequantized; wq: (n, k) int8; wd: (n, k // 32)
    # float16 bits. On the calling thread (see _gemm)
    rows, k = out.shape
    for r in range(rows):
        wr, dr, o = wq[r0 + r], wd[r0 + r], out[r]
        for b in range(k // 32):
            d = f16_to_float32(dr[b])
            # unsigned bounds (no negative-index wrap) and a trip count LLVM does not know (a
            # constant 32 is unrolled into scalar code first): the loop vectorises, 3x faster
            for u in range(uint64(b * 32), uint64(min(b * 32 + 32, k))):
                o[u] = float32(wr[u]) * d


def _gemm(out, x, wq, wd):
    # x: (m, k) float32, m > GEMV_MAX_ROWS; out: (m, n). Tiles of w dequantized, then sgemm.
    # The tiles are dequantized on the calling thread: a parallel region between BLAS calls
    # leaves numba's OpenMP threads spinning against BLAS's own (2 cores, 512x5632x2048:
    # 135 GFLOP/s with 2 MB tiles dequantized in parallel, 182 on one thread with 8 MB tiles,
    # sgemm on float32 weights 200)
    n, k = wq.shape
    step = max(GEMV_ROWS, min(n, TILE_BYTES // (4 * k)))
    tile = np.empty((step, k), np.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        t = tile[:r1 - r0]
        dequantize_rows(t, wq, wd, r0)
        np.matmul(x, t.T, out=out[:, r0:r1])


@njit(parallel=PRANGE, cache=True)
def dequantize_rows_bf16(out, wq, wd, r0):
    # out: (rows, k) uint16 = rows r0.. of w dequantized and rounded to bfloat16 (bits)
    rows, k = out.shape
    for r in prange(rows):
        wr, dr, o = wq[r0 + r], wd[r0 + r], out[r]
        for b in range(k // 32):
            d = f16_to_float32(dr[b])
            for u in range(uint64(b * 32), uint64(b * 32 + 32)):
                o[u] = round_bf16(float32(wr[u]) * d)


def _gemm_bf16(out, x, wq, wd):
    # x: (m, k) float32, m > GEMV_MAX_ROWS; out: (m, n). With AVX-512 BF16: x rounded to
    # bfloat16 and packed once; tiles of w (rows a multiple of the micro-kernel's NR)
    # dequantized and rounded to bfloat16, each multiplied by linear_bf16_cpu's vdpbf16ps GEMM
    n, k = wq.shape
    step = min(n, max(NR, TILE_BYTES // (2 * k) // NR * NR))
    ap = packed_x_bf16(x)
    tile = np.empty((step, k), np.uint16)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        t = tile[:r1 - r0]
        dequantize_rows_bf16(t, wq, wd, r0)
        gemm_bf16(out[:, r0:r1], x, t, ap)


def _gemv_kernel(m):
    # the GEMV for m rows of x and its family: AVX-512 VNNI, AVX2, or plain loops
    isa = "vnni" if fast_path("avx512vnni", "avx512bw") else "avx2" if fast_path("avx2") else None
    if isa is None:
        return _gemv_rows_portable, FAMILIES["avx2"]
    if m == 1:
        return (_gemv if ONE_STREAM_DECODE else _gemv_pairs), FAMILIES[isa]
    return _gemv_rows, FAMILIES[isa]


def linear(out, x, w, bias):
    # x: (m, k) float32; w: Q8Matrix (n, k); bias: (n,) or (0,); out: (m, n)
    m = x.shape[0]
    wq, wd = w.qs, w.d.view(np.uint16)
    if m <= GEMV_MAX_ROWS:
        kernel, family = _gemv_kernel(m)
        cpu_pool.run_parts(kernel, m * wq.size, out, x, wq, wd, family)
    elif amx_path("amx-bf16"):
        gemm_amx(out, x, q8=(wq, wd))
    elif fast_path("avx512bf16"):
        _gemm_bf16(out, x, wq, wd)
    else:
        _gemm(out, x, wq, wd)
    if bias.shape[0]:
        cpu_pool.run(_add_bias, out.size, out, bias)


def bind_gemv(w):
    """gemv(out, x) = linear(out, x, w, no bias) for one row of x, its kernel and w's views
    picked once (linear_cpu.bind_gemv)."""
    return cpu_pool.bind_gemv(*decode_gemv(w))


def decode_gemv(w):
    """The one-row GEMV over w as a compiled decode step calls it (linear_cpu.decode_gemv)."""
    kernel, family = _gemv_kernel(1)
    return kernel, w.qs.size, (w.qs, w.d.view(np.uint16), family), 0, None


def embedding(out, table, tokens):
    # out: (seq, hidden) float32; table: Q8Matrix (vocab, hidden); tokens: (seq,) int64, clipped
    # to [0, vocab): the picked rows dequantized
    ids = np.clip(tokens, 0, table.shape[0] - 1)
    wq, wd = table.qs[ids], table.d.view(np.uint16)[ids]
    dequantize_rows(out, wq, wd, 0)
