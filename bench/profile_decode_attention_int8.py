"""The 8-bit KV cache's decode attention in parts, on this host's instruction set for its
products (attention_int8_cpu.decode_isa: AVX-512 VNNI or AVX2; NUMBA_ATTN_CPU_PATH=avx2 for
AVX2's on a VNNI CPU), each part in a loop of its own on one thread, everything in L1: one KV
head's key block (64 keys, TinyLlama's 8 query rows a KV head, head dim 64) scored, its online
softmax step, its P V weights packed, the value codes interleaved (AVX2) and P V with the
interleaving; each in ns, in cycles at the clock given, and as microseconds a layer at 2000
keys and 4 KV heads on 2 cores. Then the whole kernel, warm, on the pool and on one thread.

    python bench/profile_decode_attention_int8.py [--ghz 3.2]"""
import argparse
import os
import sys
import time

import numpy as np
from numba import njit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn.formats import quantize_kv_int8  # noqa: E402
from numba_attn.kernels import attention_int8_cpu as m  # noqa: E402
from numba_attn.kernels.attention_cpu import _softmax8  # noqa: E402

D, NK, HKV, KV = 64, 64, 4, 2000
LDK = HKV * D
BLOCKS = KV // NK * HKV                 # key blocks of one KV head, a layer


@njit
def _scores(reps, isa, st, kc, qb, ks, qi):
    for _ in range(reps):
        m._head_scores(isa, NK, st.ctypes.data, kc.ctypes.data, LDK, qb.ctypes.data, D,
                       ks.ctypes.data, HKV, qi.ctypes.data, 0, 0, 0)


@njit
def _softmax(reps, st, mr, lr, al, nv):
    for _ in range(reps):
        mr[:] = -np.inf
        lr[:] = 0
        _softmax8(st.ctypes.data, 8, NK, mr.ctypes.data, lr.ctypes.data, al.ctypes.data,
                  nv.ctypes.data, False)


@njit
def _pack(reps, st, vs, pw, wq):
    for _ in range(reps):
        m._pack_weights(pw.ctypes.data, st.ctypes.data, NK, vs.ctypes.data, HKV, wq.ctypes.data)


@njit
def _interleave(reps, isa, vt, vc):
    for _ in range(reps):
        m._interleave_v(isa, vt.ctypes.data, vc.ctypes.data, LDK, NK, D)


@njit
def _pv(reps, isa, o, pw, vt, vc, al, wq):
    for _ in range(reps):
        m._head_pv(isa, 8, NK, o.ctypes.data, D, pw.ctypes.data, vc.ctypes.data, LDK,
                   al.ctypes.data, wq.ctypes.data, vt.ctypes.data)


def best_ns(f, *args, reps=100000):
    f(1, *args)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(reps, *args)
        times.append(time.perf_counter() - t)
    return min(times) / reps * 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ghz", type=float, default=3.2, help="the core's clock, for cycles")
    args = ap.parse_args()
    isa = m.decode_isa()
    if isa is None:
        sys.exit("no 8-bit products on this host (or NUMBA_ATTN_CPU_PATH=portable)")
    name = "vnni" if isa is m.VNNI else "avx2"
    rng = np.random.default_rng(0)
    kc, vc = (rng.integers(1, 256, (NK, HKV, D)).astype(np.uint8) for _ in range(2))
    ks = rng.random((NK, HKV)).astype(np.float32)
    lim = m._SHAPES[name][0]
    qb = rng.integers(-lim, lim + 1, D * 8).astype(np.int8)
    qi = np.zeros(16, np.int32)
    qi[8:] = np.ones(8, np.float32).view(np.int32)
    st = rng.random(NK * 8).astype(np.float32)
    pw, wq = np.zeros(NK * 2, np.int32), np.zeros(16, np.int32)
    wq[:8] = np.full(8, 0.01, np.float32).view(np.int32)
    vt = np.zeros(NK * D, np.int8)
    o = np.zeros((8, D), np.float32)
    al, mr, lr = np.ones(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32)
    nv = np.full(8, NK, np.int32)
    print(f"{name} products, one KV head's block of {NK} keys x 8 query rows, head dim {D}:")
    parts = (("scores", _scores, (isa, st, kc, qb, ks, qi)),
             ("softmax", _softmax, (st, mr, lr, al, nv)),
             ("pack weights", _pack, (st, ks, pw, wq)),
             ("interleave V", _interleave, (isa, vt, vc)),
             ("P V (+ interleave)", _pv, (isa, o, pw, vt, vc, al, wq)))
    for label, f, a in parts:
        ns = best_ns(f, *a)
        st[:] = rng.random(NK * 8)                  # the packing scales S^T in place
        print(f"  {label:20s} {ns:6.0f} ns  {ns * args.ghz:6.0f} cycles  "
              f"{ns * BLOCKS / 2 / 1000:5.1f} us a layer on 2 cores")
    q = rng.standard_normal((1, 1, HKV * 8, D)).astype(np.float32)
    out = np.empty_like(q)
    k, v = (quantize_kv_int8(rng.standard_normal((1, KV, HKV, D)).astype(np.float32))
            for _ in range(2))
    call = (out, q, k.codes, k.scales, v.codes, v.scales, 1 / np.sqrt(D), True)
    for label, f in (("pool (2 threads)", lambda: m._attention_decode(isa, *call, 2)),
                     ("one thread", lambda: m._attention_decode_serial(isa, *call))):
        f()
        ts = []
        for _ in range(300):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        print(f"  whole kernel at {KV} keys, warm, {label}: {np.median(ts) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
