"""The CPU prefill attention over a 16-bit KV cache, AMX-BF16 tiles against the float32
micro-kernel, in turn in one process (the machine's speed drifts between minutes).

    python bench/profile_prefill_attention_cpu.py                       # TinyLlama's shape
    python bench/profile_prefill_attention_cpu.py --model /tmp/tinyllama  # and its prefill-512

The kernel: attention(q, k, v, causal=True) at seq x heads / KV heads x head dim, K and V
bfloat16 (and float16 for scale: no AMX path), the median of --rounds rounds of 10 calls. With
--model, a bfloat16 model's whole prefill with the AMX attention on and off (the AMX GEMMs on
in both), and the attention's share of it.
"""
import argparse
import statistics
import time

import ml_dtypes
import numpy as np

from numba_attn import attention
from numba_attn.kernels import attention_cpu, llvm_cpu


_AMX_PATH = attention_cpu.amx_path


def _paths():
    """{name: switch()} for the two paths the prefill attention can take here (the float32
    one by telling attention_cpu that AMX is absent; the GEMMs keep their AMX tiles)."""
    paths = {"float32 micro-kernel": lambda: setattr(attention_cpu, "amx_path",
                                                     lambda *a: False)}
    if _AMX_PATH("amx-bf16"):
        paths = {"AMX-BF16 tiles": lambda: setattr(attention_cpu, "amx_path", _AMX_PATH),
                 **paths}
    return paths


def kernel(seq, heads, kv_heads, d, rounds):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((seq, heads, d), dtype=np.float32)
    out = np.empty_like(q)
    flops = 4 * heads * d * seq * (seq + 1) / 2          # q k^T and p v, the causal half
    for dtype in (ml_dtypes.bfloat16, np.float16):
        k = rng.standard_normal((seq, kv_heads, d), dtype=np.float32).astype(dtype)
        v = rng.standard_normal((seq, kv_heads, d), dtype=np.float32).astype(dtype)
        paths = _paths() if dtype == ml_dtypes.bfloat16 else {"float32 micro-kernel": None}
        times = {name: [] for name in paths}
        for name, switch in paths.items():              # compile, warm
            if switch:
                switch()
            attention(q, k, v, causal=True, out=out)
        for _ in range(rounds):
            for name, switch in paths.items():
                if switch:
                    switch()
                t = time.perf_counter()
                for _ in range(10):
                    attention(q, k, v, causal=True, out=out)
                times[name].append((time.perf_counter() - t) / 10)
        for name, ts in times.items():
            ms = statistics.median(ts) * 1e3
            print(f"  K/V {np.dtype(dtype).name:8s} {name:22s} {ms:6.2f} ms "
                  f"({flops / ms / 1e6:.0f} GFLOP/s)")
        attention_cpu.amx_path = _AMX_PATH


def model(path, rounds):
    from numba_attn.model import Model
    from profile_decode_step_cpu import timed_steps
    import numba_attn.model as model_module
    m = Model.from_pretrained(path, weight_dtype="bfloat16", max_seq=520)
    tokens = np.random.default_rng(0).integers(3, m.config.vocab_size, 512)
    spent = {}
    timed_steps(model_module.STEPS, spent)
    paths = _paths()
    totals = {name: [] for name in paths}
    att = {name: [] for name in paths}
    for name, switch in paths.items():
        switch()
        m.forward(tokens, 0)
    for _ in range(rounds):
        for name, switch in paths.items():
            switch()
            spent.clear()
            t = time.perf_counter()
            m.forward(tokens, 0)
            totals[name].append(time.perf_counter() - t)
            att[name].append(spent["attention"])
    print(f"{path}, bfloat16 weights and KV cache, prefill-512 (timing hooks on every step):")
    for name in paths:
        total = statistics.median(totals[name])
        print(f"  attention on {name:22s} {512 / total:6.1f} tok/s, attention "
              f"{statistics.median(att[name]) * 1e3:6.1f} ms of {total * 1e3:.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", help="a model folder: also its bfloat16 prefill-512")
    args = ap.parse_args()
    print(f"attention prefill, {args.seq} tokens, {args.heads}/{args.kv_heads} heads x "
          f"{args.head_dim}, causal (median of {args.rounds} rounds, paths in turn):")
    kernel(args.seq, args.heads, args.kv_heads, args.head_dim, args.rounds)
    if args.model:
        model(args.model, args.rounds)


if __name__ == "__main__":
    main()
