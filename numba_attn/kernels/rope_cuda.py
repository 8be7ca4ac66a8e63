"""Rotary position embedding on the GPU. Twin: rope_cpu.py.

One block column per token row (b, t) of x (heads * d elements); each thread rotates PAIRS pairs
of that row, THREADS pairs apart, so a warp reads consecutive addresses. Memory-bound: x is
read once and out written once; the cos/sin rows of a position stay in L1/L2. Safe in place
(out is x): each pair is read and written by one thread."""
from numba import cuda

from .scalar import rope_pair

THREADS = 256      # threads per block (a multiple of 32)
PAIRS = 2          # pairs per thread: independent loads in flight


@cuda.jit(fastmath=True)
def _rope_half(out, x, cos, sin, start_pos, seq, row_pairs, half):
    # x, out: (rows * heads * d,), rows = batch * seq; cos, sin: (max_pos, half).
    # Pair p of a row is (head p // half, i = p % half): elements i and i + half of the head.
    row = cuda.blockIdx.x
    pos = start_pos + row % seq
    base = row * (2 * row_pairs)                     # int64: offsets may pass 2**31
    for u in range(PAIRS):
        p = (cuda.blockIdx.y * PAIRS + u) * THREADS + cuda.threadIdx.x
        if p < row_pairs:                            # bounds guard
            h = p // half
            i = p - h * half
            j = base + h * (2 * half) + i
            out[j], out[j + half] = rope_pair(x[j], x[j + half], cos[pos, i], sin[pos, i])


@cuda.jit(fastmath=True)
def _rope_interleaved(out, x, cos, sin, start_pos, seq, row_pairs, half):
    # as _rope_half, but pair p of a row is elements 2p and 2p + 1 (i = p % half)
    row = cuda.blockIdx.x
    pos = start_pos + row % seq
    base = row * (2 * row_pairs)
    for u in range(PAIRS):
        p = (cuda.blockIdx.y * PAIRS + u) * THREADS + cuda.threadIdx.x
        if p < row_pairs:                            # bounds guard
            i = p % half
            j = base + 2 * p
            out[j], out[j + 1] = rope_pair(x[j], x[j + 1], cos[pos, i], sin[pos, i])


def _launch(kernel, out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d // 2)
    batch, seq, heads, d = x.shape
    rows, row_pairs = batch * seq, heads * (d // 2)
    if rows == 0 or row_pairs == 0:
        return
    cols = (row_pairs + THREADS * PAIRS - 1) // (THREADS * PAIRS)
    kernel[(rows, cols), THREADS](out.reshape(-1), x.reshape(-1), cos, sin, start_pos, seq,
                                  row_pairs, d // 2)


def rope_half(out, x, cos, sin, start_pos):
    # pairs (i, i + d/2): Hugging Face Llama checkpoints, NeoX
    _launch(_rope_half, out, x, cos, sin, start_pos)


def rope_interleaved(out, x, cos, sin, start_pos):
    # pairs (2i, 2i + 1): Meta's Llama code, GGUF, Candle's rope_i
    _launch(_rope_interleaved, out, x, cos, sin, start_pos)
