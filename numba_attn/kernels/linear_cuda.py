"""y = x @ w.T + bias on the GPU, w stored (out, in) as in checkpoints. Twin: linear_cpu.py.

w may be float32, float16 or bfloat16 (raw bits in uint16); the products and sums are float32.

Decode (a few rows of x): a matrix-vector product bound by reading w once. Each warp owns a
row of w and streams it in 16-byte chunks, 4 chunks of a row in flight per lane; x is staged
in shared memory, X_SLAB elements at a time, shared by the block's warps.
Prefill (many rows): a tiled GEMM on the CUDA cores, TILE x TILE outputs per block of
GEMM_THREADS threads, each thread an 8 x 8 register tile; w is widened to float32 as its tile
is stored in shared memory."""
import functools

from numba import cuda

from .util_cuda import (ALIGN, CHUNK, SIM, device, flat, float32, group_sum, load, load8,
                        load8_tail, scratch_size, wide_ok)

# --- GEMV (decode) ---
GEMV_THREADS = 256                       # threads per block (a multiple of 32)
GEMV_WARPS = GEMV_THREADS // 32          # rows of w per block: one per warp
X_SLAB = 4096 if not SIM else 2048       # x elements staged in shared memory at a time
                                         # (a multiple of 8 chunks of 8 per lane: 2048)
GEMV_MAX_M = 4                           # rows of x up to which the GEMV serves
SCRATCH = scratch_size(GEMV_THREADS)

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
def gemv_kernel(wide):
    """The GEMV kernel; wide: rows of w allow 16-byte loads (k % 8 == 0, aligned base).
    (Loading the next step's chunks before this step's math was measured slower on the H200:
    float32 59.0 against 57.2 us, float16 32.9 against 30.9.)"""
    ldw = load8 if wide else load8_tail

    @cuda.jit(fastmath=True)
    def gemv(out, x, w, bias, n, k):
        # x: (m * k,); w: (n * k,); bias: (n,) or (0,); out: (m * n,); block (rows, x row)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        xrow = cuda.blockIdx.y
        xs = cuda.shared.array(X_SLAB, float32, alignment=ALIGN)
        scratch = cuda.shared.array(SCRATCH, float32)
        # this warp's row; a row past n is clamped (loaded, never written): no warp diverges
        row = cuda.blockIdx.x * GEMV_WARPS + warp
        rb = min(row, n - 1) * k                    # int64: w offsets pass 2**31
        row_end = rb + k
        step = 32 * CHUNK                           # a warp's chunks are contiguous
        span = 4 * step                             # elements of a row per main step
        acc = float32(0)

        for s0 in range(0, k, X_SLAB):
            slab = min(X_SLAB, k - s0)
            cuda.syncthreads()      # the previous slab is no longer read
            for e in range(tid, X_SLAB, GEMV_THREADS):
                xs[e] = x[xrow * k + s0 + e] if e < slab else float32(0)
            cuda.syncthreads()      # the slab is in shared memory

            # main part: 4 chunks of the row per step, all loaded before any is used
            full = slab - 3 * step - CHUNK          # last base with all 4 chunks inside
            base = lane * CHUNK
            while base <= full:
                j = rb + s0 + base
                w0 = ldw(w, j, row_end)
                w1 = ldw(w, j + step, row_end)
                w2 = ldw(w, j + 2 * step, row_end)
                w3 = ldw(w, j + 3 * step, row_end)
                x0 = load8(xs, base, X_SLAB)
                x1 = load8(xs, base + step, X_SLAB)
                x2 = load8(xs, base + 2 * step, X_SLAB)
                x3 = load8(xs, base + 3 * step, X_SLAB)
                acc += (dot8(w0, x0) + dot8(w1, x1)) + (dot8(w2, x2) + dot8(w3, x3))
                base += span
            # rest: one chunk at a time (x past the slab is zero in shared memory)
            while base < slab:
                acc += dot8(ldw(w, rb + s0 + base, row_end), load8(xs, base, X_SLAB))
                base += step

        total = group_sum(acc, 32, scratch, tid)    # the row's sum across the warp's lanes
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


def linear(out, x, w, bias):
    # x: (m, k) float32; w: (n, k) float32 / float16 / bf16 bits (uint16); bias: (n,) or (0,);
    # out: (m, n) float32
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or n == 0:
        return
    if m <= GEMV_MAX_M:
        grid = ((n + GEMV_WARPS - 1) // GEMV_WARPS, m)
        gemv_kernel(wide_ok(w, k))[grid, GEMV_THREADS](
            flat(out), flat(x), flat(w), bias, n, k)
    else:
        grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
        _gemm[grid, GEMM_THREADS](flat(out), flat(x), flat(w), bias, m, n, k)
