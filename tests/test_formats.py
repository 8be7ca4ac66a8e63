"""The weight-format table and Q8_0 quantization, byte for byte against an independent NumPy
statement of llama.cpp's rule (and gguf's own quantizer where the package is installed)."""
import ml_dtypes
import numpy as np
import pytest

from numba_attn.formats import FORMATS, Q8Matrix, quantize_q8_0, weight_format


def q8_0_reference(w, scale_dtype=np.float16):
    """llama.cpp's quantize_row_q8_0_ref written out plainly: per 32 weights, d = amax / 127 and
    id = 1 / d in float32, codes = roundf(w * id) with w * id a float32 product; the rounding
    done exactly in float64 (floor(|v| + 0.5) is exact there for |v| <= 127). The scales are
    returned as scale_dtype (float16 as stored; float32 as for activations)."""
    rows, cols = w.shape
    blocks = w.astype(np.float32).reshape(rows, cols // 32, 32)
    amax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    v = (blocks * inv).astype(np.float64)              # the float32 product, then widened
    codes = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return codes.astype(np.int8).reshape(rows, cols), d[..., 0].astype(scale_dtype)


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_table():
    assert weight_format("q8_0").bytes_per_weight == 34 / 32
    assert weight_format("q8_0").block_size == 32
    assert weight_format("bfloat16").bytes_per_weight == 2
    assert weight_format("float32").bytes_per_weight == 4
    assert weight_format(np.zeros((2, 2), ml_dtypes.bfloat16)) is FORMATS["bfloat16"]
    assert weight_format(np.zeros((2, 2), np.float16)) is FORMATS["float16"]
    assert weight_format(np.zeros((2, 2), np.float32)) is FORMATS["float32"]
    assert weight_format(quantize_q8_0(randn(0, 2, 32))) is FORMATS["q8_0"]
    for f in FORMATS.values():
        assert "cpu" in f.devices
    with pytest.raises(ValueError, match="unknown weight format 'q4_0'"):
        weight_format("q4_0")
    with pytest.raises(TypeError, match="int32 have no format"):
        weight_format(np.zeros((2, 2), np.int32))


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 4128), (300, 64), (131, 4096)])
def test_quantize_matches_reference_bytes(shape):
    w = randn(sum(shape), *shape) * np.float32(0.05)
    q = quantize_q8_0(w)
    qs, d = q8_0_reference(w)
    assert q.qs.dtype == np.int8 and q.d.dtype == np.float16
    assert q.shape == shape and q.nbytes == shape[0] * shape[1] // 32 * 34
    np.testing.assert_array_equal(q.qs, qs)
    np.testing.assert_array_equal(q.d.view(np.uint16), d.view(np.uint16))


def test_quantize_ties_negative_max_and_zero_blocks():
    w = np.zeros((3, 64), np.float32)
    # block 0: max |w| is 127 so d = 1 and the codes are w rounded; halves go away from zero
    w[0, :8] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, np.nextafter(np.float32(0.5), 0)]
    w[0, 32:] = randn(1, 32)                             # block 1: ordinary values
    # row 1: the largest magnitude is negative: it gets -127, the positive side less
    w[1, :32] = np.linspace(-3.0, 2.0, 32, dtype=np.float32)
    w[1, 32:] = -randn(2, 32) ** 2
    # row 2: an all-zero block (d = 0, codes 0) next to one with a single tiny weight
    w[2, 40] = 1e-30
    q = quantize_q8_0(w)
    assert list(q.qs[0, :8]) == [127, 1, 2, 3, -1, -2, -3, 0]
    assert q.qs[1, 0] == -127 and q.qs[1].min() == -127 and q.qs[1, :32].max() < 127
    assert q.qs[1, 32:].min() == -127
    assert q.d[2, 0] == 0 and not q.qs[2, :32].any()
    qs, d = q8_0_reference(w)
    np.testing.assert_array_equal(q.qs, qs)
    np.testing.assert_array_equal(q.d.view(np.uint16), d.view(np.uint16))


def test_quantize_matches_gguf_layout():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize
    w = randn(5, 17, 4128) * np.float32(0.02)
    w[3, 100] = 0.25                                   # some exact halves for the rounding
    w[3, 101:110] = np.float32(0.25) * np.arange(9, dtype=np.float32) / 127 * 2.5
    ref = quantize(w, gguf.GGMLQuantizationType.Q8_0)  # (rows, blocks * 34) uint8: d then qs
    q = quantize_q8_0(w)
    rows, nb = q.d.shape
    ours = np.concatenate([q.d.view(np.uint8).reshape(rows, nb, 2),
                           q.qs.view(np.uint8).reshape(rows, nb, 32)], axis=-1)
    np.testing.assert_array_equal(ours.reshape(rows, nb * 34), ref)


def test_dequantize():
    w = randn(6, 9, 96)
    q = quantize_q8_0(w)
    deq = q.dequantize()
    assert deq.dtype == np.float32 and deq.shape == w.shape
    want = q.qs.astype(np.float64) * np.repeat(q.d.astype(np.float64), 32, axis=1)
    np.testing.assert_array_equal(deq, want.astype(np.float32))
    # each weight within half a step d / 2 of the input, plus d's rounding to float16 (2^-11
    # relative) times the code (at most 127)
    step = np.repeat(q.d.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(deq - w) <= step * (0.5 + 127 * 2 ** -11) * (1 + 1e-6))


def test_quantize_accepts_other_float_dtypes():
    w = randn(7, 4, 64)
    for dt in (np.float64, np.float16, ml_dtypes.bfloat16):
        wd = w.astype(dt)
        q = quantize_q8_0(wd)
        qs, d = q8_0_reference(wd.astype(np.float32))
        np.testing.assert_array_equal(q.qs, qs)


def test_quantize_errors():
    with pytest.raises(ValueError, match="multiple of 32, got shape \\(4, 48\\)"):
        quantize_q8_0(randn(0, 4, 48))
    with pytest.raises(ValueError, match="2-D"):
        quantize_q8_0(randn(0, 64))
    with pytest.raises(TypeError, match="float array.*got int8"):
        quantize_q8_0(np.ones((2, 32), np.int8))
    with pytest.raises(TypeError, match="NumPy array"):
        quantize_q8_0([[1.0] * 32])
    for bad in (np.nan, np.inf, -np.inf):
        for w in (randn(1, 3, 64), randn(1, 131, 4096)):   # one thread; the pool's (last part)
            w[-1, -1] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                quantize_q8_0(w)
    w = randn(1, 2, 32)
    w[0, 0] = 1e7
    with pytest.raises(ValueError, match="float16's range"):
        quantize_q8_0(w)


def test_q8matrix_checks_its_parts():
    qs, d = np.zeros((4, 64), np.int8), np.zeros((4, 2), np.float16)
    Q8Matrix(qs, d)
    with pytest.raises(ValueError, match=r"d must have shape \(4, 2\)"):
        Q8Matrix(qs, np.zeros((4, 3), np.float16))
    with pytest.raises(TypeError, match="d must be a 2-D float16"):
        Q8Matrix(qs, d.astype(np.float32))
    with pytest.raises(TypeError, match="qs must be a 2-D int8"):
        Q8Matrix(qs.astype(np.uint8), d)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q8Matrix(np.zeros((4, 40), np.int8), np.zeros((4, 1), np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        Q8Matrix(np.zeros((64, 4), np.int8).T, d)
