"""Rotary position embedding on the CPU. Twin: rope_cuda.py.

Serial functions over a range of (batch, position) rows, thin parallel drivers over rows; a
decode step's single token skips the thread pool. All are safe in place (out is x)."""
from numba import njit, prange


PARALLEL_MIN = 1 << 15  # elements below which the serial function runs alone


@njit(fastmath=True, cache=True)
def _rope_half_rows(out, x, cos, sin, start_pos, bt0, bt1):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2). Rows bt = b * seq + t.
    # Pairs (i, i + d/2), as Hugging Face Llama checkpoints and NeoX need. 1-D views, so the
    # inner loop is a plain vectorisable loop (1.3x faster than 4-D indexing)
    seq, heads, d = x.shape[1], x.shape[2], x.shape[3]
    half = d // 2
    for bt in range(bt0, bt1):
        b, t = bt // seq, bt % seq
        c, s = cos[start_pos + t], sin[start_pos + t]         # (d//2,)
        for h in range(heads):
            # the two halves as separate views: in place, each output half is exactly its
            # input half, so the loop's runtime overlap checks pass and it vectorises
            x0s, x1s = x[b, t, h, :half], x[b, t, h, half:]
            o0s, o1s = out[b, t, h, :half], out[b, t, h, half:]
            for i in range(half):
                x0, x1 = x0s[i], x1s[i]
                o0s[i] = x0 * c[i] - x1 * s[i]
                o1s[i] = x1 * c[i] + x0 * s[i]


@njit(fastmath=True, cache=True)
def _rope_interleaved_rows(out, x, cos, sin, start_pos, bt0, bt1):
    # as _rope_half_rows, pairs (2i, 2i+1): Meta's Llama code, GGUF and Candle's rope_i
    seq, heads, d = x.shape[1], x.shape[2], x.shape[3]
    half = d // 2
    for bt in range(bt0, bt1):
        b, t = bt // seq, bt % seq
        c, s = cos[start_pos + t], sin[start_pos + t]         # (d//2,)
        for h in range(heads):
            xh, oh = x[b, t, h], out[b, t, h]                    # (d,)
            for i in range(half):
                x0, x1 = xh[2 * i], xh[2 * i + 1]
                oh[2 * i] = x0 * c[i] - x1 * s[i]
                oh[2 * i + 1] = x1 * c[i] + x0 * s[i]


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
