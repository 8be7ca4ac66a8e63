"""Quality of the weight and KV-cache storages on a model: perplexity over a text (as
`numba-attn perplexity` scores it) and the mean KL divergence of each storage's next-token
distributions from float32's over the text's first window, one row per storage; each window
a prefill, or with --decode every token a decode step (the decode kernels scored).

    python bench/quality_formats.py [--model DIR] [--text FILE] [--context 256]
        [--storages float32/float32,q8_0/bfloat16,...] [--decode]"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn import DEMO_MODEL, Model, Tokenizer  # noqa: E402
from numba_attn.perplexity import perplexity, windows  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGES = ("float32/float32,float32/float16,float32/bfloat16,bfloat16/bfloat16,q8_0/float32,"
            "q8_0/float16,q8_0/bfloat16")


def log_probs(model, ids, decode=False):
    """log-probabilities (len(ids), vocab) float64 of the next token after each of ids, from
    position 0: one prefill, or (decode) one decode step a token."""
    if decode:
        model.reset()
        z = np.stack([model.forward([t], i).copy() for i, t in enumerate(ids)]).astype(np.float64)
        model.reset()
    else:
        z = model.forward(ids, 0, all_logits=True).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def parser(doc):
    """The arguments every quality script takes: --model, --text, --context."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--text", default=os.path.join(HERE, "tests", "data", "austen_heldout.txt"))
    ap.add_argument("--context", type=int, default=256)
    return ap


def reference(model, args):
    """The text's token ids, model's log-probabilities over its first window and its
    perplexity (the float32 reference), after a line saying what was scored."""
    with open(args.text, encoding="utf-8") as f:
        ids = Tokenizer(args.model, model.config.bos_token_id).encode(f.read())
    ref_lp = log_probs(model, np.asarray(ids[:args.context]))
    ref_ppl = perplexity(model, ids, context=args.context).perplexity
    print(f"{args.model}, {len(ids)} tokens of {os.path.basename(args.text)}, windows of "
          f"{args.context}; float32 perplexity {ref_ppl:.4f}")
    return ids, ref_lp, ref_ppl


def quality(model, ids, context, ref_lp, decode=False):
    """model's perplexity over ids in windows of context, and the mean KL divergence of its
    next-token distributions over the first window from ref_lp's (log_probs of the reference);
    decode: every token a decode step (the decode kernels scored), else a prefill a window."""
    if decode:
        nll, scored = 0.0, 0
        for start, stop in windows(len(ids), context):
            lp = log_probs(model, ids[start:stop], decode=True)
            nll -= lp[np.arange(stop - start - 1), ids[start + 1:stop]].sum()
            scored += stop - start - 1
        ppl = float(np.exp(nll / scored))
    else:
        ppl = perplexity(model, ids, context=context).perplexity
    lp = log_probs(model, np.asarray(ids[:context]), decode)
    model.reset()
    return ppl, (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=1).mean()


def main():
    ap = parser(__doc__)
    ap.add_argument("--storages", default=STORAGES, help="WEIGHTS/KV,... [%(default)s]")
    ap.add_argument("--decode", action="store_true",
                    help="score every token as a decode step (the decode kernels), not a "
                         "window's prefill")
    args = ap.parse_args()
    models = {}
    for s in ["float32/float32"] + args.storages.split(","):
        w, _, kv = s.partition("/")
        models[s] = Model.from_pretrained(args.model, weight_dtype=w, kv_dtype=kv or "auto")
    ids, ref_lp, ref_ppl = reference(models["float32/float32"], args)
    print("| weights / KV cache | perplexity | vs float32 | mean KL from float32 (nats) |")
    print("|---|---:|---:|---:|")
    for s in args.storages.split(","):
        m = models[s]
        ppl, kl = quality(m, ids, args.context, ref_lp, args.decode)
        print(f"| {m.weight_dtype} / {m.kv_dtype} | {ppl:.4f} | {ppl / ref_ppl - 1:+.4%} "
              f"| {kl:.2e} |")


if __name__ == "__main__":
    main()
