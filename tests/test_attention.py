"""Fused attention against the float64 reference: GQA, causal bottom-right (prefill, prefill over
a cached prefix, decode), a batch axis, rows that see nothing, 16-bit keys and values, and a
hypothesis property test."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numba_attn import attention
from numba_attn.kernels import attention_cpu, llvm_cpu
from tests.reference import attention_ref

# The output is a convex combination of rows of v (|v| ~ 1): float32 scores over d terms and an
# online softmax over kv_len keys stay well inside 1e-5 absolute / 1e-4 relative, as long as the
# scores are of order 1. float32 rounds a score s by ~|s| * 6e-8, and near-ties of the softmax
# pass that on to the output: with large scores the absolute bound grows as 1e-6 * max |s|.
RTOL, ATOL = 1e-4, 1e-5


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def qkv(seed, q_len, kv_len, n_heads, n_kv_heads, d, batch=None):
    lead = () if batch is None else (batch,)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (q_len, n_heads, d)).astype(np.float32)
    k = rng.standard_normal(lead + (kv_len, n_kv_heads, d)).astype(np.float32)
    v = rng.standard_normal(lead + (kv_len, n_kv_heads, d)).astype(np.float32)
    return q, k, v


def max_score(q, k, scale=None):
    """max |scale * q . k| over all query heads and keys (GQA heads repeated), float64."""
    groups = q.shape[-2] // k.shape[-2]
    k = np.repeat(k.astype(np.float64), groups, axis=-2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return np.abs(np.einsum("...qhd,...khd->...qhk", q.astype(np.float64), k) * scale).max()


def check(y, want, q=None, k=None, scale=None):
    """y against the reference; given q and k, the absolute bound follows the largest score."""
    assert y.dtype == np.float32 and np.isfinite(y).all()
    atol = ATOL if q is None else max(ATOL, 1e-6 * max_score(q, k, scale))
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=atol)


def dots_in_bf16(k, q_len, n_heads):
    """Whether decode over this K takes its products in bfloat16 (attention_cpu.bf16_dots)."""
    kind = attention_cpu.KV_KINDS[np.dtype(k.dtype)]
    return (q_len <= attention_cpu.DECODE_MAX_Q and k.shape[-1] % 32 == 0
            and attention_cpu.bf16_dots(kind, q_len * (n_heads // k.shape[-2])))


def check_bf16_dots(y, want, v):
    """y of decode's bfloat16 products against the float64 attention over the same K/V: q and
    the probabilities rounded to bfloat16 (relative error up to 2^-8 each) move the output by
    up to 2^-8 max |v| through the probabilities' rounding, and by less through the scores'
    at these scores (1.2-3.3e-3 measured with |v| ~ 4, the bound 5x that)."""
    assert y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y, want, rtol=0, atol=2.0 ** -8 * np.abs(v).max().astype(float))


def check_kv(y, want, q, k, v):
    """check or check_bf16_dots, as decode over this K runs."""
    if dots_in_bf16(k, q.shape[-3], q.shape[-2]):
        check_bf16_dots(y, want, v)
    else:
        check(y, want, q, k.astype(np.float64))


CASES = [
    # q_len, kv_len, H, Hkv, d, batch
    (129, 129, 32, 8, 128, None),    # prefill, Llama-3-8B heads
    (129, 129, 8, 1, 64, None),      # prefill, multi-query
    (7, 7, 32, 8, 128, None),
    (7, 129, 32, 8, 64, None),       # prefill over a cached prefix: q_len < kv_len
    (65, 200, 4, 2, 64, None),       # tiles that straddle key blocks
    (5, 300, 8, 8, 64, None),        # smallest prefill tile count, plain multi-head
    (1, 129, 32, 8, 128, None),      # decode
    (1, 1, 8, 1, 64, None),          # decode, first token
    (3, 600, 32, 8, 64, None),       # decode schedule, several key ranges merged
    (4, 1100, 8, 1, 128, None),      # decode schedule, causal inside the ranges
    (7, 129, 8, 2, 64, 2),           # batch axis, prefill
    (1, 129, 8, 2, 128, 3),          # batch axis, decode
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len,kv_len,n_heads,n_kv_heads,d,batch", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_attention_matches_reference(q_len, kv_len, n_heads, n_kv_heads, d, batch, causal):
    q, k, v = qkv(q_len * 1000 + kv_len, q_len, kv_len, n_heads, n_kv_heads, d, batch)
    copies = [a.copy() for a in (q, k, v)]
    y = attention(q, k, v, causal=causal)
    assert y.shape == q.shape
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)
    check(y, attention_ref(q, k, v, causal=causal))


@pytest.mark.parametrize("kv_len", [1, 7, 65, 2000])
@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_eight_query_heads_per_kv_head(q_len, kv_len):
    """Decode at TinyLlama's heads (32 query heads on 4 KV heads, d 64): the 8 query heads of a
    KV head (24 rows with 3 queries) share each key row read; key blocks partly filled (7, 65),
    one key, and a cache long enough for every thread."""
    q, k, v = qkv(11 + kv_len, q_len, kv_len, 32, 4, 64)
    check(attention(q, k, v, causal=True), attention_ref(q, k, v, causal=True), q, k)
    check(attention(q, k, v, causal=False), attention_ref(q, k, v, causal=False), q, k)


def _not_this_driver(*args):
    raise AssertionError("the other decode driver ran")


@pytest.mark.parametrize("kv_dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("kv_len,batch,serial", [(16, None, True), (60, 2, True),
                                                 (2000, None, False), (300, 3, False)])
def test_decode_serial_and_parallel_drivers(monkeypatch, kv_dtype, kv_len, batch, serial):
    """Decode work below the thread pool's threshold runs on the calling thread (its own
    driver), above it on every thread (their tasks compiled once, _decode_part, called through
    its address); the other driver raises."""
    work = (batch or 1) * 32 * kv_len * 64
    assert (work < attention_cpu.cpu_pool.PARALLEL_MIN_WORK) == serial
    other = "_attention_decode_mk" if serial else "_attention_decode_mk_serial"
    monkeypatch.setattr(attention_cpu, other, _not_this_driver)
    q, k, v = qkv(17 + kv_len, 1, kv_len, 32, 4, 64, batch)
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    want = attention_ref(q, k.astype(np.float32), v.astype(np.float32), causal=True)
    check_kv(attention(q, k, v, causal=True), want, q, k, v)


@pytest.mark.parametrize("kv_dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("q_len,kv_len,batch,serial", [(8, 8, None, True), (5, 8, 3, True),
                                                       (40, 300, None, False)])
def test_prefill_serial_and_parallel_drivers(monkeypatch, kv_dtype, q_len, kv_len, batch,
                                             serial):
    """Prefill work below the thread pool's threshold runs on the calling thread (its own
    driver, compiled without the parallel machinery), above it on every thread (the tasks
    compiled once, _prefill_part, called through its address); the other driver raises."""
    work = (batch or 1) * q_len * 32 * kv_len * 64
    assert (work < attention_cpu.cpu_pool.PARALLEL_MIN_WORK) == serial
    other = "_attention_prefill_mk" if serial else "_attention_prefill_mk_serial"
    monkeypatch.setattr(attention_cpu, other, _not_this_driver)
    monkeypatch.setattr(attention_cpu, "amx_path", lambda *a: False)
    q, k, v = qkv(19 + kv_len, q_len, kv_len, 32, 4, 64, batch)
    k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    want = attention_ref(q, k.astype(np.float32), v.astype(np.float32), causal=True)
    check_kv(attention(q, k, v, causal=True), want, q, k, v)


@pytest.mark.parametrize("q_len,kv_len", [(7, 3), (129, 1), (4, 2), (2, 1), (70, 65)])
def test_queries_that_see_no_key_give_zeros(q_len, kv_len):
    """kv_len < q_len, causal, bottom-right: query i sits at kv_len - q_len + i, so the first
    q_len - kv_len queries see nothing and come out as zeros (both schedules: q_len <= 4 too)."""
    q, k, v = qkv(3, q_len, kv_len, 8, 2, 64, batch=2)
    y = attention(q, k, v, causal=True)
    blind = q_len - kv_len
    assert np.all(y[:, :blind] == 0)
    assert np.all(np.abs(y[:, blind:]).sum(-1) > 0)
    check(y, attention_ref(q, k, v, causal=True))


def test_cached_prefix_equals_last_rows_of_full_prefill():
    """Prefill over a filled cache (q_len < kv_len) gives the same rows as a full prefill."""
    q, k, v = qkv(4, 129, 129, 8, 2, 64)
    full = attention(q, k, v)
    for tail in (1, 3, 7, 64):
        np.testing.assert_allclose(attention(q[-tail:], k, v), full[-tail:], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scale", [0.05, 1.0, 2])
def test_explicit_scale(scale):
    q, k, v = qkv(5, 7, 70, 4, 2, 64)
    check(attention(q, k, v, scale=scale), attention_ref(q, k, v, scale=scale), q, k, scale)
    check(attention(q[:1], k, v, scale=scale), attention_ref(q[:1], k, v, scale=scale), q[:1], k, scale)


@pytest.mark.parametrize("q_len", [1, 33])
def test_large_scores_are_stable(q_len):
    """Scores of a hundred and more overflow exp() unless each block subtracts the running max."""
    q, k, v = qkv(6, q_len, 300, 8, 2, 64)
    q *= np.float32(30)
    assert max_score(q, k) > 100
    check(attention(q, k, v), attention_ref(q, k, v), q, k)


@pytest.mark.parametrize("q_len", [1, 9])
def test_attention_into_out_buffer(q_len):
    q, k, v = qkv(7, q_len, 100, 8, 4, 64)
    out = np.full_like(q, np.nan)
    assert attention(q, k, v, out=out) is out
    check(out, attention_ref(q, k, v))


@pytest.mark.parametrize("q_len", [1, 9])
def test_wrong_reference_is_detected(q_len):
    """Sanity: tolerances tell apart the GQA head mapping, causal alignment and the scale."""
    q, k, v = qkv(8, q_len, 40, 8, 2, 32)
    y = attention(q, k, v)
    tiled = attention_ref(q, np.tile(k, (1, 4, 1)), np.tile(v, (1, 4, 1)))   # head h -> h % Hkv
    top_left = attention_ref(q, k[:q_len], v[:q_len])     # query i at position i
    wrongs = [tiled, top_left, attention_ref(q, k, v, scale=1.05 / math.sqrt(32))]
    if q_len > 1:                                         # decode sees every key either way
        wrongs.append(attention_ref(q, k, v, causal=False))
    for wrong in wrongs:
        with pytest.raises(AssertionError):
            check(y, wrong)


# ---------------------------------------------------------------------------- property test

@st.composite
def attention_cases(draw):
    n_kv_heads = draw(st.integers(1, 4))
    return dict(
        q_len=draw(st.integers(1, 20)),
        kv_len=draw(st.one_of(st.integers(1, 140), st.integers(250, 600))),
        n_kv_heads=n_kv_heads,
        n_heads=n_kv_heads * draw(st.integers(1, 5)),
        d=draw(st.sampled_from([1, 2, 5, 16, 64, 128])),
        batch=draw(st.one_of(st.none(), st.integers(1, 3))),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(deadline=None, max_examples=30)
@given(attention_cases())
def test_attention_property(case):
    q, k, v = qkv(case["seed"], case["q_len"], case["kv_len"], case["n_heads"],
                  case["n_kv_heads"], case["d"], case["batch"])
    y = attention(q, k, v, causal=case["causal"], scale=case["scale"])
    want = attention_ref(q, k, v, causal=case["causal"], scale=case["scale"])
    check(y, want, q, k, case["scale"])
    if case["causal"] and case["q_len"] > case["kv_len"]:
        assert np.all(y[..., : case["q_len"] - case["kv_len"], :, :] == 0)


# ----------------------------------------------------------------- 16-bit keys and values

KV16 = [np.float16, ml_dtypes.bfloat16]
CASES16 = [
    # q_len, kv_len, H, Hkv, d, batch: each schedule (decode and prefill; micro-kernel head
    # sizes and the others), key blocks partly filled, several key ranges, a batch axis
    (1, 2000, 32, 4, 64, None),      # decode at TinyLlama's heads, every worker's key range
    (1, 1, 8, 1, 64, None),
    (3, 129, 8, 8, 128, None),       # decode schedule, 3 queries, plain multi-head
    (1, 70, 6, 2, 48, None),         # decode, head size off the micro-kernels
    (4, 300, 4, 2, 24, 2),           # ... with a batch axis and causal rows inside
    (129, 129, 32, 4, 64, None),     # prefill
    (7, 200, 8, 2, 128, None),       # prefill over a cached prefix
    (33, 33, 4, 1, 40, 2),           # prefill, BLAS tiles
]


@pytest.mark.parametrize("dtype", KV16, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len,kv_len,n_heads,n_kv_heads,d,batch", CASES16,
                         ids=["-".join(map(str, c)) for c in CASES16])
def test_16bit_kv_matches_reference(q_len, kv_len, n_heads, n_kv_heads, d, batch, causal,
                                    dtype, monkeypatch):
    """16-bit K and V are widened exactly (every path but decode's bfloat16 products, turned off
    here with the portable path): the result is float32 attention over the rounded values (the
    float64 reference of the same 16-bit numbers), and ten times closer to it than to attention
    over the float32 values they were rounded from (so a kernel that read them wrongly, or
    rounded twice, could not pass)."""
    monkeypatch.setattr(llvm_cpu, "CPU_PATH", "portable")
    q, k, v = qkv(q_len * 7 + kv_len, q_len, kv_len, n_heads, n_kv_heads, d, batch)
    k16, v16 = k.astype(dtype), v.astype(dtype)
    assert not dots_in_bf16(k16, q_len, n_heads)
    y = attention(q, k16, v16, causal=causal)
    kr, vr = k16.astype(np.float64), v16.astype(np.float64)
    rounded = attention_ref(q, kr, vr, causal=causal)
    check(y, rounded, q, kr)
    unrounded = attention_ref(q, k, v, causal=causal)
    assert np.abs(y - unrounded).max() > 10 * np.abs(y - rounded).max()


CASES_DOTS = [
    # q_len, kv_len, H, Hkv, d, batch: decode over bfloat16 K/V, at most 8 rows a KV head
    (1, 2000, 32, 4, 64, None),      # TinyLlama's heads, every worker's key range
    (1, 1, 8, 1, 64, None),          # one key
    (1, 77, 8, 2, 128, 2),           # odd key count, a batch axis
    (2, 131, 8, 2, 32, None),        # 2 queries x 4 heads, causal inside the last block
    (1, 65, 32, 32, 64, None),       # one row a KV head
    (4, 300, 4, 2, 96, None),        # 4 queries x 2 heads
    (3, 200, 6, 3, 64, 3),           # 6 rows: groups of 4, 1 and 1
]


def spy_decode(monkeypatch):
    """The work dtypes of the kernel families decode's drivers are called with (their last
    argument), as a list."""
    seen = []
    for name in ("_attention_decode_mk", "_attention_decode_mk_serial"):
        f = getattr(attention_cpu, name)
        monkeypatch.setattr(attention_cpu, name,
                            lambda *a, f=f: (seen.append(a[-1].dtype), f(*a))[1])
    return seen


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len,kv_len,n_heads,n_kv_heads,d,batch", CASES_DOTS,
                         ids=["-".join(map(str, c)) for c in CASES_DOTS])
def test_bf16_decode_products(q_len, kv_len, n_heads, n_kv_heads, d, batch, causal,
                              monkeypatch):
    """Decode over bfloat16 K/V on a CPU with AVX-512 BF16 takes its products in bfloat16.
    Exactly, where the rounding is exact: keys of 0s and 1s and a query row +-100 / scale at
    one coordinate of its own make every score 0 or +-100, so each row's probabilities are
    exactly 1 on the keys at its maximum and underflow to 0 elsewhere, and the output is the
    mean of those keys' values to float32 precision (a key, value, row or head dimension read
    from the wrong place shows); and on random data within check_bf16_dots's bound."""
    seen = spy_decode(monkeypatch)
    rng = np.random.default_rng(q_len * 31 + kv_len)
    lead = () if batch is None else (batch,)
    scale = 1 / math.sqrt(d)
    k = rng.integers(0, 2, lead + (kv_len, n_kv_heads, d)).astype(ml_dtypes.bfloat16)
    v = rng.standard_normal(lead + (kv_len, n_kv_heads, d)).astype(ml_dtypes.bfloat16)
    q = np.zeros(lead + (q_len, n_heads, d), np.float32)
    for i in range(q_len):
        for h in range(n_heads):
            q[..., i, h, rng.integers(d)] = rng.choice([-100, 100]) / scale
    y = attention(q, k, v, causal=causal)
    check(y, attention_ref(q, k.astype(np.float64), v.astype(np.float64), causal=causal))
    q, kf, _ = qkv(q_len * 7 + kv_len, q_len, kv_len, n_heads, n_kv_heads, d, batch)
    k = kf.astype(ml_dtypes.bfloat16)
    y = attention(q, k, v, causal=causal)
    check_bf16_dots(y, attention_ref(q, k.astype(np.float64), v.astype(np.float64),
                                     causal=causal), v)
    dots = llvm_cpu.fast_path("avx512bf16")
    assert dots_in_bf16(k, q_len, n_heads) == dots
    assert seen == [np.uint32 if dots else np.float32] * 2


