"""Attention over an 8-bit KV cache (formats.Int8KV) on the CPU.

Decode (at most 4 queries and 8 query heads a KV head, head sizes a multiple of 32; more than
8 query rows a KV head one query at a time) takes both products in 8 bits, on AVX-512 VNNI
with vpdpbusd (64 multiply-adds an instruction), on AVX2 with vpmaddubsw + vpmaddwd (32 a
pair: twice float32's FMA rate), on the schedule of attention_cpu's decode (key ranges over
the threads, blocks of BLOCK_K keys for every KV head in turn, the next rows prefetched
meanwhile, the ranges merged at the end):
- scores: q rounded to 8 bits once a call (one scale a row, |q| / 127; 7 bits, |q| / 63, on
  AVX2, where vpmaddubsw's int16 pair sums must not saturate), against the cache's key codes
  as they lie (codes offset by 128: the unsigned operand), int32 sums; then scaled by q's and
  each key's scale, the offset taken off as 128 times the row's code sum;
- the online softmax in float32 (attention_cpu's);
- P V: the probabilities times each value row's scale, rounded to 7 bits (one step a query row
  and block, the block's largest / 127), against four keys' value codes at a time, int32 sums
  a block, then scaled into the float32 output. VNNI takes the weights as the signed operand
  and the codes as they lie (the offset taken off as 128 times the weights' sum); AVX2 takes
  the weights as the unsigned one and the codes with the offset's bit flipped (signed),
  interleaved four keys a 32-bit lane once a block.
bench/quality_kv8_emulated.py measures what the roundings cost (on the demo model: 8-bit q,
K, V and 7-bit weights 3.0e-5 nats of KL from float32, perplexity -0.02%; q in 7 bits 3.7e-5,
-0.03%).

Everything else (prefill, more heads a KV head, other head sizes, CPUs without AVX2, the
portable path) reads the codes widened to float32 (dequantize) and runs attention_cpu's float32
kernels."""
import numpy as np
from llvmlite import ir
from numba import float32, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..formats import KV_OFFSET as OFFSET, quantize_kv_row   # OFFSET: stored byte = code + 128
from . import attention_cpu as f32
from . import cpu_pool
from .attention_cpu import BLOCK_K, NEG_INF, _decode_mk_merge, _decode_mk_plan, _softmax8, \
    make_prefetch_rows
from .llvm_cpu import F32 as _F32, I32 as _I32, I64 as _I64, dpbusd_avx2, fast_path, vpdpbusd
from .scalar import FASTMATH_INF
from .cpu_pool import PRANGE, call_at

I8 = ir.IntType(8)
VI16, VI8, VF8 = ir.VectorType(_I32, 16), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)
# decode: the K/V rows this many keys ahead are prefetched into L1, whole rows in address order,
# spread over each head's scores (as attention_cpu's)
PREFETCH_KEYS = 64
# ... into L1 on every CPU (prefetcht0), where attention_cpu's 16-bit and float32 rows go to L2
# on Zen 4: 64 keys of 8-bit rows are a quarter of float32's bytes ahead, and L1 is where they
# pay. TinyLlama's q8_0 decode at 1800-1960 keys on 2 Zen 4 cores, the two in turn step by step,
# the attention timed inside the step (bench/tune_decode_attention.py int8 as-is,l2 --model):
# 91-93 against 143-145 us a layer in both orders, steps 2-4% faster
_prefetch_rows = make_prefetch_rows(3)
BLOCK = BLOCK_K                 # keys a block of the online softmax
# the instructions decode's products take, passed to the kernels as `isa`: an empty array whose
# dtype names them while numba types a kernel (as attention_cpu's `kind`), so each compiles
# only its own code
VNNI = np.empty(0, np.int8)     # AVX-512 VNNI: vpdpbusd, 64 multiply-adds an instruction
AVX2 = np.empty(0, np.uint8)    # AVX2: vpmaddubsw + vpmaddwd, 32 multiply-adds a pair
# (q's largest code, dimensions a step of the score kernel's Q layout, keys a score call, query
# rows of the large and middle P V calls, columns a P V call) per instruction set. AVX2 takes q
# in 7 bits: vpmaddubsw's int16 pair sums of key bytes (<= 255) and codes then stay within 32767
_SHAPES = {"vnni": (127, 8, 14, 8, 4, 32), "avx2": (63, 4, 12, 4, 2, 16)}


def _isa_name(isa):
    # "vnni" or "avx2" for an isa marker's numba type
    return "vnni" if isa.dtype == types.int8 else "avx2"


def _shape(isa):
    """_SHAPES' row for an isa marker (a constant tuple, inside a kernel)."""


@overload(_shape, inline="always")
def _shape_impl(isa):
    row = _SHAPES[_isa_name(isa)]
    return lambda isa: row


def _const(xs, t=_I32):
    return ir.Constant(ir.VectorType(t, len(xs)), xs)


def _at(builder, addr, t, align=1):
    return builder.load(builder.inttoptr(addr, ir.PointerType(t)), align=align)


def _bcast(builder, x, n):
    u = ir.Constant(ir.VectorType(x.type, n), ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(u, x, ir.Constant(_I32, 0)), u,
                                  _const([0] * n))


