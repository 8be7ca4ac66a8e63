"""Decode on the GPU, wall clock as a user sees it: ours (the step replayed as one CUDA graph;
the same bound kernels as plain launches; the public ops path) against Hugging Face
transformers with a static cache and torch.compile(mode="reduce-overhead") on the same GPU and
folder, TinyLlama-1.1B shape in float32 and float16; the limit (weight bytes a token reads over
the device-to-device copy rate); the host's time to issue a step; the demo model on the GPU
against the same host's CPU cores; the host time a prefill's launches take per layer.

    python bench/bench_cuda_decode.py [--path /tmp/tinyllama] [--steps 128] [--peers]
                                      [--only ours,peers,demo] [--json FILE]
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import TINYLLAMA, folder_matches, write_folder  # noqa: E402

PROMPT = 16


def copy_rate():
    """Device-to-device copy of 1 GiB through numba, bytes read + written per second (best of
    5, timed with events)."""
    from numba import cuda
    n = 1 << 28
    src, dst = cuda.device_array(n, np.float32), cuda.device_array(n, np.float32)
    dst.copy_to_device(src)
    best = float("inf")
    for _ in range(5):
        e0, e1 = cuda.event(), cuda.event()
        e0.record()
        dst.copy_to_device(src)
        e1.record()
        e1.synchronize()
        best = min(best, cuda.event_elapsed_time(e0, e1) / 1e3)
    return 2 * 4 * n / best


def ours(path, fmt, steps, modes=("graph", "plain", "ops")):
    """{mode: decode tok/s} for greedy decode of `steps` tokens after a PROMPT-token prompt,
    measured as generate() reports it (wall clock, sampling on the host included); plus the
    host time of a graph step (median) and bytes per token."""
    from numba_attn.generation import GenerationStats, generate
    from numba_attn.model import Model
    from numba_attn.sampling import SamplingParams
    model = Model.from_pretrained(path, device="cuda", weight_dtype=fmt, max_seq=1024)
    model.warmup()
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, PROMPT)
    greedy = SamplingParams(temperature=0)
    r = {"bytes_per_token": model.weights.bytes_per_token}
    decoder = model.decoder
    for mode in modes:
        n = steps if mode != "ops" else min(steps, 24)
        model.decoder = None if mode == "ops" else decoder
        decoder.why_plain = "plain launches (bench)" if mode == "plain" else None
        best, host = 0.0, []
        for _ in range(2):
            stats = GenerationStats()
            for _ in generate(model, prompt, max_tokens=n, sampling=greedy, stats=stats):
                if mode == "graph":
                    host.append(decoder.host_s)
            best = max(best, stats.decode_tok_s)
        r[mode] = best
        if mode == "graph":
            r["graph_host_us"] = statistics.median(host[1:]) * 1e6
            r["graphs"] = len(decoder.graphs)
    model.decoder = decoder
    decoder.why_plain = None
    r["prefill_host_us_per_layer"] = prefill_host(model)
    return r


def prefill_host(model, seq=512):
    """Host time to issue a prefill's launches (the ops path, no wait), per layer, in us."""
    from numba import cuda

    from numba_attn.backend import copy_from_host, rows
    from numba_attn.model import STEPS, Buffers
    b = Buffers(model.config, seq, "cuda")
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, seq)
    ids = copy_from_host(rows(b.ids, 0, seq), tokens)
    times = []
    for _ in range(3):
        model.cache.reset()
        cuda.synchronize()
        t = time.perf_counter()
        model.run_layers(STEPS, b, ids, seq, 0)
        times.append(time.perf_counter() - t)
        cuda.synchronize()
    model.cache.reset()
    return min(times) / model.config.n_layers * 1e6


