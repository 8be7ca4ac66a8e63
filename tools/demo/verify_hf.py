"""Cross-check the exported demo model against Hugging Face transformers.

Development-only (needs torch and transformers, which numba_attn never uses):

    python tools/demo/verify_hf.py [--model-dir numba_attn/models/demo] \
        [--golden tests/data/demo_golden.json]

Loads the folder with ``transformers.LlamaForCausalLM`` (float32) and
``PreTrainedTokenizerFast`` and checks that the prompt tokenization, the
last-position logits and the greedy continuations recorded in the golden file
are reproduced, i.e. that train.py's own PyTorch Llama matches HF's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=os.path.join(REPO, "numba_attn", "models", "demo"))
    ap.add_argument("--golden", default=os.path.join(REPO, "tests", "data", "demo_golden.json"))
    args = ap.parse_args()

    import transformers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    print("transformers", transformers.__version__, "torch", torch.__version__)
    with open(args.golden) as f:
        golden = json.load(f)
    tok = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    model.eval()
    ok = True
    with torch.no_grad():
        ll = golden["last_logits"]
        ids = tok(ll["prompt"])["input_ids"]
        if ids != ll["prompt_ids"]:
            print("tokenization mismatch", ids, ll["prompt_ids"])
            ok = False
        logits = model(torch.tensor([ll["prompt_ids"]])).logits[0, -1].float()
        top = torch.topk(logits, 10)
        diff = (top.values - torch.tensor(ll["top10_values"])).abs().max().item()
        d16 = (logits[:16] - torch.tensor(ll["first16_values"])).abs().max().item()
        same_ids = [int(i) for i in top.indices] == ll["top10_ids"]
        print(f"last logits: top10 ids equal {same_ids}, max |diff| top10 {diff:.2e}, "
              f"first16 {d16:.2e}")
        ok &= same_ids and diff < 1e-3 and d16 < 1e-3
        for case in golden["cases"]:
            assert tok(case["prompt"])["input_ids"] == case["prompt_ids"]
            out = model.generate(torch.tensor([case["prompt_ids"]]), do_sample=False,
                                 max_new_tokens=golden["max_new_tokens"],
                                 min_new_tokens=golden["max_new_tokens"],
                                 eos_token_id=None, pad_token_id=0)
            new = out[0, len(case["prompt_ids"]):].tolist()
            match = new == case["generated_ids"]
            ok &= match
            print(f"greedy {case['prompt']!r}: match {match}; HF text "
                  f"{tok.decode(new)!r}")
            # also full recomputation without KV cache
            ids = list(case["prompt_ids"])
            for _ in range(golden["max_new_tokens"]):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            m2 = ids[len(case["prompt_ids"]):] == case["generated_ids"]
            ok &= m2
            print(f"  no-cache recompute match {m2}")
    print("HF CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
