"""A kernel module's source as the working tree or a git revision has it (possibly edited),
loaded as a module of its own beside the package's: for timing variants of a kernel in turn in
one process (tune_decode_attention.py, profile_quantize_x.py, both in this folder)."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_source(relative, rev=None):
    """The text of the repository's file `relative` (e.g. "numba_attn/kernels/attention_cpu.py"):
    the working tree's, or git revision rev's."""
    if rev is None:
        with open(os.path.join(ROOT, relative)) as f:
            return f.read()
    return subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{relative}"], check=True,
                          capture_output=True, text=True).stdout


def load_kernel(src, name, folder):
    """The source of a module of numba_attn.kernels, its relative imports made absolute, written
    to folder/name.py and imported as module `name` (its own Numba cache entries: a file of its
    own)."""
    src = src.replace("from .. import", "from numba_attn import")
    src = src.replace("from ..", "from numba_attn.")
    src = src.replace("from . import", "from numba_attn.kernels import")
    src = src.replace("from .", "from numba_attn.kernels.")
    path = os.path.join(folder, name + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
