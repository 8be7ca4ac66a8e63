"""The decode step of a CUDA model as one CUDA graph, captured once and replayed per token.

A decode step is about 13 small launches per layer; through numba's launch path each costs
20-30 us of Python, so a step would be bound by the host, not by the GPU reading the weights.
Here the step's kernels are bound once (DecodeSteps: the same calls as ops.py, launched
straight on a stream with no checks per call) and captured into a graph (cuda.core's
GraphBuilder, which numba-cuda takes where a launch takes a stream). Every kernel reads the
step's position from device memory (`at`), so one graph serves every position: a token is one
small copy in (token id and position), one graph launch and one copy of the logits out.

The key splits of the decode attention are fixed in a graph; they grow with the keys in use,
so there is one graph per split plan (a few in all, by power-of-two KV lengths), each captured
the first time a step needs it. Where capture is unavailable (numba's simulator, no cuda.core
graph support, NUMBA_ATTN_CUDA_GRAPHS=0) the same bound kernels run as plain launches on the
stream, with the same results.
"""
import math
import os
import time

import numpy as np

from .backend import empty, kernels, qkv_row_views, reshape, view
from .formats import weight_format

GRAPHS_ENV = "NUMBA_ATTN_CUDA_GRAPHS"   # "0": plain launches, no graph
MIN_BUCKET = 64                          # shortest KV length a split plan is made for


def graphs_unavailable():
    """None when decode steps can be captured as CUDA graphs; otherwise why not, in words."""
    from numba import config
    if os.environ.get(GRAPHS_ENV, "1") == "0":
        return f"{GRAPHS_ENV}=0"
    if config.ENABLE_CUDASIM:
        return "numba's CUDA simulator has no graphs"
    try:
        from numba.cuda.cudadrv.driver import GraphBuilder  # noqa: F401
    except ImportError:
        return "this numba-cuda launches on no cuda.core GraphBuilder"
    return None


def _check(result):
    """A cuda.bindings driver call's result: raise on an error code."""
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")


class DecodeSteps:
    """ops.py's steps of a forward pass, bound for one token on a CUDA model: each launches its
    kernel straight on `stream` (a numba stream, or a GraphBuilder while capturing), with no
    checks per call (the model checked its shapes when it was built). Positions come from the
    device array `at`; KV-cache appends return the whole cache of a layer, of which attention
    uses the first at[0] + 1 keys, in key splits `splits` (set per graph)."""

    def __init__(self, model, at, stream):
        from .kernels import attention_cuda
        c = model.config
        self.stream, self.at = stream, at
        self.qk = None                                          # q|k of the split row
        self.cache = model.cache
        self.cos, self.sin = model.rope.tables("cuda")          # on the device before capture
        self.no_bias = empty((0,), np.float32, "cuda")
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.plan_args = (1, 1, c.n_heads, c.n_kv_heads, c.head_dim, self.cache.dtype.itemsize)
        # a workspace of its own, sized for the longest plan (the most splits)
        _, _, _, counters, partials = attention_cuda.decode_plan(*self.plan_args,
                                                                 self.cache.max_seq)
        self.workspace = attention_cuda.new_workspace(counters, partials)
        self.attention_cuda = attention_cuda
        self.splits = self.plan(self.cache.max_seq)

    def plan(self, kv_len):
        """The key splits (n_split, split_len) of the attention for kv_len keys: those of the
        next power of two (at least MIN_BUCKET, at most the cache), so that a few plans serve
        every length."""
        bucket = min(max(MIN_BUCKET, 1 << (int(kv_len) - 1).bit_length()), self.cache.max_seq)
        return self.attention_cuda.decode_plan(*self.plan_args, bucket)[2]

    # -- the steps, as ops.py names them --
    def embedding(self, table, ids, out):
        family = weight_format(table).family("cuda")
        kernels("tensor" if family == "linear" else family, "cuda").embedding(
            out, table, ids, stream=self.stream)
        return out

    def rmsnorm(self, x, weight, eps, out):
        n = x.size                                           # one row
        kernels("norm", "cuda").rmsnorm(reshape(out, (1, n)), reshape(x, (1, n)), weight, eps,
                                        stream=self.stream)
        return out

    def linear(self, x, w, bias=None, out=None):
        n_out, n_in = w.shape
        kernels(weight_format(w).family("cuda"), "cuda").linear(
            reshape(out, (1, n_out)), reshape(x, (1, n_in)), w,
            self.no_bias if bias is None else bias, stream=self.stream)
        return out

    def split_qkv(self, qkv, n_heads, n_kv_heads, out=None):
        q, k, v, self.qk = qkv_row_views(qkv, n_heads, n_kv_heads)   # views, cached on qkv
        return q, k, v

    def rope_qk(self, q, k, table, start_pos, out=None):
        # q and k, split_qkv's views of the row, rotated in place by one launch over their
        # heads together (self.qk); out is not used
        kernels("rope", "cuda").rope_half(self.qk, self.qk, self.cos, self.sin, 0, at=self.at,
                                          stream=self.stream)
        return q, k

    def append_kv(self, cache, layer, k, v):
        shape = (cache.max_seq, cache.n_kv_heads, cache.head_dim)
        row = cache.n_kv_heads * cache.head_dim
        base = layer * cache.max_seq * row
        kernels("tensor", "cuda").append_kv(cache.k, cache.v, k, v, base, at=self.at, row=row,
                                            stream=self.stream)
        return view(cache.k, shape, base), view(cache.v, shape, base)

    def attention(self, q, k, v, causal=True, out=None):
        four = (lambda a: reshape(a, (1,) + tuple(a.shape)))
        self.attention_cuda.attention(four(out), four(q), four(k), four(v), self.scale, causal,
                                 at=self.at, splits=self.splits, workspace=self.workspace,
                                 stream=self.stream)
        return out

    def add_rmsnorm(self, x, y, weight, eps, out):
        n = x.size                                           # one row
        kernels("norm", "cuda").add_rmsnorm(reshape(out, (1, n)), reshape(x, (1, n)),
                                            reshape(y, (1, n)), weight, eps, stream=self.stream)
        return out

    def silu_mul(self, gate, up, out):
        n = gate.size
        kernels("norm", "cuda").silu_mul(reshape(out, (n,)), reshape(gate, (n,)),
                                         reshape(up, (n,)), stream=self.stream)
        return out


