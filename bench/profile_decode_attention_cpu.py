"""The CPU decode attention's parts at TinyLlama's shape (32 query / 4 KV heads, head dim 64,
2000 keys), each in a loop of its own on one thread: the scores micro-kernel (with and without
its prefetch of the next key block), the online softmax step and the P V accumulation (and with
bfloat16 K/V and products where the CPU has AVX-512 BF16); then
the whole kernel warm (K/V in cache) on 1 and 2 threads, and cold on 2 (96 MB read before each
call, as a model's weights stream between its layers' attention), for float32, float16 and
bfloat16 K/V (the last also with bfloat16 products).

    python bench/profile_decode_attention_cpu.py"""
import os
import sys
import time

import ml_dtypes
import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn.kernels import attention_cpu as A  # noqa: E402

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
    for dt, dots in ((np.float32, False), (np.float16, False), (ml_dtypes.bfloat16, False)) + (
            ((ml_dtypes.bfloat16, True),) if bf16_dots else ()):
        work = A.DECODE_FAMILIES[dots]
        kind = A.KV_KINDS[np.dtype(dt)]
        kk, vv = (rng.standard_normal((1, KV, HKV, D)).astype(dt) for _ in range(2))
        if kind != A.KV_F32:
            kk, vv = kk.view(np.uint16), vv.view(np.uint16)
        one, two = (median_us(A._attention_decode_mk, out, q, kk, vv, 0.125, True, kind, n,
                              work) for n in (1, 2))
        cold = median_us(A._attention_decode_mk, out, q, kk, vv, 0.125, True, kind, 2, work,
                         before=lambda: read_through(buf))
        how = " (vdpbf16ps)" if dots else ""
        print(f"whole kernel, {np.dtype(dt).name} K/V{how}, warm: 1 thread {one:.0f} us, "
              f"2 threads {two:.0f} us; cold, 2 threads {cold:.0f} us")


if __name__ == "__main__":
    main()
