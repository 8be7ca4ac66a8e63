"""The thread pool's choice: small work runs in a parallel kernel's serial twin."""
import numpy as np
import pytest
from numba import njit, prange

from numba_attn.kernels import cpu_pool


@njit(parallel=True)
def _ramp(out, step):
    for i in prange(out.shape[0]):
        out[i] = i * step


@njit
def _plain(out, step):
    out[:] = step


def test_serial_twin_is_the_kernel_without_threads():
    twin = cpu_pool.serial(_ramp)
    assert twin is not _ramp and cpu_pool.serial(_ramp) is twin      # made once
    assert not twin.targetoptions.get("parallel")
    assert twin.py_func.__qualname__ == "_ramp_serial"              # cache files of its own
    a, b = np.empty(37), np.empty(37)
    _ramp(a, 0.5)
    twin(b, 0.5)
    np.testing.assert_array_equal(a, b)
    assert cpu_pool.serial(_plain) is _plain                         # nothing to take away
    assert cpu_pool.serial(len) is len


def test_run_and_bind_pick_by_work():
    @njit(parallel=True)
    def ramp(out, step):
        for i in prange(out.shape[0]):
            out[i] = i * step

    out = np.empty(5)
    cpu_pool.run(ramp, 10, out, 2.0)                              # small: the twin only
    assert not ramp.signatures and cpu_pool.serial(ramp).signatures
    np.testing.assert_array_equal(out, np.arange(5) * 2.0)
    cpu_pool.bind(ramp, cpu_pool.PARALLEL_MIN_WORK, 3.0)(out)      # large: the kernel
    assert ramp.signatures
    np.testing.assert_array_equal(out, np.arange(5) * 3.0)


def test_kernels_take_prange_only_options_that_survive_compiling():
    """The library's parallel kernels run numba's parallel machinery for prange alone, and the
    options object stays as it is after they compile (numba empties a dict it is given, and
    every kernel compiled later would then take all of it)."""
    from numba_attn.kernels import linear_cpu

    @njit(parallel=cpu_pool.PRANGE)
    def ramp(out):
        for i in prange(out.shape[0]):
            out[i] = i

    out = np.empty(300)
    ramp(out)
    np.testing.assert_array_equal(out, np.arange(300))
    assert ramp.targetoptions["parallel"] is cpu_pool.PRANGE
    assert cpu_pool.PRANGE.prange and not (cpu_pool.PRANGE.numpy or cpu_pool.PRANGE.fusion)
    assert linear_cpu._add_bias.targetoptions["parallel"] is cpu_pool.PRANGE
    twin = cpu_pool.serial(ramp)
    assert twin is not ramp and twin.py_func.__qualname__.endswith("ramp_serial")


@njit
def _ramp_part(part, parts, out, step):
    start, stop = cpu_pool.share(out.shape[0], part, parts)
    for i in range(start, stop):
        out[i] = i * step + part


