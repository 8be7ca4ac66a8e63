"""Loading a GGUF Q8_0 file against loading the same weights from safetensors as q8_0: load
time, peak resident memory and decode rate, each in a fresh process.

    python bench/bench_load.py [--folder /tmp/tinyllama] [--repeat 3] [--decode 16]

The folder holds a float32 checkpoint (config.json, model.safetensors; bench/bench_model.py
writes TinyLlama-1.1B's shape with random weights). Its Q8_0 GGUF is written next to it once
(model-q8_0-converted.gguf, by tests/gguf_file.py as llama.cpp's converter writes it: Q/K rows
permuted, Q8_0 blocks from the gguf package, a placeholder vocabulary of the model's size).

Each load runs in a fresh process, the two kinds alternating, --repeat times each (both files
are read once first, so both come from the page cache). The table gives the best load time,
the peak RSS of that run (VmHWM right after the load: interpreter and Numba included), the
best decode rate over the runs (each run: 5 rounds of --decode single-token steps after an
8-token prompt, kernels warmed up), and each figure as a ratio to the safetensors load. The
two models' logits are compared: the gguf package's Q8_0 and our quantize_q8_0 are the same
bytes, so they should be equal."""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

GGUF_NAME = "model-q8_0-converted.gguf"
DECODE_ROUNDS = 5


def vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(source, decode_steps):
    """One load in this process: {"load_s", "peak_rss", "weights", "decode_tok_s", "logits"}."""
    import numpy as np

    from numba_attn.model import Model

    t0 = time.perf_counter()
    model = Model.from_pretrained(source, weight_dtype="q8_0", max_seq=256)
    load_s = time.perf_counter() - t0
    peak = vm("VmHWM")
    model.warmup()
    prompt = np.arange(1, 9)
    logits = model.forward(prompt, 0).copy()
    best = float("inf")
    for _ in range(DECODE_ROUNDS):
        model.forward(prompt, 0)
        t0 = time.perf_counter()
        for i in range(decode_steps):
            model.forward(np.array([100 + i]), len(prompt) + i)
        best = min(best, time.perf_counter() - t0)
    return {"load_s": load_s, "peak_rss": peak, "weights": model.weights.nbytes,
            "decode_tok_s": decode_steps / best, "logits": logits[:64].tolist()}


def placeholder_vocab(folder):
    """A SentencePiece-style vocabulary of the model's size (<unk>, <s>, </s>, 256 byte tokens,
    then t<i>): the metadata a real file carries, parsed at every load."""
    with open(os.path.join(folder, "config.json")) as f:
        n = json.load(f)["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(n - len(tokens))]
    return {"model": "llama", "tokens": tokens, "scores": [-float(i) for i in range(n)],
            "types": [2, 3, 3] + [6] * 256 + [1] * (n - 259)}


def write_gguf_once(folder):
    path = os.path.join(folder, GGUF_NAME)
    if not os.path.isfile(path):
        from gguf_file import write_gguf
        t0 = time.perf_counter()
        write_gguf(folder, path + ".partial", "Q8_0", vocab=placeholder_vocab(folder))
        os.replace(path + ".partial", path)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def read_through(path):
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/tinyllama")
    ap.add_argument("--repeat", type=int, default=2, help="loads of each kind (best kept)")
    ap.add_argument("--decode", type=int, default=16, help="decode steps a round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.decode)))
        return
    gguf_path = write_gguf_once(args.folder)
    cases = {"safetensors -> q8_0": args.folder, "GGUF Q8_0": gguf_path}
    for path in (os.path.join(args.folder, "model.safetensors"), gguf_path):
        read_through(path)
    runs = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, source in cases.items():
            out = subprocess.run([sys.executable, __file__, "--child", source,
                                  "--decode", str(args.decode)],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {name: dict(min(r, key=lambda x: x["load_s"]),
                       decode_tok_s=max(x["decode_tok_s"] for x in r)) for name, r in runs.items()}
    base = best["safetensors -> q8_0"]
    same = best["GGUF Q8_0"]["logits"] == base["logits"]
    print(f"TinyLlama-1.1B shape, q8_0 weights ({base['weights'] / 1e9:.2f} GB); best of "
          f"{args.repeat} loads each in fresh processes; decode: {args.decode} steps after an "
          f"8-token prompt; logits of the two models equal: {'yes' if same else 'NO'}\n")
    print("| source | load s | peak RSS | decode tok/s |")
    print("|---|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['load_s']:.2f} ({r['load_s'] / base['load_s']:.2f}x) | "
              f"{r['peak_rss'] / 1e9:.2f} GB ({r['peak_rss'] / base['peak_rss']:.2f}x) | "
              f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x) |")
    for key, unit, fmt in (("load_s", "load s", "%.2f"), ("decode_tok_s", "decode tok/s", "%.1f")):
        each = {name: ", ".join(fmt % x[key] for x in r) for name, r in runs.items()}
        print(f"\nevery run, {unit}: " + "; ".join(f"{n}: {v}" for n, v in each.items()))


if __name__ == "__main__":
    main()