def _qk_vnni(R):
    """_qk's code on AVX-512 VNNI, R keys: for keys i < R, the 8 floats at c + 32 i (S^T rows)
    become qs[r] ks[i] (sum_{t < K} A[i, t] Q[t, r] - corr[r]) for rows r < 8.
    A[i, t]: the unsigned byte at a + i sa_i + t; Q: signed bytes, 64 a step of 8 dimensions
    from b on, the 32-bit lane 2 r + e of step s holding Q[8 s + 4 e + (0..3), r]; ks[i]: the
    float at ks + 4 i ks_i; qi: corr (8 int32), then qs (8 floats). K a multiple of 8. Each
    key's 8 bytes a step are broadcast to the 8 64-bit lanes, one vpdpbusd a key and step; the
    R accumulators stay in registers, and are finished two keys a zmm (R even, or 1)."""
    even = _const(list(range(0, 32, 2)))
    odd = _const(list(range(1, 32, 2)))
    twice = _const(list(range(8)) * 2)
    VF16 = ir.VectorType(_F32, 16)

    def qk(builder, c, a, sa_i, b, K, ks, ks_i, qi):
        dot = vpdpbusd(builder)
        acc = [cgutils.alloca_once_value(builder, ir.Constant(VI16, [0] * 16))
               for _ in range(R)]
        rows = [builder.add(a, builder.mul(ir.Constant(_I64, i), sa_i)) for i in range(R)]
        with cgutils.for_range(builder, builder.ashr(K, ir.Constant(_I64, 3))) as loop:
            s = loop.index
            off = builder.shl(s, ir.Constant(_I64, 3))
            qv = _at(builder, builder.add(b, builder.shl(s, ir.Constant(_I64, 6))), VI16, 4)
            for i in range(R):
                word = _at(builder, builder.add(rows[i], off), _I64)
                kv = builder.bitcast(_bcast(builder, word, 8), VI16)
                builder.store(builder.call(dot, [builder.load(acc[i]), kv, qv]), acc[i])
        corr, qs = _at(builder, qi, VI8, 4), _at(builder, builder.add(qi, ir.Constant(
            _I64, 32)), VF8, 4)

        def kscale(i):
            return _at(builder, builder.add(ks, builder.mul(ir.Constant(_I64, 4 * i), ks_i)),
                       _F32, 4)
        if R == 1:
            v = builder.load(acc[0])
            total = builder.sub(builder.add(
                builder.shuffle_vector(v, v, _const(list(range(0, 16, 2)))),
                builder.shuffle_vector(v, v, _const(list(range(1, 16, 2))))), corr)
            res = builder.fmul(builder.fmul(builder.sitofp(total, VF8), qs),
                               _bcast(builder, kscale(0), 8))
            builder.store(res, builder.inttoptr(c, ir.PointerType(VF8)), align=4)
            return
        corr2, qs2 = (builder.shuffle_vector(x, x, twice) for x in (corr, qs))
        for i in range(0, R, 2):          # keys i and i + 1: one zmm, two S^T rows
            u, w = builder.load(acc[i]), builder.load(acc[i + 1])
            total = builder.sub(builder.add(builder.shuffle_vector(u, w, even),
                                            builder.shuffle_vector(u, w, odd)), corr2)
            pair = builder.shuffle_vector(_bcast(builder, kscale(i), 8),
                                          _bcast(builder, kscale(i + 1), 8),
                                          _const(list(range(16))))
            res = builder.fmul(builder.fmul(builder.sitofp(total, VF16), qs2), pair)
            out = builder.add(c, ir.Constant(_I64, 32 * i))
            builder.store(res, builder.inttoptr(out, ir.PointerType(VF16)), align=4)
    return qk


def _qk_avx2(R):
    """_qk's code on AVX2, R keys (R <= 12: the accumulators, q's step, ones and a broadcast in
    16 ymm): as _qk_vnni's, with Q's signed bytes 32 a step of 4 dimensions, the 32-bit lane r
    of step s holding Q[4 s + (0..3), r] (|Q| <= 63); each key's 4 bytes a step broadcast to the
    8 lanes, vpmaddubsw and vpmaddwd a key and step (llvm_cpu.dpbusd_avx2)."""
    def qk(builder, c, a, sa_i, b, K, ks, ks_i, qi):
        acc = [cgutils.alloca_once_value(builder, ir.Constant(VI8, [0] * 8)) for _ in range(R)]
        rows = [builder.add(a, builder.mul(ir.Constant(_I64, i), sa_i)) for i in range(R)]
        with cgutils.for_range(builder, builder.ashr(K, ir.Constant(_I64, 2))) as loop:
            s = loop.index
            off = builder.shl(s, ir.Constant(_I64, 2))
            qv = _at(builder, builder.add(b, builder.shl(s, ir.Constant(_I64, 5))), VI8, 4)
            for i in range(R):
                kv = _bcast(builder, _at(builder, builder.add(rows[i], off), _I32), 8)
                builder.store(dpbusd_avx2(builder, builder.load(acc[i]), kv, qv), acc[i])
        corr, qs = _at(builder, qi, VI8, 4), _at(builder, builder.add(qi, ir.Constant(
            _I64, 32)), VF8, 4)
        for i in range(R):
            ksi = _at(builder, builder.add(ks, builder.mul(ir.Constant(_I64, 4 * i), ks_i)),
                      _F32, 4)
            total = builder.sub(builder.load(acc[i]), corr)
            res = builder.fmul(builder.fmul(builder.sitofp(total, VF8), qs),
                               _bcast(builder, ksi, 8))
            builder.store(res, builder.inttoptr(builder.add(c, ir.Constant(_I64, 32 * i)),
                                                ir.PointerType(VF8)), align=4)
    return qk


def _codegen(vnni, avx2, isa):
    """An intrinsic's codegen for f(isa, *int64 args): vnni(builder, *args) or avx2(builder,
    *args) by the isa marker's type."""
    body = vnni if _isa_name(isa) == "vnni" else avx2

    def codegen(context, builder, signature, args):
        body(builder, *[context.cast(builder, v, t, types.int64)
                        for v, t in zip(args[1:], signature.args[1:])])
        return context.get_dummy_value()
    return codegen


def _by_isa(vnni, avx2):
    """An intrinsic f(isa, a0, ..., a7) of eight int64 arguments running the codegen body vnni
    or avx2 by the isa marker (the score and P V kernels: qk(isa, c, a, sa_i, b, K, ks, ks_i,
    qi), mk(isa, c, ldc, a, b, ldb, K, alpha, wq))."""
    @intrinsic
    def f(typingctx, isa, a0, a1, a2, a3, a4, a5, a6, a7):
        return types.void(isa, a0, a1, a2, a3, a4, a5, a6, a7), _codegen(vnni, avx2, isa)
    return f


