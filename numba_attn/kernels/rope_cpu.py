"""Rotary position embedding on the CPU. Twin: rope_cuda.py.

Serial functions over a range of (batch, position) rows, thin parallel drivers over rows; a
decode step's single token skips the thread pool. All are safe in place (out is x).

Style half with head_dim a multiple of 32 runs on explicit 16-float vectors (LLVM IR): Numba's
own loop here vectorised to 256-bit registers, and in place (out is x) not at all (its runtime
overlap checks failed), while this path runs in place 3x faster than that loop did."""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_cpu import F32 as _F32, I64 as _I64, prefetch


PARALLEL_MIN = 1 << 15  # elements below which the serial function runs alone
PREFETCH_BYTES = 4096   # style half, vector path: how far ahead x and out are prefetched

_V16 = ir.VectorType(_F32, 16)


@intrinsic
def _rope_half_heads(typingctx, o, x, c, s, n_heads, d):
    """One position of style half: for each of n_heads heads of d floats at x + 4 h d (byte
    addresses), the pairs (i, i + d/2), i < d/2, rotated by (c[i], s[i]) and written at
    o + 4 h d, 16 pairs per step; d/2 a multiple of 16. Each step loads both halves before it
    stores, so o may be x (in place)."""
    sig = types.void(o, x, c, s, n_heads, d)

    def codegen(context, builder, signature, args):
        o, x, c, s, n_heads, d = [context.cast(builder, v, t, types.int64)
                                  for v, t in zip(args, signature.args)]
        fp, vp = ir.PointerType(_F32), ir.PointerType(_V16)
        op, xp, cp, sp = (builder.inttoptr(a, fp) for a in (o, x, c, s))
        half = builder.ashr(d, ir.Constant(_I64, 1))

        def at(base, off):
            return builder.bitcast(builder.gep(base, [off]), vp)

        with cgutils.for_range(builder, n_heads) as heads:
            h0 = builder.mul(heads.index, d)
            # software prefetch PREFETCH_BYTES ahead, for reading x and for writing o: the
            # hardware's streams stop at each 4 KB page, and out of place (x, o 2 MB each at
            # seq 128, beyond L2) this took q+k from 237 to 199 us
            with cgutils.for_range(builder, builder.ashr(d, ir.Constant(_I64, 4))) as lines:
                off = builder.add(builder.mul(builder.add(h0, builder.mul(
                    lines.index, ir.Constant(_I64, 16))), ir.Constant(_I64, 4)),
                    ir.Constant(_I64, PREFETCH_BYTES))
                prefetch(builder, builder.add(x, off), 0)
                prefetch(builder, builder.add(o, off), 1)
            with cgutils.for_range(builder, builder.ashr(d, ir.Constant(_I64, 5))) as steps:
                i = builder.mul(steps.index, ir.Constant(_I64, 16))
                i0 = builder.add(h0, i)
                i1 = builder.add(i0, half)
                cv, sv = builder.load(at(cp, i), align=4), builder.load(at(sp, i), align=4)
                x0, x1 = builder.load(at(xp, i0), align=4), builder.load(at(xp, i1), align=4)
                y0 = builder.fsub(builder.fmul(x0, cv), builder.fmul(x1, sv), flags=("contract",))
                y1 = builder.fadd(builder.fmul(x1, cv), builder.fmul(x0, sv), flags=("contract",))
                builder.store(y0, at(op, i0), align=4)
                builder.store(y1, at(op, i1), align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit(fastmath=True, cache=True)
def _rope_half_rows(out, x, cos, sin, start_pos, bt0, bt1):
    # x, out: (batch, seq, heads, d), C-contiguous; cos, sin: (max_pos, d//2). Rows
    # bt = b * seq + t. Pairs (i, i + d/2), as Hugging Face Llama checkpoints and NeoX need
    seq, heads, d = x.shape[1], x.shape[2], x.shape[3]
    half = d // 2
    if d % 32 == 0:
        row = heads * d
        xp, op = np.int64(x.ctypes.data), np.int64(out.ctypes.data)
        cp, sp = np.int64(cos.ctypes.data), np.int64(sin.ctypes.data)
        cst, sst = cos.strides[0], sin.strides[0]
        for bt in range(bt0, bt1):
            t = start_pos + bt % seq
            _rope_half_heads(op + 4 * bt * row, xp + 4 * bt * row, cp + t * cst, sp + t * sst,
                             heads, d)
        return
    # any d: 1-D views, so the inner loop is a plain vectorisable loop (1.3x faster than 4-D
    # indexing)
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
