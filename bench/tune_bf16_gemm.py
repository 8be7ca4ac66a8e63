"""The AVX-512 BF16 prefill GEMM (linear_bf16_cpu.gemm_bf16) with other micro-kernel shapes and
input-axis slices: GFLOP/s over TinyLlama's four prefill-512 products (x (512, k) against w
(n, k): 2048x2048, 256x2048, 5632x2048, 2048x5632), variants in alternating rounds in one
process, NumPy's sgemm on the float32 weights beside them; and the micro-kernel alone on one
core with its operands in L1 (its ceiling).

    python bench/tune_bf16_gemm.py MRxNRxKC[,MRxNRxKC...] [ROUNDS]
e.g. python bench/tune_bf16_gemm.py 8x48x256,8x48x1024,6x64x1024 5

MR x NR shapes other than the module's are compiled from a copy of linear_bf16_cpu.py with its
MR and NR replaced (written beside it while the script runs, removed at the end)."""
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numba_attn  # noqa: E402,F401  (sets the BLAS and OpenMP thread waits before NumPy)
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

KERNELS = os.path.join(ROOT, "numba_attn", "kernels")
M = 512
SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]


def module_for(mr, nr, made):
    name = f"_tune_bf16_{mr}x{nr}"
    if name not in made:
        src = open(os.path.join(KERNELS, "linear_bf16_cpu.py")).read()
        for const, val in (("MR", mr), ("NR", nr)):
            line = next(ln for ln in src.splitlines() if ln.startswith(f"{const} = "))
            src = src.replace(f"\n{line}\n", f"\n{const} = {val}\n")
        path = os.path.join(KERNELS, name + ".py")
        with open(path, "w") as f:
            f.write(src)
        made[name] = path
    return importlib.import_module("numba_attn.kernels." + name)


def tile_ceiling(mod, kc=256, reps=20000):
    a = np.full((kc, mod.MR), 0x3F803F80, np.uint32)
    b = np.full((kc, mod.NR), 0x3F803F80, np.uint32)
    c = np.zeros((mod.MR, mod.NR), np.float32)
    tile, nr = mod._tile_bf16, mod.NR

    @njit
    def loop(c, a, b, kc, reps):
        for _ in range(reps):
            tile(c.ctypes.data, nr, a.ctypes.data, b.ctypes.data, kc, True)
    loop(c, a, b, kc, 10)
    t = time.perf_counter()
    loop(c, a, b, kc, reps)
    return 2 * mod.MR * mod.NR * 2 * kc * reps / (time.perf_counter() - t) / 1e9


def main():
    variants = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1].split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rng = np.random.default_rng(0)
    data = []
    for n, k in SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        data.append((rng.standard_normal((M, k), dtype=np.float32), w,
                     w.astype(ml_dtypes.bfloat16).view(np.uint16),
                     np.empty((M, n), np.float32)))
    flops = sum(2 * M * n * k for n, k in SHAPES)
    made = {}
    try:
        fns = {"sgemm": lambda: [np.matmul(x, w.T, out=o) for x, w, _, o in data]}
        for mr, nr, kc in variants:
            mod = module_for(mr, nr, made)

            def run(mod=mod, kc=kc):
                for x, _, b, o in data:
                    mod._gemm_bf16(o, mod.packed_x_bf16(x), b.view(np.uint32), kc)
            fns[f"{mr}x{nr}x{kc}"] = run
            print(f"{mr}x{nr} tile alone, one core, in L1: {tile_ceiling(mod):.0f} GFLOP/s")
        for f in fns.values():
            f()
        res = {name: [] for name in fns}
        for _ in range(rounds):
            for name, f in fns.items():
                t = time.perf_counter()
                f()
                res[name].append(flops / (time.perf_counter() - t) / 1e9)
        for name, v in res.items():
            print(f"{name:12s}", " ".join(f"{g:6.0f}" for g in v), f"  best {max(v):.0f} GFLOP/s")
    finally:
        for path in made.values():
            os.remove(path)


if __name__ == "__main__":
    main()
