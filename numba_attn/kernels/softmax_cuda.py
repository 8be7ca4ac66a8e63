"""Masked softmax and the causal mask on the GPU. Twin: softmax_cpu.py.

Causal rule (bottom-right aligned): query row i of q_len sees key j iff j <= kv_len - q_len + i.
The rule is applied as a loop bound: no mask array is built or read for it.

masked_softmax: one block per row of scores. Rows of up to ROW_CHUNKS * 8 * MAX_THREADS keys
(8192) stay in registers, ROW_CHUNKS chunks of 8 per thread: load, block max, exp and block sum,
store; each score is read once and exp taken once. Longer rows take two passes: pass 1 keeps a
running (max, sum of exp) per thread and merges them across the block; pass 2 reads the row
again (an L2 hit) and writes exp(s - max) / sum. The hidden keys of a causal row are never read,
only written as zeros. Safe in place (out is scores): every read of a row happens before the
block barrier of its first reduction, and each element is written by the thread that read it."""
import functools
import math

import numpy as np
from numba import cuda

from .scalar import FASTMATH_INF
from .util_cuda import (CHUNK, SIM, device, flat, float32, load8, load8_tail, scratch_size,
                        shfl_xor, store8, wide_ok)

MAX_THREADS = 256          # softmax threads per block (a power of two, 32..1024)
MAX_WARPS = MAX_THREADS // 32
ROW_CHUNKS = 4 if not SIM else 1   # chunks of 8 per thread of a row held in registers (the
                                   # kernel holds 4; the simulator takes the long path sooner)
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


@device
def _chunk_scores(sc, scores, mask, start, mrow, j0, n_vis, kv_len, scale, has_mask, wide):
    # sc[0:8] = scale * scores + mask for keys j0..j0+7 of a row (-inf where hidden, none read
    # past n_vis); returns their maximum
    if j0 < n_vis:
        if wide and j0 + CHUNK <= kv_len:
            v = load8(scores, start + j0, start + kv_len)
        else:
            v = load8_tail(scores, start + j0, start + kv_len)
        mk = (float32(0), float32(0), float32(0), float32(0), float32(0), float32(0),
              float32(0), float32(0))
        if has_mask:
            if wide and j0 + CHUNK <= kv_len:
                mk = load8(mask, mrow + j0, mrow + kv_len)
            else:
                mk = load8_tail(mask, mrow + j0, mrow + kv_len)
        cm = NEG_INF
        for c in range(CHUNK):
            sc[c] = NEG_INF
            if j0 + c < n_vis:
                sc[c] = v[c] * scale
                if has_mask:
                    sc[c] += mk[c]
            cm = max(cm, sc[c])
        return cm
    for c in range(CHUNK):
        sc[c] = NEG_INF
    return NEG_INF


@device
def _chunk_exp(sc, m):
    # sc[c] = exp(sc[c] - m) in place (0 where sc is -inf or m is -inf); returns their sum
    t = float32(0)
    for c in range(CHUNK):
        e = float32(0)
        if m > NEG_INF:
            e = math.exp(sc[c] - m)
        sc[c] = e
        t += e
    return t


@device
def _chunk_store(out, sc, start, j0, kv_len, inv, wide):
    # out[start + j0 : + 8] = sc * inv (the part inside the row)
    if j0 >= kv_len:
        return
    if wide and j0 + CHUNK <= kv_len:
        store8(out, start + j0, (sc[0] * inv, sc[1] * inv, sc[2] * inv, sc[3] * inv,
                                 sc[4] * inv, sc[5] * inv, sc[6] * inv, sc[7] * inv))
    else:
        for c in range(CHUNK):
            if j0 + c < kv_len:
                out[start + j0 + c] = sc[c] * inv