AMX = llvm_cpu.amx_path("amx-bf16")
CASES_AMX = [
    # q_len, kv_len, H, Hkv, d, batch, q scale: prefill over bfloat16 K and V
    (512, 512, 32, 4, 64, None, 1),  # TinyLlama's prefill-512: four key blocks, 16-row groups
    (37, 50, 8, 2, 64, None, 1),     # over a cached prefix, the last key block partly filled
    (20, 20, 4, 4, 32, 2, 1),        # one step of head dims, two O^T tiles, a batch axis
    (70, 133, 12, 4, 128, None, 1),  # four steps, O^T in two groups of four tiles
    (5, 5, 8, 1, 64, None, 1),       # the smallest prefill, multi-query
    (40, 300, 8, 2, 64, None, 8),    # scores up to ~60: their precision carries to the output
]


@pytest.mark.parametrize("path", ["fast", "no-amx"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len,kv_len,n_heads,n_kv_heads,d,batch,q_scale", CASES_AMX,
                         ids=["-".join(map(str, c)) for c in CASES_AMX])
def test_bf16_prefill_paths(q_len, kv_len, n_heads, n_kv_heads, d, batch, q_scale, causal,
                            path, monkeypatch):
    """A prefill over bfloat16 K and V runs on AMX-BF16 tiles where the CPU has them (fast),
    else (no-amx) on the float32 micro-kernel; both keep float32's bounds against the float64
    attention over the same bfloat16 numbers, large scores included (the tiles carry q in
    three bfloat16 terms and the probabilities in two)."""
    monkeypatch.setattr(llvm_cpu, "CPU_PATH", path)
    ran = []
    tiles = attention_cpu._attention_prefill_amx
    monkeypatch.setattr(attention_cpu, "_attention_prefill_amx",
                        lambda *args: (ran.append(1), tiles(*args))[1])
    q, k, v = qkv(q_len * 5 + kv_len, q_len, kv_len, n_heads, n_kv_heads, d, batch)
    q *= q_scale
    k16, v16 = k.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)
    y = attention(q, k16, v16, causal=causal)
    kr = k16.astype(np.float64)
    want = attention_ref(q, kr, v16.astype(np.float64), causal=causal)
    check(y, want, q, kr)
    # and absolutely as close as float32 products get (both paths measure 1.5-3e-7 of the
    # largest score; q in two bfloat16 terms, 1.5-2.2e-6)
    assert np.abs(y - want).max() <= max(ATOL, 5e-7 * max_score(q, kr))
    assert bool(ran) == (path == "fast" and AMX)


