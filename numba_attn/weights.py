"""What every tensor source shares: CheckpointError, and storing a tensor read from a file into
the format the model keeps.

A tensor source (loaders/hf.py for a Hugging Face folder, loaders/gguf.py for a GGUF file) reads
a tensor by its Hugging Face name into a destination the caller allocated: a float32, float16
or bfloat16 (ml_dtypes) array, or a host Q8Matrix, of the tensor's shape. A tensor stored in the
destination's own format is copied as it is; anything else goes through `store`.
"""
import errno
import mmap

import ml_dtypes
import numpy as np

from .formats import Q8Matrix, quantize_q8_0

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class CheckpointError(ValueError):
    """The weights file is missing, corrupt, truncated, of an unsupported type, or does not
    match the config."""


class LoadNotice(UserWarning):
    """A conversion at load the user should know of (quantized GGUF tensors dequantized)."""


def store(name, out, w):
    """Tensor `name`, the host float array w (float32, float16, bfloat16 or float64; out's
    shape, or anything that broadcasts to it), into out: an array (rounded to nearest even when
    narrower) or a host Q8Matrix (quantized). Refuses values the destination cannot hold."""
    if isinstance(out, Q8Matrix):
        try:
            q = quantize_q8_0(np.ascontiguousarray(w))
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r}: {e}") from None
        out.qs[...] = q.qs
        out.d[...] = q.d
        return out
    with np.errstate(over="ignore", invalid="ignore"):
        out[...] = w
    if out.dtype != np.float32 and out.dtype != w.dtype and not np.isfinite(out).all() \
            and np.isfinite(w).all():
        raise CheckpointError(f"tensor {name!r} has values beyond {out.dtype.name}'s range; "
                              f"use weight_dtype='float32'")
    return out


CACHE_LINE = 64
HUGE_PAGE = 2 << 20
# large weights start on a huge page, their whole huge pages hinted (Linux: madvise)
HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")


def aligned_empty(shape, dtype):
    """An uninitialised C-contiguous array starting on a cache line. A large np.empty comes
    from its own mapping, 16 bytes past a page boundary: every 64-byte row load of a weight
    matrix would then straddle two lines (TinyLlama q8_0 decode ~10% slower). One of
    HUGE_PAGE bytes or more is a mapping of its own in huge pages (_huge_region)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if HUGE_PAGES and nbytes >= HUGE_PAGE:
        return _huge_region(nbytes).view(dtype).reshape(shape)
    raw = np.empty(nbytes + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _huge_region(nbytes):
    """nbytes of uninitialised uint8 starting on a huge page, a private anonymous mapping
    (unmapped with its last view) whose whole huge pages are hinted for transparent huge
    pages; the tail keeps small pages, and pages never touched are never resident. NumPy
    hints arrays of 4 MiB or more itself, but from wherever their block starts, so a 4 MiB
    matrix got one huge page of its two, and a smaller one none: a decode step streams every
    weight, and each small page is a TLB miss every 64 lines (TinyLlama q8_0 decode 2-4.5%
    faster, bfloat16 2-3%, float32 0-1%: bench/bench_huge_pages.py)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags)
    except OSError as e:                                # as np.empty reports it
        if e.errno == errno.ENOMEM:
            raise MemoryError(f"cannot allocate {nbytes / 2**30:.2f} GiB for weights") from None
        raise
    raw = np.frombuffer(region, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:                                     # a kernel without transparent huge pages
        pass
    return raw[start:start + nbytes]


class HostArena:
    """Host weight buffers carved one after another, each on a cache line, from mappings of
    CHUNK bytes (or one tensor's, when larger) in huge pages: a model's weights then lie in
    huge pages end to end, the float16 scales of q8_0 matrices and every matrix's tail too,
    which no mapping of their own could put there (TinyLlama q8_0: 1.15 of its 1.17 GB in
    huge pages, against 1.01 with a mapping a tensor and 0.74 as NumPy allocates; decode
    2-4% faster than NumPy's, within 0.5% of a mapping a tensor: bench/bench_huge_pages.py),
    and one mapping per CHUNK, not per tensor. A chunk's unused end is never touched, so
    never resident (at most the huge page the last buffer ends in). Without huge pages:
    aligned_empty."""
    CHUNK = 256 << 20

    def __init__(self):
        self._chunk = np.empty(0, np.uint8)
        self._used = 0

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if not HUGE_PAGES:
            return aligned_empty(shape, dtype)
        if self._used + nbytes > self._chunk.size:
            size = max(self.CHUNK, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
            self._chunk, self._used = _huge_region(size), 0
        out = self._chunk[self._used:self._used + nbytes]
        self._used = -(-(self._used + nbytes) // CACHE_LINE) * CACHE_LINE
        return out.view(dtype).reshape(shape)


def empty_weight(shape, fmt_storage, quantized, empty=aligned_empty):
    """An uninitialised host destination of `shape`, cache-line aligned, from empty(shape,
    dtype) (aligned_empty, or a HostArena's: a Q8Matrix's scales then right after its codes):
    a Q8Matrix when quantized, else an array of fmt_storage."""
    if quantized:
        rows, cols = shape
        return Q8Matrix(empty((rows, cols), np.int8), empty((rows, cols // 32), np.float16))
    return empty(shape, fmt_storage)


def row_block(w, start, stop):
    """Rows start:stop of a host array or Q8Matrix, as a view (a Q8_0 block lies in one row)."""
    if isinstance(w, Q8Matrix):
        return Q8Matrix(w.qs[start:stop], w.d[start:stop])
    return w[start:stop]
