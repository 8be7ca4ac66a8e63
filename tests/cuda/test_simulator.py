"""Without a GPU, run this folder's tests under numba's CUDA simulator in a child process.

The simulator runs each CUDA thread as a Python thread: one core, bound by the GIL, for many
minutes. So when this test is selected the child starts at collection (tests/conftest.py calls
start_child) and runs beside the session's other tests; this test, moved to the end, waits
for it."""
import os
import subprocess
import sys
import tempfile

import pytest

from tests.cuda.conftest import HERE, MODE

ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT = 4800          # seconds the child may run, from its start
_child = None           # (Popen, its output file) once started


def start_child():
    """Start the simulator's run of this folder, once."""
    global _child
    if _child is None and MODE == "delegate":
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        out = tempfile.TemporaryFile(mode="w+")
        _child = (subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    HERE], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, text=True), out)


def stop_child():
    """End a child run nobody waited for (the session stopped first)."""
    if _child is not None and _child[0].poll() is None:
        _child[0].kill()
        _child[0].wait()


@pytest.mark.skipif(MODE != "delegate", reason="the CUDA tests run in this process")
def test_cuda_kernels_under_the_simulator():
    start_child()
    proc, out = _child
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_child()
        rc = None
    out.seek(0)
    log = out.read()
    assert rc == 0, f"simulator run failed (exit {rc}):\n" + log[-24000:]
