"""The CPU decode attention's parts at TinyLlama's shape (32 query / 4 KV heads, head dim 64,
2000 keys), each in a loop of its own on one thread: the scores micro-kernel (with and without
its prefetch of the next key block), the online softmax step and the P V accumulation (and with
bfloat16 K/V and products where the CPU has AVX-512 BF16); then
the whole kernel warm (K/V in cache) on 1 and 2 threads, and cold on 2 (96 MB read before each
call, as a model's weights stream between its layers' attention), for float32, float16 and
bfloat16 K/V (the last also with bfloat16 products). Last, the core's peak multiply-add rates
(float32 FMA, vdpbf16ps, vpdpbusd: twelve independent accumulators, no memory) and the
kernel's multiply-adds per second against them.

    python bench/profile_decode_attention_cpu.py"""
import os
import sys
import time

import ml_dtypes
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn.kernels import attention_cpu as A  # noqa: E402
from numba_attn.kernels.llvm_cpu import F32, I32, dpbf16ps, fast_path, fma, vpdpbusd  # noqa: E402

KV, HKV, D, G = 2000, 4, 64, 8       # keys, KV heads, head dim, query heads per KV head
BLOCK = A.BLOCK_K
QUARTER = BLOCK // HKV  # a head's share of the next block's rows, prefetched during its scores


@njit
def scores(k, qt, st, prefetching):
    # S^T of every key block and KV head, as _decode_range_mk computes them (8 rows: Q^T in
    # pairs, _qk_pairs; the timing does not depend on qt's values), prefetching a head's share
    # of the next block's rows
    kp, qp, sp = k.ctypes.data, qt.ctypes.data, st.ctypes.data
    ldk = HKV * D
    for k0 in range(0, KV - BLOCK, BLOCK):
        for hk in range(HKV):
            kh, pf = kp + 4 * (k0 * ldk + hk * D), kp + 4 * (k0 + BLOCK + hk * QUARTER) * ldk
            A._qk_narrow(BLOCK, sp, G, kh, ldk, qp + 4 * hk * D * G, D, pf, pf,
                         QUARTER * HKV if prefetching else 0, 4 * D)


@njit
def scores_bf16(k, qt, st):
    # the same with bfloat16 keys and products (_qk_pairs(bf16=True), AVX-512 BF16)
    kp, qp, sp = k.ctypes.data, qt.ctypes.data, st.ctypes.data
    ldk = HKV * D
    for k0 in range(0, KV - BLOCK, BLOCK):
        for hk in range(HKV):
            kh, pf = kp + 2 * (k0 * ldk + hk * D), kp + 2 * (k0 + BLOCK + hk * QUARTER) * ldk
            A._qk_narrow_bf16(BLOCK, sp, G, kh, ldk, qp + 4 * hk * D * G, D, pf, pf,
                              QUARTER * HKV, 2 * D)


@njit
def pv_bf16(v, st, pb, o, alpha):
    # a block's probabilities rounded into bfloat16 pairs, then P V with bfloat16 products
    vp, sp, pp, op = v.ctypes.data, st.ctypes.data, pb.ctypes.data, o.ctypes.data
    ldk = HKV * D
    for k0 in range(0, KV - BLOCK, BLOCK):
        for hk in range(HKV):
            A._pack_p_bf16(pp, sp, BLOCK)
            vh = vp + 2 * (k0 * ldk + hk * D)
            for c0 in range(0, D, 32):
                A._pv_bf16(G, op + 4 * (hk * G * D + c0), D, pp, G, vh + 2 * c0, ldk, BLOCK,
                           alpha.ctypes.data)


@njit
def softmax(st, m_run, l_run, alpha, n_vis):
    sp = st.ctypes.data
    for _ in range(0, KV - BLOCK, BLOCK):
        for hk in range(HKV):
            A._softmax8(sp, G, BLOCK, m_run.ctypes.data + 4 * hk * G,
                        l_run.ctypes.data + 4 * hk * G, alpha.ctypes.data, n_vis.ctypes.data,
                        False)


@njit
def pv(v, st, o, alpha):
    # O = O * alpha + P^T V for every key block and KV head, in 32-column halves
    vp, sp, op, ap = v.ctypes.data, st.ctypes.data, o.ctypes.data, alpha.ctypes.data
    ldk = HKV * D
    for k0 in range(0, KV - BLOCK, BLOCK):
        for hk in range(HKV):
            vh = vp + 4 * (k0 * ldk + hk * D)
            for c0 in range(0, D, 32):
                A._mk_acc(G, op + 4 * (hk * G * D + c0), D, sp, 1, G, vh + 4 * c0, ldk, BLOCK,
                          ap)


@njit(parallel=True)
def read_through(buf):
    s = 0.0
    for i in prange(buf.size // 16):     # a float a cache line
        s += buf[16 * i]
    return s


PEAK_ACC = 12                        # independent accumulators: latency x issue width, covered
# multiply-adds an instruction: 16 float lanes; 16 lanes of bfloat16 pairs; 16 lanes of 4 bytes
PEAK_OPS = {"float32 FMA": 16, "vdpbf16ps": 32, "vpdpbusd": 64}


def peak_loop(name):
    """A jitted f(n): n rounds of PEAK_ACC independent `name` instructions on zmm registers."""
    vf, vi = ir.VectorType(F32, 16), ir.VectorType(I32, 16)

    @intrinsic
    def loop(typingctx, n):
        def codegen(context, builder, signature, args):
            if name == "float32 FMA":
                op, zero, a = fma(builder, vf), ir.Constant(vf, [0.0] * 16), \
                    ir.Constant(vf, [1.0] * 16)
            elif name == "vdpbf16ps":
                op, zero, a = dpbf16ps(builder), ir.Constant(vf, [0.0] * 16), \
                    ir.Constant(vi, [0x3F803F80] * 16)
            else:
                op, zero, a = vpdpbusd(builder), ir.Constant(vi, [0] * 16), \
                    ir.Constant(vi, [0x01010101] * 16)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(PEAK_ACC)]
            with cgutils.for_range(builder, args[0]):
                for slot in acc:
                    x = builder.load(slot)
                    builder.store(builder.call(op, [a, a, x] if name == "float32 FMA"
                                               else [x, a, a]), slot)
            total = builder.load(acc[0])
            for slot in acc[1:]:
                total = (builder.add if name == "vpdpbusd" else builder.fadd)(
                    total, builder.load(slot))
            first = builder.extract_element(total, ir.Constant(I32, 0))
            return builder.sitofp(first, F32) if name == "vpdpbusd" else first
        return types.float32(n), codegen

    @njit
    def run(n):
        return loop(n)
    return run


