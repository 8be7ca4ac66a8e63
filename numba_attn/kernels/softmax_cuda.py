"""Masked softmax and the causal mask on the GPU. Twin: softmax_cpu.py.

Causal rule (bottom-right aligned): query row i of q_len sees key j iff j <= kv_len - q_len + i.
The rule is applied as a loop bound: no mask array is built or read for it.

masked_softmax: one block per row of scores. Pass 1 keeps a running (max, sum of exp) per
thread over chunks of 8 keys and merges them across the block; pass 2 reads the row again (an
L1/L2 hit) and writes exp(s - max) / sum. The hidden keys of a causal row are never read, only
written as zeros. Safe in place (out is scores): pass 2 starts after the block barrier that
ends pass 1, and each element is read and written by the same thread."""
import functools
import math

import numpy as np
from numba import cuda

from .scalar import FASTMATH_INF
from .util_cuda import (CHUNK, device, float32, load8, load8_tail, scratch_size, shfl_xor,
                        store8, wide_ok)

MAX_THREADS = 256          # softmax threads per block (a power of two, 32..1024)
MAX_WARPS = MAX_THREADS // 32
MASK_THREADS = 256         # fill_causal_mask threads per block
SCRATCH = scratch_size(MAX_THREADS)
NEG_INF = float32(-math.inf)


@device
def merge(m, l, m_o, l_o):
    # merge two (max, sum of exp(s - max)) pairs; a max of -inf means "nothing seen"
    m_n = max(m, m_o)
    if m_n == NEG_INF:
        return m_n, float32(0)
    return m_n, l * math.exp(m - m_n) + l_o * math.exp(m_o - m_n)


@functools.cache
def masked_softmax_kernel(wide):
    """The masked_softmax kernel; wide: rows allow 16-byte loads (kv % 8 == 0, aligned)."""

    @cuda.jit(fastmath=FASTMATH_INF)
    def masked_softmax(out, scores, mask, scale, causal, q_len, kv_len):
        # scores, out: (rows * kv_len,), row = (batch, i); mask: (q_len * kv_len,) or (0,)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        row = cuda.blockIdx.x
        i = row % q_len
        start = row * kv_len                         # int64 offsets
        end = start + kv_len
        has_mask = mask.shape[0] > 0
        mrow = i * kv_len
        n_vis = kv_len
        if causal:
            n_vis = min(kv_len, max(0, kv_len - q_len + i + 1))
        m_sh = cuda.shared.array(MAX_WARPS, float32)
        l_sh = cuda.shared.array(MAX_WARPS, float32)
        scratch = cuda.shared.array(SCRATCH, float32)

        # pass 1: running max m and sum l of exp(s - m) over this thread's chunks
        m = NEG_INF
        l = float32(0)
        for j0 in range(tid * CHUNK, n_vis, nthreads * CHUNK):
            if wide and j0 + CHUNK <= kv_len:
                v = load8(scores, start + j0, end)
            else:
                v = load8_tail(scores, start + j0, end)
            s = cuda.local.array(CHUNK, float32)
            cm = NEG_INF
            for c in range(CHUNK):
                s[c] = NEG_INF
                if j0 + c < n_vis:
                    s[c] = v[c] * scale
                    if has_mask:
                        s[c] += mask[mrow + j0 + c]
                cm = max(cm, s[c])
            if cm > NEG_INF:
                m_n = max(m, cm)
                acc = float32(0)
                for c in range(CHUNK):
                    acc += math.exp(s[c] - m_n)
                l = l * math.exp(m - m_n) + acc
                m = m_n

        # merge across the warp (butterfly: every lane ends with the warp's pair) ...
        off = 16
        while off > 0:
            m, l = merge(m, l, shfl_xor(m, off, scratch, tid), shfl_xor(l, off, scratch, tid))
            off //= 2
        if tid % 32 == 0:
            m_sh[tid // 32] = m
            l_sh[tid // 32] = l
        cuda.syncthreads()      # every warp's pair is in shared memory; pass 1 reads are done
        # ... then across the warps, each thread for itself
        m = NEG_INF
        l = float32(0)
        for w in range(nthreads // 32):
            m, l = merge(m, l, m_sh[w], l_sh[w])
        inv = float32(1) / l if l > float32(0) else float32(0)

        # pass 2: probabilities for the visible keys, zeros for the hidden ones (not read)
        for j0 in range(tid * CHUNK, kv_len, nthreads * CHUNK):
            full = wide and j0 + CHUNK <= kv_len
            p = cuda.local.array(CHUNK, float32)
            for c in range(CHUNK):
                p[c] = float32(0)
            if j0 < n_vis and inv > float32(0):
                if full:
                    v = load8(scores, start + j0, end)
                else:
                    v = load8_tail(scores, start + j0, end)
                for c in range(CHUNK):
                    if j0 + c < n_vis:
                        e = v[c] * scale
                        if has_mask:
                            e += mask[mrow + j0 + c]
                        p[c] = math.exp(e - m) * inv
            if full:
                store8(out, start + j0, (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]))
            else:
                for c in range(CHUNK):
                    if j0 + c < kv_len:
                        out[start + j0 + c] = p[c]

    return masked_softmax


@cuda.jit
def _fill_causal_mask(out, q_len, kv_len):
    # out: (q_len * kv_len,); one thread per element
    e = cuda.grid(1)
    if e >= q_len * kv_len:                          # bounds guard
        return
    i = e // kv_len
    j = e - i * kv_len
    out[e] = float32(0) if j <= kv_len - q_len + i else NEG_INF


def _threads_for(n):
    # enough threads for one chunk of 8 each, a power of two in [32, MAX_THREADS]
    t = 32
    while t < MAX_THREADS and t * CHUNK < n:
        t *= 2
    return t


def masked_softmax(out, scores, mask, scale, causal):
    # scores, out: (b, q, kv); mask: (q, kv) additive or (0, 0) for none
    b, q, kv = scores.shape
    if b * q == 0 or kv == 0:
        return
    wide = wide_ok(scores, kv) and wide_ok(out, kv)
    masked_softmax_kernel(wide)[b * q, _threads_for(kv)](
        out.reshape(-1), scores.reshape(-1), mask.reshape(-1), float32(scale), bool(causal),
        q, kv)


def fill_causal_mask(out):
    # out: (q, kv) float32
    q, kv = out.shape
    if q * kv == 0:
        return
    _fill_causal_mask[(q * kv + MASK_THREADS - 1) // MASK_THREADS, MASK_THREADS](
        out.reshape(-1), q, kv)


@cuda.jit
def _broadcast_copy(out, mask):
    # out: (q, kv); mask: (r, c) with r in {1, q} and c in {1, kv}; one thread per element
    i, j = cuda.grid(2)
    if i >= out.shape[0] or j >= out.shape[1]:       # bounds guard
        return
    out[i, j] = mask[i if mask.shape[0] > 1 else 0, j if mask.shape[1] > 1 else 0]


def broadcast_mask(mask, q_len, kv_len):
    # a contiguous (q_len, kv_len) device copy of an additive mask broadcastable to it (the
    # mask itself when it already is one)
    if tuple(mask.shape) == (q_len, kv_len) and mask.is_c_contiguous():
        return mask
    m2 = mask.reshape((1,) * (2 - len(mask.shape)) + tuple(mask.shape))
    out = cuda.device_array((q_len, kv_len), dtype=np.float32)
    _broadcast_copy[((q_len + 15) // 16, (kv_len + 15) // 16), (16, 16)](out, m2)
    return out
