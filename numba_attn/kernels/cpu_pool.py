"""The CPU thread pool, for the host wrappers of the parallel kernels: work too small to pay for
waking the pool's threads (a tiny model's decode step) runs on the calling thread alone, in the
kernel's serial twin. On a busy machine a parallel region waits for its slowest thread's next
time slice, milliseconds."""
import types

from numba import njit
from numba.core.caching import NullCache
from numba.core.cpu_options import ParallelOptions
from numba.core.registry import CPUDispatcher

PARALLEL_MIN_WORK = 1 << 18  # multiply-adds below which a kernel runs on one thread
# the kernels' parallel=: numba's parallel machinery for their prange loops only, none of its
# automatic parallelization of array expressions (these kernels have none to give it); each
# parallel kernel compiles faster (decode's 4-row 16-bit GEMV: 3.6-3.9 s against 4.8-5.3)
# (an options object: numba empties a dict it is given)
PRANGE = ParallelOptions({"prange": True, "comprehension": False, "reduction": False,
                          "inplace_binop": False, "setitem": False, "numpy": False,
                          "stencil": False, "fusion": False})

_TWINS = {}


def serial(kernel):
    """A parallel kernel's twin compiled without threads (its prange loops plain loops), cached
    apart: a third of the compile time or less (no parallel machinery), no parallel region when
    called. Anything else is returned as it is."""
    twin = _TWINS.get(kernel)
    if twin is None:
        twin = kernel
        parallel = getattr(kernel, "targetoptions", {}).get("parallel", False)
        if isinstance(kernel, CPUDispatcher) and getattr(parallel, "enabled", parallel):
            f = kernel.py_func
            g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial",
                                   f.__defaults__, f.__closure__)
            g.__qualname__ = f.__qualname__ + "_serial"        # its own cache files
            opts = {k: v for k, v in kernel.targetoptions.items()
                    if k not in ("parallel", "nopython")}
            cached = not isinstance(kernel._cache, NullCache)     # cache=True is not an option
            twin = njit(cache=cached, **opts)(g)
        _TWINS[kernel] = twin
    return twin


def run(kernel, work, *args):
    """kernel(*args), on one thread (its serial twin) when work (multiply-adds or elements) is
    small."""
    return (kernel if work >= PARALLEL_MIN_WORK else serial(kernel))(*args)


def bind(kernel, work, *tail):
    """f(*head) = run(kernel, work, *head, *tail), the choice of threads made once."""
    k = kernel if work >= PARALLEL_MIN_WORK else serial(kernel)
    return lambda *head: k(*head, *tail)
