"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

The order is the one Hugging Face transformers applies: repetition penalty on the raw logits,
then temperature, then top-k, top-p and min-p on the (renormalised) probabilities, then one
draw. Top-k and top-p use partial selection (np.argpartition) and sort only the few best
candidates, never the whole vocabulary.
"""
import math
from dataclasses import dataclass

import numpy as np

NUCLEUS_FIRST = 64  # top-p sorts the 64 best first and widens 8x until they reach top_p


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8     # 0 = greedy (argmax); otherwise logits / temperature
    top_k: int = 40              # keep the k most likely tokens; 0 = off
    top_p: float = 0.95          # keep the smallest set whose probability reaches top_p; 1 = off
    min_p: float = 0.05          # keep tokens with p >= min_p * p_max; 0 = off
    repeat_penalty: float = 1.0  # divide positive / multiply negative logits of recent tokens
    repeat_last_n: int = 64      # how many recent tokens the penalty looks at; 0 = off
    seed: int | None = None      # None = a fresh random seed

    def __post_init__(self):
        _check("temperature", self.temperature, 0.0, None)
        _check("top_k", self.top_k, 0, None, integer=True)
        _check("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check("min_p", self.min_p, 0.0, 1.0)
        _check("repeat_penalty", self.repeat_penalty, 0.0, None, low_open=True)
        _check("repeat_last_n", self.repeat_last_n, 0, None, integer=True)
        if self.seed is not None:
            _check("seed", self.seed, 0, 2**63 - 1, integer=True)

    @property
    def greedy(self):
        """True when temperature is 0: the most likely token, no randomness."""
        return self.temperature == 0


def _check(name, value, low, high, integer=False, low_open=False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool) or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")


class Sampler:
    """sample(logits, recent) -> token id. Holds the random generator (seeded once) and a
    scratch copy of the logits, so the caller's logits are never modified."""

    def __init__(self, vocab_size, params=SamplingParams()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._scores = np.empty(vocab_size, np.float64)  # (vocab,) penalised logits

    def __call__(self, logits, recent=()):
        return self.sample(logits, recent)

    def sample(self, logits, recent=()):
        """logits: (vocab,) float; recent: the token ids so far (prompt and generated), of which
        the last repeat_last_n are penalised. Returns an int."""
        p = self.params
        scores = self._scores
        np.copyto(scores, logits)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and len(recent):
            apply_repeat_penalty(scores, recent[-p.repeat_last_n:], p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(scores))

        # top-k: the k best candidates, unordered (partial selection, not a sort)
        vocab = scores.shape[0]
        if 0 < p.top_k < vocab:
            cand = np.argpartition(scores, vocab - p.top_k)[vocab - p.top_k:]
        else:
            cand = np.arange(vocab)
        probs = softmax(scores[cand] / p.temperature)              # (n_cand,)

        # top-p, then min-p, as index sets into cand
        keep = top_p_indices(probs, p.top_p) if p.top_p < 1.0 else np.arange(cand.shape[0])
        if p.min_p > 0.0:
            keep = keep[probs[keep] >= p.min_p * probs.max()]

        # one draw from the kept probabilities, renormalised
        cum = np.cumsum(probs[keep])
        j = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(cand[keep[min(j, keep.shape[0] - 1)]])


def apply_repeat_penalty(scores, tokens, penalty):
    """In place, on each distinct token once (CTRL paper / transformers): positive logits are
    divided by the penalty, negative ones multiplied, so penalty > 1 always discourages."""
    ids = np.unique(np.asarray(tokens, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < scores.shape[0])]
    vals = scores[ids]
    scores[ids] = np.where(vals > 0, vals / penalty, vals * penalty)


def softmax(z):
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def top_p_indices(probs, top_p):
    """Indices of the smallest set of most likely entries whose probabilities sum to at least
    top_p (the nucleus), most likely first. Sorts only the best m entries, m = 64, 512, ...
    until they reach top_p: O(n) for the peaked distributions of real models."""
    n = probs.shape[0]
    m = min(n, NUCLEUS_FIRST)
    while True:
        best = np.argpartition(probs, n - m)[n - m:] if m < n else np.arange(n)
        order = best[np.argsort(probs[best], kind="stable")[::-1]]  # (m,) descending
        cum = np.cumsum(probs[order])
        if cum[-1] >= top_p or m == n:
            cut = int(np.searchsorted(cum, top_p, side="left")) + 1
            return order[:min(cut, m)]
        m = min(n, m * 8)
