"""A weight format's kernel family as a git revision has it against the working tree's, in a
model's decode steps token by token in one process (one model, two step objects: each GEMV
through its own family's bound kernel; the steps alternate, which goes first alternating from
pair to pair). The machine's bandwidth drifts by tens of percent between minutes, so only the
ratios of neighbouring steps compare.

    python bench/ab_decode_step.py /tmp/tinyllama --weight-dtype q8_0 --at HEAD~1 [--steps 40]"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba_attn  # noqa: E402,F401  (sets the BLAS and OpenMP thread waits before NumPy)
import numpy as np  # noqa: E402

from kernel_variants import kernel_source, load_kernel  # noqa: E402
from numba_attn.cpu_decode import CpuDecodeSteps  # noqa: E402
from numba_attn.formats import weight_format  # noqa: E402
from numba_attn.model import Model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--weight-dtype", default="q8_0")
    ap.add_argument("--at", default="HEAD", help="the git revision of the other family")
    ap.add_argument("--steps", type=int, default=40, help="pairs of steps")
    args = ap.parse_args()
    model = Model.from_pretrained(args.path, weight_dtype=args.weight_dtype,
                                  max_seq=2 * args.steps + 32)
    fmt = weight_format(model.weights.lm_head)
    family = fmt.family("cpu")
    relative = f"numba_attn/kernels/{family}_cpu.py"
    other = load_kernel(kernel_source(relative, args.at), f"{family}_at_rev", tempfile.mkdtemp())
    model.decoder = None          # the steps, whose kernel family is swapped below
    model.warmup()
    model.forward(np.arange(1, 17), 0)
    ours = model.cpu_steps
    theirs = CpuDecodeSteps(model)
    theirs.families[fmt.name] = other
    pos = 16
    for steps in (theirs, ours):                        # each one's first step compiles
        model.cpu_steps = steps
        model.forward([5], pos)
        pos += 1
    times = {"at": [], "tree": []}
    for i in range(args.steps):
        pair = (("at", theirs), ("tree", ours))
        for name, steps in (pair if i % 2 else pair[::-1]):
            model.cpu_steps = steps
            t = time.perf_counter()
            model.forward([5], pos)
            times[name].append(time.perf_counter() - t)
            pos += 1
    model.cpu_steps = ours
    at, tree = np.array(times["at"]), np.array(times["tree"])
    ratio = at / tree
    print(f"{args.path}, {model.weight_dtype} weights ({relative}): {args.at} "
          f"{statistics.median(at) * 1e3:.2f} ms a token, working tree "
          f"{statistics.median(tree) * 1e3:.2f}; {args.at} / tree per pair: median "
          f"{np.median(ratio):.3f} (quartiles {np.percentile(ratio, 25):.3f}, "
          f"{np.percentile(ratio, 75):.3f}), {args.steps} pairs")


if __name__ == "__main__":
    main()
