"""AMX-BF16 building blocks of the CPU prefill attention over a bfloat16 KV cache
(attention_cpu._amx_tile puts them together).

The tile keeps the scores transposed, S^T (keys, query rows), as the float32 micro-kernel does,
and so its output, O^T (head dims, query rows): both products take the cache's bfloat16 rows
as their A tiles as they are (K's rows for S^T = K Q^T; V's, transposed once per head, for
O^T = V^T P^T), and the B tiles are pairs of float32 rows packed side by side (Q^T's rows of
head dims, P^T's rows of keys). A float32 is carried as a sum of bfloat16s, its rounding and
then what each rounding left: q in three terms (within 2^-27 of it: a score's error stays
float32's even for large scores), the probabilities in two (within 2^-18), and every term is
multiplied. K and V are bfloat16 already, so every product is exact and S and O keep
float32's precision, at three and two times the tile products (cheap beside the softmax's
vector work).

Tiles: 0-3 accumulators (16 x 16 float32), 4-5 A (16 rows x 32 bfloat16), 6-7 B (16 pairs of
rows x 16 columns)."""
import math

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_cpu import F32 as _F32, I32 as _I32, I64 as _I64, fma, tile_dpbf16ps, tile_load, \
    tile_store, tile_zero, vround_bf16

LOG2E = 1 / math.log(2)   # scores come in log2 units (q scaled by it): softmax_pack takes 2^x
_VI = ir.VectorType(_I32, 16)
_VF = ir.VectorType(_F32, 16)
# 2^f on [-1/2, 1/2], a least-squares fit for relative error (1e-7 evaluated in float32)
_EXP2 = (1.0, 0.6931471824645996, 0.24022646248340607, 0.05550329014658928,
         0.009618519805371761, 0.001339986571110785, 0.00015337580407503992)


def _c(v):
    return ir.Constant(_I64, v)


def _splat(v):
    return ir.Constant(_VI, [v] * 16)


def _fsplat(v):
    return ir.Constant(_VF, [v] * 16)


def _exp2(builder, x):
    # 2^x for x <= 0 (up to -inf): 2^f (f = x - n, n = x rounded) scaled by 2^n (vscalefps);
    # 0 below 2^-100, so that neither a power nor what its bfloat16 leaves is ever subnormal
    # (each subnormal result costs a microcode assist, a hundred cycles)
    mod = builder.module
    vmax = cgutils.get_or_insert_function(mod, ir.FunctionType(_VF, [_VF, _VF]),
                                          "llvm.maxnum.v16f32")
    rint = cgutils.get_or_insert_function(mod, ir.FunctionType(_VF, [_VF]),
                                          "llvm.nearbyint.v16f32")
    scalef = cgutils.get_or_insert_function(
        mod, ir.FunctionType(_VF, [_VF, _VF, _VF, ir.IntType(16), _I32]),
        "llvm.x86.avx512.mask.scalef.ps.512")
    vfma = fma(builder, _VF)
    xc = builder.call(vmax, [x, _fsplat(-100.0)])
    n = builder.call(rint, [xc])
    f = builder.fsub(xc, n)
    p = _fsplat(_EXP2[-1])
    for c in _EXP2[-2::-1]:
        p = builder.call(vfma, [p, f, _fsplat(c)])
    e = builder.call(scalef, [p, n, _fsplat(0.0), ir.Constant(ir.IntType(16), -1),
                              ir.Constant(_I32, 4)])
    return builder.select(builder.fcmp_ordered(">", x, _fsplat(-100.0)), e, _fsplat(0.0))


def _pair_words(builder, a, b, terms=2):
    # two rows of 16 float32s (<16 x i32> bits) -> B-tile words, a's in the low halves: the
    # pairs rounded to bfloat16, then what that left, likewise, `terms` times (hi + lo is
    # within 2^-18 of the float; three terms within 2^-27)
    words, rest = [], [a, b]
    for t in range(terms):
        parts = [vround_bf16(builder, x) for x in rest]
        words.append(builder.or_(builder.lshr(parts[0], _splat(16)), parts[1]))
        if t + 1 < terms:
            rest = [builder.bitcast(builder.fsub(builder.bitcast(x, _VF),
                                                 builder.bitcast(p, _VF)), _VI)
                    for x, p in zip(rest, parts)]
    return words


