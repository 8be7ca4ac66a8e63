"""CUDA kernels against PyTorch on the same GPU, in one run.

    python bench/bench_cuda.py [--quick] [--only NAME,...]

Needs a GPU, numba-cuda and PyTorch. Times are device times: CUDA events around each launch,
with the launches queued behind a long `torch.cuda._sleep` so that the Python launch cost
(about 20 us per numba launch) is not counted; the host cost per call is reported on its own
("call us": wall time of back-to-back calls, launch included). Inputs are random, never zeros;
working sets smaller than 4x the L2 cache rotate over several buffers so that repeated runs do
not measure the cache. Median of REPS launches after warm-up (compilation is outside).

Targets: linear decode fp32 >= 0.95x PyTorch, fp16 weights >= 1.8x our fp32;
weight formats (--only formats): q8_0 decode >= 3.0x our fp32 (the bytes ratio is 3.76x);
attention decode (kv 8192, 32 heads, 32/8 GQA) >= 5x PyTorch SDPA, fp16 KV >= 1.8x our fp32;
causal prefill S=2048 fp32 within 2x of PyTorch's best SDPA; masked_softmax, apply_rope,
rmsnorm >= 80% of the measured device-to-device copy bandwidth."""
import argparse
import itertools
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from numba import cuda  # noqa: E402

from numba_attn.formats import Q8Matrix  # noqa: E402
from numba_attn.kernels import (attention_cuda, linear_cuda, norm_cuda, rope_cuda,  # noqa: E402
                                softmax_cuda)
from numba_attn.kernels import linear_bf16_cuda, linear_q8_cuda  # noqa: E402

REPS = 30
L2_BYTES = 50 * 2**20
ROWS = []


