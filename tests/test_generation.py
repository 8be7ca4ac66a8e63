"""generate() honours every sampling option as its definition says, on the built-in demo model
(a real, peaked next-token distribution whose greedy continuation loops):

- repeat_penalty / repeat_last_n: each step's choice is the argmax of the logits with the
  distinct tokens of the last repeat_last_n (prompt and generated) divided (positive) or
  multiplied (negative) by the penalty; a huge penalty never repeats a token in the window;
- top_k=1, a tiny top_p and min_p=1 each leave one candidate: greedy at any temperature;
- every sampled token lies inside the top-k / nucleus / min-p set of the logits it was drawn
  from, while with the filter off the same temperature leaves those sets;
- seeds reproduce, different seeds (and no seed) differ, temperature 0 ignores the seed.

The logits each step sampled from are recorded by a thin wrapper around the model (Recorder),
so the expectations are computed here, independently of numba_attn.sampling."""
import numpy as np
import pytest

import numba_attn
from numba_attn import Model, SamplingParams, Tokenizer, generate

PROMPT_TEXT = "It is a truth universally acknowledged"
N = 40                                   # tokens generated per run
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


class Recorder:
    """The model, keeping a float64 copy of the logits of every forward pass: the logits the
    sampler chose each generated token from (prefill for the first, then one per step)."""

    def __init__(self, model):
        self.model, self.config, self.max_seq = model, model.config, model.max_seq
        self.logits = []

    def forward(self, tokens, start_pos=0):
        out = self.model.forward(tokens, start_pos)
        self.logits.append(np.array(out, np.float64))
        return out


@pytest.fixture(scope="module")
def demo():
    return Model.from_pretrained(numba_attn.DEMO_MODEL)


@pytest.fixture(scope="module")
def prompt(demo):
    return Tokenizer(numba_attn.DEMO_MODEL, demo.config.bos_token_id).encode(PROMPT_TEXT)


def run(model, prompt, n=N, **params):
    return list(generate(model, prompt, max_tokens=n, sampling=SamplingParams(**params),
                         eos_token_ids=()))


def traced(model, prompt, n=N, **params):
    """(tokens, logits): logits[i] is what tokens[i] was sampled from."""
    rec = Recorder(model)
    tokens = run(rec, prompt, n, **params)
    assert len(rec.logits) == len(tokens)
    return tokens, rec.logits


@pytest.fixture(scope="module")
def greedy(demo, prompt):
    return run(demo, prompt, temperature=0.0)


def repeats(prompt, tokens, window):
    """How many generated tokens already occur among the `window` tokens before them."""
    seq = list(prompt) + list(tokens)
    return sum(seq[i] in seq[max(0, i - window):i] for i in range(len(prompt), len(seq)))


def penalised(logits, history, penalty, last_n):
    """The repetition penalty's definition (CTRL / transformers), written out per token."""
    s = np.array(logits, np.float64)
    for t in set(history[-last_n:] if last_n else []):
        s[t] = s[t] / penalty if s[t] > 0 else s[t] * penalty
    return s


