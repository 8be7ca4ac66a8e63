"""apply_rope and RopeTable against the float64 references (tests/reference.py)."""
import functools
import math

import numpy as np
import pytest

from numba_attn import RopeTable, apply_rope
from tests.reference import (inv_freq_linear_ref, inv_freq_llama3_ref, inv_freq_ref,
                             inv_freq_scaled_ref, rope_cos_sin_ref, rope_half_ref,
                             rope_interleaved_ref)

RTOL, ATOL = 1e-5, 1e-5      # elementwise float32: a rotation is two products and a sum
MAX_POS = 4096
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
LINEAR = {"rope_type": "linear", "factor": 4.0}
REFS = {"half": rope_half_ref, "interleaved": rope_interleaved_ref}


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def table(head_dim, theta=10000.0, scaling_key=None, max_positions=MAX_POS):
    scaling = {"llama3": LLAMA3, "linear": LINEAR}.get(scaling_key)
    return RopeTable(head_dim, max_positions, theta=theta, scaling=scaling)


def recovered_inv_freq(tab):
    """The inverse frequencies a table was built with, read back from its cos/sin columns:
    the angle at position p is p * inv_freq (unwrapped), so its least-squares slope."""
    angles = np.unwrap(np.arctan2(tab.sin.astype(np.float64), tab.cos.astype(np.float64)), axis=0)
    p = np.arange(tab.max_positions, dtype=np.float64)[:, None]
    return (p * angles).sum(axis=0) / (p * p).sum()


# ---------------------------------------------------------------------------- tables