class CudaDecoder:
    """Decode steps of a CUDA model: step(token, pos) -> the logits (vocab,) on the host.

    Everything a step touches is allocated here, once: its own activation buffers (prefill
    may grow the model's), the token/position input on the device and pinned on the host, the
    pinned logits, the attention's workspace, a stream. Graphs are captured on first use of
    each split plan and replayed after; `graphs` holds them, `why_plain` says why steps run as
    plain launches (None while graphs are used)."""

    def __init__(self, model, buffers):
        from numba import cuda
        self.model = model
        self.buffers = buffers                               # Buffers for one row
        self.stream = cuda.stream()
        self.step_in = cuda.pinned_array(2, np.int64)        # token id, position
        self.step_dev = cuda.device_array(2, np.int64)
        self.ids, at = view(self.step_dev, (1,)), view(self.step_dev, (1,), 1)
        self.logits_host = cuda.pinned_array(tuple(buffers.logits.shape), np.float32)
        self.steps = DecodeSteps(model, at, self.stream)
        self.graphs = {}                                     # splits -> cuda.core Graph
        self.host_s = 0.0
        self.why_plain = graphs_unavailable()
        self._core_stream = self._driver = None
        if self.why_plain is None:
            from cuda.bindings import driver
            from numba.cuda.cudadrv.driver import _to_core_stream
            self._core_stream = _to_core_stream(self.stream)
            self._driver, self._handle = driver, self._core_stream.handle
            self._dev_in = self.step_dev.__cuda_array_interface__["data"][0]
            self._dev_out = buffers.logits.__cuda_array_interface__["data"][0]
            self._host_in, self._host_out = self.step_in.ctypes.data, self.logits_host.ctypes.data

    def step(self, token, pos):
        """Run token at position pos (the cache holds pos tokens); the logits, a host view
        the next step overwrites. host_s: the host's time to issue the step (copies and
        graph launch), before waiting for the GPU."""
        t0 = time.perf_counter()
        self.step_in[0], self.step_in[1] = token, pos
        splits = self.steps.plan(pos + 1)
        self._copy_in()        # before a capture's plain run, which reads them too
        graph = None
        if self.why_plain is None:
            graph = self.graphs.get(splits) or self._capture(splits)
        if graph is not None:
            graph.launch(self._core_stream)
        else:
            self._run(splits, self.stream)
        self._copy_out()
        self.host_s = time.perf_counter() - t0
        self._sync()
        return self.logits_host[0]

    def _copy_in(self):
        """The token id and position to the device, on the stream. Through the driver where
        there is one: numba's copy_to_device costs ~120 us of Python for these 16 bytes."""
        if self._driver is None:
            self.step_dev.copy_to_device(self.step_in, stream=self.stream)
            return
        d = self._driver
        _check(d.cuMemcpyHtoDAsync(self._dev_in, self._host_in, 16, self._handle))

    def _copy_out(self):
        if self._driver is None:
            self.buffers.logits.copy_to_host(self.logits_host, stream=self.stream)
            return
        d = self._driver
        _check(d.cuMemcpyDtoHAsync(self._host_out, self._dev_out, self.logits_host.nbytes,
                                   self._handle))

    def _sync(self):
        if self._driver is None:
            self.stream.synchronize()
        else:
            _check(self._driver.cuStreamSynchronize(self._handle))

    def _run(self, splits, stream):
        s = self.steps
        s.splits, s.stream = splits, stream
        try:
            self.model.run_layers(s, self.buffers, self.ids, 1, 0)
        finally:
            s.stream = self.stream

    def _capture(self, splits):
        """A graph of the step for this split plan, or None (with why_plain set) when capture
        fails. The step runs once as plain launches first, so that every kernel is compiled
        and loaded before capture (which must not load modules), on this step's token and
        position (copied in first: the device's copy is uninitialised before the first step,
        and a stale position would write keys and values where they do not belong); the graph
        then runs the same step again, which writes the same keys and values at the same
        position."""
        self._run(splits, self.stream)
        builder = self._core_stream.create_graph_builder()
        try:
            builder.begin_building()
            try:
                self._run(splits, builder)
            finally:
                builder.end_building()
            graph = builder.complete()
        except Exception as e:  # noqa: BLE001 - any failure: plain launches from now on
            self.why_plain = f"graph capture failed ({type(e).__name__}: {e})"
            self.stream.synchronize()
            return None
        graph.upload(self._core_stream)
        self.graphs[splits] = graph
        return graph
