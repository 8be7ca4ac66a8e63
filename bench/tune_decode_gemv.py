"""TinyLlama's decode GEMVs (22 layers x q, k, v, o, gate, up, down, and lm_head: 155 matrices,
each a distinct copy, so nothing is served from the caches) back to back, through one decode
kernel variant after another in alternating rounds in one process: GB/s of weight bytes read.
The machine's bandwidth drifts by tens of percent between minutes; only variants measured in
the same rounds compare.

    python bench/tune_decode_gemv.py ROUNDS SPEC [SPEC ...]

SPEC is FORMAT:VARIANT[:PREFETCH_BYTES]:
  float32:one | rows4 | blas       linear_cpu._gemv_one, ._gemv (4 rows a pass), NumPy's BLAS
  float16:one[:P[:LOC[:U]]]        a one-row kernel of _make_dots16, prefetching P bytes ahead
                                   at locality LOC (default STREAM_LOCALITY), U vectors a loop
                                   step (default 4; bfloat16 too)
  bfloat16:one | rows4 | rows4pf   linear_bf16_cpu._gemv, ._gemv_rows without / with prefetch
  bfloat16:even_odd[:P[:U]]        one row through _make_dots_bf16 (32 weights a vector, U
                                   64-byte chunks a step, default 4)
  q8_0:one | pairs | rows4         linear_q8_cpu._gemv, ._gemv_pairs, ._gemv_rows (the host's
                                   instruction set; avx2-one, avx2-pairs, avx2-rows4: AVX2's)
  q8_0:portable                    linear_q8_cpu._gemv_rows_portable
  q8_0:one-ISA-U[:P[:LOC]]         a one-row kernel of _make_block_dots(ISA: vnni or avx2, U
                                   block pairs a step), prefetching P bytes ahead at LOC
e.g. python bench/tune_decode_gemv.py 9 float32:one bfloat16:one bfloat16:even_odd:4096 q8_0:one"""
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba_attn  # noqa: E402,F401  (sets the BLAS and OpenMP thread waits before NumPy)
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from numba_attn.formats import quantize_q8_0  # noqa: E402
from numba_attn.kernels import cpu_pool, linear_bf16_cpu as bf, linear_cpu as f32, \
    linear_q8_cpu as q8  # noqa: E402

H, I, KV, V, L = 2048, 5632, 256, 32000, 22
SHAPES = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)] * L + [(V, H)]


def weights(fmt, rng):
    base = {s: rng.standard_normal(s, dtype=np.float32) * 0.02 for s in set(SHAPES)}
    out = []
    for s in SHAPES:
        w = base[s] + np.float32(rng.standard_normal() * 1e-3)
        out.append(quantize_q8_0(w) if fmt == "q8_0" else
                   w.astype(ml_dtypes.bfloat16 if fmt == "bfloat16" else np.dtype(fmt)))
    return out


