"""masked_softmax against the float64 reference: causal rule (bottom-right), additive masks,
fully masked rows, in place, and a hypothesis property test."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba_attn import MaskCache, causal_mask, masked_softmax
from tests.reference import causal_visible_ref, softmax_ref

RTOL, ATOL = 1e-5, 1e-6      # probabilities in [0, 1]: a few ulp of float32 each


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check(y, want):
    assert y.dtype == np.float32 and not np.isnan(y).any()
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (7, 129), (129, 129), (1, 129), (32, 1, 129),
                                   (2, 3, 7, 129), (2, 1, 2, 7, 9)])
def test_softmax_matches_reference(shape, causal):
    scores = randn(sum(shape), *shape) * np.float32(3)
    before = scores.copy()
    y = masked_softmax(scores, causal=causal)
    assert y.shape == scores.shape and y is not scores
    np.testing.assert_array_equal(scores, before)
    check(y, softmax_ref(scores, causal=causal))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)


def test_causal_is_bottom_right_aligned():
    """q_len < kv_len (prefill over a cached prefix): query i sees keys 0..kv_len-q_len+i."""
    q_len, kv_len = 7, 20
    y = masked_softmax(randn(1, 3, q_len, kv_len))
    visible = causal_visible_ref(q_len, kv_len)
    assert np.all(y[..., ~visible] == 0)
    assert np.all(y[..., visible] > 0)
    assert visible[0].sum() == kv_len - q_len + 1 and visible[-1].all()


@pytest.mark.parametrize("q_len,kv_len", [(7, 3), (129, 1), (5, 4)])
def test_causal_rows_that_see_nothing_are_zero(q_len, kv_len):
    """kv_len < q_len with causal: the first q_len - kv_len queries see no key -> zeros."""
    scores = randn(2, 4, q_len, kv_len)
    y = masked_softmax(scores, causal=True)
    blind = q_len - kv_len
    assert np.all(y[:, :blind] == 0)
    np.testing.assert_allclose(y[:, blind:].sum(-1), 1.0, rtol=1e-5)
    check(y, softmax_ref(scores, causal=True))


@pytest.mark.parametrize("scale", [0.125, 1.0, 1000.0, -2.0, 0.0, 3])
def test_softmax_scale(scale):
    """Large scales need the row maximum subtracted (1000 * N(0,1) overflows exp otherwise)."""
    scores = randn(3, 4, 7, 129)
    check(masked_softmax(scores, scale=scale, causal=True), softmax_ref(scores, scale=scale))


@pytest.mark.parametrize("mask_shape", [(7, 129), (129,), (1, 129), (7, 1), (1,), (1, 1)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_additive_mask_broadcasts(mask_shape, causal):
    scores = randn(4, 2, 7, 129)
    mask = randn(5, *mask_shape)
    mask[np.random.default_rng(6).random(mask_shape) < 0.3] = -np.inf
    y = masked_softmax(scores, causal=causal, mask=mask, scale=0.5)
    check(y, softmax_ref(scores, scale=0.5, causal=causal, mask=mask))


def test_fully_masked_rows_give_zeros_not_nan():
    scores = randn(7, 3, 7, 20)
    mask = np.zeros((7, 20), np.float32)
    mask[2] = -np.inf                     # row 2: nothing visible
    mask[5, :14] = -np.inf                # row 5 (sees keys 0..18 causally): only 14..18 left
    mask[6, :] = -np.inf
    mask[6, 19] = 0.0                     # row 6: only the last key
    for causal in (True, False):
        y = masked_softmax(scores, causal=causal, mask=mask)
        assert not np.isnan(y).any()
        assert np.all(y[:, 2] == 0) and np.all(y[:, 5, :14] == 0)
        np.testing.assert_allclose(y[:, 6, 19], 1.0, rtol=1e-6)
        check(y, softmax_ref(scores, causal=causal, mask=mask))
    # every row masked: all zeros
    y = masked_softmax(scores, causal=False, mask=np.full((20,), -np.inf, np.float32))
    assert np.all(y == 0)


def test_causal_rule_equals_adding_the_causal_mask():
    scores = randn(8, 4, 7, 129)
    inside = masked_softmax(scores, causal=True)
    added = masked_softmax(scores, causal=False, mask=causal_mask(7, 129))
    np.testing.assert_allclose(inside, added, rtol=1e-6, atol=1e-7)
    cached = MaskCache(4).get(7, 129)                   # read-only masks are accepted too
    np.testing.assert_allclose(masked_softmax(scores, causal=False, mask=cached), added, rtol=1e-6)


def test_non_contiguous_mask_is_accepted():
    scores = randn(9, 2, 7, 129)
    mask = randn(10, 7, 258)[:, ::2]                   # (7, 129), every other column
    assert not mask.flags.c_contiguous
    check(masked_softmax(scores, mask=mask), softmax_ref(scores, mask=mask))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(7, 129), (2, 3, 129, 129)])
def test_softmax_in_place(shape, causal):
    scores = randn(11, *shape)
    mask = randn(12, shape[-1])
    want = softmax_ref(scores, scale=0.3, causal=causal, mask=mask)
    y = masked_softmax(scores, causal=causal, scale=0.3, mask=mask, out=scores)
    assert y is scores
    check(scores, want)


def test_softmax_into_out_buffer():
    scores = randn(13, 3, 7, 9)
    out = np.full_like(scores, np.nan)
    assert masked_softmax(scores, out=out) is out
    check(out, softmax_ref(scores))


def test_wrong_reference_is_detected():
    scores = randn(14, 7, 9)
    y = masked_softmax(scores, causal=True)
    for wrong in (softmax_ref(scores, causal=False),
                  softmax_ref(scores, mask=np.triu(np.full((7, 9), -np.inf), 1), causal=False),  # top-left
                  softmax_ref(scores, scale=1.01)):
        with pytest.raises(AssertionError):
            check(y, wrong)


# ---------------------------------------------------------------------------- property test

@st.composite
def softmax_cases(draw):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    q_len, kv_len = draw(st.integers(1, 12)), draw(st.integers(1, 70))
    mask_kind = draw(st.sampled_from(["none", "full", "row", "column"]))
    return dict(shape=tuple(lead) + (q_len, kv_len), mask_kind=mask_kind,
                causal=draw(st.booleans()),
                scale=draw(st.sampled_from([1.0, 0.125, 0.0, 30.0, -1.5])),
                p_inf=draw(st.sampled_from([0.0, 0.2, 0.9, 1.0])),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(deadline=None, max_examples=30)
@given(softmax_cases())
def test_softmax_property(case):
    rng = np.random.default_rng(case["seed"])
    shape = case["shape"]
    q_len, kv_len = shape[-2:]
    scores = rng.standard_normal(shape).astype(np.float32) * np.float32(4)
    mask_shape = {"none": None, "full": (q_len, kv_len), "row": (kv_len,), "column": (q_len, 1)}[case["mask_kind"]]
    mask = None
    if mask_shape is not None:
        mask = rng.standard_normal(mask_shape).astype(np.float32)
        mask[rng.random(mask_shape) < case["p_inf"]] = -np.inf
    y = masked_softmax(scores, causal=case["causal"], scale=case["scale"], mask=mask)
    want = softmax_ref(scores, scale=case["scale"], causal=case["causal"], mask=mask)
    assert y.dtype == np.float32 and not np.isnan(y).any()
    # exp's argument, scale s + mask - max, is rounded in float32 on the way: off by up to a
    # few units of 2^-24 of its largest terms, so each p by that much relative (scale 30 with
    # scores ~ 4 N(0, 1) puts the arguments in the hundreds: ~1e-5 of p)
    finite = np.abs(mask[np.isfinite(mask)]).max(initial=0.0) if mask is not None else 0.0
    big = abs(case["scale"]) * np.abs(scores).max() + finite
    np.testing.assert_allclose(y, want, rtol=RTOL + 4 * 2.0 ** -24 * big, atol=ATOL)
    sums = y.astype(np.float64).sum(-1)
    seen = want.sum(-1) > 0
    np.testing.assert_allclose(sums[seen], 1.0, rtol=1e-5)
    assert np.all(sums[~seen] == 0) and np.all(y >= 0)
