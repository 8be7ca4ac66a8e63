"""Loading a GGUF Q8_0 file against loading the same weights from safetensors as q8_0: load
time, peak resident memory and decode rate, each in a fresh process.

    python bench/bench_load.py [--folder /tmp/tinyllama] [--repeat 3] [--decode 16] [--rounds 8]

The folder holds a float32 checkpoint (config.json, model.safetensors; bench/bench_model.py
writes TinyLlama-1.1B's shape with random weights). Its Q8_0 GGUF is written next to it once
(model-q8_0-converted.gguf, by tests/gguf_file.py as llama.cpp's converter writes it: Q/K rows
permuted, Q8_0 blocks from the gguf package, a placeholder vocabulary of the model's size).

Each load runs in a fresh process, the two kinds alternating, --repeat times each (both files
are read once first, so both come from the page cache). The table gives the best load time and
the peak RSS of that run (VmHWM right after the load: interpreter and Numba included). Decode
is measured in one more process holding both models, their rounds alternating (on a shared
machine the other load then falls on both alike): the best of --rounds rounds of --decode
single-token steps after an 8-token prompt, kernels warmed up. Every figure comes with its
ratio to safetensors -> q8_0. The two models' logits are compared: the gguf package's Q8_0
and our quantize_q8_0 are the same bytes, so they should be equal."""
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

sys.path.insert(0, HERE)
from bench_model import vm  # noqa: E402  (a /proc/self/status field in bytes)


def measure_load(source):
    """One load in this process: {"load_s", "peak_rss", "weights", "logits"}."""
    import numpy as np

    from numba_attn.model import Model

    t0 = time.perf_counter()
    model = Model.from_pretrained(source, weight_dtype="q8_0", max_seq=256)
    load_s = time.perf_counter() - t0
    peak = vm("VmHWM")
    logits = model.forward(np.arange(1, 9), 0)
    return {"load_s": load_s, "peak_rss": peak, "weights": model.weights.nbytes,
            "logits": logits[:64].tolist()}


def measure_decode(sources, steps, rounds):
    """Both models loaded in this process, decode rounds alternating between them (a shared
    machine's load then falls on both alike): {source: best tokens/s}."""
    import numpy as np

    from numba_attn.model import Model

    models = {s: Model.from_pretrained(s, weight_dtype="q8_0", max_seq=256) for s in sources}
    prompt = np.arange(1, 9)
    best = dict.fromkeys(sources, 0.0)
    for model in models.values():
        model.warmup()
    for _ in range(rounds):
        for source, model in models.items():
            model.forward(prompt, 0)
            t0 = time.perf_counter()
            for i in range(steps):
                model.forward(np.array([100 + i]), len(prompt) + i)
            best[source] = max(best[source], steps / (time.perf_counter() - t0))
    return best


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
    ap.add_argument("--repeat", type=int, default=3, help="loads of each kind (best kept)")
    ap.add_argument("--decode", type=int, default=16, help="decode steps a round")
    ap.add_argument("--rounds", type=int, default=8, help="decode rounds of each model")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--decode-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_load(args.child)))
        return
    if args.decode_child:
        print(json.dumps(measure_decode(args.decode_child, args.decode, args.rounds)))
        return
    gguf_path = write_gguf_once(args.folder)
    cases = {"safetensors -> q8_0": args.folder, "GGUF Q8_0": gguf_path}
    for path in (os.path.join(args.folder, "model.safetensors"), gguf_path):
        read_through(path)
    runs = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, source in cases.items():
            runs[name].append(child("--child", source))
    decode = child("--decode-child", *cases.values(), "--decode", str(args.decode),
                   "--rounds", str(args.rounds))
    best = {name: dict(min(r, key=lambda x: x["load_s"]), decode_tok_s=decode[cases[name]])
            for name, r in runs.items()}
    base = best["safetensors -> q8_0"]
    same = best["GGUF Q8_0"]["logits"] == base["logits"]
    print(f"TinyLlama-1.1B shape, q8_0 weights ({base['weights'] / 1e9:.2f} GB); best of "
          f"{args.repeat} loads each in fresh processes; decode: best of {args.rounds} rounds "
          f"of {args.decode} steps after an 8-token prompt, the two models alternating in one "
          f"process; logits of the two models equal: {'yes' if same else 'NO'}\n")
    print("| source | load s | peak RSS | decode tok/s |")
    print("|---|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['load_s']:.2f} ({r['load_s'] / base['load_s']:.2f}x) | "
              f"{r['peak_rss'] / 1e9:.2f} GB ({r['peak_rss'] / base['peak_rss']:.2f}x) | "
              f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x) |")
    each = {name: ", ".join("%.2f" % x["load_s"] for x in r) for name, r in runs.items()}
    print("\nevery load, s: " + "; ".join(f"{n}: {v}" for n, v in each.items()))


def child(*args):
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