def test_share_cuts_a_range_into_contiguous_parts():
    for n in (0, 1, 7, 64, 1001):
        for parts in (1, 2, 3, 16):
            got = [cpu_pool.share(n, p, parts) for p in range(parts)]
            assert got[0][0] == 0 and got[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
            assert max(b - a for a, b in got) - min(b - a for a, b in got) <= 1


def test_kernel_in_parts_runs_as_one_part_or_on_every_thread():
    """Small work: one part on the calling thread; large: the pool's threads, each its part,
    through the kernel's address (one compile for both, part and parts int64)."""
    from numba import get_num_threads
    parts = get_num_threads()
    out = np.full(37, -1.0)
    cpu_pool.run_parts(_ramp_part, 10, out, 2.0)
    np.testing.assert_array_equal(out, np.arange(37) * 2.0)
    cpu_pool.run_parts(_ramp_part, cpu_pool.PARALLEL_MIN_WORK, out, 3.0)
    want = np.arange(37) * 3.0
    for p in range(parts):
        start, stop = cpu_pool.share(37, p, parts)
        want[start:stop] += p
    np.testing.assert_array_equal(out, want)
    assert len(_ramp_part.signatures) == 1
    out2 = np.full(37, -1.0)
    cpu_pool.bind_parts(_ramp_part, cpu_pool.PARALLEL_MIN_WORK, 3.0)(out2)
    np.testing.assert_array_equal(out2, want)
    cpu_pool.bind_parts(_ramp_part, 1, 0.5)(out2)
    np.testing.assert_array_equal(out2, np.arange(37) * 0.5)


def test_bound_parts_follow_the_head_types_of_each_call():
    """bind_parts finds the kernel's address once per head types: a later call with other
    types runs the kernel compiled for those, not the first call's code."""
    from numba import get_num_threads
    f = cpu_pool.bind_parts(_ramp_part, cpu_pool.PARALLEL_MIN_WORK, 2.0)
    parts = get_num_threads()
    for dtype in (np.float64, np.float32, np.float64):
        out = np.full(11, -1, dtype)
        f(out)
        want = np.arange(11) * 2.0
        for p in range(parts):
            start, stop = cpu_pool.share(11, p, parts)
            want[start:stop] += p
        np.testing.assert_array_equal(out, want.astype(dtype))


def test_address_per_argument_types():
    a = cpu_pool.address(_ramp_part, np.empty(3), 1.0)
    assert a == cpu_pool.address(_ramp_part, np.empty(5), 2.0)          # same types
    b = cpu_pool.address(_ramp_part, np.empty(3, np.float32), 1.0)
    assert b != a and len(_ramp_part.signatures) >= 2
    out = np.zeros(6, np.float32)
    cpu_pool._launch(b, 2, (out, np.float64(1.5)))
    np.testing.assert_array_equal(out, np.arange(6) * 1.5 + [0, 0, 0, 1, 1, 1])


def test_address_refuses_a_kernel_that_returns_a_value():
    @njit
    def value(part, parts, x):
        return x + part

    with pytest.raises(TypeError, match="must return nothing"):
        cpu_pool.address(value, 1.0)


def test_call_part_takes_int64_part_and_parts_only():
    """The kernel at an address is compiled for int64 part and parts; other integer types are
    refused while typing, not passed to code that reads them as int64."""
    from numba.core.errors import TypingError

    @njit
    def launch32(addr, args):
        cpu_pool.call_part(addr, np.int32(0), np.int32(1), args)

    out = np.zeros(4)
    addr = cpu_pool.address(_ramp_part, out, 1.0)
    with pytest.raises(TypingError):
        launch32(addr, (out, 1.0))


@njit
def _scaled(out, x, step):
    for i in range(out.shape[0]):
        out[i] = x[i] * step


def test_call_at_calls_compiled_code_through_its_address():
    """address(..., parts=False) compiles kernel(*args) itself; call_at calls it, and the
    pool's launch of a kernel in parts, from compiled code (as the compiled decode step
    does), neither linked into the caller."""
    x, out = np.arange(5.0), np.zeros(5)
    addr = cpu_pool.address(_scaled, out, x, 2.0, parts=False)
    with pytest.raises(TypeError, match="Signature mismatch"):   # no (part, parts) here
        cpu_pool.address(_scaled, out, x, 2.0)

    @njit
    def call(addr, out, x):
        cpu_pool.call_at(addr, (out, x, 2.0))

    call(addr, out, x)
    np.testing.assert_array_equal(out, x * 2.0)
    ramp = np.zeros(6)
    part = cpu_pool.address(_ramp_part, ramp, 1.0)
    launch = cpu_pool.address(cpu_pool._launch, part, 2, (ramp, 1.0), parts=False)

    @njit
    def pool(launch, part, ramp):
        cpu_pool.call_at(launch, (part, np.int64(2), (ramp, 1.5)))

    pool(launch, part, ramp)
    np.testing.assert_array_equal(ramp, np.arange(6) * 1.5 + [0, 0, 0, 1, 1, 1])
