"""The attention micro-kernels' register blocking, A/B: llvm_cpu.ACC16 (the 16-float
accumulators a kernel keeps in registers at once; rows beyond it go in further passes) at the
host's value against others, each in a fresh process with a Numba cache of its own (the
kernels are compiled with the value), the processes alternating over --rounds rounds.
TinyLlama's shape (32 query / 4 KV heads, head dim 64) on the machine's threads: the prefill
attention at 512 positions (causal, float32 K/V; GFLOP/s counts the causal half), and the
decode attention at 2000 keys over float32 and bfloat16 K/V (warm: the same call again).

    python bench/ab_register_passes.py [--acc16 24,5] [--rounds 2]"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

S, H, HKV, D, KV = 512, 32, 4, 64, 2000


def timed(call, n):
    """call() once to compile, then n times: the seconds of each."""
    call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def measure(acc16):
    from numba_attn.kernels import llvm_cpu
    llvm_cpu.ACC16 = acc16                  # before attention_cpu compiles anything
    import ml_dtypes
    from numba_attn.kernels import attention_cpu as A
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, S, h, D), dtype=np.float32) for h in (H, HKV, HKV))
    out = np.empty_like(q)
    times = timed(lambda: A.attention(out, q, k, v, D ** -0.5, True), 10)
    flops = 4 * H * D * S * S / 2
    line = f"prefill-512 {min(times) * 1e3:6.2f} ms ({flops / min(times) / 1e9:5.1f} GFLOP/s)"
    q1 = rng.standard_normal((1, 1, H, D), dtype=np.float32)
    o1 = np.empty_like(q1)
    for dt in (np.float32, ml_dtypes.bfloat16):
        kk, vv = (rng.standard_normal((1, KV, HKV, D), dtype=np.float32).astype(dt)
                  for _ in range(2))
        times = timed(lambda: A.attention(o1, q1, kk, vv, D ** -0.5, True), 200)
        line += f" | decode {np.dtype(dt).name} {np.median(times) * 1e6:6.1f} us"
    print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acc16", default=None, help="values to compare (default: host's,5,24)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        measure(a.child)
        return
    from numba_attn.kernels import llvm_cpu
    values = [int(x) for x in a.acc16.split(",")] if a.acc16 else \
        sorted({llvm_cpu.ACC16, 5, 24})
    print(f"host {llvm_cpu.HOST_CPU}, ACC16 {llvm_cpu.ACC16} by default")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for acc in values:
                env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, str(acc)))
                got = subprocess.run([sys.executable, __file__, "--child", str(acc)], env=env,
                                     capture_output=True, text=True)
                print(f"round {r + 1} ACC16={acc:2d}: " + (got.stdout.strip() or got.stderr))


if __name__ == "__main__":
    main()
