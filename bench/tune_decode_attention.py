"""The CPU decode attention's K/V prefetch, variants in turn in one process: TinyLlama's shape
(32 query / 4 KV heads, head dim 64) at 2000 keys on the machine's threads. Cold as in a model:
22 layers' K/V in one cache array, each layer's call behind 40 MB of other reads (a layer's
weights stream between its attention and the next one's), the variants in a rotating order.
Warm: the same call again at once. Each variant is attention_cpu.py's source with one change,
loaded as a module of its own.

    python bench/tune_decode_attention.py [float32|float16|bfloat16|int8] [VARIANT,...]
        [--model DIR [--context N] [--steps S]]

With --model (a TinyLlama-shaped folder, bench_model.py's): in a model instead, where the
synthetic cold above can mislead: decode steps at context N (default 1800) rotating over the
variants, positions advancing, every attention call timed inside its step; the weights are the
K/V's type (int8: q8_0 weights, whose cache is int8).

VARIANT: as-is (the rows 64 keys on, whole rows in address order, into L1; into L2 on Zen 4:
attention_cpu.DECODE_KV_LOCALITY), ahead-16, ahead-32 and ahead-128 (16, 32 or 128 keys on),
touch (a demand load of each line instead of a prefetch), head-major and head-major-none (K and
V laid out (Hkv, keys, d), the head's own rows prefetched, or none), l1, l1-16, l1-32 (into L1
on every CPU, 64, 16 or 32 keys on), l2, l2-128, l2-256 (into L2 on every CPU, 64, 128 or 256
keys on), none, no-scores (the scores left out, their prefetch kept), no-softmax, no-pv (the
online softmax or P V left out: what each costs in place), farF-nearN (the rows F keys on into
L2 as well, N as as-is: far256-near64, far256-near32, far512-near32, far128-near32), or at:REV,
the file as git revision REV has it (at:HEAD: the committed kernel). int8 (into L1 on every
CPU) has as-is, none, ahead-32/96/128, block-128, r8, l1 (as-is), l2, l2-128 (into L2, 64 or
128 keys on), no-scores, no-softmax, no-pv, touch and skeleton (the three parts left out at
once)."""
import os
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELATIVE = "numba_attn/kernels/attention_cpu.py"
RELATIVE_INT8 = "numba_attn/kernels/attention_int8_cpu.py"    # the int8 K/V's kernels
KV, HKV, D, G, LAYERS = 2000, 4, 64, 8, 22
BETWEEN = 40 << 20                      # bytes read between two layers' attention
KEYS = "PREFETCH_KEYS = 64\n"
CALL = "k_p + r0 * row, v_p + r0 * row, (r1 - r0) * Hkv)"
SCORES = ("_head_scores(work, narrow, nk, st_p, ld, kh_p, ldk, kind, qt_p + 4 * hk * d * ld, d,\n"
          "                         k_p + r0 * row, v_p + r0 * row, (r1 - r0) * Hkv)")
PV = ("_head_pv(work, nk, rows, n_vis, o_p + 4 * hk * rows * d, st_p, ld, vh_p, ldk, kind,\n"
      "                     a_p, d)")
PREFETCH_L2 = """@intrinsic
def _prefetch_l2(typingctx, addr, nbytes):
    sig = types.void(addr, nbytes)

    def codegen(context, builder, signature, args):
        a, b = [context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args)]
        with cgutils.for_range(builder, builder.ashr(b, ir.Constant(_I64, 6))) as lines:
            prefetch(builder, builder.add(a, builder.mul(lines.index, ir.Constant(_I64, 64))),
                     0, 2)
        return context.get_dummy_value()
    return sig, codegen
"""
FAR_CALL = """
            f0 = min(k_hi, k0 + FAR_KEYS + hk * BLOCK_K // Hkv)
            f1 = min(k_hi, k0 + FAR_KEYS + (hk + 1) * BLOCK_K // Hkv)
            _prefetch_l2(k_p + f0 * row, (f1 - f0) * row)
            _prefetch_l2(v_p + f0 * row, (f1 - f0) * row)"""
