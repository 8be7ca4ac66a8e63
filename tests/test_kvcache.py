"""KVCache: preallocated per-layer storage, append returns views, overflow, reset, 16-bit
storage."""
import ml_dtypes
import numpy as np
import pytest

from numba_attn import KVCache, attention
from numba_attn.kernels import attention_cpu
from tests.reference import attention_ref


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_allocation():
    cache = KVCache(3, 16, 2, 64)
    assert cache.k.shape == cache.v.shape == (3, 16, 2, 64)
    assert cache.k.dtype == cache.v.dtype == np.float32
    assert cache.length == 0 and cache.lengths == [0, 0, 0]
    assert cache.nbytes == 2 * 3 * 16 * 2 * 64 * 4
    assert "max_seq=16" in repr(cache)


def test_append_across_layers_returns_filled_views():
    n_layers, max_seq, hkv, d = 3, 20, 2, 64
    cache = KVCache(n_layers, max_seq, hkv, d)
    written = {layer: ([], []) for layer in range(n_layers)}
    for step, seq in enumerate([7, 1, 1, 5]):           # prefill, two decode steps, a chunk
        for layer in range(n_layers):
            k = randn(100 * step + layer, seq, hkv, d)
            v = randn(100 * step + layer + 50, seq, hkv, d)
            kk, vv = cache.append(layer, k, v)
            written[layer][0].append(k)
            written[layer][1].append(v)
            total = sum(a.shape[0] for a in written[layer][0])
            assert kk.shape == vv.shape == (total, hkv, d)
            np.testing.assert_array_equal(kk, np.concatenate(written[layer][0]))
            np.testing.assert_array_equal(vv, np.concatenate(written[layer][1]))
            # views into the preallocated buffers, not copies; contiguous for the kernels
            assert np.shares_memory(kk, cache.k[layer]) and np.shares_memory(vv, cache.v[layer])
            assert kk.flags.c_contiguous and vv.flags.c_contiguous
            assert cache.lengths[layer] == total
        assert cache.length == cache.lengths[0]
    # layers are independent: layer 1's data never landed in layer 0 or 2
    assert not np.array_equal(cache.k[0, :14], cache.k[1, :14])


def test_layers_fill_independently():
    cache = KVCache(2, 8, 1, 4)
    cache.append(0, randn(1, 5, 1, 4), randn(2, 5, 1, 4))
    assert cache.lengths == [5, 0] and cache.length == 5
    kk, _ = cache.append(1, randn(3, 2, 1, 4), randn(4, 2, 1, 4))
    assert kk.shape[0] == 2 and cache.lengths == [5, 2]


def test_append_copies_its_inputs():
    cache = KVCache(1, 8, 2, 16)
    k, v = randn(5, 3, 2, 16), randn(6, 3, 2, 16)
    kk, vv = cache.append(0, k, v)
    k_saved, v_saved = k.copy(), v.copy()
    k[:] = 0.0
    v[:] = 0.0
    np.testing.assert_array_equal(kk, k_saved)
    np.testing.assert_array_equal(vv, v_saved)


def test_fill_exactly_then_overflow_raises_and_changes_nothing():
    cache = KVCache(2, 8, 2, 16)
    cache.append(0, randn(7, 5, 2, 16), randn(8, 5, 2, 16))
    kk, _ = cache.append(0, randn(9, 3, 2, 16), randn(10, 3, 2, 16))    # exactly full: fine
    assert kk.shape[0] == 8
    before_k, before_v = cache.k.copy(), cache.v.copy()
    with pytest.raises(ValueError, match=r"KV cache full: layer 0 holds 8 of 8 positions and cannot take 1 more"):
        cache.append(0, randn(11, 1, 2, 16), randn(12, 1, 2, 16))
    cache.append(1, randn(13, 6, 2, 16), randn(14, 6, 2, 16))
    with pytest.raises(ValueError, match=r"KV cache full: layer 1 holds 6 of 8 .* cannot take 3 more"):
        cache.append(1, randn(15, 3, 2, 16), randn(16, 3, 2, 16))
    assert cache.lengths == [8, 6]
    np.testing.assert_array_equal(cache.k[0], before_k[0])
    np.testing.assert_array_equal(cache.v[0], before_v[0])


def test_overflow_in_one_go_raises():
    cache = KVCache(1, 4, 1, 8)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.append(0, randn(1, 5, 1, 8), randn(2, 5, 1, 8))
    assert cache.length == 0


def test_reset():
    cache = KVCache(2, 6, 2, 16)
    for layer in range(2):
        cache.append(layer, randn(layer, 6, 2, 16), randn(layer + 9, 6, 2, 16))
    cache.reset()
    assert cache.lengths == [0, 0] and cache.length == 0
    k, v = randn(20, 2, 2, 16), randn(21, 2, 2, 16)
    kk, vv = cache.append(1, k, v)                      # written from position 0 again
    assert kk.shape == (2, 2, 16)
    np.testing.assert_array_equal(kk, k)
    np.testing.assert_array_equal(vv, v)
    np.testing.assert_array_equal(cache.k[1, :2], k)
    cache.append(1, randn(22, 4, 2, 16), randn(23, 4, 2, 16))   # and to the end again


