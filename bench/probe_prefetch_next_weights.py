"""Prefetching the next GEMV's weights during the decode attention, a measurement: TinyLlama's
decode attention at 2000 keys (float32 K/V, 22 layers' in one array, each call behind 40 MB
of other reads as in a model), then a GEMV over a 2048x2048 float32 matrix (o_proj's shape, one
a layer), timed apart; the attention a copy of attention_cpu.py's that also prefetches the
first MB megabytes of that matrix into L2 (prefetcht1, locality LOC), spread over its key
blocks and split between its tasks. The question: does the memory left idle by the attention's
arithmetic carry the next weights for free?

    MB=0,2,4,8,16 LOC=2 KV=2000 python bench/probe_prefetch_next_weights.py"""
import os, sys, tempfile, time
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.dirname(HERE))
from kernel_variants import kernel_source, load_kernel
from numba_attn.bench.limits import _parallel_sum
from numba_attn.kernels import linear_cpu

KV, HKV, D, G, LAYERS = int(os.environ.get("KV", 2000)), 4, 64, 8, 22
LOC = int(os.environ.get("LOC", 2))
src = kernel_source("numba_attn/kernels/attention_cpu.py")
rep = [
 ("def _decode_range_mk(q, k, v, scale, causal, kind, z, k_lo, k_hi, Qf, Sf, O, m_run, l_run,\n                     alpha, n_vis, work):",
  "def _decode_range_mk(q, k, v, scale, causal, kind, z, k_lo, k_hi, Qf, Sf, O, m_run, l_run,\n                     alpha, n_vis, work, pw, pwb):"),
 ("    for k0 in range(k_lo, k_hi, BLOCK_K):\n        nk = min(BLOCK_K, k_hi - k0)\n        diag = False",
  "    nblk = (k_hi - k_lo + BLOCK_K - 1) // BLOCK_K\n    per = (pwb // (nblk * Hkv) + 63) // 64 * 64\n    done = 0\n    for k0 in range(k_lo, k_hi, BLOCK_K):\n        nk = min(BLOCK_K, k_hi - k0)\n        diag = False"),
 ("            _head_pv(work, nk, rows, n_vis, o_p + 4 * hk * rows * d, st_p, ld, vh_p, ldk, kind,\n                     a_p, d)\n",
  "            _head_pv(work, nk, rows, n_vis, o_p + 4 * hk * rows * d, st_p, ld, vh_p, ldk, kind,\n                     a_p, d)\n            if done < pwb:\n                _pf_l2(pw + done, min(per, pwb - done))\n                done += per\n"),
 ("def _decode_tasks(q, k, v, scale, causal, kind, family, w, n_workers, n_split, split_len, O_part,\n                  M_part, L_part):",
  "def _decode_tasks(q, k, v, scale, causal, kind, family, w, n_workers, n_split, split_len, O_part,\n                  M_part, L_part, pw, pwb):"),
 ("                         M_part[task], L_part[task], At, Vis, W)\n",
  "                         M_part[task], L_part[task], At, Vis, W,\n                         pw + task * (pwb // O_part.shape[0]), pwb // O_part.shape[0])\n"),
 ("def _decode_part(part, parts, q, k, v, scale, causal, kind, family, n_split, split_len, O_part,\n                 M_part, L_part):",
  "def _decode_part(part, parts, q, k, v, scale, causal, kind, family, n_split, split_len, O_part,\n                 M_part, L_part, pw, pwb):"),
 ("    _decode_tasks(q, k, v, scale, causal, kind, family, part, parts, n_split, split_len, O_part,\n                  M_part, L_part)\n",
  "    _decode_tasks(q, k, v, scale, causal, kind, family, part, parts, n_split, split_len, O_part,\n                  M_part, L_part, pw, pwb)\n"),
 ("def _attention_decode_mk(part_addr, out, q, k, v, scale, causal, kind, n_workers, family):",
  "def _attention_decode_mk(part_addr, out, q, k, v, scale, causal, kind, n_workers, family, pw,\n                         pwb):"),
 ("n_split, split_len, O_part, M_part, L_part))\n",
  "n_split, split_len, O_part, M_part, L_part, pw, pwb))\n"),
 ("    _decode_tasks(q, k, v, scale, causal, kind, family, 0, 1, n_split, split_len, O_part,\n                  M_part, L_part)\n",
  "    _decode_tasks(q, k, v, scale, causal, kind, family, 0, 1, n_split, split_len, O_part,\n                  M_part, L_part, 0, 0)\n"),
 ("@intrinsic\ndef _prefetch_rows(", """@intrinsic
def _pf_l2(typingctx, addr, nbytes):
    sig = types.void(addr, nbytes)
    def codegen(context, builder, signature, args):
        a, b = [context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args)]
        with cgutils.for_range(builder, builder.ashr(b, ir.Constant(_I64, 6))) as lines:
            prefetch(builder, builder.add(a, builder.mul(lines.index, ir.Constant(_I64, 64))), 0, %d)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _prefetch_rows(""" % LOC),
]
for a, b in rep:
    assert src.count(a) == 1, a[:60]
    src = src.replace(a, b)
tmp = tempfile.mkdtemp()
mod = load_kernel(src, "overlap_attn_%d" % LOC, tmp)
rng = np.random.default_rng(0)
weights = np.ones(300 << 18, np.float32)
n = (40 << 20) // 4
q = rng.standard_normal((1, 1, HKV * G, D)).astype(np.float32)
out = np.empty_like(q)
k, v = (rng.standard_normal((LAYERS, 1, KV, HKV, D)).astype(np.float32) for _ in range(2))
W = [rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(LAYERS)]
gemvs = [linear_cpu.bind_gemv(w) for w in W]
x = rng.standard_normal((1, 2048)).astype(np.float32); y = np.empty((1, 2048), np.float32)
fam = mod.DECODE_FAMILIES[False]
part = mod.cpu_pool.address(mod._decode_part, q, k[0], v[0], 0.125, True, mod.KV_F32, fam,
                            *mod._DECODE_PLAN, 0, 0)
sizes = [int(s) << 20 for s in os.environ.get("MB", "0,2,4,8,16").split(",")]
T = {s: ([], []) for s in sizes}
at = 0
for it in range(10):
    for s in sizes[it % len(sizes):] + sizes[:it % len(sizes)]:
        for L in range(LAYERS):
            _parallel_sum(weights[at:at + n]); at = (at + n) % (weights.size - n)
            t0 = time.perf_counter()
            mod._attention_decode_mk(part, out, q, k[L], v[L], 0.125, True, mod.KV_F32, 2, fam, W[L].ctypes.data, s)
            t1 = time.perf_counter()
            gemvs[L](y, x)
            t2 = time.perf_counter()
            if it:
                T[s][0].append(t1 - t0); T[s][1].append(t2 - t1)
for s, (a, g) in T.items():
    print(f"prefetch {s >> 20:3d} MB: attention {np.median(a)*1e6:6.1f} us  gemv {np.median(g)*1e6:6.1f} us  sum {np.median(np.add(a, g))*1e6:6.1f} us")
