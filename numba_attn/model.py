"""Model: a Llama-family decoder (Llama, Mistral, Qwen2) built from the library's kernels.

    weights = ModelWeights.load(config, source)     # fused QKV, read layer by layer
    model = Model(config, weights)                  # + KV cache, RoPE table, activation buffers
    logits = model.forward(prompt_ids, 0)           # prefill: the whole prompt in one pass
    logits = model.forward([next_id], len(prompt))  # decode: one token against the KV cache

Every kernel call writes into a buffer allocated once (`out=`); the forward pass itself only
slices those buffers. Weight and buffer names follow the Hugging Face checkpoint; the weights
come from any tensor source (loaders: a Hugging Face folder or a GGUF file), by those names.

The same forward pass runs on both devices: every step is a public function of ops.py, which
picks the CPU or CUDA kernel from its arguments. With device="cuda" the weights are copied to
the GPU once as they are read, each matrix in its weight format (converted on the host first:
rounded to 16 bits, or quantized to Q8_0, one tensor at a time), the KV cache and the
activation buffers live there, each forward call copies its token ids to the device, and only
the final logits (vocab,) come back to the host for sampling.
"""
import math
import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from .backend import (copy_from_host, copy_to_host, cuda_unavailable, empty, is_cuda_array,
                      reshape, rows)
from .config import LlamaConfig
from .formats import FORMATS, KV_DTYPES, Q8_BLOCK, Q8Matrix, quantize_q8_0, to_device, \
    weight_format
from .kvcache import KVCache, kv_dtype as kv_dtype_of
from .ops import (add_rmsnorm, apply_rope, attention, embedding, linear, rmsnorm, silu_mul,
                  split_qkv)
from .cpu_decode import CpuDecodeSteps, CpuDecoder
from .kernels import cpu_pool
from .cuda_decode import CudaDecoder
from .rope import RopeTable
from .weights import CheckpointError, HostArena, LoadNotice, aligned_empty, empty_weight, \
    row_block

DEFAULT_MAX_SEQ = 4096   # KV cache length when the caller gives none (and the model allows it)
DEVICES = ("cpu", "cuda")
# storage of the linear weights (projections, MLP, lm_head) and the embedding table: a row of
# the formats table; norms and biases stay float32. "auto" keeps the checkpoint's own type
# where the device runs it
WEIGHT_DTYPES = {device: tuple(name for name, f in FORMATS.items() if device in f.devices)
                 for device in DEVICES}
# the KV cache's "auto" storage on the CPU follows the weights (formats.KV_DTYPES has every
# device's): 16-bit weights keep 16-bit keys and values, float32 stays float32; q8_0 takes
# int8 where decode multiplies it in 8 bits (AVX-512 VNNI, Zen 5: TinyLlama at context 2000
# 3.1-6.5% below context 16 in seven runs, against 7.7-9.5% with bfloat16; AVX2 alone, Zen 3:
# 5.3% against 10.4-12.4%; decoded token by token on the demo model 1.2e-4 nats of KL from
# float32, 1.3e-4 on AVX2 (q in 7 bits), against 1.0e-4 with bfloat16), else bfloat16, which
# decode multiplies without widening on CPUs with AVX-512 BF16; on CUDA float32
_AUTO_KV = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
            "q8_0": "bfloat16"}


def _auto_kv(weight_dtype):
    if weight_dtype == "q8_0":
        from .kernels.attention_int8_cpu import decode_products   # imported for q8_0 only
        if decode_products():
            return "int8"
    return _AUTO_KV.get(weight_dtype, "float32")


def _rope_qk(q, k, table, start_pos, out):
    # q (seq, n_heads, d) and k (seq, n_kv_heads, d) rotated (style half) into out = (q, k)
    return (apply_rope(q, table, start_pos, style="half", out=out[0]),
            apply_rope(k, table, start_pos, style="half", out=out[1]))


# the steps of the forward pass: ops.py's public functions (checked, either device), and the
# KV cache's append
STEPS = SimpleNamespace(embedding=embedding, rmsnorm=rmsnorm, add_rmsnorm=add_rmsnorm,
                        linear=linear, split_qkv=split_qkv, rope_qk=_rope_qk,
                        attention=attention, silu_mul=silu_mul,
                        append_kv=lambda cache, layer, k, v: cache.append(layer, k, v))


