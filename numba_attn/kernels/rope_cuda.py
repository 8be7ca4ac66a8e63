"""Rotary position embedding on the GPU. Twin: rope_cpu.py.

One block column per token row (b, t) of x (heads * d elements); each thread rotates PAIRS pairs
of that row, THREADS pairs apart, so a warp reads consecutive addresses; when d % 8 == 0 and the
bases are 16-byte aligned, 16-byte loads and stores (half: PAIRS groups of 4 pairs;
interleaved: 2 * PAIRS groups of 2, all loaded before any is stored). Memory-bound: x is read
once and out written once; the cos/sin rows of a position stay in L1/L2. Safe in place
(out is x): each pair is read and written by one thread."""
from numba import cuda

from .scalar import rope_pair
from .util_cuda import aligned, flat, float32, load4, store4, zero_offset

THREADS = 256      # threads per block (a multiple of 32)
PAIRS = 2          # pairs per thread: independent loads in flight
UNITS = 2 * PAIRS  # 16-byte units of 2 pairs per thread (interleaved, wide)


@cuda.jit(fastmath=True)
def _rope_half(out, x, cos, sin, start_pos, at, seq, row_pairs, half):
    # x, out: (rows * heads * d,), rows = batch * seq; cos, sin: (max_pos, half); at: (1,)
    # int64, a position offset read on the device (0, or a decode step's position).
    # Pair p of a row is (head p // half, i = p % half): elements i and i + half of the head.
    row = cuda.blockIdx.x
    pos = start_pos + at[0] + row % seq
    base = row * (2 * row_pairs)                     # int64: offsets may pass 2**31
    for u in range(PAIRS):
        p = (cuda.blockIdx.y * PAIRS + u) * THREADS + cuda.threadIdx.x
        if p < row_pairs:                            # bounds guard
            h = p // half
            i = p - h * half
            j = base + h * (2 * half) + i
            out[j], out[j + half] = rope_pair(x[j], x[j + half], cos[pos, i], sin[pos, i])


@cuda.jit(fastmath=True)
def _rope_interleaved(out, x, cos, sin, start_pos, at, seq, row_pairs, half):
    # as _rope_half, but pair p of a row is elements 2p and 2p + 1 (i = p % half)
    row = cuda.blockIdx.x
    pos = start_pos + at[0] + row % seq
    base = row * (2 * row_pairs)
    for u in range(PAIRS):
        p = (cuda.blockIdx.y * PAIRS + u) * THREADS + cuda.threadIdx.x
        if p < row_pairs:                            # bounds guard
            i = p % half
            j = base + 2 * p
            out[j], out[j + 1] = rope_pair(x[j], x[j + 1], cos[pos, i], sin[pos, i])


@cuda.jit(fastmath=True)
def _rope_half4(out, x, cos, sin, start_pos, at, seq, row_quads, half):
    # as _rope_half, 4 pairs per step with 16-byte loads (half % 4 == 0, aligned bases):
    # quad p of a row is i = 4 (p % (half / 4)) .. + 3 of head p // (half / 4)
    row = cuda.blockIdx.x
    pos = start_pos + at[0] + row % seq
    base = row * (8 * row_quads)
    hq = half // 4
    for u in range(PAIRS):
        p = (cuda.blockIdx.y * PAIRS + u) * THREADS + cuda.threadIdx.x
        if p < row_quads:                            # bounds guard
            h = p // hq
            i = (p - h * hq) * 4
            j = base + h * (2 * half) + i
            a = load4(x, j)
            b = load4(x, j + half)
            c = load4(cos, pos * half + i)
            s = load4(sin, pos * half + i)
            y0 = rope_pair(a[0], b[0], c[0], s[0])
            y1 = rope_pair(a[1], b[1], c[1], s[1])
            y2 = rope_pair(a[2], b[2], c[2], s[2])
            y3 = rope_pair(a[3], b[3], c[3], s[3])
            store4(out, j, (y0[0], y1[0], y2[0], y3[0]))
            store4(out, j + half, (y0[1], y1[1], y2[1], y3[1]))


@cuda.jit(fastmath=True)
def _rope_interleaved4(out, x, cos, sin, start_pos, at, seq, row_quads, half):
    # as _rope_interleaved, 2 pairs per 16-byte load (d % 8 == 0, aligned bases): the thread's
    # UNITS loads, THREADS apart (each 512 contiguous bytes for a warp), are all issued
    # before any store; unit f of a row is elements 4f..4f+3, pairs i = 2f % half and i + 1
    row = cuda.blockIdx.x
    pos = start_pos + at[0] + row % seq
    base = row * (8 * row_quads)
    last = 2 * row_quads - 1
    vals = cuda.local.array((UNITS, 4), float32)
    for u in range(UNITS):
        f = min((cuda.blockIdx.y * UNITS + u) * THREADS + cuda.threadIdx.x, last)
        a = load4(x, base + 4 * f)
        for c in range(4):
            vals[u, c] = a[c]
    for u in range(UNITS):
        f = (cuda.blockIdx.y * UNITS + u) * THREADS + cuda.threadIdx.x
        if f <= last:                                # bounds guard
            i = (2 * f) % half
            y0 = rope_pair(vals[u, 0], vals[u, 1], cos[pos, i], sin[pos, i])
            y1 = rope_pair(vals[u, 2], vals[u, 3], cos[pos, i + 1], sin[pos, i + 1])
            store4(out, base + 4 * f, (y0[0], y0[1], y1[0], y1[1]))


def _launch(kernel, kernel4, out, x, cos, sin, start_pos, at, stream):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d // 2)
    batch, seq, heads, d = x.shape
    rows, row_pairs = batch * seq, heads * (d // 2)
    if rows == 0 or row_pairs == 0:
        return
    if d % 8 == 0 and all(aligned(a) for a in (out, x, cos, sin)):
        kernel, row_pairs = kernel4, row_pairs // 4       # 4 pairs per step
    cols = (row_pairs + THREADS * PAIRS - 1) // (THREADS * PAIRS)
    kernel[(rows, cols), THREADS, stream](flat(out), flat(x), cos, sin, start_pos,
                                          zero_offset() if at is None else at, seq,
                                          row_pairs, d // 2)


def rope_half(out, x, cos, sin, start_pos, *, at=None, stream=0):
    # pairs (i, i + d/2): Hugging Face Llama checkpoints, NeoX. at: None, or an int64 device
    # array whose at[0] is added to start_pos on the device (a captured decode step)
    _launch(_rope_half, _rope_half4, out, x, cos, sin, start_pos, at, stream)


def rope_interleaved(out, x, cos, sin, start_pos, *, at=None, stream=0):
    # pairs (2i, 2i + 1): Meta's Llama code, GGUF, Candle's rope_i
    _launch(_rope_interleaved, _rope_interleaved4, out, x, cos, sin, start_pos, at, stream)
