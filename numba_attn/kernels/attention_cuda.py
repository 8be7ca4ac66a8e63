"""Fused causal attention with grouped-query heads on the GPU, flash-style: an online softmax
over the keys, so neither the score matrix nor a mask is ever materialised. Twin:
attention_cpu.py.

K and V may be float32, float16 or bfloat16 (raw bits in uint16); all arithmetic is float32.
Scores are kept in base 2 (q pre-scaled by log2 e): each exponential is one ex2 instruction.

Lane layout: a head vector of D dims (d padded to a power of two >= 16) is split over LPK
neighbouring lanes (a lane group). Decode: DPL dims per lane (DECODE_SHAPE), chunks of 8 at
dims 8 * (sub + LPK * t) (16-byte loads of K/V rows from global memory cover whole rows).
Prefill: 16 dims per lane as four chunks of 4 at dims 4 * (sub + LPK * t), t < 4 (16-byte loads
from shared memory, a quarter warp reading 128 contiguous bytes: no bank conflicts); sub =
lane % LPK. A dot product is a partial sum per lane and a reduction over the LPK lanes
(log2 LPK shuffles).

Decode (few query rows, q_len <= DECODE_MAX_Q): flash-decoding. Grid ((batch, kv head, row
tile), split): the row tiles of a KV head are neighbours, so the second to read a key row
finds it in L2. A block takes the QR query rows of one row tile (query positions x the query
heads that share the KV head) against one split of the keys; each lane group (a key slot)
takes its own keys, several per step, with a running max and sum per row. The block merges
its slots in shared memory; with several splits, each block writes its partial (max, sum,
unnormalised output) to a workspace and the last block of a tile to finish (an atomic
counter) merges the splits and writes the output: one launch.

Prefill: grid (query block, head, batch). A block of PF_THREADS threads, PF_THREADS / LPK lane
groups of PF_ROWS query rows each, takes one head; tiles of BK keys of K and V are staged in
shared memory (widened to float32) and every group streams them, PF_KEYS keys per step (the
dot products, butterflies and exponentials of PF_ROWS x PF_KEYS scores in flight together; each
K and V value read from shared memory serves PF_ROWS rows), with the online softmax (the sum
is rescaled only when the max grows). Query blocks run heaviest first (causal)."""
import functools
import math

import numpy as np
from numba import cuda, int32, int64

from .scalar import FASTMATH_INF
from .util_cuda import (ALIGN, CHUNK, RAW, SIM, aligned, arrive, device, exp2, flat, float32,
                        group_max, group_sum, load4, load8, load8_raw, load8_tail, prefetch_l1,
                        scratch_size, shfl_xor, sm_count, store8, widen8, zero_offset)

DPL = 16                     # head dims per lane (prefill; decode's default)
MAX_D = 256                  # largest (padded) head dim

# --- decode ---
DEC_THREADS = 128 if not SIM else 64   # threads per block (4 warps on the GPU)
DEC_WARPS = DEC_THREADS // 32
DECODE_MAX_Q = 4             # q_len up to which the decode kernel serves
QR_MAX = 2                   # query rows per decode block (H200, 32/8 heads: 2 beat 4)
MIN_SPLIT_STEPS = 2 if not SIM else 1   # a key split is at least this many block steps ...
NO_SPLIT_STEPS = 4 if not SIM else 0    # ... and up to this many steps in all, one split: the
#                            merge costs more than the steps it saves (H200: kv 256, 32/8 heads)
MERGE_SPLITS = 16            # splits the last block of a tile merges per pass (loads in flight)
# (K/V item size, several query rows per block) -> (head dims per lane, keys per lane group and
# step, blocks per SM the key splits aim at, pipelined loads); H200, kv 8192, d 128
# (bench_cuda.py --only tune-decode): 32/32 fp32 71.4 us, fp16 41.8; 32/8 fp32 30.2, fp16 24.1
DECODE_SHAPE = {(4, False): (16, 2, 3, False), (2, False): (16, 4, 3, False),
                (4, True): (16, 4, 2, False), (2, True): (16, 4, 2, True)}

# --- prefill ---
PF_THREADS = 128 if not SIM else 64   # threads per block: PF_THREADS / LPK lane groups
PF_TILE = 4096 if not SIM else 256    # K (and V) tile in shared memory: BK = PF_TILE / D keys
PF_KEYS = 4                  # keys per step of a row (independent work in flight)
PF_ROWS = 4                  # query rows per lane group (each K/V read serves them all)
# (H200, S=2048, 32 heads, d=128: 128 threads x 4 keys x 4 rows 1.76 ms; 2 keys x 4 rows 2.03;
# 4 x 2 1.92; 256 threads x 4 x 4 1.94; one key x one row per step, the first version, 5.2)

