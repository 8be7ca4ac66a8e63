"""The 8-bit KV cache (formats.Int8KV): the quantization rule against an independent NumPy one,
the cache, and attention over it: decode's 8-bit products (AVX-512 VNNI, AVX2) against a float64
reference of the same roundings, everything else against float64 attention of the stored
values."""
import numpy as np
import pytest

from numba_attn import ops
from numba_attn.formats import Int8KV, quantize_kv_int8
from numba_attn.kernels import attention_int8_cpu
from numba_attn.kvcache import KVCache
from reference import attention_ref


def rng_values(rng, shape, scale=1.0):
    x = rng.standard_normal(shape) * scale
    x[..., 0] *= 8                                   # one large column: a row's scale
    return x.astype(np.float32)


def numpy_rule(x):
    """Int8KV's rule in NumPy: scale max|x| / 127 (float32), codes x / scale rounded half away
    from zero, plus 128."""
    x = x.astype(np.float32)
    scale = (np.abs(x).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    v = x * inv[..., None]
    codes = np.trunc(v) + np.where(np.abs(v - np.trunc(v)) >= 0.5, np.sign(v), 0)
    return (codes + 128).astype(np.uint8), scale


@pytest.mark.parametrize("shape", [(3, 5, 2, 40), (1, 1, 1, 32), (7, 3, 128), (2, 1)])
def test_quantize_matches_numpy_rule(shape):
    rng = np.random.default_rng(len(shape))
    x = rng_values(rng, shape)
    x.reshape(-1, shape[-1])[0] = 0                      # an all-zero row: scale 0, codes 128
    q = quantize_kv_int8(x)
    codes, scale = numpy_rule(x)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.scales, scale)
    assert q.codes.reshape(-1, shape[-1])[0].tolist() == [128] * shape[-1]
    assert q.codes.min() >= 1 and q.codes.max() <= 255          # codes in [-127, 127]
    err = np.abs(q.dequantize() - x)
    assert (err <= q.scales[..., None] * 0.5 * (1 + 1e-6) + 1e-30).all()
    assert q.nbytes == x.size + 4 * x.size // shape[-1]


def test_int8kv_checks_and_indexing():
    codes = np.full((4, 3, 2, 32), 128, np.uint8)
    scales = np.ones((4, 3, 2), np.float32)
    x = Int8KV(codes, scales)
    assert x[1, :2].shape == (2, 2, 32) and x[None].shape == (1, 4, 3, 2, 32)
    assert np.shares_memory(x[1].codes, codes) and np.shares_memory(x[1].scales, scales)
    with pytest.raises(IndexError, match="leading axes"):
        x[0, 0, 0, 0]
    with pytest.raises(TypeError, match="codes must be a uint8 array"):
        Int8KV(codes.view(np.int8), scales)
    with pytest.raises(TypeError, match=r"scales must be a float32 array of shape \(4, 3, 2\)"):
        Int8KV(codes, scales[:, :2])
    with pytest.raises(ValueError, match="C-contiguous"):
        Int8KV(codes[:, ::2], scales[:, ::2])
    with pytest.raises(TypeError, match="must be NumPy arrays"):
        Int8KV(codes.tolist(), scales)
    with pytest.raises(TypeError, match="float array"):
        quantize_kv_int8(np.ones((2, 4), np.int32))


def test_cache_quantizes_what_it_stores():
    rng = np.random.default_rng(1)
    cache = KVCache(3, 16, 2, 64, dtype="int8")
    assert isinstance(cache.k, Int8KV) and cache.k.dtype.name == "int8"
    assert cache.nbytes == 2 * 3 * 16 * 2 * (64 + 4)                # a quarter of float32's, +4/row
    k, v = rng_values(rng, (5, 2, 64)), rng_values(rng, (5, 2, 64), 3.0)
    kk, vv = cache.append(1, k, v)
    assert kk.shape == vv.shape == (5, 2, 64)
    np.testing.assert_array_equal(kk.codes, quantize_kv_int8(k).codes)
    np.testing.assert_array_equal(vv.scales, quantize_kv_int8(v).scales)
    k2, v2 = rng_values(rng, (2, 2, 64)), rng_values(rng, (2, 2, 64))
    kk, vv = cache.append(1, k2, v2)
    assert kk.shape == (7, 2, 64) and cache.lengths == [0, 7, 0]
    np.testing.assert_array_equal(kk.dequantize()[5:], quantize_kv_int8(k2).dequantize())
    cache.truncate(0)
    with pytest.raises(TypeError, match="k must have dtype float32, got float16"):
        cache.append(0, k.astype(np.float16), v.astype(np.float16))   # float32 only
    with pytest.raises(ValueError, match="cuda KV cache stores float32, float16; got 'int8'"):
        KVCache(1, 4, 1, 32, dtype="int8", device="cuda")


