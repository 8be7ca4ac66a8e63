"""Build tiny random Llama-family models as Hugging Face folders, for tests and benchmarks.

    folder, weights = build_tiny_model(tmp_path / "tiny")              # Llama, float32
    build_tiny_model(path, arch="Qwen2ForCausalLM", dtype="bfloat16", shards=2)

The folder holds config.json, generation_config.json, model.safetensors (or shards with
model.safetensors.index.json) and a byte-level BPE tokenizer.json trained with the `tokenizers`
library. `weights` maps each tensor name to the float32 values actually stored (after rounding
to float16 / bfloat16), for reference implementations.
"""
import json
import os

import numpy as np
from safetensors import TensorSpec, serialize_file

BOS, EOS = 0, 1
CORPUS = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps.",
    "Numba compiles Python functions to fast machine code.",
    "héllo wörld, ça va? 日本語のテキスト。 Ünïcödé ✓",
]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def build_tokenizer(vocab_size=300):
    """A byte-level BPE tokenizer with <s> = 0 and </s> = 1: any text encodes (bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def build_tiny_model(folder, *, arch="LlamaForCausalLM", hidden=64, layers=2, heads=4,
                     kv_heads=2, head_dim=None, intermediate=96, vocab=None, max_pos=128,
                     rope_theta=10000.0, rope_scaling=None, rope_parameters=None,
                     tie=False, dtype="float32", shards=1, seed=0, scale=1.0,
                     eos=EOS, config_overrides=None, tokenizer=True, attention_bias=False):
    """Write the folder and return (folder, {name: float32 array as stored}). eos: the
    end-of-sequence id(s) written to generation_config.json (None: generation never stops
    early, which makes lengths predictable). attention_bias: Llama's option, biases on q, k, v
    and o_proj (config.json "attention_bias": true); Qwen2 has q, k, v biases regardless."""
    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer() if tokenizer else None
    if vocab is None:
        vocab = tok.get_vocab_size() if tok else 300
    hd = head_dim or hidden // heads
    qkv_bias = arch == "Qwen2ForCausalLM" or attention_bias
    rng = np.random.default_rng(seed)

    def lin(n_out, n_in):  # activations stay O(1) through the layers
        return (rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)).astype(np.float32)

    def norm_w(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_w(hidden)
        w[p + "self_attn.q_proj.weight"] = lin(heads * hd, hidden)
        w[p + "self_attn.k_proj.weight"] = lin(kv_heads * hd, hidden)
        w[p + "self_attn.v_proj.weight"] = lin(kv_heads * hd, hidden)
        if qkv_bias:
            for n, size in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                w[p + f"self_attn.{n}_proj.bias"] = (
                    0.5 * rng.standard_normal(size)).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = lin(hidden, heads * hd)
        if attention_bias:      # as large as the residual stream: dropping it shows
            w[p + "self_attn.o_proj.bias"] = (0.5 * rng.standard_normal(hidden)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = norm_w(hidden)
        w[p + "mlp.gate_proj.weight"] = lin(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = lin(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = lin(hidden, intermediate)
    w["model.norm.weight"] = norm_w(hidden)
    if not tie:
        w["lm_head.weight"] = lin(vocab, hidden)

    stored = write_safetensors(folder, w, dtype=dtype, shards=shards)

    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2"}.get(arch, "unknown")
    config = {
        "architectures": [arch], "model_type": model_type, "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie, "bos_token_id": BOS, "eos_token_id": eos,
        "torch_dtype": dtype,
    }
    if head_dim:
        config["head_dim"] = head_dim
    if attention_bias:
        config["attention_bias"] = True
    if rope_parameters is not None:
        config["rope_parameters"] = rope_parameters
    else:
        config["rope_theta"] = rope_theta
        config["rope_scaling"] = rope_scaling
    config.update(config_overrides or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS, "eos_token_id": eos}, f)
    if tok is not None:
        tok.save(os.path.join(folder, "tokenizer.json"))
    return folder, stored


def write_safetensors(folder, weights, *, dtype="float32", shards=1):
    """Write float32 `weights` as dtype (float32 / float16 / bfloat16), in one file or in
    `shards` files with an index. Returns {name: float32 values as stored}."""
    encoded, stored = {}, {}
    for name, a in weights.items():
        if dtype == "bfloat16":
            bits = _to_bf16_bits(a)
            encoded[name] = ("bfloat16", bits)
            stored[name] = (bits.astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("float16", "float32"):
            x = a.astype(dtype)
            encoded[name] = (dtype, x)
            stored[name] = x.astype(np.float32)
        else:
            raise ValueError(f"dtype {dtype!r}")
    names = list(encoded)
    if shards == 1:
        _serialize(encoded, os.path.join(folder, "model.safetensors"))
        return stored
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: encoded[n] for n in names[s::shards]}
        _serialize(part, os.path.join(folder, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
    return stored


def _to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _serialize(tensors, path):
    arrays = {n: np.ascontiguousarray(a) for n, (_, a) in tensors.items()}  # keep alive
    specs = {n: TensorSpec(dtype=tensors[n][0], shape=list(a.shape), data_ptr=a.ctypes.data,
                           data_len=a.nbytes) for n, a in arrays.items()}
    serialize_file(specs, path)
