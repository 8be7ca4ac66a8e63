"""Fused causal attention with grouped-query heads on the CPU, flash-style: an online softmax
over blocks of keys, so neither the score matrix nor a mask is ever materialised.
Twin: attention_cuda.py.

Two schedules, same arithmetic:
- prefill (many queries): a task is a (batch, KV head) pair (split into interleaved query blocks
  only when there are too few of them for the cores): its K and V are packed once into
  contiguous rows, then each tile of query rows (positions x the query heads sharing the KV head)
  runs against every key block it may see. The tile keeps the scores transposed, S^T (keys,
  rows), so the online softmax is vectorised across query rows with no horizontal reductions, and
  both products run in a register-blocked AVX-512 micro-kernel of our own (explicit <16 x float>
  LLVM IR; about 140-160 GFLOP/s on one core, against 90-110 for BLAS np.dot on these small
  blocks). Head sizes that are not a multiple of 32 take the older BLAS tile (np.dot). Over a
  bfloat16 KV cache, on a CPU with AMX-BF16, the same tiles run on AMX tiles instead
  (attention_amx_cpu: the cache's rows are the A tiles, q and the probabilities are carried
  as sums of bfloat16s, so the products stay float32-exact; 1.7-1.8x the micro-kernel at
  TinyLlama's prefill-512, with the softmax now half the time).
- decode (a few queries): a task is a range of keys for every head at once, so K and V are
  streamed from memory once, in address order; the ranges' partial results are merged at the
  end (flash-decoding). Within a block of keys each KV head's query heads form one tile (8
  rows at 32/4 heads), scored and accumulated by the same micro-kernels (the scores of a tile
  of at most 8 rows two head dimensions at a time, filling a zmm's 16 lanes), and the next
  block is prefetched meanwhile. Over a bfloat16 KV cache, tiles of at most 8 rows, on a CPU
  with AVX-512 BF16, the same schedule takes its products with vdpbf16ps straight from the
  cache's bits (bf16_dots: q and the probabilities rounded to bfloat16 for the products, as
  llama.cpp rounds q to its K type; twice float32's multiply rate: TinyLlama's heads at 2000
  keys 60-63 against 85-87 us on 2 Zen 5 threads). Head sizes that are not a multiple of 32
  take the older loop-based schedule.

K and V may be float32, float16 or bfloat16 (a 16-bit KV cache: half the bytes to stream);
16-bit keys and values are widened to float32 exactly as they are read (prefill: while packing;
decode: keys a block of one head's rows at a time, into L1, values in registers as P V loads
them), and all arithmetic is float32 (or, on AMX tiles, float32-exact products of bfloat16
terms, summed in float32), except decode's bfloat16 products above."""
import ctypes
import functools
import glob
import os

import ml_dtypes
import numpy as np
from llvmlite import ir
from numba import float32, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..formats import Int8KV
from . import cpu_pool
from .linear_bf16_cpu import round_bf16, to_float32
from . import attention_amx_cpu as amx
from .linear_bf16_cpu import _AMX_CFG
from .llvm_cpu import F32 as _F32, HOST_CPU, I32 as _I32, I64 as _I64, amx_path, dpbf16ps, \
    fast_path, ACC16, fma, prefetch, row_passes, store_transposed16, tile_config, tile_release, \
    vexp, vround_bf16, widen16
from .scalar import FASTMATH_INF, dots_4x1, dots_4x2, exp_f32, row_max
from .cpu_pool import PRANGE, call_at, call_part

BLOCK_ROWS = 64        # prefill, BLAS tile (odd head sizes): query rows per tile
BLOCK_K = 64           # keys per block of the online softmax
TILE_ROWS = 128        # prefill, micro-kernel tile: query rows (positions x grouped heads)
AMX_BLOCK_K = 128      # keys per block of the online softmax with AMX tiles
NEG_INF = float32(-np.inf)
DECODE_MAX_Q = 4       # at most this many queries take the decode schedule
MIN_SPLIT_KEYS = 256   # decode: a key range is never shorter than this
# decode: the K/V rows this many keys ahead are prefetched into L1 (prefetcht0) in address order,
# whole rows (every KV head's elements), spread evenly over each head's scores. TinyLlama's 32/4
# heads at 2000 keys, 2 Zen 5 threads, each layer's K/V behind 40 MB of other reads as in a model
# (bench/tune_decode_attention.py): bfloat16 71-73 us against 79 for each head's own pieces of
# the rows 128 keys ahead (strided), 105 with none; float16 94 against 103-105 and 133-137;
# float32 123-124 against 138 and 151-153; 32 or 128 keys ahead were slower
PREFETCH_KEYS = 64
# ... into L2 instead on Zen 4 (prefetcht1), where into L1 was no better than no prefetch: the
# same cold calls 210 against 401 us (float32 K/V), 132 against 215 (bfloat16); in a model
# (TinyLlama at 1800 keys, the two in turn step by step) 176 against 231 us a layer (bfloat16),
# 228 against 376 (float32). Into L2 was slower on Zen 5 (102-111 against 81 us, int8) and
# alike on Zen 3. (int8 K/V: attention_int8_cpu, into L1 everywhere)
DECODE_KV_LOCALITY = 2 if HOST_CPU == "znver4" else 3
# K and V storage, passed to the kernels as `kind`: an empty array whose dtype names it while
# numba types a kernel, so only the cache's own variant compiles (the kernels take 16-bit K and
# V as their uint16 bits; a uint16 array is bfloat16 bits, as attention_cuda takes them)
KV_F32 = np.empty(0, np.float32)
KV_BF16 = np.empty(0, np.uint16)
KV_F16 = np.empty(0, np.int16)             # int16: float16's marker, to tell it from bfloat16
KV_KINDS = {np.dtype(np.float32): KV_F32, np.dtype(ml_dtypes.bfloat16): KV_BF16,
            np.dtype(np.uint16): KV_BF16, np.dtype(np.float16): KV_F16}


def _kv_bytes(kind):
    """Bytes of an element of K and V: 4 or 2, a constant of the compiled kernel."""


@overload(_kv_bytes)
def _kv_bytes_impl(kind):
    n = 4 if kind.dtype == types.float32 else 2
    return lambda kind: n


def _half(kind):
    """True for a float16 K and V (else float32 or bfloat16), a constant of the kernel."""


@overload(_half)
def _half_impl(kind):
    half = kind.dtype == types.int16
    return lambda kind: half


def _single_threaded_jit_blas():
    """np.dot inside jitted code calls SciPy's OpenBLAS. Our tasks already run on every core, so
    that BLAS must not start threads of its own (they would oversubscribe the cores several
    times over). SciPy's OpenBLAS is a library separate from NumPy's: NumPy keeps its threads."""
    import scipy
    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs", "libscipy_openblas*.so"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                break


_single_threaded_jit_blas()


# -- reading K and V of any kind as float32 -------------------------------------------------

def _f32(x, kind):
    """An element of K or V as float32: a float as it is; 16-bit bits by kind."""


@overload(_f32)
def _f32_impl(x, kind):
    if isinstance(x, types.Float):
        return lambda x, kind: float32(x)
    return lambda x, kind: to_float32(x, _half(kind))


def _kv_block(k, z, k0, nk, buf, kind):
    """Rows k0..k0+nk-1 of batch z, (nk, Hkv, d) float32: a view of float32 k, or 16-bit k
    widened into buf (>= nk rows)."""


@overload(_kv_block)
def _kv_block_impl(k, z, k0, nk, buf, kind):
    if isinstance(k.dtype, types.Float):
        return lambda k, z, k0, nk, buf, kind: k[z, k0:k0 + nk]

    def widened(k, z, k0, nk, buf, kind):
        for j in range(nk):
            for h in range(k.shape[2]):
                for c in range(k.shape[3]):
                    buf[j, h, c] = to_float32(k[z, k0 + j, h, c], _half(kind))
        return buf[:nk]
    return widened


