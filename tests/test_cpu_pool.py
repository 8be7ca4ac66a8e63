"""The thread pool's choice: small work runs in a parallel kernel's serial twin."""
import numpy as np
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
    assert linear_cpu._gemv.targetoptions["parallel"] is cpu_pool.PRANGE
    twin = cpu_pool.serial(ramp)
    assert twin is not ramp and twin.py_func.__qualname__.endswith("ramp_serial")
