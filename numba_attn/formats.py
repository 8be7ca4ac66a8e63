"""The weight storage formats: one table (name, bytes per weight, block, NumPy storage, devices)
and the one quantized type, Q8Matrix (GGUF/llama.cpp Q8_0).

A linear or embedding weight is a 2-D (out_features, in_features) array of float32, float16 or
bfloat16 (NumPy arrays of ``ml_dtypes.bfloat16``), or a Q8Matrix. ``weight_format(w)`` names
its row of the table; the kernels of each format are a family of their own
(kernels/linear_cpu.py, linear_bf16_cpu.py, linear_q8_cpu.py)."""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from numba import njit, prange

Q8_BLOCK = 32  # weights per Q8_0 block: 32 int8 codes and one float16 scale (34 bytes)


@dataclass(frozen=True)
class WeightFormat:
    name: str
    block_size: int        # consecutive weights along the input (last) axis sharing a block
    block_bytes: int       # bytes of one block (codes and scale)
    storage: np.dtype      # NumPy dtype of the stored elements (Q8_0: its codes)
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


FORMATS = {f.name: f for f in (
    WeightFormat("float32", 1, 4, np.dtype(np.float32), (("cpu", "linear"), ("cuda", "linear"))),
    WeightFormat("bfloat16", 1, 2, np.dtype(ml_dtypes.bfloat16), (("cpu", "linear_bf16"),)),
    WeightFormat("float16", 1, 2, np.dtype(np.float16), (("cpu", "linear_bf16"),
                                                          ("cuda", "linear"))),
    WeightFormat("q8_0", Q8_BLOCK, 2 + Q8_BLOCK, np.dtype(np.int8), (("cpu", "linear_q8"),)),
)}
_BY_DTYPE = {f.storage: f for f in FORMATS.values() if f.block_size == 1}


def weight_format(w):
    """The WeightFormat of a weight (an array or a Q8Matrix), a dtype or a format name."""
    if isinstance(w, str):
        if w not in FORMATS:
            raise ValueError(f"unknown weight format {w!r}; expected one of {', '.join(FORMATS)}")
        return FORMATS[w]
    if isinstance(w, Q8Matrix):
        return FORMATS["q8_0"]
    dtype = w if isinstance(w, (np.dtype, type)) else getattr(w, "dtype", None)
    if dtype is None:
        raise TypeError(f"a weight must be an array or a Q8Matrix, got {type(w).__name__}")
    fmt = _BY_DTYPE.get(np.dtype(dtype))
    if fmt is None:
        raise TypeError(f"weights of dtype {np.dtype(dtype).name} have no format; expected "
                        f"float32, float16, bfloat16 (ml_dtypes) or a Q8Matrix")
    return fmt


class Q8Matrix:
    """A (rows, cols) matrix in Q8_0: each block of 32 consecutive weights of a row is
    d * qs, qs int8 codes in [-127, 127] and d a float16 scale, as GGUF/llama.cpp store it.

    qs: (rows, cols) int8; d: (rows, cols // 32) float16."""
    format = FORMATS["q8_0"]

    def __init__(self, qs, d):
        if not (isinstance(qs, np.ndarray) and qs.dtype == np.int8 and qs.ndim == 2):
            raise TypeError(f"qs must be a 2-D int8 array, got {_describe(qs)}")
        if not (isinstance(d, np.ndarray) and d.dtype == np.float16 and d.ndim == 2):
            raise TypeError(f"d must be a 2-D float16 array, got {_describe(d)}")
        rows, cols = qs.shape
        if cols % Q8_BLOCK:
            raise ValueError(f"Q8_0 needs in_features (columns) a multiple of {Q8_BLOCK}, "
                             f"got {cols}")
        if d.shape != (rows, cols // Q8_BLOCK):
            raise ValueError(f"d must have shape ({rows}, {cols // Q8_BLOCK}) for qs of shape "
                             f"{qs.shape}, got {d.shape}")
        if not (qs.flags.c_contiguous and d.flags.c_contiguous):
            raise ValueError("qs and d must be C-contiguous")
        self.qs = qs    # (rows, cols) int8
        self.d = d      # (rows, cols // 32) float16

    @property
    def shape(self):
        return self.qs.shape

    @property
    def ndim(self):
        return 2

    @property
    def nbytes(self):
        return self.qs.nbytes + self.d.nbytes

    def dequantize(self):
        """The weights as float32 (rows, cols): d * qs, blockwise."""
        rows, cols = self.qs.shape
        w = self.qs.reshape(rows, cols // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
        w *= self.d.astype(np.float32)[:, :, None]
        return w.reshape(rows, cols)

    def __repr__(self):
        return f"Q8Matrix(shape={self.shape}, nbytes={self.nbytes})"


def _describe(a):
    if isinstance(a, np.ndarray):
        return f"{a.dtype.name} array of shape {a.shape}"
    return type(a).__name__


@njit(inline="always", cache=True)
def roundf(v):
    # C's roundf: to the nearest integer, halves away from zero (v - trunc(v) is exact)
    t = np.trunc(v)
    if abs(v - t) >= np.float32(0.5):
        t += np.float32(1) if v > 0 else np.float32(-1)
    return t


@njit(parallel=True, cache=True)
def _quantize_rows(qs, d, w):
    # w: (rows, cols) float32; qs: (rows, cols) int8; d: (rows, cols // 32) float32 scales.
    # Returns the number of rows holding a NaN or an infinity (nothing is valid then)
    rows, cols = w.shape
    bad = np.zeros(rows, np.int64)
    for r in prange(rows):
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
    return bad.sum()


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
    if rows and _quantize_rows(qs, d, w32):
        raise ValueError("w holds NaN or infinite weights; Q8_0 needs finite values")
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    if not np.isfinite(d16).all():
        raise ValueError("w holds weights beyond float16's range times 127 (|w| > 8.3e6); "
                         "their Q8_0 scale would be infinite")
    return Q8Matrix(qs, d16)