def nb(t):
    """A numba device view of a torch CUDA tensor (no copy); bf16 as its raw bits (uint16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
        return cuda.as_cuda_array(t).view(np.uint16)
    return cuda.as_cuda_array(t)


def device_us(fn_per_buffer, n_buffers=1, reps=REPS):
    """Median device time of one call (us). fn_per_buffer(i) launches on buffer set i."""
    for i in range(min(3, n_buffers) if n_buffers > 1 else 2):
        fn_per_buffer(i % n_buffers)
    torch.cuda.synchronize()
    t = time.perf_counter()                             # the host's cost of one launch
    for i in range(3):
        fn_per_buffer(i % n_buffers)
    host = (time.perf_counter() - t) / 3
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    # the GPU sleeps while every launch is queued (at least 150 us, or twice the host's cost,
    # per launch), so that the events time the kernels and not Python
    torch.cuda._sleep(int(2e9 * max(150e-6, 2 * host) * reps))
    for r in range(reps):
        starts[r].record()
        fn_per_buffer(r % n_buffers)
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def call_us(fn, reps=REPS):
    """Wall time per call, back to back, launch cost included (us)."""
    fn(0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for r in range(reps):
        fn(0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def n_sets(bytes_per_set):
    return max(1, min(16, math.ceil(4 * L2_BYTES / bytes_per_set)))


def row(group, name, ours_us, ours_call_us, torch_us, work, unit, target=None, note=""):
    ROWS.append(dict(group=group, name=name, ours=ours_us, call=ours_call_us, torch=torch_us,
                     work=work, unit=unit, target=target, note=note))
    rate = work / (ours_us * 1e-6) / (1e12 if unit == "TFLOP/s" else 1e9)
    vs = f"{torch_us / ours_us:6.2f}x" if torch_us else "      "
    print(f"{group:10s} {name:52s} {ours_us:9.1f} us {rate:8.1f} {unit:8s} torch "
          f"{torch_us or float('nan'):9.1f} us {vs}  call {ours_call_us or float('nan'):7.1f} us"
          f" {note}", flush=True)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


# ------------------------------------------------------------------------------------- copy

def bench_copy():
    n = 2**28                                      # 1 GiB of float32
    a, b = randn(n), torch.empty(n, device="cuda")
    us = device_us(lambda i: b.copy_(a))
    bw = 2 * 4 * n / (us * 1e-6) / 1e9
    print(f"copy       device-to-device 1 GiB: {us:.1f} us, {bw:.0f} GB/s (read + write)")
    ROWS.append(dict(group="copy", name="device-to-device copy, 1 GiB", ours=us, call=None,
                     torch=None, work=2 * 4 * n, unit="GB/s", target=None, note=""))
    return bw


# ------------------------------------------------------------------------------------- linear

def bench_linear():
    n, k = 12288, 4096
    torch_mv = None
    res = {}
    for st, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        w = randn(n, k, dtype=dt)
        x = randn(1, k)
        out = torch.empty(1, n, device="cuda")
        bias = torch.empty(0, device="cuda")
        W, X, O, Bz = nb(w), nb(x), nb(out), nb(bias)
        fn = lambda i: linear_cuda.linear(O, X, W, Bz)  # noqa: E731
        us = device_us(fn)
        # correctness against torch on the stored weights
        ref = (x.double() @ w.double().T).float()
        err = ((out - ref).norm() / ref.norm()).item()
        if st == "fp32":
            torch_mv = device_us(lambda i: torch.mm(x, w.T, out=out))
            tw = torch_mv
        else:
            xt = x.to(dt)
            o2 = torch.empty(1, n, device="cuda", dtype=dt)
            tw = device_us(lambda i: torch.mm(xt, w.T, out=o2))
        res[st] = us
        row("linear", f"decode 1x4096 @ {n}x4096 {st} weights", us, call_us(fn),
            torch_mv if st == "fp32" else tw, w.numel() * w.element_size(), "GB/s",
            note=f"err {err:.1e}" + (f"; torch {st} {tw:.1f} us" if st != "fp32" else ""))
    # prefill GEMM
    m = 128
    w, x = randn(n, k), randn(m, k)
    out = torch.empty(m, n, device="cuda")
    W, X, O, Bz = nb(w), nb(x), nb(out), nb(torch.empty(0, device="cuda"))
    fn = lambda i: linear_cuda.linear(O, X, W, Bz)  # noqa: E731
    us = device_us(fn, reps=10)
    torch.backends.cuda.matmul.allow_tf32 = False
    tus = device_us(lambda i: torch.mm(x, w.T, out=out), reps=10)
    row("linear", f"prefill {m}x4096 @ {n}x4096 fp32 (CUDA cores)", us, None, tus,
        2 * m * n * k, "TFLOP/s", note="torch fp32 without tf32")
    return res, torch_mv


# ----------------------------------------------------------------------------- weight formats

def q8_weights(n, k):
    """Random Q8_0 weights on the GPU: codes in [-127, 127], float16 scales near 1/127."""
    qs = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    d = (torch.rand(n, k // 32, device="cuda") * 0.01 + 0.002).half()
    return qs, d


def q8_reference(x, qs, d):
    """The Q8_0 x Q8_0 product in float64: x quantized per 32 values by the Q8_0 rule (as the
    kernels do), then sum over blocks of isum * d_w * d_x."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    dx = xb.abs().amax(-1) / 127
    inv = torch.where(dx != 0, 1 / dx, torch.zeros_like(dx))
    v = xb * inv[..., None]
    xq = v.trunc() + v.sign() * ((v - v.trunc()).abs() >= 0.5)
    xs = (xq.double() * dx.double()[..., None]).view(m, k)
    ws = (qs.double().view(qs.shape[0], k // 32, 32) * d.double()[..., None]).view(-1, k)
    return xs @ ws.T


def bench_formats(res):
    """q8_0 and bf16 weights: decode GEMV at 12288 x 4096 and prefill 512 x 4096 @ 4096 x 4096,
    against our fp32 and fp16 GEMV (res, from bench_linear) and PyTorch's 16-bit mm (PyTorch
    has no Q8_0 kernel)."""
    n, k = 12288, 4096
    out = torch.empty(1, n, device="cuda")
    x = randn(1, k)
    X, O, Bz = nb(x), nb(out), nb(torch.empty(0, device="cuda"))
    # q8_0 decode: codes and scales rotate over several sets (53.5 MB each, about the L2)
    per = n * k + n * k // 32 * 2
    sets = n_sets(per)
    Ws = [q8_weights(n, k) for _ in range(sets)]
    Wd = [Q8Matrix(nb(qs), nb(d)) for qs, d in Ws]
    fn = lambda i: linear_q8_cuda.linear(O, X, Wd[i], Bz)  # noqa: E731
    us = device_us(fn, sets)
    fn(0)
    ref = q8_reference(x, *Ws[0])
    err = ((out.double() - ref).norm() / ref.norm()).item()
    w16 = (Ws[0][0].half() * Ws[0][1].repeat_interleave(32, dim=1))
    xt, o16 = x.half(), torch.empty(1, n, device="cuda", dtype=torch.float16)
    tus = device_us(lambda i: torch.mm(xt, w16.T, out=o16))
    res["q8_0"] = us
    row("formats", f"decode 1x4096 @ {n}x4096 q8_0 weights", us, call_us(fn), tus, per, "GB/s",
        note=f"err {err:.1e} (vs Q8_0 x Q8_0); our fp32 / q8_0 = {res['fp32'] / us:.2f}x, "
        f"fp16 / q8_0 = {res['fp16'] / us:.2f}x; torch fp16 mm; {sets} weight sets")
    # bf16 decode through its family (linear_cuda's 16-bit path)
    sets = n_sets(2 * n * k)
    wb = [randn(n, k, dtype=torch.bfloat16) for _ in range(sets)]
    Wb = [nb(w) for w in wb]
    fn = lambda i: linear_bf16_cuda.linear(O, X, Wb[i], Bz)  # noqa: E731
    us = device_us(fn, sets)
    fn(0)
    ref = (x.double() @ wb[0].double().T)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    xb, ob = x.bfloat16(), torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    tus = device_us(lambda i: torch.mm(xb, wb[i].T, out=ob), sets)
    res["bf16 family"] = us
    row("formats", f"decode 1x4096 @ {n}x4096 bf16 weights (linear_bf16_cuda)", us, call_us(fn),
        tus, 2 * n * k, "GB/s", note=f"err {err:.1e}; our fp32 / bf16 = {res['fp32'] / us:.2f}x, "
        f"fp16 / bf16 = {res['fp16'] / us:.2f}x; torch bf16 mm; {sets} weight sets")
    # prefill: 512 rows of x against 4096 x 4096, every format (the GEMM on the CUDA cores)
    m, n = 512, 4096
    x = randn(m, k)
    out = torch.empty(m, n, device="cuda")
    X, O = nb(x), nb(out)
    torch.backends.cuda.matmul.allow_tf32 = False
    w32 = randn(n, k)
    t32 = device_us(lambda i: torch.mm(x, w32.T, out=out), reps=10)
    qs, d = q8_weights(n, k)
    wq = qs.float() * d.float().repeat_interleave(32, dim=1)      # the dequantized weights
    for st, w, kern in (("fp32", nb(w32), linear_cuda.linear),
                        ("fp16", nb(w32.half()), linear_cuda.linear),
                        ("bf16", nb(w32.bfloat16()), linear_bf16_cuda.linear),
                        ("q8_0", Q8Matrix(nb(qs), nb(d)), linear_q8_cuda.linear)):
        fn = lambda i: kern(O, X, w, Bz)  # noqa: E731
        us = device_us(fn, reps=10)
        fn(0)
        wf = {"fp32": w32, "fp16": w32.half().float(), "bf16": w32.bfloat16().float(),
              "q8_0": wq}[st]
        ref = x.double() @ wf.double().T
        err = ((out.double() - ref).norm() / ref.norm()).item()
        res[f"prefill {st}"] = us
        row("formats", f"prefill {m}x4096 @ {n}x4096 {st} weights (CUDA cores)", us, None, t32,
            2 * m * n * k, "TFLOP/s", note=f"err {err:.1e}; torch fp32 without tf32")
    return res


# ---------------------------------------------------------------------------------- attention
# ---------------------------------------------------------------------------------- attention

def bench_attention_decode():
    kv, d = 8192, 128
    res = {}
    for H, Hkv in ((32, 32), (32, 8)):
        for st, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            per = 2 * kv * Hkv * d * (4 if st == "fp32" else 2)
            sets = n_sets(per)
            q = randn(1, 1, H, d)
            ks = [randn(1, kv, Hkv, d, dtype=dt) for _ in range(sets)]
            vs = [randn(1, kv, Hkv, d, dtype=dt) for _ in range(sets)]
            out = torch.empty(1, 1, H, d, device="cuda")
            Q, O = nb(q), nb(out)
            K, V = [nb(t) for t in ks], [nb(t) for t in vs]
            scale = 1 / math.sqrt(d)
            fn = lambda i: attention_cuda.attention(O, Q, K[i], V[i], scale, True)  # noqa: E731
            us = device_us(fn, sets)
            # reference: torch SDPA on float32 copies
            qt = q.transpose(1, 2)                              # (1, H, 1, d)
            kt = [t.float().transpose(1, 2).contiguous() for t in ks[:1]]
            vt = [t.float().transpose(1, 2).contiguous() for t in vs[:1]]
            ref = F.scaled_dot_product_attention(qt, kt[0], vt[0], enable_gqa=H != Hkv)
            fn(0)
            err = ((out.transpose(1, 2) - ref).norm() / ref.norm()).item()
            tus = None
            if st == "fp32":
                ktl = [t.transpose(1, 2).contiguous() for t in ks]   # SDPA's (1, Hkv, kv, d)
                vtl = [t.transpose(1, 2).contiguous() for t in vs]
                tus = device_us(lambda i: F.scaled_dot_product_attention(
                    qt, ktl[i], vtl[i], enable_gqa=H != Hkv), sets)
                res[(H, Hkv, "torch")] = tus
            res[(H, Hkv, st)] = us
            row("attention", f"decode q=1 kv={kv} H={H}/{Hkv} d={d} {st} KV", us, call_us(fn),
                res[(H, Hkv, "torch")], per, "GB/s", note=f"err {err:.1e}; {sets} KV sets")
    return res


def bench_attention_prefill():
    S, H, d = 2048, 32, 128
    q, k, v = randn(1, S, H, d), randn(1, S, H, d), randn(1, S, H, d)
    out = torch.empty_like(q)
    Q, K, V, O = nb(q), nb(k), nb(v), nb(out)
    scale = 1 / math.sqrt(d)
    fn = lambda i: attention_cuda.attention(O, Q, K, V, scale, True)  # noqa: E731
    us = device_us(fn, reps=10)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    err = ((out.transpose(1, 2) - ref).norm() / ref.norm()).item()
    best, which = None, ""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("default", None), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("math", SDPBackend.MATH), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            if be is None:
                t = device_us(lambda i: F.scaled_dot_product_attention(qt, kt, vt,
                                                                       is_causal=True), reps=10)
            else:
                with sdpa_kernel(be):
                    t = device_us(lambda i: F.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=True), reps=10)
        except Exception as e:  # noqa: BLE001 - a backend that refuses fp32 is skipped
            print(f"  torch SDPA {name}: {type(e).__name__}")
            continue
        print(f"  torch SDPA {name}: {t:.1f} us")
        if best is None or t < best:
            best, which = t, name
    flops = 4 * S * S * d * H / 2                       # causal half of QK^T and PV
    row("attention", f"prefill causal S={S} H={H} d={d} fp32", us, None, best, flops,
        "TFLOP/s", note=f"err {err:.1e}; torch best: {which}")
    return us, best


# ------------------------------------------------------------------------- bandwidth kernels

def bench_bandwidth(copy_bw):
    res = {}
    # masked_softmax over (32, 2048, 2048): non-causal, then causal (hidden keys not read)
    b, q, kvl = 32, 2048, 2048
    s = randn(b, q, kvl)
    out = torch.empty_like(s)
    S_, O, M = nb(s), nb(out), nb(torch.empty(0, 0, device="cuda"))
    for causal in (False, True):
        fn = lambda i: softmax_cuda.masked_softmax(O, S_, M, 0.088, causal)  # noqa: E731
        us = device_us(fn, reps=10)
        vis = b * (q * kvl - (q * (q - 1)) // 2 if causal else q * kvl)   # elements read
        nbytes = 4 * (vis + b * q * kvl)
        ref = torch.softmax(s * 0.088 + (torch.triu(torch.full((q, kvl), float("-inf"),
                                                               device="cuda"), 1)
                                         if causal else 0), -1)
        err = ((out - ref).norm() / ref.norm()).item()
        tus = device_us(lambda i: torch.softmax(s, -1), reps=10)
        row("bandwidth", f"masked_softmax (32, 2048, 2048) causal={causal}", us, None, tus,
            nbytes, "GB/s", note=f"{nbytes / (us * 1e-6) / 1e9 / copy_bw:.0%} of copy; err "
            f"{err:.1e}; torch plain softmax")
        res[f"softmax causal={causal}"] = nbytes / (us * 1e-6) / 1e9 / copy_bw
    # apply_rope on (1, 8192, 32, 128)
    x = randn(1, 8192, 32, 128)
    o = torch.empty_like(x)
    ang = torch.rand(8192, 64, device="cuda") * 100
    cos, sin = ang.cos(), ang.sin()
    X, O, C, Sn = nb(x), nb(o), nb(cos), nb(sin)
    for style, kern in (("half", rope_cuda.rope_half), ("interleaved", rope_cuda.rope_interleaved)):
        fn = lambda i: kern(O, X, C, Sn, 0)  # noqa: E731
        us = device_us(fn, reps=10)
        nbytes = 2 * x.numel() * 4
        row("bandwidth", f"apply_rope (1, 8192, 32, 128) {style}", us, call_us(fn), None, nbytes,
            "GB/s", note=f"{nbytes / (us * 1e-6) / 1e9 / copy_bw:.0%} of copy")
        res[f"rope {style}"] = nbytes / (us * 1e-6) / 1e9 / copy_bw
    # rmsnorm on (8192, 4096)
    x = randn(8192, 4096)
    w = randn(4096)
    o = torch.empty_like(x)
    X, W, O = nb(x), nb(w), nb(o)
    fn = lambda i: norm_cuda.rmsnorm(O, X, W, 1e-5)  # noqa: E731
    us = device_us(fn, reps=10)
    nbytes = 2 * x.numel() * 4
    tus = device_us(lambda i: F.rms_norm(x, (4096,), w, 1e-5), reps=10)
    row("bandwidth", "rmsnorm (8192, 4096)", us, call_us(fn), tus, nbytes, "GB/s",
        note=f"{nbytes / (us * 1e-6) / 1e9 / copy_bw:.0%} of copy; torch F.rms_norm")
    res["rmsnorm"] = nbytes / (us * 1e-6) / 1e9 / copy_bw
    # silu_mul on 32M elements
    n = 2**25
    g, u, o = randn(n), randn(n), torch.empty(n, device="cuda")
    G, U, O = nb(g), nb(u), nb(o)
    fn = lambda i: norm_cuda.silu_mul(O, G, U)  # noqa: E731
    us = device_us(fn, reps=10)
    tus = device_us(lambda i: torch.mul(F.silu(g), u, out=o), reps=10)
    row("bandwidth", f"silu_mul ({n},)", us, call_us(fn), tus, 3 * n * 4, "GB/s",
        note=f"{3 * n * 4 / (us * 1e-6) / 1e9 / copy_bw:.0%} of copy")
    return res


def bench_launch():
    @cuda.jit
    def empty(a):
        pass

    a = cuda.device_array(1)
    empty[1, 1](a)
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        empty[1, 1](a)
    cuda.synchronize()
    us = (time.perf_counter() - t) / 200 * 1e6
    print(f"launch     empty numba kernel, 1 device-array argument: {us:.1f} us per call")
    return us


# prefill variants tuned: (threads, keys per step, rows per lane group, tile floats)
PF_VARIANTS = ((128, 4, 4, 4096), (128, 2, 4, 4096), (128, 4, 4, 5120))


# decode variants tuned, per (GQA, storage): (query rows per block at most, head dims per
# lane, keys per lane group and step, blocks per SM, pipelined loads, block steps per split at
# least)
_MHA = [(2, 16, keys, bps, False, 4) for keys in (2, 4) for bps in (3, 4)]
_GQA = [(2, 16, 4, bps, pipe, 4) for bps in (2, 3) for pipe in (False, True)] + \
    [(2, 16, 2, 2, True, 4), (2, 8, 4, 2, True, 4)]
DECODE_VARIANTS = {(False, "fp32"): _MHA, (False, "fp16"): _MHA, (True, "fp32"): _GQA,
                   (True, "fp16"): _GQA}
# GEMV variants tuned: (rows per warp, chunks per step, threads per block)
GEMV_VARIANTS = {"fp32": ((1, 4, 256), (2, 4, 256), (2, 4, 128), (1, 4, 512), (1, 2, 256)),
                 "fp16": ((1, 4, 256), (2, 2, 256), (2, 2, 128), (2, 2, 512), (1, 4, 128),
                          (1, 4, 512), (1, 2, 512))}


# Q8_0 GEMV variants, linear_q8_cuda.GEMV_SHAPE's fields: (rows per warp, blocks of 32 codes in
# flight per row and lane, threads, lanes per block, blocks per SM or 0, L2 ahead)
GEMV_Q8_VARIANTS = ((1, 4, 512, 2, 2, 0), (1, 4, 512, 2, 2, 1), (1, 4, 256, 2, 4, 0),
                    (1, 4, 256, 2, 4, 1), (1, 2, 512, 2, 2, 1), (1, 8, 512, 2, 2, 1),
                    (1, 4, 1024, 2, 1, 1), (2, 2, 256, 1, 0, 1), (4, 2, 256, 1, 4, 1),
                    (1, 4, 256, 2, 0, 1), (1, 4, 512, 2, 0, 1), (2, 4, 256, 2, 2, 1))
GEMV_Q8_MODEL_VARIANTS = ((2, 2, 256, 1, 0, 0), (1, 4, 256, 2, 0, 0), (1, 4, 256, 2, 0, 1),
                          (1, 4, 256, 2, 4, 1), (1, 4, 512, 2, 2, 0), (1, 4, 512, 2, 2, 1),
                          (1, 2, 256, 2, 0, 1), (1, 2, 128, 2, 0, 1))
MODEL_GEMVS = [(2560, 2048), (2048, 2048), (5632, 2048), (2048, 5632)]   # TinyLlama's decode
# step: qkv, o, gate / up, down


def _err(a, b):
    return float((a.float() - b.float()).abs().max())


def bench_tune(parts=("decode", "gemv", "prefill")):
    """Variants of the block shapes, to pick the defaults (printed, not in the table); each
    with its largest difference from the defaults' output."""
    print("\ntuning variants (device us):")
    A, L = attention_cuda, linear_cuda
    kv, d = 8192, 128
    for H, Hkv in ((32, 32), (32, 8)) if "decode" in parts else ():
        for st, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
            per = 2 * kv * Hkv * d * (4 if st == "fp32" else 2)
            sets = n_sets(per)
            q = randn(1, 1, H, d)
            K = [nb(randn(1, kv, Hkv, d, dtype=dt)) for _ in range(sets)]
            V = [nb(randn(1, kv, Hkv, d, dtype=dt)) for _ in range(sets)]
            o_ref, o = torch.empty(1, 1, H, d, device="cuda"), torch.empty(1, 1, H, d,
                                                                             device="cuda")
            O, O_ref, Q = nb(o), nb(o_ref), nb(q)
            A.attention(O_ref, Q, K[0], V[0], 0.088, True)
            old = A.QR_MAX, dict(A.DECODE_SHAPE), A.MIN_SPLIT_STEPS
            for qr_max, dpl, keys, bps, pipe, ms in DECODE_VARIANTS[(Hkv < H, st)]:
                A.QR_MAX, A.MIN_SPLIT_STEPS = qr_max, ms
                A.DECODE_SHAPE = {key: (dpl, keys, bps, pipe) for key in old[1]}
                us = device_us(lambda i: A.attention(O, Q, K[i], V[i], 0.088, True), sets)
                A.attention(O, Q, K[0], V[0], 0.088, True)
                print(f"  decode {H}/{Hkv} {st} rows<={qr_max} dims/lane={dpl} keys/step={keys} "
                      f"blocks/SM={bps} pipe={int(pipe)} steps>={ms}: {us:.1f} us "
                      f"({per / us / 1e3:.0f} GB/s) "
                      f"diff {_err(o, o_ref):.1e}", flush=True)
            A.QR_MAX, A.DECODE_SHAPE, A.MIN_SPLIT_STEPS = old
    # GEMV: rows per warp x chunks per step, at 12288x4096 ("gemv") and at the TinyLlama
    # decode step's own shapes ("gemv-model": qkv, o, gate/up, down)
    shapes = ([(12288, 4096)] if "gemv" in parts else []) + \
        (MODEL_GEMVS if "gemv-model" in parts else [])
    for (n, k), (st, dt) in itertools.product(shapes, (("fp32", torch.float32),
                                                        ("fp16", torch.float16))):
        x = randn(1, k)
        sets = n_sets(n * k * (4 if st == "fp32" else 2))
        W = [nb(randn(n, k, dtype=dt)) for _ in range(sets)]
        y_ref, y = torch.empty(1, n, device="cuda"), torch.empty(1, n, device="cuda")
        X, Y, Y_ref, no_bias = nb(x), nb(y), nb(y_ref), nb(torch.empty(0, device="cuda"))
        L.linear(Y_ref, X, W[0], no_bias)
        old = dict(L.GEMV_SHAPE)
        for shape in GEMV_VARIANTS[st] * 2:      # twice: the noise
            L.GEMV_SHAPE[W[0].dtype.itemsize] = shape
            us = device_us(lambda i: L.linear(Y, X, W[i], no_bias), sets)
            L.linear(Y, X, W[0], no_bias)
            print(f"  gemv {n}x{k} {st} rows/warp={shape[0]} chunks/step={shape[1]} "
                  f"threads={shape[2]}: {us:.1f} us "
                  f"({n * k * (4 if st == 'fp32' else 2) / us / 1e3:.0f} GB/s) "
                  f"diff {_err(y, y_ref):.1e}", flush=True)
        L.GEMV_SHAPE.clear()
        L.GEMV_SHAPE.update(old)
    # q8_0 GEMV: every shape variant at 12288x4096 ("q8"), a few at the TinyLlama step's own
    # matrices ("q8-model")
    q8_shapes = ([((12288, 4096), GEMV_Q8_VARIANTS * 2)] if "q8" in parts else []) + \
        ([((n, k), GEMV_Q8_MODEL_VARIANTS * 2) for n, k in MODEL_GEMVS]
         if "q8-model" in parts else [])
    Q = linear_q8_cuda
    old = Q.GEMV_SHAPE
    for (n, k), variants in q8_shapes:
        x = randn(1, k)
        per = n * k + n * k // 32 * 2
        sets = n_sets(per)
        W = [Q8Matrix(*map(nb, q8_weights(n, k))) for _ in range(sets)]
        y_ref, y = torch.empty(1, n, device="cuda"), torch.empty(1, n, device="cuda")
        X, Y, Y_ref, no_bias = nb(x), nb(y), nb(y_ref), nb(torch.empty(0, device="cuda"))
        Q.GEMV_SHAPE = old
        Q.linear(Y_ref, X, W[0], no_bias)
        for shape in variants:                  # twice: the noise
            Q.GEMV_SHAPE = shape
            name = (f"  gemv {n}x{k} q8_0 rows/warp={shape[0]} blocks/step={shape[1]} "
                    f"threads={shape[2]} lanes/block={shape[3]} blocks/SM={shape[4] or '-'} "
                    f"L2 ahead={shape[5]}: ")
            try:
                us = device_us(lambda i: Q.linear(Y, X, W[i], no_bias), sets)
            except Exception as e:  # noqa: BLE001  (a shape past the registers a block has)
                print(f"{name}does not launch ({type(e).__name__})", flush=True)
                continue
            Q.linear(Y, X, W[0], no_bias)
            print(f"{name}{us:.1f} us ({per / us / 1e3:.0f} GB/s) diff {_err(y, y_ref):.1e}",
                  flush=True)
        Q.GEMV_SHAPE = old
    if "prefill" not in parts:
        return
    # prefill: block shapes of the row-per-lanes kernel
    S, H, d = 2048, 32, 128
    q, k_, v_ = randn(1, S, H, d), randn(1, S, H, d), randn(1, S, H, d)
    o, o_ref = torch.empty_like(q), torch.empty_like(q)
    Q, K, V, O, O_ref = nb(q), nb(k_), nb(v_), nb(o), nb(o_ref)
    A.attention(O_ref, Q, K, V, 0.088, True)
    old = A.PF_THREADS, A.PF_KEYS, A.PF_ROWS, A.PF_TILE
    for threads, ks, rows, tile in PF_VARIANTS:
        A.PF_THREADS, A.PF_KEYS, A.PF_ROWS, A.PF_TILE = threads, ks, rows, tile
        us = device_us(lambda i: A.attention(O, Q, K, V, 0.088, True), reps=5)
        A.attention(O, Q, K, V, 0.088, True)
        print(f"  prefill S={S} row-per-lanes, {threads} threads, {ks} keys x {rows} rows per "
              f"step, tile {tile}: {us:.1f} us ({4 * S * S * d * H / 2 / us / 1e6:.1f} TFLOP/s) "
              f"diff {_err(o, o_ref):.1e}", flush=True)
    A.PF_THREADS, A.PF_KEYS, A.PF_ROWS, A.PF_TILE = old


def resources():
    """Registers, shared and local memory per thread of every kernel variant compiled here."""
    print("\nkernel resources (registers/thread, shared bytes/block, local bytes/thread):")
    kernels = [(f"gemv {shape}", linear_cuda.gemv_kernel(True, *shape))
               for shape in set(GEMV_VARIANTS["fp32"] + GEMV_VARIANTS["fp16"])]
    kernels += [(f"gemv q8_0 {shape}", linear_q8_cuda.gemv_kernel(True, *shape[:4], 1,
                                                                         shape[5]))
                for shape in GEMV_Q8_VARIANTS]
    kernels += [("gemm q8_0", linear_q8_cuda._gemm)]
    kernels += [("gemm", linear_cuda._gemm), ("rmsnorm", norm_cuda.rmsnorm_kernel(True)),
                ("softmax rows", softmax_cuda.softmax_rows_kernel(True)),
                ("softmax 2-pass", softmax_cuda.masked_softmax_kernel(True)),
                ("rope_half4", rope_cuda._rope_half4)]
    kernels += [(f"decode D=128 QR={qr} dpl={dpl} keys={ku}{' pipe' if pipe else ''}",
                 attention_cuda.decode_kernel(128, qr, True, dpl, ku, pipe))
                for qr in (1, 2, 4) for dpl in (8, 16, 32) for ku in (1, 2, 4)
                for pipe in (False, True)]
    kernels += [(f"prefill D=128 {v}", attention_cuda.prefill_kernel(128, True, *v))
                for v in PF_VARIANTS]
    for name, k in kernels:
        for sig, kk in list(k.overloads.items()):
            try:
                print(f"  {name:24s} {str(sig[2] if len(sig) > 2 else sig)[:40]:40s} "
                      f"regs {kk.regs_per_thread} shared {kk.shared_mem_per_block} "
                      f"local {kk.local_mem_per_thread}")
            except Exception as e:  # noqa: BLE001
                print(f"  {name}: {type(e).__name__}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated groups: copy (always), linear, "
                    "formats (q8_0 and bf16 weights; runs linear too), decode, prefill, "
                    "bandwidth, tune (all variants) or tune-decode, tune-gemv, "
                    "tune-gemv-model (the TinyLlama step's shapes), tune-q8, tune-q8-model, "
                    "tune-prefill")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    want = (lambda g: not only or g in only)
    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__}; "
          f"numba-cuda {cuda.__version__ if hasattr(cuda, '__version__') else '?'}")
    launch = bench_launch()
    copy_bw = bench_copy()
    verdicts = []
    if want("linear") or want("formats"):
        res, torch_mv = bench_linear()
        verdicts.append(("linear decode fp32 >= 0.95x PyTorch", torch_mv / res["fp32"], 0.95))
        verdicts.append(("linear decode fp16 weights >= 1.8x our fp32", res["fp32"] / res["fp16"],
                         1.8))
        verdicts.append(("linear decode bf16 weights >= 1.8x our fp32", res["fp32"] / res["bf16"],
                         1.8))
    if want("formats"):
        bench_formats(res)
        verdicts.append(("linear decode q8_0 weights >= 3.0x our fp32",
                         res["fp32"] / res["q8_0"], 3.0))
        verdicts.append(("linear decode bf16 family >= 1.8x our fp32",
                         res["fp32"] / res["bf16 family"], 1.8))
        verdicts.append(("linear prefill q8_0 >= 0.8x our fp32 GEMM (dequantizing costs little)",
                         res["prefill fp32"] / res["prefill q8_0"], 0.8))
    if want("decode"):
        r = bench_attention_decode()
        for H, Hkv in ((32, 32), (32, 8)):
            verdicts.append((f"attention decode {H}/{Hkv} fp32 >= 5x SDPA",
                             r[(H, Hkv, "torch")] / r[(H, Hkv, "fp32")], 5.0))
            verdicts.append((f"attention decode {H}/{Hkv} fp16 KV >= 1.8x our fp32",
                             r[(H, Hkv, "fp32")] / r[(H, Hkv, "fp16")], 1.8))
    if want("prefill"):
        us, best = bench_attention_prefill()
        verdicts.append(("attention prefill S=2048 within 2x of SDPA (ratio >= 0.5)",
                         best / us, 0.5))
    if want("bandwidth"):
        for name, frac in bench_bandwidth(copy_bw).items():
            if not name.startswith("silu"):
                verdicts.append((f"{name} >= 80% of copy bandwidth", frac, 0.8))
    if want("tune"):
        bench_tune(("decode", "gemv", "q8", "prefill"))
    elif any(g.startswith("tune-") for g in only):
        bench_tune([g[5:] for g in only if g.startswith("tune-")])
    resources()
    print(f"\nlaunch cost {launch:.1f} us; copy {copy_bw:.0f} GB/s")
    print("\nverdicts:")
    for name, value, target in verdicts:
        print(f"  {'PASS' if value >= target else 'MISS'}  {name}: {value:.2f} (target {target})")


if __name__ == "__main__":
    main()
