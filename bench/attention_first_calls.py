"""The CPU attention's first calls with an empty Numba cache, in a fresh process: decode at 20
keys and prefill of 8 queries (one thread, as the demo model runs them), then decode at 2000
keys (the pool's threads). The heads are the demo model's (6 query, 2 KV, head size 32), K/V
float16. Run it from two checkouts, alternating, for an A/B of compile time:

    python bench/attention_first_calls.py [CHECKOUT]     (default: this one)"""
import os
import sys
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()
root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, root)

import numpy as np  # noqa: E402

from numba_attn.kernels import attention_cpu  # noqa: E402


def first_call(q_len, kv_len, rng):
    q = rng.random((1, q_len, 6, 32), dtype=np.float32)
    k = rng.random((1, kv_len, 2, 32)).astype(np.float16)
    out = np.empty_like(q)
    t = time.perf_counter()
    attention_cpu.attention(out, q, k, k, 0.1, True)
    return time.perf_counter() - t


def main():
    assert attention_cpu.__file__.startswith(root), attention_cpu.__file__
    rng = np.random.default_rng(0)
    print(f"{root}: decode {first_call(1, 20, rng):.2f} s, prefill {first_call(8, 8, rng):.2f} s, "
          f"decode on the pool {first_call(1, 2000, rng):.2f} s")


if __name__ == "__main__":
    main()
