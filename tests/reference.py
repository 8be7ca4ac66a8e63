"""Float64 NumPy references for the kernel tests, written independently of numba_attn.

Plain functions on NumPy arrays; every result is float64. Where a formula has a canonical
source it is followed in that source's own form (Hugging Face transformers for RoPE and its
scalings, Meta's complex-number form for interleaved RoPE), not in the kernels' form, so that
the two implementations share as little as possible.

    from tests.reference import attention_ref, softmax_ref, rope_half_ref, ...
"""
import math

import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------- RoPE frequencies

def inv_freq_ref(head_dim, theta=10000.0):
    """transformers `_compute_default_rope_parameters`: 1 / theta^(arange(0, d, 2) / d), (d//2,)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim
    return 1.0 / (float(theta) ** exponents)


def inv_freq_linear_ref(head_dim, theta, factor):
    """transformers `_compute_linear_scaling_rope_parameters`: inv_freq / factor."""
    return inv_freq_ref(head_dim, theta) / float(factor)


def inv_freq_llama3_ref(head_dim, theta, factor, low_freq_factor, high_freq_factor,
                        original_max_position_embeddings):
    """transformers `_compute_llama3_parameters` (Llama 3.1), step by step as written there."""
    inv_freq = inv_freq_ref(head_dim, theta)
    old_context_len = float(original_max_position_embeddings)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # wavelen < high_freq_wavelen: unchanged; wavelen > low_freq_wavelen: divided by factor
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # in between: interpolate with a smooth factor
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def inv_freq_scaled_ref(head_dim, theta=10000.0, scaling=None):
    """Dispatch on a Hugging Face `rope_scaling` dict (key 'rope_type', or legacy 'type')."""
    if not scaling:
        return inv_freq_ref(head_dim, theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq_ref(head_dim, theta)
    if kind == "linear":
        return inv_freq_linear_ref(head_dim, theta, scaling["factor"])
    if kind == "llama3":
        return inv_freq_llama3_ref(head_dim, theta, scaling["factor"], scaling["low_freq_factor"],
                                   scaling["high_freq_factor"],
                                   scaling["original_max_position_embeddings"])
    raise ValueError(f"no reference for rope scaling {kind!r}")


def rope_cos_sin_ref(positions, inv_freq):
    """cos and sin of outer(positions, inv_freq), each (len(positions), d//2), float64."""
    angles = np.outer(_f64(positions), _f64(inv_freq))
    return np.cos(angles), np.sin(angles)


# ---------------------------------------------------------------------------- RoPE application

def rope_half_ref(x, inv_freq, start_pos=0):
    """Hugging Face `apply_rotary_pos_emb` with `rotate_half`: x * cos + rotate_half(x) * sin.

    x (..., seq, heads, d); token t sits at position start_pos + t; pairs (i, i + d/2)."""
    x = _f64(x)
    seq, d = x.shape[-3], x.shape[-1]
    freqs = np.outer(np.arange(start_pos, start_pos + seq, dtype=np.float64), _f64(inv_freq))
    emb = np.concatenate([freqs, freqs], axis=-1)           # (seq, d)
    cos = np.cos(emb)[:, None, :]                           # (seq, 1, d): broadcast over heads
    sin = np.sin(emb)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotate_half = np.concatenate([-x2, x1], axis=-1)
    return x * cos + rotate_half * sin


def rope_interleaved_ref(x, inv_freq, start_pos=0):
    """Meta's original Llama `apply_rotary_emb`: pairs (2i, 2i+1) as complex numbers, multiplied
    by exp(1j * position * inv_freq_i). x (..., seq, heads, d)."""
    x = _f64(x)
    seq = x.shape[-3]
    freqs = np.outer(np.arange(start_pos, start_pos + seq, dtype=np.float64), _f64(inv_freq))
    rot = np.exp(1j * freqs)[:, None, :]                    # (seq, 1, d//2)
    xc = x[..., 0::2] + 1j * x[..., 1::2]                   # (..., seq, heads, d//2)
    yc = xc * rot
    out = np.empty(x.shape, np.float64)
    out[..., 0::2] = yc.real
    out[..., 1::2] = yc.imag
    return out


# ---------------------------------------------------------------------------- dense layers

def linear_ref(x, w, bias=None):
    """x (..., in) @ w.T (w is (out, in)) + bias."""
    y = _f64(x) @ _f64(w).T
    if bias is not None:
        y = y + _f64(bias)
    return y


def rmsnorm_ref(x, weight, eps=1e-6):
    """x / sqrt(mean(x^2, last axis) + eps) * weight."""
    x = _f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * _f64(weight)


def silu_mul_ref(gate, up):
    """silu(gate) * up = gate * sigmoid(gate) * up (sigmoid written overflow-free)."""
    g = _f64(gate)
    sigmoid = np.where(g >= 0, 1.0 / (1.0 + np.exp(-np.abs(g))),
                       np.exp(-np.abs(g)) / (1.0 + np.exp(-np.abs(g))))
    return g * sigmoid * _f64(up)


# ---------------------------------------------------------------------------- masks and softmax

def causal_visible_ref(q_len, kv_len):
    """(q_len, kv_len) bool: query i (at position kv_len - q_len + i) sees key j iff j <= that."""
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    return j <= (kv_len - q_len) + i


def causal_mask_ref(q_len, kv_len):
    """The additive bottom-right causal mask, float64: 0 visible, -inf hidden."""
    return np.where(causal_visible_ref(q_len, kv_len), 0.0, -np.inf)


def softmax_ref(scores, scale=1.0, causal=True, mask=None):
    """Softmax over the last axis of scale * scores (..., q_len, kv_len) + mask, with the
    bottom-right causal rule. A row in which nothing is visible (every entry -inf) gives zeros."""
    s = _f64(scores) * float(scale)
    if mask is not None:
        s = s + _f64(mask)
    if causal:
        q_len, kv_len = s.shape[-2:]
        s = np.where(causal_visible_ref(q_len, kv_len), s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True) if s.shape[-1] else np.zeros(s.shape[:-1] + (1,))
    empty = ~np.isfinite(row_max)                          # a row with nothing visible
    safe_max = np.where(empty, 0.0, row_max)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - safe_max)
    e = np.where(empty, 0.0, e)
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


# ---------------------------------------------------------------------------- attention

def attention_ref(q, k, v, causal=True, scale=None):
    """softmax(scale * q k^T [causal, bottom-right]) v with grouped-query heads.

    q (..., q_len, H, d); k, v (..., kv_len, Hkv, d); query head h uses KV head h // (H // Hkv)
    (transformers' `repeat_kv`). Query i sits at position kv_len - q_len + i. A query that sees
    no key gives zeros."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    n_heads, d = q.shape[-2], q.shape[-1]
    n_kv_heads = k.shape[-2]
    assert n_heads % n_kv_heads == 0
    groups = n_heads // n_kv_heads
    k = np.repeat(k, groups, axis=-2)                       # (..., kv_len, H, d)
    v = np.repeat(v, groups, axis=-2)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scores = np.einsum("...qhd,...khd->...hqk", q, k)       # (..., H, q_len, kv_len)
    p = softmax_ref(scores, scale=scale, causal=causal)
    return np.einsum("...hqk,...khd->...qhd", p, v)        # (..., q_len, H, d)
