"""Write GGUF files from Hugging Face model folders the way llama.cpp's convert_hf_to_gguf.py
does, for tests and benchmarks: its metadata keys, its tensor names (the gguf package's map),
Q and K rows of the `llama` architecture permuted for interleaved rope, Llama 3 rope scaling
as a rope_freqs tensor, the tokenizer as `tokenizer.ggml.*` metadata.

    stored = write_gguf(folder, "m.gguf", "Q8_0")     # matrices Q8_0, norms and biases F32
    write_gguf(folder, "m.gguf", "F16", types={"lm_head.weight": "Q4_0"},
               raw={"model.layers.0.mlp.up_proj.weight": (q4_k_bytes, "Q4_K")})

`stored` maps each Hugging Face tensor name to the float32 values the file holds (dequantized,
in Hugging Face row order): write them with tiny_model.write_safetensors for a reference folder.
"""
import json
import os

import gguf
import numpy as np

from numba_attn.config import LlamaConfig
from numba_attn.loaders.hf import Checkpoint
from numba_attn.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
         "Qwen2ForCausalLM": "qwen2"}


def permute(w, n_head):
    """convert_hf_to_gguf's LlamaModel.permute: each head's rows (i, i + d/2) made adjacent."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def qtype(name):
    return getattr(gguf.GGMLQuantizationType, name)


def write_gguf(folder, path, file_type="F32", *, types=None, raw=None, arch=None,
               permute_qk=True, vocab="auto", chat_template=None, add_bos=None,
               metadata=None, skip=()):
    """Write the folder's model to path. file_type: the 2-D weights' GGML type (F32, F16, BF16,
    Q8_0, Q4_0, ...); types: {HF name: type} exceptions; raw: {HF name: (encoded bytes, type)}
    used as they are (in the file's row order); arch: general.architecture (default from
    config.json); permute_qk: the converter's Q/K row permutation (llama only); vocab: "auto"
    (the folder's tokenizer.json as a gpt2 vocabulary, add-BOS by the folder's rule), None (no
    tokenizer), or a dict of tokenizer.ggml.* values {"model", "tokens", "scores", "types",
    "merges", "pre", ...};
    metadata: extra {key: value} (str, int, float, bool); skip: HF names left out.
    Returns {HF name: float32 values stored, HF row order}."""
    c = LlamaConfig.from_pretrained(folder)
    arch = arch or ARCHS[c.architecture]
    types, raw = dict(types or {}), dict(raw or {})
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.n_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    scaling = dict(c.rope_scaling or {})
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    for key, value in (metadata or {}).items():
        add = {str: w.add_string, bool: w.add_bool, int: w.add_uint32,
               float: w.add_float32}[type(value)]
        add(key, value)
    if vocab == "auto":
        vocab = vocab_from_tokenizer_json(os.path.join(folder, "tokenizer.json"))
        if add_bos is None:       # the converter writes tokenizer_config.json's rule
            add_bos = Tokenizer(folder, c.bos_token_id).add_bos
    if vocab is not None:
        vocab = {"bos": c.bos_token_id, "eos": c.eos_token_ids[0] if c.eos_token_ids else None,
                 **vocab}
        _write_vocab(w, vocab, chat_template, add_bos)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[c.architecture].upper()],
                                     c.n_layers)
    stored = {}
    with Checkpoint(folder) as ck:
        if scaling.get("rope_type") == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_freq_factors(c))
        for name in ck.files:
            if name in skip:
                continue
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            shape = ck.info(name)[1]
            t = ck.read(name, np.empty(shape, np.float32))
            heads = None
            if permute_qk and arch == "llama":
                heads = {"q_proj": c.n_heads, "k_proj": c.n_kv_heads}.get(name.split(".")[-2])
            if heads:
                t = permute(t, heads)
            if name in raw:
                data, kind = raw[name]
                w.add_tensor(gname, data, raw_dtype=qtype(kind))
                values = gguf.quants.dequantize(data, qtype(kind))
            else:
                kind = types.get(name, file_type if t.ndim == 2 else "F32")
                data, values = encode(t, kind)
                w.add_tensor(gname, data, raw_dtype=None if kind in ("F32", "F16")
                             else qtype(kind))
            values = np.asarray(values, np.float32).reshape(shape)
            stored[name] = unpermute(values, heads) if heads else values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def encode(t, kind):
    """(the tensor's bytes or array as the writer takes them, the float32 values it holds)."""
    if kind == "F32":
        return t.astype(np.float32), t
    if kind == "F16":
        a = t.astype(np.float16)
        return a, a.astype(np.float32)
    data = gguf.quants.quantize(t, qtype(kind))
    return data, gguf.quants.dequantize(data, qtype(kind))


def llama3_freq_factors(c):
    """The rope_freqs tensor convert_hf_to_gguf writes for Llama 3 rope scaling: the divisor
    of each frequency (1 for short wavelengths, factor for long ones, a blend between)."""
    s = dict(c.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    freqs = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def vocab_from_tokenizer_json(path):
    """A byte-level BPE tokenizer.json as gpt2 vocabulary metadata: tokens by id, merges,
    token types (special added tokens control, other added tokens user-defined)."""
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj["model"]
    assert model["type"] == "BPE" and not model.get("byte_fallback"), "not byte-level BPE"
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a["special"] else USER_DEFINED
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pre = tj.get("pre_tokenizer") or {}
    return {"model": "gpt2", "tokens": tokens, "merges": merges,
            "types": [types.get(i, NORMAL if i in by_id else UNUSED) for i in range(n)],
            "pre": "gpt-2" if pre.get("type") == "ByteLevel" else None}


def write_vocab_gguf(path, vocab, *, chat_template=None, add_bos=None):
    """A GGUF file holding only a vocabulary (tokenizer.ggml.* metadata, bos/eos from
    vocab["bos"], vocab["eos"]), for tokenizer tests."""
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    _write_vocab(w, vocab, chat_template, add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_vocab(w, vocab, chat_template, add_bos):
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    bos, eos = vocab.get("bos"), vocab.get("eos")
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if "unk" in vocab:
        w.add_unk_token_id(vocab["unk"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if vocab.get("add_eos") is not None:
        w.add_add_eos_token(vocab["add_eos"])
    if vocab.get("add_space_prefix") is not None:
        w.add_add_space_prefix(vocab["add_space_prefix"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