# a demand load of each line, in place of _prefetch_rows' prefetch instruction
TOUCH_LINE = """                    line = builder.add(row, builder.mul(lines.index, ir.Constant(_I64, 64)))
                    builder.load_atomic(builder.inttoptr(line, ir.PointerType(ir.IntType(8))),
                                        "monotonic", 1)"""
PF_LINE = """                    prefetch(builder, builder.add(row, builder.mul(lines.index,
                                                                   ir.Constant(_I64, 64))), 0,
                             locality)"""


def _touch_rows():
    # attention_cpu's make_prefetch_rows with a demand load for its prefetch, as source (the
    # int8 kernels import it, so their variant defines its own)
    with open(os.path.join(HERE, RELATIVE)) as f:
        src = f.read()
    start = src.index("def make_prefetch_rows(")
    factory = src[start:src.index("\n\n\n", start)]
    if PF_LINE not in factory:
        sys.exit(f"touch: {PF_LINE.strip()!r} is no longer in make_prefetch_rows")
    return "\n\n" + factory.replace(PF_LINE, TOUCH_LINE) + "\n"


LOCALITY = 'DECODE_KV_LOCALITY = 2 if HOST_CPU == "znver4" else 3\n'   # _prefetch_rows' level
L1 = (LOCALITY, "DECODE_KV_LOCALITY = 3\n")        # prefetcht0, into L1
L2 = (LOCALITY, "DECODE_KV_LOCALITY = 2\n")        # prefetcht1, into L2
VARIANTS = {"as-is": [], "ahead-32": [(KEYS, "PREFETCH_KEYS = 32\n")],
            "ahead-16": [(KEYS, "PREFETCH_KEYS = 16\n")],
            "ahead-128": [(KEYS, "PREFETCH_KEYS = 128\n")],
            "none": [(CALL, "0, 0, 0)")],
            "l1": [L1], "l2": [L2], "l2-128": [L2, (KEYS, "PREFETCH_KEYS = 128\n")],
            "l1-16": [L1, (KEYS, "PREFETCH_KEYS = 16\n")],
            "l1-32": [L1, (KEYS, "PREFETCH_KEYS = 32\n")],
            "l2-256": [L2, (KEYS, "PREFETCH_KEYS = 256\n")],
            # one part of a key block's work left out, to see what it costs in place
            "no-scores": [(SCORES, "_prefetch_rows(k_p + r0 * row, 1, 0, (r1 - r0) * row)\n"
                                   "            _prefetch_rows(v_p + r0 * row, 1, 0, (r1 - r0) * row)")],
            "no-softmax": [("_softmax8(st_p, ld, nk, mh, lh, a_p, nv_p, diag)", "pass")],
            "no-pv": [(PV, "pass")],
            "touch": [(PF_LINE, TOUCH_LINE)],
            # K and V laid out (Hkv, keys, d) a batch, each head's keys back to back (the
            # tuner passes such arrays, shaped as the kernel expects); the prefetch: the head's
            # own rows PREFETCH_KEYS on, a block's worth
            "head-major": [
                ("    ldk = Hkv * d                                  # elements from",
                 "    ldk = d                                  # elements from"),
                ("kh_p, vh_p = k_p + es * (k0 * ldk + hk * d), v_p + es * (k0 * ldk + hk * d)",
                 "kh_p, vh_p = k_p + es * (k0 * ldk + hk * kv_len * d), "
                 "v_p + es * (k0 * ldk + hk * kv_len * d)"),
                (CALL, "kh_p + es * PREFETCH_KEYS * d, vh_p + es * PREFETCH_KEYS * d, "
                       "max(0, min(BLOCK_K, k_hi - k0 - PREFETCH_KEYS)))")]}
# two streams: the rows FAR keys on into L2 (prefetcht1, whole rows, a head's share a block),
# and the rows NEAR keys on into L1 as now
for far, near in ((256, 64), (256, 32), (512, 32), (128, 32)):
    VARIANTS[f"far{far}-near{near}"] = [
        (KEYS, f"PREFETCH_KEYS = {near}\nFAR_KEYS = {far}\n"),
        ("_mk_set_rows = ", PREFETCH_L2 + "\n\n_mk_set_rows = "),
        (SCORES, SCORES + FAR_CALL)]


