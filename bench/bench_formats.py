"""Weight formats on the CPU: decode GEMV and prefill GEMM for float32, bfloat16 and q8_0 weights
through numba_attn.ops.linear, on the fast (AVX-512 VNNI / BF16, AMX tiles), no-amx (bfloat16
prefill on vdpbf16ps where AMX is there) and portable paths.

    python bench/bench_formats.py [--repeat 20] [--rounds 2] [--only decode|prefill]

Decode: for TinyLlama's projections (out x in: q/o 2048x2048, k/v 256x2048, gate/up 5632x2048,
down 2048x5632, lm_head 32000x2048) and a large 12288x4096, the time of one row (best of
--repeat after a warm-up; JIT compile reported on its own), each timed call with the weights
out of the caches (a buffer of twice the last-level cache, 96 MB at least, is read before it,
as the other layers' weights would be in a model: a matrix reused call after call would be
served from the L3 instead),
the GB/s of weight bytes read,
the speed-up over our float32 GEMV of the same shape (time ratio), and the share of the best
read rate measured here (the fastest over the same 201 MB of NumPy BLAS's float32 GEMV of
12288x4096, a read-only parallel sum, and our float32 GEMV, measured before each sweep and at
the end).
Prefill: 512 rows, GFLOP/s against float32 sgemm.
The machine may be shared: best-of-N times, run it twice."""
import argparse
import os
import sys
import time

import ml_dtypes
import numpy as np
from numba import njit, prange, uint64

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from numba_attn import ops  # noqa: E402
from numba_attn.formats import quantize_q8_0, weight_format  # noqa: E402
from numba_attn.kernels import llvm_cpu  # noqa: E402

DECODE_SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048),
                 (12288, 4096)]
PREFILL_SHAPES = [(2048, 2048), (5632, 2048)]
PREFILL_ROWS = 512
FORMATS = ["float32", "bfloat16", "q8_0"]


_EVICT = None   # float32, twice the last-level cache (96 MB at least): read before a cold call,
#                 so its weights come from memory