@intrinsic
def pack_pairs(typingctx, dst, term_off, src, ld, n_pairs, n_rows, n_groups, group_stride):
    """B tiles of three terms from a float32 matrix (rows at src, 4 ld bytes apart): for column
    group g < n_groups (16 columns from 16 g) and pair j < n_pairs, the 16 words at dst + g
    group_stride + 64 j are rows 2j (low half) and 2j + 1 (high half) rounded to bfloat16; at
    + term_off the same of what the rounding left, at + 2 term_off of what that left. Rows from
    n_rows on count as zeros (they are not read)."""
    sig = types.void(dst, term_off, src, ld, n_pairs, n_rows, n_groups, group_stride)

    def codegen(context, builder, signature, args):
        dst, term_off, src, ld, n_pairs, n_rows, n_groups, gs = [
            context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args)]
        vp = ir.PointerType(_VI)
        zero = ir.Constant(_VI, [0] * 16)
        row_bytes = builder.mul(ld, _c(4))
        with cgutils.for_range(builder, n_groups) as grp:
            g = grp.index
            col = builder.add(src, builder.mul(g, _c(64)))
            out = builder.add(dst, builder.mul(g, gs))
            with cgutils.for_range(builder, n_pairs) as pairs:
                j = pairs.index
                halves = []
                for h in range(2):
                    r = builder.add(builder.mul(j, _c(2)), _c(h))
                    slot = cgutils.alloca_once_value(builder, zero)
                    with builder.if_then(builder.icmp_signed("<", r, n_rows)):
                        a = builder.add(col, builder.mul(r, row_bytes))
                        builder.store(builder.load(builder.inttoptr(a, vp), align=4), slot)
                    halves.append(builder.load(slot))
                at = builder.add(out, builder.mul(j, _c(64)))
                for t, word in enumerate(_pair_words(builder, *halves, terms=3)):
                    builder.store(word, builder.inttoptr(
                        builder.add(at, builder.mul(term_off, _c(t))), vp), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def scores(typingctx, st, ld, kh, d, qb, term_off, ksteps):
    """S^T for 32 keys by 32 query rows: the four 16 x 16 float32 tiles (keys 16 a.., rows
    16 h..) stored at st (rows 4 ld bytes apart). K: 32 bfloat16 rows at kh, 2 d bytes apart;
    Q^T: pack_pairs' three-term B tiles of the rows' head dims, rows 16 h.. at qb + 1024
    ksteps h, step s (32 dims) 1024 s further, term t t term_off bytes on."""
    sig = types.void(st, ld, kh, d, qb, term_off, ksteps)

    def codegen(context, builder, signature, args):
        st, ld, kh, d, qb, term_off, ks = [context.cast(builder, v, t, types.int64)
                                           for v, t in zip(args, signature.args)]
        krow = builder.mul(d, _c(2))
        for t in range(4):
            tile_zero(builder, t)
        with cgutils.for_range(builder, ks) as step:
            s = step.index
            a = builder.add(kh, builder.mul(s, _c(64)))
            tile_load(builder, 4, a, krow)
            tile_load(builder, 5, builder.add(a, builder.mul(krow, _c(16))), krow)
            for h in range(2):
                b = builder.add(qb, builder.mul(builder.add(builder.mul(ks, _c(h)), s),
                                                _c(1024)))
                for term, b_t in ((0, 6), (1, 7), (2, 6)):     # hi, mid, lo
                    tile_load(builder, b_t, builder.add(b, builder.mul(term_off, _c(term))),
                              _c(64))
                    for a_t in (4, 5):          # two accumulators in flight
                        tile_dpbf16ps(builder, 2 * (a_t - 4) + h, a_t, b_t)
        row_bytes = builder.mul(ld, _c(4))
        for a_t in range(2):
            for h in range(2):
                at = builder.add(st, builder.add(builder.mul(row_bytes, _c(16 * a_t)), _c(64 * h)))
                tile_store(builder, 2 * a_t + h, at, row_bytes)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def values(typingctx, ot, tile_stride, n_tiles, alpha, vt, pb, lo_off, usteps):
    """O^T = O^T alpha + V^T P^T for one group of 16 query rows: n_tiles (even) accumulator
    tiles of 16 head dims, tile t at ot + t tile_stride (1 KB, rows 64 bytes apart), each
    column scaled by its alpha (16 floats at alpha), then over usteps steps of 32 keys: V^T's
    bfloat16 tiles (16 head dims x 32 keys, 1 KB each, tile t of step u at vt + 1024 (u
    n_tiles + t)) times P^T's, pack_pairs' B tiles of key pairs (step u at pb + 1024 u, the lo
    tiles lo_off bytes on). Each tile's hi and lo products are interleaved with its
    neighbour's, so two accumulators are in flight."""
    sig = types.void(ot, tile_stride, n_tiles, alpha, vt, pb, lo_off, usteps)

    def codegen(context, builder, signature, args):
        ot, ts, nt, alpha, vt, pb, lo_off, us = [context.cast(builder, v, t, types.int64)
                                                 for v, t in zip(args, signature.args)]
        vfp = ir.PointerType(_VF)
        al = builder.load(builder.inttoptr(alpha, vfp), align=4)
        n_groups = builder.udiv(builder.add(nt, _c(3)), _c(4))
        with cgutils.for_range(builder, n_groups) as grp:
            t0 = builder.mul(grp.index, _c(4))
            full = builder.icmp_signed("<=", builder.add(t0, _c(4)), nt)   # else 2 tiles

            def tile_at(i):
                return builder.add(ot, builder.mul(builder.add(t0, _c(i)), ts))

            def rescale_load(i):
                for r in range(16):
                    p = builder.inttoptr(builder.add(tile_at(i), _c(64 * r)), vfp)
                    builder.store(builder.fmul(builder.load(p, align=4), al), p, align=4)
                tile_load(builder, i, tile_at(i), _c(64))

            def pair(lo_tiles, fn):
                # tiles i, i + 1 (the second pair only when there are 4)
                if lo_tiles:
                    with builder.if_then(full):
                        fn(2)
                else:
                    fn(0)
            for half in (False, True):
                pair(half, lambda i: (rescale_load(i), rescale_load(i + 1)))
            with cgutils.for_range(builder, us) as step:
                b = builder.add(pb, builder.mul(step.index, _c(1024)))
                tile_load(builder, 6, b, _c(64))
                tile_load(builder, 7, builder.add(b, lo_off), _c(64))
                a0 = builder.add(vt, builder.mul(builder.mul(step.index, nt), _c(1024)))

                def products(i):
                    for j in (i, i + 1):
                        tile_load(builder, 4 + j % 2, builder.add(
                            a0, builder.mul(builder.add(t0, _c(j)), _c(1024))), _c(64))
                    for b_t in (6, 7):
                        for j in (i, i + 1):
                            tile_dpbf16ps(builder, j, 4 + j % 2, b_t)
                for half in (False, True):
                    pair(half, products)
            for half in (False, True):
                pair(half, lambda i: (tile_store(builder, i, tile_at(i), _c(64)),
                                      tile_store(builder, i + 1, tile_at(i + 1), _c(64))))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def softmax_pack(typingctx, st, ld, nk, m_run, l_run, alpha, n_vis, diag, pb, lo_off, n_pairs):
    """The online softmax step of one key block for 16 query rows, scores in log2 units: S^T[j,
    :16] (16 floats at st + 4 j ld) for j < nk; diag: keys j >= n_vis[r] (16 int32) count as
    -inf. The rows' block max m, alpha = 2^(m_run - m), l_run = l_run alpha + sum_j 2^(S - m),
    m_run = m (m taken as 0 in the powers while it is -inf: nothing seen yet); and P^T = 2^(S -
    m) packed straight into B tiles as pack_pairs does (pair j at pb + 64 j, the lo words
    lo_off bytes on; keys from nk to 2 n_pairs zeros). st, m_run, l_run, alpha, n_vis, pb
    are byte addresses."""
    sig = types.void(st, ld, nk, m_run, l_run, alpha, n_vis, diag, pb, lo_off, n_pairs)

    def codegen(context, builder, signature, args):
        st, ld, nk, m_run, l_run, alpha, n_vis = [
            context.cast(builder, v, t, types.int64) for v, t in zip(args[:7], signature.args[:7])]
        diag = context.cast(builder, args[7], signature.args[7], types.boolean)
        pb, lo_off, n_pairs = [context.cast(builder, v, t, types.int64)
                               for v, t in zip(args[8:], signature.args[8:])]
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VF]),
                                              "llvm.maxnum.v16f32")
        vfp, vip = ir.PointerType(_VF), ir.PointerType(_VI)
        ninf = _fsplat(-math.inf)
        row_bytes = builder.mul(ld, _c(4))
        nv = builder.load(builder.inttoptr(n_vis, vip), align=4)

        def score(j, masked):
            # S^T[j]; masked: -inf where the causal mask hides the key
            s = builder.load(builder.inttoptr(builder.add(st, builder.mul(j, row_bytes)), vfp),
                             align=4)
            if not masked:
                return s
            jv = builder.shuffle_vector(builder.insert_element(
                ir.Constant(_VI, ir.Undefined), builder.trunc(j, _I32), ir.Constant(_I32, 0)),
                ir.Constant(_VI, ir.Undefined), ir.Constant(_VI, [0] * 16))
            return builder.select(builder.icmp_signed("<", jv, nv), s, ninf)

        m0 = builder.load(builder.inttoptr(m_run, vfp), align=4)
        mslot = cgutils.alloca_once_value(builder, m0)
        lslot = cgutils.alloca_once_value(builder, _fsplat(0.0))

        def max_loop(masked):
            with cgutils.for_range(builder, nk) as loop:
                builder.store(builder.call(vmax, [score(loop.index, masked),
                                                  builder.load(mslot)]), mslot)

        def store_pair(jp, e):
            at = builder.add(pb, builder.mul(jp, _c(64)))
            for word, off in zip(_pair_words(builder, *[builder.bitcast(x, _VI) for x in e]),
                                 (_c(0), lo_off)):
                builder.store(word, builder.inttoptr(builder.add(at, off), vip), align=4)

        def power(j, masked, msafe):
            e = _exp2(builder, builder.fsub(score(j, masked), msafe))
            builder.store(builder.fadd(builder.load(lslot), e), lslot)
            return e

        def pair_loop(masked, msafe):
            # the pairs of keys both below nk
            with cgutils.for_range(builder, builder.udiv(nk, _c(2))) as pairs:
                j = builder.mul(pairs.index, _c(2))
                store_pair(pairs.index, [power(builder.add(j, _c(h)), masked, msafe)
                                         for h in range(2)])

        with builder.if_else(diag) as (then, otherwise):     # the mask's loops apart
            with then:
                max_loop(True)
            with otherwise:
                max_loop(False)
        m = builder.load(mslot)
        msafe = builder.select(builder.fcmp_ordered("==", m, ninf), _fsplat(0.0), m)
        al = _exp2(builder, builder.fsub(m0, msafe))
        builder.store(m, builder.inttoptr(m_run, vfp), align=4)
        builder.store(al, builder.inttoptr(alpha, vfp), align=4)
        with builder.if_else(diag) as (then, otherwise):
            with then:
                pair_loop(True, msafe)
            with otherwise:
                pair_loop(False, msafe)
        # the rest up to n_pairs: an odd last key, then zeros
        with cgutils.for_range(builder, builder.sub(n_pairs, builder.udiv(nk, _c(2)))) as rest:
            jp = builder.add(builder.udiv(nk, _c(2)), rest.index)
            slot = cgutils.alloca_once_value(builder, _fsplat(0.0))
            j = builder.mul(jp, _c(2))
            with builder.if_then(builder.icmp_signed("<", j, nk)):
                builder.store(power(j, True, msafe), slot)
            store_pair(jp, [builder.load(slot), _fsplat(0.0)])
        lp = builder.inttoptr(l_run, vfp)
        builder.store(builder.call(fma(builder, _VF), [builder.load(lp, align=4), al,
                                                       builder.load(lslot)]), lp, align=4)
        return context.get_dummy_value()
    return sig, codegen