# the scores of R keys a call (big: _SHAPES' keys a call)
_qk_big, _qk_4, _qk_1 = (_by_isa(_qk_vnni(rv), _qk_avx2(ra)) for rv, ra in ((14, 12), (4, 4),
                                                                           (1, 1)))


@njit(inline="always")
def _head_scores(isa, nk, st_p, kh_p, ldk, qh_p, d, ks_p, ks_i, qi_p, pf_k, pf_v, n_pf):
    # S^T (nk, 8) at st_p of one KV head's block: keys at kh_p, rows ldk bytes apart, their
    # scales at ks_p, ks_i floats apart. Before each call of R keys the next R of n_pf pieces
    # of d bytes of K and of V are prefetched (before the last, every piece left), back to back
    # from pf_k and pf_v: spread over the work, so the memory streams while the core computes
    R = _shape(isa)[2]
    j = p = 0                                  # keys done, pieces prefetched
    while j < nk:
        cj, aj, kj = st_p + 32 * j, kh_p + j * ldk, ks_p + 4 * j * ks_i
        if p < n_pf:
            npf = min(R, n_pf - p) if j + R < nk else n_pf - p
            _prefetch_rows(pf_k + p * d, npf, d, d)
            _prefetch_rows(pf_v + p * d, npf, d, d)
            p += npf
        if nk - j >= R:
            _qk_big(isa, cj, aj, ldk, qh_p, d, kj, ks_i, qi_p)
            j += R
        elif nk - j >= 4:
            _qk_4(isa, cj, aj, ldk, qh_p, d, kj, ks_i, qi_p)
            j += 4
        else:
            _qk_1(isa, cj, aj, ldk, qh_p, d, kj, ks_i, qi_p)
            j += 1


@intrinsic
def _pack_weights(typingctx, pw, st, nk, vs, vs_i, wq):
    """The block's P V weights in 7 bits. w[j, r] = P^T[j, r] vs[j] (P^T: 8 floats at st + 32 j,
    overwritten by w; vs[j] the value row's scale, the float at vs + 4 j vs_i), j < nk; a step
    a row, wstep[r] = max_j w[j, r] / 127 (1 where that is 0); codes round(w / wstep) in
    [0, 127], bytes, the 32-bit word at pw + 4 (8 p + r) holding keys 4 p .. 4 p + 3 of row r
    (0 past nk), p < (nk + 3) / 4. wq: wstep (8 floats) then the codes' sums (8 int32)."""
    sig = types.void(pw, st, nk, vs, vs_i, wq)

    def codegen(context, builder, signature, args):
        pw, st, nk, vs, vs_i, wq = [context.cast(builder, v, t, types.int64)
                                    for v, t in zip(args, signature.args)]
        zero = ir.Constant(VF8, [0.0] * 8)
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VF8, [VF8, VF8]),
                                              "llvm.maxnum.v8f32")

        def row(j):
            return builder.inttoptr(builder.add(st, builder.shl(j, ir.Constant(_I64, 5))),
                                    ir.PointerType(VF8))
        mx = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]

        def scaled(j, slot):         # w[j] = P^T[j] vs[j] in place, into the running max slot
            s = _at(builder, builder.add(vs, builder.mul(builder.shl(j, ir.Constant(_I64, 2)),
                                                         vs_i)), _F32, 4)
            w = builder.fmul(builder.load(row(j), align=4), _bcast(builder, s, 8))
            builder.store(w, row(j), align=4)
            builder.store(builder.call(vmax, [builder.load(slot), w]), slot)
        n4 = builder.ashr(nk, ir.Constant(_I64, 2))
        with cgutils.for_range(builder, n4) as loop:     # four independent max chains
            for t in range(4):
                scaled(builder.add(builder.shl(loop.index, ir.Constant(_I64, 2)),
                                   ir.Constant(_I64, t)), mx[t])
        with cgutils.for_range_slice(builder, builder.shl(n4, ir.Constant(_I64, 2)), nk,
                                     ir.Constant(_I64, 1)) as (j, _):
            scaled(j, mx[0])
        m = builder.call(vmax, [builder.call(vmax, [builder.load(mx[0]), builder.load(mx[1])]),
                                builder.call(vmax, [builder.load(mx[2]), builder.load(mx[3])])])
        pos = builder.fcmp_ordered(">", m, zero)
        step = builder.select(pos, builder.fmul(m, ir.Constant(VF8, [1 / 127] * 8)),
                              ir.Constant(VF8, [1.0] * 8))
        inv = builder.select(pos, builder.fdiv(ir.Constant(VF8, [127.0] * 8), m), zero)
        builder.store(step, builder.inttoptr(wq, ir.PointerType(VF8)), align=4)
        total = cgutils.alloca_once_value(builder, ir.Constant(VI8, [0] * 8))
        nk32 = builder.trunc(nk, _I32)
        half = ir.Constant(VF8, [0.5] * 8)

        def pack(p, masked):          # keys 4 p .. 4 p + 3 into one 32-bit word a row
            word = None
            for t in range(4):
                j = builder.add(builder.shl(p, ir.Constant(_I64, 2)), ir.Constant(_I64, t))
                w = builder.load(row(j), align=4)
                if masked:
                    w = builder.select(builder.icmp_signed("<", builder.trunc(j, _I32), nk32),
                                       w, zero)
                code = builder.fptosi(builder.fadd(builder.fmul(w, inv), half), VI8)
                builder.store(builder.add(builder.load(total), code), total)
                code = builder.shl(code, ir.Constant(VI8, [8 * t] * 8)) if t else code
                word = code if word is None else builder.or_(word, code)
            builder.store(word, builder.inttoptr(builder.add(pw, builder.shl(
                p, ir.Constant(_I64, 5))), ir.PointerType(VI8)), align=4)
        full = builder.ashr(nk, ir.Constant(_I64, 2))
        with cgutils.for_range(builder, full) as loop:
            pack(loop.index, False)
        with builder.if_then(builder.icmp_signed(">", builder.and_(nk, ir.Constant(_I64, 3)),
                                                 ir.Constant(_I64, 0))):
            pack(full, True)
        builder.store(builder.load(total), builder.inttoptr(builder.add(
            wq, ir.Constant(_I64, 32)), ir.PointerType(VI8)), align=4)
        return context.get_dummy_value()
    return sig, codegen


