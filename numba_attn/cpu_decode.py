"""A CPU model's decode step, two ways:

- CpuDecoder: the whole step compiled, one call a token (_decode_token), the host's twin of
  cuda_decode.CudaDecoder. Its kernels are the ones ops.py calls, most of them called through
  their compiled addresses (cpu_pool.call_part, call_at) with arguments bound once, so the
  step links no large kernel and compiles in seconds. A decode step is some 13 calls a layer;
  from Python each pays its interpreter and dispatch with the caches cold from the weights
  streamed before it (tens of microseconds), about 2 ms a token on a 1B model.
- CpuDecodeSteps: ops.py's steps for one token, each a straight call of its kernel with no
  checks (the model's shapes were checked when it was built, the token and its position by
  Model.forward); for what CpuDecoder does not cover (biases, head sizes not a multiple of 32)
  and for measuring steps one by one.

NUMBA_ATTN_CPU_DECODER=0 turns CpuDecoder off."""
import math
import os
from operator import is_not

import numpy as np
from numba import get_num_threads, njit, types
from numba.extending import overload

from .backend import kernels, qkv_row_views
from .formats import Int8KV, weight_format
from .kernels.cpu_pool import PARALLEL_MIN_WORK, _launch, address, call_at, call_part, \
    skewed_row
from .kernels.linear_bf16_cpu import even_odd_into
from .kernels.norm_cpu import _add_rmsnorm_rows, _rmsnorm_rows
from .kernels.rope_cpu import _rope_half_rows

DECODER_ENV = "NUMBA_ATTN_CPU_DECODER"   # "0": CpuDecodeSteps for every decode step


class CpuDecodeSteps:
    """The steps of Model.run_layers for one token on the host, as ops.py names them."""

    def __init__(self, model):
        c = model.config
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.no_bias = np.empty(0, np.float32)
        self.tensor, self.norm, self.rope, self.attn = (
            kernels(family, "cpu") for family in ("tensor", "norm", "rope", "attention"))
        self.families = {}         # weight format name -> its kernel module
        self.gemvs = {}            # ids of weights -> (the weight, its family's bound GEMV)
        self.views = {}            # ids of buffers -> (the buffers, views of them)
        self.qkv, self.split = None, None   # the row split_qkv last split; q, k, v, q|k views

    def _views(self, buffers, make):
        """make(*buffers), made once for these buffers (the model's, reused every step; a
        longer prompt replaces them, and then the old ones' views are let go)."""
        key = tuple(map(id, buffers))
        hit = self.views.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], buffers)):
            if len(self.views) >= 8:
                self.views.clear()
            hit = self.views[key] = (buffers, make(*buffers))
        return hit[1]

    def _family(self, w):
        fmt = weight_format(w)
        module = self.families.get(fmt.name)
        if module is None:
            module = self.families[fmt.name] = kernels(fmt.family("cpu"), "cpu")
        return module

    def embedding(self, table, ids, out):
        # float32's embedding is the tensor family's; the others', their linear family's
        linear = weight_format(table).family("cpu") == "linear"
        (self.tensor if linear else self._family(table)).embedding(out, table, ids)
        return out

    def rmsnorm(self, x, weight, eps, out):             # x, out: (1, hidden)
        self.norm.rmsnorm(out, x, weight, eps)
        return out

    def add_rmsnorm(self, x, y, weight, eps, out):      # x += y; out = rmsnorm(x)
        self.norm.add_rmsnorm(out, x, y, weight, eps)
        return out

    def linear(self, x, w, bias=None, out=None):         # x: (1, in); out: (1, out)
        if out is None or bias is not None:              # the logits of every position; a bias
            if out is None:
                out = np.empty((x.shape[0], w.shape[0]), np.float32)
            self._family(w).linear(out, x, w, self.no_bias if bias is None else bias)
            return out
        bound = self.gemvs.get(id(w))
        if bound is None or bound[0] is not w:           # once a weight
            bound = self.gemvs[id(w)] = (w, self._family(w).bind_gemv(w))
        bound[1](out, x)
        return out

    def split_qkv(self, qkv, n_heads, n_kv_heads, out=None):
        if qkv is not self.qkv:                          # the model's buffer: once
            self.qkv = qkv
            self.split = qkv_row_views(qkv, n_heads, n_kv_heads)
        return self.split[:3]

    def rope_qk(self, q, k, table, start_pos, out=None):
        # q and k, split_qkv's views of the row, rotated in place by one call over their heads
        # together (the q|k view of self.split); out is not used
        qk = self.split[3]
        self.rope.rope_half(qk, qk, table.cos, table.sin, start_pos)
        return q, k

    def append_kv(self, cache, layer, k, v):
        return cache.write(layer, k, v)

    def attention(self, q, k, v, causal=True, out=None):
        self.attn.attention(out[None], q[None], k[None], v[None], self.scale, causal)
        return out

    def silu_mul(self, gate, up, out):                   # (1, intermediate)
        self._views((gate, up, out), lambda g, u, o: self.norm.bind_silu_mul(
            o.reshape(-1), g.reshape(-1), u.reshape(-1)))()
        return out


