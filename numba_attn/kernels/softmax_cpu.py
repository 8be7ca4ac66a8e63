"""Masked softmax and the causal mask on the CPU. Twin: softmax_cuda.py.

Causal rule (bottom-right aligned): query row i of q_len sees key j iff j <= kv_len - q_len + i.
The rule is applied inside the loop bounds: no mask array is built or read for it."""
import numpy as np
from numba import float32, njit, prange

from . import cpu_pool
from .scalar import FASTMATH_INF, exp_f32, row_max
from .cpu_pool import PRANGE


@njit(parallel=PRANGE, fastmath=FASTMATH_INF, cache=True)
def _masked_softmax(out, scores, mask, scale, causal):
    # scores, out: (b, q, kv); mask: (q, kv) additive (may be a broadcast view) or (0, 0).
    # out may be scores (in place).
    b, q, kv = scores.shape
    has_mask = mask.shape[0] > 0
    scale = float32(scale)
    for row in prange(b * q):
        z, i = row // q, row % q
        # keys visible under the causal rule: [0, n_vis)
        n_vis = min(kv, max(0, kv - q + i + 1)) if causal else kv
        if has_mask:
            for j in range(n_vis):
                out[z, i, j] = scale * scores[z, i, j] + mask[i, j]
        else:
            for j in range(n_vis):
                out[z, i, j] = scale * scores[z, i, j]
        m = row_max(out[z], i, n_vis, float32(-np.inf))
        if m == -np.inf:  # nothing visible: zeros, never NaN
            for j in range(kv):
                out[z, i, j] = float32(0)
            continue
        total = float32(0)
        for j in range(n_vis):
            e = exp_f32(out[z, i, j] - m)
            out[z, i, j] = e
            total += e
        inv = float32(1) / total
        for j in range(n_vis):
            out[z, i, j] *= inv
        for j in range(n_vis, kv):
            out[z, i, j] = float32(0)


def masked_softmax(out, scores, mask, scale, causal):
    # scores, out: (b, q, kv); mask: (q, kv) or (0, 0)
    cpu_pool.run(_masked_softmax, scores.size, out, scores, mask, scale, causal)


@njit(parallel=PRANGE, cache=True)
def fill_causal_mask(out):
    # out: (q, kv) float32; 0 where key j is visible to query i, -inf elsewhere
    q, kv = out.shape
    for i in prange(q):
        n_vis = min(kv, max(0, kv - q + i + 1))
        for j in range(n_vis):
            out[i, j] = float32(0)
        for j in range(n_vis, kv):
            out[i, j] = -np.inf


def broadcast_mask(mask, q_len, kv_len):
    # a (q_len, kv_len) view of an additive mask broadcastable to it (no copy)
    return np.broadcast_to(mask, (q_len, kv_len))
