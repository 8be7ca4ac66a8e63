"""The weight storage formats: one table (name, bytes per weight, block, host and device storage,
kernel family per backend) and the one quantized weight type, Q8Matrix (GGUF/llama.cpp Q8_0);
the KV cache's storages (KV_DTYPES) and its 8-bit type, Int8KV.

A linear or embedding weight is a 2-D (out_features, in_features) array of float32, float16 or
bfloat16, or a Q8Matrix, on the host or on the GPU:

- on the host, NumPy arrays; bfloat16 as ``ml_dtypes.bfloat16``;
- on the GPU, CUDA arrays (numba device arrays, or any ``__cuda_array_interface__`` object);
  numba has no bfloat16 type, so a bfloat16 matrix there is a uint16 array of its bits (the
  table's ``device_storage``): ``weight_format`` reads a CUDA uint16 array as bfloat16, and
  nothing else does. A Q8Matrix holds device arrays for its codes and scales.

``to_device(w)`` copies a host weight to the GPU in its format; ``weight_format(w)`` names its
row of the table; the kernels of each format are a family of their own
(kernels/linear_<backend>.py, linear_bf16_<backend>.py, linear_q8_<backend>.py)."""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from numba import njit

from .backend import as_device, is_cuda_array
from .checks import is_c_contiguous
from .kernels import cpu_pool

Q8_BLOCK = 32  # weights per Q8_0 block: 32 int8 codes and one float16 scale (34 bytes)


@dataclass(frozen=True)
class WeightFormat:
    name: str
    block_size: int        # consecutive weights along the input (last) axis sharing a block
    block_bytes: int       # bytes of one block (codes and scale)
    storage: np.dtype      # NumPy dtype of the stored elements on the host (Q8_0: its codes)
    device_storage: np.dtype  # dtype of a CUDA array of the format (bfloat16: its uint16 bits)
    kernels: tuple         # (backend, kernel family) pairs: kernels/<family>_<backend>.py

    @property
    def bytes_per_weight(self):
        return self.block_bytes / self.block_size

    @property
    def devices(self):
        """The backends whose kernels take this format: "cpu", "cuda"."""
        return tuple(b for b, _ in self.kernels)

    def family(self, backend):
        """The linear kernel family running this format on backend (None where none does)."""
        return dict(self.kernels).get(backend)


_F32, _BF16, _F16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
_I8, _U16 = np.dtype(np.int8), np.dtype(np.uint16)
# the 16-bit families run bfloat16 and float16 alike, on both backends (linear_bf16_cpu.py /
# linear_bf16_cuda.py); float32 runs the float32 family
FORMATS = {f.name: f for f in (
    WeightFormat("float32", 1, 4, _F32, _F32, (("cpu", "linear"), ("cuda", "linear"))),
    WeightFormat("bfloat16", 1, 2, _BF16, _U16, (("cpu", "linear_bf16"), ("cuda", "linear_bf16"))),
    WeightFormat("float16", 1, 2, _F16, _F16, (("cpu", "linear_bf16"), ("cuda", "linear_bf16"))),
    WeightFormat("q8_0", Q8_BLOCK, 2 + Q8_BLOCK, _I8, _I8, (("cpu", "linear_q8"),
                                                          ("cuda", "linear_q8"))),
)}
# storage of the key/value cache (and of attention's k and v), apart from the weights' formats:
# float32, 16-bit floats (half the bytes decode streams at long context), or on the CPU "int8"
# (a quarter, with a scale a row: Int8KV, whose codes' dtype is given); the CUDA kernels take
# float16 of the 16-bit two
KV_DTYPES = {"cpu": {"float32": _F32, "float16": _F16, "bfloat16": _BF16, "int8": _I8},
             "cuda": {"float32": _F32, "float16": _F16}}
KV_INT8 = "int8"
# the format of an unblocked weight array by its dtype: host (NumPy) arrays by `storage`, CUDA
# arrays by `device_storage` (a uint16 device array is a bfloat16 matrix's bits; a uint16 NumPy
# array is no weight)
_BY_DTYPE = {f.storage: f for f in FORMATS.values() if f.block_size == 1}
_BY_DEVICE_DTYPE = {f.device_storage: f for f in FORMATS.values() if f.block_size == 1}