def test_cache_views_feed_attention():
    """Prefill 7 tokens, then decode 3, attending over the cache's views each time: the same
    as attention over the concatenated keys and values."""
    n_heads, hkv, d = 8, 2, 64
    cache = KVCache(1, 16, hkv, d)
    ks, vs = [], []
    for step, seq in enumerate([7, 1, 1, 1]):
        q = randn(step, seq, n_heads, d)
        k, v = randn(step + 10, seq, hkv, d), randn(step + 20, seq, hkv, d)
        ks.append(k)
        vs.append(v)
        kk, vv = cache.append(0, k, v)
        y = attention(q, kk, vv)
        np.testing.assert_allclose(y, attention_ref(q, np.concatenate(ks), np.concatenate(vs)),
                                   rtol=1e-4, atol=1e-5)


def test_truncate_keeps_a_prefix_and_appends_after_it():
    cache = KVCache(2, 8, 1, 4)
    k, v = randn(30, 5, 1, 4), randn(31, 5, 1, 4)
    for layer in range(2):
        cache.append(layer, k, v)
    cache.append(0, randn(32, 1, 1, 4), randn(33, 1, 1, 4))   # layer 0 one step ahead
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        cache.truncate(6)                                       # past the shortest layer
    cache.truncate(3)
    assert cache.lengths == [3, 3]
    k2, v2 = randn(34, 2, 1, 4), randn(35, 2, 1, 4)
    kk, vv = cache.append(1, k2, v2)                            # written at position 3
    np.testing.assert_array_equal(kk, np.concatenate([k[:3], k2]))
    np.testing.assert_array_equal(vv, np.concatenate([v[:3], v2]))
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError):
            cache.truncate(bad)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_cache_rounds_float32_on_the_way_in(dtype):
    """A 16-bit cache takes the model's float32 keys and values, rounded to nearest even (as
    NumPy's astype), or 16-bit ones as they are; half the bytes of float32."""
    want = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    cache = KVCache(2, 16, 2, 64, dtype=dtype)
    assert cache.k.dtype == cache.v.dtype == want
    assert cache.nbytes == KVCache(2, 16, 2, 64).nbytes // 2
    assert dtype in repr(cache)
    k, v = randn(40, 5, 2, 64) * 3, randn(41, 5, 2, 64) * 3
    kk, vv = cache.append(0, k, v)
    assert kk.dtype == vv.dtype == want
    np.testing.assert_array_equal(kk.view(np.uint16), k.astype(want).view(np.uint16))
    np.testing.assert_array_equal(vv.view(np.uint16), v.astype(want).view(np.uint16))
    assert not np.array_equal(kk.astype(np.float32), k)        # rounded, not bit-cast or kept
    k16, v16 = randn(42, 1, 2, 64).astype(want), randn(43, 1, 2, 64).astype(want)
    kk, vv = cache.append(0, k16, v16)
    np.testing.assert_array_equal(kk[5].view(np.uint16), k16[0].view(np.uint16))
    q = randn(44, 1, 8, 64)
    ref = attention_ref(q, kk.astype(np.float64), vv.astype(np.float64))
    if attention_cpu.bf16_dots(attention_cpu.KV_KINDS[want], 4):   # q and P in bfloat16
        np.testing.assert_allclose(attention(q, kk, vv), ref, rtol=0,
                                   atol=2.0 ** -8 * np.abs(vv.astype(np.float32)).max())
    else:
        np.testing.assert_allclose(attention(q, kk, vv), ref, rtol=1e-4, atol=1e-5)


def test_cache_dtypes_refused():
    for dtype in ("uint8", np.float64, "float8", ml_dtypes.float8_e4m3fn):
        with pytest.raises(ValueError, match="cpu KV cache stores float32, float16, bfloat16, "
                                             "int8"):
            KVCache(1, 4, 1, 4, dtype=dtype)
    with pytest.raises(ValueError, match="cuda KV cache stores float32, float16; got 'bfloat16'"):
        KVCache(1, 4, 1, 4, dtype="bfloat16", device="cuda")
    cache = KVCache(1, 4, 1, 4, dtype="float16")
    with pytest.raises(TypeError, match="k must have dtype float32, float16, got float64"):
        cache.append(0, np.zeros((1, 1, 4)), np.zeros((1, 1, 4)))
    with pytest.raises(ValueError, match="same shape and dtype"):
        cache.append(0, randn(1, 1, 1, 4), randn(1, 1, 1, 4).astype(np.float16))
    assert cache.length == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_host_cache_starts_zeroed(dtype):
    # the allocator may hand back memory just freed: here full of NaNs, as a model's warm-up
    # (which reads keys past those it wrote) must never see
    for _ in range(3):
        junk = np.full(3 * 40 * 2 * 64 * 2, np.nan, np.float32)
        del junk
        cache = KVCache(3, 40, 2, 64, dtype=dtype)
        for a in (cache.k, cache.v):
            parts = (a.codes, a.scales) if dtype == "int8" else (a,)
            for p in parts:
                assert not np.asarray(p, np.float32).any()
