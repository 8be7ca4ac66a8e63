"""Model benchmarks, llama-bench style: prefill (pp512) and generation (tg128) tokens/s, time
to first token, and a per-stage breakdown of one decoder layer.

- pp N: one forward pass over N prompt tokens from an empty KV cache; tokens/s = N / time.
  Time to first token: the same pass plus picking the first token (argmax of the logits).
- tg N: N single-token forward passes from an empty cache, each picking its token (argmax);
  tokens/s = N / time. Weight bytes read per token / time per token = the achieved bandwidth.
- breakdown: one decoder layer run with the public kernel functions on buffers shaped like
  the model's layer (prefill at N tokens, and decode of one token at position N), each stage
  timed in place (the clock read between stages of the running layer) and alone (a loop of
  its own: the difference is what the neighbours cost it, e.g. a BLAS thread pool still
  spinning). The in-place stages add up to the layer total; the row "unaccounted" holds the
  little that medians do not add, so the shares sum to 100%. It needs no Model instance.
  A stage that works in place, as the model's do (silu_mul over the gate, rope over q and k),
  would compound in a loop of its own (silu_mul's values overflow to inf and NaN within a
  few thousand calls, and the stages after it would be timed on them): alone, it reads a
  snapshot of its input taken before the loop and writes where the layer writes, so every
  call sees the layer's values and the next stage's input is the layer's too.
"""
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import KVCache, RopeTable, add_rmsnorm, apply_rope, attention, linear, silu_mul
from ..backend import copy_from_host, empty
from ..ops import split_qkv
from .limits import roofline
from .timing import measure, measure_chain

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "models", "demo")
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, n_layers=22,
                 n_heads=32, n_kv_heads=4, head_dim=64, rms_norm_eps=1e-5,
                 max_position_embeddings=2048)


@dataclass(frozen=True)
class LayerShape:
    """What the breakdown needs of a model: a decoder layer's shapes."""
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    vocab: int
    eps: float = 1e-5

    @classmethod
    def of(cls, c):
        return cls(c.hidden_size, c.intermediate_size, c.n_heads, c.n_kv_heads, c.head_dim,
                   c.n_layers, c.vocab_size, c.rms_norm_eps)

    @property
    def qkv_dim(self):
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


# -- the model under test --------------------------------------------------------------------

def _fill(a, block):
    """Fill a with copies of a random block (a prime length, so rows do not repeat in step):
    random-looking weights at memcpy speed instead of a minute of random number generation."""
    flat = a.reshape(-1)
    for i in range(0, flat.size, block.size):
        n = min(block.size, flat.size - i)
        flat[i:i + n] = block[:n]
    return a


def _random_weights(c, seed=0, weight_dtype="float32"):
    """ModelWeights for config c: random values (made in float32, then stored in weight_dtype:
    rounded or quantized one matrix at a time), norms at one."""
    from ..formats import quantize_q8_0, weight_format
    from ..model import LayerWeights, ModelWeights
    f32 = np.float32
    block = np.random.default_rng(seed).standard_normal(1_000_003, dtype=f32)
    storage = weight_format(weight_dtype)

    def lin(n_out, n_in):          # scaled so activations stay O(1) through the layers
        a = _fill(np.empty((n_out, n_in), f32), block * f32(1 / np.sqrt(n_in)))
        if storage.name == "q8_0":
            return quantize_q8_0(a)
        return a if storage.name == "float32" else a.astype(storage.storage)

    def norm(n):
        return np.ones(n, f32)

    layers = [LayerWeights(
        input_layernorm=norm(c.hidden_size), qkv_proj=lin(c.qkv_dim, c.hidden_size),
        qkv_bias=None, o_proj=lin(c.hidden_size, c.q_dim), o_bias=None,
        post_attention_layernorm=norm(c.hidden_size),
        gate_proj=lin(c.intermediate_size, c.hidden_size),
        up_proj=lin(c.intermediate_size, c.hidden_size),
        down_proj=lin(c.hidden_size, c.intermediate_size)) for _ in range(c.n_layers)]
    return ModelWeights(embed_tokens=lin(c.vocab_size, c.hidden_size), layers=layers,
                        norm=norm(c.hidden_size), lm_head=lin(c.vocab_size, c.hidden_size))


def tinyllama_config(layers=TINYLLAMA["n_layers"]):
    from ..config import LlamaConfig
    return LlamaConfig(architecture="LlamaForCausalLM", **{**TINYLLAMA, "n_layers": layers})


