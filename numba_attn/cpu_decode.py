"""A CPU decode step's kernels, bound once: ops.py's steps for one token of a CPU model, each a
straight call of its kernel with no checks (the model's shapes were checked when it was built,
the token and its position by Model.forward). A decode step is some 13 calls a layer, and
ops.py's argument checks cost 5-15 us a call: a few milliseconds a token on a 1B model, more
than the arithmetic of a small one. The host's twin of cuda_decode.DecodeSteps."""
import math

import numpy as np

from .backend import kernels, qkv_row_views
from .formats import weight_format


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
