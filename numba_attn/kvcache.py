"""A preallocated key/value cache: one buffer per tensor for all layers, filled by position."""
import numpy as np

from . import checks
from .backend import as_device, backend_of, empty, kernels, view
from .formats import KV_DTYPES, KV_INT8, Int8KV


class KVCache:
    """k, v: (n_layers, max_seq, n_kv_heads, head_dim), allocated once, in dtype: float32, a
    16-bit float (half the bytes; formats.KV_DTYPES lists each device's): "float16",
    "bfloat16" (an ml_dtypes.bfloat16 array on the host), or on the host "int8" (a quarter:
    formats.Int8KV, 8-bit codes with a float32 scale a row of head_dim).

    append(layer, k, v) writes (seq, n_kv_heads, head_dim), float32 or the cache's dtype
    (rounded to nearest even, or quantized, on the way in), at that layer's current length and
    returns the filled views (kv_len, n_kv_heads, head_dim)."""

    def __init__(self, n_layers, max_seq, n_kv_heads, head_dim, *, dtype=np.float32, device="cpu"):
        self.n_layers = checks.positive_int("n_layers", n_layers)
        self.max_seq = checks.positive_int("max_seq", max_seq)
        self.n_kv_heads = checks.positive_int("n_kv_heads", n_kv_heads)
        self.head_dim = checks.positive_int("head_dim", head_dim)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.dtype = kv_dtype(device, dtype)
        # append takes float32 (the model's) or the cache's own float dtype
        self._inputs = (np.dtype(np.float32),) + (
            (self.dtype,) if self.dtype != np.float32 and not self.int8 else ())
        shape = (n_layers, max_seq, n_kv_heads, head_dim)
        self.k = self._buffer(shape)      # (n_layers, max_seq, n_kv_heads, head_dim)
        self.v = self._buffer(shape)      # (n_layers, max_seq, n_kv_heads, head_dim)
        self.lengths = [0] * n_layers                 # tokens stored, per layer

    @property
    def int8(self):
        """True for the 8-bit storage (k and v are formats.Int8KV)."""
        return self.dtype.name == KV_INT8

    def _buffer(self, shape):
        if self.int8:
            return Int8KV(self._array(shape, np.uint8), self._array(shape[:-1], np.float32))
        return self._array(shape, self.dtype)

    def _array(self, shape, dtype):
        # zeros on the host (fresh pages cost nothing more; recycled memory could hold NaNs or
        # infinities): Model.warmup's decode step reads keys and values past those it wrote
        return np.zeros(shape, dtype) if self.device == "cpu" else empty(shape, dtype, "cuda")

    @property
    def length(self):
        """Tokens stored (in layer 0, the first written at each step)."""
        return self.lengths[0]

    def append(self, layer, k, v):
        """Write k, v (new_tokens, n_kv_heads, head_dim) after the layer's stored tokens and
        return views of everything stored so far, (kv_len, n_kv_heads, head_dim) each.
        Raises ValueError when they would run past max_seq."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an integer in [0, {self.n_layers}), got {layer!r}")
        backend = backend_of(k, v)
        if backend != self.device:
            raise ValueError(f"this KVCache lives on {self.device}; got {backend} arrays")
        k, v = as_device(k), as_device(v)            # CuPy / PyTorch: numba views (no copy)
        want = (None, self.n_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            checks.array(name, x, ndim=3, dtypes=self._inputs)
            checks.shape(name, x, want)
        if k.shape != v.shape or k.dtype != v.dtype:
            raise ValueError(f"k and v must have the same shape and dtype, got "
                             f"{tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
        start = self.lengths[layer]
        if start + k.shape[0] > self.max_seq:
            raise ValueError(f"KV cache full: layer {layer} holds {start} of {self.max_seq} "
                             f"positions and cannot take {k.shape[0]} more; reset() it or make a "
                             f"larger cache")
        return self.write(layer, k, v)

    def write(self, layer, k, v):
        """append() without its checks, for a decode step checked once when it was set up:
        k, v (new_tokens, n_kv_heads, head_dim), C-contiguous, float32 or the cache's dtype, on
        its device, with room for them."""
        start = self.lengths[layer]
        end = start + k.shape[0]
        row = self.n_kv_heads * self.head_dim
        base = layer * self.max_seq * row           # this layer's first element
        kernels("tensor", self.device).append_kv(self.k, self.v, k, v, base + start * row)
        self.lengths[layer] = end
        if self.device == "cpu":                    # NumPy's own slicing: the cheapest view
            return self.k[layer, :end], self.v[layer, :end]
        shape = (end, self.n_kv_heads, self.head_dim)
        return view(self.k, shape, base), view(self.v, shape, base)

    def reset(self):
        """Forget every stored token (the buffers stay allocated)."""
        self.lengths = [0] * self.n_layers

    def set_length(self, n):
        """Every layer holds n tokens, written by kernels that bypass append() (a captured
        decode step writes every layer's keys and values at a position read on the device)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or \
                not 0 <= n <= self.max_seq:
            raise ValueError(f"length must be an integer in [0, {self.max_seq}], got {n!r}")
        self.lengths = [int(n)] * self.n_layers

    def truncate(self, length):
        """Keep the first `length` tokens of every layer and forget the rest, so that a sequence
        can continue from an earlier position. length: 0 to the shortest layer's length."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) \
                or not 0 <= length <= min(self.lengths):
            raise ValueError(f"length must be an integer in [0, {min(self.lengths)}] (tokens "
                             f"stored in every layer), got {length!r}")
        self.lengths = [int(length)] * self.n_layers

    @property
    def nbytes(self):
        """Bytes of the K and V buffers together (int8: their scales too)."""
        return int(self.k.nbytes) + int(self.v.nbytes)

    def __repr__(self):
        return (f"KVCache(n_layers={self.n_layers}, max_seq={self.max_seq}, "
                f"n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype.name}, device={self.device!r}, length={self.length})")


def kv_dtype(device, dtype):
    """The NumPy dtype of a KV cache on device for dtype (a name of formats.KV_DTYPES[device], or
    a dtype); ValueError for another."""
    table = KV_DTYPES[device]
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = dtype
    if name not in table:
        raise ValueError(f"a {device} KV cache stores {', '.join(table)}; got {name!r}")
    return table[name]
