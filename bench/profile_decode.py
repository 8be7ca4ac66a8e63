"""The CUDA decode attention kernel under the microscope: the benchmark's four decode shapes
(kv 8192, d 128, 32/32 and 32/8 heads, fp32 and fp16 KV), for Nsight Compute and for a
histogram of the kernels' SASS instructions.

    python bench/profile_decode.py run      # warm-up launches, then one launch per shape
    ncu --clock-control none -k regex:attn_decode -s 4 --set full \\
        python bench/profile_decode.py run  # hardware counters of the four measured launches
    python bench/profile_decode.py sass     # registers and SASS opcodes per kernel
    python bench/profile_decode.py splits   # decode time against the split choice (blocks
                                            # per SM, steps per split at least), kv 1024..32768
    python bench/profile_decode.py floor    # decode time against kv length; read rate of
                                            # torch's sum over the same bytes (needs PyTorch)
                                            # and of our plain read kernel (best of its shapes)

Needs a GPU and numba-cuda; `floor` also PyTorch."""
import collections
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba import cuda  # noqa: E402

from numba_attn.kernels import attention_cuda as A  # noqa: E402
from numba_attn.kernels.util_cuda import float32, load8  # noqa: E402

KV, D = int(os.environ.get("DECODE_KV", 8192)), 128     # run/sass: DECODE_KV=... to change
SHAPES = [(32, 32, np.float32), (32, 32, np.float16), (32, 8, np.float32), (32, 8, np.float16)]


def arrays(H, Hkv, dt, rng):
    q = cuda.to_device(rng.standard_normal((1, 1, H, D), dtype=np.float32))
    k = cuda.to_device(rng.standard_normal((1, KV, Hkv, D), dtype=np.float32).astype(dt))
    v = cuda.to_device(rng.standard_normal((1, KV, Hkv, D), dtype=np.float32).astype(dt))
    return cuda.device_array_like(q), q, k, v


def run():
    rng = np.random.default_rng(0)
    sets = [arrays(H, Hkv, dt, rng) for H, Hkv, dt in SHAPES]
    for s in sets:                               # compile and warm up
        A.attention(*s, 0.088, True)
    cuda.synchronize()
    for (H, Hkv, dt), s in zip(SHAPES, sets):
        A.attention(*s, 0.088, True)
        cuda.synchronize()
        print(f"launched decode {H}/{Hkv} {np.dtype(dt).name}", flush=True)


def sass():
    run()
    for key, kern in sorted(_decode_kernels().items()):
        for sig, k in kern.overloads.items():
            text = kern.inspect_sass(sig)
            ops = collections.Counter()
            for line in text.splitlines():
                m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
                if m:
                    ops[m.group(1)] += 1
            print(f"\ndecode_kernel{key} {sig[2]}: regs {k.regs_per_thread}, "
                  f"{sum(ops.values())} instructions")
            print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(40)))