def _llc_bytes():
    """The size of the last-level cache sysfs reports for CPU 0 (0 where it reports none)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        sizes = [open(os.path.join(base, d, "size")).read().strip() for d in os.listdir(base)
                 if d.startswith("index")]
    except OSError:
        return 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return max([int(v[:-1]) * units[v[-1]] if v[-1] in units else int(v) for v in sizes],
               default=0)


def best_time(f, repeat, cold=False):
    """(compile/warm-up seconds, best of repeat seconds); cold: the caches flushed before each
    call (by reading _EVICT, outside the timing)."""
    global _EVICT
    if cold and _EVICT is None:
        _EVICT = np.ones(max(24 << 20, _llc_bytes() // 2), np.float32)
    t0 = time.perf_counter()
    f()
    warm = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        if cold:
            _read_all(_EVICT)
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return warm, best


@njit(parallel=True, fastmath=True, cache=True)
def _read_all(a):
    # a: (n,) float32; a sum that reads every byte once, as fast as the loads go
    n = a.shape[0]
    chunks = 64
    part = np.zeros(chunks, np.float32)
    step = (n + chunks - 1) // chunks
    for c in prange(chunks):
        s = np.float32(0)
        # unsigned bounds: no negative-index wrap, so the loop vectorises
        for j in range(uint64(c * step), uint64(min(n, (c + 1) * step))):
            s += a[j]
        part[c] = s
    return part.sum()


def stored(w, fmt):
    if fmt == "float32":
        return w
    if fmt == "bfloat16":
        return w.astype(ml_dtypes.bfloat16)
    return quantize_q8_0(w)


def paths(fmt, prefill=False):
    if fmt == "float32":
        return ["fast"]
    if prefill and fmt == "bfloat16" and llvm_cpu.amx_path("amx-bf16"):
        return ["fast", "no-amx", "portable"]        # AMX tiles, vdpbf16ps, widened + sgemm
    return ["fast", "portable"]


def run_path(path, f):
    saved = llvm_cpu.CPU_PATH
    llvm_cpu.CPU_PATH = path
    try:
        return f()
    finally:
        llvm_cpu.CPU_PATH = saved


def best_read(repeat, when):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12288, 4096), dtype=np.float32)
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    _, blas = best_time(lambda: x @ w.T, repeat, cold=True)
    flat = w.reshape(-1)
    _, read = best_time(lambda: _read_all(flat), repeat, cold=True)
    _, ours = best_time(lambda: ops.linear(x, w), repeat, cold=True)
    print(f"best read of 12288x4096 float32 ({when}): NumPy BLAS GEMV "
          f"{w.nbytes / blas / 1e9:.1f} GB/s, "
          f"read-only sum {w.nbytes / read / 1e9:.1f} GB/s, our GEMV {w.nbytes / ours / 1e9:.1f} "
          f"GB/s")
    return w.nbytes / min(blas, read, ours)


def decode(repeat, rounds):
    times, warms, nbytes = {}, {}, {}
    rate = 0.0
    for r in range(rounds):      # whole sweeps, the best of each row: noise comes in bursts
        rate = max(rate, best_read(repeat, f"round {r + 1}"))
        rng = np.random.default_rng(1)
        for n, k in DECODE_SHAPES:
            w32 = rng.standard_normal((n, k), dtype=np.float32)
            x = rng.standard_normal((1, k), dtype=np.float32)
            out = np.empty((1, n), np.float32)
            for fmt in FORMATS:
                w = stored(w32, fmt)
                for path in paths(fmt):
                    warm, t = run_path(path, lambda: best_time(
                        lambda: ops.linear(x, w, out=out), repeat, cold=True))
                    key = (n, k, fmt, path)
                    times[key] = min(times.get(key, t), t)
                    warms.setdefault(key, warm)
                    nbytes[key] = w.nbytes
            del w32, w
    rate = max(rate, best_read(repeat, "end"))
    print(f"\n{'shape (out x in)':>17} {'format':>9} {'path':>8} {'compile s':>9} {'ms':>8} "
          f"{'GB/s':>6} {'vs f32':>7} {'of best':>7}")
    for (n, k, fmt, path), t in times.items():
        f32 = times[(n, k, "float32", "fast")]
        print(f"{n:>8}x{k:<8} {fmt:>9} {path:>8} {warms[(n, k, fmt, path)]:9.2f} "
              f"{t * 1e3:8.3f} {nbytes[(n, k, fmt, path)] / t / 1e9:6.1f} {f32 / t:6.2f}x "
              f"{nbytes[(n, k, fmt, path)] / t / rate:6.0%}")


def prefill(repeat):
    print(f"\nprefill {PREFILL_ROWS} rows: {'shape (out x in)':>17} {'format':>9} {'path':>8} "
          f"{'ms':>8} {'GFLOP/s':>8} {'vs sgemm':>8}")
    rng = np.random.default_rng(2)
    for n, k in PREFILL_SHAPES:
        w32 = rng.standard_normal((n, k), dtype=np.float32)
        x = rng.standard_normal((PREFILL_ROWS, k), dtype=np.float32)
        out = np.empty((PREFILL_ROWS, n), np.float32)
        flop = 2.0 * PREFILL_ROWS * n * k
        _, sgemm = best_time(lambda: np.matmul(x, w32.T, out=out), repeat)
        print(f"{'':21}{n:>8}x{k:<8} {'sgemm':>9} {'BLAS':>8} {sgemm * 1e3:8.2f} "
              f"{flop / sgemm / 1e9:8.1f} {1:7.2f}x")
        for fmt in FORMATS:
            w = stored(w32, fmt)
            for path in paths(fmt, prefill=True):
                _, t = run_path(path, lambda: best_time(lambda: ops.linear(x, w, out=out),
                                                        repeat))
                print(f"{'':21}{n:>8}x{k:<8} {fmt:>9} {path:>8} {t * 1e3:8.2f} "
                      f"{flop / t / 1e9:8.1f} {sgemm / t:7.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20,
                    help="timed calls per row, best taken (default 20; prefill uses a quarter)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="decode sweeps, the best of each row taken (default 2)")
    ap.add_argument("--only", choices=["decode", "prefill"], default=None,
                    help="run one part (default: both)")
    args = ap.parse_args()
    print(f"CPU: {llvm_cpu._llvm.get_host_cpu_name()}, fast path features: "
          f"vnni={llvm_cpu.fast_path('avx512vnni')} bf16={llvm_cpu.fast_path('avx512bf16')} "
          f"amx-bf16={llvm_cpu.amx_path('amx-bf16')}; "
          f"bytes per weight: " + ", ".join(f"{f} {weight_format(f).bytes_per_weight:g}"
                                            for f in FORMATS))
    if args.only in (None, "decode"):
        decode(args.repeat, args.rounds)
    if args.only in (None, "prefill"):
        prefill(max(3, args.repeat // 4))


if __name__ == "__main__":
    main()
