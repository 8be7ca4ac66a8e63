"""The CPU thread pool, for the host wrappers of the parallel kernels: work too small to pay for
waking the pool's threads (a tiny model's decode step) runs on the calling thread alone. On a
busy machine a parallel region waits for its slowest thread's next time slice, milliseconds.

Two forms of parallel kernel:
- a prange kernel (`parallel=PRANGE`); small work runs in its serial twin (`serial`, `run`,
  `bind`), the same function compiled without threads;
- a kernel in parts, `kernel(part, parts, *args)` doing share `part` of `parts` (`share`): one
  compile serves both one thread (`kernel(0, 1, *args)`) and the pool, whose threads call it
  through its address (`run_parts`, `bind_parts`; `call_part` from a driver of one's own).
  Numba optimizes and compiles a function again inside every caller that links it, and a
  parallel kernel twice more (its loop body and the wrapper): a large kernel (the GEMVs'
  intrinsics, the attention schedules) compiles once this way instead of three or four times."""
import types

import numpy as np
from numba import get_num_threads, njit, prange
from numba import types as nbtypes
from numba.core import cgutils
from numba.core.caching import NullCache
from numba.core.cpu_options import ParallelOptions
from numba.core.registry import CPUDispatcher
from numba.core.typing.typeof import Purpose, typeof
from numba.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads

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


@njit(inline="always")
def share(n, part, parts):
    """(start, stop): share part of range(n) cut into parts contiguous ranges."""
    return n * part // parts, n * (part + 1) // parts


@intrinsic
def call_part(typingctx, addr, part, parts, args):
    """addr(part, parts, *args): the kernel in parts compiled at addr (`address`), called through
    that address in numba's calling convention, its code not linked into the caller."""
    argtys = (part, parts) + tuple(args.types)

    def codegen(context, builder, signature, llargs):
        vals = [*llargs[1:3], *cgutils.unpack_tuple(builder, llargs[3], len(args.types))]
        fnty = context.call_conv.get_function_type(nbtypes.none, argtys)
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        status, _ = context.call_conv.call_function(builder, fn, nbtypes.none, argtys, vals)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()
    # part and parts int64, as address() compiles the kernel for: other types would not match
    # the code at addr, so they do not type here
    if isinstance(addr, nbtypes.Integer) and part == parts == nbtypes.int64 \
            and isinstance(args, nbtypes.BaseTuple):
        return nbtypes.none(addr, part, parts, args), codegen


@intrinsic
def call_at(typingctx, addr, args):
    """addr(*args): a function compiled at addr (`address(..., parts=False)`), called through
    that address in numba's calling convention, its code not linked into the caller."""
    def codegen(context, builder, signature, llargs):
        vals = cgutils.unpack_tuple(builder, llargs[1], len(args.types))
        fnty = context.call_conv.get_function_type(nbtypes.none, tuple(args.types))
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        status, _ = context.call_conv.call_function(builder, fn, nbtypes.none,
                                                    tuple(args.types), vals)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()
    if isinstance(addr, nbtypes.Integer) and isinstance(args, nbtypes.BaseTuple):
        return nbtypes.none(addr, args), codegen


@njit(parallel=PRANGE, cache=True)
def _launch(addr, parts, args):
    for part in prange(parts):     # part as int64, the type address() compiled for
        call_part(addr, np.int64(part), parts, args)


_ADDRESSES = {}


def _type_key(a):
    # what numba's type of an argument depends on, cheaper to read than typeof (8 us an array)
    if isinstance(a, np.ndarray):
        return a.dtype, a.ndim, a.flags.num
    return tuple(map(_type_key, a)) if isinstance(a, tuple) else type(a)


def address(kernel, *args, parts=True):
    """The address of kernel(part, parts, *args) compiled (or loaded from Numba's cache) for
    these arguments' types, part and parts int64; of kernel(*args) with parts=False (call_at).
    A driver that passes arrays of its own makes (call_part, call_at) gives arrays of their
    types here: the call trusts the types."""
    key = (kernel, parts, *map(_type_key, args))
    addr = _ADDRESSES.get(key)
    if addr is None:
        # the pool's threads first: code loaded from Numba's cache that links a parallel
        # region (_launch) finds the pool's entry points only once they exist
        _launch_threads()
        sig = ((nbtypes.int64, nbtypes.int64) if parts else ()) + \
            tuple(typeof(a, Purpose.argument) for a in args)
        kernel.compile(sig)
        cres = kernel.overloads[sig]
        if cres.signature.return_type != nbtypes.none:
            raise TypeError(f"{kernel.py_func.__name__} must return nothing to be called "
                            f"through its address")
        addr = _ADDRESSES[key] = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    return addr


def run_parts(kernel, work, *args):
    """kernel(part, parts, *args) for every part: on the pool's threads, or as one part on the
    calling thread when work is small."""
    if work < PARALLEL_MIN_WORK:
        kernel(0, 1, *args)
    else:
        _launch(address(kernel, *args), get_num_threads(), args)


def bind_parts(kernel, work, *tail):
    """f(*head) = run_parts(kernel, work, *head, *tail), the choice of threads made once, the
    kernel's address found once for each types of head (a decode step calls the same GEMV
    with the same buffers every token, after caches emptied by the weights streamed before
    it: each Python step costs microseconds there)."""
    if work < PARALLEL_MIN_WORK:
        return lambda *head: kernel(0, 1, *head, *tail)
    seen = {}                         # the head's type keys -> the kernel's address

    def call(*head):
        key = tuple(map(_type_key, head))
        addr = seen.get(key)
        if addr is None:
            addr = seen[key] = address(kernel, *head, *tail)
        _launch(addr, get_num_threads(), head + tail)
    return call


def skewed_row(k, skew):
    """A (1, k) float32 buffer whose data starts `skew` bytes past a 32-byte boundary (a
    decode GEMV's x, where the family asks for it: linear_bf16_cpu.DECODE_X_SKEW)."""
    raw = np.empty(k + 8, np.float32)
    start = (skew - raw.ctypes.data) % 32 // 4
    return raw[start:start + k].reshape(1, k)


def bind_gemv(kernel, work, tail, x_skew, x_more=None):
    """gemv(out, x) for a family's decode GEMV (its `decode_gemv(w)`: the kernel in parts, its
    multiply-adds, the weight's arguments after out and x, the skew its x wants, 0 for none,
    and nothing more after x): run_parts(kernel, work, out, x, *tail), x first copied to a
    skewed row if asked."""
    if x_more is not None:
        raise ValueError(f"{kernel.py_func.__name__} takes more than x; its family binds it")
    gemv = bind_parts(kernel, work, *tail)
    if not x_skew:
        return gemv
    xs = []                           # the skewed row, made at the first call (x's width)

    def gemv_skewed(out, x):
        if not xs:
            xs.append(skewed_row(x.shape[1], x_skew))
        np.copyto(xs[0], x)
        gemv(out, xs[0])
    return gemv_skewed