def weight_format(w):
    """The WeightFormat of a weight (a host or CUDA array, or a Q8Matrix), a host dtype or a
    format name."""
    if isinstance(w, str):
        if w not in FORMATS:
            raise ValueError(f"unknown weight format {w!r}; expected one of {', '.join(FORMATS)}")
        return FORMATS[w]
    if isinstance(w, Q8Matrix):
        return FORMATS["q8_0"]
    dtype = w if isinstance(w, (np.dtype, type)) else getattr(w, "dtype", None)
    if dtype is None:
        raise TypeError(f"a weight must be an array or a Q8Matrix, got {type(w).__name__}")
    device = is_cuda_array(w)
    fmt = (_BY_DEVICE_DTYPE if device else _BY_DTYPE).get(np.dtype(dtype))
    if fmt is None:
        expected = "float32, float16, bfloat16 (uint16 bits: formats.to_device)" if device else \
            "float32, float16, bfloat16 (ml_dtypes)"
        raise TypeError(f"{'CUDA ' if device else ''}weights of dtype {np.dtype(dtype).name} "
                        f"have no format; expected {expected} or a Q8Matrix")
    return fmt


def to_device(w, stream=0):
    """A host weight copied to the GPU in its format: a Q8Matrix's codes and scales
    (Q8Matrix.to_device), bfloat16 as a uint16 array of its bits, float32 and float16 as they
    are. A weight already on the GPU is returned as it is."""
    if isinstance(w, Q8Matrix):
        return w.to_device(stream)
    fmt = weight_format(w)
    if is_cuda_array(w):
        return w
    from numba import cuda
    w = np.ascontiguousarray(w)
    return cuda.to_device(w.view(fmt.device_storage), stream=stream)


