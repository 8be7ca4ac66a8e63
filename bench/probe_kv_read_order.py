"""How the order of a decode attention's reads sets their speed from memory: one layer's K and
V at TinyLlama's shape (2000 keys, 4 KV heads, head dim 64, float32: 4 MB), read once on the
machine's threads (each a half of the keys) right after 40 MB of other reads, as a layer's
attention follows its weights in a model; warm: the same read again at once. Orders:

- address:      key by key, every head of a key (the cache's rows in address order);
- head-by-head: a block of 64 keys, its keys for one KV head, then the next head (decode
                attention's order, attention_cpu._decode_range_mk), K then V;
- + prefetch:   as head-by-head, with the kernel's software prefetch (the rows 64 keys on,
                whole rows in address order, a head's share a block);
- + touch:      as head-by-head, with a demand load of every line of those rows instead;
- group-G:      head by head within groups of G keys;
- head-major:   the cache laid out (Hkv, keys, d), each head's keys read in address order.

    python bench/probe_kv_read_order.py"""
import os
import sys
import time

import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from numba_attn.bench.limits import _parallel_sum  # noqa: E402
from numba_attn.kernels.attention_cpu import _prefetch_rows  # noqa: E402

LAYERS, KV, HKV, D, BLOCK = 22, 2000, 4, 64, 64
LINE = 16                                     # floats a cache line


@njit(parallel=True, fastmath=True)
def address(k, v):
    tot = np.zeros(2, np.float32)
    half = k.shape[0] // 2
    for w in prange(2):
        s = np.float32(0)
        for j in range(w * half, (w + 1) * half):
            for h in range(k.shape[1]):
                for c in range(0, k.shape[2], LINE):
                    s += k[j, h, c] + v[j, h, c]
        tot[w] = s
    return tot.sum()


def head_by_head(group=BLOCK, ahead=0, touch=False):
    @njit(parallel=True, fastmath=True)
    def read(k, v):
        tot = np.zeros(2, np.float32)
        half = k.shape[0] // 2
        row = k.shape[1] * k.shape[2] * 4
        kp, vp = k.ctypes.data, v.ctypes.data
        for w in prange(2):
            s = t = np.float32(0)
            hi = (w + 1) * half
            for k0 in range(w * half, hi, group):
                for h in range(k.shape[1]):
                    if ahead:
                        share = group // k.shape[1]
                        r0 = min(hi, k0 + ahead + h * share)
                        r1 = min(hi, k0 + ahead + (h + 1) * share)
                        if touch:
                            for j in range(r0, r1):
                                for hh in range(k.shape[1]):
                                    for c in range(0, k.shape[2], LINE):
                                        t += k[j, hh, c] + v[j, hh, c]
                        else:
                            _prefetch_rows(kp + r0 * row, r1 - r0, row, row)
                            _prefetch_rows(vp + r0 * row, r1 - r0, row, row)
                    for j in range(k0, min(k0 + group, hi)):
                        for c in range(0, k.shape[2], LINE):
                            s += k[j, h, c]
                    for j in range(k0, min(k0 + group, hi)):
                        for c in range(0, k.shape[2], LINE):
                            s += v[j, h, c]
            tot[w] = s + t
        return tot.sum()
    return read


@njit(parallel=True, fastmath=True)
def head_major(k, v):
    # k, v: (Hkv, keys, d)
    tot = np.zeros(2, np.float32)
    half = k.shape[1] // 2
    for w in prange(2):
        s = np.float32(0)
        hi = (w + 1) * half
        for k0 in range(w * half, hi, BLOCK):
            for h in range(k.shape[0]):
                for j in range(k0, min(k0 + BLOCK, hi)):
                    for c in range(0, k.shape[2], LINE):
                        s += k[h, j, c]
                for j in range(k0, min(k0 + BLOCK, hi)):
                    for c in range(0, k.shape[2], LINE):
                        s += v[h, j, c]
        tot[w] = s
    return tot.sum()


def main():
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((LAYERS, KV, HKV, D)).astype(np.float32) for _ in range(2))
    kt, vt = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (k, v))
    other = np.ones(300 << 18, np.float32)
    n = (40 << 20) // 4
    orders = {"address": address, "head-by-head": head_by_head(),
              "+ prefetch": head_by_head(ahead=64), "+ touch": head_by_head(ahead=64, touch=True),
              "group-16": head_by_head(group=16), "head-major": head_major,
              "each head whole": head_by_head(group=1 << 20)}
    times = {name: ([], []) for name in orders}
    at = 0
    for it in range(7):
        for name, f in orders.items():
            a, b = (kt, vt) if f is head_major else (k, v)
            for layer in range(LAYERS):
                _parallel_sum(other[at:at + n])
                at = (at + n) % (other.size - n)
                for mode in (0, 1):
                    t = time.perf_counter()
                    f(a[layer], b[layer])
                    if it:
                        times[name][mode].append(time.perf_counter() - t)
    nbytes = k[0].nbytes + v[0].nbytes
    print(f"one layer's K and V ({nbytes / 1e6:.1f} MB float32), read on 2 threads; medians of "
          f"{6 * LAYERS} reads in turn:")
    for name, (cold, warm) in times.items():
        c = np.median(cold)
        print(f"  {name:13s} cold {c * 1e6:4.0f} us ({nbytes / c / 1e9:3.0f} GB/s)  "
              f"warm {np.median(warm) * 1e6:4.0f} us")


if __name__ == "__main__":
    main()
