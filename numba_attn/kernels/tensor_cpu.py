"""The small tensor steps of the forward pass on the CPU: token embedding, elementwise add (the
residual), splitting the fused q|k|v projection, and writing new keys and values into the KV
cache. Twin: tensor_cuda.py.

Each is one NumPy call (a gather or a copy as fast as memory allows, no thread pool to wake),
but splitting a large prefill's q|k|v rows, which copies on both cores (compiled on first
use, so only models that large pay its compile)."""
import numpy as np
from numba import njit, prange

from ..formats import Int8KV, quantize_kv_row
from .cpu_pool import PRANGE

SPLIT_PARALLEL_MIN = 1 << 20  # elements of qkv from which split_qkv copies on every core


def embedding(out, table, tokens):
    # out: (seq, hidden) float32; table: (vocab, hidden); tokens: (seq,) int64, clipped to
    # [0, vocab) (the caller checks them first)
    np.take(table, tokens, axis=0, out=out, mode="clip")


def add(out, a, b):
    # out, a, b: (n,) float32; out = a + b, in place when out is a or b
    np.add(a, b, out=out)


@njit(parallel=PRANGE, cache=True)
def _split_rows(q, k, v, qkv):
    # each row of qkv's three column blocks into q, k, v
    nq, nk = q.shape[1], k.shape[1]
    for i in prange(qkv.shape[0]):
        q[i] = qkv[i, :nq]
        k[i] = qkv[i, nq:nq + nk]
        v[i] = qkv[i, nq + nk:]


def split_qkv(q, k, v, qkv):
    # qkv: (seq, nq + 2 * nk); q: (seq, nq); k, v: (seq, nk), all C-contiguous. 512x2560 on 2
    # cores: 0.53-0.68 ms in rows on both, 0.98-1.00 for NumPy's three copies
    if qkv.size >= SPLIT_PARALLEL_MIN:
        _split_rows(q, k, v, qkv)
        return
    nq, nk = q.shape[1], k.shape[1]
    np.copyto(q, qkv[:, :nq])
    np.copyto(k, qkv[:, nq:nq + nk])
    np.copyto(v, qkv[:, nq + nk:])


@njit(cache=True)
def _append_int8(k_codes, k_scales, v_codes, v_scales, k, v, row0):
    # rows k, v (n, d) float32 quantized into rows row0.. of codes (rows, d), scales (rows,)
    for i in range(k.shape[0]):
        k_scales[row0 + i] = quantize_kv_row(k_codes[row0 + i], k[i])
        v_scales[row0 + i] = quantize_kv_row(v_codes[row0 + i], v[i])


def append_kv(k_cache, v_cache, k, v, offset):
    # k_cache, v_cache: C-contiguous caches (arrays, or formats.Int8KV); k, v: new rows,
    # float32 or the caches' float dtype (rounded to nearest even into a 16-bit cache,
    # quantized into an 8-bit one); written from element offset of the caches' flat views
    if isinstance(k_cache, Int8KV):
        d = k.shape[-1]
        _append_int8(*k_cache.rows(), *v_cache.rows(), k.reshape(-1, d), v.reshape(-1, d),
                     offset // d)
        return
    n = k.size
    k_cache.reshape(-1)[offset:offset + n] = k.reshape(-1)
    v_cache.reshape(-1)[offset:offset + n] = v.reshape(-1)