@njit(cache=True)
def _gemv(spec, n_threads, out, x, tail):
    # out (1, n) = x (1, k) w^T by a family's decode GEMV: spec (its address, the address of
    # the pool's launch for it or 0 for the calling thread, skewed x or a (1, 0) array, what
    # the kernel takes after x: _after_x), tail w's arguments
    addr, launch, xs, more = spec
    if xs.shape[1]:
        for j in range(x.shape[1]):
            xs[0, j] = x[0, j]
        x = xs
    _run_gemv(addr, launch if n_threads > 1 else 0, n_threads, out, x, more, tail)


def _run_gemv(addr, launch, n_threads, out, x, more, tail):
    """The GEMV kernel at addr on the pool's threads (launch: cpu_pool._launch's address for
    its arguments) or the calling thread (launch 0), given out, x, then by `more`: nothing
    (None), x again (a (1, 0) array) or x's even/odd copy (its buffer,
    linear_bf16_cpu.even_odd), then tail."""


@njit(inline="always")
def _run_parts(addr, launch, n_threads, args):
    if launch:
        call_at(launch, (addr, n_threads, args))
    else:
        call_part(addr, np.int64(0), np.int64(1), args)


@overload(_run_gemv)
def _run_gemv_impl(addr, launch, n_threads, out, x, more, tail):
    if isinstance(more, types.NoneType):
        def plain(addr, launch, n_threads, out, x, more, tail):
            _run_parts(addr, launch, n_threads, (out, x) + tail)
        return plain

    def with_pairs(addr, launch, n_threads, out, x, more, tail):
        xr = x
        if more.shape[1]:
            even_odd_into(more, x)
            xr = more
        _run_parts(addr, launch, n_threads, (out, x, xr) + tail)
    return with_pairs


def _after_x(x_more, k):
    # the spec's last entry for a family's decode_gemv's last: None, "x" or "even_odd"
    if x_more is None:
        return None
    return np.empty((1, 0 if x_more == "x" else k - k % 32), np.float32)


