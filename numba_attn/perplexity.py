"""Perplexity of a text under a model, as llama.cpp's `llama-perplexity` reports it: the text's
token ids (BOS first, as generation encodes a prompt) cut into non-overlapping windows of
`context` tokens; each window runs from position 0 in one forward pass, and every token after
the window's first is scored by the log-probability the model gave it. The perplexity is
exp(mean negative log-likelihood) over all scored tokens.

    result = perplexity(model, ids, context=256)
    print(result.perplexity, result.scored_tokens)
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float        # exp(nll / scored_tokens)
    nll: float               # summed negative log-likelihood, nats
    scored_tokens: int       # tokens scored (each window's tokens after its first)
    windows: int             # forward passes; the last may be shorter than context


def token_logprobs(logits, targets):
    """log p(target) under each row of logits (n, vocab) float32, in float64: (n,)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return z[np.arange(len(targets)), targets] - log_norm


def windows(n_tokens, context):
    """(start, stop) of the non-overlapping windows over n_tokens ids; a last window of one
    token scores nothing and is left out."""
    return [(s, min(s + context, n_tokens)) for s in range(0, n_tokens, context)
            if min(s + context, n_tokens) - s >= 2]


def perplexity(model, ids, context=None, *, on_window=None):
    """PerplexityResult of the token ids under model, in windows of `context` tokens (default:
    the model's KV cache length). on_window(done, total) is called after each window."""
    ids = np.asarray(ids, dtype=np.int64)
    context = model.max_seq if context is None else int(context)
    if not 2 <= context <= model.max_seq:
        raise ValueError(f"context must be 2 to {model.max_seq} tokens (the model's context), "
                         f"got {context}")
    if ids.ndim != 1 or ids.shape[0] < 2:
        raise ValueError(f"the text must have at least 2 tokens to score, got {ids.shape[0]}")
    spans = windows(ids.shape[0], context)
    nll, scored = 0.0, 0
    for i, (start, stop) in enumerate(spans):
        window = ids[start:stop]
        logits = model.forward(window, 0, all_logits=True)           # (len, vocab)
        nll -= float(token_logprobs(logits[:-1], window[1:]).sum())
        scored += window.shape[0] - 1
        if on_window is not None:
            on_window(i + 1, len(spans))
    model.reset()
    return PerplexityResult(float(np.exp(nll / scored)), nll, scored, len(spans))