def probs(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


# -- repetition penalty --

def test_greedy_demo_continuation_repeats(prompt, greedy):
    """The premise of the penalty tests: without a penalty the greedy text loops."""
    assert repeats(prompt, greedy, 16) >= 10


@pytest.mark.parametrize("last_n", [8, 16, 64])
def test_huge_repeat_penalty_never_repeats_in_the_window(demo, prompt, greedy, last_n):
    tokens = run(demo, prompt, temperature=0.0, repeat_penalty=1e9, repeat_last_n=last_n)
    assert repeats(prompt, tokens, last_n) == 0, tokens
    assert tokens != greedy


@pytest.mark.parametrize("penalty, last_n", [(1.5, 8), (3.0, 64), (1.3, 3), (0.7, 16),
                                             (2.0, 1000)])
def test_repeat_penalty_greedy_choice_is_its_definition(demo, prompt, greedy, penalty, last_n):
    """Each step: argmax of the step's logits penalised over the last last_n tokens of
    prompt + generated so far (a window longer than the history takes all of it). A window
    of 3 is shorter than the greedy loop's period (12 tokens): there it may change nothing."""
    tokens, logits = traced(demo, prompt, temperature=0.0, repeat_penalty=penalty,
                            repeat_last_n=last_n)
    history = list(prompt)
    for i, (tok, lg) in enumerate(zip(tokens, logits)):
        assert tok == int(np.argmax(penalised(lg, history, penalty, last_n))), f"step {i}"
        history.append(tok)
    if penalty > 1 and last_n >= 8:
        assert tokens != greedy                   # the penalty changed this continuation
        assert repeats(prompt, tokens, min(last_n, 16)) < repeats(prompt, greedy,
                                                                  min(last_n, 16))


def test_repeat_penalty_off_is_greedy(demo, prompt, greedy):
    assert run(demo, prompt, temperature=0.0, repeat_penalty=1.0, repeat_last_n=64) == greedy
    assert run(demo, prompt, temperature=0.0, repeat_penalty=5.0, repeat_last_n=0) == greedy


def test_repeat_penalty_applies_to_sampling_too(demo, prompt):
    """Penalty before top-k: top_k=1 at a high temperature is the penalised greedy choice."""
    want = run(demo, prompt, temperature=0.0, repeat_penalty=1e9, repeat_last_n=16)
    for seed in range(3):
        assert run(demo, prompt, temperature=3.0, top_k=1, top_p=1.0, min_p=0.0,
                   repeat_penalty=1e9, repeat_last_n=16, seed=seed) == want


# -- filters that leave one candidate: greedy at any temperature --

@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 1000.0])
def test_top_k_1_is_greedy(demo, prompt, greedy, temperature):
    for seed in range(3):
        assert run(demo, prompt, temperature=temperature, **{**OFF, "top_k": 1},
                   seed=seed) == greedy


@pytest.mark.parametrize("temperature", [1.0, 5.0, 1000.0])
def test_tiny_top_p_is_greedy(demo, prompt, greedy, temperature):
    for seed in range(3):
        assert run(demo, prompt, temperature=temperature, **{**OFF, "top_p": 1e-6},
                   seed=seed) == greedy


@pytest.mark.parametrize("temperature", [1.0, 5.0, 1000.0])
def test_min_p_1_is_greedy(demo, prompt, greedy, temperature):
    for seed in range(3):
        assert run(demo, prompt, temperature=temperature, **{**OFF, "min_p": 1.0},
                   seed=seed) == greedy


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_hot_sampling_without_filters_is_not_greedy(demo, prompt, greedy, temperature):
    """The control for the three tests above: those filters are what makes them greedy."""
    for seed in range(3):
        assert run(demo, prompt, temperature=temperature, **OFF, seed=seed) != greedy


# -- every sampled token inside its filter's set; outside it with the filter off --

def in_top_k(logits, tok, k):
    return int(np.sum(logits > logits[tok])) < k


def in_nucleus(p, tok, top_p):
    """tok belongs to the smallest most-likely-first set whose total reaches top_p."""
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    return tok in set(order[:n].tolist())