def random_model(layers=TINYLLAMA["n_layers"], *, max_seq=2048, device="cpu", seed=0,
                 weight_dtype="float32", kv_dtype="auto"):
    """A TinyLlama-1.1B-shaped Model with random weights (layers may be fewer), stored in
    weight_dtype (on CUDA: made on the host in float32, stored on the device as asked), its KV
    cache in kv_dtype."""
    from ..model import Model, resolve_weight_dtype
    c = tinyllama_config(layers)
    fmt = resolve_weight_dtype(device, weight_dtype)
    host = fmt if device == "cpu" else "float32"
    return Model(c, _random_weights(c, seed, host), device=device, max_seq=max_seq,
                 weight_dtype=None if device == "cpu" else fmt, kv_dtype=kv_dtype)


def load_model(model_dir, *, layers=None, max_seq, device="cpu", weight_dtype="float32",
               kv_dtype="auto"):
    """(model, description). model_dir None: the built-in demo model when installed (and no
    layer count is asked for), else a random TinyLlama-shaped model."""
    from ..config import LlamaConfig
    from ..model import Model
    if model_dir is None and layers is None and \
            os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
        model_dir = DEMO_MODEL
    if model_dir is not None:
        if model_dir == DEMO_MODEL:          # the default: as long a context as it has
            max_seq = min(max_seq, LlamaConfig.from_pretrained(model_dir).max_context)
        model = Model.from_pretrained(model_dir, device=device, max_seq=max_seq,
                                      weight_dtype=weight_dtype, kv_dtype=kv_dtype)
        name = "built-in demo model" if model_dir == DEMO_MODEL else model_dir
        return model, f"{name} ({model.config.architecture}, {model.config.n_layers} layers)"
    if device != "cpu":       # a tiny model first: refuse quickly where the device is not wired
        tiny = LlamaConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8,
                           intermediate_size=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4)
        Model(tiny, _random_weights(tiny), device=device, max_seq=4,
              weight_dtype="float32" if weight_dtype == "auto" else weight_dtype,
              kv_dtype=kv_dtype)
    n = TINYLLAMA["n_layers"] if layers is None else layers
    model = random_model(n, max_seq=max_seq, device=device,
                         weight_dtype="float32" if weight_dtype == "auto" else weight_dtype,
                         kv_dtype=kv_dtype)
    fewer = "" if n == TINYLLAMA["n_layers"] else \
        f" -- {n} of TinyLlama's {TINYLLAMA['n_layers']} layers, for speed"
    return model, (f"random TinyLlama-1.1B-shaped model (hidden 2048, 32/4 heads, "
                   f"intermediate 5632, vocab 32000, {model.weight_dtype} weights, "
                   f"{model.kv_dtype} KV cache){fewer}")


def model_weight_bytes(model):
    """Bytes a decode step reads: every layer's weights (in their format), the final norm and
    the lm_head."""
    w = model.weights
    total = w.norm.nbytes + w.lm_head.nbytes
    for lw in w.layers:
        total += sum(a.nbytes for a in vars(lw).values() if a is not None)
    return total


# -- pp / tg / time to first token -------------------------------------------------------------

