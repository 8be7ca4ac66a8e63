"""y = x @ w.T + bias on the GPU for Q8_0 weights (formats.Q8Matrix: int8 codes qs (n, k) and a
float16 scale d per 32 weights, (n, k // 32)). Twin of linear_q8_cpu.py, function for function,
as linear_cuda.py is of linear_cpu.py.

On the device a Q8_0 weight is a formats.Q8Matrix holding device arrays, `qs` (n, k) int8 and
`d` (n, k // 32) float16: `Q8Matrix.to_device()` (or `to_device` here) copies a host one.

Decode and a few rows (up to GEMV_MAX_M, the CPU's GEMV_MAX_ROWS) read w once, 34 bytes per 32
weights, with the CPU twin's arithmetic: x is quantized the same way first (per 32 values: int8
codes and a float32 scale, llama.cpp's rule, the division correctly rounded), so each block's
dot product is exact in int32 (dp4a, 4 byte products per instruction), and a row's result is
the sum over blocks of isum * (d_w * d_x), as llama.cpp's Q8_0 x Q8_0 dot product (its mmvq).
Each block of threads quantizes its XR rows of x into shared memory, X_SLAB values at a time;
each warp owns RPW rows of w, each lane one 32-code block of a row per step (two 16-byte
loads), U blocks of each row in flight, and each block of x codes read from shared memory serves
the warp's RPW rows.
Prefill (more rows) is compute-bound, as on the CPU with float x: linear_cuda's tiled GEMM on
the CUDA cores, w's tile dequantized (d * q, float32) as it is stored in shared memory."""
import functools

from numba import cuda

from .linear_cuda import GEMM_THREADS, MICRO, TILE, TILE_PAD, TK
from .util_cuda import (ALIGN, SIM, aligned, device, div_rn, dp4a, flat, float32, group_max,
                        group_sum, load, load16_words, prefetch_l2, scratch_size, sm_count)

if SIM:   # NumPy's scalar types in the simulator (plain Python), numba's on the GPU
    from numpy import int32, int64, uint32
else:
    from numba import int32, int64, uint32

Q8_BLOCK = 32                            # weights per Q8_0 block (formats.Q8_BLOCK)
WORDS = Q8_BLOCK // 4                    # 32-bit words of one block's codes

# --- GEMV (decode and a few rows) ---
X_SLAB = 4096 if not SIM else 1024       # x values quantized into shared memory at a time
                                         # (a multiple of 32; 4096: 16 KB of codes for 4 rows)
GEMV_MAX_M = 16                          # rows of x up to which the GEMV serves (both
                                         # backends quantize x up to here)
# (rows of w per warp, blocks of 32 codes per row and lane in flight, threads per block, lanes
# per block of 32 codes: 1 (two 16-byte loads a lane) or 2 (one each: a warp's load is 512
# contiguous bytes), blocks per SM: 0 for one block per group of rows, else the grid is capped
# at that many a multiprocessor where that gives each block two groups or more, each block
# looping over groups and quantizing x once; L2 ahead: 1 to ask for the warp's rows of its
# first group in L2 before x is quantized, and for the next group's while the block works on
# one, so that w streams while x is quantized and across groups; 0 not to).
# `bench_cuda.py --only tune-q8` compares the variants. At 12288x4096 on an H100, in four runs
# over three days: (1, 4, 512, 2, 2) 24.4-25.0 us, (1, 4, 256, 2, 4) 25.1-25.6, (4, 2, 256, 1,
# 4) 25.4-25.9, (2, 2, 256, 1, 0) 27.2-27.4, the rest 25.5-31; on an H200 with one lane a
# block, one block a group: (2, 2, 256) 21.2 us, (4, 1, 256) 20.8-21.0. Loading w's first step
# before x is quantized gained nothing on either (H200 21.3; H100 25.3-26.3 against 24.6-25.1)
GEMV_SHAPE = (1, 4, 512, 2, 2, 0)


def x_rows(m):
    """Rows of x each GEMV block serves for m rows (1, 2 or 4: the kernel's XR)."""
    return 1 if m == 1 else 2 if m == 2 else 4


