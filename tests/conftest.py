"""Shared fixtures: tiny random Llama-family model folders (see tiny_model.py); the CUDA
simulator run started at collection, beside the other tests (tests/cuda/test_simulator.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import tiny_model` from any test module

from tiny_model import build_tiny_model  # noqa: E402

SIMULATOR_TEST = "test_simulator.py::test_cuda_kernels_under_the_simulator"
_simulator = []         # the module of the simulator's test, once its child started


@pytest.hookimpl(trylast=True)          # after -k and -m have deselected
def pytest_collection_modifyitems(session, config, items):
    """The CUDA tests' simulator run (tests/cuda/test_simulator.py), when selected, starts now
    in its child process and its test goes last: it runs beside the others."""
    sim = [item for item in items if item.nodeid.endswith(SIMULATOR_TEST)]
    if sim:
        items[:] = [item for item in items if item not in sim] + sim
        sim[0].module.start_child()
        _simulator.append(sim[0].module)


def pytest_sessionfinish(session, exitstatus):
    for module in _simulator:
        module.stop_child()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The default tiny model: Llama, hidden 64, 2 layers, 4 heads / 2 KV heads, float32."""
    folder, _ = build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    from numba_attn.model import Model
    return Model.from_pretrained(tiny_folder)


@pytest.fixture
def make_folder(tmp_path):
    """make_folder(name, **build_tiny_model kwargs) -> (folder, stored weights)."""
    def make(name="m", **kwargs):
        return build_tiny_model(str(tmp_path / name), **kwargs)
    return make


@pytest.fixture(params=["fast", "portable"])
def cpu_path(request, monkeypatch):
    """Both CPU paths: the instructions this CPU offers (VNNI, AVX-512 BF16) and the portable
    loops every x86-64 CPU runs."""
    from numba_attn.kernels import llvm_cpu
    monkeypatch.setattr(llvm_cpu, "CPU_PATH", request.param)
    return request.param
