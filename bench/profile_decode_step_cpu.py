"""Where a CPU decode step's time goes, on a model folder (e.g. the TinyLlama-shaped one
bench_model.py writes):

- the step compiled whole (Model.decoder, cpu_decode.CpuDecoder) against the step with its
  kernels called straight (Model.cpu_steps), the same with each GEMV through its family's
  linear() (not bound once) and through ops.py's checked functions, in turn in one process
  (medians); the rest measures the straight steps;
- the straight step's time by step kind (each call timed inside the running step), the rest
  being the forward pass's own Python;
- every GEMV of a token back to back, nothing else: the read rate of the weights alone;
- with --long-context N, the attention's share at context 16 and at context N, the two
  decoded in turn (two caches over the same weights).

    python bench/profile_decode_step_cpu.py /tmp/tinyllama --weight-dtype q8_0 [--kv-dtype auto]
        [--steps 40] [--long-context 2000]"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn.backend import kernels  # noqa: E402
from numba_attn.formats import weight_format  # noqa: E402
from numba_attn.model import MATRICES, Model  # noqa: E402

STEP_KINDS = ("embedding", "rmsnorm", "add_rmsnorm", "linear", "split_qkv", "rope_qk",
              "append_kv", "attention", "silu_mul")


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def timed_steps(steps, acc):
    """Wrap each step kind of `steps` to add its time to acc[kind]; returns the originals."""
    originals = {}
    for kind in STEP_KINDS:
        fn = originals[kind] = getattr(steps, kind)

        def wrapper(*args, _fn=fn, _kind=kind, **kwargs):
            t = time.perf_counter()
            out = _fn(*args, **kwargs)
            acc[_kind] = acc.get(_kind, 0.0) + time.perf_counter() - t
            return out
        setattr(steps, kind, wrapper)
    return originals


def straight_vs_checked(model, pos, n):
    direct = model.cpu_steps
    bound = direct.linear

    def unbound(x, w, bias=None, out=None):     # each GEMV through its family's linear()
        if out is None:
            out = np.empty((x.shape[0], w.shape[0]), np.float32)
        direct._family(w).linear(out, x, w, direct.no_bias if bias is None else bias)
        return out
    decoder = model.decoder
    times = {"compiled whole": [], "straight": [], "straight, GEMVs not bound": [],
             "checked (ops.py)": []}
    for _ in range(n):
        for name in times:
            model.decoder = decoder if name == "compiled whole" else None
            model.cpu_steps = None if name.startswith("checked") else direct
            direct.linear = unbound if name.endswith("not bound") else bound
            t = time.perf_counter()
            model.forward([5], pos)
            times[name].append(time.perf_counter() - t)
            pos += 1
    model.cpu_steps, direct.linear = direct, bound
    model.decoder = None                         # the rest times the steps one by one
    for name, ts in times.items():
        step = statistics.median(ts)
        print(f"  {name:26s} {ms(step)} a token, {1 / step:.2f} tok/s")
    return pos


def by_kind(model, pos, n):
    acc, steps, rows = {}, model.cpu_steps, []
    originals = timed_steps(steps, acc)
    try:
        for _ in range(n):
            acc.clear()
            t = time.perf_counter()
            model.forward([5], pos)
            rows.append((time.perf_counter() - t, dict(acc)))
            pos += 1
    finally:
        for kind, fn in originals.items():
            setattr(steps, kind, fn)
    total = statistics.median(r[0] for r in rows)
    print(f"  step {ms(total)}")
    parts = {k: statistics.median(r[1].get(k, 0.0) for r in rows) for k in STEP_KINDS}
    for kind, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:18s} {ms(t)}")
    print(f"  {'the rest (Python)':18s} {ms(total - sum(parts.values()))}")
    return pos


def gemvs_alone(model, rounds=6):
    w = model.weights
    mats = [getattr(lw, name) for lw in w.layers for name in MATRICES] + [w.lm_head]
    family = kernels(weight_format(mats[0]).family("cpu"), "cpu")
    no_bias = np.empty(0, np.float32)
    rng = np.random.default_rng(0)
    io = {m.shape: (rng.standard_normal((1, m.shape[1])).astype(np.float32),
                    np.empty((1, m.shape[0]), np.float32)) for m in mats}
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for m in mats:
            x, out = io[m.shape]
            family.linear(out, x, m, no_bias)
        times.append(time.perf_counter() - t)
    nbytes = sum(m.nbytes for m in mats)
    t = statistics.median(times[1:])
    print(f"  {len(mats)} GEMVs, {nbytes / 1e9:.2f} GB: {ms(t)}, {nbytes / t / 1e9:.1f} GB/s")


def long_context(model, n_ctx, n):
    far = Model(model.config, model.weights, max_seq=model.max_seq, kv_dtype=model.kv_dtype)
    far.decoder = None                           # the steps, timed one by one
    rng = np.random.default_rng(1)
    model.forward(rng.integers(0, model.config.vocab_size, 16), 0)
    far.forward(rng.integers(0, model.config.vocab_size, n_ctx), 0)
    res = {}
    for name, m, pos in (("context 16", model, 16), (f"context {n_ctx}", far, n_ctx)):
        res[name] = (m, pos, [])
    for _ in range(n):
        for name, (m, pos, rows) in res.items():
            acc = {}
            originals = timed_steps(m.cpu_steps, acc)
            t = time.perf_counter()
            m.forward([5], pos + len(rows))
            rows.append((time.perf_counter() - t, acc.get("attention", 0.0)))
            for kind, fn in originals.items():
                setattr(m.cpu_steps, kind, fn)
    for name, (_, _, rows) in res.items():
        step = statistics.median(r[0] for r in rows)
        att = statistics.median(r[1] for r in rows)
        print(f"  {name:14s} step {ms(step)} ({1 / step:.2f} tok/s), attention {ms(att)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--long-context", type=int, default=0)
    args = ap.parse_args()
    max_seq = max(256, args.long_context + args.steps + 8)
    model = Model.from_pretrained(args.path, weight_dtype=args.weight_dtype,
                                  kv_dtype=args.kv_dtype, max_seq=max_seq)
    print(f"{args.path}: {model.weight_dtype} weights, {model.kv_dtype} KV cache, "
          f"{model.config.n_layers} layers")
    model.warmup()
    model.forward(np.arange(1, 17), 0)
    print("decode step compiled whole, kernels called straight (GEMVs bound once, or not), "
          "ops.py's checked steps:")
    pos = straight_vs_checked(model, 16, args.steps)
    print("decode step by step kind (kernels called straight):")
    by_kind(model, pos, args.steps)
    print("every GEMV of a token, back to back:")
    gemvs_alone(model)
    if args.long_context:
        print(f"decode at context 16 and {args.long_context}, in turn:")
        long_context(model, args.long_context, args.steps)


if __name__ == "__main__":
    main()
