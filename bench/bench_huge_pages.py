"""Where the weights' pages come from, decoding in turn: each weight format loaded once per
allocation into one process, the models decoding in turn token by token so all see the same
machine. Allocations:
  numpy    NumPy's own (it hints transparent huge pages for arrays of 4 MiB or more, from
           wherever their block starts): weights.HUGE_PAGES off
  mapping  a mapping of its own a tensor, starting on a huge page (weights.aligned_empty)
  arena    tensors end to end in 256 MiB mappings in huge pages (weights.HostArena, the default)
Prints how much of each model's weights sit in huge pages, each one's decode rate, and the
median over steps of the first allocation's step over each other's just after it.

    python bench/bench_huge_pages.py /tmp/tinyllama [--weight-dtype float32,bfloat16,q8_0]
        [--alloc numpy,mapping,arena] [--steps 40]"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn import weights  # noqa: E402
from numba_attn.model import Model  # noqa: E402

ARENA_EMPTY = weights.HostArena.empty


def mapping_empty(arena, shape, dtype):
    return weights.aligned_empty(shape, dtype)


def use(alloc):
    """Make the next load allocate its weights the `alloc` way."""
    weights.HUGE_PAGES = alloc != "numpy"
    weights.HostArena.empty = mapping_empty if alloc == "mapping" else ARENA_EMPTY


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
    ap.add_argument("--alloc", default="numpy,mapping,arena")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if not weights.HUGE_PAGES:
        sys.exit("this Python's mmap has no MADV_HUGEPAGE (not Linux): nothing to compare")
    fmts, allocs = args.weight_dtype.split(","), args.alloc.split(",")
    models = {}
    for fmt in fmts:
        for alloc in allocs:
            use(alloc)
            before = anon_huge_gb()
            m = Model.from_pretrained(args.path, weight_dtype=fmt, max_seq=args.steps + 17)
            print(f"{fmt}, {alloc}: {m.weights.nbytes / 1e9:.2f} GB of weights, "
                  f"{anon_huge_gb() - before:.2f} GB of them in huge pages", flush=True)
            m.warmup()
            m.forward(np.arange(1, 17), 0)
            models[fmt, alloc] = (m, [])
    use("arena")
    for i in range(args.steps):
        for m, times in models.values():
            t = time.perf_counter()
            m.forward([5], 16 + i)
            times.append(time.perf_counter() - t)
    print(f"decode, {args.steps} steps in turn (tok/s, medians; x: against {allocs[0]}):")
    for fmt in fmts:
        first = models[fmt, allocs[0]][1]
        cells = []
        for alloc in allocs:
            times = models[fmt, alloc][1]
            gain = statistics.median(a / b for a, b in zip(first, times))
            cells.append(f"{alloc} {1 / statistics.median(times):6.2f} (x{gain:.3f})")
        print(f"  {fmt:9s} " + ", ".join(cells))


if __name__ == "__main__":
    main()
