"""The q8_0 GEMVs' quantizing of x (linear_q8_cpu._quantize_x: per 32 values a scale and int8
codes, llama.cpp's rule), timed at TinyLlama's widths (2048: q|k|v, o, gate, up; 5632: down)
for the working tree's kernel and for the one a git revision has, in turn in one process, each
compiled with the GEMVs' fastmath flags as the GEMVs compile it; and how many blocks of each
differ from the rule (tests/test_formats.py's statement of it: scales, codes).

    python bench/profile_quantize_x.py [REV]   (default REV: HEAD~1)"""
import os
import sys
import tempfile
import time

import numpy as np
from numba import njit

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELATIVE = "numba_attn/kernels/linear_q8_cpu.py"


def main():
    sys.path.insert(0, HERE)
    from kernel_variants import kernel_source, load_kernel   # bench/, this script's folder
    from numba_attn.kernels.scalar import FASTMATH_INF
    from tests.test_formats import q8_0_reference
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD~1"
    tmp = tempfile.mkdtemp()
    kernels = {"working tree": load_kernel(kernel_source(RELATIVE), "q8_now", tmp),
               rev: load_kernel(kernel_source(RELATIVE, rev), "q8_then", tmp)}
    quantize = {name: njit(fastmath=FASTMATH_INF)(m._quantize_x.py_func)
                for name, m in kernels.items()}
    rng = np.random.default_rng(0)
    for k in (2048, 5632):
        x = rng.standard_normal((1, k)).astype(np.float32)
        outs, times = {}, {name: [] for name in quantize}
        for name, f in quantize.items():
            outs[name] = (np.empty((1, k), np.int8), np.empty((1, k // 32), np.int32),
                          np.empty((1, k // 32), np.float32))
            f(*outs[name], x)
        for _ in range(20):
            for name, f in quantize.items():
                t = time.perf_counter()
                for _ in range(200):
                    f(*outs[name], x)
                times[name].append((time.perf_counter() - t) / 200)
        want_q, want_d = q8_0_reference(x, np.float32)
        off = {name: (int((o[2] != want_d).sum()),
                      int((o[0] != want_q).reshape(k // 32, 32).any(-1).sum()))
               for name, o in outs.items()}
        print(f"k = {k} ({k // 32} blocks): " + "; ".join(
            f"{name} {np.median(t) * 1e6:.2f} us, scales off the rule {off[name][0]}, "
            f"blocks with codes off {off[name][1]}" for name, t in times.items()))


if __name__ == "__main__":
    main()