@device
def round_away(v):
    # C's roundf (halves away from zero) as an int32, formats.roundf's rule: v - trunc(v) is
    # exact
    t = float32(int32(v))
    if abs(v - t) >= float32(0.5):
        t += float32(1) if v > 0 else float32(-1)
    return int32(t)


@device
def pack4(a, b, c, e):
    # four int32 codes in [-127, 127] as the bytes of one word, a in the lowest
    return (int64(a) & 0xFF) | ((int64(b) & 0xFF) << 8) | ((int64(c) & 0xFF) << 16) | \
        ((int64(e) & 0xFF) << 24)


@device
def load16_bytes(a, i):
    # the 16 bytes at a[i] (int8, any alignment) as 4 little-endian words: load16_words' result
    return (pack4(a[i], a[i + 1], a[i + 2], a[i + 3]),
            pack4(a[i + 4], a[i + 5], a[i + 6], a[i + 7]),
            pack4(a[i + 8], a[i + 9], a[i + 10], a[i + 11]),
            pack4(a[i + 12], a[i + 13], a[i + 14], a[i + 15]))


@functools.cache
def gemv_kernel(wide, rpw=GEMV_SHAPE[0], unroll=GEMV_SHAPE[1], threads=GEMV_SHAPE[2],
                lanes=GEMV_SHAPE[3], xr=1, ahead=GEMV_SHAPE[5]):
    """The GEMV kernel; wide: qs's base is 16-byte aligned (16-byte loads; rows are, k being a
    multiple of 32); rpw: rows of w per warp; unroll: blocks of each row in flight per lane;
    threads per block (a multiple of 32); lanes per block of 32 codes (1 or 2: each lane one
    16-byte half); xr: rows of x per block (their codes in shared memory; a row past m is
    clamped, computed and not written); ahead: ask for the rows of a group in L2 before the
    block reads them (GEMV_SHAPE's L2 ahead)."""
    ldq = load16_words if wide else load16_bytes
    RPW, U, THREADS, XR = rpw, unroll, threads, xr
    HALVES = 2 // lanes                             # 16-byte halves of a block per lane
    STEP = 32 // lanes                              # blocks of a row per warp and step
    LW = 4 * HALVES                                 # words of codes per lane and block
    ROWS = THREADS // 32 * RPW                      # rows of w per block: RPW per warp
    SCRATCH = scratch_size(THREADS)
    SLAB_W = X_SLAB // 4                            # words of one x row's codes in a slab
    SLAB_B = X_SLAB // Q8_BLOCK                     # blocks of one x row in a slab
    GROUPS = XR * X_SLAB // 8                       # 8 x values per thread and round
    XW, XD = XR * SLAB_W, XR * SLAB_B               # shared words of codes, scales

    @device
    def fetch(raw, sw, qs, d, rq, rd, b, u, par):
        # the lane's halves of block b of each of the warp's rows into raw[i, u, :] (slot hh
        # holds half hh ^ par) and its scale into sw[i, u]
        for i in range(RPW):
            off = rq[i] + b * Q8_BLOCK
            for hh in range(HALVES):
                wq = ldq(qs, off + 16 * (hh ^ par))
                for c in range(4):
                    raw[i, u, 4 * hh + c] = wq[c]
            sw[i, u] = load(d, rd[i] + b)

    @device
    def dots(acc, raw, sw, xw, xd, bs, u, par):
        # block bs of the slab (raw[:, u], sw[:, u]) against each row of x codes
        for r in range(XR):
            wo = r * SLAB_W + bs * WORDS
            xa = load16_words(xw, wo + 4 * par)        # slot 0: half par
            # slot 1 (the other half; one lane a block only)
            xb = load16_words(xw, wo + 4 * (1 - par)) if HALVES == 2 else xa
            dx = xd[r * SLAB_B + bs]
            for i in range(RPW):
                s = dp4a(raw[i, u, 0], xa[0], int32(0))
                s = dp4a(raw[i, u, 1], xa[1], s)
                s = dp4a(raw[i, u, 2], xa[2], s)
                s = dp4a(raw[i, u, 3], xa[3], s)
                if HALVES == 2:
                    s = dp4a(raw[i, u, 4], xb[0], s)
                    s = dp4a(raw[i, u, 5], xb[1], s)
                    s = dp4a(raw[i, u, 6], xb[2], s)
                    s = dp4a(raw[i, u, 7], xb[3], s)
                acc[i, r] += float32(s) * (sw[i, u] * dx)

    @device
    def ask_l2(qs, d, grp, warp, lane, n, k, nbk):
        # the cache lines of the warp's rows of group grp, codes and scales, asked for in L2
        # (a line a lane at a time)
        row0 = grp * ROWS + warp * RPW
        for i in range(RPW):
            row = min(row0 + i, n - 1)
            for e in range(128 * lane, k, 128 * 32):
                prefetch_l2(qs, row * k + e)
            for e in range(64 * lane, nbk + 63, 64 * 32):     # 64 scales a line
                prefetch_l2(d, row * nbk + min(e, nbk - 1))

    @device
    def quantize_slab(xw, xd, x, scratch, v, tid, xrow0, m, k, s0, slab):
        # XR rows of x[:, s0:s0 + slab] as codes and scales into xw, xd: 8 values per
        # thread, 4 threads per block of 32; every thread runs every round (group_max's
        # shuffles)
        for g0 in range(0, GROUPS, THREADS):
            g = g0 + tid
            r = g // (X_SLAB // 8)
            e = (g - r * (X_SLAB // 8)) * 8      # first value, in the slab
            xi = min(xrow0 + r, m - 1) * k + s0 + e
            ok = g < GROUPS and e < slab
            amax = float32(0)
            for c in range(8):
                v[c] = x[xi + c] if ok else float32(0)
                amax = max(amax, abs(v[c]))
            amax = group_max(amax, 4, scratch, tid)  # the block's max |x|
            dq = div_rn(amax, float32(127))
            inv = div_rn(float32(1), dq) if dq != 0 else float32(0)
            if g < GROUPS:
                xw[r * SLAB_W + e // 4] = pack4(
                    round_away(v[0] * inv), round_away(v[1] * inv),
                    round_away(v[2] * inv), round_away(v[3] * inv))
                xw[r * SLAB_W + e // 4 + 1] = pack4(
                    round_away(v[4] * inv), round_away(v[5] * inv),
                    round_away(v[6] * inv), round_away(v[7] * inv))
                if e % Q8_BLOCK == 0:
                    xd[r * SLAB_B + e // Q8_BLOCK] = dq

    @device
    def slab_dots(acc, raw, sw, qs, d, rq, rd, xw, xd, lane, par, s0, slab):
        # acc[i, r] += the lane's blocks of w's row i in the slab . x codes row r
        nb = slab // Q8_BLOCK
        b0 = s0 // Q8_BLOCK                      # the slab's first block in a row
        bs = lane // lanes
        # main part: U blocks of each row per step (bs, bs + STEP, ...), all loaded before
        # any is used
        while bs + (U - 1) * STEP < nb:
            for u in range(U):
                fetch(raw, sw, qs, d, rq, rd, b0 + bs + STEP * u, u, par)
            for u in range(U):
                dots(acc, raw, sw, xw, xd, bs + STEP * u, u, par)
            bs += U * STEP
        # rest: one block at a time
        while bs < nb:
            fetch(raw, sw, qs, d, rq, rd, b0 + bs, 0, par)
            dots(acc, raw, sw, xw, xd, bs, 0, par)
            bs += STEP

    @cuda.jit(fastmath=True)
    def gemv(out, x, qs, d, bias, m, n, k):
        # x: (m * k,) float32; qs: (n * k,) int8; d: (n * k // 32,) float16; bias: (n,) or
        # (0,); out: (m * n,); block (groups of ROWS rows of w, XR rows of x)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        xrow0 = cuda.blockIdx.y * XR
        # x codes, 4 to a word, and scales of XR rows: (XR, SLAB_W) and (XR, SLAB_B)
        xw = cuda.shared.array(XW, uint32, alignment=ALIGN)
        xd = cuda.shared.array(XD, float32)
        scratch = cuda.shared.array(SCRATCH, float32)
        nbk = k // Q8_BLOCK
        rq = cuda.local.array(RPW, int64)            # int64: code offsets pass 2**31
        rd = cuda.local.array(RPW, int64)
        acc = cuda.local.array((RPW, XR), float32)
        raw = cuda.local.array((RPW, U, LW), uint32)  # codes in flight, as loaded
        sw = cuda.local.array((RPW, U), float32)         # their blocks' scales
        v = cuda.local.array(8, float32)
        # one lane a block: lanes 4-7 of each 8 read their blocks' second half first (one
        # 16-byte slot of x codes per lane of a quarter warp, no bank conflict); two: odd
        # lanes read the second half
        par = (lane >> 2) & 1 if HALVES == 2 else lane & 1

        n_groups = (n + ROWS - 1) // ROWS
        if ahead:
            ask_l2(qs, d, cuda.blockIdx.x, warp, lane, n, k, nbk)
        # groups of ROWS rows of w, gridDim.x apart (one a block unless the grid is capped)
        for grp in range(cuda.blockIdx.x, n_groups, cuda.gridDim.x):
            if ahead and grp + cuda.gridDim.x < n_groups:
                ask_l2(qs, d, grp + cuda.gridDim.x, warp, lane, n, k, nbk)
            # this warp's rows row0 + i, i < RPW; a row past n is clamped (loaded, never
            # written): no warp diverges
            row0 = grp * ROWS + warp * RPW
            for i in range(RPW):
                row = min(row0 + i, n - 1)
                rq[i] = row * k
                rd[i] = row * nbk
                for r in range(XR):
                    acc[i, r] = float32(0)
            for s0 in range(0, k, X_SLAB):
                slab = min(X_SLAB, k - s0)            # a multiple of 32
                if k > X_SLAB or grp == cuda.blockIdx.x:   # the slab's codes not there yet
                    cuda.syncthreads()  # the previous slab's codes are no longer read
                    quantize_slab(xw, xd, x, scratch, v, tid, xrow0, m, k, s0, slab)
                    cuda.syncthreads()  # the slab's codes and scales are in shared memory
                slab_dots(acc, raw, sw, qs, d, rq, rd, xw, xd, lane, par, s0, slab)
            for i in range(RPW):
                for r in range(XR):
                    total = group_sum(acc[i, r], 32, scratch, tid)   # the row's sum over lanes
                    row = row0 + i
                    xrow = xrow0 + r
                    if lane == 0 and row < n and xrow < m:
                        if bias.shape[0] > 0:
                            total += bias[row]
                        out[xrow * n + row] = total

    return gemv


@cuda.jit(fastmath=True)
def _gemm(out, x, qs, d, bias, m, n, k):
    # out (m, n) = x (m, k) @ w (n, k).T + bias, w = d * qs blockwise; linear_cuda._gemm with
    # w's tile dequantized as it is stored: block (bx, by) computes
    # out[by*TILE : +TILE, bx*TILE : +TILE]; thread (ty, tx) of 16 x 16 owns rows ty + 16 i and
    # columns tx + 16 j of the tile (i, j < MICRO), so shared-memory reads are conflict-free
    tid = cuda.threadIdx.x
    tx = tid % 16
    ty = tid // 16
    m0 = cuda.blockIdx.y * TILE
    n0 = cuda.blockIdx.x * TILE
    nbk = k // Q8_BLOCK
    # tiles stored transposed, rows padded so the transposing stores spread over the banks
    xs = cuda.shared.array((TK, TILE_PAD), float32)  # x tile: xs[kk, row]
    ws = cuda.shared.array((TK, TILE_PAD), float32)  # w tile: ws[kk, col], dequantized
    acc = cuda.local.array((MICRO, MICRO), float32)
    a = cuda.local.array(MICRO, float32)
    b = cuda.local.array(MICRO, float32)
    for i in range(MICRO):
        for j in range(MICRO):
            acc[i, j] = float32(0)

    for k0 in range(0, k, TK):
        cuda.syncthreads()      # the previous tiles are no longer read
        # load TILE x TK of x and of w (zeros outside the matrices); w = d * q in float32
        for e in range(tid, TILE * TK, GEMM_THREADS):
            rr = e // TK
            kk = e - rr * TK
            xs[kk, rr] = x[(m0 + rr) * k + k0 + kk] if m0 + rr < m and k0 + kk < k \
                else float32(0)
            ws[kk, rr] = float32(qs[(n0 + rr) * k + k0 + kk]) * \
                load(d, (n0 + rr) * nbk + (k0 + kk) // Q8_BLOCK) \
                if n0 + rr < n and k0 + kk < k else float32(0)
        cuda.syncthreads()      # both tiles are in shared memory
        for kk in range(TK):
            for i in range(MICRO):
                a[i] = xs[kk, ty + 16 * i]
                b[i] = ws[kk, tx + 16 * i]
            for i in range(MICRO):
                for j in range(MICRO):
                    acc[i, j] += a[i] * b[j]

    for i in range(MICRO):
        row = m0 + ty + 16 * i
        for j in range(MICRO):
            col = n0 + tx + 16 * j
            if row < m and col < n:                  # bounds guard
                v = acc[i, j]
                if bias.shape[0] > 0:
                    v += bias[col]
                out[row * n + col] = v


THREADS = 256      # embedding: threads per block (a multiple of 32)


@cuda.jit
def _embedding(out, qs, d, tokens, hidden, vocab):
    # out: (seq * hidden,) float32; qs: (vocab * hidden,) int8; d: (vocab * hidden // 32,)
    # float16; tokens: (seq,) int64. Block (row, col): token row, columns col * THREADS ...;
    # ids clipped to [0, vocab); the row dequantized (float32(q) * d, the CPU's product)
    row = cuda.blockIdx.x
    j = cuda.blockIdx.y * THREADS + cuda.threadIdx.x
    if j < hidden:                                   # bounds guard
        t = min(max(tokens[row], 0), vocab - 1)
        out[row * hidden + j] = float32(qs[t * hidden + j]) * \
            load(d, t * (hidden // Q8_BLOCK) + j // Q8_BLOCK)   # int64 offsets


def to_device(w, stream=0):
    """A host formats.Q8Matrix copied to the GPU (Q8Matrix.to_device)."""
    return w.to_device(stream)


def linear(out, x, w, bias, *, stream=0):
    # x: (m, k) float32; w: a Q8Matrix (n, k) on the device (.qs int8 (n, k), .d float16
    # (n, k // 32)); bias: (n,) or (0,); out: (m, n) float32
    m, k = x.shape
    qs, d = w.qs, w.d
    n = qs.shape[0]
    if m == 0 or n == 0:
        return
    if m <= GEMV_MAX_M:
        rpw, unroll, threads, lanes, per_sm, ahead = GEMV_SHAPE
        xr = x_rows(m)
        rows = threads // 32 * rpw
        groups = (n + rows - 1) // rows
        cap = per_sm * sm_count()
        # capped only where each block gets two groups or more (fewer: the last round of a
        # capped grid would run part-empty)
        grid = (cap if per_sm and groups > 2 * cap else groups, (m + xr - 1) // xr)
        gemv_kernel(aligned(qs), rpw, unroll, threads, lanes, xr, ahead)[grid, threads, stream](
            flat(out), flat(x), flat(qs), flat(d), bias, m, n, k)
    else:
        grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
        _gemm[grid, GEMM_THREADS, stream](flat(out), flat(x), flat(qs), flat(d), bias, m, n, k)


def embedding(out, table, tokens, *, stream=0):
    # out: (seq, hidden) float32; table: a Q8Matrix (vocab, hidden) on the device; tokens:
    # (seq,) int64, clipped to [0, vocab): the picked rows dequantized
    seq, hidden = out.shape
    if seq == 0 or hidden == 0:
        return
    qs, d = table.qs, table.d
    _embedding[(seq, (hidden + THREADS - 1) // THREADS), THREADS, stream](
        flat(out), flat(qs), flat(d), tokens, hidden, qs.shape[0])