def one_row(dots, elems):
    """A decode GEMV over `dots` (a one-row intrinsic taking x, w, ldw, n vectors)."""
    @njit(parallel=True, fastmath=True)
    def gemv(out, x, w, es):
        n, k = w.shape
        xa, wa = x.ctypes.data, w.ctypes.data
        for r in prange(n):
            s, = dots(xa, wa + es * r * k, k, k // elems)
            out[0, r] = s
    return gemv


def one_row_q8(dots):
    @njit(parallel=True, fastmath=True)
    def gemv(out, x, wq, wd):
        xq = np.empty(x.shape, np.int8)
        xc, xd = q8._codes(x, xq)              # x quantized first, as the library's GEMVs do
        n, k = wq.shape
        nb = xd.shape[1]
        for r in prange(n):
            s, = dots(xq.ctypes.data, xc.ctypes.data, xd.ctypes.data, wq.ctypes.data + r * k,
                      wd.ctypes.data + 2 * r * nb, k, nb // 2)
            out[0, r] = s
    return gemv


def variant(spec, ws, xs, outs):
    parts = spec.split(":")
    fmt, var = parts[0], parts[1]
    pf = int(parts[2]) if len(parts) > 2 else f32.STREAM_PREFETCH_BYTES
    loc = int(parts[3]) if len(parts) > 3 and var != "even_odd" else f32.STREAM_LOCALITY
    if fmt == "q8_0":
        family = q8._gemv_kernel(1)[1]                  # the host's instruction set
        if var.startswith("avx2-"):
            family, var = q8.FAMILIES["avx2"], var[5:]
        kern = {"one": q8._gemv, "pairs": q8._gemv_pairs, "rows4": q8._gemv_rows,
                "portable": q8._gemv_rows_portable}.get(var)
        if kern is None:                                # one-ISA-U
            _, isa, unroll = var.split("-")
            dots = one_row_q8(q8._make_block_dots(isa, 1, int(unroll), pf, loc))
            kern = lambda out, x, wq, wd, family: dots(out, x, wq, wd)  # noqa: E731
        else:                                           # a kernel in parts, on every thread
            kern = functools.partial(cpu_pool.run_parts, kern, cpu_pool.PARALLEL_MIN_WORK)
        return lambda: [kern(outs[w.qs.shape[0]], xs[w.qs.shape[1]], w.qs, w.d.view(np.uint16),
                             family) for w in ws]
    if fmt == "float32":
        if var == "blas":
            return lambda: [np.matmul(xs[w.shape[1]], w.T, out=outs[w.shape[0]]) for w in ws]
        kern = functools.partial(cpu_pool.run_parts, {"one": f32._gemv_one, "rows4": f32._gemv}[var],
                                 cpu_pool.PARALLEL_MIN_WORK)
        return lambda: [kern(outs[w.shape[0]], xs[w.shape[1]], w) for w in ws]
    bits = [w.view(np.uint16) for w in ws]
    half = fmt == "float16"
    if var == "even_odd":
        g = one_row(bf._make_dots_bf16(1, int(parts[3]) if len(parts) > 3 else 4, pf), 32)
        xr = {k: bf.even_odd(xs[k]) for k in (H, I)}
        return lambda: [g(outs[b.shape[0]], xr[b.shape[1]], b, 2) for b in bits]
    if var == "one" and len(parts) > 2:
        unroll = int(parts[4]) if len(parts) > 4 else bf._UNROLL
        g = one_row(bf._make_dots16(1, pf, half, loc, unroll), bf._VEC)
        return lambda: [g(outs[b.shape[0]], xs[b.shape[1]], b, 2) for b in bits]
    def run(kernel, *args):                              # a kernel in parts, every thread
        cpu_pool.run_parts(kernel, cpu_pool.PARALLEL_MIN_WORK, *args)
    if var == "one":
        return lambda: [run(bf._gemv, outs[b.shape[0]], xs[b.shape[1]], b, half) for b in bits]
    xr = {k: xs[k] if half else bf.even_odd(xs[k]) for k in (H, I)}
    return lambda: [run(bf._gemv_rows, outs[b.shape[0]], xs[b.shape[1]], xr[b.shape[1]], b,
                        half, var == "rows4pf") for b in bits]


def main():
    rounds, specs = int(sys.argv[1]), sys.argv[2:]
    rng = np.random.default_rng(0)
    ws = {fmt: weights(fmt, rng) for fmt in {s.split(":")[0] for s in specs}}
    nbytes = {f: sum(w.qs.nbytes + w.d.nbytes if hasattr(w, "qs") else w.nbytes for w in ws[f])
              for f in ws}
    xs = {k: rng.standard_normal((1, k), dtype=np.float32) for k in (H, I)}
    outs = {n: np.empty((1, n), np.float32) for n in (H, KV, I, V)}
    fns = {}
    for s in specs:
        fns[s] = variant(s, ws[s.split(":")[0]], xs, outs)
        fns[s]()                                       # compiled now
    res = {s: [] for s in specs}
    for _ in range(rounds):
        for s, f in fns.items():
            t = time.perf_counter()
            f()
            res[s].append(nbytes[s.split(":")[0]] / (time.perf_counter() - t) / 1e9)
    for s in specs:
        print(f"  {s:22s} " + " ".join(f"{g:5.1f}" for g in res[s])
              + f"   median {np.median(res[s]):.1f} GB/s")


if __name__ == "__main__":
    main()
