"""The decode GEMVs' prefetch locality, A/B in one process: four models over the same weights,
decoded in turn token by token (the one starting each round rotating): after a 16-token prompt
and after a long one, each with the package's decode GEMVs (llvm_cpu.ONE_STREAM_DECODE's: w
prefetched with linear_cpu.STREAM_LOCALITY) or with a copy of the format's module prefetching
with another locality (3: into every level, as before prefetchnta). Needs an AMD Zen host (the
one-stream GEMVs).

    python bench/ab_stream_locality.py /tmp/tinyllama --weight-dtype q8_0 [--locality 3]
        [--long-context 2000] [--steps 40] [--block 8]"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from kernel_variants import kernel_source, load_kernel  # noqa: E402
from numba_attn.kernels.llvm_cpu import ONE_STREAM_DECODE  # noqa: E402
from numba_attn.model import Model  # noqa: E402

MODULES = {"float32": "linear_cpu", "float16": "linear_bf16_cpu",
           "bfloat16": "linear_bf16_cpu", "q8_0": "linear_q8_cpu"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--weight-dtype", default="q8_0", choices=list(MODULES))
    ap.add_argument("--locality", type=int, default=3, choices=(0, 1, 2, 3))
    ap.add_argument("--long-context", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--block", type=int, default=0,
                    help="decode one pair (near and far) for this many steps, then the other "
                         "(two models' caches at a time, as a model decodes alone); 0: all four "
                         "in turn")
    args = ap.parse_args()
    if not ONE_STREAM_DECODE:
        sys.exit("this host's decode GEMVs are not the one-stream ones (an AMD Zen's)")
    name = MODULES[args.weight_dtype]
    src = kernel_source(f"numba_attn/kernels/{name}.py")
    for old in (", STREAM_LOCALITY)", " STREAM_LOCALITY)"):
        src = src.replace(old, f" {args.locality})" if old[0] == " " else f", {args.locality})")
    variant = load_kernel(src, f"{name}_locality{args.locality}", tempfile.mkdtemp())

    base = Model.from_pretrained(args.path, weight_dtype=args.weight_dtype,
                                 max_seq=args.long_context + args.steps + 1)
    c = base.config
    models = {}
    for key in ("near", "far", "near, variant", "far, variant"):
        m = base if key == "near" else Model(c, base.weights, max_seq=base.max_seq,
                                               kv_dtype=base.kv_dtype)
        m.decoder = None          # the steps, whose kernel family the variants swap
        if key.endswith("variant"):
            m.cpu_steps.families[base.weight_dtype] = variant
        models[key] = m
    base.warmup()
    rng = np.random.default_rng(0)
    state = {}
    for key, m in models.items():
        n = args.long_context if key.startswith("far") else 16
        state[key] = [int(np.argmax(m.forward(rng.integers(0, c.vocab_size, n), 0))), n, []]
    step = np.empty(1, np.int64)
    keys = list(models)
    for i in range(args.steps):
        if args.block:           # a block of steps of one pair (near and far, in turn), then the other's
            pair = keys[:2] if (i // args.block) % 2 == 0 else keys[2:]
            order = pair if i % 2 == 0 else pair[::-1]
        else:
            order = keys[i % 4:] + keys[:i % 4]
        for key in order:
            tok, pos, times = state[key]
            step[0] = tok
            t = time.perf_counter()
            state[key][0] = int(np.argmax(models[key].forward(step, pos)))
            times.append(time.perf_counter() - t)
            state[key][1] = pos + 1
    T = {key: np.array(s[2][2:]) for key, s in state.items()}     # the first two: warming
    print(f"{args.weight_dtype} weights, {base.kv_dtype} KV cache; the package's decode GEMVs "
          f"against a copy prefetching with locality {args.locality}; medians of "
          f"{len(T['near'])} steps " + (f"in blocks of {args.block} a pair" if args.block
                                       else "in turn"))
    for key, t in T.items():
        print(f"  {key:14s} {np.median(t) * 1e3:6.2f} ms a token")
    for a, b in (("far", "near"), ("far, variant", "near, variant"), ("near", "near, variant"),
                 ("far", "far, variant")):
        print(f"  {a} / {b}: {np.median(T[a] / T[b]) - 1:+.2%} (step time, median of pairs)")


if __name__ == "__main__":
    main()