NEG_INF = float32(-math.inf)
LOG2E = float32(math.log2(math.e))
M_FLOOR = float32(-1e30)     # a row's running max before any key: exp(-inf - M_FLOOR) = 0


def padded_dim(d):
    """The kernels' head dim D for a real head dim d: a power of two, 16..MAX_D."""
    D = 16
    while D < d:
        D *= 2
    if D > MAX_D:
        raise NotImplementedError(f"head_dim {d} > {MAX_D} is not supported on CUDA")
    return D


@device
def block_max(v, sm, scratch, tid):
    """Maximum of v over the block (every thread calls it; every thread gets it)."""
    v = group_max(v, 32, scratch, tid)
    cuda.syncthreads()          # sm is free (a previous reduction has been read)
    if tid % 32 == 0:
        sm[tid // 32] = v
    cuda.syncthreads()          # every warp's value is in shared memory
    r = sm[0]
    for w in range(1, cuda.blockDim.x // 32):
        r = max(r, sm[w])
    return r


@device
def block_sum(v, sm, scratch, tid):
    """Sum of v over the block (every thread calls it; every thread gets it)."""
    v = group_sum(v, 32, scratch, tid)
    cuda.syncthreads()          # sm is free (a previous reduction has been read)
    if tid % 32 == 0:
        sm[tid // 32] = v
    cuda.syncthreads()          # every warp's value is in shared memory
    r = sm[0]
    for w in range(1, cuda.blockDim.x // 32):
        r += sm[w]
    return r


@device
def butterfly_sum(s, rows, keys, width, scratch, tid):
    """s[r, u] summed over aligned groups of `width` lanes, for r < rows, u < keys, their
    shuffles interleaved; every thread of the block calls it (shfl_xor's rule)."""
    off = width // 2
    while off > 0:
        for r in range(rows):
            for u in range(keys):
                s[r, u] += shfl_xor(s[r, u], off, scratch, tid)
        off //= 2


@device
def online_softmax_step(s, r, keys, m, l, acc, dims):
    """Row r takes the scores s[r, :keys] (base 2, hidden keys at -inf): its running max m[r]
    and sum l[r], with l[r] and acc[r, :dims] rescaled only when the max grows; s[r] becomes
    the weights (0 for a hidden key: m >= M_FLOOR is finite)."""
    mx = s[r, 0]
    for u in range(1, keys):
        mx = max(mx, s[r, u])
    if mx > m[r]:
        a = exp2(m[r] - mx)
        l[r] *= a
        for e in range(dims):
            acc[r, e] *= a
        m[r] = mx
    for u in range(keys):
        p = exp2(s[r, u] - m[r])
        s[r, u] = p
        l[r] += p


@functools.cache
def decode_kernel(D, QR, wide, dpl=DPL, keys=2, pipe=False):
    """Flash-decoding kernel for padded head dim D and QR query rows per block; wide: K/V rows
    allow 16-byte loads (d == D, aligned bases); dpl: head dims per lane (8, 16 or 32: fewer
    means more lanes per key, fewer registers, more shuffles); keys: keys per lane group and
    step (more loads in flight, more registers); pipe (wide only): the next step's K/V loads
    are issued before this step's arithmetic (their words held in registers meanwhile).
    Either way the first step's K/V are asked for before the queries are read."""
    PIPE = pipe and wide
    KU = keys                          # keys per lane group and step
    NPL = min(dpl, D)                  # dims per lane
    NCH = NPL // CHUNK                 # chunks of 8 per lane: dims 8 * (sub + LPK * t), t < NCH
    LPK = D // NPL                     # lanes per key
    KPW = 32 // LPK                    # keys per warp step
    KPB = DEC_WARPS * KPW              # keys per block step
    NSLOT = DEC_WARPS * KPW            # key slots per block
    SM_O = NSLOT * QR * D              # their outputs in shared memory
    EPT = -(-QR * D // DEC_THREADS)    # output elements per thread in the split merge
    ld = load8 if wide else load8_tail
    SCRATCH = scratch_size(DEC_THREADS)

    @device
    def key_row(kvb, j0, u, my, k_hi, row):
        # where key j0 + u * KPB + my starts (clamped to k_hi - 1: a real row, masked later);
        # row: elements from one key row to the next
        return kvb + min(j0 + u * KPB + my, k_hi - 1) * row

    @device
    def fetch(k, v, ku, vu, kvb, j0, k_hi, my, sub, row, d):
        # keys j0 + u * KPB + my (u < KU) of K and V, widened, into ku, vu (d: the head dim,
        # zeros past it)
        for u in range(KU):
            rb = key_row(kvb, j0, u, my, k_hi, row)
            for t in range(NCH):
                dim = CHUNK * (sub + LPK * t)
                kt = ld(k, rb + dim, rb + d)
                vt = ld(v, rb + dim, rb + d)
                for c in range(CHUNK):
                    ku[u, CHUNK * t + c] = kt[c]
                    vu[u, CHUNK * t + c] = vt[c]

    @device
    def fetch_raw(k, v, rk, rv, kvb, j0, k_hi, my, sub, row):
        # the same keys' words as stored (wide rows), into rk, rv: loads issued, not waited for
        for u in range(KU):
            rb = key_row(kvb, j0, u, my, k_hi, row)
            for t in range(NCH):
                dim = CHUNK * (sub + LPK * t)
                wk = load8_raw(k, rb + dim)
                wv = load8_raw(v, rb + dim)
                for c in range(CHUNK):
                    rk[u, t, c] = wk[c]
                    rv[u, t, c] = wv[c]

    @device
    def prefetch(k, v, kvb, j0, k_hi, my, sub, row):
        # fetch's keys, their lines asked into L1
        for u in range(KU):
            rb = key_row(kvb, j0, u, my, k_hi, row)
            for t in range(NCH):
                prefetch_l1(k, rb + CHUNK * (sub + LPK * t))
                prefetch_l1(v, rb + CHUNK * (sub + LPK * t))

    @device
    def widen(k, v, rk, rv, ku, vu):
        # fetch_raw's words as float32, into ku, vu
        for u in range(KU):
            for t in range(NCH):
                kt = widen8(k, rk, u, t)
                vt = widen8(v, rv, u, t)
                for c in range(CHUNK):
                    ku[u, CHUNK * t + c] = kt[c]
                    vu[u, CHUNK * t + c] = vt[c]

    @cuda.jit(fastmath=FASTMATH_INF)
    def attn_decode(out, q, k, v, ws, scale, causal, q_len, H, Hkv, kv_len, at, kv_cap, d,
                    n_split, split_len, pbase):
        # q, out: (B * q_len * H * d,); k, v: (B * kv_cap * Hkv * d,), the first kv_len + at[0]
        # keys of each batch in use (at: a device int64 array, 0 or a decode step's position);
        # ws: workspace, [counters, one per (batch, kv head, row tile) | from pbase: partials,
        # QR * (d + 2) per (tile, split)]; splits past the keys in use find none
        kv_len = kv_len + at[0]
        tid = cuda.threadIdx.x
        scale2 = scale * LOG2E                       # scores in base 2: exp2, one op fewer
        lane = tid % 32
        warp = tid // 32
        ks = lane // LPK                             # key slot of this lane in the warp
        sub = lane % LPK                             # this lane's dims: 8 * (sub + LPK * t)
        # grid x: (batch, kv head, row tile), tiles fastest, then heads: the row tiles of a
        # KV head run together (the second to read a key row finds it in L2), and blocks
        # running together read neighbouring parts of the same key rows (all heads of one
        # position are contiguous), not scattered ranges
        G = H // Hkv
        n_tiles = (G * q_len + QR - 1) // QR
        split = cuda.blockIdx.y
        tile_id = cuda.blockIdx.x                    # (batch, kv head, row tile)
        tile = tile_id % n_tiles
        hk = (tile_id // n_tiles) % Hkv
        z = tile_id // (n_tiles * Hkv)

        scratch = cuda.shared.array(SCRATCH, float32)
        sm_m = cuda.shared.array((NSLOT, QR), float32)    # per key slot: max, then weight
        sm_l = cuda.shared.array((NSLOT, QR), float32)    # per key slot: sum of exp
        sm_o = cuda.shared.array(SM_O, float32, alignment=ALIGN)  # (slot, row, D): per key
        #                                                   slot, the unnormalised output
        sm_row = cuda.shared.array((2, QR), float32)      # per row: common max, total sum
        last = cuda.shared.array(1, int32)           # 1: this block merges the splits
        sm_w = cuda.shared.array((DEC_THREADS, QR), float32)  # per split: weight / total
        sm_red = cuda.shared.array(DEC_WARPS, float32)        # block reductions

        # this tile's query rows r = (position qi, head g of the group), pre-scaled
        qr = cuda.local.array((QR, NPL), float32)
        acc = cuda.local.array((QR, NPL), float32)
        m = cuda.local.array(QR, float32)
        l = cuda.local.array(QR, float32)
        lim = cuda.local.array(QR, int64)            # last key row r sees (-1: none)
        ku = cuda.local.array((KU, NPL), float32)    # this step's keys and values
        vu = cuda.local.array((KU, NPL), float32)
        su = cuda.local.array((QR, KU), float32)     # ... their scores, then weights
        rk = cuda.local.array((KU, NCH, CHUNK), RAW)  # pipe: the next step's K/V as loaded
        rv = cuda.local.array((KU, NCH, CHUNK), RAW)

        # this split's keys (cut below at the last key any row sees); the first step's K/V
        # are on their way while the queries are read
        k_lo = split * split_len
        k_hi = min(kv_len, k_lo + split_len)
        kvb = z * kv_cap * Hkv * d + hk * d          # int64: key j's row starts at kvb + j*Hkv*d
        my = warp * KPW + ks                         # this slot's key in a block step
        if k_lo < k_hi:
            if PIPE:
                fetch_raw(k, v, rk, rv, kvb, k_lo, k_hi, my, sub, Hkv * d)
            else:           # no registers held: the lines are asked into L1
                prefetch(k, v, kvb, k_lo, k_hi, my, sub, Hkv * d)
        last_key = -1
        for r in range(QR):
            gr = tile * QR + r
            m[r] = M_FLOOR
            l[r] = float32(0)
            for e in range(NPL):
                qr[r, e] = float32(0)
                acc[r, e] = float32(0)
            lim[r] = -1
            if gr < G * q_len:
                qi = gr // G
                h = hk * G + gr % G
                vis = kv_len - q_len + qi if causal else kv_len - 1
                lim[r] = vis
                last_key = max(last_key, vis)
                qb = ((z * q_len + qi) * H + h) * d
                for t in range(NCH):
                    qv = load8_tail(q, qb + CHUNK * (sub + LPK * t), qb + d)
                    for c in range(CHUNK):
                        qr[r, CHUNK * t + c] = qv[c] * scale2

        k_end = min(k_hi, last_key + 1)             # keys past the last one seen: skipped
        # KU keys per lane group per step, all loaded before any is used (pipe: loaded by the
        # step before, ahead of its arithmetic); the rows' scores of all KU keys computed
        # together, one max and rescale per row and step
        for j0 in range(k_lo, k_end, KPB * KU):
            if PIPE:
                widen(k, v, rk, rv, ku, vu)
                if j0 + KPB * KU < k_end:            # block-uniform
                    fetch_raw(k, v, rk, rv, kvb, j0 + KPB * KU, k_hi, my, sub, Hkv * d)
            else:
                fetch(k, v, ku, vu, kvb, j0, k_end, my, sub, Hkv * d, d)
            for r in range(QR):
                for u in range(KU):
                    p0 = float32(0)
                    p1 = float32(0)
                    for e in range(0, NPL, 2):
                        p0 += qr[r, e] * ku[u, e]
                        p1 += qr[r, e + 1] * ku[u, e + 1]
                    su[r, u] = p0 + p1
            butterfly_sum(su, QR, KU, LPK, scratch, tid)
            for r in range(QR):
                for u in range(KU):
                    j = j0 + u * KPB + my
                    if j >= k_end or j > lim[r]:
                        su[r, u] = NEG_INF
                online_softmax_step(su, r, KU, m, l, acc, NPL)
            for u in range(KU):
                for r in range(QR):
                    p = su[r, u]
                    for e in range(NPL):
                        acc[r, e] += p * vu[u, e]

        # merge the key slots (each LPK-lane group of each warp) through shared memory
        slot = my
        for r in range(QR):
            if sub == 0:
                sm_m[slot, r] = m[r]
                sm_l[slot, r] = l[r]
            for t in range(NCH):
                store8(sm_o, (slot * QR + r) * D + CHUNK * (sub + LPK * t),
                       (acc[r, CHUNK * t], acc[r, CHUNK * t + 1], acc[r, CHUNK * t + 2],
                        acc[r, CHUNK * t + 3], acc[r, CHUNK * t + 4], acc[r, CHUNK * t + 5],
                        acc[r, CHUNK * t + 6], acc[r, CHUNK * t + 7]))
        cuda.syncthreads()      # every slot's (max, sum, output) is in shared memory
        if tid < QR:            # row tid: the common max, each slot's weight, the total sum
            mm = NEG_INF
            for sl in range(NSLOT):
                mm = max(mm, sm_m[sl, tid])
            ll = float32(0)
            for sl in range(NSLOT):
                f = exp2(sm_m[sl, tid] - mm) if mm > NEG_INF else float32(0)
                sm_m[sl, tid] = f
                ll += sm_l[sl, tid] * f
            sm_row[0, tid] = mm
            sm_row[1, tid] = ll
        cuda.syncthreads()      # the weights are in shared memory

        # the block's result, element (r, e) per thread: straight to out with a single split,
        # else to the workspace
        prow = (tile_id * n_split + split) * QR
        for idx in range(tid, QR * d, DEC_THREADS):
            r = idx // d
            e = idx - r * d
            o = float32(0)
            for sl in range(NSLOT):
                o += sm_o[(sl * QR + r) * D + e] * sm_m[sl, r]
            ll = sm_row[1, r]
            gr = tile * QR + r
            if n_split == 1:
                if gr < G * q_len:
                    qi = gr // G
                    h = hk * G + gr % G
                    out[((z * q_len + qi) * H + h) * d + e] = o / ll if ll > 0 else float32(0)
            else:
                pr = pbase + (prow + r) * (d + 2)
                if e == 0:
                    ws[pr] = sm_row[0, r]
                    ws[pr + 1] = ll
                ws[pr + 2 + e] = o
        if n_split == 1:
            return                                   # block-uniform

        # several splits: the last block of this tile to finish merges them
        cuda.syncthreads()      # this block's partials are written before thread 0 counts
        if tid == 0:            # it as done: released with them; the last to count acquires
            done = arrive(ws, tile_id)               # every block's
            last[0] = 1 if done == float32(n_split - 1) else 0
        cuda.syncthreads()      # every thread sees whether this block is the last
        if last[0] == 0:
            return
        # per row: the common max over the splits (thread sp holds split sp: n_split <=
        # DEC_THREADS), each split's weight, and the total sum. Elements (r, e) = tid + u *
        # DEC_THREADS (u < EPT) per thread: the weighted sum over the splits, MERGE_SPLITS of
        # them per pass. Every load of the first pass goes out with the (max, sum) loads,
        # before the reductions: one round trip when n_split <= MERGE_SPLITS
        pstride = QR * (d + 2)                       # floats per split
        p0 = pbase + tile_id * n_split * pstride     # this tile's split 0
        ms = cuda.local.array(QR, float32)           # split tid's max and sum per row
        ls = cuda.local.array(QR, float32)
        pv = cuda.local.array((EPT, MERGE_SPLITS), float32)   # a pass's partial outputs
        osum = cuda.local.array(EPT, float32)
        for r in range(QR):
            ms[r] = NEG_INF
            ls[r] = float32(0)
            if tid < n_split:
                ms[r] = ws[p0 + tid * pstride + r * (d + 2)]
                ls[r] = ws[p0 + tid * pstride + r * (d + 2) + 1]
        for u in range(EPT):
            osum[u] = float32(0)
            idx = min(tid + u * DEC_THREADS, QR * d - 1)
            r = idx // d
            pe = p0 + r * (d + 2) + 2 + (idx - r * d)
            for w in range(MERGE_SPLITS):
                pv[u, w] = ws[pe + min(w, n_split - 1) * pstride]
        for r in range(QR):
            mm = block_max(ms[r], sm_red, scratch, tid)
            f = exp2(ms[r] - mm) if mm > NEG_INF else float32(0)
            ll = block_sum(ls[r] * f, sm_red, scratch, tid)
            if tid < n_split:
                sm_w[tid, r] = f / ll if ll > 0 else float32(0)
        cuda.syncthreads()      # every split's weight is in shared memory
        for sp in range(0, n_split, MERGE_SPLITS):
            for u in range(EPT):
                idx = min(tid + u * DEC_THREADS, QR * d - 1)
                r = idx // d
                pe = p0 + r * (d + 2) + 2 + (idx - r * d)
                if sp > 0:                           # block-uniform
                    for w in range(MERGE_SPLITS):
                        pv[u, w] = ws[pe + min(sp + w, n_split - 1) * pstride]
                for w in range(MERGE_SPLITS):
                    # past the last split: weight 0
                    wt = sm_w[min(sp + w, n_split - 1), r] if sp + w < n_split else \
                        float32(0)
                    osum[u] += pv[u, w] * wt
        for u in range(EPT):
            idx = tid + u * DEC_THREADS
            r = idx // d
            gr = tile * QR + r
            if idx < QR * d and gr < G * q_len:
                qi = gr // G
                h = hk * G + gr % G
                out[((z * q_len + qi) * H + h) * d + idx - r * d] = osum[u]
        if tid == 0:
            ws[tile_id] = float32(0)                 # reset the counter for the next call

    return attn_decode


@device
def lane_dims(tile, i, lpk):
    """A lane's 16 dims of a key or value row in a shared tile (prefill layout): 4 chunks of 4
    floats at tile[i + 4 lpk t], t < 4."""
    return (load4(tile, i), load4(tile, i + 4 * lpk), load4(tile, i + 8 * lpk),
            load4(tile, i + 12 * lpk))


@functools.cache
def prefill_kernel(D, wide, threads=PF_THREADS, ks=PF_KEYS, rows=PF_ROWS, tile=PF_TILE):
    """Prefill kernel for padded head dim D; wide: K/V rows allow 16-byte loads; threads per
    block; ks: keys per step (their dot products, butterflies and exponentials in flight
    together); rows: query rows per lane group (each K and V value read from shared memory
    serves that many rows); tile: floats of K (and of V) staged in shared memory at a time."""
    LPK = D // DPL                     # lanes per lane group
    GROUPS = threads // LPK            # lane groups per block
    ROWS = GROUPS * rows               # query rows per block: group g has g + GROUPS * r
    TILE = tile
    BK = TILE // D                     # keys per shared-memory tile
    KS = min(ks, BK)                   # keys per step (powers of two: BK % KS == 0)
    R = rows
    ld = load8 if wide else load8_tail
    SCRATCH = scratch_size(threads)

    @cuda.jit(fastmath=FASTMATH_INF)
    def attn_prefill(out, q, k, v, scale, causal, q_len, H, Hkv, kv_len, d):
        # q, out: (B * q_len * H * d,); k, v: (B * kv_len * Hkv * d,). Lane sub of a group
        # holds dims 4 (sub + LPK t) .. + 3, t < 4: the 8 lanes of a quarter warp read 128
        # contiguous bytes of a key row (no bank conflicts)
        tid = cuda.threadIdx.x
        scale2 = scale * LOG2E                       # scores in base 2: exp2, one op fewer
        grp = tid // LPK
        sub = tid % LPK
        qblk = cuda.gridDim.x - 1 - cuda.blockIdx.x   # heaviest (last) query blocks first
        h = cuda.blockIdx.y
        z = cuda.blockIdx.z
        hk = h // (H // Hkv)
        scratch = cuda.shared.array(SCRATCH, float32)
        kt = cuda.shared.array(TILE, float32, alignment=ALIGN)   # (BK, D) keys
        vt = cuda.shared.array(TILE, float32, alignment=ALIGN)   # (BK, D) values

        # this group's rows: queries pre-scaled, running max and sum, last key seen (-1: a
        # row past q_len)
        qr = cuda.local.array((R, DPL), float32)
        acc = cuda.local.array((R, DPL), float32)
        m = cuda.local.array(R, float32)
        l = cuda.local.array(R, float32)
        lim = cuda.local.array(R, int64)
        s = cuda.local.array((R, KS), float32)       # this step's scores, then weights
        for r in range(R):
            qi = qblk * ROWS + grp + GROUPS * r
            m[r] = M_FLOOR
            l[r] = float32(0)
            lim[r] = -1
            if qi < q_len:
                lim[r] = kv_len - q_len + qi if causal else kv_len - 1
            qb = ((z * q_len + qi) * H + h) * d
            for t in range(4):
                for c in range(4):
                    dim = 4 * (sub + LPK * t) + c
                    acc[r, 4 * t + c] = float32(0)
                    qr[r, 4 * t + c] = q[qb + dim] * scale2 if qi < q_len and dim < d \
                        else float32(0)

        # keys any row of the block sees
        k_end = kv_len
        if causal:
            k_end = min(kv_len, max(0, kv_len - q_len + min(q_len - 1, qblk * ROWS + ROWS - 1)
                                    + 1))
        # the last key the block's first row sees: tiles up to it need no mask
        vis0 = kv_len - q_len + qblk * ROWS if causal else kv_len - 1
        kvb = z * kv_len * Hkv * d + hk * d
        for kb in range(0, k_end, BK):
            nk = min(BK, k_end - kb)
            full = nk == BK and kb + BK - 1 <= vis0     # every key visible to every row
            cuda.syncthreads()  # the previous tile is no longer read
            for e in range(tid * CHUNK, TILE, threads * CHUNK):
                jr = e // D
                c0 = e - jr * D
                if jr < nk and c0 < d:
                    rb = kvb + (kb + jr) * (Hkv * d)
                    store8(kt, e, ld(k, rb + c0, rb + d))
                    store8(vt, e, ld(v, rb + c0, rb + d))
                else:           # zeros past the keys and dims: finite scores, masked below
                    store8(kt, e, (float32(0), float32(0), float32(0), float32(0), float32(0),
                                   float32(0), float32(0), float32(0)))
                    store8(vt, e, (float32(0), float32(0), float32(0), float32(0), float32(0),
                                   float32(0), float32(0), float32(0)))
            cuda.syncthreads()  # the tile is in shared memory
            for j0 in range(0, nk, KS):
                # R x KS scores: partial dot products, then one butterfly over the group
                for u in range(KS):
                    k0, k1, k2, k3 = lane_dims(kt, (j0 + u) * D + 4 * sub, LPK)
                    for r in range(R):
                        part = float32(0)
                        for c in range(4):
                            part += (qr[r, c] * k0[c] + qr[r, 4 + c] * k1[c]) + \
                                (qr[r, 8 + c] * k2[c] + qr[r, 12 + c] * k3[c])
                        s[r, u] = part
                butterfly_sum(s, R, KS, LPK, scratch, tid)
                # online softmax per row: hidden keys (causal, past the tile, a padding row)
                # at -inf
                if not full:                        # block-uniform
                    for r in range(R):
                        for u in range(KS):
                            if j0 + u >= nk or kb + j0 + u > lim[r]:
                                s[r, u] = NEG_INF
                for r in range(R):
                    online_softmax_step(s, r, KS, m, l, acc, DPL)
                for u in range(KS):
                    v0, v1, v2, v3 = lane_dims(vt, (j0 + u) * D + 4 * sub, LPK)
                    for r in range(R):
                        p = s[r, u]
                        for c in range(4):
                            acc[r, c] += p * v0[c]
                            acc[r, 4 + c] += p * v1[c]
                            acc[r, 8 + c] += p * v2[c]
                            acc[r, 12 + c] += p * v3[c]

        for r in range(R):
            qi = qblk * ROWS + grp + GROUPS * r
            if qi < q_len:
                inv = float32(1) / l[r] if l[r] > 0 else float32(0)
                ob = ((z * q_len + qi) * H + h) * d
                for t in range(4):
                    for c in range(4):
                        dim = 4 * (sub + LPK * t) + c
                        if dim < d:
                            out[ob + dim] = acc[r, 4 * t + c] * inv

    return attn_prefill


# --- host side ---------------------------------------------------------------------------

_workspaces = {}   # device id -> (float32 device array, counters it holds at its start)


@cuda.jit
def _zero(a):
    i = cuda.grid(1)
    if i < a.shape[0]:                               # bounds guard
        a[i] = float32(0)


def _workspace(n_counters, n_partial):
    """The decode workspace of this device: n_counters split counters (zero between calls) at
    its start, then n_partial floats; allocated and zeroed once, grown when too small.
    Returns (workspace, offset of the partials)."""
    dev = 0 if SIM else cuda.get_current_device().id
    ws, cap = _workspaces.get(dev, (None, 0))
    if ws is None or cap < n_counters or ws.shape[0] < cap + n_partial:
        cap = max(cap, n_counters, 1024 if not SIM else 1)
        ws = cuda.device_array(cap + max(n_partial, 1 << 20 if not SIM else 1), dtype=np.float32)
        _zero[(ws.shape[0] + 255) // 256, 256](ws)
        _workspaces[dev] = (ws, cap)
    return ws, cap


def _wide(d, D, *arrays):
    return d == D and all(aligned(a) for a in arrays)


def decode_shape(rows, itemsize):
    """Query rows per block (a power of two, at most QR_MAX) for `rows` query rows per KV head,
    and DECODE_SHAPE's (head dims per lane, keys per step, blocks per SM, pipelined) for K/V
    items of `itemsize` bytes."""
    QR = 1
    while QR < min(rows, QR_MAX):
        QR *= 2
    return (QR,) + DECODE_SHAPE[(itemsize, QR > 1)]


def key_splits(kv_len, kpb, tiles, max_blocks, min_steps=None, no_split_steps=None):
    """Decode's key splits for `tiles` row tiles: (count, keys per split), the keys per split a
    multiple of kpb (the keys of a block step). At most max_blocks blocks in all (one wave),
    each split min_steps block steps at least (MIN_SPLIT_STEPS), one split when the keys take
    at most no_split_steps steps (NO_SPLIT_STEPS), at most DEC_THREADS splits (the merge gives
    each a thread)."""
    min_steps = MIN_SPLIT_STEPS if min_steps is None else min_steps
    no_split_steps = NO_SPLIT_STEPS if no_split_steps is None else no_split_steps
    n = 1 if kv_len <= kpb * no_split_steps else \
        max(1, min(max_blocks // tiles, kv_len // (kpb * min_steps), DEC_THREADS))
    per = -(-kv_len // n)
    split_len = -(-per // kpb) * kpb
    return -(-kv_len // split_len), split_len


def decode_plan(batch, q_len, H, Hkv, d, itemsize, kv_len):
    """The decode launch for up to kv_len keys: (kernel, grid, (n_split, split_len), counters,
    partial floats) with the workspace it needs (attention(..., splits=, workspace=))."""
    D = padded_dim(d)
    QR, dpl, ku, bps, pipe = decode_shape((H // Hkv) * q_len, itemsize)
    n_tiles = ((H // Hkv) * q_len + QR - 1) // QR
    dpl = min(dpl, D)
    kpb = DEC_WARPS * (32 // (D // dpl)) * ku        # keys per block step
    base = batch * Hkv * n_tiles
    n_split, split_len = key_splits(kv_len, kpb, base, bps * sm_count())
    partials = base * n_split * QR * (d + 2) if n_split > 1 else 0
    return (QR, dpl, ku, pipe), (base, n_split), (n_split, split_len), base, partials


def new_workspace(n_counters, n_partial):
    """A decode workspace of its own (a captured step bakes its address in): (array, offset of
    the partials), the counters zeroed."""
    ws = cuda.device_array(n_counters + max(n_partial, 1), dtype=np.float32)
    _zero[(ws.shape[0] + 255) // 256, 256](ws)
    return ws, n_counters


def attention(out, q, k, v, scale, causal, *, at=None, splits=None, workspace=None, stream=0):
    # q, out: (b, q_len, H, d); k, v: (b, kv_len, Hkv, d); causal bottom-right.
    # With at (an int64 device array, a captured decode step's position): k, v hold kv_cap
    # keys, the first at[0] + q_len in use; splits (n_split, split_len) and workspace (array,
    # partials offset) fixed by the caller for the longest use (decode_plan)
    B, q_len, H, d = q.shape
    kv_len, Hkv = k.shape[1], k.shape[2]
    if B == 0 or q_len == 0 or kv_len == 0:
        return
    D = padded_dim(d)
    wide = _wide(d, D, k, v)
    qf, kf, vf, of = flat(q), flat(k), flat(v), flat(out)
    if at is not None:
        if q_len > DECODE_MAX_Q or splits is None or workspace is None:
            raise ValueError("attention at a device position takes decode shapes (q_len <= "
                             f"{DECODE_MAX_Q}), splits and a workspace")
        (QR, dpl, ku, pipe), (base, _), _, _, _ = decode_plan(B, q_len, H, Hkv, d,
                                                               k.dtype.itemsize, 1)
        (n_split, split_len), (ws, pbase) = splits, workspace
        decode_kernel(D, QR, wide, dpl, ku, pipe)[(base, n_split), DEC_THREADS, stream](
            of, qf, kf, vf, ws, float32(scale), bool(causal), q_len, H, Hkv, q_len, at,
            kv_len, d, n_split, split_len, pbase)
    elif q_len <= DECODE_MAX_Q:
        (QR, dpl, ku, pipe), grid, (n_split, split_len), base, partials = decode_plan(
            B, q_len, H, Hkv, d, k.dtype.itemsize, kv_len)
        ws, pbase = _workspace(base, partials)
        decode_kernel(D, QR, wide, dpl, ku, pipe)[grid, DEC_THREADS, stream](
            of, qf, kf, vf, ws, float32(scale), bool(causal), q_len, H, Hkv, kv_len,
            zero_offset(), kv_len, d, n_split, split_len, pbase)
    else:
        rows = PF_THREADS // (D // DPL) * PF_ROWS
        grid = ((q_len + rows - 1) // rows, H, B)
        prefill_kernel(D, wide, PF_THREADS, PF_KEYS, PF_ROWS, PF_TILE)[grid, PF_THREADS, stream](
            of, qf, kf, vf, float32(scale), bool(causal), q_len, H, Hkv, kv_len, d)
