"""Rotary position embedding on the CPU. Twin: rope_cuda.py.

Serial functions over a range of (batch, position) rows, thin parallel drivers over rows; a
decode step's single token skips the thread pool. All are safe in place (out is x).

Style half with head_dim a multiple of 32 runs on explicit 16-float vectors (LLVM IR): Numba's
own loop here vectorised to 256-bit registers, and in place (out is x) not at all (its runtime
overlap checks failed), while this path runs in place 3x faster than that loop did. Out of
place and past the L2 caches, it writes out with non-temporal stores (_rope_half_stream)."""
import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_cpu import F32 as _F32, I32 as _I32, I64 as _I64, masked_store, prefetch, store_nt
from .cpu_pool import PRANGE


PARALLEL_MIN = 1 << 15  # elements below which the serial function runs alone
PREFETCH_BYTES = 4096   # style half, vector path: how far ahead x and out are prefetched
STREAM_THREAD_BYTES = 1 << 20  # style half out of place, x at least this much a thread (half
                               # an L2): out written non-temporally

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


@intrinsic
def _rope_half_stream(typingctx, o, x, c, s, cst, sst, n_heads, d, seq, start_pos, bt0, bt1):
    """Style half over rows bt0 <= bt < bt1 (bt1 > bt0) of x, o (byte addresses of row 0, rows
    of n_heads * d floats, position start_pos + bt % seq: cos, sin rows at c + t cst, s + t sst),
    out of place, o written with non-temporal stores of whole aligned 64-byte lines: no read
    for ownership of out, and out leaves the caches. o must be 16-byte aligned: where its rows
    start sh floats (0, 4, 8 or 12) before a line, each line is the shuffle of two consecutive
    result vectors (the chain runs across heads and rows), and the first sh and last 16 - sh
    floats of the range are masked stores. One copy of the loops per sh."""
    sig = types.void(o, x, c, s, cst, sst, n_heads, d, seq, start_pos, bt0, bt1)

    def codegen(context, builder, signature, args):
        o, x, c, s, cst, sst, n_heads, d, seq, start_pos, bt0, bt1 = [
            context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args)]
        vp = ir.PointerType(_V16)

        def k(v):
            return ir.Constant(_I64, v)

        def vec(addr):
            return builder.inttoptr(addr, vp)

        def load(addr):
            return builder.load(vec(addr), align=4)

        half4 = builder.mul(d, k(2))                             # d/2 floats, in bytes
        row4 = builder.mul(builder.mul(n_heads, d), k(4))
        ob, xb = (builder.add(a, builder.mul(bt0, row4)) for a in (o, x))
        n_rows = builder.sub(bt1, bt0)

        def rows(sh):
            # the lines of o: line j holds floats 16 j + sh .. 16 j + sh + 15 of the range,
            # shuffled from result vectors j (lanes sh..15) and j + 1 (lanes 0..sh-1)
            lines = ir.Constant(ir.VectorType(_I32, 16), [sh + i for i in range(16)])
            back = k(4 * (sh - 16))                              # line of the vector before

            def emit(prev, y, addr):                             # y: the vector at addr
                if sh == 0:
                    store_nt(builder, y, vec(addr))
                else:
                    store_nt(builder, builder.shuffle_vector(prev, y, lines),
                             vec(builder.add(addr, back)))

            last = cgutils.alloca_once(builder, _V16)            # the range's latest vector
            with cgutils.for_range(builder, n_rows) as r:
                t = builder.add(start_pos, builder.srem(builder.add(bt0, r.index), seq))
                cr, sr = builder.add(c, builder.mul(t, cst)), builder.add(s, builder.mul(t, sst))
                rb = builder.mul(r.index, row4)
                with cgutils.for_range(builder, n_heads) as h:
                    hb = builder.add(rb, builder.mul(h.index, builder.mul(d, k(4))))
                    xh, oh = builder.add(xb, hb), builder.add(ob, hb)
                    with cgutils.for_range(builder, builder.ashr(d, k(4))) as ln:
                        prefetch(builder, builder.add(xh, builder.add(
                            builder.mul(ln.index, k(64)), k(PREFETCH_BYTES))), 0)

                    def step(i4):                                # i4: byte offset in the half
                        cv, sv = load(builder.add(cr, i4)), load(builder.add(sr, i4))
                        x0 = load(builder.add(xh, i4))
                        x1 = load(builder.add(builder.add(xh, i4), half4))
                        y0 = builder.fsub(builder.fmul(x0, cv), builder.fmul(x1, sv),
                                          flags=("contract",))
                        y1 = builder.fadd(builder.fmul(x1, cv), builder.fmul(x0, sv),
                                          flags=("contract",))
                        return y0, y1

                    y0f, y1f = step(k(0))
                    if sh == 0:
                        emit(None, y0f, oh)
                        emit(None, y1f, builder.add(oh, half4))
                    else:
                        start = builder.icmp_unsigned("==", builder.or_(r.index, h.index), k(0))
                        with builder.if_else(start, likely=False) as (first, then):
                            with first:                          # the range's first sh floats
                                masked_store(builder, y0f, vec(oh), [i < sh for i in range(16)])
                            with then:
                                emit(builder.load(last), y0f, oh)
                    p0, p1 = cgutils.alloca_once(builder, _V16), cgutils.alloca_once(builder, _V16)
                    builder.store(y0f, p0)
                    builder.store(y1f, p1)
                    with cgutils.for_range(builder, builder.sub(builder.ashr(d, k(5)), k(1))) as i:
                        i4 = builder.mul(builder.add(i.index, k(1)), k(64))
                        y0, y1 = step(i4)
                        a0 = builder.add(oh, i4)
                        emit(builder.load(p0), y0, a0)
                        emit(builder.load(p1), y1, builder.add(a0, half4))
                        builder.store(y0, p0)
                        builder.store(y1, p1)
                    if sh:                                       # the line across the halves
                        emit(builder.load(p0), y1f, builder.add(oh, half4))
                    builder.store(builder.load(p1), last)
            if sh:                                               # the range's last 16 - sh floats
                end = builder.add(ob, builder.mul(n_rows, row4))
                masked_store(builder, builder.load(last), vec(builder.add(end, k(-64))),
                             [i >= sh for i in range(16)])

        sh = builder.lshr(builder.and_(builder.sub(k(0), ob), k(63)), k(2))
        done = builder.append_basic_block("rope_stream_done")
        switch = builder.switch(sh, done)
        for v in (0, 4, 8, 12):
            block = builder.append_basic_block(f"rope_stream_sh{v}")
            switch.add_case(k(v), block)
            builder.position_at_end(block)
            rows(v)
            builder.branch(done)
        builder.position_at_end(done)
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