@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 10000.0), (128, 500000.0)])
def test_unscaled_table_matches_reference(head_dim, theta):
    tab = table(head_dim, theta)
    assert tab.cos.shape == tab.sin.shape == (MAX_POS, head_dim // 2)
    assert tab.cos.dtype == tab.sin.dtype == np.float32
    cos, sin = rope_cos_sin_ref(np.arange(MAX_POS), inv_freq_ref(head_dim, theta))
    np.testing.assert_allclose(tab.cos, cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(tab.sin, sin, rtol=0, atol=1e-7)


def test_llama3_reference_covers_all_three_bands():
    """The llama3 settings used below exercise every branch of HF's definition: high
    frequencies kept, low ones divided by the factor, and a smoothly blended middle band."""
    base = inv_freq_ref(128, 500000.0)
    scaled = inv_freq_llama3_ref(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-15)
    assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8.0)
    # the blend is continuous at both band edges (HF's smooth factor is 0 and 1 there)
    assert np.all(np.diff(scaled) < 0)


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0)])
def test_llama3_inverse_frequencies_match_hf(head_dim, theta):
    tab = table(head_dim, theta, "llama3")
    want = inv_freq_llama3_ref(head_dim, theta, **{k: v for k, v in LLAMA3.items() if k != "rope_type"})
    np.testing.assert_allclose(recovered_inv_freq(tab), want, rtol=1e-5, atol=1e-12)
    cos, sin = rope_cos_sin_ref(np.arange(MAX_POS), want)
    np.testing.assert_allclose(tab.cos, cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(tab.sin, sin, rtol=0, atol=1e-7)
    # and the scaling really changed something (this test could not pass by accident)
    ratio = recovered_inv_freq(tab) / recovered_inv_freq(table(head_dim, theta))
    assert ratio.min() < 0.13 and ratio.max() > 0.999      # low band / 8, high band kept


@pytest.mark.parametrize("scaling", [LINEAR, {"type": "linear", "factor": 2.0}],
                         ids=["rope_type", "legacy_type_key"])
def test_linear_inverse_frequencies_match_hf(scaling):
    tab = RopeTable(64, MAX_POS, theta=10000.0, scaling=scaling)
    want = inv_freq_linear_ref(64, 10000.0, scaling["factor"])
    np.testing.assert_allclose(recovered_inv_freq(tab), want, rtol=1e-5, atol=1e-12)
    cos, _ = rope_cos_sin_ref(np.arange(MAX_POS), want)
    np.testing.assert_allclose(tab.cos, cos, rtol=0, atol=1e-7)


def test_default_scaling_type_is_unscaled():
    plain = table(64)
    for scaling in ({"rope_type": "default"}, {}):
        tab = RopeTable(64, MAX_POS, scaling=scaling)
        np.testing.assert_array_equal(tab.cos, plain.cos)
        np.testing.assert_array_equal(tab.sin, plain.sin)


# ---------------------------------------------------------------------------- apply_rope

@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("head_dim,heads", [(64, 32), (128, 8)])
@pytest.mark.parametrize("seq,start_pos", [(1, 0), (7, 0), (7, 1000), (129, 3), (1, MAX_POS - 1)])
def test_apply_rope_matches_reference(style, head_dim, heads, seq, start_pos):
    x = randn(seq * 1000 + start_pos, seq, heads, head_dim)
    x_before = x.copy()
    y = apply_rope(x, table(head_dim), start_pos, style=style)
    assert y.shape == x.shape and y.dtype == np.float32 and y is not x
    np.testing.assert_array_equal(x, x_before)          # not in place unless asked
    want = REFS[style](x, inv_freq_ref(head_dim), start_pos)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("scaling_key,theta", [("llama3", 500000.0), ("linear", 10000.0)])
def test_apply_rope_with_scaling(style, scaling_key, theta):
    scaling = {"llama3": LLAMA3, "linear": LINEAR}[scaling_key]
    x = randn(7, 7, 8, 128)
    start_pos = 3000                                    # long wavelengths matter far out
    y = apply_rope(x, table(128, theta, scaling_key), start_pos, style=style)
    want = REFS[style](x, inv_freq_scaled_ref(128, theta, scaling), start_pos)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_apply_rope_batch_axis(style):
    x = randn(11, 3, 7, 4, 64)                          # (batch, seq, heads, d)
    y = apply_rope(x, table(64), 5, style=style)
    want = REFS[style](x, inv_freq_ref(64), 5)          # every batch row at positions 5..11
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("shape", [(7, 32, 64), (2, 7, 8, 128)])
def test_apply_rope_in_place(style, shape):
    x = randn(12, *shape)
    want = REFS[style](x, inv_freq_ref(shape[-1]), 17)
    y = apply_rope(x, table(shape[-1]), 17, style=style, out=x)
    assert y is x
    np.testing.assert_allclose(x, want, rtol=RTOL, atol=ATOL)


def test_apply_rope_into_out_buffer():
    x = randn(13, 7, 4, 64)
    x_before = x.copy()
    out = np.full_like(x, np.nan)
    y = apply_rope(x, table(64), 2, out=out)
    assert y is out
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_allclose(out, rope_half_ref(x, inv_freq_ref(64), 2), rtol=RTOL, atol=ATOL)


def test_position_zero_is_identity_and_last_position_allowed():
    x = randn(14, 1, 4, 64)
    np.testing.assert_array_equal(apply_rope(x, table(64), 0), x)
    tab = RopeTable(64, 10)
    y = apply_rope(randn(15, 3, 2, 64), tab, 7)         # positions 7, 8, 9: the last ones
    assert np.isfinite(y).all()


def test_two_dimensional_head_agrees_with_both_styles():
    """With head_dim 2 both styles rotate the single pair (0, 1): the references agree with
    each other and with the kernels, and the rotation goes the HF way (x0 cos - x1 sin)."""
    x = randn(16, 5, 3, 2)
    tab = RopeTable(2, 8)
    a = rope_half_ref(x, inv_freq_ref(2), 1)
    np.testing.assert_allclose(a, rope_interleaved_ref(x, inv_freq_ref(2), 1), rtol=1e-12)
    theta = np.arange(1, 6)[:, None]                    # inv_freq is 1 for d = 2
    np.testing.assert_allclose(a[..., 0], x[..., 0] * np.cos(theta) - x[..., 1] * np.sin(theta),
                               rtol=1e-6, atol=1e-6)
    for style in ("half", "interleaved"):
        np.testing.assert_allclose(apply_rope(x, tab, 1, style=style), a, rtol=RTOL, atol=ATOL)


def test_wrong_reference_is_detected():
    """Sanity: the tolerances are tight enough to tell the styles and positions apart."""
    x = randn(17, 7, 8, 64)
    y = apply_rope(x, table(64), 3, style="half")
    inv = inv_freq_ref(64)
    assert np.abs(y - rope_interleaved_ref(x, inv, 3)).max() > 100 * ATOL
    assert np.abs(y - rope_half_ref(x, inv, 4)).max() > 100 * ATOL
    assert np.abs(y - rope_half_ref(x, inv_freq_ref(64, 500000.0), 3)).max() > 100 * ATOL
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(y, rope_interleaved_ref(x, inv, 3), rtol=RTOL, atol=ATOL)
    z = apply_rope(x, table(64), 3, style="interleaved")
    assert np.abs(z - rope_half_ref(x, inv, 3)).max() > 100 * ATOL


# out of place past the L2 caches (x >= 1 MB a thread), style half writes out with non-temporal stores
# of whole 64-byte lines: every 16-byte offset of out from a line, 1 and 2 threads, a batch
# axis, odd row counts, a head dim that is not a power of two; nothing around out is touched
@pytest.mark.parametrize("shift", [0, 4, 8, 12])
@pytest.mark.parametrize("threads,shape", [(2, (2, 65, 32, 128)), (1, (131, 32, 128)),
                                           (2, (1, 173, 32, 96))])
def test_apply_rope_streaming_out_of_place(shift, threads, shape):
    import numba
    x = randn(16 + shift, *shape)
    n = x.size
    buf = np.full(n + 64, 12345.0, np.float32)
    first = (-buf.ctypes.data % 64) // 4                 # floats to the next 64-byte line
    off = first + shift
    out = buf[off:off + n].reshape(shape)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        y = apply_rope(x, table(shape[-1]), 37, out=out)
    finally:
        numba.set_num_threads(before)
    assert y is out
    np.testing.assert_allclose(out, rope_half_ref(x, inv_freq_ref(shape[-1]), 37), rtol=RTOL,
                               atol=ATOL)
    assert (buf[:off] == 12345.0).all() and (buf[off + n:] == 12345.0).all()