@njit(cache=True)
def _decode_token(x, xb, qkv, qk, q, k_new, v_new, att, att_row, gate, up, logits, gemvs, layers,
                  lm_head, norm0, eps, cos, sin, small, pos, silu, kv_layer, kv, scale,
                  n_threads):
    # Model.run_layers for one token whose embedding is in x (1, hidden), at position pos;
    # the logits into logits (1, vocab). Buffers: xb (1, hidden); qkv (1, qkv_dim) and its
    # views qk (1, 1, H + Hkv, d), q (1, 1, H, d), k_new, v_new (Hkv, d); att (1, 1, H, d)
    # and att_row (1, H d) the same memory; gate, up (1, intermediate). gemvs: the GEMVs'
    # specs (_gemv) for q|k|v, o, gate, up, down, lm_head; layers: per layer (q|k|v, o,
    # post-attention norm, gate, up, down, the next norm: the next layer's input norm or the
    # final norm), matrices as their families' arguments; small: the addresses of
    # _rmsnorm_rows, _add_rmsnorm_rows and _rope_half_rows; silu: (address, arguments);
    # kv_layer, kv: the KV cache's decode_layer address and arguments
    rmsnorm, add_rmsnorm, rope = small
    zero, one = np.int64(0), np.int64(1)
    call_at(rmsnorm, (xb, x, norm0, eps, zero, one))
    for i in range(len(layers)):
        qkv_w, o_w, post_norm, gate_w, up_w, down_w, next_norm = layers[i]
        # attention: x += o_proj(attention(rope(q), rope(k), v)); xb = the normed x
        _gemv(gemvs[0], n_threads, qkv, xb, qkv_w)
        call_at(rope, (qk, qk, cos, sin, pos, zero, one))
        call_at(kv_layer, (att, q, k_new, v_new, i, pos, scale, n_threads) + kv)
        _gemv(gemvs[1], n_threads, xb, att_row, o_w)
        call_at(add_rmsnorm, (xb, x, xb, post_norm, eps, zero, one))
        # mlp: x += down_proj(silu(gate_proj(xb)) * up_proj(xb)); xb = x normed for the next
        # layer (the final norm after the last)
        _gemv(gemvs[2], n_threads, gate, xb, gate_w)
        _gemv(gemvs[3], n_threads, up, xb, up_w)
        call_at(silu[0], silu[1])
        _gemv(gemvs[4], n_threads, xb, gate, down_w)
        call_at(add_rmsnorm, (xb, x, xb, next_norm, eps, zero, one))
    _gemv(gemvs[5], n_threads, logits, xb, lm_head)


