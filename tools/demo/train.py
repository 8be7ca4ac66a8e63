"""Train the built-in numba-attn demo model ("austen-llama") from scratch.

Development-only script: it needs PyTorch (``pip install torch==2.13.0``), which
the numba_attn package itself never imports.

Pipeline (all steps single-threaded by default):

1. corpus    -- Jane Austen's six novels from the Debian package r-cran-janeaustenr
               (see tools/demo/CORPUS.md and tools/demo/corpus.py);
2. tokenizer -- byte-level BPE (HF ``tokenizers``), 4096 tokens, <unk>=0 <s>=1 </s>=2;
3. model     -- a small Llama (GQA, rotate_half RoPE, RMSNorm, SwiGLU, no biases),
               written here in plain PyTorch to match HF LlamaForCausalLM exactly;
4. export    -- HF folder numba_attn/models/demo/ (config.json, generation_config.json,
               model.safetensors in float16, tokenizer.json, tokenizer_config.json);
5. golden    -- tests/data/demo_golden.json computed with the *exported* (fp16-rounded)
               weights in float32;
6. report    -- tools/demo/TRAINING.md with losses, wall time and samples.

Reproduce the shipped model::

    python tools/demo/corpus.py          # apt-get download r-cran-janeaustenr + extract
    python tools/demo/train.py           # ~35 min on one CPU thread

Re-export / regenerate golden data and samples from the saved checkpoint without
retraining::

    python tools/demo/train.py --export-only
"""
from __future__ import annotations

import os

# Single thread everywhere (tokenizers uses rayon, torch uses OpenMP).  These must
# be set before tokenizers / torch are imported.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

GOLDEN_PROMPTS = [  # chosen so that greedy decoding does not reach </s> within 40 tokens
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "\"Oh! Mr. Bennet,",
    "Captain Wentworth",
    "Emma could not",
]
SAMPLE_PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Mrs. Bennet was",
    "\"I cannot",
]


# --------------------------------------------------------------------------------------
# Model: plain-PyTorch Llama, module names identical to transformers' LlamaForCausalLM
# --------------------------------------------------------------------------------------
class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(head_dim: int, positions: torch.Tensor, theta: float):
    """cos/sin tables exactly as HF LlamaRotaryEmbedding (default rope type)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x: (B, H, T, hd); cos/sin: (T, hd)
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg["hidden_size"], cfg["head_dim"]
        self.nh, self.nkv, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], hd
        self.q_proj = nn.Linear(d, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(d, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.nh // self.nkv  # GQA: query head h uses kv head h // rep (HF repeat_kv)
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.hd))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, ff = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = LlamaRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        assert not cfg["tie_word_embeddings"]

    def init_weights(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg["num_hidden_layers"])
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    def forward(self, ids):  # ids: (B, T) -> logits (B, T, V), positions 0..T-1
        T = ids.shape[1]
        cos, sin = rope_cos_sin(self.cfg["head_dim"], torch.arange(T, device=ids.device),
                                self.cfg["rope_theta"])
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def make_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.dim // args.heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": args.seq_len,
        "vocab_size": args.vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float16",
    }


# --------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------
def load_paragraphs(path: str) -> list[str]:
    if not os.path.exists(path):
        print(f"corpus {path} missing: extracting it from the Debian package", flush=True)
        import subprocess
        subprocess.run([sys.executable, os.path.join(HERE, "corpus.py"), "--out", path], check=True)
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def split_paragraphs(paras: list[str], block: int = 50, every: int = 25):
    """Hold out every `every`-th block of `block` consecutive paragraphs (4%) for validation."""
    train, val = [], []
    for i, p in enumerate(paras):
        (val if (i // block) % every == every // 2 else train).append(p)
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like HF Llama tokenizers: encode(text) prepends <s> (add_special_tokens=True default).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    assert tok.token_to_id(UNK) == UNK_ID and tok.token_to_id(BOS) == BOS_ID
    assert tok.token_to_id(EOS) == EOS_ID
    return tok


def to_stream(tok: Tokenizer, paras: list[str]) -> torch.Tensor:
    out = []
    for enc in tok.encode_batch(paras, add_special_tokens=False):
        out.append(BOS_ID)
        out.extend(enc.ids)
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.int64)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def lr_at(step: int, progress: float, args) -> float:
    """Linear warm-up over args.warmup steps, then cosine decay to args.min_lr by progress 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_loss(model, windows: torch.Tensor) -> torch.Tensor:
    x, y = windows[:, :-1], windows[:, 1:].clone()
    y[y == BOS_ID] = -100  # "</s> -> <s>" transitions are free; don't count them
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                           ignore_index=-100, reduction="sum"), (y != -100).sum()


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch: int, max_windows=None) -> float:
    model.eval()
    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    wins = torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    dev = next(model.parameters()).device
    tot, cnt = 0.0, 0
    for i in range(0, n, batch):
        loss, c = batch_loss(model, wins[i:i + batch].to(dev))
        tot += loss.item()
        cnt += c.item()
    model.train()
    return tot / cnt