def transformers_decode(path, dtype, steps):
    """transformers' generate with a static cache, its forward compiled by generate with
    torch.compile(mode="reduce-overhead") (CUDA graphs); decode tok/s from the
    time between the 2nd and last streamed token, best of 2 after two warm-up runs."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).cuda().eval()
    # a static cache on CUDA: generate compiles the forward itself (its CompileConfig's
    # default mode is "reduce-overhead": CUDA graphs)
    model.generation_config.cache_implementation = "static"

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                         (1, PROMPT)), device="cuda")
    rates = []
    t0 = time.perf_counter()
    compiled = "by generate"
    for i in range(4):
        s = Stamps()
        model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       streamer=s, pad_token_id=0)
        if i == 0:
            compile_s = time.perf_counter() - t0
            if getattr(model, "_compiled_call", None) is None:
                # this transformers did not compile generate's forward itself: compile it
                # the same way (CUDA graphs), and count the compile in the first run
                model.forward = torch.compile(model.forward, mode="reduce-overhead",
                                              fullgraph=True)
                compiled = "torch.compile(model.forward, mode='reduce-overhead')"
                model.generate(ids, max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, streamer=Stamps(), pad_token_id=0)
                compile_s = time.perf_counter() - t0
        if i >= 2:
            rates.append((len(s.t) - 3) / (s.t[-1] - s.t[2]))   # t[0]: the prompt
    return {"decode": max(rates), "first_run_s": compile_s, "compiled": compiled,
            "version": __import__("transformers").__version__ + " / torch " + torch.__version__}


def demo(steps):
    """The demo model: decode tok/s on the GPU and on this host's CPU cores."""
    from numba import config

    from numba_attn import DEMO_MODEL
    from numba_attn.generation import GenerationStats, generate
    from numba_attn.model import Model
    from numba_attn.sampling import SamplingParams
    r = {"cpu_threads": config.NUMBA_NUM_THREADS}
    for device in ("cuda", "cpu"):
        model = Model.from_pretrained(DEMO_MODEL, device=device)
        model.warmup()
        best = 0.0
        for _ in range(3):
            stats = GenerationStats()
            list(generate(model, [1, 45, 67, 89], max_tokens=steps,
                          sampling=SamplingParams(temperature=0), stats=stats))
            best = max(best, stats.decode_tok_s)
        r[device] = best
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="/tmp/tinyllama", help="TinyLlama-shaped folder (written "
                    "once with random weights if missing)")
    ap.add_argument("--steps", type=int, default=128, help="decode steps [128]")
    ap.add_argument("--only", default="ours,peers,demo", help="parts to run [ours,peers,demo]")
    ap.add_argument("--formats", default="float32,float16", help="weight formats")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    formats = args.formats.split(",")
    if not folder_matches(args.path, TINYLLAMA):
        print(f"writing a random TinyLlama-shaped folder to {args.path}...", flush=True)
        write_folder(args.path, TINYLLAMA)
    res = {"copy_GBps": copy_rate() / 1e9, "steps": args.steps}
    print(f"device-to-device copy: {res['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    for fmt in formats:
        if "ours" in parts:
            res[f"ours_{fmt}"] = r = ours(args.path, fmt, args.steps)
            print(f"ours {fmt}: {json.dumps(r)}", flush=True)
        if "peers" in parts:
            try:
                res[f"transformers_{fmt}"] = r = transformers_decode(args.path, fmt, args.steps)
            except Exception as e:  # noqa: BLE001 - report the peer's failure, go on
                res[f"transformers_{fmt}"] = r = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"transformers {fmt}: {json.dumps(r)}", flush=True)
    if "demo" in parts:
        res["demo"] = r = demo(args.steps)
        print(f"demo: {json.dumps(r)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    report(res, formats)


def report(res, formats):
    copy = res["copy_GBps"] * 1e9
    print("\n| weights | ours: graph | plain launches | ops path | transformers compiled | "
          "ours / transformers | limit (bytes / copy rate) | graph / limit | host per step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in formats:
        o, t = res.get(f"ours_{fmt}"), res.get(f"transformers_{fmt}", {})
        if not o:
            continue
        limit = copy / o["bytes_per_token"]
        peer = t.get("decode", float("nan"))
        print(f"| {fmt} | {o['graph']:.1f} tok/s | {o['plain']:.1f} | {o['ops']:.1f} | "
              f"{peer:.1f} | {o['graph'] / peer:.2f}x | {limit:.0f} tok/s | "
              f"{o['graph'] / limit:.0%} | {o['graph_host_us']:.0f} us |")
    if "demo" in res:
        d = res["demo"]
        print(f"\ndemo model: GPU {d['cuda']:.1f} tok/s, CPU ({d['cpu_threads']} threads) "
              f"{d['cpu']:.1f} tok/s: {d['cuda'] / d['cpu']:.2f}x")
    for fmt in formats:
        o = res.get(f"ours_{fmt}")
        if o:
            print(f"prefill-512 host time to issue its launches ({fmt}): "
                  f"{o['prefill_host_us_per_layer']:.0f} us per layer")


if __name__ == "__main__":
    main()
