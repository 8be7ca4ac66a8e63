"""Weights end to end in huge pages (weights.HostArena) against NumPy's own allocation (which
hints transparent huge pages for arrays of 4 MiB or more, from wherever their block starts):
each weight format loaded both ways into one process (weights.HUGE_PAGES off, then on), the
two decoding in turn token by token, so both see the same machine. Prints how much of each
model's weights sit in huge pages, each one's decode rate, and the median over steps of the
NumPy-allocated model's step over the arena's just after it.

    python bench/bench_huge_pages.py /tmp/tinyllama [--weight-dtype float32,bfloat16,q8_0]
        [--steps 40]"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn import weights  # noqa: E402
from numba_attn.model import Model  # noqa: E402


def anon_huge_gb():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1e6
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--weight-dtype", default="float32,bfloat16,q8_0")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if not weights.HUGE_PAGES:
        sys.exit("this Python's mmap has no MADV_HUGEPAGE (not Linux): nothing to compare")
    models = {}
    for fmt in args.weight_dtype.split(","):
        for huge in (False, True):
            weights.HUGE_PAGES = huge
            before = anon_huge_gb()
            m = Model.from_pretrained(args.path, weight_dtype=fmt, max_seq=args.steps + 17)
            how = "arena" if huge else "NumPy's"
            print(f"{fmt}, {how} allocation: {m.weights.nbytes / 1e9:.2f} GB "
                  f"of weights, {anon_huge_gb() - before:.2f} GB of them in huge pages",
                  flush=True)
            m.warmup()
            m.forward(np.arange(1, 17), 0)
            models[fmt, huge] = (m, [])
    weights.HUGE_PAGES = True
    for i in range(args.steps):
        for m, times in models.values():
            t = time.perf_counter()
            m.forward([5], 16 + i)
            times.append(time.perf_counter() - t)
    print(f"decode, {args.steps} steps in turn (tok/s, medians):")
    for fmt in args.weight_dtype.split(","):
        small, huge = models[fmt, False][1], models[fmt, True][1]
        gain = statistics.median(a / b for a, b in zip(small, huge))
        print(f"  {fmt:9s} NumPy's {1 / statistics.median(small):6.2f}, arena "
              f"{1 / statistics.median(huge):6.2f}: x{gain:.3f}")


if __name__ == "__main__":
    main()