def train(args, cfg, train_stream, val_stream, log):
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model = LlamaForCausalLM(cfg)
    model.init_weights(args.seed)
    model.to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(args.seed + 1)
    T = args.seq_len
    history = []
    t0 = time.time()
    run_loss, run_n = 0.0, 0
    limit_s = args.time_limit * 60.0
    step = 0
    while True:
        # Progress drives the cosine schedule: normally step/steps, but if the machine is
        # slower than planned the wall-clock budget takes over so that training still ends
        # (fully annealed) within --time-limit minutes.
        progress = max(step / args.steps, (time.time() - t0) / limit_s if step >= args.warmup else 0.0)
        lr = lr_at(step, progress, args)
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(train_stream) - T - 1, (args.batch,), generator=g)
        wins = torch.stack([train_stream[s: s + T + 1] for s in starts.tolist()]).to(dev)
        loss_sum, cnt = batch_loss(model, wins)
        loss = loss_sum / cnt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item()
        run_n += 1
        step += 1
        last = step >= args.steps or (step > args.warmup and (time.time() - t0) >= limit_s)
        if step % args.log_every == 0 or last:
            el = time.time() - t0
            tps = step * args.batch * T / el
            rec = {"step": step, "train_loss": run_loss / run_n, "lr": lr, "elapsed_s": el}
            if step % args.eval_every == 0 or last:
                rec["val_loss"] = evaluate(model, val_stream, T, args.batch, args.eval_windows)
            history.append(rec)
            log("step %5d  train %.4f%s  lr %.2e  %.0fs  %.0f tok/s" % (
                step, rec["train_loss"],
                "  val %.4f" % rec["val_loss"] if "val_loss" in rec else "", rec["lr"], el, tps))
            run_loss, run_n = 0.0, 0
        if last:
            break
    return model, history, time.time() - t0