def peak_gmacs(name, n=20_000_000):
    """The best of five runs of peak_loop(name), in 1e9 multiply-adds a second, one core."""
    f = peak_loop(name)
    f(10)
    best = min(median_us(f, n, n=1) for _ in range(5)) * 1e-6
    return n * PEAK_ACC * PEAK_OPS[name] / best / 1e9


def median_us(f, *args, n=30, before=None):
    f(*args)
    times = []
    for _ in range(n):
        if before is not None:
            before()
        t = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((KV, HKV, D)).astype(np.float32)
    v = rng.standard_normal((KV, HKV, D)).astype(np.float32)
    qt = rng.standard_normal((HKV, D, G)).astype(np.float32)
    st = rng.standard_normal((BLOCK, G)).astype(np.float32)
    o = np.zeros((HKV, G, D), np.float32)
    alpha = np.ones(G, np.float32)
    m_run = np.full((HKV, G), -np.inf, np.float32)
    l_run = np.zeros((HKV, G), np.float32)
    n_vis = np.full(G, BLOCK, np.int32)
    print(f"one thread, {KV} keys, {HKV * G}/{HKV} heads, head dim {D}, float32:")
    print(f"  scores: {median_us(scores, k, qt, st, True):.0f} us (without the prefetch "
          f"{median_us(scores, k, qt, st, False):.0f} us)")
    print(f"  online softmax: {median_us(softmax, st, m_run, l_run, alpha, n_vis):.0f} us")
    print(f"  P V: {median_us(pv, v, st, o, alpha):.0f} us")
    if A.fast_path("avx512bf16"):
        kb, vb = (a.astype(ml_dtypes.bfloat16).view(np.uint16) for a in (k, v))
        qb = rng.integers(0, 1 << 31, (HKV, D, G)).astype(np.uint32)   # bfloat16 pairs' bits
        pb = np.empty(BLOCK * G // 2, np.uint32)
        sc, pv2 = median_us(scores_bf16, kb, qb, st), median_us(pv_bf16, vb, st, pb, o, alpha)
        print(f"  bfloat16 K/V with bfloat16 products: scores {sc:.0f} us, P V (probabilities "
              f"rounded into pairs first) {pv2:.0f} us")
    q = rng.standard_normal((1, 1, HKV * G, D)).astype(np.float32)
    out = np.empty_like(q)
    buf = np.ones(96 << 18, np.float32)
    bf16_dots = A.fast_path("avx512bf16")
    rates = {}                          # the whole kernel's 1-thread warm us, by family
    for dt, dots in ((np.float32, False), (np.float16, False), (ml_dtypes.bfloat16, False)) + (
            ((ml_dtypes.bfloat16, True),) if bf16_dots else ()):
        work = A.DECODE_FAMILIES[dots]
        kind = A.KV_KINDS[np.dtype(dt)]
        kk, vv = (rng.standard_normal((1, KV, HKV, D)).astype(dt) for _ in range(2))
        if kind is not A.KV_F32:
            kk, vv = kk.view(np.uint16), vv.view(np.uint16)
        part = A.cpu_pool.address(A._decode_part, q, kk, vv, 0.125, True, kind, work,
                                  *A._DECODE_PLAN)
        one, two = (median_us(A._attention_decode_mk, part, out, q, kk, vv, 0.125, True, kind,
                              n, work) for n in (1, 2))
        cold = median_us(A._attention_decode_mk, part, out, q, kk, vv, 0.125, True, kind, 2,
                         work, before=lambda: read_through(buf))
        how = " (vdpbf16ps)" if dots else ""
        print(f"whole kernel, {np.dtype(dt).name} K/V{how}, warm: 1 thread {one:.0f} us, "
              f"2 threads {two:.0f} us; cold, 2 threads {cold:.0f} us")
        if dt is np.float32 or dots:
            rates["vdpbf16ps" if dots else "float32 FMA"] = one
    macs = 2 * KV * HKV * G * D                       # q k^T and P V
    print(f"one core's peak multiply-adds (this call's: {macs / 1e6:.1f} M):")
    for name in PEAK_OPS:
        if name != "float32 FMA" and not fast_path({"vdpbf16ps": "avx512bf16",
                                                     "vpdpbusd": "avx512vnni"}[name]):
            continue
        peak = peak_gmacs(name)
        print(f"  {name:11s} {peak:4.0f} GMAC/s: the products alone {macs / peak / 1e3:.1f} us",
              end="")
        kernel = rates.get(name)
        if kernel:
            print(f"; the kernel ({'float32' if name == 'float32 FMA' else 'bfloat16'} K/V, one "
                  f"thread, warm) {macs / kernel / 1e3:.0f} GMAC/s, "
                  f"{macs / kernel / 1e3 / peak:.0%} of it", end="")
        print()


if __name__ == "__main__":
    main()