def _pv_vnni(R):
    """_pv's code on AVX-512 VNNI, R rows: for rows i < R, the 32 floats at c + 4 i ldc become
    C[i] alpha[i] + wstep[i] (sum_{t < K} W[t, i] V[t, :32] - 128 wsum[i]): W the 7-bit
    weights _pack_weights packed at a (the word at a + 4 (8 p + i) holds keys 4 p .. 4 p + 3),
    V the unsigned bytes at b + t ldb (codes offset by 128), wq: wstep (8 floats) then wsum
    (8 int32). Four keys' rows are interleaved so that a 32-bit lane holds one
    column's four bytes, and one vpdpbusd takes four keys of 16 columns of a row."""
    V32 = ir.VectorType(I8, 32)
    cat = _const(list(range(64)))
    spread = [_const([32 * t + 16 * h + col for col in range(16) for t in range(4)])
              for h in (0, 1)]

    def mk(builder, c, ldc, a, b, ldb, K, alpha, wq):
        dot = vpdpbusd(builder)
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(VI16, [0] * 16))
                for _ in (0, 1)] for _ in range(R)]

        def group(p, vrows):
            both = builder.shuffle_vector(builder.shuffle_vector(vrows[0], vrows[1], cat),
                                          builder.shuffle_vector(vrows[2], vrows[3], cat),
                                          _const(list(range(128))))
            vv = [builder.bitcast(builder.shuffle_vector(both, both, spread[h]), VI16)
                  for h in (0, 1)]
            word = builder.add(a, builder.shl(p, ir.Constant(_I64, 5)))
            for i in range(R):
                wb = _bcast(builder, _at(builder, builder.add(word, ir.Constant(
                    _I64, 4 * i)), _I32, 4), 16)
                for h in (0, 1):
                    builder.store(builder.call(dot, [builder.load(acc[i][h]), vv[h], wb]),
                                  acc[i][h])

        def v_row(t):
            return _at(builder, builder.add(b, builder.mul(t, ldb)), V32)
        n4 = builder.ashr(K, ir.Constant(_I64, 2))
        with cgutils.for_range(builder, n4) as loop:
            t0 = builder.shl(loop.index, ir.Constant(_I64, 2))
            group(loop.index, [v_row(builder.add(t0, ir.Constant(_I64, t)))
                               for t in range(4)])
        tail = builder.and_(K, ir.Constant(_I64, 3))
        with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(_I64, 0))):
            t0 = builder.shl(n4, ir.Constant(_I64, 2))
            slots = [cgutils.alloca_once_value(builder, ir.Constant(V32, [0] * 32))
                     for _ in range(4)]
            for t in range(3):                     # rows past K stay zeros (never read)
                with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(_I64, t))):
                    builder.store(v_row(builder.add(t0, ir.Constant(_I64, t))), slots[t])
            group(n4, [builder.load(s) for s in slots])
        for i in range(R):
            al = _bcast(builder, _at(builder, builder.add(alpha, ir.Constant(_I64, 4 * i)),
                                     _F32, 4), 16)
            step = _bcast(builder, _at(builder, builder.add(wq, ir.Constant(_I64, 4 * i)),
                                       _F32, 4), 16)
            wsum = _at(builder, builder.add(wq, ir.Constant(_I64, 32 + 4 * i)), _I32, 4)
            corr = _bcast(builder, builder.mul(wsum, ir.Constant(_I32, OFFSET)), 16)
            for h in (0, 1):
                out = builder.inttoptr(builder.add(builder.add(c, builder.mul(
                    ir.Constant(_I64, 4 * i), ldc)), ir.Constant(_I64, 64 * h)),
                    ir.PointerType(ir.VectorType(_F32, 16)))
                v = builder.sitofp(builder.sub(builder.load(acc[i][h]), corr),
                                   ir.VectorType(_F32, 16))
                builder.store(builder.fadd(builder.fmul(builder.load(out, align=4), al),
                                           builder.fmul(v, step)), out, align=4)
    return mk


def _pv_avx2(R):
    """_pv's code on AVX2, R rows (R <= 4: two accumulators a row, the V pieces, ones and a
    broadcast in 16 ymm): for rows i < R, the 16 floats at c + 4 i ldc become C[i] alpha[i] +
    wstep[i] sum_{t < K} W[t, i] V[t, :16]: W as _pv_vnni's, V the signed codes _interleave_v
    laid out from b on, ldb bytes a group of four keys (the 32-bit lane of a column holding its
    four keys' codes); two vpmaddubsw + vpmaddwd a row and group (weights <= 127 against codes
    >= -128: no int16 saturation)."""
    def mk(builder, c, ldc, a, b, ldb, K, alpha, wq):
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(VI8, [0] * 8)) for _ in (0, 1)]
               for _ in range(R)]
        groups = builder.ashr(builder.add(K, ir.Constant(_I64, 3)), ir.Constant(_I64, 2))
        with cgutils.for_range(builder, groups) as loop:
            p = loop.index
            vp = builder.add(b, builder.mul(p, ldb))
            vv = [_at(builder, builder.add(vp, ir.Constant(_I64, 32 * h)), VI8, 4) for h in (0, 1)]
            word = builder.add(a, builder.shl(p, ir.Constant(_I64, 5)))
            for i in range(R):
                wb = _bcast(builder, _at(builder, builder.add(word, ir.Constant(_I64, 4 * i)),
                                         _I32, 4), 8)
                for h in (0, 1):
                    builder.store(dpbusd_avx2(builder, builder.load(acc[i][h]), wb, vv[h]),
                                  acc[i][h])
        for i in range(R):
            al = _bcast(builder, _at(builder, builder.add(alpha, ir.Constant(_I64, 4 * i)),
                                     _F32, 4), 8)
            step = _bcast(builder, _at(builder, builder.add(wq, ir.Constant(_I64, 4 * i)),
                                       _F32, 4), 8)
            for h in (0, 1):
                out = builder.inttoptr(builder.add(builder.add(c, builder.mul(
                    ir.Constant(_I64, 4 * i), ldc)), ir.Constant(_I64, 32 * h)),
                    ir.PointerType(VF8))
                v = builder.sitofp(builder.load(acc[i][h]), VF8)
                builder.store(builder.fadd(builder.fmul(builder.load(out, align=4), al),
                                           builder.fmul(v, step)), out, align=4)
    return mk


