"""A decode step's GEMVs with x placed at chosen byte offsets past a page boundary, in turn in one
process: does this CPU's one-row GEMV care where x lies? (On AMD Zen 4 the 16-bit kernels ran
30% slower with x on a 32-byte boundary: linear_bf16_cpu.DECODE_X_SKEW.) The GEMVs are bound
here with no skew of their own, so x is read where it is placed.

    python bench/decode_x_offset.py /tmp/tinyllama --weight-dtype bfloat16 --offsets 0,10,20,4
        [--rounds 5]      (offsets in hex bytes)"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba_attn  # noqa: E402,F401  (sets the BLAS and OpenMP thread waits before NumPy)
import numpy as np  # noqa: E402

from numba_attn.backend import kernels  # noqa: E402
from numba_attn.formats import weight_format  # noqa: E402
from numba_attn.kernels import linear_bf16_cpu  # noqa: E402
from numba_attn.model import MATRICES, Model  # noqa: E402


def placed(offset, k):
    """A (1, k) float32 buffer starting `offset` bytes past a page boundary."""
    raw = np.empty(k * 4 + 8192, np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    return raw[start:start + 4 * k].view(np.float32).reshape(1, k)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--weight-dtype", default="bfloat16")
    ap.add_argument("--offsets", default="0,10,20,4")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    offsets = [int(v, 16) for v in args.offsets.split(",")]
    model = Model.from_pretrained(args.path, weight_dtype=args.weight_dtype, max_seq=16)
    w = model.weights
    mats = [(name, getattr(lw, name)) for lw in w.layers for name in MATRICES]
    linear_bf16_cpu.DECODE_X_SKEW = 0                    # x read where it is placed
    family = kernels(weight_format(mats[0][1]).family("cpu"), "cpu")
    gemvs = [(name, m, family.bind_gemv(m)) for name, m in mats]
    rng = np.random.default_rng(0)
    xs = {}
    for off in offsets:
        for k in {m.shape[1] for _, m, _ in gemvs}:
            xs[off, k] = placed(off, k)
            xs[off, k][:] = rng.standard_normal((1, k))
    outs = {m.shape[0]: np.empty((1, m.shape[0]), np.float32) for _, m, _ in gemvs}
    times = {}
    for r in range(args.rounds + 1):                     # the first round compiles, not kept
        for off in offsets:
            for name, m, gemv in gemvs:
                t = time.perf_counter()
                gemv(outs[m.shape[0]], xs[off, m.shape[1]])
                if r:
                    times.setdefault((off, name), []).append(time.perf_counter() - t)
    print(f"{args.path}: {model.weight_dtype} weights, {len(gemvs)} GEMVs a round, medians "
          f"of {args.rounds} rounds (us a call)")
    for off in offsets:
        per = {name: statistics.median(times[off, name]) for name in MATRICES}
        total = sum(per[name] for name, _, _ in gemvs)
        print(f"  x at {off:#5x}: " + "  ".join(f"{n} {t * 1e6:7.1f}" for n, t in per.items())
              + f"   a token's {len(gemvs)}: {total * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
