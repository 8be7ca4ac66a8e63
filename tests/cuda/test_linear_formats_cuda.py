"""CUDA linear and embedding for the Q8_0 and bfloat16 weight formats (kernels/linear_q8_cuda.py,
linear_bf16_cuda.py) against float64 references on the weights as stored, and their CPU twins.

Q8_0 up to GEMV_MAX_M rows of x quantizes x per 32 values as the CPU twin does (llama.cpp's
Q8_0 x Q8_0 dot product): the reference quantizes x by the same rule in NumPy and sums
isum * d_w * d_x in float64. More rows: float x against the dequantized weights."""
import ml_dtypes
import numpy as np
import pytest

from numba_attn.formats import Q8Matrix, quantize_q8_0
from numba_attn.kernels import linear_bf16_cuda, linear_q8_cuda
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn, rel_err
from tests.reference import linear_ref

GPU = MODE == "gpu"

# out dims, in dims (multiples of 32, Q8_0's block), rows of x: awkward on purpose
OUT, IN, ROWS = (1, 7, 33, 130), (32, 96, 160), (1, 3, 17)
# the simulator runs every thread in Python: each value of each axis, not every combination
SIM_CASES = [(1, 7, 96), (3, 33, 160), (17, 130, 32), (1, 130, 160), (3, 1, 32), (17, 7, 96),
             (2, 33, 32), (5, 7, 64)]
FULL_CASES = [(m, n, k) for m in ROWS for n in OUT for k in IN] + [
    (1, 12288, 4096), (1, 4096, 11008), (4, 1000, 4096), (16, 4096, 4096), (512, 4096, 4096),
    (37, 300, 4096)]
CASES = FULL_CASES if GPU else SIM_CASES


def q8_device(w):
    return linear_q8_cuda.to_device(w)


def quantize_x_ref(x):
    """x (m, k) float32 -> (codes (m, k // 32, 32) int64, scales (m, k // 32) float32) by the
    Q8_0 rule: d = max|x| / 127, codes roundf(x / d) with halves away from zero, in float32."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    v = (xb * inv[..., None]).astype(np.float32)
    q = np.trunc(v)
    q += np.sign(v) * (np.abs(v - q) >= 0.5)
    return q.astype(np.int64), d


def q8_ref(x, w, bias):
    """The Q8_0 x Q8_0 product in float64: sum over blocks of isum * d_w * d_x, + bias."""
    xq, xd = quantize_x_ref(x)
    n, k = w.qs.shape
    wq = w.qs.reshape(n, k // 32, 32).astype(np.int64)
    isum = np.einsum("mbj,nbj->mnb", xq, wq)                         # exact block sums
    y = (isum * w.d.astype(np.float64)[None] * xd.astype(np.float64)[:, None]).sum(-1)
    return y + (bias.astype(np.float64) if bias is not None else 0)


def case_data(m, n, k, bias_on):
    rng = np.random.default_rng(m * 1000003 + n * 1009 + k)
    x = randn(rng, m, k)
    w = quantize_q8_0(randn(rng, n, k) / np.sqrt(k))
    bias = randn(rng, n) if bias_on else np.zeros(0, np.float32)
    return x, w, bias


@pytest.mark.parametrize("bias_on", [True, False])
@pytest.mark.parametrize("m,n,k", CASES)
def test_linear_q8(m, n, k, bias_on):
    x, w, bias = case_data(m, n, k, bias_on)
    out = poisoned((m, n))
    linear_q8_cuda.linear(out, dev(x), q8_device(w), dev(bias))
    got = out.copy_to_host()
    b = bias if bias_on else None
    if m <= linear_q8_cuda.GEMV_MAX_M:     # x quantized as on the CPU
        assert rel_err(got, q8_ref(x, w, b)) < 1e-5
        # and near the float product: each x code is off by at most half its block's scale
        _, xd = quantize_x_ref(x)                                       # (m, k // 32)
        wabs = np.abs(w.dequantize().astype(np.float64)).reshape(n, k // 32, 32).sum(-1)
        bound = xd.astype(np.float64) / 2 @ wabs.T                      # (m, n)
        err = np.abs(got - linear_ref(x, w.dequantize(), b))
        assert (err <= 1.001 * bound + 1e-5 * np.abs(got).max()).all()
    else:                                   # float x, dequantized w
        assert rel_err(got, linear_ref(x, w.dequantize(), b)) < 1e-5


@pytest.mark.parametrize("m,n,k", [(1, 33, 96), (3, 7, 160), (17, 130, 32)] +
                         ([(1, 4096, 4096), (16, 1000, 4096), (512, 1024, 4096)] if GPU else []))
def test_linear_q8_matches_the_cpu_twin(m, n, k, monkeypatch):
    from numba_attn.kernels import linear_q8_cpu, llvm_cpu
    x, w, bias = case_data(m, n, k, True)
    out = poisoned((m, n))
    linear_q8_cuda.linear(out, dev(x), q8_device(w), dev(bias))
    cpu = np.empty((m, n), np.float32)
    linear_q8_cpu.linear(cpu, x, w, bias)
    if m > 16:      # the CPU's prefill on AMX tiles or the AVX-512 BF16 GEMM rounds x and w
        assert rel_err(out.copy_to_host(), cpu) < 1e-2      # to bfloat16: their error
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "portable")   # sgemm: float32 x, as here
        linear_q8_cpu.linear(cpu, x, w, bias)
    np.testing.assert_allclose(out.copy_to_host(), cpu, rtol=1e-4, atol=1e-5)


def test_q8_x_scale_zero_and_halves():
    """A block of x all zeros (scale 0), values landing on .5 after scaling, and the extremes:
    the codes of the CPU's rule."""
    k = 96
    x = np.zeros((1, k), np.float32)
    x[0, 32:64] = np.arange(32) - 15.5               # max 15.5: v * 127 / 15.5 hits halves
    x[0, 64:] = np.linspace(-3, 3, 32)
    w = quantize_q8_0(randn(np.random.default_rng(3), 5, k))
    out = poisoned((1, 5))
    linear_q8_cuda.linear(out, dev(x), q8_device(w), dev(np.zeros(0, np.float32)))
    assert rel_err(out.copy_to_host(), q8_ref(x, w, None)) < 1e-5


