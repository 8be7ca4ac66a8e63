"""Host/device dispatch. NumPy arrays run the CPU kernels; CUDA arrays (numba device arrays or any
object with __cuda_array_interface__: CuPy, PyTorch CUDA tensors) run the CUDA kernels."""
import functools
import importlib

import numpy as np


def is_cuda_array(x):
    # __cuda_ndarray__: numba's own device arrays, including the CUDA simulator's (which have
    # no __cuda_array_interface__); asked first: a class attribute, where hasattr evaluates
    # the interface property (a dict built per call)
    if type(x) is np.ndarray:
        return False
    return bool(getattr(x, "__cuda_ndarray__", False)) or hasattr(x, "__cuda_array_interface__")


def cuda_unavailable():
    """None when numba-cuda sees a GPU (or runs its simulator); otherwise why not, in words."""
    try:
        from numba import cuda
    except Exception:  # noqa: BLE001 - not installed or broken: either way no GPU for us
        return "numba-cuda is not installed (pip install 'numba-attn[cuda]')"
    try:
        if cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        pass
    return "numba.cuda.is_available() is False"


def backend_of(*arrays):
    """'cpu' or 'cuda' for a set of arguments (None entries ignored); mixing is an error."""
    kinds = {("cuda" if is_cuda_array(a) else "cpu") for a in arrays if a is not None}
    if len(kinds) > 1:
        raise ValueError("arguments mix host (NumPy) and device (CUDA) arrays; "
                         "move them all to one side first (numba.cuda.to_device / .copy_to_host())")
    return kinds.pop() if kinds else "cpu"


@functools.cache
def kernels(family, backend):
    """The kernel module of a family for a backend: kernels/<family>_cpu or <family>_cuda
    (looked up once: a KV cache asks every layer of every token)."""
    return importlib.import_module(f"numba_attn.kernels.{family}_{backend}")


def as_device(x):
    """A numba device-array view of any __cuda_array_interface__ object (no copy)."""
    if hasattr(x, "__cuda_array_interface__") and not hasattr(x, "copy_to_host"):
        from numba import cuda
        return cuda.as_cuda_array(x)
    sim = _simulator_arrays()
    if sim is not None and type(x) is sim[0]:
        return sim[1](x._ary, x.stream)
    return x


@functools.cache
def _simulator_arrays():
    """Under numba's CUDA simulator: (its device array type, the same with a plain tuple shape).
    The simulator's shape refuses negative indices (x.shape[-1]), which real device arrays take
    on the host; the host code here uses them. None without the simulator."""
    from numba import config
    if not config.ENABLE_CUDASIM:
        return None
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    class SimulatorArray(FakeCUDAArray):
        @property
        def shape(self):
            return self._ary.shape

    return FakeCUDAArray, SimulatorArray


def device_id():
    """The current CUDA device's id (0 under the simulator, whose device has none)."""
    from numba import cuda
    return getattr(cuda.get_current_device(), "id", 0)


def copy_from_host(dst, src):
    """Host values src into dst, a host or device array of the same shape; returns dst."""
    if is_cuda_array(dst):
        as_device(dst).copy_to_device(src)
    else:
        dst[...] = src
    return dst


def copy_to_host(dst, src):
    """The values of src (a host or device array) in the host array dst; returns dst. When src
    is dst (a host buffer already), nothing is copied."""
    if src is dst:
        return dst
    if is_cuda_array(src):
        as_device(src).copy_to_host(dst)
    else:
        dst[...] = src
    return dst


def reshape(a, shape):
    """The C-contiguous array a as `shape`: NumPy's reshape on the host; on CUDA a view built
    directly and cached on a (numba's own reshape costs tens of microseconds of Python)."""
    if isinstance(a, np.ndarray):
        return a.reshape(shape)
    from .kernels.util_cuda import view as device_view
    return device_view(a, shape)


def view(a, shape, offset=0):
    """A C-contiguous view `shape` of the C-contiguous array a, `offset` elements in (on CUDA,
    cached on a)."""
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:        # reshape(-1) would copy: the view would be lost
            raise ValueError("view() needs a C-contiguous array")
        n = int(np.prod(shape, dtype=np.int64))
        return a.reshape(-1)[offset:offset + n].reshape(shape)
    from .kernels.util_cuda import view as device_view
    return device_view(a, shape, offset)


def qkv_row_views(qkv, n_heads, n_kv_heads):
    """One row of a fused projection qkv (1, (n_heads + 2 n_kv_heads) d), as views, no copy:
    q (1, n_heads, d), k and v (1, n_kv_heads, d), and q|k together (1, 1, n_heads +
    n_kv_heads, d), the heads one rope call rotates."""
    d = qkv.shape[1] // (n_heads + 2 * n_kv_heads)
    return (view(qkv, (1, n_heads, d)), view(qkv, (1, n_kv_heads, d), n_heads * d),
            view(qkv, (1, n_kv_heads, d), (n_heads + n_kv_heads) * d),
            view(qkv, (1, 1, n_heads + n_kv_heads, d)))


def rows(a, start, stop):
    """a[start:stop] along the first axis of a C-contiguous array (on CUDA, a cached view)."""
    if isinstance(a, np.ndarray):
        return a[start:stop]
    row = a.size // a.shape[0] if a.shape[0] else 0
    return view(a, (stop - start,) + tuple(a.shape[1:]), start * row)


def empty(shape, dtype, backend):
    if backend == "cuda":
        from numba import cuda
        return cuda.device_array(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)
