"""Host/device dispatch. NumPy arrays run the CPU kernels; CUDA arrays (numba device arrays or any
object with __cuda_array_interface__: CuPy, PyTorch CUDA tensors) run the CUDA kernels."""
import importlib

import numpy as np


def is_cuda_array(x):
    return hasattr(x, "__cuda_array_interface__")


def backend_of(*arrays):
    """'cpu' or 'cuda' for a set of arguments (None entries ignored); mixing is an error."""
    kinds = {("cuda" if is_cuda_array(a) else "cpu") for a in arrays if a is not None}
    if len(kinds) > 1:
        raise ValueError("arguments mix host (NumPy) and device (CUDA) arrays; "
                         "move them all to one side first (numba.cuda.to_device / .copy_to_host())")
    return kinds.pop() if kinds else "cpu"


def kernels(family, backend):
    """The kernel module of a family for a backend: kernels/<family>_cpu or <family>_cuda."""
    return importlib.import_module(f"numba_attn.kernels.{family}_{backend}")


def as_device(x):
    """A numba device-array view of any __cuda_array_interface__ object (no copy)."""
    from numba import cuda
    if cuda.is_cuda_array(x) and not hasattr(x, "copy_to_host"):
        return cuda.as_cuda_array(x)
    return x


def empty(shape, dtype, backend):
    if backend == "cuda":
        from numba import cuda
        return cuda.device_array(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)