def bench_generation(model, *, pp=512, tg=128, repeat=None, budget_s=5.0, seed=0):
    """{'pp': ..., 'tg': ..., 'ttft': ...} each with Stats (seconds per run) and tokens/s."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, size=pp, dtype=np.int64)
    tokens = np.zeros(1, np.int64)

    def prefill():
        return int(np.argmax(model.forward(prompt, 0)))     # the first token's id

    def generate():
        tokens[0] = 1
        for pos in range(tg):
            tokens[0] = int(np.argmax(model.forward(tokens, pos)))

    timing = dict(repeat=repeat, budget_s=budget_s, warmup=0, warmup_s=0, min_samples=3, inner=1)
    out = {}
    if pp:
        s = measure(prefill, **timing)
        out["pp"] = {"tokens": pp, "stats": s.to_dict(), "tok_s": pp / s.median,
                     "tok_s_min": pp / s.max, "tok_s_max": pp / s.min}
        out["ttft"] = {"tokens": pp, "stats": s.to_dict()}
    if tg:
        s = measure(generate, **timing)
        nbytes = model_weight_bytes(model)
        out["tg"] = {"tokens": tg, "stats": s.to_dict(), "tok_s": tg / s.median,
                     "tok_s_min": tg / s.max, "tok_s_max": tg / s.min,
                     "weight_bytes": nbytes, "gbs": nbytes * tg / s.median / 1e9}
    model.reset()
    return out


# -- one decoder layer, stage by stage --------------------------------------------------------

@dataclass
class Stage:
    """One stage of the layer: fn runs it in the layer; alone runs it in a loop of its own."""
    name: str
    fn: Callable
    bytes: float                  # bytes it must move at least
    flops: float                  # floating-point operations it does
    alone: Callable = None        # fn, unless fn works in place (then: from a snapshot)
    setup: Callable = None        # called once before the alone loop: takes the snapshot

    def __post_init__(self):
        if self.alone is None:
            self.alone = self.fn


def layer_stages(model, seq, pos):
    """([Stage], layer) for one decoder layer of `model` over seq tokens at positions
    pos..pos+seq-1 (KV cache filled up to pos); layer() runs the stages as one chain. The
    stages are the calls of Model.forward's layer (ops.py) on the model's own first-layer
    weights, in their storage format, on its device."""
    L = LayerShape.of(model.config)
    device = model.device
    f32 = np.float32
    rng = np.random.default_rng(seq)
    h, i, H, Hkv, d = L.hidden, L.intermediate, L.n_heads, L.n_kv_heads, L.head_dim
    nq, nk = H * d, Hkv * d

    def put(a):                                         # host values -> the device's array
        return cuda_to_device(a) if device == "cuda" else a

    def buf(*shape):
        return empty(shape, f32, device)

    # the model's weights: norms (hidden,); qkv (qkv_dim, hidden); o (hidden, q_dim);
    # gate, up (inter, hidden); down (hidden, inter)
    lw = model.weights.layers[0]
    w_in, w_post = lw.input_layernorm, lw.post_attention_layernorm
    w_qkv, w_o = lw.qkv_proj, lw.o_proj
    w_gate, w_up, w_down = lw.gate_proj, lw.up_proj, lw.down_proj
    # activations, allocated once
    x = put(rng.standard_normal((seq, h), dtype=f32))   # residual stream (added to in place)
    x0 = put(rng.standard_normal((seq, h), dtype=f32))  # ... as each layer() starts
    xin = put(rng.standard_normal((seq, h), dtype=f32))  # the layer's normed input
    xo, xb, xd, xn = buf(seq, h), buf(seq, h), buf(seq, h), buf(seq, h)  # o_proj out, normed
    #                                                   x, down_proj out, next layer's input
    xs, xs_out = buf(seq, h), buf(seq, h)               # the residual stages alone: x, out
    qkv = buf(seq, L.qkv_dim)
    q, k, v = buf(seq, H, d), buf(seq, Hkv, d), buf(seq, Hkv, d)
    att = buf(seq, H, d)
    gate, up = buf(seq, i), buf(seq, i)
    # the in-place stages' inputs, snapshotted before their alone loops
    q_in, k_in, gate_in = buf(seq, H, d), buf(seq, Hkv, d), buf(seq, i)
    table = RopeTable(d, pos + seq)
    cache = KVCache(1, pos + seq, Hkv, d, dtype=model.kv_dtype, device=device)
    if pos:                                             # the cached prefix
        cache.append(0, put(rng.standard_normal((pos, Hkv, d), dtype=f32)),
                     put(rng.standard_normal((pos, Hkv, d), dtype=f32)))
    keys, values = cache.append(0, put(rng.standard_normal((seq, Hkv, d), dtype=f32)),
                                put(rng.standard_normal((seq, Hkv, d), dtype=f32)))
    parts = [q, k, v]                                   # split's result: views when seq is 1

    def split():
        parts[:] = split_qkv(qkv, H, Hkv, out=(q, k, v))

    def rope():                                         # in place when seq > 1 (q is parts[0])
        apply_rope(parts[0], table, pos, out=q)
        apply_rope(parts[1], table, pos, out=k)

    def rope_setup():
        copy_from_host(q_in, parts[0])                  # device to device on cuda
        copy_from_host(k_in, parts[1])

    def rope_alone():
        apply_rope(q_in, table, pos, out=q)
        apply_rope(k_in, table, pos, out=k)

    def append():
        cache.lengths[0] = pos                          # write the same positions again
        cache.append(0, k, parts[2])

    B = 4 * seq                                         # bytes of one float32 per token
    kv_len = pos + seq
    causal_pairs = seq * pos + seq * (seq + 1) // 2     # (query, key) pairs a query sees
    # the layer as Model.run_layers runs it: its input norm is the previous layer's last
    # stage (the residual add and the norm in one pass), modelled here by the layer's own
    stages = [
        Stage("qkv projection", lambda: linear(xin, w_qkv, lw.qkv_bias, out=qkv),
              w_qkv.nbytes + B * (h + L.qkv_dim), 2 * seq * h * L.qkv_dim),
        Stage("split q/k/v", split, 0 if seq == 1 else 2 * B * L.qkv_dim, 0),
        Stage("rope", rope, 2 * B * (nq + nk), 3 * seq * (nq + nk),
              alone=rope_alone, setup=rope_setup),
        Stage("kv cache append", append, 4 * B * nk, 0),
        Stage("attention", lambda: attention(q, keys, values, causal=True, out=att),
              2 * 4 * kv_len * nk + 2 * B * nq, 4 * d * H * causal_pairs),
        Stage("output projection", lambda: linear(att.reshape(seq, nq), w_o, lw.o_bias, out=xo),
              w_o.nbytes + B * (nq + h), 2 * seq * nq * h),
        # x is added to in place: alone, on a copy of it (xs), out into scratch
        Stage("residual add + mlp norm", lambda: add_rmsnorm(x, xo, w_post, L.eps, out=xb),
              4 * B * h + 4 * h, 4 * seq * h,
              alone=lambda: add_rmsnorm(xs, xo, w_post, L.eps, out=xs_out),
              setup=lambda: copy_from_host(xs, x)),
        Stage("mlp gate + up projections",
              lambda: (linear(xb, w_gate, out=gate), linear(xb, w_up, out=up)),
              w_gate.nbytes + w_up.nbytes + B * (h + 2 * i), 4 * seq * h * i),
        # in place, as the model: alone, from the gate projection's values each call
        Stage("silu_mul", lambda: silu_mul(gate, up, out=gate), 3 * B * i, 5 * seq * i,
              alone=lambda: silu_mul(gate_in, up, out=gate),
              setup=lambda: copy_from_host(gate_in, gate)),
        Stage("mlp down projection", lambda: linear(gate, w_down, out=xd),
              w_down.nbytes + B * (i + h), 2 * seq * i * h),
        Stage("residual add + attention norm (next layer)",
              lambda: add_rmsnorm(x, xd, w_in, L.eps, out=xn), 4 * B * h + 4 * h, 4 * seq * h,
              alone=lambda: add_rmsnorm(xs, xd, w_in, L.eps, out=xs_out),
              setup=lambda: copy_from_host(xs, x)),
    ]

    def layer():
        copy_from_host(x, x0)           # the residual stream as the layer found it
        for s in stages:
            s.fn()
    return stages, layer


def cuda_to_device(a):
    from numba import cuda
    return cuda.to_device(a)


def device_sync(device):
    """What to call before reading a clock: kernel launches return before the GPU is done."""
    if device == "cuda":
        from numba import cuda
        return cuda.synchronize
    return None


def breakdown(model, *, seq, pos, limits=None, repeat=None, budget_s=0.5):
    """Rows for every stage, 'unaccounted' and the layer total.

    Each stage is timed in place, inside the running layer (the clock is read between
    stages, so a stage pays what the stages before it leave behind: caches, thread pools
    still busy), and alone, in a loop of its own, the stages in layer order so each loop
    reads the layer's values (an in-place stage from a snapshot of its input). Shares are of
    the layer total, in place; 'unaccounted' is the total's median minus the sum of the
    stages' medians (medians do not add exactly; the clock reads cost ~0.1 us each), so the
    shares add up to 100%; its noise is the intervals' half-widths added in quadrature."""
    stages, _ = layer_stages(model, seq, pos)
    sync = device_sync(model.device)
    parts, total = measure_chain([s.fn for s in stages], repeat=repeat,
                                 budget_s=budget_s, sync=sync)
    rows = []
    for s, inlayer in zip(stages, parts):
        if s.setup is not None:
            s.setup()
        alone = measure(s.alone, sync=sync, repeat=repeat, budget_s=min(budget_s, 0.2))
        row = _stage_row(s.name, inlayer, s.bytes, s.flops, limits)
        row["alone"] = alone.to_dict()
        rows.append(row)
    rest = total.median - sum(r["median"] for r in rows)
    noise = math.hypot(total.half_width, *(p.half_width for p in parts))
    rows.append({"stage": "unaccounted (total - sum of stages)", "stats": None, "alone": None,
                 "median": rest, "noise": noise, "bytes": 0, "flops": 0})
    for r in rows:
        r["share"] = r["median"] / total.median
    total_row = _stage_row("layer total", total, sum(s.bytes for s in stages),
                           sum(s.flops for s in stages), limits)
    total_row["alone"] = None
    total_row["share"] = 1.0
    rows.append(total_row)
    return {"seq": seq, "pos": pos, "rows": rows}


def _stage_row(name, stats, nbytes, flops, limits):
    t = stats.median
    row = {"stage": name, "stats": stats.to_dict(), "median": t, "bytes": nbytes, "flops": flops,
           "gbs": nbytes / t / 1e9 if t > 0 else None,
           "gflops": flops / t / 1e9 if t > 0 and flops else None}
    row["bound"], row["limit_share"] = roofline(row["gbs"], row["gflops"], limits)
    return row
