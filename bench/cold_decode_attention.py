"""The 8-bit KV cache's decode attention (TinyLlama's heads: 32 query / 4 KV heads, head dim
64) called in a loop, against the same call right after a large array was read through the
caches, as a decode step's GEMVs read its weights: the cost of the kernel's own code and
scratch coming back from memory.

    python bench/cold_decode_attention.py [KEYS ...]      (default: 16 256 2000)"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba_attn  # noqa: E402,F401  (sets the BLAS and OpenMP thread waits before NumPy)
import numpy as np  # noqa: E402

from numba_attn.formats import quantize_kv_int8  # noqa: E402
from numba_attn.kernels import attention_int8_cpu as ai  # noqa: E402

STREAM_BYTES = 40_000_000       # about a TinyLlama q8_0 layer's weights


def main():
    keys = [int(a) for a in sys.argv[1:]] or [16, 256, 2000]
    isa = ai.decode_isa()
    if isa is None:
        sys.exit("no 8-bit products on this host (or NUMBA_ATTN_CPU_PATH=portable)")
    rng = np.random.default_rng(0)
    junk = np.ones(STREAM_BYTES // 4, np.float32)
    for n in keys:
        q = rng.standard_normal((1, 1, 32, 64)).astype(np.float32)
        out = np.empty_like(q)
        k, v = (quantize_kv_int8(rng.standard_normal((1, n, 4, 64)).astype(np.float32))
                for _ in range(2))
        args = (isa, out, q, k.codes, k.scales, v.codes, v.scales, 0.125, True)
        f = ai._decode                   # one thread or the pool, as the library picks
        f(*args)
        warm, cold = [], []
        for _ in range(200):
            t = time.perf_counter()
            f(*args)
            warm.append(time.perf_counter() - t)
            junk.sum()
            t = time.perf_counter()
            f(*args)
            cold.append(time.perf_counter() - t)
        print(f"{n} keys: {statistics.median(warm) * 1e6:.1f} us in a loop, "
              f"{statistics.median(cold) * 1e6:.1f} us after {STREAM_BYTES / 1e6:.0f} MB read")


if __name__ == "__main__":
    main()
