"""The CPU decode attention's K/V prefetch, variants in turn in one process: TinyLlama's shape
(32 query / 4 KV heads, head dim 64) at 2000 keys on the machine's threads, K/V cold (96 MB read
before each call, as a model's weights stream between its layers' attention) and warm, the
variants in a rotating order (the first after a change of K/V set ran slower). Each variant is
attention_cpu.py's source with one change, loaded as a module of its own.

    python bench/tune_decode_attention.py [float32|float16|bfloat16] [VARIANT,...]

VARIANT: as-is (two key blocks ahead into L1, prefetcht0), l1-1, l1-3 (one or three blocks
ahead), l2-1 (one block ahead into L2 only, prefetcht1: the kernel before), none. Timed alone
the kernel's K/V sit in fresh 4 KB pages, not behind a model's weights: check a choice in the
model too (bench/profile_decode_step_cpu.py --long-context)."""
import importlib.util
import os
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from profile_decode_attention_cpu import read_through   # bench/, this script's folder

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(HERE, "numba_attn", "kernels", "attention_cpu.py")
KV, HKV, D, G = 2000, 4, 64, 8
BLOCKS = "PREFETCH_BLOCKS = 2\n"
T1 = ("ir.Constant(_I64, 64))), 0)", "ir.Constant(_I64, 64))), 0, 2)")
VARIANTS = {"as-is": [], "l1-1": [(BLOCKS, "PREFETCH_BLOCKS = 1\n")],
            "l1-3": [(BLOCKS, "PREFETCH_BLOCKS = 3\n")],
            "l2-1": [(BLOCKS, "PREFETCH_BLOCKS = 1\n"), T1],
            "none": [(BLOCKS, "PREFETCH_BLOCKS = 1\n"),
                     ("n_pf = max(0, min(BLOCK_K, k_hi - k0 - PREFETCH_BLOCKS * BLOCK_K))",
                      "n_pf = 0")]}


def load_variant(name, tmp):
    src = open(SOURCE).read()
    for old, new in VARIANTS[name]:
        if old not in src:
            sys.exit(f"variant {name}: {old!r} is no longer in attention_cpu.py")
        src = src.replace(old, new)
    src = src.replace("from . import", "from numba_attn.kernels import")
    src = src.replace("from .", "from numba_attn.kernels.")
    mod = "tuned_attention_" + name.replace("-", "_")
    path = os.path.join(tmp, mod + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(mod, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod] = module
    spec.loader.exec_module(module)
    return module


def main():
    sys.path.insert(0, HERE)
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    dt = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    tmp = tempfile.mkdtemp()
    mods = {name: load_variant(name, tmp) for name in names}
    rng = np.random.default_rng(0)
    buf = np.ones(96 << 18, np.float32)
    q = rng.standard_normal((1, 1, HKV * G, D)).astype(np.float32)
    out = np.empty_like(q)
    caches = [tuple(rng.standard_normal((1, KV, HKV, D)).astype(dt) for _ in range(2))
              for _ in range(4)]
    times = {name: {"cold": [], "warm": []} for name in names}
    order = list(mods)
    for it in range(33):
        for name in order[it % len(order):] + order[:it % len(order)]:   # each first in turn
            m = mods[name]
            for mode in ("cold", "warm"):
                k, v = caches[it % 4]
                if mode == "cold":
                    read_through(buf)
                else:
                    m.attention(out, q, k, v, 0.125, True)
                t = time.perf_counter()
                m.attention(out, q, k, v, 0.125, True)
                times[name][mode].append(time.perf_counter() - t)
    print(f"{dtype} K/V, {KV} keys, {HKV * G}/{HKV} heads, head dim {D}; medians of 30 in turn:")
    for name, t in times.items():
        print(f"  {name:5s} " + "  ".join(f"{mode} {np.median(v[3:]) * 1e6:.0f} us"
                                            for mode, v in t.items()))


if __name__ == "__main__":
    main()