class CpuDecoder:
    """A CPU model's decode step compiled whole (_decode_token): step(token, pos) returns the
    logits (vocab,), a view of a buffer the next step overwrites. Bound at the first step,
    after which a step is one embedding lookup and one compiled call; step returns None where
    the model needs more than it covers (why_not says what), and the model then decodes
    through CpuDecodeSteps."""

    def __init__(self, model, buffers):
        self.model, self.buffers = model, buffers
        self.ids = np.zeros(1, np.int64)
        self.why_not = None if os.environ.get(DECODER_ENV, "1") != "0" else f"{DECODER_ENV}=0"
        self.args = None                  # _decode_token's arguments but the position's
        self.parallel = False             # the attention's threaded schedule bound
        self.bound = ()                   # what the arguments were made from (_sources)

    def _sources(self):
        # every object the bound arguments come from: a weight, norm or cache replaced on the
        # model (a study swapping a layer's matrix) binds the step again
        m = self.model
        w = m.weights
        return (w, m.cache, m.cache.k, m.cache.v, m.rope, w.lm_head, w.norm,
                *(a for lw in w.layers for a in vars(lw).values()))

    def step(self, token, pos):
        if self.why_not is not None:
            return None
        threaded = self._threaded_attention(pos)
        sources = self._sources()
        if self.args is None or (threaded and not self.parallel) or \
                len(sources) != len(self.bound) or any(map(is_not, sources, self.bound)):
            self.args = self._bind(parallel=threaded or self.parallel)
            if self.args is None:
                return None
            self.bound = sources
        m, b = self.model, self.buffers
        self.ids[0] = token
        m.cpu_steps.embedding(m.weights.embed_tokens, self.ids, b.x)
        head, tail = self.args
        _decode_token(*head, pos, *tail, get_num_threads())
        return b.logits[0]

    def _threaded_attention(self, pos):
        c = self.model.config
        return c.n_heads * (pos + 1) * c.head_dim >= PARALLEL_MIN_WORK

    def _bind(self, parallel):
        m, b = self.model, self.buffers
        c, w = m.config, m.weights
        if any(lw.qkv_bias is not None or lw.o_bias is not None for lw in w.layers):
            self.why_not = "biases"
            return None
        if not w.layers:
            self.why_not = "no layers"
            return None
        x, xb, qkv, _, _, _, att, gate, up = b.take(1)
        q, k_new, v_new, qk = qkv_row_views(qkv, c.n_heads, c.n_kv_heads)
        q = q.reshape(1, 1, c.n_heads, c.head_dim)
        k_new, v_new = k_new[0], v_new[0]                        # (Hkv, d)
        att_row = att.reshape(1, c.q_dim)
        att = att.reshape(1, 1, c.n_heads, c.head_dim)
        # the GEMVs: one kernel, one skew and one set of argument types per kind of matrix
        kinds = [[getattr(lw, name) for lw in w.layers]
                 for name in ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
        specs, tails = [], []
        for mats, out in zip(kinds + [[w.lm_head]], (qkv, xb, gate, up, xb, b.logits)):
            got = [m.cpu_steps._family(a).decode_gemv(a) for a in mats]
            kernel, work, tail, skew, x_more = got[0]
            k = mats[0].shape[1]
            x_in = np.empty((1, k), np.float32)
            more = _after_x(x_more, k)
            head = (out, x_in) if more is None else (out, x_in, x_in)
            addr = address(kernel, *head, *tail)
            if any(g[0] is not kernel or g[3:] != (skew, x_more)
                   or address(kernel, *head, *g[2]) != addr for g in got):
                self.why_not = "matrices of one kind in different formats"
                return None
            xs = skewed_row(k, skew) if skew else np.empty((1, 0), np.float32)
            # the pool's launch compiled for these arguments only where the work takes it
            launch = address(_launch, addr, 2, (*head, *tail), parts=False) \
                if work >= PARALLEL_MIN_WORK else 0
            specs.append((addr, launch, xs, more))
            tails.append([g[2] for g in got])
        post = [lw.post_attention_layernorm for lw in w.layers]
        nxt = [lw.input_layernorm for lw in w.layers[1:]] + [w.norm]
        layers = tuple(zip(tails[0], tails[1], post, tails[2], tails[3], tails[4], nxt))
        # the KV cache's layer step: its family's decode_layer
        family = kernels("attention_int8" if isinstance(m.cache.k, Int8KV) else "attention",
                         "cpu")
        got = family.decode_layer_args(att, q, k_new, v_new, m.cache.k, m.cache.v,
                                       m.cpu_steps.scale, parallel)
        if got is None:
            self.why_not = f"{m.kv_dtype} KV cache's decode takes another schedule here"
            return None
        kv_layer, kv = got
        self.parallel = parallel
        silu_kernel, silu_args = kernels("norm", "cpu").silu_mul_call(
            gate.reshape(-1), gate.reshape(-1), up.reshape(-1))
        silu = (address(silu_kernel, *silu_args, parts=False), silu_args)
        eps, norm0 = float(c.rms_norm_eps), w.layers[0].input_layernorm
        small = (address(_rmsnorm_rows, xb, x, norm0, eps, 0, 1, parts=False),
                 address(_add_rmsnorm_rows, xb, x, xb, norm0, eps, 0, 1, parts=False),
                 address(_rope_half_rows, qk, qk, m.rope.cos, m.rope.sin, 0, 0, 1, parts=False))
        head = (x, xb, qkv, qk, q, k_new, v_new, att, att_row, gate, up, b.logits, tuple(specs),
                layers, tails[5][0], norm0, eps, m.rope.cos, m.rope.sin, small)
        return head, (silu, kv_layer, kv, float(m.cpu_steps.scale))