@intrinsic
def _widen_rows(typingctx, dst, src, n_rows, stride, d, half):
    """dst[j, :d] = the 16-bit floats (float16 when half, else bfloat16) at src[j * stride:][:d],
    widened to float32, for j < n_rows: dst rows d floats apart, src rows stride elements
    apart (byte addresses dst, src); d a multiple of 16."""
    sig = types.void(dst, src, n_rows, stride, d, half)

    def codegen(context, builder, signature, args):
        dst, src, n, stride, d = [context.cast(builder, v, t, types.int64)
                                  for v, t in zip(args[:5], signature.args[:5])]
        vh, vf = ir.VectorType(ir.IntType(16), 16), ir.VectorType(_F32, 16)
        sp = builder.inttoptr(src, ir.PointerType(ir.IntType(16)))
        dp = builder.inttoptr(dst, ir.PointerType(_F32))
        n_vec = builder.ashr(d, ir.Constant(_I64, 4))
        flag = context.cast(builder, args[5], signature.args[5], types.boolean)
        for half in (False, True):      # the flag is known at run time only: both loops
            with builder.if_then(flag if half else builder.not_(flag)):
                with cgutils.for_range(builder, n) as rws:
                    s_row, d_row = builder.mul(rws.index, stride), builder.mul(rws.index, d)
                    with cgutils.for_range(builder, n_vec) as vec:
                        c = builder.shl(vec.index, ir.Constant(_I64, 4))
                        h = builder.load(builder.bitcast(
                            builder.gep(sp, [builder.add(s_row, c)]), ir.PointerType(vh)),
                            align=2)
                        builder.store(widen16(builder, h, half), builder.bitcast(
                            builder.gep(dp, [builder.add(d_row, c)]), ir.PointerType(vf)),
                            align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _online_softmax_block(S, P, m_run, l_run, alpha, rows, nk, n_vis):
    # S, P: (rows, nk) scores / probabilities; m_run, l_run, alpha: (rows,) running max, running
    # sum, and this block's rescale factor. n_vis[r]: keys of the block row r sees (a prefix).
    for r in range(rows):
        m_new = row_max(S, r, n_vis[r], m_run[r])
        if m_new == -np.inf:  # nothing seen yet
            alpha[r] = float32(1)
            for j in range(nk):
                P[r, j] = float32(0)
            continue
        total = float32(0)
        for j in range(n_vis[r]):
            p = exp_f32(S[r, j] - m_new)
            P[r, j] = p
            total += p
        for j in range(n_vis[r], nk):
            P[r, j] = float32(0)
        alpha[r] = exp_f32(m_run[r] - m_new)
        l_run[r] = l_run[r] * alpha[r] + total
        m_run[r] = m_new


@njit(fastmath=FASTMATH_INF, cache=True)
def _prefill_tile(out, q, k, v, scale, causal, kind, z, hk, q0, nq, Qs, O, Ks, Vs, St, Pt,
                  PVt, m_run, l_run, alpha, n_vis):
    # one tile: queries q0..q0+nq-1 of the G heads sharing KV head hk, against every key they
    # see. Qs, O: (rows, d); Ks, Vs: (BLOCK_K, d); St, Pt: (rows * BLOCK_K,); PVt: (rows * d,)
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = nq * G                                  # row r = (position q0 + r // G, head r % G)
    for r in range(rows):
        for c in range(d):
            Qs[r, c] = q[z, q0 + r // G, hk * G + r % G, c] * scale
            O[r, c] = float32(0)
        m_run[r] = -np.inf
        l_run[r] = float32(0)

    # keys up to the last one the tile's last query sees
    k_end = min(kv_len, max(0, kv_len - q_len + q0 + nq)) if causal else kv_len
    for k0 in range(0, k_end, BLOCK_K):
        nk = min(BLOCK_K, k_end - k0)
        # causal: the tile's rows before r0 see none of these keys; they are skipped (their
        # running max, sum and output are untouched), so a tall tile wastes no work
        r0 = min(rows, max(0, (k0 - (kv_len - q_len) - q0) * G)) if causal else 0
        nr = rows - r0
        S = St[:nr * nk].reshape((nr, nk))
        P = Pt[:nr * nk].reshape((nr, nk))
        PV = PVt[:nr * d].reshape((nr, d))
        for j in range(nk):
            for c in range(d):
                Ks[j, c] = _f32(k[z, k0 + j, hk, c], kind)
                Vs[j, c] = _f32(v[z, k0 + j, hk, c], kind)
        for r in range(nr):
            n_vis[r] = min(nk, max(0, kv_len - q_len + q0 + (r0 + r) // G + 1 - k0)) \
                if causal else nk
        np.dot(Qs[r0:], Ks[:nk].T, S)                             # (nr, nk)
        _online_softmax_block(S, P, m_run[r0:], l_run[r0:], alpha, nr, nk, n_vis)
        np.dot(P, Vs[:nk], PV)                                    # (nr, d)
        for r in range(nr):
            for c in range(d):
                O[r0 + r, c] = O[r0 + r, c] * alpha[r] + PV[r, c]

    for r in range(rows):
        inv = float32(1) / l_run[r] if l_run[r] > 0 else float32(0)
        for c in range(d):
            out[z, q0 + r // G, hk * G + r % G, c] = O[r, c] * inv


@njit(parallel=PRANGE, cache=True)
def _attention_prefill(out, q, k, v, scale, causal, kind, n_workers):
    # q, out: (b, q_len, H, d); k, v: (b, kv_len, Hkv, d)
    B, q_len, H, d = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    bq = max(1, BLOCK_ROWS // G)                  # query positions per tile
    n_qblk = (q_len + bq - 1) // bq
    rows = bq * G
    n_tasks = B * Hkv * n_qblk

    # per-worker scratch, allocated once per call
    Qt = np.empty((n_workers, rows, d), np.float32)
    Ot = np.empty((n_workers, rows, d), np.float32)
    Kt = np.empty((n_workers, BLOCK_K, d), np.float32)
    Vt = np.empty((n_workers, BLOCK_K, d), np.float32)
    St = np.empty((n_workers, rows * BLOCK_K), np.float32)
    Pt = np.empty((n_workers, rows * BLOCK_K), np.float32)
    PVt = np.empty((n_workers, rows * d), np.float32)
    Mt = np.empty((n_workers, rows), np.float32)
    Lt = np.empty((n_workers, rows), np.float32)
    At = np.empty((n_workers, rows), np.float32)
    Vis = np.empty((n_workers, rows), np.int64)

    # worker w takes tasks w, w + n_workers, ...: interleaved, so causal tiles of unequal cost
    # spread evenly, and each worker owns its scratch
    for w in prange(n_workers):
        for task in range(w, n_tasks, n_workers):
            qb = task % n_qblk
            hk = (task // n_qblk) % Hkv
            z = task // (n_qblk * Hkv)
            nq = min(bq, q_len - qb * bq)
            _prefill_tile(out, q, k, v, float32(scale), causal, kind, z, hk, qb * bq, nq,
                          Qt[w, :nq * G], Ot[w, :nq * G], Kt[w], Vt[w], St[w], Pt[w], PVt[w],
                          Mt[w, :nq * G], Lt[w, :nq * G], At[w, :nq * G], Vis[w, :nq * G])


# -- register-blocked micro-kernel: explicit 16-float vectors in LLVM IR ---------------------
# Numba's own loops vectorise to 256-bit registers here (LLVM prefers 256 bits on this CPU);
# explicit <16 x float> values are lowered to AVX-512 zmm registers (two ymm halves elsewhere).

_V16 = ir.VectorType(_F32, 16)
_VI32 = ir.VectorType(_I32, 16)


@functools.lru_cache(maxsize=None)
def _microkernel(R, NV, accumulate, b16=None):
    """An intrinsic mk(c, ldc, a, sa_i, sa_t, b, ldb, K, alpha): for i < R, the 16 NV floats at
    row i of C get sum_{t < K} A[i, t] * B[t, :], where c, a, b, alpha are byte addresses,
    C[i, :] is at c + 4 i ldc, A[i, t] at a + 4 (i sa_i + t sa_t), B[t, :] at b + 4 t ldb.
    accumulate: C[i, :] = C[i, :] * alpha[i] + sum (alpha: R floats), else C[i, :] = sum.
    The R x NV accumulators of 16 floats stay in registers over the whole loop (R NV <= 24
    of AVX-512's 32 zmm; where they do not fit, as on AVX2, in passes of rows: row_passes).
    b16 "f16" or "bf16": B holds 16-bit floats (B[t, :] at b + 2 t ldb), widened exactly in
    registers as they are loaded."""
    W = 16
    VT = ir.VectorType(_F32, W)
    VH = ir.VectorType(ir.IntType(16), W)
    eb = 4 if b16 is None else 2                  # bytes of an element of B

    @intrinsic
    def mk(typingctx, c, ldc, a, sa_i, sa_t, b, ldb, K, alpha):
        sig = types.void(c, ldc, a, sa_i, sa_t, b, ldb, K, alpha)

        def codegen(context, builder, signature, args):
            c, ldc, a, sa_i, sa_t, b, ldb, K, alpha = [
                context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args)]
            fp, vp = ir.PointerType(_F32), ir.PointerType(VT)
            cp, ap = builder.inttoptr(c, fp), builder.inttoptr(a, fp)
            alp = builder.inttoptr(alpha, fp)
            vfma = fma(builder, VT)
            undef = ir.Constant(VT, ir.Undefined)
            zeros = ir.Constant(ir.VectorType(_I32, W), [0] * W)

            def bcast(x):
                return builder.shuffle_vector(
                    builder.insert_element(undef, x, ir.Constant(_I32, 0)), undef, zeros)

            def vec_at(base, off):
                return builder.bitcast(builder.gep(base, [off]), vp)

            def c_off(i, n):
                return builder.add(builder.mul(ir.Constant(_I64, i), ldc), ir.Constant(_I64, W * n))

            for r0, r1 in row_passes(R, NV):     # rows whose accumulators fit the registers
                acc = {}     # allocas in the entry block: promoted to registers by LLVM
                for i in range(r0, r1):
                    row = []
                    if accumulate:
                        al = bcast(builder.load(builder.gep(alp, [ir.Constant(_I64, i)])))
                    for n in range(NV):
                        slot = cgutils.alloca_once(builder, VT)
                        if accumulate:
                            builder.store(builder.fmul(builder.load(vec_at(cp, c_off(i, n)),
                                                                    align=4), al), slot)
                        else:
                            builder.store(ir.Constant(VT, [0.0] * W), slot)
                        row.append(slot)
                    acc[i] = row
                with cgutils.for_range(builder, K) as loop:
                    t = loop.index
                    bt = builder.add(b, builder.mul(t, builder.mul(ldb, ir.Constant(_I64, eb))))
                    bv = [builder.load(builder.inttoptr(
                        builder.add(bt, ir.Constant(_I64, eb * W * n)),
                        ir.PointerType(VT if b16 is None else VH)), align=eb) for n in range(NV)]
                    if b16 is not None:
                        bv = [widen16(builder, v, b16 == "f16") for v in bv]
                    aoff = builder.mul(t, sa_t)
                    for i in range(r0, r1):
                        av = bcast(builder.load(builder.gep(
                            ap, [builder.add(aoff, builder.mul(ir.Constant(_I64, i), sa_i))])))
                        for n in range(NV):
                            builder.store(builder.call(vfma, [av, bv[n],
                                                              builder.load(acc[i][n])]),
                                          acc[i][n])
                for i in range(r0, r1):
                    for n in range(NV):
                        builder.store(builder.load(acc[i][n]), vec_at(cp, c_off(i, n)), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return mk


def _softmax_step(W):
    """An intrinsic softmax(st, ld, nk, m_run, l_run, alpha, n_vis, diag): the online softmax
    step of one key block for W query rows (W 16: zmm registers, 8: ymm), S^T[j, :W]
    (W floats at st + 4 j ld; st, m_run, l_run, alpha, n_vis are byte addresses) for j < nk;
    diag: keys j >= n_vis[r] (W int32) are set to -inf first. The rows' block max m, then
    P = exp(S - m) in place, alpha = exp(m_run - m), l_run = l_run alpha + sum_j P, m_run = m
    (m taken as 0 in the exps while it is -inf: nothing seen yet). exp: llvm_cpu.vexp.
    W = 8 takes S^T dense (ld = 8): its max and exp passes run over zmm vectors of two keys,
    with two of them in flight (the serial max and sum chains of one ymm a key ran the step
    at half the speed)."""
    VT, VIT = ir.VectorType(_F32, W), ir.VectorType(_I32, W)
    V2 = ir.VectorType(_F32, 2 * W)
    lo_hi = [ir.Constant(ir.VectorType(_I32, W), list(range(h * W, (h + 1) * W)))
             for h in (0, 1)]

    def vconst(x, vt=VT):
        return ir.Constant(vt, [float(np.float32(x))] * vt.count)

    @intrinsic
    def softmax(typingctx, st, ld, nk, m_run, l_run, alpha, n_vis, diag):
        sig = types.void(st, ld, nk, m_run, l_run, alpha, n_vis, diag)

        def codegen(context, builder, signature, args):
            st, ld, nk, m_run, l_run, alpha, n_vis = [
                context.cast(builder, v, t, types.int64)
                for v, t in zip(args[:7], signature.args[:7])]
            diag = context.cast(builder, args[7], signature.args[7], types.boolean)
            fp, vp, vip = ir.PointerType(_F32), ir.PointerType(VT), ir.PointerType(VIT)
            mod = builder.module

            def maxnum(vt):
                return cgutils.get_or_insert_function(mod, ir.FunctionType(vt, [vt, vt]),
                                                      f"llvm.maxnum.v{vt.count}f32")
            vmax, vmax2 = maxnum(VT), maxnum(V2)
            vfma = fma(builder, VT)
            sp = builder.inttoptr(st, fp)
            mptr = builder.inttoptr(m_run, vp)
            lptr = builder.inttoptr(l_run, vp)
            aptr = builder.inttoptr(alpha, vp)
            nvp = builder.inttoptr(n_vis, vip)
            ninf = vconst(-np.inf)

            def srow(j):
                return builder.bitcast(builder.gep(sp, [builder.mul(j, ld)]), vp)

            def spair(i, h):      # keys 4 i + 2 h and the next, dense (W = 8)
                j = builder.add(builder.mul(i, ir.Constant(_I64, 4)), ir.Constant(_I64, 2 * h))
                return builder.bitcast(builder.gep(sp, [builder.mul(j, ld)]),
                                       ir.PointerType(V2))

            def halves(v):
                return [builder.shuffle_vector(v, v, ix) for ix in lo_hi]

            m0 = builder.load(mptr, align=4)
            nv = builder.load(nvp, align=4)
            with builder.if_then(diag):
                with cgutils.for_range(builder, nk) as loop:
                    j = loop.index
                    undef = ir.Constant(VIT, ir.Undefined)
                    jv = builder.shuffle_vector(
                        builder.insert_element(undef, builder.trunc(j, _I32),
                                               ir.Constant(_I32, 0)),
                        undef, ir.Constant(VIT, [0] * W))
                    p = srow(j)
                    builder.store(builder.select(builder.icmp_signed("<", jv, nv),
                                                 builder.load(p, align=4), ninf), p, align=4)
            mslot = cgutils.alloca_once_value(builder, m0)
            n4 = builder.ashr(nk, ir.Constant(_I64, 2)) if W == 8 else ir.Constant(_I64, 0)
            tail = builder.mul(n4, ir.Constant(_I64, 4))
            if W == 8:
                m2 = [cgutils.alloca_once_value(builder, vconst(-np.inf, V2)) for _ in (0, 1)]
                with cgutils.for_range(builder, n4) as loop:
                    for h in (0, 1):
                        builder.store(builder.call(vmax2, [builder.load(m2[h]), builder.load(
                            spair(loop.index, h), align=4)]), m2[h])
                mm = builder.call(vmax2, [builder.load(m2[0]), builder.load(m2[1])])
                a, b = halves(mm)
                builder.store(builder.call(vmax, [builder.call(vmax, [a, b]), m0]), mslot)
            with cgutils.for_range_slice(builder, tail, nk, ir.Constant(_I64, 1)) as (j, _):
                builder.store(builder.call(vmax, [builder.load(srow(j), align=4),
                                                  builder.load(mslot)]), mslot)
            m = builder.load(mslot)
            msafe = builder.select(builder.fcmp_ordered("==", m, ninf), vconst(0.0), m)
            al = vexp(builder, builder.fsub(m0, msafe))
            builder.store(m, mptr, align=4)
            builder.store(al, aptr, align=4)
            lslot = cgutils.alloca_once_value(builder, vconst(0.0))
            if W == 8:
                msafe2 = builder.shuffle_vector(msafe, msafe, ir.Constant(
                    ir.VectorType(_I32, 2 * W), list(range(W)) * 2))
                l2 = [cgutils.alloca_once_value(builder, vconst(0.0, V2)) for _ in (0, 1)]
                with cgutils.for_range(builder, n4) as loop:
                    for h in (0, 1):
                        p = spair(loop.index, h)
                        e = vexp(builder, builder.fsub(builder.load(p, align=4), msafe2))
                        builder.store(e, p, align=4)
                        builder.store(builder.fadd(builder.load(l2[h]), e), l2[h])
                a, b = halves(builder.fadd(builder.load(l2[0]), builder.load(l2[1])))
                builder.store(builder.fadd(a, b), lslot)
            with cgutils.for_range_slice(builder, tail, nk, ir.Constant(_I64, 1)) as (j, _):
                p = srow(j)
                e = vexp(builder, builder.fsub(builder.load(p, align=4), msafe))
                builder.store(e, p, align=4)
                builder.store(builder.fadd(builder.load(lslot), e), lslot)
            builder.store(builder.call(vfma, [builder.load(lptr, align=4), al,
                                              builder.load(lslot)]), lptr, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return softmax


_softmax16, _softmax8 = _softmax_step(16), _softmax_step(8)


@intrinsic
def _prefetch_for_write(typingctx, addr, nbytes):
    """Prefetch the cache lines of nbytes at byte address addr, for writing (prefetchw)."""
    sig = types.void(addr, nbytes)

    def codegen(context, builder, signature, args):
        a = context.cast(builder, args[0], signature.args[0], types.int64)
        n = context.cast(builder, args[1], signature.args[1], types.int64)
        with cgutils.for_range(builder, builder.ashr(n, ir.Constant(_I64, 6))) as lines:
            prefetch(builder, builder.add(a, builder.mul(lines.index, ir.Constant(_I64, 64))), 1)
        return context.get_dummy_value()
    return sig, codegen


def make_prefetch_rows(locality):
    """An intrinsic prefetch_rows(addr, n_rows, stride, nbytes): prefetch for reading, at
    llvm_cpu.prefetch's locality (3: into L1 and every level, 2: into L2 and beyond), the first
    nbytes of n_rows rows stride bytes apart from byte address addr (a 64-byte line at a
    time)."""
    @intrinsic
    def prefetch_rows(typingctx, addr, n_rows, stride, nbytes):
        sig = types.void(addr, n_rows, stride, nbytes)

        def codegen(context, builder, signature, args):
            a, n, s, b = [context.cast(builder, v, t, types.int64)
                          for v, t in zip(args, signature.args)]
            with cgutils.for_range(builder, n) as rws:
                row = builder.add(a, builder.mul(rws.index, s))
                with cgutils.for_range(builder, builder.ashr(b, ir.Constant(_I64, 6))) as lines:
                    prefetch(builder, builder.add(row, builder.mul(lines.index,
                                                                   ir.Constant(_I64, 64))), 0,
                             locality)
            return context.get_dummy_value()
        return sig, codegen
    return prefetch_rows


_prefetch_rows = make_prefetch_rows(DECODE_KV_LOCALITY)


# rows of the prefill and P V micro-kernel calls (32 floats wide), largest first, then 1: 12, 8
# and 4 where AVX-512's registers hold 12 rows at once (24 accumulators, 12 x 32 ~5% faster
# here than 8 x 32; few variants: each costs compile time); elsewhere only the rows of one
# register pass (row_passes): a longer kernel would repeat that pass, compiled again for each
# (AVX2: 2 rows, the three sizes alike)
_R0, _R1, _R2 = (12, 8, 4) if ACC16 >= 24 else (max(1, ACC16 // 2),) * 3


@njit(inline="always")
def _mk_rows(m):
    # the rows of the next micro-kernel call with m rows left
    return _R0 if m >= _R0 else (_R1 if m >= _R1 else (_R2 if m >= _R2 else 1))


def _by_rows(accumulate, b16=None):
    """mk(n, c, ldc, a, sa_i, sa_t, b, ldb, K, alpha): n (a size of _mk_rows) rows of C (32
    floats wide) by _microkernel's kernel of n rows: C = A B, or accumulate: C = C * alpha[row]
    + A B; B in float32 or, b16, 16-bit floats widened as they are loaded."""
    mk_0, mk_1, mk_2, mk_r1 = (_microkernel(n, 2, accumulate, b16) for n in (_R0, _R1, _R2, 1))

    @njit(inline="always")
    def mk(n, c, ldc, a, sa_i, sa_t, b, ldb, K, alpha):
        if n == _R0:
            mk_0(c, ldc, a, sa_i, sa_t, b, ldb, K, alpha)
        elif n == _R1:
            mk_1(c, ldc, a, sa_i, sa_t, b, ldb, K, alpha)
        elif n == _R2:
            mk_2(c, ldc, a, sa_i, sa_t, b, ldb, K, alpha)
        else:
            mk_r1(c, ldc, a, sa_i, sa_t, b, ldb, K, alpha)
    return mk


_mk_set_rows = _by_rows(False)
_mk_acc, _mk_acc_f16, _mk_acc_bf16 = _by_rows(True), _by_rows(True, "f16"), _by_rows(True, "bf16")


@njit(inline="always")
def _mk_set(n, c, ldc, a, sa_i, sa_t, b, ldb, K):
    # rows 0..n-1 of C (32 floats wide) = A B, in micro-kernel calls of _mk_rows rows
    i = 0
    while i < n:
        g = _mk_rows(n - i)
        _mk_set_rows(g, c + 4 * i * ldc, ldc, a + 4 * i * sa_i, sa_i, sa_t, b, ldb, K, 0)
        i += g


@njit(fastmath=FASTMATH_INF, cache=True)
def _mk_tile(out, q, Kh, Vh, scale, causal, G, z, hk, q0, nq, Qf, O, Sf, m_run, l_run, alpha,
             n_vis):
    # one tile: queries q0..q0+nq-1 of the G heads sharing KV head hk, against every key they
    # see. Kh, Vh: (kv_len, d), this head's keys and values, packed. Row r of the tile: position
    # q0 + r // G, head hk * G + r % G; ld: the rows padded to 32. Scratch: Qf (d * ld,) for
    # Q^T, Sf (BLOCK_K * ld,) for the block's S^T then P^T, O (ld, d), the rest (ld,), n_vis
    # int32
    q_len, d = q.shape[1], q.shape[3]
    kv_len = Kh.shape[0]
    rows = nq * G
    ld = (rows + 31) // 32 * 32
    Qt = Qf[:d * ld].reshape((d, ld))
    St = Sf[:BLOCK_K * ld].reshape((BLOCK_K, ld))
    _pack_qt(Qt, O, q, scale, z, hk, G, q0, rows)
    for r in range(ld):
        orow = O[r]
        for c in range(d):
            orow[c] = float32(0)
        m_run[r] = NEG_INF
        l_run[r] = float32(0)

    kpos = kv_len - q_len + q0            # position of the tile's first query
    # keys up to the last one the tile's last query sees
    k_end = min(kv_len, max(0, kpos + nq)) if causal else kv_len
    qt_p, st_p, o_p = np.int64(Qt.ctypes.data), np.int64(St.ctypes.data), np.int64(O.ctypes.data)
    k_p, v_p, a_p = np.int64(Kh.ctypes.data), np.int64(Vh.ctypes.data), np.int64(alpha.ctypes.data)
    mr_p, lr_p, nv_p = (np.int64(m_run.ctypes.data), np.int64(l_run.ctypes.data),
                        np.int64(n_vis.ctypes.data))
    for k0 in range(0, k_end, BLOCK_K):
        nk = min(BLOCK_K, k_end - k0)
        r0, r0a, diag = _block_rows(n_vis, k0, nk, kpos, G, rows, ld, causal)
        # S^T[j, r] = K[k0 + j] . Qt[:, r], in column groups of 32 rows; causal: a group computes
        # only the keys its last row sees (the rest is masked below)
        for cg in range(r0a, ld, 32):
            _mk_set(n_vis[cg + 31], st_p + 4 * cg, ld, k_p + 4 * k0 * d, d, 1, qt_p + 4 * cg, ld,
                    d)
        # online softmax over the block, 16 rows at a time
        for r in range(r0a, ld, 16):
            _softmax16(st_p + 4 * r, ld, nk, mr_p + 4 * r, lr_p + 4 * r, a_p + 4 * r,
                       nv_p + 4 * r, diag)
        # O[r] = O[r] * alpha[r] + sum_j P^T[j, r] V[k0 + j], in groups of _mk_rows by 32 columns;
        # a group runs over the keys its last row sees (P is 0 past each row's own)
        i = r0
        while i < rows:
            g = _mk_rows(rows - i)
            klen = n_vis[i + g - 1]
            for c0 in range(0, d, 32):
                _mk_acc(g, o_p + 4 * (i * d + c0), d, st_p + 4 * i, 1, ld,
                        v_p + 4 * (k0 * d + c0), d, klen, a_p + 4 * i)
            i += g

    _store_rows(out, O, l_run, z, hk, G, q0, rows)


@njit(inline="always", cache=True)
def _block_rows(n_vis, k0, nk, kpos, G, rows, ld, causal):
    # a key block k0..k0+nk-1 against a tile (row r: position kpos + r // G). Causal: rows
    # before r0 see none of these keys; they are skipped from r0a (r0 rounded down to 32) on.
    # n_vis[r] (r >= r0a): the block's keys row r sees; diag: some row sees fewer than all
    r0 = min(rows, max(0, (k0 - kpos) * G)) if causal else 0
    r0a = r0 // 32 * 32
    diag = False
    for r in range(r0a, ld):
        n_vis[r] = min(nk, max(0, kpos + r // G + 1 - k0)) if causal and r < rows else nk
        diag = diag or n_vis[r] < nk
    return r0, r0a, diag


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _pack_qt(Qt, O, q, scale, z, hk, G, q0, rows):
    # Qt (d, ld) = (scale * the tile's query rows)^T, columns past rows zeros; O (ld, d) scratch.
    # Rows copied whole, then transposed in 16 x 16 blocks within L1 (4x faster than scattering
    # each row down a column of Qt)
    d, ld = Qt.shape
    for r in range(ld):
        orow = O[r]
        if r < rows:
            qr = q[z, q0 + r // G, hk * G + r % G]
            for c in range(d):
                orow[c] = qr[c] * scale
        else:
            for c in range(d):
                orow[c] = float32(0)
    for rb in range(0, ld, 16):
        for c in range(d):
            qt = Qt[c, rb:rb + 16]
            for i in range(16):
                qt[i] = O[rb + i, c]


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _store_rows(out, O, l_run, z, hk, G, q0, rows):
    # out's rows of the tile = O's rows / l_run. They are 4 KB pages or more apart, where the
    # hardware's prefetch stops: each is prefetched for writing 4 rows ahead (the call 2-3%
    # faster)
    q_len, H, d = out.shape[1], out.shape[2], out.shape[3]
    out_p = np.int64(out.ctypes.data)
    for r in range(rows):
        if r + 4 < rows:
            ra = r + 4
            _prefetch_for_write(out_p + 4 * ((z * q_len + q0 + ra // G) * H + hk * G + ra % G) * d,
                                4 * d)
        inv = float32(1) / l_run[r] if l_run[r] > 0 else float32(0)
        orow, src = out[z, q0 + r // G, hk * G + r % G], O[r]
        for c in range(d):
            orow[c] = src[c] * inv


@njit(cache=True)
def _prefill_plan(q, k, causal, n_workers):
    # The prefill schedule of q (b, q_len, H, d) over k (b, kv_len, Hkv, d): tiles of bq query
    # positions (x the G heads of a KV head; ld rows, padded to 32), n_qblk of them a head. A
    # task: query blocks qb = chunk, chunk + n_chunks, ... of one (batch, KV head), whose K and
    # V are packed once for all of them; a head is split only when there are too few heads to
    # keep every worker busy (interleaved, so the causal costs of the chunks even out).
    # owner[task]: its worker, a static schedule balanced by causal cost (longest first, each
    # to the least loaded worker; plain loops: np.argsort alone added 1.7 s to the first
    # compile)
    B, q_len, H = q.shape[0], q.shape[1], q.shape[2]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bq = max(1, TILE_ROWS // G)
    n_qblk = (q_len + bq - 1) // bq
    n_kv = B * Hkv
    n_chunks = min(n_qblk, max(1, (2 * n_workers + n_kv - 1) // n_kv))
    n_tasks = n_kv * n_chunks
    cost = np.zeros(n_tasks, np.int64)
    for task in range(n_tasks):
        for qb in range(task % n_chunks, n_qblk, n_chunks):
            nq = min(bq, q_len - qb * bq)
            k_end = min(kv_len, max(0, kv_len - q_len + qb * bq + nq)) if causal else kv_len
            cost[task] += (k_end + 16) * nq
    owner = np.full(n_tasks, -1, np.int64)
    load = np.zeros(n_workers, np.int64)
    for _ in range(n_tasks):
        best = -1
        for task in range(n_tasks):
            if owner[task] < 0 and (best < 0 or cost[task] > cost[best]):
                best = task
        w = 0
        for i in range(1, n_workers):
            if load[i] < load[w]:
                w = i
        owner[best] = w
        load[w] += cost[best]
    return G, bq, (bq * G + 31) // 32 * 32, n_qblk, n_chunks, n_tasks, owner


@njit(inline="always", cache=True)
def _task_keys(task, n_chunks, n_qblk, bq, q_len, kv_len, Hkv, causal):
    # a task's (batch, KV head, chunk of query blocks) and the keys its queries see (a prefix)
    chunk = task % n_chunks
    return (task // (n_chunks * Hkv), (task // n_chunks) % Hkv, chunk,
            _chunk_keys(chunk, n_chunks, n_qblk, bq, q_len, kv_len, causal))


@njit(inline="always", cache=True)
def _chunk_keys(chunk, n_chunks, n_qblk, bq, q_len, kv_len, causal):
    # the keys a chunk's queries see (a prefix of the cache)
    k_need = 0
    for qb in range(chunk, n_qblk, n_chunks):
        nq = min(bq, q_len - qb * bq)
        k_need = max(k_need, min(kv_len, max(0, kv_len - q_len + qb * bq + nq))
                     if causal else kv_len)
    return k_need


@njit(inline="always", cache=True)
def _prefill_tasks(out, q, k, v, scale, causal, kind, w, plan, Qf, Of, Sf, Rows, Vis, Kp, Vp):
    # worker w's tasks of the plan (_prefill_plan), with its scratch: Qf (d * ld,), Of (ld, d),
    # Sf (BLOCK_K * ld,), Rows (3, ld), Vis (ld,) int32, Kp and Vp (kv_len, d) for a head's
    # keys and values, packed
    q_len, d = q.shape[1], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G, bq, ld, n_qblk, n_chunks, n_tasks, owner = plan
    for task in range(n_tasks):
        if owner[task] != w:
            continue
        z, hk, chunk, k_need = _task_keys(task, n_chunks, n_qblk, bq, q_len, kv_len, Hkv, causal)
        Kh, Vh = Kp[:k_need], Vp[:k_need]
        if _kv_bytes(kind) == 4:
            for j in range(k_need):
                kr, vr, kd, vd = k[z, j, hk], v[z, j, hk], Kh[j], Vh[j]
                for c in range(d):
                    kd[c] = kr[c]
                    vd[c] = vr[c]
        else:                                       # 16-bit rows widened, 16 at a time
            first = 2 * ((z * kv_len * Hkv + hk) * d)       # byte offset of (z, 0, hk, 0)
            _widen_rows(Kh.ctypes.data, k.ctypes.data + first, k_need, Hkv * d, d, _half(kind))
            _widen_rows(Vh.ctypes.data, v.ctypes.data + first, k_need, Hkv * d, d, _half(kind))
        for qb in range(chunk, n_qblk, n_chunks):
            nq = min(bq, q_len - qb * bq)
            _mk_tile(out, q, Kp, Vp, float32(scale), causal, G, z, hk, qb * bq, nq, Qf, Of, Sf,
                     Rows[0], Rows[1], Rows[2], Vis)


@njit(inline="always", cache=True)
def _prefill_scratch(n_workers, kv_len, d, ld):
    # Qf, Of, Sf, Rows, Vis, Kp, Vp of _prefill_tasks for each worker, allocated once per call
    return (np.empty((n_workers, d * ld), np.float32), np.empty((n_workers, ld, d), np.float32),
            np.empty((n_workers, BLOCK_K * ld), np.float32),
            np.empty((n_workers, 3, ld), np.float32), np.empty((n_workers, ld), np.int32),
            np.empty((n_workers, kv_len, d), np.float32),
            np.empty((n_workers, kv_len, d), np.float32))


@njit(cache=True)
def _prefill_part(part, parts, out, q, k, v, scale, causal, kind, plan, Qf, Of, Sf, Rows, Vis,
                  Kp, Vp):
    # _prefill_tasks of worker part, with its row of each scratch array (_prefill_scratch):
    # compiled once, called through its address (cpu_pool.call_part) by _attention_prefill_mk's
    # threads
    _prefill_tasks(out, q, k, v, scale, causal, kind, part, plan, Qf[part], Of[part], Sf[part],
                   Rows[part], Vis[part], Kp[part], Vp[part])


# the types of the plan (_prefill_plan) and scratch (_prefill_scratch) _prefill_part takes
_PREFILL_PLAN = ((0, 0, 0, 0, 0, 0, np.empty(0, np.int64)), np.empty((0, 0), np.float32),
                 np.empty((0, 0, 0), np.float32), np.empty((0, 0), np.float32),
                 np.empty((0, 0, 0), np.float32), np.empty((0, 0), np.int32),
                 np.empty((0, 0, 0), np.float32), np.empty((0, 0, 0), np.float32))


@njit(parallel=PRANGE, cache=True)
def _attention_prefill_mk(part_addr, out, q, k, v, scale, causal, kind, n_workers):
    # q, out: (b, q_len, H, d); k, v: (b, kv_len, Hkv, d); d a multiple of 32; part_addr:
    # _prefill_part's address for these types
    plan = _prefill_plan(q, k, causal, n_workers)
    Qf, Of, Sf, Rows, Vis, Kp, Vp = _prefill_scratch(n_workers, k.shape[1], q.shape[3], plan[2])
    for w in prange(n_workers):
        call_part(part_addr, np.int64(w), n_workers, (out, q, k, v, scale, causal, kind, plan, Qf,
                                                     Of, Sf, Rows, Vis, Kp, Vp))


@njit(cache=True)
def _attention_prefill_mk_serial(out, q, k, v, scale, causal, kind):
    # _attention_prefill_mk on the calling thread (a short prompt), its tasks inlined: one
    # compile, where a serial driver calling _prefill_part compiles 1.5-2 s more
    plan = _prefill_plan(q, k, causal, 1)
    Qf, Of, Sf, Rows, Vis, Kp, Vp = _prefill_scratch(1, k.shape[1], q.shape[3], plan[2])
    _prefill_tasks(out, q, k, v, scale, causal, kind, 0, plan, Qf[0], Of[0], Sf[0], Rows[0],
                   Vis[0], Kp[0], Vp[0])


@njit(fastmath=FASTMATH_INF, cache=True)
def _amx_tile(out, q, Kh, Vt, kv_len, scale, causal, G, z, hk, q0, nq, Qf, Qb, O, Ob, Sf, Pb,
              m_run, l_run, alpha, n_vis):
    # _mk_tile with AMX-BF16 tiles (attention_amx_cpu), K and V bfloat16. Kh: (>= kv_len
    # rounded up to 32, d) this head's keys, zeros past kv_len; Vt: (as many / 32, d / 16, 16,
    # 32) its values transposed in tiles (keys 32 u.., head dims 16 t..). Scratch: Qf (d * ld,)
    # for Q^T, Qb (uint32) its three-term B tiles, O (ld, d) rows, Ob (d / 16, >= ld / 16, 16,
    # 16) the O^T tiles, Sf (AMX_BLOCK_K * ld,) for S^T, Pb (uint32) P^T's hi | lo B tiles;
    # m_run, l_run, alpha (ld,), n_vis int32
    q_len, d = q.shape[1], q.shape[3]
    rows = nq * G
    ld = (rows + 31) // 32 * 32
    ncg, ks, nt = ld // 16, d // 32, d // 16
    Qt = Qf[:d * ld].reshape((d, ld))
    St = Sf[:AMX_BLOCK_K * ld].reshape((AMX_BLOCK_K, ld))
    _pack_qt(Qt, O, q, scale * float32(amx.LOG2E), z, hk, G, q0, rows)   # scores in log2 units
    qb_p, q_term = np.int64(Qb.ctypes.data), 1024 * ks * ncg
    amx.pack_pairs(qb_p, q_term, Qt.ctypes.data, ld, d // 2, d, ncg, 1024 * ks)
    for t in range(nt):
        for g in range(ncg):
            Ob[t, g] = float32(0)
    for r in range(ld):
        m_run[r] = NEG_INF
        l_run[r] = float32(0)

    kpos = kv_len - q_len + q0            # position of the tile's first query
    k_end = min(kv_len, max(0, kpos + nq)) if causal else kv_len
    st_p, ob_p, pb_p = np.int64(St.ctypes.data), np.int64(Ob.ctypes.data), np.int64(Pb.ctypes.data)
    kh_p, vt_p, a_p = np.int64(Kh.ctypes.data), np.int64(Vt.ctypes.data), np.int64(alpha.ctypes.data)
    mr_p, lr_p, nv_p = (np.int64(m_run.ctypes.data), np.int64(l_run.ctypes.data),
                        np.int64(n_vis.ctypes.data))
    p_step = 1024 * (AMX_BLOCK_K // 32)       # one group's P^T tiles
    p_lo = p_step * ncg
    ob_t = 1024 * Ob.shape[1]             # bytes from one O^T tile of head dims to the next
    for k0 in range(0, k_end, AMX_BLOCK_K):
        nk = min(AMX_BLOCK_K, k_end - k0)
        _, r0a, diag = _block_rows(n_vis, k0, nk, kpos, G, rows, ld, causal)
        for kk in range(0, nk, 32):
            for cp in range(r0a, ld, 32):
                amx.scores(st_p + 4 * (kk * ld + cp), ld, kh_p + 2 * (k0 + kk) * d, d,
                           qb_p + 1024 * ks * (cp // 16), q_term, ks)
        us = (nk + 31) // 32
        g0 = r0a // 16
        for g in range(g0, ncg):
            r = 16 * g
            amx.softmax_pack(st_p + 4 * r, ld, nk, mr_p + 4 * r, lr_p + 4 * r, a_p + 4 * r,
                             nv_p + 4 * r, diag, pb_p + p_step * g, p_lo, 16 * us)
        for g in range(g0, ncg):
            amx.values(ob_p + 1024 * g, ob_t, nt, a_p + 64 * g, vt_p + 2 * k0 * d,
                       pb_p + p_step * g, p_lo, us)

    for t in range(nt):
        for g in range(ncg):
            store_transposed16(O.ctypes.data + 4 * (16 * g * d + 16 * t), d,
                               ob_p + 1024 * (t * Ob.shape[1] + g))
    _store_rows(out, O, l_run, z, hk, G, q0, rows)


@njit(parallel=PRANGE, cache=True)
def _attention_prefill_amx(out, q, k, v, scale, causal, cfg, n_workers):
    # _attention_prefill_mk with AMX-BF16 tiles: k, v (b, kv_len, Hkv, d) bfloat16 bits; d a
    # multiple of 32; cfg: the tile configuration
    q_len, d = q.shape[1], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G, bq, ld, n_qblk, n_chunks, n_tasks, owner = _prefill_plan(q, k, causal, n_workers)
    ncg, kvp = ld // 16, (kv_len + 31) // 32 * 32

    # per-worker scratch, allocated once per call
    Qf = np.empty((n_workers, d * ld), np.float32)
    Qb = np.empty((n_workers, 3 * ncg * (d // 32) * 256), np.uint32)
    Of = np.empty((n_workers, ld, d), np.float32)
    Ob = np.empty((n_workers, d // 16, ncg, 16, 16), np.float32)
    Sf = np.empty((n_workers, AMX_BLOCK_K * ld), np.float32)
    Pb = np.empty((n_workers, 2 * ncg * (AMX_BLOCK_K // 32) * 256), np.uint32)
    Rows = np.empty((n_workers, 3, ld), np.float32)
    Vis = np.empty((n_workers, ld), np.int32)
    Kp = np.empty((n_workers, kvp, d), np.uint16)
    Vtp = np.empty((n_workers, kvp // 32, d // 16, 16, 32), np.uint16)
    for w in prange(n_workers):
        tile_config(cfg.ctypes.data)
        Kh, Vt = Kp[w], Vtp[w]
        for task in range(n_tasks):
            if owner[task] != w:
                continue
            z, hk, chunk, k_need = _task_keys(task, n_chunks, n_qblk, bq, q_len, kv_len, Hkv,
                                              causal)
            k_pad = (k_need + 31) // 32 * 32
            Kh[:k_need] = k[z, :k_need, hk]
            Kh[k_need:k_pad] = 0
            for j in range(k_pad):
                u, e = j // 32, j % 32
                for c in range(d):
                    Vt[u, c // 16, c % 16, e] = v[z, j, hk, c] if j < k_need else 0
            for qb in range(chunk, n_qblk, n_chunks):
                nq = min(bq, q_len - qb * bq)
                _amx_tile(out, q, Kh, Vt, kv_len, float32(scale), causal, G, z, hk, qb * bq, nq,
                          Qf[w], Qb[w], Of[w], Ob[w], Sf[w], Pb[w], Rows[w, 0], Rows[w, 1],
                          Rows[w, 2], Vis[w])
        tile_release()


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _dots(S, j, Qs, r0, n, key):
    # S[r0 + i, j] = Qs[r0 + i] . key for i < n; four rows per pass over key (d,)
    i = 0
    while i + 4 <= n:
        r = r0 + i
        S[r, j], S[r + 1, j], S[r + 2, j], S[r + 3, j] = dots_4x1(Qs[r], Qs[r + 1], Qs[r + 2],
                                                                  Qs[r + 3], key)
        i += 4
    for r in range(r0 + i, r0 + n):
        acc = float32(0)
        for c in range(key.shape[0]):
            acc += Qs[r, c] * key[c]
        S[r, j] = acc


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _axpys(O, r0, n, P, j, value):
    # O[r0 + i] += P[r0 + i, j] * value for i < n; four rows per pass over value (d,)
    d = value.shape[0]
    i = 0
    while i + 4 <= n:
        p0, p1, p2, p3 = P[r0 + i, j], P[r0 + i + 1, j], P[r0 + i + 2, j], P[r0 + i + 3, j]
        for c in range(d):
            vc = value[c]
            O[r0 + i, c] += p0 * vc
            O[r0 + i + 1, c] += p1 * vc
            O[r0 + i + 2, c] += p2 * vc
            O[r0 + i + 3, c] += p3 * vc
        i += 4
    for r in range(r0 + i, r0 + n):
        p = P[r, j]
        for c in range(d):
            O[r, c] += p * value[c]


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _dots2(S, j, Qs, r0, n, key0, key1):
    # S[r0 + i, j] = Qs[r0 + i] . key0 and S[r0 + i, j + 1] = Qs[r0 + i] . key1 for i < n:
    # two keys per pass over the query rows, so each query element loaded serves both
    i = 0
    while i + 4 <= n:
        r = r0 + i
        (S[r, j], S[r + 1, j], S[r + 2, j], S[r + 3, j], S[r, j + 1], S[r + 1, j + 1],
         S[r + 2, j + 1], S[r + 3, j + 1]) = dots_4x2(Qs[r], Qs[r + 1], Qs[r + 2], Qs[r + 3],
                                                       key0, key1)
        i += 4
    for r in range(r0 + i, r0 + n):
        a = float32(0)
        b = float32(0)
        for c in range(key0.shape[0]):
            a += Qs[r, c] * key0[c]
            b += Qs[r, c] * key1[c]
        S[r, j] = a
        S[r, j + 1] = b


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _axpys2(O, r0, n, P, j, value0, value1):
    # O[r0 + i] += P[r0 + i, j] * value0 + P[r0 + i, j + 1] * value1 for i < n: two keys per
    # pass, so each O element is loaded and stored once for both
    d = value0.shape[0]
    for r in range(r0, r0 + n):
        p0, p1 = P[r, j], P[r, j + 1]
        for c in range(d):
            O[r, c] += p0 * value0[c] + p1 * value1[c]


@njit(fastmath=FASTMATH_INF, cache=True)
def _decode_range(q, k, v, scale, causal, kind, z, k_lo, k_hi, Qs, S, P, alpha, n_vis, O, m_run,
                  l_run, Kb, Vb):
    # every query row against keys k_lo..k_hi-1 of batch z: O (rows, d) unnormalised, with the
    # running max m_run and sum l_run (rows,). Qs: (rows, d); S, P: (rows, BLOCK_K); Kb, Vb:
    # (BLOCK_K, Hkv, d), a block of 16-bit K and V widened
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = q_len * H                               # row r = (position r // H, head r % H)
    for r in range(rows):
        for c in range(d):
            Qs[r, c] = q[z, r // H, r % H, c] * scale
            O[r, c] = float32(0)
        m_run[r] = -np.inf
        l_run[r] = float32(0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        nk = min(BLOCK_K, k_hi - k0)
        for r in range(rows):
            n_vis[r] = min(nk, max(0, kv_len - q_len + r // H + 1 - k0)) if causal else nk
        kb, vb = _kv_block(k, z, k0, nk, Kb, kind), _kv_block(v, z, k0, nk, Vb, kind)
        # scores: each key row (all KV heads, contiguous) is read once, two rows at a time
        for j in range(0, nk - 1, 2):
            for hk in range(Hkv):
                for t in range(q_len):
                    _dots2(S, j, Qs, t * H + hk * G, G, kb[j, hk], kb[j + 1, hk])
        if nk % 2:
            for hk in range(Hkv):
                for t in range(q_len):
                    _dots(S, nk - 1, Qs, t * H + hk * G, G, kb[nk - 1, hk])
        _online_softmax_block(S, P, m_run, l_run, alpha, rows, nk, n_vis)
        for r in range(rows):
            for c in range(d):
                O[r, c] *= alpha[r]
        for j in range(0, nk - 1, 2):
            for hk in range(Hkv):
                for t in range(q_len):
                    _axpys2(O, t * H + hk * G, G, P, j, vb[j, hk], vb[j + 1, hk])
        if nk % 2:
            for hk in range(Hkv):
                for t in range(q_len):
                    _axpys(O, t * H + hk * G, G, P, nk - 1, vb[nk - 1, hk])


@njit(parallel=PRANGE, fastmath=FASTMATH_INF, cache=True)
def _attention_decode(out, q, k, v, scale, causal, kind, n_workers):
    # q, out: (b, q_len, H, d) with small q_len; k, v: (b, kv_len, Hkv, d)
    B, q_len, H, d = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    rows = q_len * H
    n_split = max(1, min((2 * n_workers + B - 1) // B, kv_len // MIN_SPLIT_KEYS))
    split_len = ((kv_len + n_split - 1) // n_split + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    n_split = max(1, (kv_len + split_len - 1) // split_len)
    n_tasks = B * n_split

    Qt = np.empty((n_workers, rows, d), np.float32)
    St = np.empty((n_workers, rows, BLOCK_K), np.float32)
    Pt = np.empty((n_workers, rows, BLOCK_K), np.float32)
    At = np.empty((n_workers, rows), np.float32)
    Vis = np.empty((n_workers, rows), np.int64)
    kb = BLOCK_K if _kv_bytes(kind) == 2 else 0    # rows of the widened K and V blocks
    Kb = np.empty((n_workers, kb, Hkv, d), np.float32)
    Vb = np.empty((n_workers, kb, Hkv, d), np.float32)
    # each key range's partial result: unnormalised output, running max and sum
    O_part = np.empty((n_tasks, rows, d), np.float32)
    M_part = np.empty((n_tasks, rows), np.float32)
    L_part = np.empty((n_tasks, rows), np.float32)

    for w in prange(n_workers):
        for task in range(w, n_tasks, n_workers):
            z, split = task // n_split, task % n_split
            _decode_range(q, k, v, float32(scale), causal, kind, z, split * split_len,
                          min(kv_len, (split + 1) * split_len), Qt[w], St[w], Pt[w], At[w],
                          Vis[w], O_part[task], M_part[task], L_part[task], Kb[w], Vb[w])

    # merge the key ranges: rescale each partial to the common maximum
    for zr in prange(B * rows):
        z, r = zr // rows, zr % rows
        t, h = r // H, r % H
        m = float32(-np.inf)
        for s in range(n_split):
            m = max(m, M_part[z * n_split + s, r])
        for c in range(d):
            out[z, t, h, c] = float32(0)
        if m == -np.inf:  # saw no key
            continue
        total = float32(0)
        for s in range(n_split):
            task = z * n_split + s
            wgt = exp_f32(M_part[task, r] - m)
            total += L_part[task, r] * wgt
            for c in range(d):
                out[z, t, h, c] += O_part[task, r, c] * wgt
        inv = float32(1) / total
        for c in range(d):
            out[z, t, h, c] *= inv


# -- decode with the micro-kernels: a task is one KV head (and a range of its keys) --------
# The G query heads sharing a KV head are the rows of one tile, so each key and value row is
# read once for all of them, straight from the cache (no packing): scores S^T (keys, rows) by
# broadcasting key elements against Q^T, the online softmax across the rows' lanes
# (_softmax16, _softmax8), then O += P^T V as in prefill. A tile of at most 8 rows takes its
# scores two head dimensions at a time (_qk_pairs): a key's elements 2t, 2t + 1 broadcast as
# one 64-bit pair fill a zmm's even and odd lanes, against Q^T packed as Qp[t, 2r + e] =
# Q^T[2t + e, r], so all 16 lanes work (one element broadcast against 8 rows would fill half);
# each row's two partial sums are added at the end.

# keys per score micro-kernel call: 16 where AVX-512's registers hold their accumulators at
# once; elsewhere one register pass of keys (ACC16), as for the P V kernels' rows (_R0)
_QK_R = 16 if ACC16 >= 24 else ACC16
_qk16_16, _qk16_4, _qk16_1 = (_microkernel(r, 1, False) for r in (_QK_R, 4, 1))


def _qk_pairs(R, bf16=False):
    """An intrinsic qk(c, ldc, a, sa_i, b, K): for keys i < R, the 8 floats at c + 4 i ldc get
    sum_{t < K} A[i, t] Q^T[t, :8], A[i, t] at byte address a + 4 (i sa_i + t), Q^T packed in
    pairs at b: Qp[t / 2, 2 r + t % 2] = Q^T[t, r], 16 floats a pair; K even. The R
    accumulators stay in registers over the whole loop (in passes of keys where they do not
    fit: row_passes).
    bf16 (AVX-512 BF16): A holds bfloat16 keys (A[i, t] at a + 2 (i sa_i + t)) and Q^T is
    bfloat16, packed four dimensions a zmm: the 32-bit lane 2 r + e of vector t / 4 holds the
    pair Q^T[4 (t / 4) + 2 e + (0, 1), r]; one vdpbf16ps multiplies a key's four elements (a
    64-bit broadcast) into all 8 rows; K a multiple of 4."""
    VT, V8 = ir.VectorType(_F32, 16), ir.VectorType(_F32, 8)
    VQ = ir.VectorType(_I64, 8)
    es, step = (2, 4) if bf16 else (4, 2)        # bytes of a key element, elements a load

    @intrinsic
    def qk(typingctx, c, ldc, a, sa_i, b, K):
        sig = types.void(c, ldc, a, sa_i, b, K)

        def codegen(context, builder, signature, args):
            c, ldc, a, sa_i, b, K = [context.cast(builder, v, t, types.int64)
                                     for v, t in zip(args, signature.args)]
            mac = dpbf16ps(builder) if bf16 else fma(builder, VT)
            vb = _VI32 if bf16 else VT
            undef = ir.Constant(VQ, ir.Undefined)
            zeros = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(VT, [0.0] * 16))
                   for _ in range(R)]
            rows = [builder.add(a, builder.mul(ir.Constant(_I64, es * i), sa_i))
                    for i in range(R)]
            n_steps = builder.ashr(K, ir.Constant(_I64, step.bit_length() - 1))
            for r0, r1 in row_passes(R, 1):      # keys whose accumulators fit the registers
                with cgutils.for_range(builder, n_steps) as loop:
                    t2 = loop.index
                    off = builder.mul(t2, ir.Constant(_I64, 8))    # bytes to elements step t2
                    qv = builder.load(builder.inttoptr(builder.add(
                        b, builder.mul(t2, ir.Constant(_I64, 64))), ir.PointerType(vb)), align=4)
                    for i in range(r0, r1):
                        pair = builder.load(builder.inttoptr(builder.add(rows[i], off),
                                                             ir.PointerType(_I64)), align=2)
                        kv = builder.bitcast(builder.shuffle_vector(builder.insert_element(
                            undef, pair, ir.Constant(_I32, 0)), undef, zeros), vb)
                        args = [builder.load(acc[i]), kv, qv] if bf16 else \
                            [kv, qv, builder.load(acc[i])]
                        builder.store(builder.call(mac, args), acc[i])
            even = ir.Constant(ir.VectorType(_I32, 8), list(range(0, 16, 2)))
            odd = ir.Constant(ir.VectorType(_I32, 8), list(range(1, 16, 2)))
            for i in range(R):
                v = builder.load(acc[i])
                total = builder.fadd(builder.shuffle_vector(v, v, even),
                                     builder.shuffle_vector(v, v, odd))
                out = builder.add(c, builder.mul(ir.Constant(_I64, 4 * i), ldc))
                builder.store(total, builder.inttoptr(out, ir.PointerType(V8)), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return qk


# 14 keys a call, not 16: with 16 accumulators LLVM spilled one to the stack each iteration
# (the whole decode kernel at TinyLlama's 32/4 heads and 2000 keys, one Zen 5 thread: 131-146
# against 154-164 us, 10 and 12 keys as 14); one register pass of keys without AVX-512
_QKP_R = 14 if ACC16 >= 24 else ACC16
_qkp_14, _qkp_4, _qkp_1 = (_qk_pairs(r) for r in (_QKP_R, 4, 1))
_qkb_14, _qkb_4, _qkb_1 = (_qk_pairs(r, bf16=True) for r in (_QKP_R, 4, 1))


def _wide(mk):
    # a 16-row score micro-kernel (_microkernel, Q^T rows ldc floats apart) as qk(c, ldc, a,
    # sa_i, b, K)
    @njit(inline="always")
    def qk(c, ldc, a, sa_i, b, K):
        mk(c, ldc, a, sa_i, 1, b, ldc, K, 0)
    return qk


def _scores_block(R, qk_r, qk_4, qk_1, es):
    """qk_block(n, c, ldc, a, sa_i, b, K, pf_k, pf_v, n_pf, pf_bytes): scores of keys j < n (A's
    rows sa_i elements of es bytes apart) by the score micro-kernels qk_r, qk_4 and qk_1 (R, 4
    and 1 keys a call). Before each call of R keys the next R of n_pf pieces of K and of V are
    prefetched (before the last, every piece left), pieces of pf_bytes back to back from byte
    addresses pf_k and pf_v: spread over the work, so the memory streams while the cores
    compute."""
    @njit(inline="always")
    def qk_block(n, c, ldc, a, sa_i, b, K, pf_k, pf_v, n_pf, pf_bytes):
        j = p = 0                                  # keys done, pieces prefetched
        while j < n:
            cj, aj = c + 4 * j * ldc, a + es * j * sa_i
            if p < n_pf:
                npf = min(R, n_pf - p) if j + R < n else n_pf - p
                _prefetch_rows(pf_k + p * pf_bytes, npf, pf_bytes, pf_bytes)
                _prefetch_rows(pf_v + p * pf_bytes, npf, pf_bytes, pf_bytes)
                p += npf
            if n - j >= R:
                qk_r(cj, ldc, aj, sa_i, b, K)
                j += R
            elif n - j >= 4:
                qk_4(cj, ldc, aj, sa_i, b, K)
                j += 4
            else:
                qk_1(cj, ldc, aj, sa_i, b, K)
                j += 1
    return qk_block


# C[j, :W] = sum_t K[j, t] Q^T[t, :W]: narrow, W = 8 with Q^T in pairs (_qk_pairs); wide, W = 16
# with Q^T's rows ldc floats apart; bf16, narrow over bfloat16 keys (vdpbf16ps)
_qk_narrow = _scores_block(_QKP_R, _qkp_14, _qkp_4, _qkp_1, 4)
_qk_wide = _scores_block(_QK_R, *map(_wide, (_qk16_16, _qk16_4, _qk16_1)), 4)
_qk_narrow_bf16 = _scores_block(_QKP_R, _qkb_14, _qkb_4, _qkb_1, 2)


def _pv_pairs(R):
    """An intrinsic mk(c, ldc, a, lda, b, ldb, K, alpha) (AVX-512 BF16): for rows i < R, the 32
    floats at c + 4 i ldc become C[i] alpha[i] + sum_{t < K} P[t, i] V[t, :32], V bfloat16 rows
    at b + 2 t ldb, P in bfloat16 pairs: the 32-bit word at a + 4 (p lda + i) holds P[2p, i]
    (low) and P[2p + 1, i]. Two keys' rows are interleaved (vpunpcklwd, vpunpckhwd) so that a
    32-bit lane holds one column's pair, and vdpbf16ps takes 2 keys a row a zmm; the
    accumulators keep the columns in that order (lo: 0-3, 8-11, 16-19, 24-27; hi: the rest),
    permuted from C's and back at the ends. An odd K's last key pairs with zeros."""
    VT, VW = ir.VectorType(_F32, 16), ir.VectorType(ir.IntType(16), 32)
    ix = [[x for blk in range(4) for m in range(4) for x in (8 * blk + 4 * h + m,
                                                           32 + 8 * blk + 4 * h + m)]
          for h in (0, 1)]                               # words of two rows -> lo, hi
    cols = [[8 * blk + 4 * h + m for blk in range(4) for m in range(4)] for h in (0, 1)]
    where = {col: i for i, col in enumerate(cols[0] + cols[1])}
    back = [[where[x] for x in range(16 * h, 16 * h + 16)] for h in (0, 1)]

    def const(xs):
        return ir.Constant(ir.VectorType(_I32, len(xs)), xs)

    @intrinsic
    def mk(typingctx, c, ldc, a, lda, b, ldb, K, alpha):
        sig = types.void(c, ldc, a, lda, b, ldb, K, alpha)

        def codegen(context, builder, signature, args):
            c, ldc, a, lda, b, ldb, K, alpha = [context.cast(builder, v, t, types.int64)
                                                for v, t in zip(args, signature.args)]
            dot = dpbf16ps(builder)
            undef, undef_i = ir.Constant(VT, ir.Undefined), ir.Constant(_VI32, ir.Undefined)
            zeros = const([0] * 16)

            def at(addr, t, align=4):
                return builder.load(builder.inttoptr(addr, ir.PointerType(t)), align=align)

            def bcast(x, u):
                return builder.shuffle_vector(builder.insert_element(u, x, ir.Constant(_I32, 0)),
                                              u, zeros)

            def c_row(i, h):
                return builder.add(builder.add(c, builder.mul(ir.Constant(_I64, 4 * i), ldc)),
                                   ir.Constant(_I64, 64 * h))
            acc = []
            for i in range(R):
                al = bcast(at(builder.add(alpha, ir.Constant(_I64, 4 * i)), _F32), undef)
                c0, c1 = (builder.fmul(at(c_row(i, h), VT), al) for h in (0, 1))
                acc.append([cgutils.alloca_once_value(builder, builder.shuffle_vector(
                    c0, c1, const(cols[h]))) for h in (0, 1)])

            def step(p, v0, v1):
                vv = [builder.bitcast(builder.shuffle_vector(v0, v1, const(ix[h])), _VI32)
                      for h in (0, 1)]
                row = builder.add(a, builder.mul(p, builder.mul(lda, ir.Constant(_I64, 4))))
                for i in range(R):
                    pv = bcast(at(builder.add(row, ir.Constant(_I64, 4 * i)), _I32), undef_i)
                    for h in (0, 1):
                        builder.store(builder.call(dot, [builder.load(acc[i][h]), vv[h], pv]),
                                      acc[i][h])

            def v_row(t):
                return at(builder.add(b, builder.mul(t, builder.mul(ldb, ir.Constant(_I64, 2)))),
                          VW, 2)
            half = builder.ashr(K, ir.Constant(_I64, 1))
            with cgutils.for_range(builder, half) as loop:
                t = builder.shl(loop.index, ir.Constant(_I64, 1))
                step(loop.index, v_row(t), v_row(builder.add(t, ir.Constant(_I64, 1))))
            with builder.if_then(builder.trunc(K, ir.IntType(1))):
                step(half, v_row(builder.sub(K, ir.Constant(_I64, 1))),
                     ir.Constant(VW, [0] * 32))
            for i in range(R):
                lo, hi = (builder.load(acc[i][h]) for h in (0, 1))
                for h in (0, 1):
                    builder.store(builder.shuffle_vector(lo, hi, const(back[h])),
                                  builder.inttoptr(c_row(i, h), ir.PointerType(VT)), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return mk


_pv_8, _pv_4, _pv_1 = (_pv_pairs(r) for r in (8, 4, 1))


@intrinsic
def _pack_p_bf16(typingctx, pb, st, nk):
    """The probabilities S^T[j, :8] (8 floats at st + 32 j, j < nk) rounded to bfloat16 (to
    nearest, ties to even) in pairs of keys: the 32-bit word at pb + 4 (8 p + r) holds
    P[2p, r] (low) and P[2p + 1, r] (0 past nk), for p < (nk + 1) / 2."""
    sig = types.void(pb, st, nk)

    def codegen(context, builder, signature, args):
        pb, st, nk = [context.cast(builder, v, t, types.int64)
                      for v, t in zip(args, signature.args)]

        def pairs(p, n):         # the pair p, its first n of 16 floats loaded (8: the last key)
            vi = ir.VectorType(_I32, n)
            f = builder.load(builder.inttoptr(builder.add(st, builder.shl(
                p, ir.Constant(_I64, 6))), ir.PointerType(ir.VectorType(_F32, n))), align=4)
            h = builder.trunc(builder.lshr(vround_bf16(builder, builder.bitcast(f, vi)),
                                           ir.Constant(vi, [16] * n)),
                              ir.VectorType(ir.IntType(16), n))
            if n == 8:
                h = builder.shuffle_vector(h, ir.Constant(h.type, [0] * 8),
                                           ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
            w = builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(_I32, 16), [
                x for r in range(8) for x in (r, r + 8)]))
            builder.store(builder.bitcast(w, ir.VectorType(_I32, 8)), builder.inttoptr(
                builder.add(pb, builder.shl(p, ir.Constant(_I64, 5))),
                ir.PointerType(ir.VectorType(_I32, 8))), align=4)
        half = builder.ashr(nk, ir.Constant(_I64, 1))
        with cgutils.for_range(builder, half) as loop:
            pairs(loop.index, 16)
        with builder.if_then(builder.trunc(nk, ir.IntType(1))):
            pairs(half, 8)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always")
def _pv_bf16(n, c, ldc, a, lda, b, ldb, K, alpha):
    # rows 0..n-1 (8, 4 or 1) of _pv_pairs
    if n == 8:
        _pv_8(c, ldc, a, lda, b, ldb, K, alpha)
    elif n == 4:
        _pv_4(c, ldc, a, lda, b, ldb, K, alpha)
    else:
        _pv_1(c, ldc, a, lda, b, ldb, K, alpha)


# The decode's kernel family is picked by the dtype of its work scratch: float32 (the float32
# micro-kernels; 16-bit K widened into it a block of one head's rows at a time, into L1), or
# uint32 (bfloat16 K/V and at most 8 rows, on AVX-512 BF16: vdpbf16ps over the cache's own
# bits, q and the probabilities rounded to bfloat16 for the products; the scratch holds a
# block's probabilities in bfloat16 pairs)

def _pack_q(work, Qt, q, scale, z, hk, rows, G, narrow):
    """Q^T of KV head hk (its rows of batch z, times scale; padding rows zeros) into Qt[hk], in
    the layout of the family's score micro-kernels."""


@overload(_pack_q)
def _pack_q_impl(work, Qt, q, scale, z, hk, rows, G, narrow):
    if work.dtype == types.uint32:
        def bf16_quads(work, Qt, q, scale, z, hk, rows, G, narrow):
            if not narrow:                    # bf16_dots picks this family for these only
                raise ValueError("decode's bfloat16 products take at most 8 rows a KV head")
            d = q.shape[3]
            Qu = Qt[hk].view(np.uint32)
            for r in range(8):
                qr = q[z, r // G, hk * G + r % G] if r < rows else q[z, 0, 0]
                for c in range(0, d, 2):
                    w = np.uint32(0)
                    if r < rows:
                        w = round_bf16(qr[c] * scale) | (round_bf16(qr[c + 1] * scale) << 16)
                    Qu[(c // 4) * 16 + 2 * r + (c // 2) % 2] = w
        return bf16_quads

    def float32_pairs(work, Qt, q, scale, z, hk, rows, G, narrow):
        d = q.shape[3]
        ld = Qt.shape[1] // d
        for r in range(ld):
            qr = q[z, r // G, hk * G + r % G] if r < rows else q[z, 0, 0]
            for c in range(d):
                at = (c // 2) * 16 + 2 * r + c % 2 if narrow else c * ld + r
                Qt[hk, at] = qr[c] * scale if r < rows else float32(0)
    return float32_pairs


def _head_scores(work, narrow, nk, st_p, ld, kh_p, ldk, kind, qh_p, d, pf_k, pf_v, n_pf):
    """S^T (nk, ld) at st_p of a key block of one KV head (its keys at byte address kh_p, rows
    ldk elements apart) against its Q^T at qh_p, prefetching n_pf pieces of d elements of K and
    of V, back to back from pf_k and pf_v on."""


@overload(_head_scores)
def _head_scores_impl(work, narrow, nk, st_p, ld, kh_p, ldk, kind, qh_p, d, pf_k, pf_v, n_pf):
    if work.dtype == types.uint32:
        def bf16(work, narrow, nk, st_p, ld, kh_p, ldk, kind, qh_p, d, pf_k, pf_v, n_pf):
            _qk_narrow_bf16(nk, st_p, ld, kh_p, ldk, qh_p, d, pf_k, pf_v, n_pf, 2 * d)
        return bf16

    def float32_products(work, narrow, nk, st_p, ld, kh_p, ldk, kind, qh_p, d, pf_k, pf_v,
                         n_pf):
        es = _kv_bytes(kind)
        ld_k = ldk
        if es == 2:                          # 16-bit K widened into L1 (V is widened as P V
            kw_p = np.int64(work.ctypes.data)                              # loads it)
            _widen_rows(kw_p, kh_p, nk, ldk, d, _half(kind))
            kh_p, ld_k = kw_p, d
        if narrow:
            _qk_narrow(nk, st_p, ld, kh_p, ld_k, qh_p, d, pf_k, pf_v, n_pf, es * d)
        else:
            for cg in range(0, ld, 16):
                _qk_wide(nk, st_p + 4 * cg, ld, kh_p, ld_k, qh_p + 4 * cg, d, pf_k, pf_v,
                         n_pf if cg == 0 else 0, es * d)
    return float32_products


def _head_pv(work, nk, rows, n_vis, oh_p, st_p, ld, vh_p, ldk, kind, a_p, d):
    """O[r] = O[r] * alpha[r] + sum_j P^T[j, r] V[j] for one KV head's rows (O at oh_p, rows d
    floats apart; P^T at st_p, ld floats a key; its values at vh_p, rows ldk elements apart),
    in groups of rows; a group runs over the keys its last row sees (P is 0 past each row's
    own)."""


@overload(_head_pv)
def _head_pv_impl(work, nk, rows, n_vis, oh_p, st_p, ld, vh_p, ldk, kind, a_p, d):
    if work.dtype == types.uint32:
        def bf16(work, nk, rows, n_vis, oh_p, st_p, ld, vh_p, ldk, kind, a_p, d):
            pb_p = np.int64(work.ctypes.data)
            _pack_p_bf16(pb_p, st_p, nk)
            i = 0
            while i < rows:
                g = 8 if rows - i >= 8 else (4 if rows - i >= 4 else 1)
                klen = n_vis[i + g - 1]
                for c0 in range(0, d, 32):
                    _pv_bf16(g, oh_p + 4 * (i * d + c0), d, pb_p + 4 * i, ld, vh_p + 2 * c0,
                             ldk, klen, a_p + 4 * i)
                i += g
        return bf16

    mk_acc = {types.float32: _mk_acc, types.int16: _mk_acc_f16,        # V's own variant only
              types.uint16: _mk_acc_bf16}[kind.dtype]

    def float32_products(work, nk, rows, n_vis, oh_p, st_p, ld, vh_p, ldk, kind, a_p, d):
        es = _kv_bytes(kind)
        i = 0
        while i < rows:
            g = _mk_rows(rows - i)
            klen = n_vis[i + g - 1]
            for c0 in range(0, d, 32):
                o_c, p_r, v_c = oh_p + 4 * (i * d + c0), st_p + 4 * i, vh_p + es * c0
                mk_acc(g, o_c, d, p_r, 1, ld, v_c, ldk, klen, a_p + 4 * i)
            i += g
    return float32_products


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _decode_range_mk(q, k, v, scale, causal, kind, z, k_lo, k_hi, Qf, Sf, O, m_run, l_run,
                     alpha, n_vis, work):
    # the queries of batch z against its keys k_lo..k_hi-1, block by block, each block for
    # every KV head in turn (so K and V stream through in address order): O (Hkv, rows, d)
    # unnormalised, m_run and l_run (Hkv, >= ld) the rows' running max and sum. Row r of KV head
    # hk: query r // G, head hk * G + r % G; ld: the rows padded to 8 (at most 8 rows) or 16.
    # Scratch: Qf (Hkv * d * ld,) for each head's Q^T, Sf (BLOCK_K * ld,) for a block's S^T
    # then P^T, alpha (ld,), n_vis (ld,) int32; work: the kernel family's (see _pack_q)
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = q_len * G
    narrow = rows <= 8
    ld = 8 if narrow else (rows + 15) // 16 * 16
    Qt = Qf[:Hkv * d * ld].reshape((Hkv, d * ld))  # Q^T (d, ld) a head, narrow: in pairs
    St = Sf[:BLOCK_K * ld].reshape((BLOCK_K, ld))
    for hk in range(Hkv):
        _pack_q(work, Qt, q, scale, z, hk, rows, G, narrow)
        for r in range(ld):
            m_run[hk, r] = NEG_INF
            l_run[hk, r] = float32(0)
        for r in range(rows):
            for c in range(d):
                O[hk, r, c] = float32(0)

    ldk = Hkv * d                                  # elements from one key row to the next
    es = _kv_bytes(kind)                           # bytes of an element of K and V
    k_p = np.int64(k.ctypes.data) + es * z * kv_len * ldk
    v_p = np.int64(v.ctypes.data) + es * z * kv_len * ldk
    qt_p, st_p, o_p = np.int64(Qt.ctypes.data), np.int64(St.ctypes.data), np.int64(O.ctypes.data)
    a_p, mr_p = np.int64(alpha.ctypes.data), np.int64(m_run.ctypes.data)
    lr_p, nv_p = np.int64(l_run.ctypes.data), np.int64(n_vis.ctypes.data)
    kpos = kv_len - q_len                          # position of the first query
    row = es * ldk                                 # bytes of a key (or value) row, every head
    n0 = min(k_hi - k_lo, PREFETCH_KEYS)           # the rows before the first prefetched below
    _prefetch_rows(k_p + k_lo * row, n0, row, row)
    _prefetch_rows(v_p + k_lo * row, n0, row, row)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        nk = min(BLOCK_K, k_hi - k0)
        diag = False
        for r in range(ld):
            n_vis[r] = min(nk, max(0, kpos + r // G + 1 - k0)) if causal and r < rows else nk
            diag = diag or n_vis[r] < nk
        for hk in range(Hkv):
            kh_p, vh_p = k_p + es * (k0 * ldk + hk * d), v_p + es * (k0 * ldk + hk * d)
            # this head's share of the block PREFETCH_KEYS on: whole rows (Hkv pieces of d)
            r0 = min(k_hi, k0 + PREFETCH_KEYS + hk * BLOCK_K // Hkv)
            r1 = min(k_hi, k0 + PREFETCH_KEYS + (hk + 1) * BLOCK_K // Hkv)
            _head_scores(work, narrow, nk, st_p, ld, kh_p, ldk, kind, qt_p + 4 * hk * d * ld, d,
                         k_p + r0 * row, v_p + r0 * row, (r1 - r0) * Hkv)
            mh, lh = mr_p + 4 * hk * m_run.shape[1], lr_p + 4 * hk * l_run.shape[1]
            if narrow:
                _softmax8(st_p, ld, nk, mh, lh, a_p, nv_p, diag)
            else:
                for r in range(0, ld, 16):
                    _softmax16(st_p + 4 * r, ld, nk, mh + 4 * r, lh + 4 * r, a_p + 4 * r,
                               nv_p + 4 * r, diag)
            _head_pv(work, nk, rows, n_vis, o_p + 4 * hk * rows * d, st_p, ld, vh_p, ldk, kind,
                     a_p, d)


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _decode_mk_plan(q, k, n_workers):
    # the key ranges of _attention_decode_mk's tasks (flash-decoding: a batch is split into
    # ranges when there are fewer batches than workers) and each task's partial result:
    # unnormalised output, running max and sum
    B, q_len, H, d = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    rows = q_len * (H // Hkv)
    ld = (rows + 15) // 16 * 16
    n_split = max(1, min((n_workers + B - 1) // B, (kv_len + BLOCK_K - 1) // BLOCK_K))
    split_len = ((kv_len + n_split - 1) // n_split + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    n_split = max(1, (kv_len + split_len - 1) // split_len)
    n_tasks = B * n_split
    return (n_split, split_len, n_tasks, np.empty((n_tasks, Hkv, rows, d), np.float32),
            np.empty((n_tasks, Hkv, ld), np.float32), np.empty((n_tasks, Hkv, ld), np.float32))


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _decode_scratch(Hkv, d, ld, kind, family):
    # a worker's scratch for _decode_range_mk (Qf, Sf, alpha, n_vis, work; ld: the rows padded,
    # as the plan's running max and sum), allocated by the worker itself: with 16-bit K/V, rows
    # of one shared (workers, ...) array ran 2 threads at 134-141 us against 100 for their own
    # (TinyLlama's 32/4 heads at 2000 keys, Zen 5)
    return (np.empty(Hkv * d * ld, np.float32), np.empty(BLOCK_K * ld, np.float32),
            np.empty(ld, np.float32), np.empty(ld, np.int32),
            np.empty(BLOCK_K * d if _kv_bytes(kind) == 2 else 0, family.dtype))


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _decode_mk_merge(out, O_part, M_part, L_part, n_split):
    # merge the key ranges: rescale each partial to the common maximum
    B, q_len, H, d = out.shape
    Hkv, rows = O_part.shape[1], O_part.shape[2]
    G = H // Hkv
    for z in range(B):
        for hk in range(Hkv):
            for r in range(rows):
                orow = out[z, r // G, hk * G + r % G]
                m = NEG_INF
                for s in range(n_split):
                    m = max(m, M_part[z * n_split + s, hk, r])
                for c in range(d):
                    orow[c] = float32(0)
                if m == -np.inf:  # saw no key
                    continue
                total = float32(0)
                for s in range(n_split):
                    task = z * n_split + s
                    wgt = exp_f32(M_part[task, hk, r] - m)
                    total += L_part[task, hk, r] * wgt
                    src = O_part[task, hk, r]
                    for c in range(d):
                        orow[c] += src[c] * wgt
                inv = float32(1) / total
                for c in range(d):
                    orow[c] *= inv


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _decode_tasks(q, k, v, scale, causal, kind, family, w, n_workers, n_split, split_len, O_part,
                  M_part, L_part):
    # worker w's tasks of the plan (_decode_mk_plan): tasks w, w + n_workers, ..., each a range
    # of keys of one batch, for every head, into its partial result
    kv_len = k.shape[1]
    Qf, Sf, At, Vis, W = _decode_scratch(k.shape[2], q.shape[3], M_part.shape[2], kind, family)
    for task in range(w, O_part.shape[0], n_workers):
        z, split = task // n_split, task % n_split
        _decode_range_mk(q, k, v, float32(scale), causal, kind, z, split * split_len,
                         min(kv_len, (split + 1) * split_len), Qf, Sf, O_part[task],
                         M_part[task], L_part[task], At, Vis, W)


@njit(fastmath=FASTMATH_INF, cache=True)
def _decode_part(part, parts, q, k, v, scale, causal, kind, family, n_split, split_len, O_part,
                 M_part, L_part):
    # _decode_tasks of worker part: compiled once, called through its address
    # (cpu_pool.call_part) by _attention_decode_mk's threads
    _decode_tasks(q, k, v, scale, causal, kind, family, part, parts, n_split, split_len, O_part,
                  M_part, L_part)


# the types of the plan's values (_decode_mk_plan) _decode_part takes: n_split, split_len,
# O_part, M_part, L_part
_DECODE_PLAN = (0, 0, np.empty((0, 0, 0, 0), np.float32), np.empty((0, 0, 0), np.float32),
                np.empty((0, 0, 0), np.float32))


@njit(parallel=PRANGE, fastmath=FASTMATH_INF, cache=True)
def _attention_decode_mk(part_addr, out, q, k, v, scale, causal, kind, n_workers, family):
    # q, out: (b, q_len, H, d) with small q_len; k, v: (b, kv_len, Hkv, d); d a multiple of 32.
    # A task: a range of keys of one batch, for every head; the ranges merged at the end (on
    # the calling thread: a few rows). family: an empty array of the kernel family's work
    # dtype (DECODE_FAMILIES); part_addr: _decode_part's address for these types
    n_split, split_len, _, O_part, M_part, L_part = _decode_mk_plan(q, k, n_workers)
    for w in prange(n_workers):
        call_part(part_addr, np.int64(w), n_workers, (q, k, v, scale, causal, kind, family,
                                                     n_split, split_len, O_part, M_part, L_part))
    _decode_mk_merge(out, O_part, M_part, L_part, n_split)


@njit(fastmath=FASTMATH_INF, cache=True)
def _attention_decode_mk_serial(out, q, k, v, scale, causal, kind, family):
    # _attention_decode_mk on the calling thread, outside the thread pool: a short context's
    # decode step sits between parallel GEMVs, and a parallel region of one thread there (its
    # pool shrunk and grown again) cost more than the attention (TinyLlama q8_0 decode at
    # context 16: 0.9 against 0.4 ms a token, in turn in one process). _decode_tasks inlined
    # here: numba optimizes and compiles a function again in every caller that links it
    n_split, split_len, _, O_part, M_part, L_part = _decode_mk_plan(q, k, 1)
    _decode_tasks(q, k, v, scale, causal, kind, family, 0, 1, n_split, split_len, O_part,
                  M_part, L_part)
    _decode_mk_merge(out, O_part, M_part, L_part, n_split)


# decode's kernel families, as the drivers take them: an empty array of the work scratch's
# dtype (a dtype itself as an argument costs numba's dispatch ~3 us a call), by bf16_dots
DECODE_FAMILIES = {False: np.empty(0, np.float32), True: np.empty(0, np.uint32)}


def bf16_dots(kind, rows):
    """True where decode (head sizes a multiple of 32) takes its products in bfloat16
    (vdpbf16ps): a bfloat16 KV cache, at most 8 query rows a KV head, AVX-512 BF16 on the host
    and allowed (llvm_cpu.CPU_PATH). q and the probabilities are then rounded to bfloat16 for
    the products (2^-9 relative, the cache's own precision), sums float32."""
    return kind is KV_BF16 and rows <= 8 and fast_path("avx512bf16")


def attention(out, q, k, v, scale, causal):
    # q, out: (b, q_len, H, d) float32; k, v: (b, kv_len, Hkv, d) float32, float16 or bfloat16
    # (ml_dtypes, or its bits as uint16), or both formats.Int8KV (attention_int8_cpu)
    if isinstance(k, Int8KV):
        from . import attention_int8_cpu        # compiled only for a model that uses it
        attention_int8_cpu.attention(out, q, k, v, scale, causal)
        return
    kind = KV_KINDS[np.dtype(k.dtype)]
    if kind is not KV_F32:                      # the kernels take 16-bit floats as their bits
        k, v = k.view(np.uint16), v.view(np.uint16)
    B, q_len, H, d = q.shape
    work = B * q_len * H * k.shape[1] * d      # multiply-adds of q k^T (at most)
    if q_len <= DECODE_MAX_Q:
        schedule = _attention_decode_mk if d % 32 == 0 else _attention_decode
    elif d % 32 == 0:
        schedule = _attention_prefill_mk
    else:
        schedule = _attention_prefill           # BLAS tiles: any head size
    n_workers = get_num_threads() if work >= cpu_pool.PARALLEL_MIN_WORK else 1
    if schedule is _attention_decode_mk:
        family = DECODE_FAMILIES[bf16_dots(kind, q_len * (H // k.shape[2]))]
        if n_workers == 1:
            _attention_decode_mk_serial(out, q, k, v, scale, causal, kind, family)
        else:
            part = cpu_pool.address(_decode_part, q, k, v, scale, causal, kind, family,
                                    *_DECODE_PLAN)
            schedule(part, out, q, k, v, scale, causal, kind, n_workers, family)
        return
    if schedule is _attention_prefill_mk and kind is KV_BF16 and amx_path("amx-bf16"):
        cpu_pool.run(_attention_prefill_amx, work, out, q, k, v, scale, causal, _AMX_CFG,
                     n_workers)
        return
    if schedule is _attention_prefill_mk:
        if n_workers == 1:
            _attention_prefill_mk_serial(out, q, k, v, scale, causal, kind)
        else:
            part = cpu_pool.address(_prefill_part, out, q, k, v, scale, causal, kind,
                                    *_PREFILL_PLAN)
            schedule(part, out, q, k, v, scale, causal, kind, n_workers)
        return
    cpu_pool.run(schedule, work, out, q, k, v, scale, causal, kind, n_workers)


# -- a compiled decode step's attention (cpu_decode.py) -------------------------------------

@intrinsic
def _f16_bits(typingctx, x):
    """float32 -> float16 bits (uint16), rounded to nearest even (F16C's vcvtps2ph)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    if x == types.float32:
        return types.uint16(x), codegen


def _store_kv(dst, src, kind):
    """dst (Hkv, d) = src (Hkv, d) float32 in the cache's storage: float32, or 16-bit bits."""


@overload(_store_kv)
def _store_kv_impl(dst, src, kind):
    if kind.dtype == types.float32:
        def copy(dst, src, kind):        # loops: a slice assignment compiles 10x longer
            for h in range(dst.shape[0]):
                for c in range(dst.shape[1]):
                    dst[h, c] = src[h, c]
        return copy

    if kind.dtype == types.int16:           # float16 (KV_F16): F16C's conversion alone
        def to_f16(dst, src, kind):
            for h in range(dst.shape[0]):
                for c in range(dst.shape[1]):
                    dst[h, c] = _f16_bits(src[h, c])
        return to_f16

    def to_bf16(dst, src, kind):
        for h in range(dst.shape[0]):
            for c in range(dst.shape[1]):
                dst[h, c] = round_bf16(src[h, c])
    return to_bf16


@njit(cache=True)
def decode_layer(out, q, k_new, v_new, layer, pos, scale, n_threads, k_cache, v_cache, kind,
                 family, serial, part, launch, causal):
    # one layer of a decode step past its q|k|v projection: k_new, v_new (Hkv, d) float32
    # stored at position pos of the layer's cache (k_cache, v_cache: (layers, max_seq, Hkv, d),
    # float32 or 16-bit bits by kind), then out = attention of q over positions 0..pos (out, q:
    # (1, 1, H, d)): _attention_decode_mk's schedule; serial, part, launch: the addresses of
    # _attention_decode_mk_serial, _decode_part and the pool's launch of it (both 0 until a
    # context needs them) for these types
    _store_kv(k_cache[layer, pos], k_new, kind)
    _store_kv(v_cache[layer, pos], v_new, kind)
    n = pos + 1
    k, v = k_cache[layer, :n], v_cache[layer, :n]
    k, v = k.reshape((1,) + k.shape), v.reshape((1,) + v.shape)
    if launch and n_threads > 1 and q.shape[2] * n * q.shape[3] >= cpu_pool.PARALLEL_MIN_WORK:
        n_split, split_len, _, O_part, M_part, L_part = _decode_mk_plan(q, k, n_threads)
        call_at(launch, (part, n_threads, (q, k, v, scale, causal, kind, family, n_split,
                                           split_len, O_part, M_part, L_part)))
        _decode_mk_merge(out, O_part, M_part, L_part, n_split)
    else:
        call_at(serial, (out, q, k, v, scale, causal, kind, family))


def decode_layer_args(out, q, k_new, v_new, k_cache, v_cache, scale, parallel=False):
    """(address, cache arguments) of decode_layer for a compiled decode step over this KV
    cache (arrays (layers, max_seq, Hkv, d) of float32, bfloat16 or float16), with the threads'
    schedule compiled too where `parallel`; or None where decode takes another schedule (head
    sizes not a multiple of 32; float16 without F16C)."""
    kind = KV_KINDS[np.dtype(k_cache.dtype)]
    if q.shape[3] % 32 or (kind is KV_F16 and not fast_path("f16c")):
        return None
    if kind is not KV_F32:
        k_cache, v_cache = k_cache.view(np.uint16), v_cache.view(np.uint16)
    family = DECODE_FAMILIES[bf16_dots(kind, q.shape[2] // k_cache.shape[2])]
    k, v = k_cache[0, :1][None], v_cache[0, :1][None]      # the types attention sees
    scale, causal = float(scale), True
    serial = cpu_pool.address(_attention_decode_mk_serial, out, q, k, v, scale, causal, kind,
                              family, parts=False)
    part = launch = 0
    if parallel:
        tasks = (q, k, v, scale, causal, kind, family, *_DECODE_PLAN)
        part = cpu_pool.address(_decode_part, *tasks)
        launch = cpu_pool.address(cpu_pool._launch, part, 2, tasks, parts=False)
    kv = (k_cache, v_cache, kind, family, serial, part, launch, causal)
    return cpu_pool.address(decode_layer, out, q, k_new, v_new, 0, 0, scale, 1, *kv,
                            parts=False), kv
