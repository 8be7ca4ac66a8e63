"""RoPE cos/sin tables, computed once in float64 and stored as float32."""
import math

import numpy as np

from . import checks
from .backend import device_id

ROPE_SCALING_TYPES = ("llama3", "linear", "freq_factors")


def _scaled_inv_freq(inv_freq, scaling):
    """Apply a Hugging Face `rope_scaling` dict to the inverse frequencies (d//2,)."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: "
                         f"{', '.join(ROPE_SCALING_TYPES)}")
    if kind == "freq_factors":   # GGUF's rope_freqs: each frequency divided by its own factor
        factors = np.asarray(scaling.get("factors", ()), np.float64)
        if factors.shape != inv_freq.shape or not (factors > 0).all():
            raise ValueError(f"rope scaling 'freq_factors' needs {inv_freq.shape[0]} positive "
                             f"factors, got {factors.shape[0]}")
        return inv_freq / factors
    try:
        factor = float(scaling["factor"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"rope scaling {kind!r} needs a numeric 'factor', got {scaling!r}") from None
    if factor <= 0:
        raise ValueError(f"rope scaling factor must be positive, got {factor}")
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    try:
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"rope scaling 'llama3' needs {e.args[0]!r}") from None
    if not high > low:
        raise ValueError(f"rope scaling 'llama3' needs high_freq_factor > low_freq_factor, "
                         f"got {high} and {low}")
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen < old_len / high, inv_freq,
                    np.where(wavelen > old_len / low, inv_freq / factor, blended))


class RopeTable:
    """cos and sin of position * frequency, (max_positions, head_dim // 2) float32 each."""

    def __init__(self, head_dim, max_positions, theta=10000.0, scaling=None):
        """head_dim: even; max_positions: table rows; theta: the rope base; scaling: a Hugging
        Face rope_scaling dict (llama3 or linear), {"rope_type": "freq_factors", "factors":
        (head_dim // 2 divisors)} (a GGUF file's rope_freqs), or None."""
        self.head_dim = checks.positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.max_positions = checks.positive_int("max_positions", max_positions)
        if not theta > 0:
            raise ValueError(f"theta must be positive, got {theta}")
        if scaling is not None and not isinstance(scaling, dict):
            raise TypeError(f"scaling must be a dict (Hugging Face rope_scaling) or None, "
                            f"got {type(scaling).__name__}")
        self.theta = float(theta)
        self.scaling = dict(scaling) if scaling else None
        inv_freq = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.scaling:
            inv_freq = _scaled_inv_freq(inv_freq, self.scaling)
        angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
        self.cos = np.cos(angles).astype(np.float32)   # (max_positions, head_dim // 2)
        self.sin = np.sin(angles).astype(np.float32)   # (max_positions, head_dim // 2)
        self._device = {}                              # device id -> (cos, sin) on that GPU

    def tables(self, backend):
        """(cos, sin) on the host, or on the current CUDA device (copied once per device)."""
        if backend == "cpu":
            return self.cos, self.sin
        from numba import cuda
        dev = device_id()
        if dev not in self._device:
            self._device[dev] = (cuda.to_device(self.cos), cuda.to_device(self.sin))
        return self._device[dev]

    def __repr__(self):
        return (f"RopeTable(head_dim={self.head_dim}, max_positions={self.max_positions}, "
                f"theta={self.theta}, scaling={self.scaling})")