# P V of R query rows a call (_SHAPES' big and middle, then one)
_pv_big, _pv_mid, _pv_1 = (_by_isa(_pv_vnni(rv), _pv_avx2(ra)) for rv, ra in ((8, 4), (4, 2),
                                                                            (1, 1)))


def _interleave_avx2(builder, vt, vh, ldk, K, d):
    """The block's value codes for _pv_avx2: keys t < K of one KV head (d unsigned bytes at
    vh + t ldk, codes offset by 128) as signed codes (the offset's bit flipped), four keys a
    group, 4 d bytes a group from vt on: byte 4 c + e of group p is key 4 p + e's column c
    (0 past K). d a multiple of 32; four unpacks of bytes and words, then halves swapped."""
    V32, V16 = ir.VectorType(I8, 32), ir.VectorType(ir.IntType(16), 16)
    V4 = ir.VectorType(_I64, 4)
    flip = ir.Constant(V32, [-128] * 32)

    def unpack(x, y, n, hi):     # vpunpck{l,h}: lane-wise interleave of n-element vectors
        half = n // 4
        idx = [L * n // 2 + hi * half + i + src * n for L in (0, 1) for i in range(half)
               for src in (0, 1)]
        return builder.shuffle_vector(x, y, _const(idx))

    def group(p, rows):
        base = builder.add(vt, builder.mul(p, builder.shl(d, ir.Constant(_I64, 2))))
        with cgutils.for_range(builder, builder.ashr(d, ir.Constant(_I64, 5))) as loop:
            c0 = builder.shl(loop.index, ir.Constant(_I64, 5))
            r = [row(c0) for row in rows]
            a_lo, a_hi = (builder.bitcast(unpack(r[0], r[1], 32, h), V16) for h in (0, 1))
            b_lo, b_hi = (builder.bitcast(unpack(r[2], r[3], 32, h), V16) for h in (0, 1))
            w = [builder.bitcast(unpack(x, y, 16, h), V4)
                 for x, y in ((a_lo, b_lo), (a_hi, b_hi)) for h in (0, 1)]
            # w[0..3]: columns (0-3 | 16-19), (4-7 | 20-23), (8-11 | 24-27), (12-15 | 28-31)
            outs = (builder.shuffle_vector(w[0], w[1], _const([0, 1, 4, 5])),
                    builder.shuffle_vector(w[2], w[3], _const([0, 1, 4, 5])),
                    builder.shuffle_vector(w[0], w[1], _const([2, 3, 6, 7])),
                    builder.shuffle_vector(w[2], w[3], _const([2, 3, 6, 7])))
            dst = builder.add(base, builder.shl(c0, ir.Constant(_I64, 2)))
            for k, o in enumerate(outs):
                builder.store(o, builder.inttoptr(builder.add(dst, ir.Constant(_I64, 32 * k)),
                                                  ir.PointerType(V4)), align=4)

    def key_row(t):
        addr = builder.add(vh, builder.mul(t, ldk))
        return lambda c0: builder.xor(_at(builder, builder.add(addr, c0), V32), flip)
    n4 = builder.ashr(K, ir.Constant(_I64, 2))
    with cgutils.for_range(builder, n4) as loop:
        t0 = builder.shl(loop.index, ir.Constant(_I64, 2))
        group(loop.index, [key_row(builder.add(t0, ir.Constant(_I64, e))) for e in range(4)])
    tail = builder.and_(K, ir.Constant(_I64, 3))
    with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(_I64, 0))):
        t0 = builder.shl(n4, ir.Constant(_I64, 2))
        zero = ir.Constant(V32, [0] * 32)

        def tail_row(e):          # key t0 + e where it exists, else zeros (never read past K)
            def load(c0):
                slot = cgutils.alloca_once_value(builder, zero)
                with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(_I64, e))):
                    builder.store(key_row(builder.add(t0, ir.Constant(_I64, e)))(c0), slot)
                return builder.load(slot)
            return load
        group(n4, [tail_row(e) for e in range(4)])


@intrinsic
def _interleave_v(typingctx, isa, vt, vh, ldk, K, d):
    """The value codes as _pv's AVX2 code reads them (_interleave_avx2); nothing on VNNI, whose
    code reads the cache's rows as they lie."""
    return types.void(isa, vt, vh, ldk, K, d), _codegen(lambda builder, *args: None,
                                                        _interleave_avx2, isa)