def int8_decode_ref(q, k, v, scale, q_max, block=64):
    """float64 attention with decode's 8-bit roundings: q to codes within +-q_max a row (one
    scale, |q| / q_max, round half to even), each block of `block` keys' weights P * (V's row
    scale) to 7 bits a query row (step: the block's largest / 127, round half up); K and V as
    stored."""
    q, kd, vd = q.astype(np.float64), k.dequantize().astype(np.float64), v.dequantize()
    vs = v.scales.astype(np.float64)
    vc = v.codes.astype(np.float64) - 128
    *_, S, H, d = q.shape
    T, Hkv = kd.shape[-3], kd.shape[-2]
    G = H // Hkv
    amax = np.abs(q).max(-1, keepdims=True)
    q8 = np.rint(q * np.where(amax > 0, q_max / np.where(amax > 0, amax, 1), 0))
    qd = q8 * amax / q_max
    out = np.empty(q.shape)
    for i in range(S):
        for h in range(H):
            hk = h // G
            s = scale * kd[:, hk] @ qd[i, h]
            s[T - S + i + 1:] = -np.inf
            m = s.max()
            num, den = np.zeros(d), 0.0
            for b0 in range(0, T, block):
                p = np.exp(s[b0:b0 + block] - m)
                w = p * vs[b0:b0 + block, hk]
                step = w.max() / 127 if w.max() > 0 else 1.0
                w7 = np.floor(w / step + 0.5)
                num += step * (w7 @ vc[b0:b0 + block, hk])
                den += p.sum()
            out[i, h] = num / den
    del vd
    return out


# (q_len, kv_len, H, Hkv, d): lengths off the 64-key blocks and the 4-key groups, one key, one
# to eight query rows a KV head (more: one query at a time), head sizes 32 to 128
DECODE_SHAPES = [(1, 2000, 32, 4, 64), (1, 1, 8, 1, 32), (1, 67, 8, 8, 128), (2, 131, 8, 2, 64),
                 (4, 70, 4, 2, 64), (1, 300, 8, 4, 96), (3, 5, 4, 2, 32), (3, 40, 16, 2, 64),
                 (4, 4, 8, 1, 32)]


@pytest.fixture(params=["fast", "avx2"])
def products_isa(request, monkeypatch):
    """Each instruction set decode's 8-bit products have on this host, in turn (AVX-512 VNNI
    where the CPU has it, and AVX2's path, which VNNI CPUs have too): (the isa marker, q's
    largest code)."""
    from numba_attn.kernels import llvm_cpu
    monkeypatch.setattr(llvm_cpu, "CPU_PATH", request.param)
    isa = attention_int8_cpu.decode_isa()
    if isa is None:
        pytest.skip("no AVX2: decode runs the float32 kernels (tested below)")
    if request.param == "avx2" and "avx512vnni" not in llvm_cpu.HOST_FEATURES:
        pytest.skip("AVX2 is this CPU's fast path: tested as 'fast'")
    return isa, 127 if isa is attention_int8_cpu.VNNI else 63


