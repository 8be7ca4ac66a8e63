"""Where the host time of the GPU path goes: each public call (ops.py) against its kernel
wrapper (kernels/*_cuda.py) and an empty numba launch, then a cProfile of decode steps of a
TinyLlama-shaped model (2 layers).

    python bench/profile_cuda_host.py [--steps 30] [--top 30]

Needs a GPU. Wall time per call, back to back, one synchronize at the end (the GPU work of
these decode shapes is a few microseconds, so the figures are host time)."""
import argparse
import cProfile
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba import cuda  # noqa: E402

from numba_attn import ops  # noqa: E402
from numba_attn.bench.model import random_model  # noqa: E402
from numba_attn.kernels import (attention_cuda, linear_cuda, norm_cuda, rope_cuda,  # noqa: E402
                                tensor_cuda)


def per_call_us(fn, n=300):
    fn()
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    model = random_model(2, device="cuda", max_seq=256)
    c, w, b = model.config, model.weights, model.buffers
    model.warmup()
    model.forward(np.arange(16), 0)
    lw = w.layers[0]
    x, xb, qkv = b.x[:1], b.xb[:1], b.qkv[:1]
    q, k, v = ops.split_qkv(qkv, c.n_heads, c.n_kv_heads)
    keys, values = model.cache.k[0, :16], model.cache.v[0, :16]
    cos, sin = model.rope.tables("cuda")

    @cuda.jit
    def empty(a):
        pass

    def flat(a):
        return a.reshape(-1)

    xf, xbf, qkvf = flat(x), flat(xb), flat(qkv)
    wf = flat(lw.qkv_proj)
    q4, k4, v4 = q.reshape((1,) + q.shape), keys.reshape((1,) + keys.shape), \
        values.reshape((1,) + values.shape)
    att4 = b.att[:1].reshape((1, 1, c.n_heads, c.head_dim))
    nobias = cuda.device_array(0, np.float32)
    gemv = linear_cuda.gemv_kernel(True)
    rows = [
        ("empty numba launch (1 array)", lambda: empty[1, 1](xf)),
        ("reshape(-1) of a device array", lambda: x.reshape(-1)),
        ("slice cache.k[0, :16]", lambda: model.cache.k[0, :16]),
        ("__cuda_array_interface__", lambda: x.__cuda_array_interface__),
        ("cuda.get_current_device()", lambda: cuda.get_current_device()),
        ("ops.rmsnorm", lambda: ops.rmsnorm(x, lw.input_layernorm, 1e-5, out=xb)),
        ("  norm_cuda.rmsnorm", lambda: norm_cuda.rmsnorm(xb, x, lw.input_layernorm, 1e-5)),
        ("ops.linear qkv", lambda: ops.linear(xb, lw.qkv_proj, out=qkv)),
        ("  linear_cuda.linear", lambda: linear_cuda.linear(qkv, xb, lw.qkv_proj, nobias)),
        ("  gemv kernel launch", lambda: gemv[(c.qkv_dim + 7) // 8, 1](
            qkvf, xbf, wf, nobias, c.qkv_dim, c.hidden_size)),
        ("ops.split_qkv (decode views)", lambda: ops.split_qkv(qkv, c.n_heads, c.n_kv_heads)),
        ("ops.apply_rope q", lambda: ops.apply_rope(q, model.rope, 16, out=q)),
        ("  rope_cuda.rope_half", lambda: rope_cuda.rope_half(q4, q4, cos, sin, 16)),
        ("model.cache.append", lambda: (model.cache.lengths.__setitem__(0, 15),
                                        model.cache.append(0, k, v))),
        ("ops.attention decode kv 16", lambda: ops.attention(q, keys, values, out=b.att[:1])),
        ("  attention_cuda.attention", lambda: attention_cuda.attention(att4, q4, k4, v4,
                                                                        0.125, True)),
        ("ops.add", lambda: ops.add(x, xb, out=x)),
        ("  tensor_cuda.add", lambda: tensor_cuda.add(xf, xf, xbf)),
        ("ops.silu_mul", lambda: ops.silu_mul(b.gate[:1], b.up[:1], out=b.gate[:1])),
    ]
    print("host time per call (us), decode shapes of TinyLlama (hidden 2048, 32/4 heads):")
    for name, fn in rows:
        print(f"  {name:34s} {per_call_us(fn):8.1f}")

    model.forward(np.arange(16), 0)
    n = 16
    t = time.perf_counter()
    for i in range(args.steps):
        model.forward([1], n + i)
    dt = (time.perf_counter() - t) / args.steps
    print(f"\ndecode step, 2 layers: {dt * 1e3:.2f} ms ({dt * 1e6 / 2:.0f} us per layer)")
    model.forward(np.arange(16), 0)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(args.steps):
        model.forward([1], n + i)
    prof.disable()
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(args.top)
    st.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
