"""CUDA linear (GEMV for a few rows, GEMM for many) with float32, float16 and bfloat16 weights,
against the float64 reference on the weights as stored, and the CPU kernel."""
import numpy as np
import pytest

from numba_attn.kernels import linear_cpu, linear_cuda
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn, rel_err, stored
from tests.reference import linear_ref

GPU = MODE == "gpu"

# (m, n, k, bias): GEMV (m <= 4) with k a multiple of 8 (16-byte loads) and not, several x
# slabs, rows not a multiple of the block; GEMM (m > 4) with ragged tiles
LINEAR = [(1, 9, 2600, True), (1, 7, 37, False), (3, 5, 64, True), (1, 17, 8, False),
          (9, 33, 40, True), (40, 45, 19, False)]
LINEAR_FULL = [(1, 12288, 4096, False), (1, 4096, 11008, True), (4, 1000, 4100, True),
               (128, 12288, 4096, False), (37, 300, 4096, True)]


# the simulator is slow: each tiny case with one storage type, each type twice; on a GPU the
# full-size cases with every type
CASES = [(c, ("f32", "f16", "bf16")[i % 3]) for i, c in enumerate(LINEAR)]
CASES += [(LINEAR[0], "f16")]      # 16-bit weights: 8 chunks in flight, two x slabs
if GPU:
    CASES += [(c, t) for c in LINEAR_FULL for t in ("f32", "f16", "bf16")]


@pytest.mark.parametrize("case,wdtype", CASES)
def test_linear(case, wdtype):
    m, n, k, has_bias = case
    rng = np.random.default_rng(m * 1000003 + n * 1009 + k)
    x = randn(rng, m, k)
    w, w64 = stored(randn(rng, n, k) / np.sqrt(k), wdtype)
    bias = randn(rng, n) if has_bias else np.zeros(0, np.float32)
    out = poisoned((m, n))
    linear_cuda.linear(out, dev(x), dev(w), dev(bias))
    got = out.copy_to_host()
    ref = linear_ref(x, w64, bias if has_bias else None)
    assert rel_err(got, ref) < 1e-5
    cpu = np.empty((m, n), np.float32)               # the CPU kernel on the widened weights
    linear_cpu.linear(cpu, x, w64.astype(np.float32), bias)
    np.testing.assert_allclose(got, cpu, rtol=1e-4, atol=1e-4)


# the GEMV's other block shapes: several rows of w per warp, more or fewer chunks per step,
# other block sizes
@pytest.mark.parametrize("shape", [(2, 4, 256), (4, 2, 128), (1, 8, 512), (2, 2, 128)])
@pytest.mark.parametrize("case,wdtype", [(LINEAR[0], "f16"), (LINEAR[2], "f32")] +
                         ([(LINEAR_FULL[1], "f32"), (LINEAR_FULL[0], "bf16")] if GPU else []))
def test_gemv_shapes(monkeypatch, shape, case, wdtype):
    monkeypatch.setattr(linear_cuda, "GEMV_SHAPE", {4: shape, 2: shape})
    test_linear(case, wdtype)
