"""Rotary position embedding on the CPU. Twin: rope_cuda.py."""
from numba import njit, prange

from .scalar import rope_pair


@njit(parallel=True, fastmath=True, cache=True)
def rope_half(out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2). Pairs (i, i + d/2), as
    # Hugging Face Llama checkpoints and NeoX need. Safe in place (out is x).
    batch, seq, heads, d = x.shape
    half = d // 2
    for bt in prange(batch * seq):
        b, t = bt // seq, bt % seq
        pos = start_pos + t
        for h in range(heads):
            for i in range(half):
                out[b, t, h, i], out[b, t, h, i + half] = rope_pair(
                    x[b, t, h, i], x[b, t, h, i + half], cos[pos, i], sin[pos, i])


@njit(parallel=True, fastmath=True, cache=True)
def rope_interleaved(out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2). Pairs (2i, 2i+1), as Meta's
    # Llama code, GGUF and Candle's rope_i. Safe in place (out is x).
    batch, seq, heads, d = x.shape
    half = d // 2
    for bt in prange(batch * seq):
        b, t = bt // seq, bt % seq
        pos = start_pos + t
        for h in range(heads):
            for i in range(half):
                out[b, t, h, 2 * i], out[b, t, h, 2 * i + 1] = rope_pair(
                    x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1], cos[pos, i], sin[pos, i])
