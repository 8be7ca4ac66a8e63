"""What a decode step's small calls cost with the caches cold, as they run in a model (each
between two weight streams of megabytes): the decode attention at 16 keys (TinyLlama's 32/4
heads, head dim 64, float16 K/V) warm, after a 96 MB read, after the read with only its data
touched again, and after the read with its code run once on other K/V; then the Python pieces
of its wrapper alone, warm and cold.

    python bench/cold_step_costs.py"""
import os
import sys

import numpy as np
from numba import njit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn.kernels import attention_cpu as A  # noqa: E402
from profile_decode_attention_cpu import median_us, read_through  # noqa: E402  (bench/)


@njit
def touch(a):
    # read a line of a (any shape) every 32 elements
    s = 0.0
    f = a.reshape(-1)
    for i in range(0, f.size, 32):
        s += f[i]
    return s


def main():
    rng = np.random.default_rng(0)
    big = np.ones(96 << 18, np.float32)
    q = rng.standard_normal((1, 1, 32, 64)).astype(np.float32)
    out = np.empty_like(q)
    K, V, K2, V2 = (rng.standard_normal((1, 2048, 4, 64)).astype(np.float16) for _ in range(4))
    k, v = K[:, :16], V[:, :16]

    def flush():
        read_through(big)

    def data_warm():
        flush()
        for a in (k.view(np.uint16), v.view(np.uint16), q, out):
            touch(a)

    def code_warm():
        flush()
        A.attention(out, q, K2[:, :16], V2[:, :16], 0.125, True)

    args = (out, q, k, v, 0.125, True)
    print("decode attention, 16 keys, float16 K/V (attention_cpu.attention):")
    for name, before in (("warm", None), ("after a 96 MB read", flush),
                         ("after it, data touched again", data_warm),
                         ("after it, code run on other K/V", code_warm)):
        n = 300 if before is None else 30
        print(f"  {name:32s} {median_us(A.attention, *args, n=n, before=before):.1f} us")
    print("its wrapper's Python pieces alone, warm / after a 96 MB read:")
    pieces = {"kind lookup": lambda: A.KV_KINDS[np.dtype(k.dtype)],
              "two uint16 views": lambda: (k.view(np.uint16), v.view(np.uint16)),
              "the family": lambda: A.DECODE_FAMILIES[A.bf16_dots(A.KV_F16, 8)],
              "nothing (a call)": lambda: None}
    for name, f in pieces.items():
        print(f"  {name:18s} {median_us(f, n=300):.2f} / {median_us(f, n=30, before=flush):.2f} us")


if __name__ == "__main__":
    main()