@njit(fastmath=True, cache=True)
def _rope_half_rows_stream(out, x, cos, sin, start_pos, bt0, bt1):
    # _rope_half_rows out of place through _rope_half_stream: d % 32 == 0, out 16-byte aligned
    if bt1 > bt0:
        _rope_half_stream(np.int64(out.ctypes.data), np.int64(x.ctypes.data),
                          np.int64(cos.ctypes.data), np.int64(sin.ctypes.data), cos.strides[0],
                          sin.strides[0], x.shape[2], x.shape[3], x.shape[1], start_pos, bt0, bt1)


@njit(cache=True)
def _rope_half_streams(out, x, parts):
    # _rope_half_rows_stream applies, and pays: out of place, x and out past the threads' L2s
    # (at seq 64, 1 MB each, 2 threads, it cost 41 -> 55 us for q+k)
    op = out.ctypes.data
    return (x.shape[3] % 32 == 0 and x.size * 4 >= parts * STREAM_THREAD_BYTES
            and op != x.ctypes.data and op % 16 == 0)


@njit(parallel=PRANGE, cache=True)
def _rope_half_parallel(out, x, cos, sin, start_pos, parts):
    # parts: the number of threads (numba's get_num_threads, called here, would keep this
    # function out of the cache) or ranges of rows
    n = x.shape[0] * x.shape[1]
    if _rope_half_streams(out, x, parts):
        # out of place and beyond L2: non-temporal stores (q+k at seq 128, 2 MB each: 150 ->
        # 129 us), one contiguous range of rows a thread, as the lines chain across rows (a
        # range a row: 196 us)
        for p in prange(parts):
            _rope_half_rows_stream(out, x, cos, sin, start_pos, p * n // parts,
                                   (p + 1) * n // parts)
    else:
        for bt in prange(n):
            _rope_half_rows(out, x, cos, sin, start_pos, bt, bt + 1)


@njit(parallel=PRANGE, cache=True)
def _rope_interleaved_parallel(out, x, cos, sin, start_pos):
    for bt in prange(x.shape[0] * x.shape[1]):
        _rope_interleaved_rows(out, x, cos, sin, start_pos, bt, bt + 1)


def rope_half(out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2)
    if x.size < PARALLEL_MIN:
        _rope_half_rows(out, x, cos, sin, start_pos, 0, x.shape[0] * x.shape[1])
    else:   # parts: the pool's size (get_num_threads cost ~2 us a call here, after the kernel
        # left the caches cold); with fewer threads set, prange spreads the parts over them
        _rope_half_parallel(out, x, cos, sin, start_pos, config.NUMBA_NUM_THREADS)


def rope_interleaved(out, x, cos, sin, start_pos):
    # x, out: (batch, seq, heads, d); cos, sin: (max_pos, d//2)
    if x.size < PARALLEL_MIN:
        _rope_interleaved_rows(out, x, cos, sin, start_pos, 0, x.shape[0] * x.shape[1])
    else:
        _rope_interleaved_parallel(out, x, cos, sin, start_pos)