class Q8Matrix:
    """A (rows, cols) matrix in Q8_0: each block of 32 consecutive weights of a row is
    d * qs, qs int8 codes in [-127, 127] and d a float16 scale, as GGUF/llama.cpp store it.

    qs: (rows, cols) int8; d: (rows, cols // 32) float16; both C-contiguous, both NumPy arrays
    (a host matrix) or both CUDA arrays (a device matrix: numba device arrays, or any
    __cuda_array_interface__ object such as a CuPy array or a PyTorch CUDA tensor, kept as a
    numba view of the same memory). to_device() and copy_to_host() copy it across."""
    format = FORMATS["q8_0"]

    def __init__(self, qs, d):
        device = is_cuda_array(qs)
        if device != is_cuda_array(d):
            raise TypeError(f"qs and d must both be host (NumPy) arrays or both CUDA arrays, "
                            f"got {_describe(qs)} and {_describe(d)}")
        if device:
            qs, d = as_device(qs), as_device(d)    # numba device arrays (views, no copy)
        elif not (isinstance(qs, np.ndarray) and isinstance(d, np.ndarray)):
            raise TypeError(f"qs and d must be arrays, got {_describe(qs)} and {_describe(d)}")
        if not (np.dtype(qs.dtype) == _I8 and len(qs.shape) == 2):
            raise TypeError(f"qs must be a 2-D int8 array, got {_describe(qs)}")
        if not (np.dtype(d.dtype) == _F16 and len(d.shape) == 2):
            raise TypeError(f"d must be a 2-D float16 array, got {_describe(d)}")
        rows, cols = qs.shape
        if cols % Q8_BLOCK:
            raise ValueError(f"Q8_0 needs in_features (columns) a multiple of {Q8_BLOCK}, "
                             f"got {cols}")
        if tuple(d.shape) != (rows, cols // Q8_BLOCK):
            raise ValueError(f"d must have shape ({rows}, {cols // Q8_BLOCK}) for qs of shape "
                             f"{tuple(qs.shape)}, got {tuple(d.shape)}")
        if not (is_c_contiguous(qs) and is_c_contiguous(d)):
            raise ValueError("qs and d must be C-contiguous")
        self.qs = qs    # (rows, cols) int8
        self.d = d      # (rows, cols // 32) float16

    @property
    def device(self):
        """'cpu' or 'cuda': where the codes and scales live."""
        return "cuda" if is_cuda_array(self.qs) else "cpu"

    @property
    def shape(self):
        """(rows, cols): (out_features, in_features)."""
        return tuple(self.qs.shape)

    @property
    def ndim(self):
        """2, as the arrays it stands in for."""
        return 2

    @property
    def nbytes(self):
        """Bytes of the codes and scales: 34 per 32 weights."""
        return int(self.qs.nbytes) + int(self.d.nbytes)

    def to_device(self, stream=0):
        """This matrix on the GPU (itself when it is there already)."""
        if self.device == "cuda":
            return self
        from numba import cuda
        return Q8Matrix(cuda.to_device(self.qs, stream=stream),
                        cuda.to_device(self.d, stream=stream))

    def copy_to_host(self, stream=0):
        """This matrix on the host (itself when it is there already)."""
        if self.device == "cpu":
            return self
        return Q8Matrix(self.qs.copy_to_host(stream=stream), self.d.copy_to_host(stream=stream))

    def dequantize(self):
        """The weights as float32 (rows, cols): d * qs, blockwise. Host matrices only."""
        if self.device != "cpu":
            raise TypeError("dequantize() runs on the host and this Q8Matrix is on the GPU; "
                            "call copy_to_host() first")
        rows, cols = self.qs.shape
        w = self.qs.reshape(rows, cols // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
        w *= self.d.astype(np.float32)[:, :, None]
        return w.reshape(rows, cols)

    def __repr__(self):
        return f"Q8Matrix(shape={self.shape}, nbytes={self.nbytes}, device={self.device!r})"


def _describe(a):
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        where = "CUDA " if is_cuda_array(a) else ""
        return f"{where}{getattr(a.dtype, 'name', a.dtype)} array of shape {tuple(a.shape)}"
    return type(a).__name__


@njit(inline="always", cache=True)
def roundf(v):
    # C's roundf: to the nearest integer, halves away from zero (v - trunc(v) is exact)
    t = np.trunc(v)
    if abs(v - t) >= np.float32(0.5):
        t += np.float32(1) if v > 0 else np.float32(-1)
    return t


@njit(cache=True)
def _quantize_rows(part, parts, qs, d, w, bad):
    # w: (rows, cols) float32; qs: (rows, cols) int8; d: (rows, cols // 32) float32 scales;
    # bad: (rows,) zeros, set to 1 where a row holds a NaN or an infinity (nothing is valid
    # then). In parts (cpu_pool): rows
    rows, cols = w.shape
    r_start, r_stop = cpu_pool.share(rows, part, parts)
    for r in range(r_start, r_stop):
        for b in range(cols // 32):
            j0 = b * 32
            amax = np.float32(0)
            for j in range(j0, j0 + 32):
                a = abs(w[r, j])
                if not a <= np.float32(3.4028235e38):   # NaN or inf
                    bad[r] = 1
                amax = max(amax, a)
            db = amax / np.float32(127)
            idb = np.float32(1) / db if db != 0 else np.float32(0)
            d[r, b] = db
            for j in range(j0, j0 + 32):
                qs[r, j] = np.int8(roundf(w[r, j] * idb))


def quantize_q8_0(w):
    """Q8_0 of a float matrix w (rows, cols): per block of 32 consecutive weights along the
    last axis, d = max|w| / 127 and codes roundf(w / d) (halves away from zero), computed in
    float32, d stored as float16 -- byte for byte llama.cpp's quantize_row_q8_0_ref."""
    if not isinstance(w, np.ndarray):
        raise TypeError(f"w must be a NumPy array, got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {w.shape}")
    if w.dtype not in (np.float32, np.float64, np.float16, np.dtype(ml_dtypes.bfloat16)):
        raise TypeError(f"w must be a float array (float32, float64, float16 or bfloat16), "
                        f"got {w.dtype.name}")
    rows, cols = w.shape
    if cols % Q8_BLOCK:
        raise ValueError(f"Q8_0 needs in_features (the last axis) a multiple of {Q8_BLOCK}, "
                         f"got shape {w.shape}")
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    qs = np.empty((rows, cols), np.int8)
    d = np.empty((rows, cols // Q8_BLOCK), np.float32)
    bad = np.zeros(rows, np.uint8)
    cpu_pool.run_parts(_quantize_rows, qs.size, qs, d, w32, bad)
    if bad.any():
        raise ValueError("w holds NaN or infinite weights; Q8_0 needs finite values")
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    if not np.isfinite(d16).all():
        raise ValueError("w holds weights beyond float16's range times 127 (|w| > 8.3e6); "
                         "their Q8_0 scale would be infinite")
    return Q8Matrix(qs, d16)


KV_OFFSET = 128  # Int8KV's stored byte: its code in [-127, 127] plus 128


class Int8KV:
    """Keys or values in 8 bits (the KV cache's "int8" storage, on the host): each row of
    head_dim values, one position of one KV head, is (codes - 128) * scale, with codes uint8
    (a code in [-127, 127] offset by 128: the unsigned bytes AVX-512 VNNI multiplies) and one
    float32 scale, max|x| / 127, codes round(x / scale) (halves away from zero).

    codes: (..., n, n_kv_heads, head_dim) uint8; scales: (..., n, n_kv_heads) float32; NumPy
    arrays, C-contiguous. Indexing the leading axes (x[layer, :n], x[None]) indexes both."""

    def __init__(self, codes, scales):
        if not (isinstance(codes, np.ndarray) and isinstance(scales, np.ndarray)):
            raise TypeError(f"codes and scales must be NumPy arrays, got {_describe(codes)} and "
                            f"{_describe(scales)}")
        if codes.dtype != np.uint8 or codes.ndim < 2:
            raise TypeError(f"codes must be a uint8 array of at least 2 axes, got "
                            f"{_describe(codes)}")
        if scales.dtype != np.float32 or scales.shape != codes.shape[:-1]:
            raise TypeError(f"scales must be a float32 array of shape {codes.shape[:-1]} for "
                            f"codes of shape {codes.shape}, got {_describe(scales)}")
        if not (codes.flags.c_contiguous and scales.flags.c_contiguous):
            raise ValueError("codes and scales must be C-contiguous")
        self.codes = codes      # (..., n, n_kv_heads, head_dim) uint8
        self.scales = scales    # (..., n, n_kv_heads) float32

    dtype = _I8                 # what the rows are stored as, by KV_DTYPES' name

    @property
    def shape(self):
        return tuple(self.codes.shape)

    @property
    def ndim(self):
        return self.codes.ndim

    @property
    def nbytes(self):
        """Bytes of the codes and scales: head_dim + 4 a row."""
        return int(self.codes.nbytes) + int(self.scales.nbytes)

    def __getitem__(self, index):
        """The same rows of codes and scales (index: leading axes only, as a tuple or one)."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.codes.ndim - 1 - sum(i is None for i in index):
            raise IndexError("an Int8KV is indexed on its leading axes, not head_dim")
        codes, scales = self.codes[index], self.scales[index]
        if not (codes.flags.c_contiguous and scales.flags.c_contiguous):
            raise ValueError("an Int8KV's rows are taken whole: a step or a later axis "
                             "leaves them non-contiguous")
        view = object.__new__(Int8KV)              # slices of checked arrays: no checks again
        view.codes, view.scales = codes, scales
        return view

    def rows(self):
        """(codes (rows, head_dim), scales (rows,)): flat views of every row, made once."""
        flat = self.__dict__.get("_rows")
        if flat is None:
            flat = self._rows = (self.codes.reshape(-1, self.codes.shape[-1]),
                                 self.scales.reshape(-1))
        return flat

    def dequantize(self):
        """The values as float32, (..., n, n_kv_heads, head_dim)."""
        return ((self.codes.astype(np.float32) - np.float32(KV_OFFSET))
                * self.scales[..., None])

    def __repr__(self):
        return f"Int8KV(shape={self.shape}, nbytes={self.nbytes})"


@njit(inline="always", cache=True)
def quantize_kv_row(codes, x):
    # codes (d,) uint8 <- x (d,) float32 in Int8KV's rule; returns the row's scale
    amax = np.float32(0)
    for c in range(x.shape[0]):
        amax = max(amax, abs(np.float32(x[c])))
    scale = amax / np.float32(127)
    inv = np.float32(1) / scale if scale != 0 else np.float32(0)
    for c in range(x.shape[0]):
        codes[c] = np.uint8(np.int32(roundf(np.float32(x[c]) * inv)) + KV_OFFSET)
    return scale


@njit(cache=True)
def _quantize_kv(codes, scales, x):
    # x (n, h, d) float32 -> codes (n, h, d) uint8, scales (n, h) float32
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            scales[i, h] = quantize_kv_row(codes[i, h], x[i, h])


def quantize_kv_int8(x):
    """x (..., n, n_kv_heads, head_dim), float, as an Int8KV (the KV cache's int8 rule)."""
    x = np.asarray(x)
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating) and x.dtype != _BF16:
        raise TypeError(f"x must be a float array of at least 2 axes, got {_describe(x)}")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.empty(x.shape, np.uint8)
    scales = np.empty(x.shape[:-1], np.float32)
    _quantize_kv(codes.reshape(-1, 1, x.shape[-1]), scales.reshape(-1, 1),
                 x32.reshape(-1, 1, x.shape[-1]))
    return Int8KV(codes, scales)