@pytest.mark.parametrize("dtype", KV16, ids=["float16", "bfloat16"])
def test_16bit_kv_must_match(dtype):
    q, k, v = qkv(9, 1, 10, 4, 2, 64)
    with pytest.raises(ValueError, match="k and v must match"):
        attention(q, k.astype(dtype), v)
    with pytest.raises(TypeError, match="k must have dtype"):
        attention(q, k.astype(np.float64), v.astype(np.float64))


PASSES_CHILD = """
import sys
import numpy as np
from numba_attn.kernels import llvm_cpu
llvm_cpu.ACC16 = 3                    # before the kernels compile: rows in passes of 1-3
from numba_attn import attention
from tests.reference import attention_ref
from tests.test_attention import CASES, check_kv, qkv
import ml_dtypes
for i in (0, 3, 4, 6, 8, 9):           # prefill, prefill over a prefix, decode, several ranges
    q, k, v = qkv(i, *CASES[i][:5])
    want = attention_ref(q, k, v, causal=True)
    check_kv(attention(q, k, v, causal=True), want, q, k, v)
    kb, vb = k.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)
    want = attention_ref(q, kb.astype(np.float32), vb.astype(np.float32), causal=True)
    check_kv(attention(q, kb, vb, causal=True), want, q, kb, vb)
print("ok")
"""


def test_register_blocking_in_passes(tmp_path):
    """The micro-kernels with fewer accumulators than their rows (llvm_cpu.row_passes: as on
    AVX2, here forced to passes of 1-3 rows on any CPU, compiled afresh in a child process with
    a Numba cache of its own) give the reference's results."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    got = subprocess.run([sys.executable, "-c", PASSES_CHILD], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr[-4000:]