# the GEMV's other shapes: rows of w per warp, blocks in flight, threads, lanes per block,
# blocks per SM (a grid of 132 under the simulator: its blocks loop over several groups), L2
# ahead
@pytest.mark.parametrize("shape", [(1, 4, 128, 1, 0, 0), (4, 1, 64, 1, 0, 1),
                                   (2, 4, 256, 1, 0, 0), (2, 2, 256, 2, 0, 1),
                                   (1, 3, 64, 2, 1, 1), (1, 2, 32, 1, 1, 0)])
@pytest.mark.parametrize("m,n,k", [(1, 33, 160), (3, 7, 96)] +
                         ([(1, 12288, 4096), (4, 4096, 11008)] if GPU else []))
def test_gemv_q8_shapes(monkeypatch, shape, m, n, k):
    monkeypatch.setattr(linear_q8_cuda, "GEMV_SHAPE", shape)
    if not GPU:
        monkeypatch.setattr(linear_q8_cuda, "sm_count", lambda: 2)   # capped grids loop
    test_linear_q8(m, n, k, False)


@pytest.mark.parametrize("shape", [linear_q8_cuda.GEMV_SHAPE, (1, 2, 32, 1, 1, 0)])
def test_gemv_q8_several_slabs_unaligned_codes(monkeypatch, shape):
    """k past one slab of x (two quantizing rounds, again for each group of rows of a capped
    grid), and codes whose base is not 16-byte aligned (the byte-load path)."""
    monkeypatch.setattr(linear_q8_cuda, "X_SLAB", 64)
    monkeypatch.setattr(linear_q8_cuda, "GEMV_SHAPE", shape)
    monkeypatch.setattr(linear_q8_cuda, "sm_count", lambda: 2)
    linear_q8_cuda.gemv_kernel.cache_clear()
    try:
        m, n, k = 2, 9, 160
        x, w, bias = case_data(m, n, k, True)
        buf = np.zeros(n * k + 3, np.int8)
        buf[3:] = w.qs.reshape(-1)
        qs = dev(buf)[3:]                            # a view 3 bytes in
        assert not linear_q8_cuda.aligned(qs)
        dw = Q8Matrix(qs.reshape(n, k), dev(w.d))
        out = poisoned((m, n))
        linear_q8_cuda.linear(out, dev(x), dw, dev(bias))
        assert rel_err(out.copy_to_host(), q8_ref(x, w, bias)) < 1e-5
    finally:
        linear_q8_cuda.gemv_kernel.cache_clear()


EMBED = [(1, 32, 5), (3, 96, 11), (2, 320, 7)]
EMBED_FULL = [(512, 4096, 32000), (1, 2048, 128256)]


@pytest.mark.parametrize("seq,hidden,vocab", EMBED + (EMBED_FULL if GPU else []))
def test_embedding_q8(seq, hidden, vocab):
    rng = np.random.default_rng(seq * 31 + hidden)
    table = quantize_q8_0(randn(rng, vocab, hidden))
    tokens = rng.integers(0, vocab, seq)
    tokens[0] = vocab - 1
    if seq > 1:
        tokens[1] = vocab + 5                        # clipped, as on the CPU
    out = poisoned((seq, hidden))
    linear_q8_cuda.embedding(out, q8_device(table), dev(tokens))
    ref = table.dequantize()[np.clip(tokens, 0, vocab - 1)]
    np.testing.assert_array_equal(out.copy_to_host(), ref)


