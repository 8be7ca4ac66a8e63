"""A CPU model's decode step compiled whole (Model.decoder, cpu_decode.CpuDecoder) against the
same step through its kernels called one by one from Python (CpuDecodeSteps), on a model
folder (e.g. the TinyLlama-shaped one bench_model.py writes): two models over the same
weights, each after the same prompt, decoding in turn token by token (the order alternating
by pair); the median of the per-pair ratios, and the first step's largest logit difference.

    python bench/ab_cpu_decoder.py /tmp/tinyllama --weight-dtype q8_0 [--context 16]
        [--steps 40]"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn.model import Model  # noqa: E402  (before NumPy: numba_attn's thread settings)
import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--context", type=int, default=16, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=40, help="pairs of steps")
    args = ap.parse_args()
    max_seq = args.context + args.steps + 2
    whole = Model.from_pretrained(args.path, weight_dtype=args.weight_dtype, max_seq=max_seq)
    steps = Model(whole.config, whole.weights, max_seq=max_seq, kv_dtype=whole.kv_dtype)
    steps.decoder = None
    prompt = np.random.default_rng(0).integers(1, whole.config.vocab_size, args.context)
    for m in (whole, steps):
        m.warmup()
        m.forward(prompt, 0)
    pos = args.context
    diff = np.abs(whole.forward([7], pos) - steps.forward([7], pos)).max()
    pos += 1
    times = {"whole": [], "steps": []}
    for i in range(args.steps):
        pair = (("whole", whole), ("steps", steps))
        for name, m in (pair if i % 2 else pair[::-1]):
            t = time.perf_counter()
            m.forward([5], pos)
            times[name].append(time.perf_counter() - t)
        pos += 1
    a, b = np.array(times["steps"]), np.array(times["whole"])
    r = a / b
    print(f"{whole.weight_dtype} weights, {whole.kv_dtype} KV cache, context {args.context}: "
          f"steps {np.median(a) * 1e3:.2f} ms, compiled whole {np.median(b) * 1e3:.2f} ms a "
          f"token; steps / whole per pair {np.median(r):.3f} (quartiles "
          f"{np.percentile(r, 25):.3f}-{np.percentile(r, 75):.3f}); first step's logits "
          f"within {diff:.1e}")


if __name__ == "__main__":
    main()