# over int8 K/V (attention_int8_cpu.py): the prefetch distance in keys
VARIANTS["head-major-none"] = VARIANTS["head-major"][:2] + [(CALL, "0, 0, 0)")]
VARIANTS_INT8 = {"as-is": [], "none": [("_prefetch_rows(pf_k", "0 and _prefetch_rows(pf_k")]}
VARIANTS_INT8.update({f"ahead-{n}": [(KEYS, f"PREFETCH_KEYS = {n}\n")] for n in (32, 96, 128)})
VARIANTS_INT8["block-128"] = [("BLOCK = BLOCK_K ", "BLOCK = 128 ")]
VARIANTS_INT8["r8"] = [('"avx2": (63, 4, 12,', '"avx2": (63, 4, 8,')]  # AVX2: 8 keys a score call
VARIANTS_INT8.update({            # one part of a key block's work left out, as above
    "no-scores": [("            _head_scores(isa, nk, st_p, kc_p",
                   "            0 and _head_scores(isa, nk, st_p, kc_p")],
    "no-softmax": [("            _softmax8(st_p, 8, nk, mr_p", "            0 and _softmax8(st_p, 8, nk, mr_p")],
    "no-pv": [("            _pack_weights(pw_p,", "            0 and _pack_weights(pw_p,"),
              ("            _head_pv(isa, rows, nk,", "            0 and _head_pv(isa, rows, nk,")]})
_OWN_ROWS = ("_softmax8, \\\n    make_prefetch_rows\n", "_softmax8\n")
INT8_LEVEL = "_prefetch_rows = make_prefetch_rows(3)"
VARIANTS_INT8["l1"] = []                                      # as-is: into L1
VARIANTS_INT8["l2"] = [(INT8_LEVEL, "_prefetch_rows = make_prefetch_rows(2)")]
VARIANTS_INT8["touch"] = [_OWN_ROWS, ("\nPREFETCH_KEYS = 64",
                                      _touch_rows() + "\n\nPREFETCH_KEYS = 64")]
VARIANTS_INT8["l2-128"] = VARIANTS_INT8["l2"] + [(KEYS, "PREFETCH_KEYS = 128\n")]
VARIANTS_INT8["skeleton"] = sum((VARIANTS_INT8[k] for k in ("no-scores", "no-softmax", "no-pv")),
                               [])                # all three left out: the loops and prefetch


def load_variant(name, tmp, int8=False):
    from kernel_variants import kernel_source, load_kernel   # bench/, this script's folder
    relative = RELATIVE_INT8 if int8 else RELATIVE
    src = kernel_source(relative, name[3:] if name.startswith("at:") else None)
    for old, new in (VARIANTS_INT8 if int8 else VARIANTS).get(name, []):
        if old not in src:
            sys.exit(f"variant {name}: {old!r} is no longer in {relative}")
        src = src.replace(old, new)
    return load_kernel(src, "tuned_attention_" + "".join(c if c.isalnum() else "_" for c in name),
                       tmp)


def in_model(path, dtype, names, n_ctx, n_steps):
    """Decode steps of a model at context n_ctx, rotating over the variants' attention."""
    import statistics
    import types
    sys.path.insert(0, HERE)
    from numba_attn.model import Model
    weights = {"int8": "q8_0"}.get(dtype, dtype)
    model = Model.from_pretrained(path, weight_dtype=weights, max_seq=n_ctx + n_steps)
    model.decoder = None          # the steps, whose attention the variants replace
    if np.dtype(model.kv_dtype).name != dtype and not (dtype == "int8" and model.cache.int8):
        sys.exit(f"{weights} weights keep a {model.kv_dtype} KV cache, not {dtype}")
    tmp = tempfile.mkdtemp()
    mods = {name: load_variant(name, tmp, dtype == "int8") for name in names}
    model.warmup()
    model.forward(np.random.default_rng(1).integers(0, model.config.vocab_size, n_ctx), 0)
    steps, calls = model.cpu_steps, []
    attention = steps.attention

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = attention(*args, **kwargs)
        calls.append(time.perf_counter() - t)
        return out
    steps.attention = timed
    res = {name: ([], []) for name in names}
    for i in range(n_steps):
        name = names[i % len(names)]
        steps.attn = types.SimpleNamespace(attention=mods[name].attention)
        calls.clear()
        t = time.perf_counter()
        model.forward([5], n_ctx + i)
        if i >= len(names):                              # each variant's first step compiles
            res[name][0].append(time.perf_counter() - t)
            res[name][1].extend(calls)
    print(f"{path}: {weights} weights, {dtype} K/V, context {n_ctx}-{n_ctx + n_steps}; "
          f"medians of {n_steps // len(names) - 1} steps each, in rotation:")
    for name, (st, at) in res.items():
        print(f"  {name:9s} step {statistics.median(st) * 1e3:.2f} ms, attention "
              f"{statistics.median(at) * 1e6:.0f} us a layer")