def allowed(logits, tok, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The definitions in transformers' order: top-k on the logits, then top-p and min-p on
    the probabilities renormalised over the top-k candidates."""
    if top_k and not in_top_k(logits, tok, top_k):
        return False
    cand = np.argsort(-logits, kind="stable")[:top_k] if top_k else np.arange(len(logits))
    p = probs(logits[cand], temperature)
    j = int(np.flatnonzero(cand == tok)[0])
    if top_p < 1.0 and not in_nucleus(p, j, top_p):
        return False
    return not (min_p > 0.0 and p[j] < min_p * p.max())


FILTERS = {
    "top-k-3": dict(top_k=3),
    "top-k-10": dict(top_k=10),
    "top-p-0.5": dict(top_p=0.5),
    "top-p-0.9": dict(top_p=0.9),
    "min-p-0.1": dict(min_p=0.1),
    "min-p-0.5": dict(min_p=0.5),
    "all-three": dict(top_k=20, top_p=0.8, min_p=0.05),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_sampled_tokens_obey_the_filter(demo, prompt, name):
    temperature, f = 1.5, FILTERS[name]
    escaped = 0                                  # draws outside the set with the filter off
    for seed in range(4):
        tokens, logits = traced(demo, prompt, temperature=temperature, **{**OFF, **f},
                                seed=seed)
        for i, (tok, lg) in enumerate(zip(tokens, logits)):
            assert allowed(lg, tok, temperature, **f), f"seed {seed} step {i}: token {tok}"
        tokens, logits = traced(demo, prompt, temperature=temperature, **OFF, seed=seed)
        escaped += sum(not allowed(lg, tok, temperature, **f)
                       for tok, lg in zip(tokens, logits))
    assert escaped > 0, "the filter never mattered at this temperature: a weak test"


def test_first_token_frequency_follows_temperature(demo):
    """One token, top_k=2, temperature 8: the best token is drawn with probability
    p1 / (p1 + p2) of the tempered softmax, 0.55 here (binomial, 250 seeds, within 5 sigma =
    0.16); at temperature 1 it would be 0.83, beyond that bound. The prompt: the golden
    logits' (tests/data/demo_golden.json), whose two best logits are 7.92 and 6.33."""
    prompt = Tokenizer(numba_attn.DEMO_MODEL, demo.config.bos_token_id).encode(
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune")
    rec = Recorder(demo)
    run(rec, prompt, 1, temperature=0.0)
    top2 = np.argsort(-rec.logits[0])[:2]
    temperature = 8.0
    p = probs(rec.logits[0][top2], temperature)[0]
    assert abs(probs(rec.logits[0][top2], 1.0)[0] - p) > 0.2     # temperature matters here
    draws = [run(demo, prompt, 1, temperature=temperature, **{**OFF, "top_k": 2}, seed=s)[0]
             for s in range(250)]
    assert set(draws) <= set(top2.tolist())
    freq = draws.count(int(top2[0])) / len(draws)
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / len(draws)), (freq, p)


# -- seeds and temperature --

def test_seed_reproduces_across_model_instances(demo, prompt):
    params = dict(temperature=1.2, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=7)
    a = run(demo, prompt, **params)
    assert run(demo, prompt, **params) == a
    other = Model(demo.config, demo.weights)     # its own KV cache and buffers
    assert run(other, prompt, **params) == a
    assert run(demo, prompt, **{**params, "seed": 8}) != a


def test_no_seed_draws_a_fresh_one(demo, prompt):
    runs = {tuple(run(demo, prompt, temperature=1.5, **OFF, seed=None)) for _ in range(3)}
    assert len(runs) == 3


def test_temperature_0_ignores_the_seed_and_filters(demo, prompt, greedy):
    for seed in (0, 1, None):
        assert run(demo, prompt, temperature=0.0, top_k=5, top_p=0.3, min_p=0.2,
                   seed=seed) == greedy


def test_greedy_on_the_tiny_model_too(tiny_model):
    """The same identities on a second model (random weights, vocab 300)."""
    ids = [0, 17, 5, 220, 31]
    want = run(tiny_model, ids, 20, temperature=0.0)
    assert run(tiny_model, ids, 20, temperature=4.0, **{**OFF, "top_k": 1}, seed=3) == want
    assert run(tiny_model, ids, 20, temperature=4.0, **{**OFF, "top_p": 1e-6}, seed=3) == want
    assert run(tiny_model, ids, 20, temperature=4.0, **OFF, seed=3) != want
    pen = run(tiny_model, ids, 20, temperature=0.0, repeat_penalty=1e9, repeat_last_n=10)
    assert repeats(ids, pen, 10) == 0
