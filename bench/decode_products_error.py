"""What decode's bfloat16 products cost in accuracy: a model decodes a text's tokens one at a
time (each step fed the text's next token) over a bfloat16 KV cache, with the products in
bfloat16 (attention_cpu.bf16_dots: the default on a CPU with AVX-512 BF16), with the same
cache read exactly into float32 arithmetic (bf16_dots turned off), and over a float32 cache; each
step's logits are compared, and the decode's perplexity of the text given.

    python bench/decode_products_error.py [--model DIR] [--tokens N] [--weight-dtype W]

Default: the demo model over the held-out Austen passage (tests/data/austen_heldout.txt)."""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn import DEMO_MODEL, Model, Tokenizer  # noqa: E402
from numba_attn.kernels import attention_cpu  # noqa: E402
from numba_attn.perplexity import token_logprobs  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                    "austen_heldout.txt")


def decode_logits(model, ids):
    """(len(ids), vocab) logits, one decode step a token (each copied: forward returns its own
    buffer)."""
    model.reset()
    return np.stack([np.array(model.forward(ids[i:i + 1], i)) for i in range(len(ids))])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--weight-dtype", default="auto")
    args = ap.parse_args()
    if not attention_cpu.bf16_dots(attention_cpu.KV_BF16, 1):
        sys.exit("this CPU has no AVX-512 BF16 (or NUMBA_ATTN_CPU_PATH turns it off): decode "
                 "reads a bfloat16 cache exactly here, there is nothing to compare")
    model = Model.from_pretrained(args.model, weight_dtype=args.weight_dtype, max_seq=args.tokens)
    tokenizer = Tokenizer(args.model, model.config.bos_token_id)
    ids = np.array(tokenizer.encode(open(TEXT).read()), np.int64)[:args.tokens]
    runs = {}
    dots = attention_cpu.bf16_dots
    for name, kv, products in (("bfloat16 cache, bfloat16 products", "bfloat16", dots),
                               ("bfloat16 cache read exactly", "bfloat16", lambda *a: False),
                               ("float32 cache", "float32", dots)):
        attention_cpu.bf16_dots = products
        model = Model.from_pretrained(args.model, weight_dtype=args.weight_dtype, kv_dtype=kv,
                                      max_seq=len(ids))
        runs[name] = decode_logits(model, ids)
    attention_cpu.bf16_dots = dots
    print(f"{args.model}: {len(ids)} tokens decoded one at a time, {model.weight_dtype} weights")
    base = runs["float32 cache"]
    scale = np.abs(base).max()
    for name, logits in runs.items():
        lp = token_logprobs(logits[:-1], ids[1:])
        ppl = float(np.exp(-lp.mean()))
        line = f"  {name:36s} perplexity {ppl:.4f}"
        if name != "float32 cache":
            diff = np.abs(logits - base).max()
            line += (f", logits against the float32 cache: max |diff| {diff:.2e}"
                     f" (of logits up to {scale:.1f}), argmax equal at "
                     f"{np.mean(logits.argmax(1) == base.argmax(1)):.1%} of steps")
        print(line)
    a, b = runs["bfloat16 cache, bfloat16 products"], runs["bfloat16 cache read exactly"]
    print(f"  bfloat16 products against the exact read of the same cache: max |diff| "
          f"{np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    main()
