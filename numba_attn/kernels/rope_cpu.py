"""Rotary position embedding on the CPU. Twin: rope_cuda.py.

Serial functions over a range of (batch, position) rows, thin parallel drivers over rows; a
decode step's single token skips the thread pool. All are safe in place (out is x)."""
from numba import njit, prange

from .scalar import rope_pair

PARALLEL_MIN = 1 << 15  # elements below which the serial function runs alone


@njit(fastmath=True, cache=True)
def _rope_half_rows(out, x, cos, sin, start_pos, bt0, bt1):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2). Rows bt = b * seq + t.
    # Pairs (i, i + d/2), as Hugging Face Llama checkpoints and NeoX need.
    seq, heads, d = x.shape[1], x.shape[2], x.shape[3]
    half = d // 2
    for bt in range(bt0, bt1):
        b, t = bt // seq, bt % seq
        pos = start_pos + t
        for h in range(heads):
            for i in range(half):
                out[b, t, h, i], out[b, t, h, i + half] = rope_pair(
                    x[b, t, h, i], x[b, t, h, i + half], cos[pos, i], sin[pos, i])


@njit(fastmath=True, cache=True)
def _rope_interleaved_rows(out, x, cos, sin, start_pos, bt0, bt1):
    # as _rope_half_rows, pairs (2i, 2i+1): Meta's Llama code, GGUF and Candle's rope_i
    seq, heads, d = x.shape[1], x.shape[2], x.shape[3]
    half = d // 2
    for bt in range(bt0, bt1):
        b, t = bt // seq, bt % seq
        pos = start_pos + t
        for h in range(heads):
            for i in range(half):
                out[b, t, h, 2 * i], out[b, t, h, 2 * i + 1] = rope_pair(
                    x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1], cos[pos, i], sin[pos, i])


@njit(parallel=True, cache=True)
def _rope_half_parallel(out, x, cos, sin, start_pos):
    for bt in prange(x.shape[0] * x.shape[1]):
        _rope_half_rows(out, x, cos, sin, start_pos, bt, bt + 1)


@njit(parallel=True, cache=True)
def _rope_interleaved_parallel(out, x, cos, sin, start_pos):
    for bt in prange(x.shape[0] * x.shape[1]):
        _rope_interleaved_rows(out, x, cos, sin, start_pos, bt, bt + 1)


def rope_half(out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2)
    if x.size < PARALLEL_MIN:
        _rope_half_rows(out, x, cos, sin, start_pos, 0, x.shape[0] * x.shape[1])
    else:
        _rope_half_parallel(out, x, cos, sin, start_pos)


def rope_interleaved(out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2)
    if x.size < PARALLEL_MIN:
        _rope_interleaved_rows(out, x, cos, sin, start_pos, 0, x.shape[0] * x.shape[1])
    else:
        _rope_interleaved_parallel(out, x, cos, sin, start_pos)
