"""Each sampler obeys its definition, checked against full-sort references in the tests."""
import numpy as np
import pytest

from numba_attn import sampling
from numba_attn.sampling import Sampler, SamplingParams, apply_repeat_penalty, top_p_indices

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


def probs_of(logits, t=1.0):
    z = np.asarray(logits, np.float64) / t
    e = np.exp(z - z.max())
    return e / e.sum()


def nucleus_reference(p, top_p):
    """Smallest set of the most likely tokens whose total reaches top_p (full sort)."""
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    return set(order[:n].tolist())


def logits_(seed, vocab=1000, spread=3.0):
    return (np.random.default_rng(seed).standard_normal(vocab) * spread).astype(np.float32)


def test_greedy_is_argmax():
    for seed in range(20):
        x = logits_(seed)
        assert Sampler(1000, SamplingParams(temperature=0.0))(x) == int(np.argmax(x))


def test_top_k_never_outside_the_k_best():
    for seed in range(20):
        x = logits_(seed)
        best = set(np.argsort(-x)[:5].tolist())
        s = Sampler(1000, SamplingParams(temperature=2.0, **{**OFF, "top_k": 5}, seed=seed))
        picks = {s(x) for _ in range(200)}
        assert picks <= best and len(picks) > 1


def test_top_p_stays_in_the_nucleus():
    for seed in range(20):
        x = logits_(seed, spread=1.5)
        allowed = nucleus_reference(probs_of(x), 0.5)
        s = Sampler(1000, SamplingParams(temperature=1.0, **{**OFF, "top_p": 0.5}, seed=seed))
        assert {s(x) for _ in range(200)} <= allowed


@pytest.mark.parametrize("vocab, spread, top_p", [
    (1000, 3.0, 0.9), (1000, 0.1, 0.9), (50, 1.0, 0.3), (150000, 4.0, 0.95), (7, 1.0, 0.999),
])
def test_top_p_indices_equal_full_sort(vocab, spread, top_p):
    p = probs_of(logits_(vocab, vocab=vocab, spread=spread))
    got = top_p_indices(p, top_p)
    assert set(got.tolist()) == nucleus_reference(p, top_p)
    assert np.all(np.diff(p[got]) <= 0)                   # most likely first


def test_top_p_sorts_only_the_best_candidates(monkeypatch):
    """Partial selection: for a peaked distribution nothing close to the vocabulary is sorted."""
    sizes = []
    real_argsort, real_sort = np.argsort, np.sort
    monkeypatch.setattr(sampling.np, "argsort",
                        lambda a, *k, **kw: sizes.append(len(a)) or real_argsort(a, *k, **kw))
    monkeypatch.setattr(sampling.np, "sort",
                        lambda a, *k, **kw: sizes.append(len(a)) or real_sort(a, *k, **kw))
    x = logits_(3, vocab=128000, spread=4.0)
    s = Sampler(128000, SamplingParams(temperature=0.7, **{**OFF, "top_p": 0.9}, seed=0))
    s(x)
    assert sizes and max(sizes) <= 4096


def test_min_p_keeps_only_likely_tokens():
    for seed in range(20):
        x = logits_(seed, spread=2.0)
        p = probs_of(x, 0.8)
        s = Sampler(1000, SamplingParams(temperature=0.8, **{**OFF, "min_p": 0.2}, seed=seed))
        for _ in range(100):
            assert p[s(x)] >= 0.2 * p.max()


def test_temperature_matches_softmax_distribution():
    x = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    for t in (0.5, 1.0, 2.0):
        s = Sampler(5, SamplingParams(temperature=t, **OFF, seed=1))
        counts = np.bincount([s(x) for _ in range(20000)], minlength=5) / 20000
        np.testing.assert_allclose(counts, probs_of(x, t), atol=0.015)


def test_top_k_then_top_p_renormalised():
    """top-p is taken over the top-k survivors' renormalised probabilities (transformers)."""
    x = np.array([3.0, 2.9, 2.8, 0.0, -5.0], np.float32)
    s = Sampler(5, SamplingParams(temperature=1.0, **{**OFF, "top_k": 2, "top_p": 0.55}, seed=0))
    assert {s(x) for _ in range(300)} == {0, 1}


def test_repeat_penalty_definition():
    scores = np.array([2.0, -2.0, 1.0, -1.0, 0.5])
    apply_repeat_penalty(scores, [0, 1, 1, 4], 2.0)     # each distinct token once
    np.testing.assert_allclose(scores, [1.0, -4.0, 1.0, -1.0, 0.25])


def test_repeat_penalty_only_looks_back_n_tokens():
    x = np.array([5.0, 4.9, 0.0, 0.0], np.float32)
    recent = [0, 2, 3]                                    # token 0 said 3 tokens ago
    p = dict(temperature=0.0, repeat_penalty=1.5)
    assert Sampler(4, SamplingParams(**p, repeat_last_n=3))(x, recent) == 1
    assert Sampler(4, SamplingParams(**p, repeat_last_n=2))(x, recent) == 0
    assert Sampler(4, SamplingParams(**p, repeat_last_n=0))(x, recent) == 0


def test_seed_reproducible_and_logits_untouched():
    x = logits_(0)
    keep = x.copy()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.3, seed=7)
    a = [Sampler(1000, params)(x, [1, 2, 3]) for _ in range(3)]
    s1, s2 = Sampler(1000, params), Sampler(1000, params)
    assert [s1(x) for _ in range(50)] == [s2(x) for _ in range(50)]
    assert len(set(a)) == 1
    np.testing.assert_array_equal(x, keep)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, r"temperature must be in \[0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_k": -1}, "top_k must be in"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0.0, 1.0\]"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"min_p": -0.1}, "min_p must be in"),
    ({"min_p": 1.1}, "min_p must be in"),
    ({"repeat_penalty": 0.0}, "repeat_penalty must be in"),
    ({"repeat_last_n": -1}, "repeat_last_n must be in"),
    ({"seed": -1}, "seed must be in"),
    ({"top_k": True}, "top_k must be an integer"),
])
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
