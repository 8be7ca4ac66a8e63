"""y = x @ w.T + bias on the GPU, w stored (out, in) as in checkpoints. Twin: linear_cpu.py.

w may be float32, float16 or bfloat16 (raw bits in uint16); the products and sums are float32.

Decode (a few rows of x): a matrix-vector product bound by reading w once. Each warp owns
RPW rows of w and streams them in 16-byte chunks, U chunks of each row in flight per lane
(GEMV_SHAPE, per storage type); x is staged in shared memory, X_SLAB elements at a time,
shared by the block's warps, and each x chunk read from it serves the warp's RPW rows.
Prefill (many rows): a tiled GEMM on the CUDA cores, TILE x TILE outputs per block of
GEMM_THREADS threads, each thread an 8 x 8 register tile; w is widened to float32 as its tile
is stored in shared memory."""
import functools

from numba import cuda, int64

from .util_cuda import (ALIGN, CHUNK, SIM, device, flat, float32, group_sum, load, load8,
                        load8_tail, scratch_size, wide_ok)

# --- GEMV (decode) ---
GEMV_THREADS = 256                       # threads per block (a multiple of 32), by default
X_SLAB = 4096 if not SIM else 2048       # x elements staged in shared memory at a time
                                         # (a multiple of 8 chunks of 8 per lane: 2048)
GEMV_MAX_M = 4                           # rows of x up to which the GEMV serves
# w's item size -> (rows per warp, chunks per step, threads per block); H200, 12288 x 4096
# (bench_cuda.py tune): fp32 54.3-54.8 us against 57.4 for (1, 4, 256); fp16 29.3-29.5 against
# 31.3
GEMV_SHAPE = {4: (2, 4, 256), 2: (2, 2, 512)}

# --- GEMM (prefill) ---
TILE = 128 if not SIM else 32            # outputs per block along m and along n
TK = 16                                  # k per shared-memory step
GEMM_THREADS = 256                       # (TILE / 8)**2 threads on the GPU
MICRO = TILE // 16                       # each thread: MICRO x MICRO outputs (16 x 16 threads)
TILE_PAD = TILE + 4                      # shared tile row length: transposing stores hit 32 banks


@device
def dot8(a, b):
    # a . b for two tuples of 8 float32, as two independent chains
    return ((a[0] * b[0] + a[1] * b[1]) + (a[2] * b[2] + a[3] * b[3])) + \
        ((a[4] * b[4] + a[5] * b[5]) + (a[6] * b[6] + a[7] * b[7]))


@functools.cache
def gemv_kernel(wide, rpw=1, unroll=4, threads=GEMV_THREADS):
    """The GEMV kernel; wide: rows of w allow 16-byte loads (k % 8 == 0, aligned base); rpw:
    rows of w per warp (each x chunk read from shared memory serves them all); unroll: chunks
    of each row loaded per step, all before any is used; threads per block (a multiple of 32).
    (Loading the next step's chunks before this step's math was measured slower on the H200:
    float32 59.0 against 57.2 us, float16 32.9 against 30.9.)"""
    ldw = load8 if wide else load8_tail
    RPW, U, THREADS = rpw, unroll, threads
    ROWS = THREADS // 32 * RPW                       # rows of w per block: RPW per warp
    SCRATCH = scratch_size(THREADS)

    @cuda.jit(fastmath=True)
    def gemv(out, x, w, bias, n, k):
        # x: (m * k,); w: (n * k,); bias: (n,) or (0,); out: (m * n,); block (rows, x row)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        xrow = cuda.blockIdx.y
        xs = cuda.shared.array(X_SLAB, float32, alignment=ALIGN)
        scratch = cuda.shared.array(SCRATCH, float32)
        # this warp's rows row0 + i, i < RPW; a row past n is clamped (loaded, never written):
        # no warp diverges
        row0 = cuda.blockIdx.x * ROWS + warp * RPW
        rb = cuda.local.array(RPW, int64)            # int64: w offsets pass 2**31
        acc = cuda.local.array(RPW, float32)
        wv = cuda.local.array((RPW, U, CHUNK), float32)   # this step's chunks of w and x
        xv = cuda.local.array((U, CHUNK), float32)
        for i in range(RPW):
            rb[i] = min(row0 + i, n - 1) * k
            acc[i] = float32(0)
        step = 32 * CHUNK                           # a warp's chunks are contiguous
        span = U * step                             # elements of a row per main step

        for s0 in range(0, k, X_SLAB):
            slab = min(X_SLAB, k - s0)
            cuda.syncthreads()      # the previous slab is no longer read
            for e in range(tid, X_SLAB, THREADS):
                xs[e] = x[xrow * k + s0 + e] if e < slab else float32(0)
            cuda.syncthreads()      # the slab is in shared memory

            # main part: U chunks of each row per step, all loaded before any is used
            full = slab - (U - 1) * step - CHUNK    # last base with all U chunks inside
            base = lane * CHUNK
            while base <= full:
                for i in range(RPW):
                    for u in range(U):
                        wc = ldw(w, rb[i] + s0 + base + u * step, rb[i] + k)
                        for c in range(CHUNK):
                            wv[i, u, c] = wc[c]
                for u in range(U):
                    xc = load8(xs, base + u * step, X_SLAB)
                    for c in range(CHUNK):
                        xv[u, c] = xc[c]
                for i in range(RPW):                # short chains: a tree per chunk
                    part = float32(0)
                    for u in range(U):
                        part += ((wv[i, u, 0] * xv[u, 0] + wv[i, u, 1] * xv[u, 1]) +
                                 (wv[i, u, 2] * xv[u, 2] + wv[i, u, 3] * xv[u, 3])) + \
                            ((wv[i, u, 4] * xv[u, 4] + wv[i, u, 5] * xv[u, 5]) +
                             (wv[i, u, 6] * xv[u, 6] + wv[i, u, 7] * xv[u, 7]))
                    acc[i] += part
                base += span
            # rest: one chunk at a time (x past the slab is zero in shared memory)
            while base < slab:
                xc = load8(xs, base, X_SLAB)
                for i in range(RPW):
                    acc[i] += dot8(ldw(w, rb[i] + s0 + base, rb[i] + k), xc)
                base += step

        for i in range(RPW):
            total = group_sum(acc[i], 32, scratch, tid)   # the row's sum across the lanes
            row = row0 + i
            if lane == 0 and row < n:
                if bias.shape[0] > 0:
                    total += bias[row]
                out[xrow * n + row] = total

    return gemv


