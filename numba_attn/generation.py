"""Generation in three named phases: prefill (the whole prompt in one forward pass), decode_one
(one token against the KV cache) and sample. generate() is a Python generator that yields
token ids as they are chosen, so callers can stream.

    stats = GenerationStats()
    for token in generate(model, prompt_ids, max_tokens=64, sampling=SamplingParams(), stats=stats):
        ...
    print(stats.decode_tok_s, stats.stop_reason)

A conversation continues its KV cache: generate(model, ids, start_pos=k) takes the whole
sequence and prefills only ids[k:], the first k being in the cache already.
"""
import time
from dataclasses import dataclass

import numpy as np

from .sampling import Sampler, SamplingParams

STOP_EOS, STOP_MAX_TOKENS, STOP_CONTEXT = "eos", "max_tokens", "context"
STOP_STRING = "stop"       # set by the caller that stops at a stop string (text, not tokens)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0         # prefilled (the prompt's tokens not in the cache already)
    cached_tokens: int = 0         # the prompt's tokens reused from the KV cache
    generated_tokens: int = 0      # yielded tokens (an EOS that stops generation is not one)
    prefill_s: float = 0.0         # forward pass over the prompt
    first_token_s: float = 0.0     # time to first token: prefill + first sample
    decode_steps: int = 0          # decode_one calls
    decode_s: float = 0.0          # decode_one + sample, prefill excluded
    stop_reason: str = ""          # "eos" | "max_tokens" | "context" | "stop"
    context: int = 0               # the model's context (KV cache length)

    @property
    def prefill_tok_s(self):
        """Prompt tokens per second of the prefill pass (NaN when nothing was timed)."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self):
        """Decode steps per second, sampling included (NaN when nothing was timed)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def message(self):
        """A line saying why generation stopped."""
        return {
            STOP_EOS: "stopped at end-of-sequence token",
            STOP_MAX_TOKENS: f"stopped after {self.generated_tokens} tokens (max tokens)",
            STOP_CONTEXT: f"stopped: the context of {self.context} tokens is full "
                          f"({self.cached_tokens + self.prompt_tokens} prompt + "
                          f"{self.generated_tokens} generated)",
            STOP_STRING: "stopped at a stop string",
        }.get(self.stop_reason, "not finished")


def prefill(model, prompt, start_pos=0):
    """Run the prompt's ids from start_pos on (1-D ids; the earlier ones are in the KV cache) in
    one pass; logits of its last token."""
    return model.forward(prompt[start_pos:], start_pos)


def decode_one(model, token, pos):
    """Run one token (a (1,) int array) at position pos; its logits."""
    return model.forward(token, pos)


def check_room(model, n_prompt, max_tokens):
    """Raise ValueError unless a prompt of n_prompt tokens and max_tokens more fit the
    model's context (None: until the context is full, which needs room for one token)."""
    context = model.max_seq
    if n_prompt < 1:
        raise ValueError("the prompt is empty (and the model has no BOS token to start from)")
    wanted = 1 if max_tokens is None else max_tokens
    if n_prompt > context or (n_prompt == context and wanted > 0):
        raise ValueError(f"the prompt of {n_prompt} tokens fills the model's context of "
                         f"{context} tokens")
    if n_prompt + wanted > context:
        raise ValueError(f"the prompt of {n_prompt} tokens leaves room for {context - n_prompt} "
                         f"more in the model's context of {context}, not max_tokens={max_tokens}")


def generate(model, prompt, *, start_pos=0, max_tokens=256, sampling=SamplingParams(),
             eos_token_ids=None, stats=None):
    """Yield generated token ids. Stops at an EOS token (not yielded), after max_tokens, or
    (max_tokens=None) when the context is full; stats.stop_reason says which.

    prompt: token ids, the whole sequence; start_pos: how many of them the model's KV cache
    holds already (from an earlier call; the cache is cut back to start_pos when it holds
    more), so only prompt[start_pos:] is prefilled; 0 starts a new sequence. The last prompt
    token is always run, for its logits. max_tokens: int >= 0 or None; eos_token_ids: ids that
    stop generation (default: the model config's); stats: a GenerationStats to fill in
    (optional)."""
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 1:
        raise ValueError(f"prompt must be a 1-D sequence of token ids, got shape {prompt.shape}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 0):
        raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens!r}")
    check_room(model, prompt.shape[0], max_tokens)
    start_pos = _reuse_cache(model, prompt.shape[0], start_pos)
    eos = frozenset(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    stats = GenerationStats() if stats is None else stats
    stats.prompt_tokens, stats.cached_tokens = prompt.shape[0] - start_pos, start_pos
    stats.context = model.max_seq
    sampler = Sampler(model.config.vocab_size, sampling)
    limit = model.max_seq - prompt.shape[0] if max_tokens is None else max_tokens
    if limit == 0:
        stats.stop_reason = STOP_MAX_TOKENS if max_tokens is not None else STOP_CONTEXT
        return

    history = np.empty(prompt.shape[0] + limit, np.int64)  # prompt + generated, for penalties
    history[:prompt.shape[0]] = prompt
    n = prompt.shape[0]
    step = np.empty(1, np.int64)                            # the token decode_one runs

    t0 = time.perf_counter()
    logits = prefill(model, prompt, start_pos)
    stats.prefill_s = time.perf_counter() - t0
    token = sampler(logits, history[:n])
    stats.first_token_s = time.perf_counter() - t0

    while True:
        if token in eos:
            stats.stop_reason = STOP_EOS
            return
        history[n] = token
        n += 1
        stats.generated_tokens += 1
        yield token
        if stats.generated_tokens == limit:
            stats.stop_reason = STOP_MAX_TOKENS if max_tokens is not None else STOP_CONTEXT
            return
        t = time.perf_counter()
        step[0] = token
        logits = decode_one(model, step, n - 1)
        token = sampler(logits, history[:n])
        stats.decode_s += time.perf_counter() - t
        stats.decode_steps += 1


def _reuse_cache(model, n_prompt, start_pos):
    """The position prefill starts at: start_pos, less one when it covers the whole prompt
    (whose last token must run for its logits); the cache is cut back to it."""
    if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)) \
            or not 0 <= start_pos <= n_prompt:
        raise ValueError(f"start_pos must be an integer in [0, {n_prompt}] (prompt tokens in "
                         f"the KV cache), got {start_pos!r}")
    start_pos = min(int(start_pos), n_prompt - 1)
    if start_pos > 0:
        if start_pos > model.position:
            raise ValueError(f"start_pos {start_pos} is past the {model.position} tokens in "
                             f"the KV cache")
        model.cache.truncate(start_pos)
    return start_pos


# -- JIT accounting: were the kernels compiled in this process or loaded from Numba's cache? --

class CompileTimer:
    """with CompileTimer(on_compile=f) as t: ... -> t.seconds spent compiling in Numba (0.0 when
    every kernel came from the on-disk cache or was compiled earlier in this process).
    on_compile() is called once, when the first compilation starts (a cold cache), so a
    caller can say so before the wait rather than after."""

    def __init__(self, on_compile=None):
        self.on_compile = on_compile

    def __enter__(self):
        from numba.core import event

        timer = self

        class Listener(event.TimingListener):
            def on_start(self, ev):
                if timer.on_compile is not None:
                    callback, timer.on_compile = timer.on_compile, None
                    callback()
                super().on_start(ev)

        self._listener = Listener()
        self._ctx = event.install_listener("numba:compile", self._listener)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def seconds(self):
        return self._listener.duration if self._listener.done else 0.0
