"""Input validation shared by the public functions: every failure says what it got and what it
expected. Works on NumPy arrays and on CUDA arrays (anything with .shape and .dtype)."""
import numpy as np


def is_c_contiguous(x):
    flags = getattr(x, "flags", None)
    if flags is not None:
        return bool(flags["C_CONTIGUOUS"])
    return bool(x.is_c_contiguous())  # numba DeviceNDArray


def array(name, x, *, ndim=None, dtypes=(np.float32,), contiguous=True):
    """Check that x looks like an array of the given rank and dtype; return it."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if ndims is not None and len(x.shape) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and np.dtype(x.dtype) not in [np.dtype(d) for d in dtypes]:
        want = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {np.dtype(x.dtype).name}")
    if contiguous and not is_c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous (got strides {x.strides}); "
                         f"pass np.ascontiguousarray({name})")
    return x


def shape(name, x, expected):
    """expected: tuple with None as a wildcard."""
    got = tuple(x.shape)
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {got}")


def positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def nonnegative_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def out_array(name, out, like_shape, dtype=np.float32):
    """Validate a caller-provided out= buffer."""
    array(name, out, dtypes=(dtype,))
    shape(name, out, tuple(like_shape))
    return out
