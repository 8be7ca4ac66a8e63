"""The small tensor steps of the forward pass on the CPU: token embedding, elementwise add (the
residual), splitting the fused q|k|v projection, and writing new keys and values into the KV
cache. Twin: tensor_cuda.py.

Each is one NumPy call: a gather or a copy as fast as memory allows, no thread pool to wake."""
import numpy as np


def embedding(out, table, tokens):
    # out: (seq, hidden) float32; table: (vocab, hidden); tokens: (seq,) int64, clipped to
    # [0, vocab) (the caller checks them first)
    np.take(table, tokens, axis=0, out=out, mode="clip")


def add(out, a, b):
    # out, a, b: (n,) float32; out = a + b, in place when out is a or b
    np.add(a, b, out=out)


def split_qkv(q, k, v, qkv):
    # qkv: (seq, nq + 2 * nk); q: (seq, nq); k, v: (seq, nk). The column blocks of qkv in turn
    nq, nk = q.shape[1], k.shape[1]
    np.copyto(q, qkv[:, :nq])
    np.copyto(k, qkv[:, nq:nq + nk])
    np.copyto(v, qkv[:, nq + nk:])


def append_kv(k_cache, v_cache, k, v, offset):
    # k_cache, v_cache: C-contiguous caches; k, v: new rows, float32 or the caches' dtype
    # (rounded to nearest even into a 16-bit cache); written from element offset of the
    # caches' flat views
    n = k.size
    k_cache.reshape(-1)[offset:offset + n] = k.reshape(-1)
    v_cache.reshape(-1)[offset:offset + n] = v.reshape(-1)