# --- bfloat16 ---------------------------------------------------------------------------

BF16_SIM = [(1, 7, 96), (3, 33, 160), (17, 130, 32), (1, 1, 37), (5, 9, 40)]
BF16_CASES = FULL_CASES if GPU else BF16_SIM


def bf16_data(m, n, k):
    rng = np.random.default_rng(m * 7919 + n * 31 + k)
    x = randn(rng, m, k)
    w = (randn(rng, n, k) / np.sqrt(k)).astype(ml_dtypes.bfloat16)   # NumPy bfloat16
    bias = randn(rng, n)
    return x, w, bias


@pytest.mark.parametrize("m,n,k", BF16_CASES)
def test_linear_bf16(m, n, k):
    x, w, bias = bf16_data(m, n, k)
    out = poisoned((m, n))
    linear_bf16_cuda.linear(out, dev(x), linear_bf16_cuda.to_device(w), dev(bias))
    assert rel_err(out.copy_to_host(), linear_ref(x, w.astype(np.float64), bias)) < 1e-5


def test_linear_bf16_takes_bits_or_bfloat16():
    """The weights as uint16 bits or as a device array of ml_dtypes.bfloat16: the same."""
    x, w, bias = bf16_data(2, 9, 64)
    ref = linear_ref(x, w.astype(np.float64), bias)
    for wd in (dev(w.view(np.uint16)), linear_bf16_cuda.to_device(w)):
        out = poisoned((2, 9))
        linear_bf16_cuda.linear(out, dev(x), wd, dev(bias))
        assert rel_err(out.copy_to_host(), ref) < 1e-5


@pytest.mark.parametrize("m,n,k", [(1, 33, 96), (17, 7, 160)] +
                         ([(1, 4096, 4096), (512, 1024, 4096)] if GPU else []))
def test_linear_bf16_matches_the_cpu_twin(m, n, k):
    from numba_attn.kernels import linear_bf16_cpu
    if not hasattr(linear_bf16_cpu, "linear"):
        pytest.skip("linear_bf16_cpu has no linear yet")
    x, w, bias = bf16_data(m, n, k)
    out = poisoned((m, n))
    linear_bf16_cuda.linear(out, dev(x), linear_bf16_cuda.to_device(w), dev(bias))
    cpu = np.empty((m, n), np.float32)
    linear_bf16_cpu.linear(cpu, x, w, bias)
    if m <= 16:     # the CPU's GEMV: float32 x, as here
        np.testing.assert_allclose(out.copy_to_host(), cpu, rtol=1e-4, atol=1e-5)
    else:           # the CPU's prefill may round x to bfloat16 (AVX-512 BF16): x's error
        assert rel_err(out.copy_to_host(), cpu) < 1e-2


@pytest.mark.parametrize("m,n,k", [(1, 33, 96), (17, 7, 160)])
def test_linear_bf16_family_takes_float16(m, n, k):
    """float16 weights through the 16-bit family, as on the CPU."""
    x, w, bias = bf16_data(m, n, k)
    w16 = w.astype(np.float16)
    out = poisoned((m, n))
    linear_bf16_cuda.linear(out, dev(x), linear_bf16_cuda.to_device(w16), dev(bias))
    assert rel_err(out.copy_to_host(), linear_ref(x, w16.astype(np.float64), bias)) < 1e-5


@pytest.mark.parametrize("seq,hidden,vocab", EMBED + (EMBED_FULL if GPU else []))
def test_embedding_bf16(seq, hidden, vocab):
    rng = np.random.default_rng(seq * 37 + hidden)
    table = randn(rng, vocab, hidden).astype(ml_dtypes.bfloat16)
    tokens = rng.integers(0, vocab, seq)
    tokens[0] = vocab - 1
    out = poisoned((seq, hidden))
    linear_bf16_cuda.embedding(out, linear_bf16_cuda.to_device(table), dev(tokens))
    np.testing.assert_array_equal(out.copy_to_host(),
                                  table.astype(np.float32)[tokens])


# --- through ops: every format on CUDA, against the CPU ----------------------------------

OPS_CASES = [(1, 33, 96), (3, 7, 160)] + ([(1, 4096, 4096), (37, 1000, 4096)] if GPU else [])


