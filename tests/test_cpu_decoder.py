"""The compiled decode step (cpu_decode.CpuDecoder) against the step-by-step decode
(CpuDecodeSteps, itself tested against float64 references in test_model.py): the same logits
and the same KV cache bits, for every weight format and KV storage, through both of its
attention schedules (the calling thread's at short contexts, the pool's from 128 keys at 32
heads of 64) and both GEMV forms (threaded and on the calling thread); where it does not apply,
the step-by-step decode instead."""
import numpy as np
import pytest

from numba_attn.formats import Int8KV
from numba_attn.model import Model
from tiny_model import build_tiny_model

PROMPT = 120        # decode positions 120..: at 127 (128 keys) the attention takes threads


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # TinyLlama's attention (32 query / 4 KV heads of 64) in a small model: input sizes 128,
    # 2048 and 160, multiples of 32 for q8_0; q|k|v and o large enough for threads, gate, up
    # and down not
    f, _ = build_tiny_model(str(tmp_path_factory.mktemp("decoder") / "m"), hidden=128,
                            layers=2, heads=32, kv_heads=4, head_dim=64, intermediate=160,
                            max_pos=256, tokenizer=False, vocab=300)
    return f


def _cache_arrays(model):
    k, v = model.cache.k, model.cache.v
    if isinstance(k, Int8KV):
        return k.codes, k.scales, v.codes, v.scales
    return k, v


def _decode_both(folder, weight_dtype, kv_dtype, steps):
    ours = Model.from_pretrained(folder, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                                 max_seq=256)
    ref = Model.from_pretrained(folder, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                                max_seq=256)
    ref.decoder = None
    prompt = np.random.default_rng(1).integers(0, 300, PROMPT)
    for m in (ours, ref):
        m.forward(prompt, 0)
    logits = []
    for pos in range(PROMPT, PROMPT + steps):
        token = (7 * pos) % 300
        logits.append((ours.forward([token], pos).copy(), ref.forward([token], pos).copy()))
        assert ours.position == pos + 1
    return ours, ref, logits


@pytest.mark.parametrize("weight_dtype,kv_dtype", [
    ("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"),
    ("q8_0", "int8"), ("q8_0", "bfloat16"), ("float32", "int8")])
def test_compiled_step_matches_the_steps(folder, weight_dtype, kv_dtype):
    ours, ref, logits = _decode_both(folder, weight_dtype, kv_dtype, 7)    # up to 127 keys
    assert ours.decoder.why_not is None and ours.decoder.args is not None
    for got, want in logits:              # one thread's attention: the same code, bit for bit
        np.testing.assert_array_equal(got, want)
    for a, b in zip(_cache_arrays(ours), _cache_arrays(ref)):
        np.testing.assert_array_equal(a, b)      # float16/bfloat16 rounding, 8-bit codes


@pytest.mark.parametrize("weight_dtype,kv_dtype,tol", [
    ("float32", "float32", 1e-5), ("bfloat16", "bfloat16", 1e-5), ("q8_0", "int8", 1e-4)])
def test_compiled_step_with_threaded_attention(folder, weight_dtype, kv_dtype, tol):
    # from 128 keys the attention's key ranges run on the pool's threads; its parts, compiled
    # apart, round their sums alike but not bit for bit (measured: 3e-7 of the largest logit;
    # an 8-bit cache rounds q again from those sums: a looser bound)
    ours, ref, logits = _decode_both(folder, weight_dtype, kv_dtype, 16)
    assert ours.decoder.parallel
    for got, want in logits:
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= tol * scale


def test_compiled_step_on_the_portable_path(folder, cpu_path):
    # the portable loops' GEMVs; an 8-bit cache without VNNI or AVX2 products falls back
    ours, ref, logits = _decode_both(folder, "bfloat16", "bfloat16", 3)
    assert ours.decoder.why_not is None
    for got, want in logits:
        np.testing.assert_array_equal(got, want)


def test_compiled_step_follows_a_replaced_weight(folder):
    # a study that swaps a layer's matrix or a norm between steps: the next step uses it
    ours, ref, _ = _decode_both(folder, "float32", "float32", 1)
    for m in (ours, ref):
        lw = m.weights.layers[1]
        lw.o_proj = np.ascontiguousarray(lw.o_proj * 0.5)
        m.weights.norm = m.weights.norm * 2.0
    np.testing.assert_array_equal(ours.forward([3], PROMPT + 1), ref.forward([3], PROMPT + 1))


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "float16"])
def test_compiled_step_with_the_few_rows_gemv(folder, monkeypatch, weight_dtype):
    # the 16-bit decode GEMV an Intel CPU takes (4 rows of w at a time; bfloat16's x in
    # even/odd order, made inside the step; float16's x given twice), forced here
    from numba_attn.kernels import linear_bf16_cpu
    monkeypatch.setattr(linear_bf16_cpu, "ONE_STREAM_DECODE", False)
    ours, ref, logits = _decode_both(folder, weight_dtype, "float32", 3)
    assert ours.decoder.why_not is None
    assert ours.decoder.args[0][12][0][3] is not None      # the q|k|v GEMV's x after x
    for got, want in logits:
        np.testing.assert_array_equal(got, want)


def test_steps_where_the_compiled_step_does_not_apply(make_folder, monkeypatch):
    # biases (Qwen2's q|k|v), a head size not a multiple of 32, or switched off: the steps
    qwen, _ = make_folder("qwen", arch="Qwen2ForCausalLM", hidden=64, heads=2, kv_heads=1,
                          tokenizer=False, vocab=300)
    odd, _ = make_folder("odd", hidden=64, heads=4, kv_heads=2, tokenizer=False, vocab=300)
    plain, _ = make_folder("plain", hidden=64, heads=2, kv_heads=1, tokenizer=False,
                           vocab=300)
    cases = [(qwen, "biases"), (odd, "another schedule")]
    for path, why in cases + [(plain, "NUMBA_ATTN_CPU_DECODER=0")]:
        if path is plain:
            monkeypatch.setenv("NUMBA_ATTN_CPU_DECODER", "0")
        m = Model.from_pretrained(path, max_seq=64)
        ref = Model.from_pretrained(path, max_seq=64)
        ref.decoder = None
        for mm in (m, ref):
            mm.forward(np.arange(1, 6), 0)
        np.testing.assert_array_equal(m.forward([9], 5), ref.forward([9], 5))
        assert why in m.decoder.why_not
