"""Decode speed of one model in one process, round by round: a quick A/B between commits
(run it from each commit's checkout, alternating) or between float32's two decode GEMVs.

    python bench/decode_tokens_per_s.py /tmp/tinyllama q8_0 [--f32-rows one|four] [--rounds 5]
                                        [--prompt 8]

Each round: a prompt (8 tokens), then 32 decode steps timed; tokens/s a round and the median,
and the seconds Model.warmup took (with Numba's cache empty: what it compiles; a first round
far slower than the rest: what it left to compile).
/tmp/tinyllama: the folder bench_model.py writes (TinyLlama-1.1B's shape, random weights)."""
import argparse
import time

import numpy as np

from numba_attn.kernels import linear_cpu
from numba_attn.model import Model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("weight_dtype")
    ap.add_argument("--f32-rows", choices=("one", "four"),
                    help="float32 decode GEMVs: one row of w a step or 4 interleaved "
                         "(default: the host's choice, llvm_cpu.ONE_STREAM_DECODE_F32)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens before the steps")
    a = ap.parse_args()
    if a.f32_rows:
        linear_cpu.ONE_STREAM_DECODE = a.f32_rows == "one"    # read when a GEMV is bound
    m = Model.from_pretrained(a.model, weight_dtype=a.weight_dtype,
                              max_seq=max(256, a.prompt + 40))
    t = time.perf_counter()
    m.warmup()
    warm = time.perf_counter() - t
    rates = []
    for _ in range(a.rounds):
        m.cache.reset()
        m.forward(np.arange(1, a.prompt + 1, dtype=np.int64), 0)
        t = time.perf_counter()
        for pos in range(a.prompt, a.prompt + 32):
            m.forward(np.array([5], np.int64), pos)
        rates.append(32 / (time.perf_counter() - t))
    rows = f" ({a.f32_rows} row{'s' if a.f32_rows == 'four' else ''})" if a.f32_rows else ""
    print(f"{a.weight_dtype}{rows}: " + " ".join(f"{r:.2f}" for r in rates)
          + f"  median {np.median(rates):.2f} tok/s (warm-up {warm:.1f} s)")


if __name__ == "__main__":
    main()
