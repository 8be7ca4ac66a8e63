"""The machine's limits, measured in the same run as the kernels: memory read bandwidth and
the sgemm FLOP rate. Each row's "share of the limit" divides by these.

Read bandwidth is the best of several readers over an array far larger than the caches (a
reader that does not reach it is not the limit): NumPy's single-threaded sum, a Numba parallel
sum on every thread, and NumPy's BLAS matrix-vector product (the access pattern of decode).
NumPy's copy rate (one thread; bytes read + written) is reported beside it. sgemm: NumPy's
BLAS on square float32 matrices. On CUDA: a read-only reduction kernel, a device-to-device
copy, and PyTorch's fp32 sgemm (TF32 off) when PyTorch sees the GPU.

A row whose data is small enough to stay in cache between calls reads faster than memory
can deliver: its share of the read bandwidth would pass 100%. The cache read rate (the same
readers over 1 MiB, read again and again: it stays in the caches) is the limit such
a row is given instead; `roofline` picks the limit of each row."""
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from numba import njit, prange

from .timing import measure
from ..kernels.cpu_pool import PRANGE

READ_BYTES = 256 * 2**20      # host arrays: far above any CPU's last-level cache
CACHE_BYTES = 2**20           # host array read from the caches (L2 and below on current CPUs)
SGEMM_N = 2048                # 2 * 2048^3 = 17.2 GFLOP per call
GEMV_SHAPE = (12288, 4096)    # the fused QKV weight of the reference shapes (201 MB float32)


@dataclass
class Limits:
    device: str
    read_gbs: float                      # best measured read bandwidth, GB/s (1e9 bytes/s)
    read_source: str                     # which reader reached it
    copy_gbs: float | None               # (read + written bytes) / time
    sgemm_gflops: float | None           # best measured sgemm rate, GFLOP/s
    sgemm_source: str | None
    readers: dict = field(default_factory=dict)   # every reader's GB/s
    cache_read_gbs: float | None = None  # best read rate of an array that stays in cache

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The Limits of a to_dict() (a saved run's: unknown keys ignored, new ones None)."""
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k != "readers"},
                   readers=d.get("readers") or {})