def _decode_kernels():
    out = {}
    for H, Hkv, dt in SHAPES:
        QR, dpl, ku, _, pipe = A.decode_shape(H // Hkv, np.dtype(dt).itemsize)
        out[(D, QR, True, dpl, ku, pipe)] = A.decode_kernel(D, QR, True, dpl, ku, pipe)
    return out


def read_kernel(unroll):
    """A kernel that only reads: every element of two flat arrays, 16 bytes per load, `unroll`
    loads of each array in flight per thread, their sum written per thread (so the loads stay)."""
    @cuda.jit(fastmath=True)
    def read(out, a, b, n):
        tid = cuda.grid(1)
        nt = cuda.gridsize(1)
        s = float32(0)
        xs = cuda.local.array((unroll, 8), float32)
        for i0 in range(tid * 8, n, nt * 8 * unroll):
            for u in range(unroll):                  # every load issued ...
                i = min(i0 + u * nt * 8, n - 8)
                x = load8(a, i, n)
                y = load8(b, i, n)
                for c in range(8):
                    xs[u, c] = x[c] + y[c]
            for u in range(unroll):                  # ... before any is used
                for c in range(8):
                    s += xs[u, c]
        out[tid] = s
    return read


READ_SHAPES = [(blocks_per_sm, threads, unroll) for blocks_per_sm in (2, 4, 8)
               for threads in (256, 512) for unroll in (2, 4)]


def read_us(K, V, sets, device_us):
    """Best device time of read_kernel over READ_SHAPES, reading K[i] and V[i] (flat)."""
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    out = cuda.device_array(8 * sms * 512, dtype=np.float32)
    best = None
    for bps, threads, unroll in READ_SHAPES:
        k = read_kernel(unroll)
        n = K[0].shape[0]
        us = device_us(lambda i: k[bps * sms, threads](out, K[i], V[i], n), sets)
        best = us if best is None else min(best, us)
    return best


def floor():
    """Fixed and per-byte cost: decode at several kv lengths, and PyTorch's sum (a read-only
    kernel) over the K and V bytes of each shape (the read rate a kernel can reach at that
    size)."""
    import torch
    from bench_cuda import device_us, n_sets, nb
    for H, Hkv, dt in SHAPES:
        tdt = torch.float32 if dt == np.float32 else torch.float16
        for kv in (256, 2048, 8192, 32768):
            per = 2 * kv * Hkv * D * np.dtype(dt).itemsize
            sets = n_sets(per)
            Kt = [torch.randn(1, kv, Hkv, D, device="cuda").to(tdt) for _ in range(sets)]
            Vt = [torch.randn(1, kv, Hkv, D, device="cuda").to(tdt) for _ in range(sets)]
            K, V = [nb(t) for t in Kt], [nb(t) for t in Vt]
            Q = nb(torch.randn(1, 1, H, D, device="cuda"))
            O = nb(torch.empty(1, 1, H, D, device="cuda"))
            us = device_us(lambda i: A.attention(O, Q, K[i], V[i], 0.088, True), sets)
            flat = [torch.randn(per // np.dtype(dt).itemsize, device="cuda").to(tdt)
                    for _ in range(sets)]
            tus = device_us(lambda i: flat[i].sum(), sets)
            rus = read_us([nb(t.view(-1)) for t in Kt], [nb(t.view(-1)) for t in Vt], sets,
                          device_us)
            print(f"decode {H}/{Hkv} {np.dtype(dt).name} kv {kv:6d}: {us:7.1f} us "
                  f"{per / us / 1e3:6.0f} GB/s | torch sum of the same bytes {tus:7.1f} us "
                  f"{per / tus / 1e3:6.0f} GB/s | our read {rus:7.1f} us "
                  f"{per / rus / 1e3:6.0f} GB/s | decode/sum {us / tus:.2f} "
                  f"decode/read {us / rus:.2f}", flush=True)


def splits():
    """Decode time of each shape at several kv lengths for each split choice: DECODE_SHAPE's
    blocks per SM (bps) and MIN_SPLIT_STEPS (ms); the rest of DECODE_SHAPE as it is."""
    import torch
    from bench_cuda import device_us, n_sets, nb
    shape0, ms0 = dict(A.DECODE_SHAPE), A.MIN_SPLIT_STEPS
    for H, Hkv, dt in SHAPES:
        tdt = torch.float32 if dt == np.float32 else torch.float16
        for kv in (1024, 2048, 8192, 32768):
            per = 2 * kv * Hkv * D * np.dtype(dt).itemsize
            sets = n_sets(per)
            K = [nb(torch.randn(1, kv, Hkv, D, device="cuda").to(tdt)) for _ in range(sets)]
            V = [nb(torch.randn(1, kv, Hkv, D, device="cuda").to(tdt)) for _ in range(sets)]
            Q = nb(torch.randn(1, 1, H, D, device="cuda"))
            O = nb(torch.empty(1, 1, H, D, device="cuda"))
            res = []
            for bps in (1, 2, 3, 4, 6):
                for ms in (1, 2, 4):
                    A.DECODE_SHAPE = {key: val[:2] + (bps,) + val[3:]
                                      for key, val in shape0.items()}
                    A.MIN_SPLIT_STEPS = ms
                    us = device_us(lambda i: A.attention(O, Q, K[i], V[i], 0.088, True), sets)
                    res.append(f"bps {bps} ms {ms}: {us:6.1f}")
            A.DECODE_SHAPE, A.MIN_SPLIT_STEPS = shape0, ms0
            print(f"decode {H}/{Hkv} {np.dtype(dt).name} kv {kv:6d} | " + " | ".join(res),
                  flush=True)


if __name__ == "__main__":
    modes = {"run": run, "sass": sass, "floor": floor, "splits": splits}
    modes[sys.argv[1] if len(sys.argv) > 1 else "run"]()
