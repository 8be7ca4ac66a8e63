"""Where the q8_0 decode GEMV's time goes on the GPU, beside our float32 GEMV:
  - time against rows (k = 4096; 3072 to 49152 rows, the weight sets rotated past L2): a line
    fit gives each kernel's streaming rate (slope) and its fixed cost a call (intercept);
  - the q8_0 GEMV's shape variants (linear_q8_cuda.GEMV_SHAPE's fields) at 12288x4096, through
    bench_cuda.py's tuning (each twice; one that does not launch is said);
  - the kernel with x's quantization replaced by constant codes (wrong sums, timing only).

    python bench/probe_q8_gemv_cuda.py"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cuda as B  # noqa: E402  (torch, numba's CUDA target, the timing helpers)
import torch  # noqa: E402
from kernel_variants import kernel_source, load_kernel  # noqa: E402

from numba_attn.formats import Q8Matrix  # noqa: E402
from numba_attn.kernels import linear_cuda, linear_q8_cuda as Q  # noqa: E402

K = 4096
VARIANTS = [(1, 8, 256, 2, 4, 0), (1, 8, 256, 2, 2, 0), (1, 8, 128, 2, 8, 0),
            (2, 4, 256, 2, 4, 0), (2, 4, 512, 2, 2, 0), (1, 4, 512, 2, 3, 0), (1, 4, 512, 2, 1, 0),
            (1, 4, 1024, 2, 1, 0), (1, 4, 128, 2, 8, 0), (1, 4, 256, 2, 8, 0), (1, 2, 256, 2, 8, 0),
            (4, 2, 256, 1, 4, 0), (4, 1, 256, 1, 0, 0), (2, 2, 512, 2, 2, 0), (1, 8, 512, 2, 2, 0),
            (1, 16, 128, 2, 8, 0), (1, 16, 256, 2, 4, 0)]
QUANTIZE = "                    quantize_slab(xw, xd, x, scratch, v, tid, xrow0, m, k, s0, slab)"
CONSTANT = ("                    for g in range(tid, XW, THREADS):\n"
            "                        xw[g] = uint32(0x01010101)\n"
            "                    for g in range(tid, XD, THREADS):\n"
            "                        xd[g] = float32(1)")


def weights(fmt, n):
    """(bytes a set, sets, the sets): enough copies that each call reads past L2."""
    per = n * K + n * K // 32 * 2 if fmt == "q8_0" else 4 * n * K
    sets = B.n_sets(per)
    make = (lambda: Q8Matrix(*map(B.nb, B.q8_weights(n, K)))) if fmt == "q8_0" else \
        (lambda: B.nb(B.randn(n, K)))
    return per, sets, [make() for _ in range(sets)]


def rows_scan(no_bias):
    print("time against rows (device us, median):")
    for fmt, linear in (("q8_0", Q.linear), ("fp32", linear_cuda.linear)):
        pts = []
        for n in (3072, 6144, 12288, 24576, 49152):
            X, Y = B.nb(B.randn(1, K)), B.nb(torch.empty(1, n, device="cuda"))
            per, sets, W = weights(fmt, n)
            us = B.device_us(lambda i: linear(Y, X, W[i], no_bias), sets)
            pts.append((per, us))
            print(f"  {fmt} {n}x{K}: {us:.1f} us, {per / us / 1e3:.0f} GB/s", flush=True)
            W = None                                 # freed before the next size
            torch.cuda.empty_cache()
        slope, fixed = np.polyfit([p for p, _ in pts], [u for _, u in pts], 1)
        print(f"  {fmt}: time = {fixed:.1f} us + bytes / {1 / slope / 1e3:.0f} GB/s", flush=True)


def shapes():
    """bench_cuda's q8_0 tuning (each shape twice, one that does not launch said) over VARIANTS."""
    B.GEMV_Q8_VARIANTS = (Q.GEMV_SHAPE,) + tuple(VARIANTS)
    B.bench_tune(("q8",))


def x_quantization(no_bias):
    n = 12288
    X, Y = B.nb(B.randn(1, K)), B.nb(torch.empty(1, n, device="cuda"))
    per, sets, W = weights("q8_0", n)
    src = kernel_source("numba_attn/kernels/linear_q8_cuda.py")
    if QUANTIZE not in src:
        sys.exit("the GEMV's call of quantize_slab is no longer as this probe expects")
    constant = load_kernel(src.replace(QUANTIZE, CONSTANT), "q8_x_constant", tempfile.mkdtemp())
    print("x quantized in the kernel against constant codes (timing only):")
    for _ in range(3):
        for name, mod in (("as-is", Q), ("x codes constant", constant)):
            us = B.device_us(lambda i: mod.linear(Y, X, W[i], no_bias), sets)
            print(f"  {name}: {us:.1f} us ({per / us / 1e3:.0f} GB/s)", flush=True)


def main():
    no_bias = B.nb(torch.empty(0, device="cuda"))
    rows_scan(no_bias)
    shapes()
    x_quantization(no_bias)


if __name__ == "__main__":
    main()
