"""CUDA kernel tests. Three ways they run:

- a GPU is present: in this process, at full size (the `full` fixture is True);
- NUMBA_ENABLE_CUDASIM=1 is set: in this process under numba's CUDA simulator, tiny sizes;
- neither (CI): test_simulator.py re-runs this folder in a child process with the simulator
  switched on, so the simulator never leaks into the other tests of the session.
The PTX test (test_ptx.py) compiles every kernel for sm_90 in its own process, without the
simulator: the simulator checks no types, the compiler does."""
import os

import pytest
from numba import config


def _mode():
    if config.ENABLE_CUDASIM:
        return "sim"
    try:
        from numba import cuda
        if cuda.is_available():
            return "gpu"
    except Exception:
        pass
    return "delegate"


MODE = _mode()
HERE = os.path.dirname(os.path.abspath(__file__))

if MODE == "delegate":   # everything runs in test_simulator.py's child process
    collect_ignore = [f for f in os.listdir(HERE)
                      if f.startswith("test_") and f.endswith(".py") and f != "test_simulator.py"]


@pytest.fixture(scope="session")
def full():
    """True on a real GPU: test at full size; False under the simulator: tiny shapes."""
    return MODE == "gpu"


@pytest.fixture(scope="module", autouse=True)
def fast_simulator():
    """Under the simulator, a faster syncthreads barrier and threads kept from block to block
    (sim_barrier.py), for every module: the model's tests launch thousands of blocks, and
    starting a thread for each simulated one costs up to 0.7 ms on some machines."""
    if MODE != "sim":
        yield
        return
    from tests.cuda.sim_barrier import fast_barrier
    with fast_barrier():
        yield