def main():
    if "--model" in sys.argv:
        opts, args, argv = {}, [], sys.argv[1:]
        while argv:
            a = argv.pop(0)
            if a.startswith("--"):
                opts[a] = argv.pop(0)
            else:
                args.append(a)
        dtype = args[0] if args else "bfloat16"
        names = args[1].split(",") if len(args) > 1 else ["as-is", "l1", "l2"]
        in_model(opts["--model"], dtype, names, int(opts.get("--context", 1800)),
                 int(opts.get("--steps", 120)))
        return
    sys.path.insert(0, HERE)
    from numba_attn.bench.limits import _parallel_sum
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    int8 = dtype == "int8"
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else \
        list(VARIANTS_INT8 if int8 else VARIANTS) + ["at:HEAD"]
    dt = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "int8": np.float32}[dtype]
    tmp = tempfile.mkdtemp()
    mods = {name: load_variant(name, tmp, int8) for name in names}
    rng = np.random.default_rng(0)
    weights = np.ones(300 << 18, np.float32)          # 300 MB, read 40 MB at a time
    n = BETWEEN // 4
    q = rng.standard_normal((1, 1, HKV * G, D)).astype(np.float32)
    out = np.empty_like(q)
    k, v = (rng.standard_normal((LAYERS, 1, KV, HKV, D)).astype(dt) for _ in range(2))
    if int8:
        from numba_attn.formats import quantize_kv_int8
        k, v = quantize_kv_int8(k), quantize_kv_int8(v)
    # the head-major variant's K/V: the same values laid out (Hkv, keys, d), shaped as the rest
    hm = {name: tuple(np.ascontiguousarray(x.transpose(0, 1, 3, 2, 4)).reshape(x.shape)
                      for x in (k, v)) for name in names if name.startswith("head-major")}
    for name in names:               # each variant's output against as-is's on layer 0
        kk, vv = hm.get(name, (k, v))
        mods[name].attention(out, q, kk[0], vv[0], 0.125, True)
        if name == names[0]:
            first = out.copy()
        elif not np.allclose(out, first, rtol=1e-4, atol=1e-5):
            print(f"  (variant {name}: output differs from {names[0]}'s, "
                  f"{np.abs(out - first).max():.2g} at most)")
    times = {name: {"cold": [], "warm": []} for name in names}
    order, at = list(mods), 0
    for it in range(12):
        for name in order[it % len(order):] + order[:it % len(order)]:   # each first in turn
            m = mods[name]
            kk, vv = hm.get(name, (k, v))
            for layer in range(LAYERS):
                _parallel_sum(weights[at:at + n])
                at = (at + n) % (weights.size - n)
                for mode in ("cold", "warm"):
                    t = time.perf_counter()
                    m.attention(out, q, kk[layer], vv[layer], 0.125, True)
                    if it:
                        times[name][mode].append(time.perf_counter() - t)
    print(f"{dtype} K/V, {KV} keys, {HKV * G}/{HKV} heads, head dim {D}, {LAYERS} layers; "
          f"medians of {11 * LAYERS} calls in turn:")
    for name, t in times.items():
        print(f"  {name:9s} " + "  ".join(f"{mode} {np.median(v) * 1e6:.0f} us"
                                          for mode, v in t.items()))


if __name__ == "__main__":
    main()