@device
def _block_reduce(v, is_max, sm, scratch, tid, nthreads):
    # max (is_max) or sum of v over the block; every thread calls it and gets the result
    off = 16
    while off > 0:
        o = shfl_xor(v, off, scratch, tid)
        v = max(v, o) if is_max else v + o
        off //= 2
    cuda.syncthreads()          # sm is free: the previous reduction's reads are done
    if tid % 32 == 0:
        sm[tid // 32] = v
    cuda.syncthreads()          # every warp's value is in shared memory
    v = sm[0]
    for w in range(1, nthreads // 32):
        v = max(v, sm[w]) if is_max else v + sm[w]
    return v


@functools.cache
def softmax_rows_kernel(wide):
    """masked_softmax for rows of at most ROW_CHUNKS * 8 * blockDim.x keys, held in registers:
    each score is read once, and exp is taken once."""

    @cuda.jit(fastmath=FASTMATH_INF)
    def softmax_rows(out, scores, mask, scale, causal, q_len, kv_len):
        # as masked_softmax; thread t holds chunks t, t + nthreads, ... (ROW_CHUNKS of them)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        row = cuda.blockIdx.x
        i = row % q_len
        start = row * kv_len
        has_mask = mask.shape[0] > 0
        mrow = i * kv_len
        n_vis = kv_len
        if causal:
            n_vis = min(kv_len, max(0, kv_len - q_len + i + 1))
        sm = cuda.shared.array(MAX_WARPS, float32)
        scratch = cuda.shared.array(SCRATCH, float32)
        s0 = cuda.local.array(CHUNK, float32)
        s1 = cuda.local.array(CHUNK, float32)
        s2 = cuda.local.array(CHUNK, float32)
        s3 = cuda.local.array(CHUNK, float32)
        step = nthreads * CHUNK
        j0 = tid * CHUNK
        # the scores (all loads issued before the math), their maximum
        m = _chunk_scores(s0, scores, mask, start, mrow, j0, n_vis, kv_len, scale, has_mask,
                          wide)
        m = max(m, _chunk_scores(s1, scores, mask, start, mrow, j0 + step, n_vis, kv_len,
                                 scale, has_mask, wide))
        m = max(m, _chunk_scores(s2, scores, mask, start, mrow, j0 + 2 * step, n_vis, kv_len,
                                 scale, has_mask, wide))
        m = max(m, _chunk_scores(s3, scores, mask, start, mrow, j0 + 3 * step, n_vis, kv_len,
                                 scale, has_mask, wide))
        m = _block_reduce(m, True, sm, scratch, tid, nthreads)
        # exp(s - max) kept in registers, their sum
        t = (_chunk_exp(s0, m) + _chunk_exp(s1, m)) + (_chunk_exp(s2, m) + _chunk_exp(s3, m))
        t = _block_reduce(t, False, sm, scratch, tid, nthreads)
        inv = float32(1) / t if t > float32(0) else float32(0)
        _chunk_store(out, s0, start, j0, kv_len, inv, wide)
        _chunk_store(out, s1, start, j0 + step, kv_len, inv, wide)
        _chunk_store(out, s2, start, j0 + 2 * step, kv_len, inv, wide)
        _chunk_store(out, s3, start, j0 + 3 * step, kv_len, inv, wide)

    return softmax_rows


@cuda.jit
def _fill_causal_mask(out, q_len, kv_len):
    # out: (q_len * kv_len,); one thread per element
    e = cuda.grid(1)
    if e >= q_len * kv_len:                          # bounds guard
        return
    i = e // kv_len
    j = e - i * kv_len
    out[e] = float32(0) if j <= kv_len - q_len + i else NEG_INF


def masked_softmax(out, scores, mask, scale, causal):
    # scores, out: (b, q, kv); mask: (q, kv) additive or (0, 0) for none
    b, q, kv = scores.shape
    if b * q == 0 or kv == 0:
        return
    wide = wide_ok(scores, kv) and wide_ok(out, kv) and (mask.shape[0] == 0
                                                         or wide_ok(mask, kv))
    threads = 32                     # ROW_CHUNKS chunks of 8 per thread, 32..MAX_THREADS
    while threads < MAX_THREADS and threads * CHUNK * ROW_CHUNKS < kv:
        threads *= 2
    kernel = softmax_rows_kernel if kv <= threads * CHUNK * ROW_CHUNKS else masked_softmax_kernel
    kernel(wide)[b * q, threads](flat(out), flat(scores), flat(mask),
                                 float32(scale), bool(causal), q, kv)


def fill_causal_mask(out):
    # out: (q, kv) float32
    q, kv = out.shape
    if q * kv == 0:
        return
    _fill_causal_mask[(q * kv + MASK_THREADS - 1) // MASK_THREADS, MASK_THREADS](
        flat(out), q, kv)


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