@dataclass
class LayerWeights:       # host (NumPy) or device arrays, by the model's device; matrices in
                          # the model's weight format (an array or a formats.Q8Matrix)
    input_layernorm: np.ndarray           # (hidden,)
    qkv_proj: np.ndarray                  # (q_dim + 2 * kv_dim, hidden): q_proj, k_proj, v_proj
    qkv_bias: np.ndarray | None           # (q_dim + 2 * kv_dim,) Qwen2; None for Llama
    o_proj: np.ndarray                    # (hidden, q_dim)
    o_bias: np.ndarray | None             # (hidden,) only with Llama's attention_bias
    post_attention_layernorm: np.ndarray  # (hidden,)
    gate_proj: np.ndarray                 # (intermediate, hidden)
    up_proj: np.ndarray                   # (intermediate, hidden)
    down_proj: np.ndarray                 # (hidden, intermediate)


@dataclass
class ModelWeights:
    embed_tokens: np.ndarray              # (vocab, hidden)
    layers: list                          # n_layers x LayerWeights
    norm: np.ndarray                      # (hidden,)
    lm_head: np.ndarray                   # (vocab, hidden); embed_tokens itself when tied

    @classmethod
    def load(cls, config, source, *, device="cpu", weight_dtype="auto", progress=None):
        """Build the weights from a tensor source (loaders: a Hugging Face folder's Checkpoint
        or a GGUFFile; a path opens one), one tensor at a time, each read straight into its
        final place and format (bytes as they are when the source stores that format), so
        loading holds one copy of the model plus at most one tensor in flight. weight_dtype:
        the linear weights' format, or "auto" for the source's own (source.stored_format).
        device="cuda": each tensor is copied to the GPU as soon as it is read. progress(done,
        total, fmt) is called after each layer (and the embedding and head). A conversion the
        user should know of (quantized GGUF tensors dequantized) is a LoadNotice warning."""
        if isinstance(source, (str, os.PathLike)):
            from .loaders import open_model_source
            _, opened = open_model_source(source)
            with opened:
                return cls.load(config, opened, device=device, weight_dtype=weight_dtype,
                                progress=progress)
        c = config
        fmt = resolve_weight_dtype(device, weight_dtype, source)
        notice = source.notice(fmt)
        if notice:
            warnings.warn(notice, LoadNotice, stacklevel=2)
        quantized = weight_format(fmt).block_size > 1
        storage = weight_format(fmt).storage

        def place(a):
            return a if device == "cpu" else to_device(a)
        # the host's matrices end to end in huge pages; for the GPU one in flight at a time
        empty = HostArena().empty if device == "cpu" else aligned_empty

        def matrix(name, shape):
            if quantized and shape[1] % Q8_BLOCK:
                raise CheckpointError(f"tensor {name!r}: {fmt} needs in_features a multiple "
                                      f"of {Q8_BLOCK}, got shape {shape}")
            return empty_weight(shape, storage, quantized, empty)

        def read_matrix(name, shape):
            return place(source.read(name, matrix(name, shape)))

        def read(name, shape):                   # norms and biases: float32
            return place(source.read(name, np.empty(shape, np.float32)))

        # the embedding table is stored like a matrix (the embedding kernels take every
        # format)
        embed = read_matrix("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        steps = c.n_layers + 2

        def step(done):
            if progress is not None:
                progress(done, steps, fmt)
        step(1)
        layers = []
        for i in range(c.n_layers):
            p = f"model.layers.{i}."
            # fused QKV: q_proj, k_proj, v_proj stacked along the output dimension
            qkv = matrix(p + "self_attn.qkv_proj.weight", (c.qkv_dim, c.hidden_size))
            for name, part in zip("qkv", _split_rows(qkv, c)):
                source.read(p + f"self_attn.{name}_proj.weight", part)
            qkv_bias = None
            if c.qkv_bias:
                qkv_bias = np.empty(c.qkv_dim, np.float32)
                for name, part in zip("qkv", _split_rows(qkv_bias, c)):
                    source.read(p + f"self_attn.{name}_proj.bias", part)
                qkv_bias = place(qkv_bias)
            layers.append(LayerWeights(
                input_layernorm=read(p + "input_layernorm.weight", (c.hidden_size,)),
                qkv_proj=place(qkv),
                qkv_bias=qkv_bias,
                o_proj=read_matrix(p + "self_attn.o_proj.weight", (c.hidden_size, c.q_dim)),
                o_bias=read(p + "self_attn.o_proj.bias", (c.hidden_size,)) if c.o_bias
                else None,
                post_attention_layernorm=read(p + "post_attention_layernorm.weight",
                                              (c.hidden_size,)),
                gate_proj=read_matrix(p + "mlp.gate_proj.weight",
                                      (c.intermediate_size, c.hidden_size)),
                up_proj=read_matrix(p + "mlp.up_proj.weight",
                                    (c.intermediate_size, c.hidden_size)),
                down_proj=read_matrix(p + "mlp.down_proj.weight",
                                      (c.hidden_size, c.intermediate_size)),
            ))
            step(i + 2)
        norm = read("model.norm.weight", (c.hidden_size,))
        if c.tie_word_embeddings:
            lm_head = embed
        elif "lm_head.weight" in source:
            lm_head = read_matrix("lm_head.weight", (c.vocab_size, c.hidden_size))
        else:
            raise CheckpointError("lm_head.weight is missing and tie_word_embeddings is "
                                  "false in config.json")
        step(steps)
        return cls(embed_tokens=embed, layers=layers, norm=norm, lm_head=lm_head)

    def arrays(self):
        """Every distinct weight array (a tied lm_head once)."""
        arrays = [self.embed_tokens, self.norm]
        if self.lm_head is not self.embed_tokens:
            arrays.append(self.lm_head)
        for layer in self.layers:
            arrays += [a for a in vars(layer).values() if a is not None]
        return arrays

    @property
    def nbytes(self):
        return sum(int(a.nbytes) for a in self.arrays())

    @property
    def device(self):
        """'cpu' or 'cuda': where the arrays live."""
        return "cuda" if is_cuda_array(self.norm) else "cpu"

    @property
    def weight_dtype(self):
        """The linear weights' format: a name in formats.FORMATS ('float32', 'q8_0', ...)."""
        return weight_format(self.layers[0].qkv_proj if self.layers else self.lm_head).name

    @property
    def bytes_per_token(self):
        """Weight bytes a decode step reads: every matrix once, plus one embedding row."""
        matrices = [self.lm_head] + [getattr(lw, k) for lw in self.layers for k in MATRICES]
        return sum(int(m.nbytes) for m in matrices) + int(self.embed_tokens.nbytes) // \
            int(self.embed_tokens.shape[0])

    def to_device(self, weight_dtype=None):
        """A copy on the GPU of host weights, the matrices in weight_dtype (default: the host
        weights' own format; converted on the host one at a time where it differs), tied
        embeddings still tied."""
        if self.device != "cpu":
            raise ValueError("these weights are on the GPU already")
        put = _placer("cuda", resolve_weight_dtype("cuda", weight_dtype or self.weight_dtype))
        matrices = MATRICES
        tied = self.lm_head is self.embed_tokens
        embed = put("model.embed_tokens.weight", self.embed_tokens, True)
        layers = [LayerWeights(**{k: None if a is None else put(k, a, k in matrices)
                                  for k, a in vars(lw).items()}) for lw in self.layers]
        return type(self)(embed_tokens=embed, layers=layers, norm=put("norm", self.norm, False),
                          lm_head=embed if tied else put("lm_head", self.lm_head, True))


MATRICES = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # of LayerWeights


def resolve_weight_dtype(device, weight_dtype, source=None):
    """The format name a model on `device` stores its linear weights in: weight_dtype checked
    against the formats the device runs, or, for "auto", the tensor source's own format
    (source.stored_format; float32 without a source to look at, or where the device runs no
    such format)."""
    if weight_dtype == "auto":
        name = "float32" if source is None else source.stored_format
        return name if name in WEIGHT_DTYPES[device] else "float32"
    try:
        name = weight_format(weight_dtype).name if isinstance(weight_dtype, str) else \
            weight_format(np.dtype(weight_dtype)).name
    except (TypeError, ValueError):
        name = None
    if name not in WEIGHT_DTYPES[device]:
        runs = [d for d in DEVICES if name in WEIGHT_DTYPES[d]]
        raise ValueError(f"weight_dtype must be auto or one of {', '.join(WEIGHT_DTYPES[device])} "
                         f"on {device}, got {weight_dtype!r}"
                         + (f" ({name} weights need device={runs[0]!r})" if runs else ""))
    return name


def resolve_kv_dtype(device, kv_dtype, weight_dtype):
    """The name of the KV cache's storage on device: kv_dtype checked against KV_DTYPES[device],
    or for "auto", on the CPU the type matching the weights (_auto_kv), on CUDA float32."""
    if isinstance(kv_dtype, str) and kv_dtype == "auto":
        return _auto_kv(weight_dtype) if device == "cpu" else "float32"
    try:
        return kv_dtype_of(device, kv_dtype).name
    except (TypeError, ValueError):
        raise ValueError(f"kv_dtype must be auto or one of {', '.join(KV_DTYPES[device])} on "
                         f"{device}, got {kv_dtype!r}") from None


def _placer(device, fmt):
    """put(name, host weight, matrix) -> the weight the model keeps: a matrix in format fmt
    (as it is when it is in fmt already; else converted on the host: quantized for q8_0,
    rounded to 16 bits), the rest float32 as it is; on CUDA then copied to the GPU
    (formats.to_device: bfloat16 as its bits, a Q8Matrix's codes and scales)."""
    def put(name, a, matrix):
        if matrix:
            a = _in_format(name, a, fmt)
        return a if device == "cpu" else to_device(a)
    return put


def _in_format(name, a, fmt):
    """The host matrix a (an array of any float format, or a Q8Matrix) in format fmt."""
    if isinstance(a, Q8Matrix):
        if fmt == "q8_0":
            return a
        a = a.dequantize()
    if fmt == "q8_0":
        try:
            return quantize_q8_0(a)
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r}: {e}") from None
    storage = FORMATS[fmt].storage
    if a.dtype == storage:
        return a
    out = a.astype(storage)
    if not np.isfinite(out).all() and np.isfinite(a).all():
        raise CheckpointError(f"tensor {name!r} has values beyond {fmt}'s range; "
                              f"use weight_dtype='float32'")
    return out


