"""Without a GPU, run this folder's tests under numba's CUDA simulator in a child process."""
import os
import subprocess
import sys

import pytest

from tests.cuda.conftest import HERE, MODE

ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.skipif(MODE != "delegate", reason="the CUDA tests run in this process")
def test_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=2700)
    assert r.returncode == 0, "simulator run failed:\n" + r.stdout[-20000:] + r.stderr[-4000:]