def host_weights(n, k):
    """(format name, host weight) for every format: the same values, stored each way."""
    w = randn(np.random.default_rng(n * 13 + k), n, k) / np.float32(np.sqrt(k))
    return [("float32", w), ("bfloat16", w.astype(ml_dtypes.bfloat16)),
            ("float16", w.astype(np.float16)), ("q8_0", quantize_q8_0(w))]


@pytest.mark.parametrize("m,n,k", OPS_CASES)
def test_ops_linear_every_format_matches_the_cpu(m, n, k):
    """ops.linear with a weight put on the GPU by formats.to_device (bfloat16 as its uint16
    bits, a Q8Matrix with device codes and scales): the format is read from the device weight,
    the result is the CPU's on the host weight."""
    from numba_attn import ops
    from numba_attn.formats import to_device, weight_format
    rng = np.random.default_rng(m + n + k)
    x, bias = randn(rng, m, k), randn(rng, n)
    for name, w in host_weights(n, k):
        wd = to_device(w)
        assert weight_format(wd).name == name
        if name == "bfloat16":
            assert wd.dtype == np.uint16
        if name == "q8_0":
            assert isinstance(wd, Q8Matrix) and wd.device == "cuda" and wd.nbytes == w.nbytes
        got = ops.linear(dev(x), wd, dev(bias))
        assert not isinstance(got, np.ndarray)                      # stays on the device
        cpu = ops.linear(x, w, bias)
        if name in ("bfloat16", "q8_0") and m > 16:   # the CPU's AMX or AVX-512 BF16
            # prefill rounds x (and q8_0's dequantized w) to bfloat16
            assert rel_err(got.copy_to_host(), cpu) < 1e-2, name
        else:
            np.testing.assert_allclose(got.copy_to_host(), cpu, rtol=1e-4, atol=1e-5,
                                       err_msg=name)


def test_ops_embedding_every_format_matches_the_cpu():
    from numba_attn import ops
    from numba_attn.formats import to_device
    tokens = np.array([0, 6, 2, 6, 3])
    for name, table in host_weights(7, 64):
        out = ops.embedding(to_device(table), dev(tokens))
        np.testing.assert_array_equal(out.copy_to_host(), ops.embedding(table, tokens),
                                      err_msg=name)


def test_q8matrix_on_either_side():
    """A Q8Matrix of device arrays: built from numba device arrays, round trip, and the errors
    for a matrix on the other side than x, and for dequantizing on the GPU."""
    from numba_attn import ops
    w = quantize_q8_0(randn(np.random.default_rng(5), 3, 64))
    wd = Q8Matrix(dev(w.qs), dev(w.d))
    assert wd.device == "cuda" and wd.shape == (3, 64) and wd.to_device() is wd
    back = wd.copy_to_host()
    assert back.device == "cpu" and back.copy_to_host() is back
    np.testing.assert_array_equal(back.qs, w.qs)
    np.testing.assert_array_equal(back.d, w.d)
    x = randn(np.random.default_rng(6), 2, 64)
    with pytest.raises(ValueError, match=r"w is a Q8Matrix on cpu .* w.to_device\(\)"):
        ops.linear(dev(x), w)
    with pytest.raises(ValueError, match=r"w is a Q8Matrix on cuda .* w.copy_to_host\(\)"):
        ops.linear(x, wd)
    with pytest.raises(ValueError, match=r"table is a Q8Matrix on cpu"):
        ops.embedding(w, dev(np.array([1])))
    with pytest.raises(TypeError, match="copy_to_host"):
        wd.dequantize()
    with pytest.raises(TypeError, match=r"must both be host \(NumPy\) arrays or both CUDA arrays"):
        Q8Matrix(w.qs, dev(w.d))
    with pytest.raises(TypeError, match="d must be a 2-D float16"):
        Q8Matrix(dev(w.qs), dev(w.d.astype(np.float32)))
    with pytest.raises(ValueError, match=r"d must have shape \(3, 2\)"):
        Q8Matrix(dev(w.qs), dev(w.d[:2]))


def test_bfloat16_only_as_device_bits():
    """A uint16 array is a bfloat16 weight on the GPU only; on the host it has no format."""
    from numba_attn import ops
    from numba_attn.formats import weight_format
    bits = np.zeros((3, 32), np.uint16)
    assert weight_format(dev(bits)).name == "bfloat16"
    with pytest.raises(TypeError, match="uint16 have no format"):
        weight_format(bits)
    with pytest.raises(TypeError, match="w must have dtype float32, got uint16; weights on cpu"):
        ops.linear(randn(np.random.default_rng(1), 1, 32), bits)
    with pytest.raises(TypeError, match="w must have dtype float32, got int8; weights on cuda "
                                        r"may be .*bfloat16 as a uint16 array"):
        ops.linear(dev(randn(np.random.default_rng(1), 1, 32)), dev(bits.astype(np.int8)))
