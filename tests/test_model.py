"""The model against an independent float64 NumPy forward pass, on tiny random checkpoints
written as Hugging Face folders (tiny_model.py) and loaded through the public path."""
import json
import math
import os

import numpy as np
import pytest

from numba_attn.backend import cuda_unavailable
from numba_attn.generation import GenerationStats, generate
from numba_attn.model import Model
from numba_attn.sampling import SamplingParams
from numba_attn.weights import CheckpointError
from tiny_model import LLAMA3_SCALING, build_tiny_model, write_safetensors

# -- the reference: float64, written from the Hugging Face modeling code's definitions --


def ref_inv_freq(head_dim, theta, scaling):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    assert kind == "llama3"
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def ref_forward(cfg, w, tokens, kv_dtype=None):
    """float64 logits (seq, vocab) of a full recompute. cfg: the config.json dict. kv_dtype: the
    keys and values rounded to it (through float32, as the model's are) before attention."""
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
    W = {k: v.astype(np.float64) for k, v in w.items()}
    n = len(tokens)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rotate(x, pos):  # x (n, heads, d): rotate_half form of the HF code
        ang = np.outer(pos, ref_inv_freq(d, theta, scaling))      # (n, d/2)
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + rot * sin

    def proj(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["model.embed_tokens.weight"][tokens]
    pos = np.arange(n)
    causal = np.tril(np.ones((n, n), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = rotate(proj(h, p + "self_attn.q_proj").reshape(n, H, d), pos)
        k = rotate(proj(h, p + "self_attn.k_proj").reshape(n, Hkv, d), pos)
        v = proj(h, p + "self_attn.v_proj").reshape(n, Hkv, d)
        if kv_dtype is not None:
            k, v = (a.astype(np.float32).astype(kv_dtype).astype(np.float64) for a in (k, v))
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = np.where(causal, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(n, H * d)
        x = x + proj(o, p + "self_attn.o_proj")
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g, u = proj(h, p + "mlp.gate_proj"), proj(h, p + "mlp.up_proj")
        x = x + proj(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj")
    x = rms(x, W["model.norm.weight"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


# Max |engine - reference| over the vocab, relative to max |reference|: measured (2 cores,
# AVX-512, OpenBLAS) at most 3.9e-7 against the float64 reference over every variant below and
# every long schedule (LONG_SCHEDULES, head sizes 16 and 32), and 5.0e-7 between two engine
# paths (decode on the cache vs a full recompute). float32 epsilon is 1.2e-7; 2.5e-6 is ~5x the
# worst measured error, so a real slip (a dropped bias, a wrong key block) cannot hide in it.
REL_TOL = 2.5e-6


def assert_close(got, ref, rel=REL_TOL):
    ref = np.asarray(ref, np.float64)
    err = np.abs(np.asarray(got, np.float64) - ref).max()
    assert err <= rel * np.abs(ref).max(), (f"max error {err:.3g} vs scale "
                                            f"{np.abs(ref).max():.3g} (rel {rel:g})")


def load(folder):
    """The model in float32 whatever the checkpoint's type (other weight formats are
    tests/test_weight_formats.py's), and its config.json."""
    with open(os.path.join(folder, "config.json")) as f:
        return Model.from_pretrained(folder, weight_dtype="float32"), json.load(f)


PROMPT = np.array([0, 17, 5, 220, 31, 99, 140, 7, 64, 250, 3, 12, 180], np.int64)

VARIANTS = {
    "llama": {},
    "llama3-rope-scaling": dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
    "llama3-rope-parameters": dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}),
    "linear-rope-scaling": dict(rope_scaling={"type": "linear", "factor": 4.0}),
    "tied-embeddings": dict(tie=True),
    "qwen2-biases": dict(arch="Qwen2ForCausalLM", tie=True, rope_theta=1000000.0),
    "mistral": dict(arch="MistralForCausalLM", config_overrides={"sliding_window": 4096}),
    "mha": dict(heads=4, kv_heads=4),
    "mqa-head-dim": dict(heads=4, kv_heads=1, head_dim=24),  # q_dim 96 != hidden 64
    "float16": dict(dtype="float16"),
    "bfloat16": dict(dtype="bfloat16"),
    "sharded-bf16": dict(dtype="bfloat16", shards=3, arch="Qwen2ForCausalLM"),
    # Llama's attention_bias: q, k, v and o_proj biases (the o bias added after attention)
    "llama-attention-bias": dict(attention_bias=True),
    "llama-attention-bias-head-dim-32": dict(attention_bias=True, head_dim=32),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_float64_reference(make_folder, variant):
    folder, w = make_folder(variant, **VARIANTS[variant])
    model, cfg = load(folder)
    # long enough that llama3 scaling's low-frequency bands matter (original context 32)
    tokens = np.concatenate([PROMPT] * 5)[:60]
    ref = ref_forward(cfg, w, tokens)
    assert_close(model.forward(tokens, 0), ref[-1])
    # then decode: each step against the KV cache matches the reference at that position
    for t in (42, 7, 199):
        tokens = np.append(tokens, t)
        assert_close(model.forward([t], len(tokens) - 1), ref_forward(cfg, w, tokens)[-1])


def test_attention_bias_loads_every_bias_and_the_o_bias_matters(make_folder):
    """attention_bias: true gives q/k/v and o_proj biases; the o bias moves the logits by far
    more than the tolerance, so a forward pass that drops it fails the reference test."""
    folder, w = make_folder("bias", attention_bias=True)
    model, cfg = load(folder)
    assert model.config.qkv_bias and model.config.o_bias
    for lw in model.weights.layers:
        assert lw.qkv_bias is not None and lw.o_bias is not None
    np.testing.assert_array_equal(model.weights.layers[1].o_bias,
                                  w["model.layers.1.self_attn.o_proj.bias"])
    no_o = {k: (np.zeros_like(a) if k.endswith("o_proj.bias") else a) for k, a in w.items()}
    ref, ref_no_o = ref_forward(cfg, w, PROMPT)[-1], ref_forward(cfg, no_o, PROMPT)[-1]
    assert np.abs(ref - ref_no_o).max() > 1000 * REL_TOL * np.abs(ref).max()
    got = model.forward(PROMPT, 0)
    assert_close(got, ref)
    assert_close(model.forward([5], len(PROMPT)),
                 ref_forward(cfg, w, np.append(PROMPT, 5))[-1])


# Prefill then decode across attention's block boundaries: 64 keys (BLOCK_K, the online
# softmax's key block; 64 query positions per tile), 256 keys (the decode schedule's shortest
# key range, MIN_SPLIT_KEYS) and 512 (two decode ranges). Each entry: the token counts of the
# successive forward calls (1 = a decode step; 2-4 = the decode schedule with several queries;
# more = the prefill schedule over a filled cache).
LONG_SCHEDULES = {
    "prefill-70-then-decode": [70] + [1] * 6,
    "prefill-60-decode-across-64": [60] + [1] * 8,
    "chunks-across-64": [50, 30, 5, 4, 3, 1, 1],
    "prefill-300-then-decode": [300] + [1] * 6,
    "prefill-250-decode-across-256": [250] + [1] * 10,
    "chunks-across-256": [200, 100, 7, 2, 1, 1],
    "prefill-508-decode-across-512": [508] + [1] * 8,
}


@pytest.fixture(scope="module")
def long_models(tmp_path_factory):
    """head size 16 (the BLAS tile) and 32 (the micro-kernel), GQA 4/2, context 1024."""
    out = {}
    for head_dim in (16, 32):
        folder, w = build_tiny_model(str(tmp_path_factory.mktemp("long") / f"hd{head_dim}"),
                                     head_dim=head_dim, max_pos=1024, tokenizer=False)
        out[head_dim] = (*load(folder), w)
    return out


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("schedule", list(LONG_SCHEDULES))
def test_long_context_matches_float64_reference(long_models, head_dim, schedule):
    model, cfg, w = long_models[head_dim]
    chunks = LONG_SCHEDULES[schedule]
    tokens = np.random.default_rng(len(schedule)).integers(0, cfg["vocab_size"], sum(chunks))
    ref = ref_forward(cfg, w, tokens)               # (n, vocab): every position at once
    pos = 0
    for n in chunks:
        got = model.forward(tokens[pos:pos + n], pos)
        pos += n
        assert_close(got, ref[pos - 1])
    assert model.position == len(tokens)


def test_rope_scaling_changes_the_result(make_folder):
    """The llama3 variant is not silently computed without scaling."""
    f1, w = make_folder("plain", rope_theta=500000.0)
    f2, _ = make_folder("scaled", rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    tokens = np.concatenate([PROMPT] * 5)[:60]
    a = Model.from_pretrained(f1).forward(tokens, 0).copy()
    b = Model.from_pretrained(f2).forward(tokens, 0).copy()
    assert np.abs(a - b).max() > 1e-3


def test_decode_with_cache_equals_full_recompute(tiny_model):
    model = tiny_model
    fresh = Model(model.config, model.weights)      # same weights, its own KV cache
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model.config.vocab_size, 40)
    model.forward(tokens[:9], 0)
    for n in range(10, 41):
        cached = model.forward(tokens[n - 1:n], n - 1)       # one step on the growing cache
        full = fresh.forward(tokens[:n], 0)                   # everything from scratch
        assert_close(cached, full)


def test_prefill_in_chunks_equals_one_pass(tiny_model):
    """Prefill over an already filled cache (q_len < kv_len, bottom-right causal)."""
    model = tiny_model
    tokens = np.concatenate([PROMPT, PROMPT[::-1]])
    whole = model.forward(tokens, 0).copy()
    model.forward(tokens[:5], 0)
    model.forward(tokens[5:17], 5)
    assert_close(model.forward(tokens[17:], 17), whole)


def test_forward_returns_float32_vocab_logits(tiny_model):
    logits = tiny_model.forward(PROMPT, 0)
    assert logits.dtype == np.float32 and logits.shape == (tiny_model.config.vocab_size,)
    assert tiny_model.position == len(PROMPT)


def test_buffers_are_reused(tiny_model):
    model = tiny_model
    model.forward(PROMPT, 0)
    buffers = model.buffers
    for start in range(3):
        model.forward(PROMPT[:8], 0)
        model.forward([5], 8)
    assert model.buffers is buffers            # no reallocation for shorter prompts / decode


def test_greedy_generation_is_reproducible_and_matches_reference(make_folder):
    folder, w = make_folder("greedy", eos=None)
    model, cfg = load(folder)
    greedy = SamplingParams(temperature=0.0)
    a = list(generate(model, PROMPT, max_tokens=12, sampling=greedy))
    b = list(generate(model, PROMPT, max_tokens=12, sampling=greedy))
    assert a == b and len(a) == 12
    tokens = list(PROMPT)                      # golden: argmax of the float64 reference
    for _ in range(12):
        tokens.append(int(np.argmax(ref_forward(cfg, w, np.array(tokens))[-1])))
    assert a == tokens[len(PROMPT):]


def test_seeded_sampling_is_reproducible(tiny_model):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    run = lambda p: list(generate(tiny_model, PROMPT, max_tokens=20, sampling=p,  # noqa: E731
                                  eos_token_ids=()))
    assert run(params) == run(params)
    other = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=124)
    assert run(params) != run(other)


def test_generate_stops_at_any_eos_and_counts(tiny_model):
    greedy = SamplingParams(temperature=0.0)
    free = list(generate(tiny_model, PROMPT, max_tokens=10, sampling=greedy, eos_token_ids=()))
    stats = GenerationStats()
    out = list(generate(tiny_model, PROMPT, max_tokens=10, sampling=greedy,
                        eos_token_ids=[9999, free[3]], stats=stats))
    assert out == free[:free.index(free[3])]   # stops before yielding the EOS token
    assert stats.stop_reason == "eos"
    stats = GenerationStats()
    assert len(list(generate(tiny_model, PROMPT, max_tokens=10, sampling=greedy,
                             eos_token_ids=(), stats=stats))) == 10
    assert stats.stop_reason == "max_tokens" and stats.generated_tokens == 10
    assert stats.decode_steps == 9 and stats.prompt_tokens == len(PROMPT)
    assert 0 < stats.prefill_s <= stats.first_token_s and stats.decode_s > 0


def test_generate_to_the_context_limit(make_folder):
    folder, _ = make_folder("ctx", max_pos=24, eos=None)
    model = Model.from_pretrained(folder)
    stats = GenerationStats()
    out = list(generate(model, PROMPT, max_tokens=None, stats=stats))
    assert len(out) == 24 - len(PROMPT)
    assert stats.stop_reason == "context" and "context of 24 tokens is full" in stats.message
    with pytest.raises(ValueError, match="leaves room for .* in the model's context of 24"):
        list(generate(model, PROMPT, max_tokens=24 - len(PROMPT) + 1))


def test_tied_embeddings_share_memory(make_folder):
    folder, _ = make_folder("tied", tie=True)
    model = Model.from_pretrained(folder)
    assert model.weights.lm_head is model.weights.embed_tokens


def test_weights_nbytes_is_one_copy(tiny_model):
    c = tiny_model.config
    per_layer = (2 * c.hidden_size + c.qkv_dim * c.hidden_size + c.hidden_size * c.q_dim
                 + 3 * c.hidden_size * c.intermediate_size)
    expect = 4 * (2 * c.vocab_size * c.hidden_size + c.hidden_size + c.n_layers * per_layer)
    assert tiny_model.weights.nbytes == expect


def test_max_seq(make_folder):
    folder, _ = make_folder("maxseq")
    assert Model.from_pretrained(folder, max_seq=32).max_seq == 32
    with pytest.raises(ValueError, match="context"):
        Model.from_pretrained(folder, max_seq=129)


# -- bad input --

@pytest.mark.parametrize("tokens, start, match", [
    ([], 0, "non-empty"),
    ([[1, 2]], 0, "1-D"),
    ([1.5], 0, "integers"),
    ([300], 0, r"\[0, 300\)"),
    ([-1], 0, r"\[0, 300\)"),
    ([1], 5, "start_pos must be 0"),
])
def test_forward_rejects_bad_input(tiny_model, tokens, start, match):
    tiny_model.forward([1, 2], 0)
    with pytest.raises(ValueError, match=match):
        tiny_model.forward(np.array(tokens), start)


def test_forward_rejects_context_overflow(tiny_model):
    tiny_model.forward([1] * 100, 0)
    with pytest.raises(ValueError, match="context full"):
        tiny_model.forward([1] * 29, 100)


@pytest.mark.skipif(cuda_unavailable() is None, reason="a GPU is present (tests/cuda runs it)")
def test_device_cuda_without_gpu(tiny_folder):
    with pytest.raises(ValueError, match=r"^CUDA requested but no GPU is available"):
        Model.from_pretrained(tiny_folder, device="cuda")


def test_bad_device_and_weight_dtype(tiny_folder):
    with pytest.raises(ValueError, match="device must be"):
        Model.from_pretrained(tiny_folder, device="tpu")
    with pytest.raises(ValueError, match=r"weight_dtype must be auto or one of float32, "
                                         r"bfloat16, float16, q8_0 on cpu, got 'int8'"):
        Model.from_pretrained(tiny_folder, weight_dtype="int8")


def _damage(folder, how):
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    if how == "truncated":
        open(path, "wb").write(data[:-1000])
    elif how == "corrupt-header":
        open(path, "wb").write(b"\xff" * 8 + data[8:])
    elif how == "empty":
        open(path, "wb").write(b"")
    elif how == "missing":
        os.remove(path)


@pytest.mark.parametrize("how, match", [
    ("truncated", "corrupt or truncated"),
    ("corrupt-header", "corrupt or truncated"),
    ("empty", "corrupt or truncated"),
    ("missing", "no model.safetensors"),
])
def test_damaged_checkpoint_is_refused(make_folder, how, match):
    folder, _ = make_folder(how)
    _damage(folder, how)
    with pytest.raises(CheckpointError, match=match):
        Model.from_pretrained(folder)


def test_missing_shard_and_missing_tensor(make_folder):
    folder, w = make_folder("shards", shards=2)
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors"):
        Model.from_pretrained(folder)
    folder, w = make_folder("notensor")
    del w["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(folder, w)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight.*missing"):
        Model.from_pretrained(folder)


def test_shape_mismatch_and_unsupported_dtype(make_folder):
    folder, w = make_folder("shape")
    w["model.norm.weight"] = np.ones(65, np.float32)
    write_safetensors(folder, w)
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*shape \(65,\).*\(64,\)"):
        Model.from_pretrained(folder)
    folder, w = make_folder("int8")
    from safetensors.numpy import save_file
    w["model.norm.weight"] = np.ones(64, np.int8)
    save_file(w, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="I8; supported: F32, F16, BF16"):
        Model.from_pretrained(folder)


def test_untied_model_without_lm_head(make_folder):
    folder, w = make_folder("nohead")
    del w["lm_head.weight"]
    write_safetensors(folder, w)
    with pytest.raises(CheckpointError, match="lm_head.weight is missing"):
        Model.from_pretrained(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        Model.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Model.from_pretrained(tmp_path)


def test_build_reuses_weights_for_other_tests(tmp_path):
    """tiny_model.build_tiny_model is importable and deterministic per seed."""
    _, a = build_tiny_model(str(tmp_path / "a"), tokenizer=False)
    _, b = build_tiny_model(str(tmp_path / "b"), tokenizer=False)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("heads,head_dim,pool", [(16, 64, True), (4, 16, False)],
                         ids=["1024-features", "64-features"])
def test_warmup_runs_the_pools_attention_schedules_of_a_real_sized_model(make_folder,
                                                                         monkeypatch, heads,
                                                                         head_dim, pool):
    """A model of 1024 query features or more reaches the thread pool's attention schedules
    with a prompt of a dozen tokens and a few hundred keys: warm-up runs them (prefill of 16
    tokens, a decode step at 256 keys here), leaving the cache empty; a smaller model's
    warm-up does not."""
    from numba_attn.kernels import attention_cpu
    folder, _ = make_folder(hidden=heads * head_dim, heads=heads, kv_heads=4,
                            head_dim=head_dim, layers=1, max_pos=512)
    m = Model.from_pretrained(folder)
    seen = []
    for name in ("_attention_prefill_mk", "_attention_decode_mk"):
        f = getattr(attention_cpu, name)
        monkeypatch.setattr(attention_cpu, name,
                            lambda *a, f=f, name=name: (seen.append(
                                (name, a[2].shape[1], a[3].shape[1])), f(*a))[1])  # q, k
    m.warmup()
    assert m.cache.length == 0
    if pool:     # 16 x 16 x 1024 and 1 x 256 x 1024 multiply-adds: the pool's threshold
        # the decode step compiled whole: its threaded attention bound (compiled) at 256 keys
        assert seen == [("_attention_prefill_mk", 16, 16)]
        assert m.decoder.why_not is None and m.decoder.parallel
        m.decoder = None                            # the steps: the schedule itself runs
        seen.clear()
        m.warmup()
        assert m.cache.length == 0
        assert sorted(seen) == [("_attention_decode_mk", 1, 256),
                                ("_attention_prefill_mk", 16, 16)]
    else:
        assert not seen