@njit(inline="always")
def _head_pv(isa, rows, nk, oh_p, d, pw_p, vh_p, ldk, a_p, wq_p, vt_p):
    # O[r] = O[r] alpha[r] + the block's P V, for one KV head's rows (O at oh_p, rows d floats
    # apart), cols columns at a time, in groups of big, mid and 1 rows. VNNI reads the values'
    # rows as they lie (ldk bytes apart), AVX2 their codes interleaved into vt_p first
    big, mid, cols = _shape(isa)[3:]
    vnni = big == 8
    _interleave_v(isa, vt_p, vh_p, ldk, nk, d)
    i = 0
    while i < rows:
        g = big if rows - i >= big else (mid if rows - i >= mid else 1)
        for c0 in range(0, d, cols):
            o_c = oh_p + 4 * (i * d + c0)
            v_c, ldv = (vh_p + c0, ldk) if vnni else (vt_p + 4 * c0, 4 * d)
            if g == big:
                _pv_big(isa, o_c, d, pw_p + 4 * i, v_c, ldv, nk, a_p + 4 * i, wq_p + 4 * i)
            elif g == mid:
                _pv_mid(isa, o_c, d, pw_p + 4 * i, v_c, ldv, nk, a_p + 4 * i, wq_p + 4 * i)
            else:
                _pv_1(isa, o_c, d, pw_p + 4 * i, v_c, ldv, nk, a_p + 4 * i, wq_p + 4 * i)
        i += g


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _pack_q(isa, Qb, Qi, q, scale, z, hk, rows, G):
    # KV head hk's query rows (8, padding rows zeros) in 8 bits (|codes| <= lim) into Qb (d * 8
    # bytes, the score kernel's layout: steps of n dimensions, row r's n bytes of step s at
    # 8 n s + n r: VNNI's lane 2 r + e holds q[r, 8 s + 4 e + m], AVX2's lane r q[r, 4 s + m])
    # and Qi: the rows' offset corrections (8 int32: 128 x their code sums), then their scales
    # times `scale`
    lim, n = _shape(isa)[:2]
    d = q.shape[3]
    qs = Qi[8:].view(np.float32)
    for r in range(8):
        if r >= rows:
            for s in range(d // n):
                Qb[8 * n * s + n * r:8 * n * s + n * r + n] = 0
            Qi[r] = 0
            qs[r] = float32(0)
            continue
        qr = q[z, r // G, hk * G + r % G]
        amax = float32(0)
        for c in range(d):
            amax = max(amax, abs(qr[c]))
        inv = float32(lim) / amax if amax > 0 else float32(0)
        total = 0
        for s in range(d // n):
            for t in range(n):
                code = np.int32(np.rint(qr[n * s + t] * inv))
                Qb[8 * n * s + n * r + t] = code
                total += code
        Qi[r] = OFFSET * total
        qs[r] = amax / float32(lim) * scale


@njit(fastmath=FASTMATH_INF, cache=True)
def _decode_range(isa, q, kc, ks, vc, vs, scale, causal, z, k_lo, k_hi, Qb, Qi, St, Pw, Wq,
                  Vt, O, m_run, l_run, alpha, n_vis):
    # the queries of batch z against its keys k_lo..k_hi-1, block by block, each block for
    # every KV head in turn: O (Hkv, rows, d) unnormalised, m_run and l_run (Hkv, >= 8) the
    # rows' running max and sum. Row r of KV head hk: query r // G, head hk * G + r % G.
    # Scratch: Qb (Hkv, d * 8) int8, Qi (Hkv, 16) int32, St (BLOCK_K * 8,) float32 for S^T,
    # Pw (BLOCK_K * 2,) int32 the packed weights, Wq (16,) int32, Vt (BLOCK_K * d,) int8 the
    # values' codes as AVX2's P V reads them, alpha (8,), n_vis (8,)
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len, Hkv = kc.shape[1], kc.shape[2]
    G = H // Hkv
    rows = q_len * G
    for hk in range(Hkv):
        _pack_q(isa, Qb[hk], Qi[hk], q, scale, z, hk, rows, G)
        for r in range(8):
            m_run[hk, r] = NEG_INF
            l_run[hk, r] = float32(0)
        for r in range(rows):
            for c in range(d):
                O[hk, r, c] = float32(0)
    ldk = Hkv * d                                  # bytes from one key's codes to the next
    kc_p = np.int64(kc.ctypes.data) + z * kv_len * ldk
    vc_p = np.int64(vc.ctypes.data) + z * kv_len * ldk
    ks_p = np.int64(ks.ctypes.data) + 4 * z * kv_len * Hkv
    vs_p = np.int64(vs.ctypes.data) + 4 * z * kv_len * Hkv
    qb_p, qi_p, st_p = np.int64(Qb.ctypes.data), np.int64(Qi.ctypes.data), \
        np.int64(St.ctypes.data)
    pw_p, wq_p, o_p = np.int64(Pw.ctypes.data), np.int64(Wq.ctypes.data), \
        np.int64(O.ctypes.data)
    vt_p = np.int64(Vt.ctypes.data)
    a_p, mr_p = np.int64(alpha.ctypes.data), np.int64(m_run.ctypes.data)
    lr_p, nv_p = np.int64(l_run.ctypes.data), np.int64(n_vis.ctypes.data)
    kpos = kv_len - q_len                          # position of the first query
    n0 = min(k_hi - k_lo, PREFETCH_KEYS)
    _prefetch_rows(kc_p + k_lo * ldk, 1, 0, n0 * ldk)
    _prefetch_rows(vc_p + k_lo * ldk, 1, 0, n0 * ldk)
    for k0 in range(k_lo, k_hi, BLOCK):
        nk = min(BLOCK, k_hi - k0)
        diag = False
        for r in range(8):
            n_vis[r] = min(nk, max(0, kpos + r // G + 1 - k0)) if causal and r < rows else nk
            diag = diag or n_vis[r] < nk
        f0 = min(k_hi, k0 + PREFETCH_KEYS)         # the scales PREFETCH_KEYS on, a block
        f1 = min(k_hi, f0 + BLOCK)
        _prefetch_rows(ks_p + 4 * f0 * Hkv, 1, 0, 4 * (f1 - f0) * Hkv)
        _prefetch_rows(vs_p + 4 * f0 * Hkv, 1, 0, 4 * (f1 - f0) * Hkv)
        for hk in range(Hkv):
            # this head's share of the rows PREFETCH_KEYS on, whole rows in address order
            r0 = min(k_hi, k0 + PREFETCH_KEYS + hk * BLOCK // Hkv)
            r1 = min(k_hi, k0 + PREFETCH_KEYS + (hk + 1) * BLOCK // Hkv)
            at = k0 * Hkv + hk                       # this head's first key, in scale units
            _head_scores(isa, nk, st_p, kc_p + k0 * ldk + hk * d, ldk, qb_p + hk * d * 8, d,
                         ks_p + 4 * at, Hkv, qi_p + 64 * hk, kc_p + r0 * ldk, vc_p + r0 * ldk,
                         (r1 - r0) * Hkv)
            _softmax8(st_p, 8, nk, mr_p + 4 * hk * m_run.shape[1],
                      lr_p + 4 * hk * l_run.shape[1], a_p, nv_p, diag)
            _pack_weights(pw_p, st_p, nk, vs_p + 4 * at, Hkv, wq_p)
            _head_pv(isa, rows, nk, o_p + 4 * hk * rows * d, d, pw_p, vc_p + k0 * ldk + hk * d,
                     ldk, a_p, wq_p, vt_p)


@njit(inline="always", cache=True)
def _scratch(Hkv, d):
    # a worker's scratch for _decode_range, one allocation carved in 64-byte pieces (eight
    # allocations cost 2 us a call): Qb, Qi, St, Pw, Wq, alpha, n_vis, Vt
    sizes = (Hkv * d * 8, Hkv * 64, BLOCK * 32, BLOCK * 8, 64, 64, 64, BLOCK * d)
    buf = np.empty(sum(sizes) + 64, np.uint8)
    at = (64 - buf.ctypes.data % 64) % 64
    Qb = buf[at:at + sizes[0]].view(np.int8).reshape((Hkv, d * 8))
    at += sizes[0]
    Qi = buf[at:at + sizes[1]].view(np.int32).reshape((Hkv, 16))
    at += sizes[1]
    St = buf[at:at + sizes[2]].view(np.float32)
    at += sizes[2]
    Pw = buf[at:at + sizes[3]].view(np.int32)
    at += sizes[3]
    Wq = buf[at:at + 64].view(np.int32)
    alpha = buf[at + 64:at + 96].view(np.float32)
    n_vis = buf[at + 128:at + 160].view(np.int32)
    at += 192
    Vt = buf[at:at + sizes[7]].view(np.int8)
    return Qb, Qi, St, Pw, Wq, alpha, n_vis, Vt


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _decode_worker(isa, q, kc, ks, vc, vs, scale, causal, w, n_workers, n_split, split_len,
                   O_part, M_part, L_part):
    # worker w's tasks of n_workers (every n_workers-th): each a range of keys of one batch for
    # every head (attention_cpu's plan, _decode_mk_plan); its scratch its own
    kv_len = kc.shape[1]
    Qb, Qi, St, Pw, Wq, At, Vis, Vt = _scratch(kc.shape[2], q.shape[3])
    for task in range(w, O_part.shape[0], n_workers):
        z, split = task // n_split, task % n_split
        _decode_range(isa, q, kc, ks, vc, vs, float32(scale), causal, z, split * split_len,
                      min(kv_len, (split + 1) * split_len), Qb, Qi, St, Pw, Wq, Vt,
                      O_part[task], M_part[task], L_part[task], At, Vis)


@njit(parallel=PRANGE, fastmath=FASTMATH_INF, cache=True)
def _attention_decode(isa, out, q, kc, ks, vc, vs, scale, causal, n_workers):
    # q, out: (b, q_len, H, d), at most 8 rows a KV head; kc, vc: (b, kv_len, Hkv, d) uint8
    # codes; ks, vs: (b, kv_len, Hkv) float32 scales. A task: a range of keys of one batch for
    # every head, merged at the end (attention_cpu's plan and merge). isa: VNNI or AVX2
    n_split, split_len, _, O_part, M_part, L_part = _decode_mk_plan(q, kc, n_workers)
    for w in prange(n_workers):
        _decode_worker(isa, q, kc, ks, vc, vs, scale, causal, w, n_workers, n_split, split_len,
                       O_part, M_part, L_part)
    _decode_mk_merge(out, O_part, M_part, L_part, n_split)


@njit(fastmath=FASTMATH_INF, cache=True)
def _attention_decode_serial(isa, out, q, kc, ks, vc, vs, scale, causal):
    # _attention_decode on the calling thread, outside the thread pool (a short context)
    n_split, split_len, _, O_part, M_part, L_part = _decode_mk_plan(q, kc, 1)
    _decode_worker(isa, q, kc, ks, vc, vs, scale, causal, 0, 1, n_split, split_len, O_part,
                   M_part, L_part)
    _decode_mk_merge(out, O_part, M_part, L_part, n_split)


@njit(fastmath=FASTMATH_INF, cache=True)
def _decode_part(part, parts, isa, q, kc, ks, vc, vs, scale, causal, n_split, split_len, O_part,
                 M_part, L_part):
    # _decode_worker as a kernel in parts, called through its address by a compiled decode
    # step's threads (decode_layer)
    _decode_worker(isa, q, kc, ks, vc, vs, scale, causal, part, parts, n_split, split_len,
                   O_part, M_part, L_part)


@njit(parallel=PRANGE, cache=True)
def dequantize(out, codes, scales):
    # out (n, Hkv, d) float32 = (codes - 128) * scales[..., None]; codes (n, Hkv, d) uint8,
    # scales (n, Hkv) float32 (leading axes flattened by the caller)
    for i in prange(codes.shape[0]):
        for h in range(codes.shape[1]):
            s = scales[i, h]
            for c in range(codes.shape[2]):
                out[i, h, c] = float32(np.int32(codes[i, h, c]) - OFFSET) * s


def decode_isa():
    """The marker of the instructions decode's products over an 8-bit cache take in 8 bits on
    this host (VNNI: AVX-512 VNNI and BW; else AVX2), as llvm_cpu.CPU_PATH allows; None where
    neither (the codes widened to float32)."""
    if fast_path("avx512vnni", "avx512bw"):
        return VNNI
    return AVX2 if fast_path("avx2") else None


def decode_products():
    """True where this host takes decode's products over an 8-bit cache in 8 bits."""
    return decode_isa() is not None


def int8_dots(q, k):
    """True where attention over this 8-bit K takes its products in 8 bits (_attention_decode):
    a decode (at most f32.DECODE_MAX_Q queries; more than 8 query rows a KV head go one query
    at a time), at most 8 query heads a KV head, head sizes a multiple of 32, and
    decode_products()."""
    q_len, H, d = q.shape[-3:]
    return (q_len <= f32.DECODE_MAX_Q and H // k.shape[-2] <= 8 and d % 32 == 0
            and decode_products())


def _widened(x):
    # an Int8KV's float32 values, (..., n, Hkv, d)
    out = np.empty(x.codes.shape, np.float32)
    n, hkv, d = x.codes.shape[-3:]
    dequantize(out.reshape(-1, hkv, d), x.codes.reshape(-1, hkv, d), x.scales.reshape(-1, hkv))
    return out


def _decode(isa, out, q, kc, ks, vc, vs, scale, causal):
    # at most 8 query rows a KV head; on the calling thread when the work is small
    B, q_len, H, d = q.shape
    work = B * q_len * H * kc.shape[1] * d         # multiply-adds of q k^T
    if work < cpu_pool.PARALLEL_MIN_WORK:
        _attention_decode_serial(isa, out, q, kc, ks, vc, vs, scale, causal)
    else:
        _attention_decode(isa, out, q, kc, ks, vc, vs, scale, causal, get_num_threads())


def attention(out, q, k, v, scale, causal):
    # q, out: (b, q_len, H, d) float32; k, v: formats.Int8KV of (b, kv_len, Hkv, d)
    if not int8_dots(q, k):
        f32.attention(out, q, _widened(k), _widened(v), scale, causal)
        return
    isa = decode_isa()
    q_len, H = q.shape[1], q.shape[2]
    kc, ks, vc, vs = k.codes, k.scales, v.codes, v.scales
    if q_len * (H // kc.shape[2]) <= 8:
        _decode(isa, out, q, kc, ks, vc, vs, scale, causal)
        return
    # a few queries of more than 8 rows a KV head: one at a time, each over the keys it sees
    kv_len = kc.shape[1]
    for i in range(q_len):
        n = kv_len - q_len + i + 1 if causal else kv_len
        qi = np.ascontiguousarray(q[:, i:i + 1])
        oi = np.empty_like(qi)
        _decode(isa, oi, qi, *(np.ascontiguousarray(a[:, :n]) for a in (kc, ks, vc, vs)),
                scale, causal)
        out[:, i:i + 1] = oi


@njit(cache=True)
def decode_layer(out, q, k_new, v_new, layer, pos, scale, n_threads, kc, ks, vc, vs, isa,
                 serial, part, launch, causal):
    # attention_cpu.decode_layer over an 8-bit cache: k_new, v_new (Hkv, d) float32 quantized
    # into position pos of the layer's codes (layers, max_seq, Hkv, d) and scales (layers,
    # max_seq, Hkv); serial, part, launch: the addresses of _attention_decode_serial,
    # _decode_part and the pool's launch of it (both 0 until a context needs them)
    for h in range(kc.shape[2]):
        ks[layer, pos, h] = quantize_kv_row(kc[layer, pos, h], k_new[h])
        vs[layer, pos, h] = quantize_kv_row(vc[layer, pos, h], v_new[h])
    n = pos + 1
    a, b, c, e = kc[layer, :n], ks[layer, :n], vc[layer, :n], vs[layer, :n]
    a, b = a.reshape((1,) + a.shape), b.reshape((1,) + b.shape)
    c, e = c.reshape((1,) + c.shape), e.reshape((1,) + e.shape)
    if launch and n_threads > 1 and q.shape[2] * n * q.shape[3] >= cpu_pool.PARALLEL_MIN_WORK:
        n_split, split_len, _, O_part, M_part, L_part = _decode_mk_plan(q, a, n_threads)
        call_at(launch, (part, n_threads, (isa, q, a, b, c, e, scale, causal, n_split,
                                           split_len, O_part, M_part, L_part)))
        _decode_mk_merge(out, O_part, M_part, L_part, n_split)
    else:
        call_at(serial, (isa, out, q, a, b, c, e, scale, causal))


def decode_layer_args(out, q, k_new, v_new, k_cache, v_cache, scale, parallel=False):
    """attention_cpu.decode_layer_args for an 8-bit cache (formats.Int8KV of (layers, max_seq,
    Hkv, d)), or None where its decode does not take its products in 8 bits."""
    if not int8_dots(q, k_cache):
        return None
    isa = decode_isa()
    kc, ks, vc, vs = k_cache.codes, k_cache.scales, v_cache.codes, v_cache.scales
    a, b, c, e = kc[0, :1][None], ks[0, :1][None], vc[0, :1][None], vs[0, :1][None]
    scale, causal = float(scale), True
    serial = cpu_pool.address(_attention_decode_serial, isa, out, q, a, b, c, e, scale, causal,
                              parts=False)
    part = launch = 0
    if parallel:
        tasks = (isa, q, a, b, c, e, scale, causal, *f32._DECODE_PLAN)
        part = cpu_pool.address(_decode_part, *tasks)
        launch = cpu_pool.address(cpu_pool._launch, part, 2, tasks, parts=False)
    kv = (kc, ks, vc, vs, isa, serial, part, launch, causal)
    return cpu_pool.address(decode_layer, out, q, k_new, v_new, 0, 0, scale, 1, *kv,
                            parts=False), kv
