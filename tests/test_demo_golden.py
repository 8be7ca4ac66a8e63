"""Checks for the built-in demo model (numba_attn/models/demo) and its golden data.

tests/data/demo_golden.json was written by tools/demo/train.py with the PyTorch
reference model loaded from the *exported* float16 weights and run in float32:

- ``cases[i]``: ``prompt``, ``prompt_ids`` (``<s>`` = 1 prepended), ``generated_ids``
  (greedy argmax, exactly ``max_new_tokens`` tokens, no stop at ``</s>``),
  ``generated_text`` and ``min_top1_top2_margin`` (smallest logit gap between the
  best and second-best token over the steps, to judge how safe an exact match is);
- ``last_logits``: the float32 logits at the last position of case 0's prompt
  (``top10_ids``/``top10_values``, ``first16_values``, ``mean``, ``std``, ``logsumexp``).

The first tests need only numpy, safetensors and tokenizers: they check the shipped
folder and re-derive the golden data with an independent numpy implementation of
HF LlamaForCausalLM.  The ``test_engine_*`` tests run numba_attn's engine
(``numba_attn.Model``) against the same data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "numba_attn" / "models" / "demo"
GOLDEN = ROOT / "tests" / "data" / "demo_golden.json"
REQUIRED_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
MAX_TOTAL_BYTES = 20 * 1024 * 1024
# The golden logits were written by PyTorch in float32, so they carry float32 error themselves:
# measured against a float64 forward pass, up to 6.7e-6 (logits up to ~10 in size). Measured
# errors against the golden values (2 cores, AVX-512): the engine 6.7e-6 (top-10 1.4e-6, first
# 16 6.7e-6), the float32 NumPy reference below 3.8e-6; mean and std 4.8e-7 at most.
# CPU_LOGIT_ATOL is ~4.5x the worst of those, CPU_STAT_ATOL ~6x.
CPU_LOGIT_ATOL = 3e-5
CPU_STAT_ATOL = 3e-6
# Engine vs the float64 forward pass below, every vocab entry at every position of the golden
# sequences (prefill and decode): measured at most 3.8e-6. ~5x:
ENGINE_F64_ATOL = 2e-5
# The defaults of check_last_logits, kept for tests/cuda/test_demo_golden_cuda.py (float32
# and float16 weight storage on a GPU), whose error was not measured here (no GPU was lent to
# the session that tightened the CPU bounds above); the CPU tests pass the CPU bounds.
LOGIT_ATOL = 2e-3
LOGIT_RTOL = 1e-3


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def config():
    with open(DEMO / "config.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def weights():
    from safetensors.numpy import load_file

    return load_file(str(DEMO / "model.safetensors"))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


# ----------------------------------------------------------------------------------
# The shipped folder
# ----------------------------------------------------------------------------------
def test_demo_folder_files_and_size():
    assert DEMO.is_dir(), DEMO
    for name in REQUIRED_FILES:
        assert (DEMO / name).is_file(), name
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < MAX_TOTAL_BYTES, total


def test_config(config):
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id",
                "tie_word_embeddings", "torch_dtype"]:
        assert key in config, key
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["tie_word_embeddings"] is False
    with open(DEMO / "generation_config.json") as f:
        gen = json.load(f)
    assert gen["bos_token_id"] == config["bos_token_id"]
    assert gen["eos_token_id"] == config["eos_token_id"]


def expected_shapes(cfg):
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (nh * hd, d),
            p + "self_attn.k_proj.weight": (nkv * hd, d),
            p + "self_attn.v_proj.weight": (nkv * hd, d),
            p + "self_attn.o_proj.weight": (d, nh * hd),
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        })
    return shapes


def test_weights_names_shapes_dtype(config, weights):
    shapes = expected_shapes(config)
    assert set(weights) == set(shapes)
    dtype = {"float16": np.float16, "float32": np.float32}[config["torch_dtype"]]
    for name, w in weights.items():
        assert w.shape == shapes[name], name
        assert w.dtype == dtype, name
        assert np.isfinite(w).all(), name


def test_tokenizer(config, tokenizer, golden):
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    assert tokenizer.token_to_id("<s>") == config["bos_token_id"] == golden["bos_token_id"]
    assert tokenizer.token_to_id("</s>") == config["eos_token_id"] == golden["eos_token_id"]
    text = "\"Oh! Mr. Bennet, you are wanted immediately; we are all in an uproar.\""
    ids = tokenizer.encode(text).ids
    assert ids[0] == config["bos_token_id"]  # <s> prepended by the post-processor
    assert tokenizer.encode(text, add_special_tokens=False).ids == ids[1:]
    assert tokenizer.decode(ids) == text  # byte-level decoder: clean round trip
    for case in golden["cases"]:
        assert tokenizer.encode(case["prompt"]).ids == case["prompt_ids"]
        assert tokenizer.decode(case["generated_ids"], skip_special_tokens=False) == \
            case["generated_text"]


def test_golden_format(golden, config):
    assert golden["stop_at_eos"] is False
    assert len(golden["cases"]) >= 3
    for case in golden["cases"]:
        assert case["prompt_ids"][0] == config["bos_token_id"]
        assert len(case["generated_ids"]) == golden["max_new_tokens"]
        assert all(0 <= t < config["vocab_size"] for t in case["generated_ids"])
    ll = golden["last_logits"]
    assert ll["prompt_ids"] == golden["cases"][ll["case"]]["prompt_ids"]
    assert ll["vocab_size"] == config["vocab_size"]
    assert len(ll["top10_ids"]) == len(ll["top10_values"]) == 10


# ----------------------------------------------------------------------------------
# Independent numpy reference of HF LlamaForCausalLM (float32, full recomputation)
# ----------------------------------------------------------------------------------
class NumpyLlama:
    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.w = {k: v.astype(np.float32) for k, v in weights.items()}
        hd = cfg["head_dim"]
        exps = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
        self.inv_freq = (np.float32(1.0) / (np.float32(cfg["rope_theta"]) ** exps)).astype(np.float32)

    def _rms(self, x, w):
        var = (x * x).mean(-1, keepdims=True)
        return w * (x / np.sqrt(var + np.float32(self.cfg["rms_norm_eps"])))

    def _rope(self, x, pos):  # x: (H, T, hd)
        freqs = pos[:, None].astype(np.float32) * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def logits(self, ids):
        """float32 logits of every position of `ids` (positions 0..T-1)."""
        cfg, w = self.cfg, self.w
        T, hd = len(ids), cfg["head_dim"]
        nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
        x = w["model.embed_tokens.weight"][np.asarray(ids)]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            rep = nh // nkv  # query head j reads KV head j // rep (HF repeat_kv)
            k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
            s = q @ k.transpose(0, 2, 1) / np.float32(math.sqrt(hd)) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v  # (nh, T, hd)
            x = x + a.transpose(1, 0, 2).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            g = h @ w[p + "mlp.gate_proj.weight"].T
            u = h @ w[p + "mlp.up_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
        x = self._rms(x, w["model.norm.weight"])
        return (x @ w["lm_head.weight"].T).astype(np.float32)


@pytest.fixture(scope="module")
def numpy_model(config, weights):
    return NumpyLlama(config, weights)


def check_last_logits(logits, golden, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, stat_atol=None):
    ll = golden["last_logits"]
    stat_atol = atol if stat_atol is None else stat_atol
    assert logits.shape == (ll["vocab_size"],)
    top = np.argsort(-logits, kind="stable")[:10]
    assert [int(t) for t in top] == ll["top10_ids"]
    np.testing.assert_allclose(logits[top], ll["top10_values"], atol=atol, rtol=rtol)
    np.testing.assert_allclose(logits[:16], ll["first16_values"], atol=atol, rtol=rtol)
    assert abs(float(logits.mean()) - ll["mean"]) < stat_atol
    assert abs(float(logits.std(ddof=1)) - ll["std"]) < stat_atol


def check_last_logits_cpu(logits, golden):
    check_last_logits(logits, golden, atol=CPU_LOGIT_ATOL, rtol=0.0, stat_atol=CPU_STAT_ATOL)


class NumpyLlama64(NumpyLlama):
    """The same forward pass in float64 (weights, RoPE table, norms): the error-free yardstick
    for the engine, and for the golden values themselves."""

    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        hd = cfg["head_dim"]
        self.inv_freq = 1.0 / (float(cfg["rope_theta"]) ** (np.arange(0, hd, 2) / hd))

    def _rms(self, x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg["rms_norm_eps"]))

    def _rope(self, x, pos):  # x: (H, T, hd)
        freqs = pos[:, None].astype(np.float64) * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * np.cos(emb) + rot * np.sin(emb)

    def logits(self, ids):
        """float64 logits of every position (the parent's float32 mask and scale promote)."""
        cfg, w = self.cfg, self.w
        T, hd = len(ids), cfg["head_dim"]
        nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        x = w["model.embed_tokens.weight"][np.asarray(ids)]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
            q, k = self._rope(q, pos), self._rope(k, pos)
            k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
            s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v
            x = x + a.transpose(1, 0, 2).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            g = h @ w[p + "mlp.gate_proj.weight"].T
            u = h @ w[p + "mlp.up_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
        x = self._rms(x, w["model.norm.weight"])
        return x @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def numpy_model64(config, weights):
    return NumpyLlama64(config, weights)


def test_numpy_reference_last_logits(numpy_model, golden):
    logits = numpy_model.logits(golden["last_logits"]["prompt_ids"])[-1]
    check_last_logits_cpu(logits, golden)


def test_float64_reference_last_logits(numpy_model64, golden):
    """The golden values sit within float32 error of the float64 forward pass."""
    logits = numpy_model64.logits(golden["last_logits"]["prompt_ids"])[-1]
    check_last_logits_cpu(logits, golden)


def test_numpy_reference_greedy(numpy_model, golden):
    for case in golden["cases"]:
        ids = list(case["prompt_ids"])
        for _ in range(golden["max_new_tokens"]):
            ids.append(int(np.argmax(numpy_model.logits(ids)[-1])))
        assert ids[len(case["prompt_ids"]):] == case["generated_ids"], case["prompt"]


# ----------------------------------------------------------------------------------
# The numba_attn engine
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    """The demo model with its float16 weights widened exactly and a float32 KV cache: float32
    arithmetic throughout, held to the float64 forward pass."""
    from numba_attn import Model

    return Model.from_pretrained(str(DEMO), kv_dtype="float32")


@pytest.fixture(scope="module")
def engine_auto():
    """The demo model as `generate` loads it: its KV cache in float16, as its weights."""
    from numba_attn import Model

    model = Model.from_pretrained(str(DEMO))
    assert model.kv_dtype == "float16"
    return model


def test_engine_last_logits(engine, golden):
    ids = np.array(golden["last_logits"]["prompt_ids"], dtype=np.int64)
    logits = np.asarray(engine.forward(ids, start_pos=0))
    assert logits.dtype == np.float32
    check_last_logits_cpu(logits, golden)


@pytest.mark.parametrize("case_index", range(4))
def test_engine_every_position_matches_float64(engine, numpy_model64, golden, case_index):
    """Prefill of the prompt, then one decode step per golden token: every vocab entry of every
    step against the float64 forward pass of the whole sequence."""
    err = case_error(engine, numpy_model64, golden["cases"][case_index])
    assert err <= ENGINE_F64_ATOL, f"max error {err:.3g} > {ENGINE_F64_ATOL:g}"


def case_error(model, numpy_model64, case):
    """Max |logit error| of a golden case against the float64 forward pass: the prompt's
    prefill, then one decode step per generated token."""
    ids = list(case["prompt_ids"]) + list(case["generated_ids"])
    ref = numpy_model64.logits(ids)
    n = len(case["prompt_ids"])
    got = [np.array(model.forward(np.array(ids[:n], np.int64), 0))]
    for pos in range(n, len(ids)):
        got.append(np.array(model.forward(np.array(ids[pos:pos + 1], np.int64), pos)))
    return np.abs(np.array(got, np.float64) - ref[n - 1:]).max()


def test_engine_full_context_matches_float64(engine, numpy_model64, golden, config):
    """The demo's whole context (256 positions): chunked prefill across 64 and 128 keys
    (70 + 60 + 5 + 4 + 3 tokens), then decode steps up to position 255."""
    text = [t for c in golden["cases"] for t in c["prompt_ids"] + c["generated_ids"]]
    n = config["max_position_embeddings"]
    ids = np.array((text * (n // len(text) + 1))[:n], np.int64)
    ref = numpy_model64.logits(ids)
    pos, worst = 0, 0.0
    for size in [70, 60, 5, 4, 3] + [1] * (n - 142):
        got = engine.forward(ids[pos:pos + size], pos)
        pos += size
        worst = max(worst, float(np.abs(got - ref[pos - 1]).max()))
    assert pos == n
    assert worst <= ENGINE_F64_ATOL, f"max error {worst:.3g} > {ENGINE_F64_ATOL:g}"


@pytest.mark.parametrize("case_index", range(4))
def test_engine_greedy(engine, golden, case_index):
    if case_index >= len(golden["cases"]):
        pytest.fail("golden file has fewer cases than this test expects")
    case = golden["cases"][case_index]
    prompt = np.array(case["prompt_ids"], dtype=np.int64)
    logits = np.asarray(engine.forward(prompt, start_pos=0))
    pos = len(prompt)
    out = []
    for _ in range(golden["max_new_tokens"]):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = np.asarray(engine.forward(np.array([tok], dtype=np.int64), start_pos=pos))
        pos += 1
    assert out == case["generated_ids"], case["prompt"]


def test_default_engine_with_float16_kv_cache(engine_auto, numpy_model64, golden):
    """The default load (keys and values rounded to float16, 2^-11 relative): every position of
    every golden case within 1e-2 of the float64 forward pass (measured 1.5-2.4e-3), and the
    golden last logits' top ten in order."""
    ids = np.array(golden["last_logits"]["prompt_ids"], dtype=np.int64)
    check_last_logits(np.asarray(engine_auto.forward(ids, start_pos=0)), golden)
    for case in golden["cases"]:
        err = case_error(engine_auto, numpy_model64, case)
        assert ENGINE_F64_ATOL < err <= 1e-2, err
