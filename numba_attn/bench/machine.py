"""What the benchmark ran on: CPU, cores, threads, GPU, library versions, Numba's JIT cache.

Every figure is best effort: a field that cannot be read says so instead of failing."""
import ctypes
import glob
import os
import platform
from importlib import metadata

from ..backend import cuda_unavailable


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def numpy_blas():
    """(name and version, threads) of the BLAS NumPy calls; threads None when unknown."""
    import numpy as np
    name = "unknown"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        pass
    threads = None
    try:
        from threadpoolctl import threadpool_info
        for info in threadpool_info():
            if info.get("user_api") == "blas" and "numpy" in info.get("filepath", ""):
                threads = info.get("num_threads")
    except ImportError:
        libdir = os.path.dirname(np.__file__) + ".libs"
        for path in glob.glob(os.path.join(libdir, "libscipy_openblas*.so")):
            lib = ctypes.CDLL(path)
            for sym in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                        "openblas_get_num_threads64_", "openblas_get_num_threads"):
                if hasattr(lib, sym):
                    threads = int(getattr(lib, sym)())
                    break
    return name, threads


def cuda_available():
    """True when numba-cuda is installed and sees a GPU."""
    return cuda_unavailable() is None


def gpu_name():
    if not cuda_available():
        return None
    from numba import cuda
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = ".".join(str(c) for c in dev.compute_capability)
    return f"{name} (sm {cc})"


def torch_info():
    """(version, threads, cuda) or None when PyTorch is not importable."""
    try:
        import torch
    except Exception:
        return None
    return torch.__version__, torch.get_num_threads(), bool(torch.cuda.is_available())


def describe(devices=("cpu",)):
    """A JSON-able description of the machine and the software."""
    import numba
    import numpy as np

    blas, blas_threads = numpy_blas()
    t = torch_info()
    try:
        layer = numba.threading_layer()
    except ValueError:           # no parallel kernel has run yet
        layer = numba.config.THREADING_LAYER
    from .. import __version__
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "numba_threads": numba.get_num_threads(),
        "threading_layer": layer,
        "blas": blas,
        "blas_threads": blas_threads,
        "gpu": gpu_name() if "cuda" in devices else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numba_attn": __version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "numba_cuda": _version("numba-cuda"),
        "torch": t[0] if t else None,
        "torch_threads": t[1] if t else None,
        "devices": list(devices),
        "load_avg": _load(),
    }


def _load():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def describe_lines(m):
    """The description as a few `# key: value` lines for the top of a table."""
    gpu = m.get("gpu") or "none used"
    torch = f"{m['torch']} ({m['torch_threads']} threads)" if m.get("torch") else "not installed"
    blas_threads = m.get("blas_threads") or "?"
    return [
        f"cpu: {m['cpu']}, {m['cores']} cores usable; numba {m['numba_threads']} threads "
        f"({m['threading_layer']}); NumPy BLAS {m['blas']}, {blas_threads} threads",
        f"gpu: {gpu}",
        f"versions: numba-attn {m['numba_attn']}, python {m['python']}, numba {m['numba']}, "
        f"numpy {m['numpy']}, numba-cuda {m['numba_cuda'] or 'not installed'}, torch {torch}",
    ]


def jit_cache_counts():
    """(cache hits, compilations) summed over the package's CPU kernel dispatchers: whether
    this process loaded the kernels from Numba's on-disk cache or compiled them."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    from .. import kernels as kpkg
    hits = misses = 0
    for mod in pkgutil.iter_modules(kpkg.__path__):
        if not mod.name.endswith("_cpu") and mod.name != "scalar":
            continue
        try:
            m = importlib.import_module(f"{kpkg.__name__}.{mod.name}")
        except ImportError:
            continue
        for obj in vars(m).values():
            if isinstance(obj, CPUDispatcher):
                hits += sum(obj.stats.cache_hits.values())
                misses += sum(obj.stats.cache_misses.values())
    return hits, misses