@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_in_8bit_products_matches_reference_of_its_roundings(shape, products_isa):
    isa, q_max = products_isa
    S, T, H, Hkv, d = shape
    rng = np.random.default_rng(T)
    q = rng_values(rng, (S, H, d))
    k, v = quantize_kv_int8(rng_values(rng, (T, Hkv, d), 2.0)), \
        quantize_kv_int8(rng_values(rng, (T, Hkv, d)))
    assert attention_int8_cpu.int8_dots(q, k)
    got = ops.attention(q, k, v)
    vmax = np.abs(v.dequantize()).max()
    # the kernel's float32 sums can move a weight across a rounding midpoint: rare, 1/127 of a
    # block's largest weight each; a wrong step, offset or key is far above this
    np.testing.assert_allclose(got, int8_decode_ref(q, k, v, 1 / np.sqrt(d), q_max), rtol=0,
                               atol=2e-3 * vmax)
    exact = attention_ref(q, k.dequantize(), v.dequantize())
    err = np.abs(got - exact).max()
    assert err < 0.08 * vmax                      # the roundings are bounded
    assert T == 1 or err > 1e-5 * vmax            # and seen (one key: its value exactly)


def test_avx2_products_take_q_in_7_bits(monkeypatch):
    # q's 7 bits on AVX2 are the ones its reference rounds to (8 bits would be off by more)
    from numba_attn.kernels import llvm_cpu
    monkeypatch.setattr(llvm_cpu, "CPU_PATH", "avx2")
    if attention_int8_cpu.decode_isa() is not attention_int8_cpu.AVX2:
        pytest.skip("no AVX2")
    rng = np.random.default_rng(11)
    q = rng_values(rng, (1, 8, 64))
    k, v = (quantize_kv_int8(rng_values(rng, (300, 1, 64), 2.0)) for _ in range(2))
    got = ops.attention(q, k, v)
    err7 = np.abs(got - int8_decode_ref(q, k, v, 1 / 8, 63)).max()
    err8 = np.abs(got - int8_decode_ref(q, k, v, 1 / 8, 127)).max()
    vmax = np.abs(v.dequantize()).max()
    assert err7 < 1e-6 * vmax and err8 > 100 * err7


@pytest.mark.parametrize("shape", [(1, 131, 8, 2, 64), (7, 40, 8, 2, 64), (40, 40, 4, 4, 48),
                                   (1, 64, 16, 2, 64), (2, 9, 4, 1, 24), (2, 30, 32, 2, 64)])
def test_other_shapes_and_paths_match_float32_attention_of_the_stored_values(shape, cpu_path):
    # prefill, more than 8 query heads a KV head, head sizes not a multiple of 32, or the
    # portable path:
    # the stored values widened to float32, float32 attention
    S, T, H, Hkv, d = shape
    rng = np.random.default_rng(S * T)
    q = rng_values(rng, (S, H, d))
    k, v = quantize_kv_int8(rng_values(rng, (T, Hkv, d))), \
        quantize_kv_int8(rng_values(rng, (T, Hkv, d)))
    if attention_int8_cpu.int8_dots(q, k):
        pytest.skip("decode in 8-bit products (tested above)")
    got = ops.attention(q, k, v)
    # float32 sums of terms up to the largest value: an output near zero keeps their rounding
    vmax = np.abs(v.dequantize()).max()
    np.testing.assert_allclose(got, attention_ref(q, k.dequantize(), v.dequantize()),
                               rtol=1e-4, atol=1e-5 * vmax)


@pytest.mark.parametrize("q_len", [1, 3])
def test_batched_int8_attention(q_len):
    rng = np.random.default_rng(3)
    q = rng_values(rng, (2, q_len, 8, 64))          # 3 queries: one at a time, each a batch's
    k, v = (quantize_kv_int8(rng_values(rng, (2, 90, 2, 64))) for _ in range(2))
    got = ops.attention(q, k, v)
    for b in range(2):
        np.testing.assert_allclose(got[b], ops.attention(q[b], k[b], v[b]), rtol=0, atol=0)


def test_int8_attention_bad_input():
    rng = np.random.default_rng(4)
    q = rng_values(rng, (1, 4, 32))
    k = quantize_kv_int8(rng_values(rng, (6, 2, 32)))
    with pytest.raises(TypeError, match="int8 keys and values"):
        ops.attention(q, k, k.dequantize())
    with pytest.raises(ValueError, match="head_dim 32 but k and v have 16"):
        short = quantize_kv_int8(rng_values(rng, (6, 2, 16)))
        ops.attention(q, short, short)
    with pytest.raises(ValueError, match="must have 3 axes"):
        ops.attention(q, k[None], k[None])
