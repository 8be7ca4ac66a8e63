"""Fused causal attention with grouped-query heads on the CPU, flash-style: an online softmax
over blocks of keys, so neither the score matrix nor a mask is ever materialised.
Twin: attention_cuda.py.

Two schedules, same arithmetic:
- prefill (many queries): a task is a tile of query rows (positions x the query heads of one KV
  head) against all the keys it may see; the tile products run in BLAS (np.dot).
- decode (a few queries): a task is a range of keys for every head at once, so K and V are
  streamed from memory once, row by row; the ranges' partial results are merged at the end
  (flash-decoding)."""
import ctypes
import glob
import os

import numpy as np
from numba import float32, get_num_threads, njit, prange

from . import cpu_pool
from .scalar import FASTMATH_INF, dots_4x1, dots_4x2, exp_f32, row_max

BLOCK_ROWS = 64        # prefill: query rows per tile (positions x grouped heads)
BLOCK_K = 64           # keys per block of the online softmax
DECODE_MAX_Q = 4       # at most this many queries take the decode schedule
MIN_SPLIT_KEYS = 256   # decode: a key range is never shorter than this


def _single_threaded_jit_blas():
    """np.dot inside jitted code calls SciPy's OpenBLAS. Our tasks already run on every core, so
    that BLAS must not start threads of its own (they would oversubscribe the cores several
    times over). SciPy's OpenBLAS is a library separate from NumPy's: NumPy keeps its threads."""
    import scipy
    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs", "libscipy_openblas*.so"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                break


_single_threaded_jit_blas()


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _online_softmax_block(S, P, m_run, l_run, alpha, rows, nk, n_vis):
    # S, P: (rows, nk) scores / probabilities; m_run, l_run, alpha: (rows,) running max, running
    # sum, and this block's rescale factor. n_vis[r]: keys of the block row r sees (a prefix).
    for r in range(rows):
        m_new = row_max(S, r, n_vis[r], m_run[r])
        if m_new == -np.inf:  # nothing seen yet
            alpha[r] = float32(1)
            for j in range(nk):
                P[r, j] = float32(0)
            continue
        total = float32(0)
        for j in range(n_vis[r]):
            p = exp_f32(S[r, j] - m_new)
            P[r, j] = p
            total += p
        for j in range(n_vis[r], nk):
            P[r, j] = float32(0)
        alpha[r] = exp_f32(m_run[r] - m_new)
        l_run[r] = l_run[r] * alpha[r] + total
        m_run[r] = m_new


