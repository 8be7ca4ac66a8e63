"""The CPU attention's speed at TinyLlama's heads (32 query / 4 KV heads, head dim 64), one line:
prefill-512 causal (best and median of 25 calls) over float32 and bfloat16 K/V, then decode
(median of 300 calls) for 1 and 3 queries at 2000 keys and 1 query at 64, float32 / bfloat16 /
float16 K/V. For A/B between commits run it from each checkout in turn, alternating:

    PYTHONPATH=/path/to/checkout python bench/attention_speed.py"""
import time

import ml_dtypes
import numpy as np

from numba_attn.kernels import attention_cpu as A

H, HKV, D = 32, 4, 64


def timed(q, k, v, calls, stat):
    out = np.empty_like(q)
    A.attention(out, q, k, v, 0.125, True)                # compiled (or loaded) first
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        A.attention(out, q, k, v, 0.125, True)
        ts.append(time.perf_counter() - t)
    return stat(ts)


def main():
    rng = np.random.default_rng(0)
    parts = [A.__file__]
    for dt in (np.float32, ml_dtypes.bfloat16):
        q = rng.standard_normal((1, 512, H, D), dtype=np.float32)
        k = rng.standard_normal((1, 512, HKV, D), dtype=np.float32).astype(dt)
        best, med = timed(q, k, k.copy(), 25, lambda ts: (min(ts), np.median(ts)))
        parts.append(f"prefill-512 {np.dtype(dt).name} best {best * 1e3:.2f} "
                     f"med {med * 1e3:.2f} ms")
    for dt in (np.float32, ml_dtypes.bfloat16, np.float16):
        for q_len, kv in ((1, 2000), (3, 2000), (1, 64)):
            q = rng.standard_normal((1, q_len, H, D), dtype=np.float32)
            k = rng.standard_normal((1, kv, HKV, D), dtype=np.float32).astype(dt)
            us = timed(q, k, k.copy(), 300, np.median) * 1e6
            parts.append(f"decode {np.dtype(dt).name} {q_len}q {kv} keys {us:.0f} us")
    print(" | ".join(parts))


if __name__ == "__main__":
    main()