def _split_rows(fused, c):
    """Views of the q, k, v row blocks of a fused (qkv_dim, ...) array or Q8Matrix."""
    return (row_block(fused, 0, c.q_dim), row_block(fused, c.q_dim, c.q_dim + c.kv_dim),
            row_block(fused, c.q_dim + c.kv_dim, c.qkv_dim))


def _staggered_empty(shape, k):
    """A float32 host array whose address is 1088 * k bytes past a 4 KB boundary (mod 4 KB).
    Large NumPy arrays all start at the same offset in a page; a kernel reading one such buffer
    while writing another then sees false store-to-load conflicts (4K aliasing): silu_mul in
    place over the model's gate and up ran 2.2x slower. 1088 bytes = 17 cache lines."""
    n = int(np.prod(shape))
    raw = np.empty(n + 1024, np.float32)
    start = (k * 272 - raw.ctypes.data // 4) % 1024
    return raw[start:start + n].reshape(shape)


class Buffers:
    """Activations for up to `rows` tokens at once, allocated once (on the model's device);
    the forward pass works on the first `seq` rows. Decode uses row 0 of the same buffers."""

    def __init__(self, c, rows, device="cpu"):
        count = iter(range(1 << 30))

        def buf(*shape):
            if device == "cpu":
                return _staggered_empty(shape, next(count))
            return empty(shape, np.float32, device)
        self.rows = rows
        self._views = {}                                       # seq -> take(seq)
        self.x = buf(rows, c.hidden_size)                      # residual stream
        self.xb = buf(rows, c.hidden_size)                     # normed x / projections
        self.qkv = buf(rows, c.qkv_dim)                        # fused q|k|v
        self.q = buf(rows, c.n_heads, c.head_dim)              # rotated queries
        self.k = buf(rows, c.n_kv_heads, c.head_dim)           # rotated keys
        self.v = buf(rows, c.n_kv_heads, c.head_dim)           # values
        self.att = buf(rows, c.n_heads, c.head_dim)            # attention output
        self.gate = buf(rows, c.intermediate_size)             # silu(gate) * up
        self.up = buf(rows, c.intermediate_size)
        self.logits = buf(1, c.vocab_size)                     # last position only
        self.ids = empty((rows,), np.int64, device)            # token ids, on the device
        # the logits sampling reads, on the host (the device buffer itself on the CPU)
        self.logits_host = self.logits if device == "cpu" else np.empty((1, c.vocab_size),
                                                                         np.float32)

    def take(self, seq):
        """Views of the first seq rows: (x, xb, qkv, q, k, v, att, gate, up); made once per
        seq (the same objects every decode step, so their cached device views are reused)."""
        views = self._views.get(seq)
        if views is None:
            views = self._views[seq] = tuple(
                rows(a, 0, seq) for a in (self.x, self.xb, self.qkv, self.q, self.k, self.v,
                                          self.att, self.gate, self.up))
        return views


class Model:
    """A Llama-family decoder (Llama, Mistral, Qwen2) with its KV cache, on the CPU or a CUDA
    GPU. Load one with Model.from_pretrained(folder); forward(tokens, start_pos) runs tokens
    and returns the last one's logits; generation.generate() drives it token by token.

    config: the frozen ModelConfig; weights: ModelWeights; cache: the KVCache (max_seq long);
    position: tokens in the cache."""

    def __init__(self, config, weights, *, device="cpu", max_seq=None, weight_dtype=None,
                 kv_dtype="auto"):
        """weights: ModelWeights on `device`, or host weights for a CUDA model (copied to the
        GPU here, the matrices in weight_dtype, default the host weights' own format).
        kv_dtype: the KV cache's storage, "auto" (resolve_kv_dtype) or one of
        KV_DTYPES[device]."""
        _check_device(device)
        c = config
        if weights.device != device:
            if device == "cpu":
                raise ValueError("a CPU model needs host weights; these are on the GPU")
            weights = weights.to_device(None if weight_dtype in (None, "auto")
                                        else weight_dtype)
        elif weight_dtype not in (None, "auto") and \
                resolve_weight_dtype(device, weight_dtype) != weights.weight_dtype:
            raise ValueError(f"weight_dtype={weight_dtype!r} but the weights are stored as "
                             f"{weights.weight_dtype}")
        self.config = c
        self.weights = weights
        self.device = device
        self.weight_dtype = weights.weight_dtype
        # positions this model instance runs: the model's context, or less when asked
        self.max_seq = c.max_context if max_seq is None else int(max_seq)
        if not 1 <= self.max_seq <= c.max_context:
            raise ValueError(f"max_seq must be in [1, {c.max_context}] (the model's context), "
                             f"got {max_seq}")
        scaling = dict(c.rope_scaling) if c.rope_scaling else None
        self.rope = RopeTable(c.head_dim, self.max_seq, theta=c.rope_theta, scaling=scaling)
        self.kv_dtype = resolve_kv_dtype(device, kv_dtype, self.weight_dtype)
        self.cache = KVCache(c.n_layers, self.max_seq, c.n_kv_heads, c.head_dim,
                             dtype=self.kv_dtype, device=device)
        self.buffers = Buffers(c, 1, device)
        # decode steps: on CUDA replayed as one graph each (cuda_decode.py), on the CPU one
        # compiled call, or else the kernels called straight (cpu_decode.py); set up here
        if device == "cuda":
            self.decoder, self.cpu_steps = CudaDecoder(self, Buffers(c, 1, device)), None
        else:
            self.decoder, self.cpu_steps = CpuDecoder(self, Buffers(c, 1)), CpuDecodeSteps(self)

    @classmethod
    def from_pretrained(cls, path, device="cpu", max_seq=None, weight_dtype="auto",
                        progress=None, kv_dtype="auto"):
        """Load a Hugging Face folder (config.json, *.safetensors) or a GGUF file. max_seq: KV
        cache length; default the model's context, at most DEFAULT_MAX_SEQ unless asked for
        more. device="cuda" puts the weights, KV cache and buffers on the GPU. weight_dtype:
        the linear weights' storage, "auto" (the source's own type where the device runs it,
        else float32; for a GGUF of other quantization types q8_0), or one of
        WEIGHT_DTYPES[device]: "float32", "bfloat16", "float16", "q8_0" (quantized at load);
        arithmetic is float32 throughout. progress: see ModelWeights.load. kv_dtype: the KV
        cache's storage, "auto" (resolve_kv_dtype) or one of KV_DTYPES[device]."""
        from .loaders import open_model_source

        _check_device(device)
        if weight_dtype != "auto":
            resolve_weight_dtype(device, weight_dtype)
        if kv_dtype != "auto":
            resolve_kv_dtype(device, kv_dtype, "float32")
        config, source = open_model_source(path)
        with source:
            if max_seq is None:
                max_seq = min(config.max_context, DEFAULT_MAX_SEQ)
            elif not 1 <= max_seq <= config.max_context:
                raise ValueError(f"a context of {max_seq} tokens was asked for; the model's "
                                 f"context is 1 to {config.max_context} tokens")
            weights = ModelWeights.load(config, source, device=device,
                                        weight_dtype=weight_dtype, progress=progress)
        return cls(config, weights, device=device, max_seq=max_seq, kv_dtype=kv_dtype)

    @property
    def position(self):
        """Tokens in the KV cache: the position the next token goes to."""
        return self.cache.length

    def reset(self):
        """Empty the KV cache: the next forward starts a new sequence at position 0."""
        self.cache.reset()

    def forward(self, tokens, start_pos=0, *, all_logits=False):
        """Run tokens (1-D ints) at positions start_pos.. and return the float32 logits
        (vocab,) of the last one. start_pos 0 starts a new sequence; otherwise it must be the
        current cache length. The result is a host (NumPy) view of a buffer the next call
        overwrites, on either device. all_logits=True returns every position's logits,
        (seq, vocab), in a new host array (for scoring a text)."""
        tokens = self._check_tokens(tokens, start_pos)
        seq = tokens.shape[0]
        if seq == 1 and not all_logits and self.decoder is not None:    # one graph, one call
            logits = self.decoder.step(int(tokens[0]), start_pos)
            if logits is not None:
                self.cache.set_length(start_pos + 1)
                return logits
        if seq > self.buffers.rows:                      # once per longer prompt
            self.buffers = None
            self.buffers = Buffers(self.config, seq, self.device)
        b = self.buffers
        # on CUDA the ids go to the device first (one small copy)
        ids = copy_from_host(rows(b.ids, 0, seq), tokens)
        steps = self.cpu_steps if seq == 1 and self.cpu_steps is not None else STEPS
        logits = self.run_layers(steps, b, ids, seq, start_pos, all_logits)
        if all_logits:                                                    # (seq, vocab)
            return copy_to_host(np.empty((seq, self.config.vocab_size), np.float32), logits)
        return copy_to_host(b.logits_host, b.logits)[0]                   # to the host

    def run_layers(self, o, b, ids, seq, start_pos, all_logits=False):
        """The forward pass of seq tokens (device ids) at start_pos, on buffers b, through the
        step functions o (STEPS: ops.py's; or a CUDA decode step's bound kernels): every
        layer, then the logits of the last position into b.logits (1, vocab), or of every
        position in a new array (all_logits)."""
        c, w = self.config, self.weights
        x, xb, qkv, q, k, v, att, gate, up = b.take(seq)
        o.embedding(w.embed_tokens, ids, out=x)                           # (seq, hidden)
        norms = [lw.input_layernorm for lw in w.layers[1:]] + [w.norm]    # after each layer
        o.rmsnorm(x, w.layers[0].input_layernorm if w.layers else w.norm, c.rms_norm_eps,
                  out=xb)

        for i, lw in enumerate(w.layers):
            # attention: x += o_proj(attention(rope(q), rope(k), v)); xb = the normed x
            o.linear(xb, lw.qkv_proj, lw.qkv_bias, out=qkv)              # (seq, qkv_dim)
            q_in, k_in, v_in = o.split_qkv(qkv, c.n_heads, c.n_kv_heads,  # (seq, heads, d)
                                           out=(q, k, v))
            q_r, k_r = o.rope_qk(q_in, k_in, self.rope, start_pos, out=(q, k))
            keys, values = o.append_kv(self.cache, i, k_r, v_in)          # (kv_len, n_kv, d)
            o.attention(q_r, keys, values, causal=True, out=att)          # (seq, heads, d)
            o.linear(reshape(att, (seq, c.q_dim)), lw.o_proj, lw.o_bias, out=xb)
            o.add_rmsnorm(x, xb, lw.post_attention_layernorm, c.rms_norm_eps, out=xb)

            # mlp: x += down_proj(silu(gate_proj(xb)) * up_proj(xb)); xb = x normed for the
            # next layer (the final norm after the last)
            o.linear(xb, lw.gate_proj, out=gate)                          # (seq, intermediate)
            o.linear(xb, lw.up_proj, out=up)
            o.silu_mul(gate, up, out=gate)
            o.linear(gate, lw.down_proj, out=xb)                          # (seq, hidden)
            o.add_rmsnorm(x, xb, norms[i], c.rms_norm_eps, out=xb)

        if all_logits:                                                    # (seq, vocab)
            return o.linear(xb, w.lm_head)
        # logits of the last position only
        last = rows(xb, seq - 1, seq)
        return o.linear(last, w.lm_head, out=b.logits)                    # (1, vocab)

    def _check_tokens(self, tokens, start_pos):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.shape[0] == 0 or not np.issubdtype(tokens.dtype,
                                                                          np.integer):
            raise ValueError(f"tokens must be a non-empty 1-D array of integers, got "
                             f"shape {tokens.shape} dtype {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"{lo if lo < 0 else hi}")
        if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)):
            raise TypeError(f"start_pos must be an int, got {type(start_pos).__name__}")
        if start_pos == 0:
            self.cache.reset()
        elif start_pos != self.cache.length:
            raise ValueError(f"start_pos must be 0 (a new sequence) or {self.cache.length} "
                             f"(tokens in the KV cache), got {start_pos}")
        if start_pos + tokens.shape[0] > self.max_seq:
            raise ValueError(f"context full: {start_pos} cached + {tokens.shape[0]} new tokens "
                             f"exceed the context of {self.max_seq} tokens")
        return np.ascontiguousarray(tokens, np.int64)

    def warmup(self, prefill_tokens=8):
        """Compile (or load from Numba's cache) the kernels the forward pass uses: a prefill
        long enough to take attention's prefill schedule (more than 4 queries), a short prompt
        (a few queries, as a decode step takes them; small work runs in the kernels' serial
        twins) and a decode step. On the CPU, for a model of 1024 query features or more
        (every real one), also the attention's schedules on the thread pool, which such a
        model reaches with a prompt of a dozen tokens and a context of a few hundred (else
        they compile in the middle of the first long prompt or generation). Leaves the KV cache
        empty."""
        pos = 0
        for n in (max(1, min(prefill_tokens, self.max_seq - 1)), 3, 1):
            n = min(n, self.max_seq - pos)
            if n > 0:
                self.forward(np.zeros(n, np.int64), pos)
                pos += n
        c = self.config
        features = c.n_heads * c.head_dim
        if self.device == "cpu" and features >= 1024:
            # the fewest keys, and queries over as many keys, whose work (queries x keys x
            # features) takes the pool
            keys = -(-cpu_pool.PARALLEL_MIN_WORK // features)
            prompt = math.isqrt(keys - 1) + 1
            if prompt <= self.max_seq:
                self.forward(np.zeros(prompt, np.int64), 0)
            if keys <= self.max_seq:         # a decode step at that context (the keys past
                                             # those written are the cache's zeros)
                self.cache.set_length(keys - 1)
                self.forward(np.zeros(1, np.int64), keys - 1)
        self.cache.reset()


def _check_device(device):
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        why = cuda_unavailable()
        if why is not None:
            raise ValueError(f"CUDA requested but no GPU is available ({why})")