@njit(fastmath=FASTMATH_INF, cache=True)
def _prefill_tile(out, q, k, v, scale, causal, z, hk, q0, nq, Qs, O, Ks, Vs, St, Pt, PVt,
                  m_run, l_run, alpha, n_vis):
    # one tile: queries q0..q0+nq-1 of the G heads sharing KV head hk, against every key they
    # see. Qs, O: (rows, d); Ks, Vs: (BLOCK_K, d); St, Pt: (rows * BLOCK_K,); PVt: (rows * d,)
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = nq * G                                  # row r = (position q0 + r // G, head r % G)
    for r in range(rows):
        for c in range(d):
            Qs[r, c] = q[z, q0 + r // G, hk * G + r % G, c] * scale
            O[r, c] = float32(0)
        m_run[r] = -np.inf
        l_run[r] = float32(0)

    # keys up to the last one the tile's last query sees
    k_end = min(kv_len, max(0, kv_len - q_len + q0 + nq)) if causal else kv_len
    for k0 in range(0, k_end, BLOCK_K):
        nk = min(BLOCK_K, k_end - k0)
        # causal: the tile's rows before r0 see none of these keys; they are skipped (their
        # running max, sum and output are untouched), so a tall tile wastes no work
        r0 = min(rows, max(0, (k0 - (kv_len - q_len) - q0) * G)) if causal else 0
        nr = rows - r0
        S = St[:nr * nk].reshape((nr, nk))
        P = Pt[:nr * nk].reshape((nr, nk))
        PV = PVt[:nr * d].reshape((nr, d))
        for j in range(nk):
            for c in range(d):
                Ks[j, c] = k[z, k0 + j, hk, c]
                Vs[j, c] = v[z, k0 + j, hk, c]
        for r in range(nr):
            n_vis[r] = min(nk, max(0, kv_len - q_len + q0 + (r0 + r) // G + 1 - k0)) \
                if causal else nk
        np.dot(Qs[r0:], Ks[:nk].T, S)                             # (nr, nk)
        _online_softmax_block(S, P, m_run[r0:], l_run[r0:], alpha, nr, nk, n_vis)
        np.dot(P, Vs[:nk], PV)                                    # (nr, d)
        for r in range(nr):
            for c in range(d):
                O[r0 + r, c] = O[r0 + r, c] * alpha[r] + PV[r, c]

    for r in range(rows):
        inv = float32(1) / l_run[r] if l_run[r] > 0 else float32(0)
        for c in range(d):
            out[z, q0 + r // G, hk * G + r % G, c] = O[r, c] * inv


@njit(parallel=True, cache=True)
def _attention_prefill(out, q, k, v, scale, causal, n_workers):
    # q, out: (b, q_len, H, d); k, v: (b, kv_len, Hkv, d)
    B, q_len, H, d = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    bq = max(1, BLOCK_ROWS // G)                  # query positions per tile
    n_qblk = (q_len + bq - 1) // bq
    rows = bq * G
    n_tasks = B * Hkv * n_qblk

    # per-worker scratch, allocated once per call
    Qt = np.empty((n_workers, rows, d), np.float32)
    Ot = np.empty((n_workers, rows, d), np.float32)
    Kt = np.empty((n_workers, BLOCK_K, d), np.float32)
    Vt = np.empty((n_workers, BLOCK_K, d), np.float32)
    St = np.empty((n_workers, rows * BLOCK_K), np.float32)
    Pt = np.empty((n_workers, rows * BLOCK_K), np.float32)
    PVt = np.empty((n_workers, rows * d), np.float32)
    Mt = np.empty((n_workers, rows), np.float32)
    Lt = np.empty((n_workers, rows), np.float32)
    At = np.empty((n_workers, rows), np.float32)
    Vis = np.empty((n_workers, rows), np.int64)

    # worker w takes tasks w, w + n_workers, ...: interleaved, so causal tiles of unequal cost
    # spread evenly, and each worker owns its scratch
    for w in prange(n_workers):
        for task in range(w, n_tasks, n_workers):
            qb = task % n_qblk
            hk = (task // n_qblk) % Hkv
            z = task // (n_qblk * Hkv)
            nq = min(bq, q_len - qb * bq)
            _prefill_tile(out, q, k, v, float32(scale), causal, z, hk, qb * bq, nq,
                          Qt[w, :nq * G], Ot[w, :nq * G], Kt[w], Vt[w], St[w], Pt[w], PVt[w],
                          Mt[w, :nq * G], Lt[w, :nq * G], At[w, :nq * G], Vis[w, :nq * G])


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _dots(S, j, Qs, r0, n, key):
    # S[r0 + i, j] = Qs[r0 + i] . key for i < n; four rows per pass over key (d,)
    i = 0
    while i + 4 <= n:
        r = r0 + i
        S[r, j], S[r + 1, j], S[r + 2, j], S[r + 3, j] = dots_4x1(Qs[r], Qs[r + 1], Qs[r + 2],
                                                                  Qs[r + 3], key)
        i += 4
    for r in range(r0 + i, r0 + n):
        acc = float32(0)
        for c in range(key.shape[0]):
            acc += Qs[r, c] * key[c]
        S[r, j] = acc


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _axpys(O, r0, n, P, j, value):
    # O[r0 + i] += P[r0 + i, j] * value for i < n; four rows per pass over value (d,)
    d = value.shape[0]
    i = 0
    while i + 4 <= n:
        p0, p1, p2, p3 = P[r0 + i, j], P[r0 + i + 1, j], P[r0 + i + 2, j], P[r0 + i + 3, j]
        for c in range(d):
            vc = value[c]
            O[r0 + i, c] += p0 * vc
            O[r0 + i + 1, c] += p1 * vc
            O[r0 + i + 2, c] += p2 * vc
            O[r0 + i + 3, c] += p3 * vc
        i += 4
    for r in range(r0 + i, r0 + n):
        p = P[r, j]
        for c in range(d):
            O[r, c] += p * value[c]


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _dots2(S, j, Qs, r0, n, key0, key1):
    # S[r0 + i, j] = Qs[r0 + i] . key0 and S[r0 + i, j + 1] = Qs[r0 + i] . key1 for i < n:
    # two keys per pass over the query rows, so each query element loaded serves both
    i = 0
    while i + 4 <= n:
        r = r0 + i
        (S[r, j], S[r + 1, j], S[r + 2, j], S[r + 3, j], S[r, j + 1], S[r + 1, j + 1],
         S[r + 2, j + 1], S[r + 3, j + 1]) = dots_4x2(Qs[r], Qs[r + 1], Qs[r + 2], Qs[r + 3],
                                                       key0, key1)
        i += 4
    for r in range(r0 + i, r0 + n):
        a = float32(0)
        b = float32(0)
        for c in range(key0.shape[0]):
            a += Qs[r, c] * key0[c]
            b += Qs[r, c] * key1[c]
        S[r, j] = a
        S[r, j + 1] = b


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def _axpys2(O, r0, n, P, j, value0, value1):
    # O[r0 + i] += P[r0 + i, j] * value0 + P[r0 + i, j + 1] * value1 for i < n: two keys per
    # pass, so each O element is loaded and stored once for both
    d = value0.shape[0]
    for r in range(r0, r0 + n):
        p0, p1 = P[r, j], P[r, j + 1]
        for c in range(d):
            O[r, c] += p0 * value0[c] + p1 * value1[c]


@njit(fastmath=FASTMATH_INF, cache=True)
def _decode_range(q, k, v, scale, causal, z, k_lo, k_hi, Qs, S, P, alpha, n_vis, O, m_run, l_run):
    # every query row against keys k_lo..k_hi-1 of batch z: O (rows, d) unnormalised, with the
    # running max m_run and sum l_run (rows,). Qs: (rows, d); S, P: (rows, BLOCK_K)
    q_len, H, d = q.shape[1], q.shape[2], q.shape[3]
    kv_len, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = q_len * H                               # row r = (position r // H, head r % H)
    for r in range(rows):
        for c in range(d):
            Qs[r, c] = q[z, r // H, r % H, c] * scale
            O[r, c] = float32(0)
        m_run[r] = -np.inf
        l_run[r] = float32(0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        nk = min(BLOCK_K, k_hi - k0)
        for r in range(rows):
            n_vis[r] = min(nk, max(0, kv_len - q_len + r // H + 1 - k0)) if causal else nk
        # scores: each key row (all KV heads, contiguous) is read once, two rows at a time
        for j in range(0, nk - 1, 2):
            for hk in range(Hkv):
                for t in range(q_len):
                    _dots2(S, j, Qs, t * H + hk * G, G, k[z, k0 + j, hk], k[z, k0 + j + 1, hk])
        if nk % 2:
            for hk in range(Hkv):
                for t in range(q_len):
                    _dots(S, nk - 1, Qs, t * H + hk * G, G, k[z, k0 + nk - 1, hk])
        _online_softmax_block(S, P, m_run, l_run, alpha, rows, nk, n_vis)
        for r in range(rows):
            for c in range(d):
                O[r, c] *= alpha[r]
        for j in range(0, nk - 1, 2):
            for hk in range(Hkv):
                for t in range(q_len):
                    _axpys2(O, t * H + hk * G, G, P, j, v[z, k0 + j, hk], v[z, k0 + j + 1, hk])
        if nk % 2:
            for hk in range(Hkv):
                for t in range(q_len):
                    _axpys(O, t * H + hk * G, G, P, nk - 1, v[z, k0 + nk - 1, hk])


@njit(parallel=True, fastmath=FASTMATH_INF, cache=True)
def _attention_decode(out, q, k, v, scale, causal, n_workers):
    # q, out: (b, q_len, H, d) with small q_len; k, v: (b, kv_len, Hkv, d)
    B, q_len, H, d = q.shape
    kv_len = k.shape[1]
    rows = q_len * H
    n_split = max(1, min((2 * n_workers + B - 1) // B, kv_len // MIN_SPLIT_KEYS))
    split_len = ((kv_len + n_split - 1) // n_split + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    n_split = max(1, (kv_len + split_len - 1) // split_len)
    n_tasks = B * n_split

    Qt = np.empty((n_workers, rows, d), np.float32)
    St = np.empty((n_workers, rows, BLOCK_K), np.float32)
    Pt = np.empty((n_workers, rows, BLOCK_K), np.float32)
    At = np.empty((n_workers, rows), np.float32)
    Vis = np.empty((n_workers, rows), np.int64)
    # each key range's partial result: unnormalised output, running max and sum
    O_part = np.empty((n_tasks, rows, d), np.float32)
    M_part = np.empty((n_tasks, rows), np.float32)
    L_part = np.empty((n_tasks, rows), np.float32)

    for w in prange(n_workers):
        for task in range(w, n_tasks, n_workers):
            z, split = task // n_split, task % n_split
            _decode_range(q, k, v, float32(scale), causal, z, split * split_len,
                          min(kv_len, (split + 1) * split_len), Qt[w], St[w], Pt[w], At[w],
                          Vis[w], O_part[task], M_part[task], L_part[task])

    # merge the key ranges: rescale each partial to the common maximum
    for zr in prange(B * rows):
        z, r = zr // rows, zr % rows
        t, h = r // H, r % H
        m = float32(-np.inf)
        for s in range(n_split):
            m = max(m, M_part[z * n_split + s, r])
        for c in range(d):
            out[z, t, h, c] = float32(0)
        if m == -np.inf:  # saw no key
            continue
        total = float32(0)
        for s in range(n_split):
            task = z * n_split + s
            wgt = exp_f32(M_part[task, r] - m)
            total += L_part[task, r] * wgt
            for c in range(d):
                out[z, t, h, c] += O_part[task, r, c] * wgt
        inv = float32(1) / total
        for c in range(d):
            out[z, t, h, c] *= inv


def attention(out, q, k, v, scale, causal):
    # q, out: (b, q_len, H, d); k, v: (b, kv_len, Hkv, d)
    B, q_len, H, d = q.shape
    work = B * q_len * H * k.shape[1] * d      # multiply-adds of q k^T (at most)
    schedule = _attention_decode if q_len <= DECODE_MAX_Q else _attention_prefill
    n_workers = get_num_threads() if work >= cpu_pool.PARALLEL_MIN_WORK else 1
    cpu_pool.run(schedule, work, out, q, k, v, scale, causal, n_workers)
