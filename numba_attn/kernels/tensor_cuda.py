"""The small tensor steps of the forward pass on the GPU: token embedding, elementwise add (the
residual), splitting the fused q|k|v projection, and writing new keys and values into the KV
cache. Twin: tensor_cpu.py.

All four are memory-bound copies of a few KB per token: one thread per output element, a warp
reading and writing consecutive addresses. The embedding table may be stored in float32,
float16 or bfloat16 bits (uint16; a tied lm_head in half precision) and is widened to float32."""
from numba import cuda

from .util_cuda import flat, load, zero_offset

THREADS = 256      # threads per block (a multiple of 32)


@cuda.jit
def _embedding(out, table, tokens, hidden, vocab):
    # out: (seq * hidden,) float32; table: (vocab * hidden,); tokens: (seq,) int64.
    # Block (row, col): token row, columns col * THREADS ...; ids clipped to [0, vocab)
    row = cuda.blockIdx.x
    j = cuda.blockIdx.y * THREADS + cuda.threadIdx.x
    if j < hidden:                                   # bounds guard
        t = min(max(tokens[row], 0), vocab - 1)
        out[row * hidden + j] = load(table, t * hidden + j)   # int64 offsets


@cuda.jit
def _add(out, a, b, n):
    # out, a, b: (n,) float32; out = a + b (in place when out is a or b: one thread per element)
    i = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
    if i < n:                                        # bounds guard
        out[i] = a[i] + b[i]


@cuda.jit
def _split_qkv(q, k, v, qkv, nq, nk, total):
    # qkv: (seq * width,), width = nq + 2 * nk; q: (seq * nq,); k, v: (seq * nk,).
    # One thread per element of qkv, written to its block's buffer
    i = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
    if i < total:                                    # bounds guard
        width = nq + 2 * nk
        r = i // width
        c = i - r * width
        x = qkv[i]
        if c < nq:
            q[r * nq + c] = x
        elif c < nq + nk:
            k[r * nk + c - nq] = x
        else:
            v[r * nk + c - nq - nk] = x


@cuda.jit
def _append_kv(k_cache, v_cache, k, v, offset, at, row, n):
    # k, v: (n,) new rows, written at k_cache[o:o + n], v_cache[...] (float32 rounded into a
    # float16 cache), o = offset + at[0] * row (at: a position read on the device); one launch
    # for both, where numba's copy_to_device costs ~100 us of Python per copy
    i = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
    if i < n:                                        # bounds guard
        o = offset + at[0] * row
        k_cache[o + i] = k[i]
        v_cache[o + i] = v[i]


def _blocks(n):
    return (n + THREADS - 1) // THREADS


def embedding(out, table, tokens, *, stream=0):
    # out: (seq, hidden) float32; table: (vocab, hidden); tokens: (seq,) int64
    seq, hidden = out.shape
    if seq == 0 or hidden == 0:
        return
    _embedding[(seq, _blocks(hidden)), THREADS, stream](flat(out), flat(table), tokens,
                                                hidden, table.shape[0])


def add(out, a, b, *, stream=0):
    # out, a, b: (n,) float32
    n = out.shape[0]
    if n == 0:
        return
    _add[_blocks(n), THREADS, stream](out, a, b, n)


def split_qkv(q, k, v, qkv, *, stream=0):
    # qkv: (seq, nq + 2 * nk); q: (seq, nq); k, v: (seq, nk)
    total = qkv.shape[0] * qkv.shape[1]
    if total == 0:
        return
    _split_qkv[_blocks(total), THREADS, stream](flat(q), flat(k), flat(v),
                                        flat(qkv), q.shape[1], k.shape[1], total)


def append_kv(k_cache, v_cache, k, v, offset, *, at=None, row=0, stream=0):
    # k_cache, v_cache: C-contiguous caches; k, v: C-contiguous new rows, float32 or the caches'
    # dtype (rounded to nearest into a float16 cache); written from element offset + at[0] *
    # row of the caches' flat views (at: None, or an int64 device array holding a position: a
    # captured decode step's)
    n = k.size
    if n == 0:
        return
    _append_kv[_blocks(n), THREADS, stream](flat(k_cache), flat(v_cache), flat(k), flat(v),
                                            offset, zero_offset() if at is None else at,
                                            row, n)
