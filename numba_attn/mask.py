"""The additive causal mask and a bounded, thread-safe cache of masks.

The kernels never need a mask (masked_softmax and attention apply the causal rule inside their
loops); these serve callers who want the mask as an array, e.g. to add their own terms."""
import threading
from collections import OrderedDict

import numpy as np

from . import checks
from .backend import device_id, kernels


def causal_mask(q_len, kv_len, *, device="cpu"):
    """(q_len, kv_len) float32: 0 where query i may see key j (j <= kv_len - q_len + i),
    -inf elsewhere. Bottom-right aligned, so prefill over a filled KV cache is masked right."""
    q_len = checks.positive_int("q_len", q_len)
    kv_len = checks.positive_int("kv_len", kv_len)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    from .backend import empty
    out = empty((q_len, kv_len), np.float32, device)
    kernels("softmax", device).fill_causal_mask(out)
    return out


class MaskCache:
    """Causal masks keyed by (q_len, kv_len) (and device), least recently used evicted.

    Host masks are returned read-only so a caller cannot corrupt a shared entry."""

    def __init__(self, max_entries=64):
        """max_entries: masks kept before the least recently used is evicted."""
        self.max_entries = checks.positive_int("max_entries", max_entries)
        self._entries = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, q_len, kv_len, *, device="cpu"):
        """The (q_len, kv_len) float32 causal mask (0 where query i may see key j, -inf
        elsewhere; bottom-right aligned) on `device`: the cached one on a hit, built and
        cached on a miss. Host masks are read-only."""
        # a device other than "cpu"/"cuda" misses here and causal_mask rejects it
        key = (q_len, kv_len, self._device_key() if device == "cuda" else device)
        with self._lock:
            mask = self._entries.get(key)
            if mask is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return mask
        mask = causal_mask(q_len, kv_len, device=device)   # built outside the lock
        if device == "cpu":
            mask.flags.writeable = False
        with self._lock:
            self.misses += 1
            self._entries[key] = mask
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return mask

    @staticmethod
    def _device_key():
        return f"cuda:{device_id()}"

    def __len__(self):
        with self._lock:   # get() inserts, then evicts: unlocked, len could read max_entries + 1
            return len(self._entries)

    def __contains__(self, key):
        return (key[0], key[1], "cpu") in self._entries if len(key) == 2 else key in self._entries

    def clear(self):
        """Drop every entry and zero the hit and miss counters."""
        with self._lock:
            self._entries.clear()
            self.hits = 0
            self.misses = 0

    def __repr__(self):
        return (f"MaskCache(entries={len(self)}/{self.max_entries}, hits={self.hits}, "
                f"misses={self.misses})")
