"""Every CUDA kernel compiles to PTX for sm_90 (typing errors, float64 promotion, local memory),
checked in a child process without the simulator and without a GPU. The child starts when this
module is collected, so it compiles while the other tests run."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
_child = subprocess.Popen([sys.executable, os.path.join(HERE, "ptx_all.py")], env=_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_every_kernel_compiles_to_ptx_for_sm90():
    out, _ = _child.communicate(timeout=900)
    assert _child.returncode == 0, out