@njit(parallel=PRANGE, fastmath=True, cache=True)
def _parallel_sum(a):
    # a: (n,) float32, read once by every thread's share of the loop
    s = np.float32(0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def host_limits(*, nbytes=READ_BYTES, sgemm_n=SGEMM_N, gemv_shape=GEMV_SHAPE, repeat=None,
                budget_s=1.0):
    n = nbytes // 4
    a = np.ones(n, np.float32)                # written: every page is touched before timing
    b = np.empty_like(a)
    b.fill(0)
    readers = {}
    t = measure(lambda: np.add.reduce(a), repeat=repeat, budget_s=budget_s, min_samples=3)
    readers["numpy sum (1 thread)"] = a.nbytes / t.median / 1e9
    t = measure(lambda: _parallel_sum(a), repeat=repeat, budget_s=budget_s, min_samples=3)
    readers["numba parallel sum"] = a.nbytes / t.median / 1e9
    t = measure(lambda: np.copyto(b, a), repeat=repeat, budget_s=budget_s, min_samples=3)
    copy = 2 * a.nbytes / t.median / 1e9
    w = np.ones(gemv_shape, np.float32)
    x = np.ones(gemv_shape[1], np.float32)
    y = np.empty(gemv_shape[0], np.float32)
    t = measure(lambda: np.dot(w, x, out=y), repeat=repeat, budget_s=budget_s, min_samples=3)
    readers["BLAS sgemv"] = w.nbytes / t.median / 1e9
    best = max(readers, key=readers.get)
    # the same readers over CACHE_BYTES, which stay in cache from one call to the next
    small, ws = a[:CACHE_BYTES // 4], w.reshape(-1)[:CACHE_BYTES // 4].reshape(256, -1)
    xs, ys = x[:ws.shape[1]], y[:256]
    cached = [measure(fn, repeat=repeat, budget_s=budget_s / 3, min_samples=3).median
              for fn in (lambda: np.add.reduce(small), lambda: _parallel_sum(small),
                         lambda: np.dot(ws, xs, out=ys))]
    cache = CACHE_BYTES / min(cached) / 1e9

    m = np.random.default_rng(0).standard_normal((sgemm_n, sgemm_n), dtype=np.float32)
    c = np.empty_like(m)
    t = measure(lambda: np.dot(m, m, out=c), repeat=repeat, budget_s=budget_s, min_samples=3)
    sgemm = 2 * sgemm_n**3 / t.median / 1e9
    return Limits(device="cpu", read_gbs=readers[best], read_source=best, copy_gbs=copy,
                  sgemm_gflops=sgemm, sgemm_source=f"NumPy BLAS {sgemm_n}^3",
                  readers=readers, cache_read_gbs=cache)


_cuda_read_kernel = None


def _cuda_reader():
    """A read-only reduction kernel: each thread sums a grid-stride slice, one partial per
    block (a few KB written against hundreds of MB read)."""
    global _cuda_read_kernel
    if _cuda_read_kernel is None:
        from numba import cuda, float32

        @cuda.jit
        def read_sum(a, partial):
            # a: (n,) float32; partial: (blocks,) float32
            i = cuda.grid(1)
            stride = cuda.gridsize(1)
            s = float32(0)
            while i < a.shape[0]:
                s += a[i]
                i += stride
            cuda.atomic.add(partial, cuda.blockIdx.x, s)

        _cuda_read_kernel = read_sum
    return _cuda_read_kernel


def cuda_limits(*, nbytes=1024 * 2**20, sgemm_n=8192, repeat=None, budget_s=1.0):
    from numba import cuda
    sync = cuda.synchronize
    n = nbytes // 4
    a = cuda.to_device(np.ones(n, np.float32))
    b = cuda.device_array_like(a)
    readers = {}
    kernel = _cuda_reader()
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    blocks, threads = sms * 8, 256
    partial = cuda.device_array(blocks, np.float32)
    t = measure(lambda: kernel[blocks, threads](a, partial), sync=sync, repeat=repeat,
                budget_s=budget_s, min_samples=3)
    readers["numba read kernel"] = a.nbytes / t.median / 1e9
    t = measure(lambda: b.copy_to_device(a), sync=sync, repeat=repeat, budget_s=budget_s,
                min_samples=3)
    copy = 2 * a.nbytes / t.median / 1e9
    sgemm = source = None
    try:
        import torch
        if torch.cuda.is_available():
            m = torch.randn(sgemm_n, sgemm_n, device="cuda", dtype=torch.float32)
            c = torch.empty_like(m)
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False     # true fp32, as our kernels
            try:
                t = measure(lambda: torch.mm(m, m, out=c), sync=torch.cuda.synchronize,
                            repeat=repeat, budget_s=budget_s, min_samples=3)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            sgemm, source = 2 * sgemm_n**3 / t.median / 1e9, f"PyTorch fp32 {sgemm_n}^3"
            del m, c
    except ImportError:
        pass
    best = max(readers, key=readers.get)
    return Limits(device="cuda", read_gbs=readers[best], read_source=best, copy_gbs=copy,
                  sgemm_gflops=sgemm, sgemm_source=source, readers=readers)


def measure_limits(device, *, small=False, repeat=None, budget_s=1.0):
    """Limits for 'cpu' or 'cuda'. small=True: 32 MB arrays and 512^3 sgemm (tests, smoke
    runs: the figures are then cache-assisted and not the machine's true limits)."""
    if device == "cpu":
        if small:
            return host_limits(nbytes=32 * 2**20, sgemm_n=512, gemv_shape=(2048, 4096),
                               repeat=repeat, budget_s=budget_s)
        return host_limits(repeat=repeat, budget_s=budget_s)
    if small:
        return cuda_limits(nbytes=64 * 2**20, sgemm_n=1024, repeat=repeat, budget_s=budget_s)
    return cuda_limits(repeat=repeat, budget_s=budget_s)


def roofline(gbs, gflops, limits):
    """(bound, share): the resource nearest its limit and the achieved share of that limit,
    never above 1. bound is 'memory' (the read bandwidth), 'cache' (faster than memory can
    deliver, so the data sat in cache: the share is of the cache read rate) or 'compute'
    (sgemm). share is None where the rate passes every limit measured for it (a 'cache' row
    faster than the cache reader, a 'compute' row faster than sgemm): no share is honest
    then. limits: anything with read_gbs, sgemm_gflops and (optional) cache_read_gbs."""
    if limits is None:
        return None, None
    shares = {}
    if gbs:
        share = gbs / limits.read_gbs
        if share > 1:
            cache = getattr(limits, "cache_read_gbs", None)
            shares["cache"] = gbs / cache if cache else math.inf
        else:
            shares["memory"] = share
    if gflops and getattr(limits, "sgemm_gflops", None):
        shares["compute"] = gflops / limits.sgemm_gflops
    if not shares:
        return None, None
    bound = max(shares, key=shares.get)
    share = shares[bound]
    return bound, share if share <= 1 else None