# --------------------------------------------------------------------------------------
# Export, golden data, samples
# --------------------------------------------------------------------------------------
def export(model, cfg, tok, out_dir: str):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": True,
           "temperature": 0.8, "max_length": cfg["max_position_embeddings"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "unk_token": UNK, "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg["max_position_embeddings"]}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
        f.write("\n")


def load_exported(out_dir: str) -> tuple[LlamaForCausalLM, dict]:
    """Fresh float32 model from the exported (float16) files."""
    from safetensors.torch import load_file
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    model = LlamaForCausalLM(cfg)
    sd = load_file(os.path.join(out_dir, "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    model.eval()
    return model, cfg


@torch.no_grad()
def greedy(model, ids: list[int], n_new: int, stop_at_eos: bool):
    """Greedy argmax decoding by full recomputation; returns (new_ids, top1-top2 margins)."""
    ids = list(ids)
    new, margins = [], []
    for _ in range(n_new):
        logits = model(torch.tensor([ids]))[0, -1]
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        new.append(nxt)
        ids.append(nxt)
        if stop_at_eos and nxt == EOS_ID:
            break
    return new, margins


@torch.no_grad()
def sample(model, ids: list[int], n_new: int, temperature: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = list(ids)
    new = []
    max_pos = model.cfg["max_position_embeddings"]
    for _ in range(n_new):
        if len(ids) >= max_pos:
            break
        logits = model(torch.tensor([ids]))[0, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        if nxt == EOS_ID:
            break
        new.append(nxt)
        ids.append(nxt)
    return new


def make_golden(out_dir: str, golden_path: str, n_new: int):
    model, cfg = load_exported(out_dir)
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    cases = []
    for p in GOLDEN_PROMPTS:
        ids = tok.encode(p).ids  # post-processor prepends <s>
        assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
        new, margins = greedy(model, ids, n_new, stop_at_eos=False)
        cases.append({
            "prompt": p,
            "prompt_ids": ids,
            "generated_ids": new,
            "generated_text": tok.decode(new, skip_special_tokens=False),
            "min_top1_top2_margin": min(margins),
        })
    with torch.no_grad():
        logits = model(torch.tensor([cases[0]["prompt_ids"]]))[0, -1].float()
    top = torch.topk(logits, 10)
    golden = {
        "description": "Golden outputs of the built-in demo model (numba_attn/models/demo), "
                       "computed by tools/demo/train.py with the PyTorch reference model "
                       "loaded from the exported float16 weights and run in float32.",
        "model_dir": "numba_attn/models/demo",
        "weights_dtype": "float16",
        "compute_dtype": "float32",
        "bos_prepended": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "decoding": "greedy argmax; exactly max_new_tokens new tokens; no stop at EOS; "
                    "positions start at 0 with the BOS token",
        "max_new_tokens": n_new,
        "stop_at_eos": False,
        "cases": cases,
        "last_logits": {
            "case": 0,
            "prompt": cases[0]["prompt"],
            "prompt_ids": cases[0]["prompt_ids"],
            "position": len(cases[0]["prompt_ids"]) - 1,
            "vocab_size": int(logits.numel()),
            "top10_ids": [int(i) for i in top.indices],
            "top10_values": [float(v) for v in top.values],
            "first16_values": [float(v) for v in logits[:16]],
            "mean": float(logits.mean()),
            "std": float(logits.std()),
            "logsumexp": float(torch.logsumexp(logits, 0)),
        },
    }
    os.makedirs(os.path.dirname(golden_path), exist_ok=True)
    text = json.dumps(golden, indent=1)
    # one line per list of numbers
    text = re.sub(r"\[\n\s*([^\[\]{}\"]*?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  text)
    with open(golden_path, "w") as f:
        f.write(text + "\n")
    return golden


def make_samples(out_dir: str, n_new: int = 120):
    model, cfg = load_exported(out_dir)
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    out = []
    for i, p in enumerate(SAMPLE_PROMPTS):
        ids = tok.encode(p).ids
        g_new, _ = greedy(model, ids, n_new, stop_at_eos=True)
        if g_new and g_new[-1] == EOS_ID:
            g_new = g_new[:-1]
        s_new = sample(model, ids, n_new, 0.8, seed=1234 + i)
        out.append({"prompt": p,
                    "greedy": p + tok.decode(g_new),
                    "t0.8": p + tok.decode(s_new)})
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(path, args, cfg, n_params, corpus_info, history, final, times, samples, golden):
    cmd = "python tools/demo/train.py " + " ".join(args.argv)
    lines = [
        "# Demo model training log",
        "",
        "Generated by `tools/demo/train.py`; do not edit by hand (rerun the script).",
        "",
        "## Command",
        "",
        "```",
        "python tools/demo/corpus.py",
        cmd.strip(),
        "```",
        "",
        f"Machine: {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), device `{args.device}`, "
        f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}.",
        "",
        "## Wall time",
        "",
        f"- tokenizer training: {times['tokenizer']:.1f} s",
        f"- tokenization: {times['tokenize']:.1f} s",
        f"- model training ({history[-1]['step']} of at most {args.steps} steps, time limit "
        f"{args.time_limit} min, incl. periodic validation): "
        f"{times['train']:.1f} s ({times['train'] / 60:.1f} min), "
        f"{history[-1]['step'] * args.batch * args.seq_len / times['train']:.0f} training tokens/s "
        "on average",
        *([f"  (the {args.time_limit:g}-minute limit ended training before step {args.steps}: the "
           "machine ran slower than planned, e.g. shared with other jobs; the cosine schedule "
           "followed wall-clock time)"] if history[-1]["step"] < args.steps else []),
        f"- final evaluation, export, golden data, samples: {times['post']:.1f} s",
        f"- total: {times['total']:.1f} s ({times['total'] / 60:.1f} min)",
        "",
        "## Data",
        "",
        f"- corpus: {corpus_info['chars']:,} characters, {corpus_info['paras']:,} paragraphs "
        "(Jane Austen's six novels, see CORPUS.md)",
        f"- split: every 25th block of 50 consecutive paragraphs held out for validation: "
        f"{corpus_info['train_tokens']:,} train tokens, {corpus_info['val_tokens']:,} val tokens "
        f"(each paragraph is `<s> ... </s>`)",
        f"- tokenizer: byte-level BPE, vocab {cfg['vocab_size']}, "
        f"{corpus_info['chars_per_token']:.2f} characters per token on the corpus",
        "",
        "## Model",
        "",
        f"Llama: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads "
        f"(head_dim {cfg['head_dim']}), SwiGLU intermediate {cfg['intermediate_size']}, "
        f"vocab {cfg['vocab_size']}, context {cfg['max_position_embeddings']}, untied "
        f"lm_head; {n_params:,} parameters ({n_params / 1e6:.2f} M), stored as float16.",
        "",
        f"Optimiser: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), "
        f"peak lr {args.lr}, {args.warmup} warm-up steps, cosine to {args.min_lr} "
        f"(schedule progress = max(step/{args.steps}, elapsed/{args.time_limit} min)), "
        f"batch {args.batch} x {args.seq_len} tokens, grad clip 1.0, seed {args.seed}.",
        "",
        "## Loss (nats/token)",
        "",
        f"Final, whole splits, float32 weights: **train {final['train']:.4f}, "
        f"val {final['val']:.4f}**; with the exported float16 weights: val "
        f"{final['val_fp16']:.4f}.",
        "",
        f"Train = mean loss over the preceding {args.log_every} training batches; "
        f"val = first {args.eval_windows} validation windows.",
        "",
        "| step | train | val | lr | elapsed s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in history:
        v = "%.4f" % r["val_loss"] if "val_loss" in r else ""
        lines.append(f"| {r['step']} | {r['train_loss']:.4f} | {v} | {r['lr']:.2e} | "
                     f"{r['elapsed_s']:.0f} |")
    lines += ["", "## Samples (exported weights)", "",
              "Greedy decoding stops at `</s>`; sampling uses temperature 0.8, "
              "no top-k/top-p, fixed seeds. At most 120 new tokens. As usual for a model this "
              "small, greedy decoding soon falls into loops; sampled text is more varied.", ""]
    for s in samples:
        lines += [f"**Prompt:** `{s['prompt']}`", "",
                  "Greedy:", "", "> " + s["greedy"].replace("\n", "\n> "), "",
                  "Temperature 0.8:", "", "> " + s["t0.8"].replace("\n", "\n> "), ""]
    lines += ["## Golden data", "",
              "`tests/data/demo_golden.json`: greedy continuations "
              f"({golden['max_new_tokens']} tokens, no stop at EOS) of these prompts:", ""]
    for c in golden["cases"]:
        lines.append(f"- `{c['prompt']}` -> `{c['generated_text']}` "
                     f"(smallest top-1/top-2 logit gap {c['min_top1_top2_margin']:.3f})")
    lines += ["", "`tools/demo/verify_hf.py` checks the exported folder against Hugging Face "
              "transformers' LlamaForCausalLM, and `tests/test_demo_golden.py` against an "
              "independent numpy implementation and the numba_attn engine.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description="train the numba-attn demo model")
    ap.add_argument("--corpus", default=os.path.join(HERE, "data", "austen.txt"))
    ap.add_argument("--out-dir", default=os.path.join(REPO, "numba_attn", "models", "demo"))
    ap.add_argument("--golden", default=os.path.join(REPO, "tests", "data", "demo_golden.json"))
    ap.add_argument("--report", default=os.path.join(HERE, "TRAINING.md"))
    ap.add_argument("--ckpt", default=os.path.join(HERE, "runs", "ckpt.pt"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--time-limit", type=float, default=32.0,
                    help="wall-clock budget of the training loop in minutes; the lr schedule "
                         "follows max(step/steps, elapsed/limit)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--golden-tokens", type=int, default=40)
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: load --ckpt, re-export, redo golden data and report")
    ap.add_argument("--no-export", action="store_true", help="train only (hyper-parameter runs)")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg):
        print(msg, flush=True)

    paras = load_paragraphs(args.corpus)
    train_p, val_p = split_paragraphs(paras)
    times = {}
    if args.export_only:
        ck = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        tok = Tokenizer.from_str(ck["tokenizer"])
        keep = {"corpus", "out_dir", "golden", "report", "ckpt", "export_only", "no_export"}
        for k, v in ck["args"].items():  # report the hyper-parameters the checkpoint used
            if k not in keep:
                setattr(args, k, v)
        times.update(ck["times"])
    else:
        t = time.time()
        tok = train_tokenizer(train_p, args.vocab_size)
        times["tokenizer"] = time.time() - t
        log(f"tokenizer: {tok.get_vocab_size()} tokens in {times['tokenizer']:.1f}s")
    t = time.time()
    train_stream = to_stream(tok, train_p)
    val_stream = to_stream(tok, val_p)
    times["tokenize"] = time.time() - t
    n_chars = sum(len(p) for p in paras)
    corpus_info = {"chars": n_chars, "paras": len(paras), "train_tokens": len(train_stream),
                   "val_tokens": len(val_stream),
                   "chars_per_token": n_chars / (len(train_stream) + len(val_stream) - 2 * len(paras))}
    log(f"corpus: {n_chars} chars, {len(paras)} paragraphs, train {len(train_stream)} tokens, "
        f"val {len(val_stream)} tokens, {corpus_info['chars_per_token']:.2f} chars/token")
    cfg = make_config(args)

    if args.export_only:
        cfg = ck["config"]
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(ck["state_dict"])
        history = ck["history"]
    else:
        model, history, times["train"] = train(args, cfg, train_stream, val_stream, log)
        model = model.cpu().float()
        os.makedirs(os.path.dirname(args.ckpt), exist_ok=True)
        torch.save({"config": cfg, "state_dict": model.state_dict(), "history": history,
                    "tokenizer": tok.to_str(), "times": times, "args": vars(args)}, args.ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params: {n_params}")
    if args.no_export:
        return

    t = time.time()
    final = {"train": evaluate(model, train_stream[: len(val_stream)], args.seq_len, args.batch),
             "val": evaluate(model, val_stream, args.seq_len, args.batch)}
    export(model, cfg, tok, args.out_dir)
    exported, _ = load_exported(args.out_dir)
    final["val_fp16"] = evaluate(exported, val_stream, args.seq_len, args.batch)
    log("final: train %.4f  val %.4f  val(fp16 weights) %.4f" % (final["train"], final["val"],
                                                                   final["val_fp16"]))
    golden = make_golden(args.out_dir, args.golden, args.golden_tokens)
    for c in golden["cases"]:
        log(f"golden: {c['prompt']!r} -> {c['generated_text']!r} "
            f"(min margin {c['min_top1_top2_margin']:.4f})")
    samples = make_samples(args.out_dir)
    for s in samples:
        log("greedy: " + s["greedy"])
        log("t=0.8 : " + s["t0.8"])
    times["post"] = time.time() - t
    times["total"] = (time.time() - t_start) if not args.export_only else (
        times["tokenizer"] + times["tokenize"] + times["train"] + times["post"])
    write_report(args.report, args, cfg, n_params, corpus_info, history, final, times, samples,
                 golden)
    sizes = {f: os.path.getsize(os.path.join(args.out_dir, f)) for f in sorted(os.listdir(args.out_dir))}
    log("exported: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) +
        f" (total {sum(sizes.values())} bytes)")


if __name__ == "__main__":
    main()