@cuda.jit(fastmath=True)
def _gemm(out, x, w, bias, m, n, k):
    # out (m, n) = x (m, k) @ w (n, k).T + bias; block (bx, by) computes
    # out[by*TILE : +TILE, bx*TILE : +TILE]; thread (ty, tx) of 16 x 16 owns rows ty + 16 i and
    # columns tx + 16 j of the tile (i, j < MICRO), so shared-memory reads are conflict-free
    tid = cuda.threadIdx.x
    tx = tid % 16
    ty = tid // 16
    m0 = cuda.blockIdx.y * TILE
    n0 = cuda.blockIdx.x * TILE
    # tiles stored transposed, rows padded so the transposing stores spread over the banks
    xs = cuda.shared.array((TK, TILE_PAD), float32)  # x tile: xs[kk, row]
    ws = cuda.shared.array((TK, TILE_PAD), float32)  # w tile: ws[kk, col]
    acc = cuda.local.array((MICRO, MICRO), float32)
    a = cuda.local.array(MICRO, float32)
    b = cuda.local.array(MICRO, float32)
    for i in range(MICRO):
        for j in range(MICRO):
            acc[i, j] = float32(0)

    for k0 in range(0, k, TK):
        cuda.syncthreads()      # the previous tiles are no longer read
        # load TILE x TK of x and of w (zeros outside the matrices), widened to float32
        for e in range(tid, TILE * TK, GEMM_THREADS):
            rr = e // TK
            kk = e - rr * TK
            xs[kk, rr] = x[(m0 + rr) * k + k0 + kk] if m0 + rr < m and k0 + kk < k \
                else float32(0)
            ws[kk, rr] = load(w, (n0 + rr) * k + k0 + kk) if n0 + rr < n and k0 + kk < k \
                else float32(0)
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


def linear(out, x, w, bias, *, stream=0):
    # x: (m, k) float32; w: (n, k) float32 / float16 / bf16 bits (uint16); bias: (n,) or (0,);
    # out: (m, n) float32
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or n == 0:
        return
    if m <= GEMV_MAX_M:
        rpw, unroll, threads = GEMV_SHAPE[w.dtype.itemsize]
        rows = threads // 32 * rpw
        grid = ((n + rows - 1) // rows, m)
        gemv_kernel(wide_ok(w, k), rpw, unroll, threads)[grid, threads, stream](
            flat(out), flat(x), flat(w), bias, n, k)
    else:
        grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
        _gemm[grid, GEMM_THREADS, stream](flat(out), flat(x), flat(w), bias, m, n, k)
