"""linear and embedding with bfloat16 and float16 weights on the CPU, on every path (fast:
widening FMAs, AMX-BF16 tiles where the CPU has them; no-amx: the vdpbf16ps GEMM in their
place; portable: plain loops, widened tiles and sgemm), against
float64 references on the weights as stored (widening a 16-bit float to float32 is exact).

The bounds: a float32 sum of k random-sign terms t_j makes roundings of at most u = 2^-24
relative to partial sums about |t|_2 = sqrt(sum t_j^2) in size, independent from step to step,
so the total error is about u sqrt(k) |t|_2; 8x that is the bound. The BF16 GEMMs round x to
bfloat16 first: against x rounded the same way (ml_dtypes, nearest even) the float32 bound
holds, and against x itself each product is off by at most 2^-9 of itself."""
import os

import ml_dtypes
import numpy as np
import pytest
from numba import njit

from numba_attn import ops
from numba_attn.kernels import cpu_pool, linear_bf16_cpu, linear_cpu, llvm_cpu

U = 2.0 ** -24
BF16 = ml_dtypes.bfloat16
FAST = llvm_cpu.fast_path()


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _not_this_path(*args):
    raise AssertionError("the other path's kernel ran")


AMX = llvm_cpu.amx_path("amx-bf16")


@pytest.fixture(params=["fast", "no-amx", "portable"])
def path(request, monkeypatch):
    """Run the test on one path; the other paths' kernels raise, so the path is the one named.
    With NUMBA_ATTN_CPU_PATH=portable in the environment only the portable path runs."""
    if request.param != "portable":
        if not FAST:
            pytest.skip("NUMBA_ATTN_CPU_PATH=portable: the fast paths are off")
        monkeypatch.setattr(linear_bf16_cpu, "_gemv_rows_portable", _not_this_path)
    if request.param == "fast" and AMX:
        vdpbf16ps = linear_bf16_cpu.gemm_bf16

        def gemm_bf16(out, x, w):     # the AMX GEMM takes every input length of 32s
            assert x.shape[1] % 32, "the vdpbf16ps GEMM ran where the AMX one should"
            return vdpbf16ps(out, x, w)
        monkeypatch.setattr(linear_bf16_cpu, "gemm_bf16", gemm_bf16)
    elif request.param == "no-amx":
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "no-amx")
        monkeypatch.setattr(linear_bf16_cpu, "gemm_amx", _not_this_path)
    elif request.param == "portable":
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "portable")
        monkeypatch.setattr(linear_bf16_cpu, "_gemv", _not_this_path)
        monkeypatch.setattr(linear_bf16_cpu, "_gemv_rows", _not_this_path)
        monkeypatch.setattr(linear_bf16_cpu, "gemm_bf16", _not_this_path)
        monkeypatch.setattr(linear_bf16_cpu, "gemm_amx", _not_this_path)
    return request.param


def assert_within(err, bound, what):
    bad = np.abs(err) > bound
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} outside the bound, worst "
                           f"{np.max(np.abs(err) / np.maximum(bound, 1e-300)):.3g}x it")


def assert_f32_close(y, x, w, what="float32 sums"):
    """y (m, n) against x (m, k) @ w.T in float64, within the float32 bound above."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    k = x.shape[1]
    scale = np.sqrt((x ** 2) @ (w ** 2).T)                  # |x o w|_2 per output
    assert_within(y - x @ w.T, 8 * U * np.sqrt(k) * scale, what)


def rounds_x(path, m, w):
    """Whether this call takes a BF16 GEMM, which rounds x to bfloat16."""
    return (path != "portable" and w.dtype == BF16 and m >= linear_bf16_cpu.GEMM_BF16_MIN_ROWS
            and llvm_cpu.fast_path("avx512bf16"))


def assert_linear_close(y, x, w, path):
    y = y.astype(np.float64)
    if rounds_x(path, x.shape[0], w):
        xb = x.astype(BF16).astype(np.float32)
        assert_f32_close(y, xb, w, "float32 sums of bfloat16 x")
        x64, w64 = x.astype(np.float64), w.astype(np.float64)
        worst = 2.0 ** -9 * (np.abs(x64) @ np.abs(w64).T) * (1 + 1e-6)
        assert_within(y - x64 @ w64.T, worst, "x rounded to bfloat16")
    else:
        assert_f32_close(y, x, w)


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize("k,n", [(32, 7), (96, 1), (96, 1000), (4128, 33), (37, 9)])
def test_linear_16bit_matches_reference(path, dtype, m, k, n):
    w = (randn(k + n, n, k) * np.float32(0.05)).astype(dtype)
    x = randn(m * 31 + k, m, k)
    y = ops.linear(x, w)
    assert y.shape == (m, n) and y.dtype == np.float32
    assert_linear_close(y, x, w, path)


@pytest.mark.parametrize("one_stream", [True, False], ids=["one-row", "four-rows"])
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("k,n", [(5, 3), (32, 7), (96, 1000), (4128, 33), (37, 9), (4133, 101)])
def test_decode_reads_one_or_four_rows(monkeypatch, one_stream, dtype, k, n):
    """Decode's two ways through w (one row a step on AMD Zen, 4 rows elsewhere), each on any
    CPU with the fast path; the other's kernel raises. 4133 x 101: columns past the last whole
    vector, on every thread."""
    if not (llvm_cpu.fast_path("f16c") if dtype == np.float16 else llvm_cpu.fast_path()):
        pytest.skip("no fast path on this CPU")
    monkeypatch.setattr(linear_bf16_cpu, "ONE_STREAM_DECODE", one_stream)
    monkeypatch.setattr(linear_bf16_cpu, "_gemv_rows" if one_stream else "_gemv", _not_this_path)
    w = (randn(k + n, n, k) * np.float32(0.05)).astype(dtype)
    x = randn(k, 1, k)
    assert_f32_close(ops.linear(x, w).astype(np.float64), x, w)


@pytest.mark.parametrize("unroll", [2, 4, 8])
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
def test_one_row_dots_at_every_unroll(dtype, unroll):
    """The one-row decode dots at 2, 4 or 8 vectors a loop step (each a host's choice), with a
    vector count no multiple of 8 (the loop's remainder)."""
    half = dtype == np.float16
    if not (llvm_cpu.fast_path("f16c") if half else llvm_cpu.fast_path()):
        pytest.skip("no fast path on this CPU")
    dots = linear_bf16_cpu._make_dots16(1, linear_cpu.STREAM_PREFETCH_BYTES, half,
                                        linear_cpu.STREAM_LOCALITY, unroll)

    @njit
    def gemv(out, x, w):
        n, k = w.shape
        for r in range(n):
            s, = dots(x.ctypes.data, w.ctypes.data + 2 * r * k, k, k // 16)
            out[0, r] = s

    k, n = 16 * 13, 37
    w = (randn(k + n, n, k) * np.float32(0.05)).astype(dtype)
    x = randn(unroll, 1, k)
    y = np.full((1, n), np.nan, np.float32)
    gemv(y, x, w.view(np.uint16))
    assert_f32_close(y.astype(np.float64), x, w)


@pytest.mark.parametrize("skew", [0, 16])
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("k,n", [(5, 3), (37, 9), (4128, 33)])
def test_decode_reads_x_from_a_skewed_copy(monkeypatch, skew, dtype, k, n):
    """One-row decode with x copied 16 bytes past a 32-byte boundary (as on Zen 4) or read where
    it is: the same sums, call after call with new x (the copy refreshed each call)."""
    if not (llvm_cpu.fast_path("f16c") if dtype == np.float16 else llvm_cpu.fast_path()):
        pytest.skip("no fast path on this CPU")
    monkeypatch.setattr(linear_bf16_cpu, "ONE_STREAM_DECODE", True)
    monkeypatch.setattr(linear_bf16_cpu, "DECODE_X_SKEW", skew)
    monkeypatch.setattr(linear_bf16_cpu, "_gemv_rows", _not_this_path)
    w = (randn(k + n, n, k) * np.float32(0.05)).astype(dtype)
    gemv = linear_bf16_cpu.bind_gemv(w)
    for seed in (1, 2):
        x, out = randn(seed * k, 1, k), np.empty((1, n), np.float32)
        gemv(out, x)
        assert_f32_close(out.astype(np.float64), x, w)


@pytest.mark.parametrize("k", [1, 5, 2048, 5632])
def test_skewed_row_starts_past_a_32_byte_boundary(k):
    for skew in (0, 4, 16, 28):
        x = cpu_pool.skewed_row(k, skew)
        assert x.shape == (1, k) and x.dtype == np.float32 and x.flags.c_contiguous
        assert x.ctypes.data % 32 == skew


@pytest.mark.parametrize("m", [17, 100])
def test_bf16_gemm_tiles_and_k_blocks(monkeypatch, m):
    """The BF16 GEMM with several k slices (a small slice), row blocks and panels cut off."""
    if not llvm_cpu.fast_path("avx512bf16"):
        pytest.skip("this CPU has no AVX-512 BF16")
    monkeypatch.setattr(linear_bf16_cpu, "KC_PAIRS", 5)
    w, x = randn(1, 70, 301).astype(BF16), randn(2, m, 301)
    assert_linear_close(ops.linear(x, w), x, w, "fast")


@pytest.mark.skipif(not AMX, reason="this CPU (or its kernel) offers no AMX-BF16 tiles")
@pytest.mark.parametrize("m,k,n", [(17, 32, 1), (40, 96, 33), (100, 160, 70), (33, 4096, 64),
                                   (40, 4128, 100)])
def test_amx_gemm_edges(m, k, n):
    """The AMX GEMM alone: rows of x past a 16- or 32-row block, rows of w past a 32-row
    block, one step of 32 along the input axis (fewer than the prefetch distance) or many,
    runs of blocks a thread with the next block packed meanwhile (k up to 4096) or each packed
    before its products (k = 4128)."""
    w, x = (randn(k, n, k) * np.float32(0.05)).astype(BF16), randn(m, m, k)
    out = np.full((m, n), np.nan, np.float32)
    linear_bf16_cpu.gemm_amx(out, x, w.view(np.uint16))
    assert_linear_close(out, x, w, "fast")


@njit
def _transposed(dst, src):
    llvm_cpu.store_transposed16(dst.ctypes.data, dst.strides[0] // 4, src.ctypes.data)


def test_store_transposed16_any_row_stride():
    """The AMX GEMM's output store: a 16 x 16 block transposed into rows ld floats apart; the
    floats around the block untouched."""
    src = np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32)
    for ld in (16, 37, 2048):
        dst = np.zeros((18, ld + 2), np.float32)
        _transposed(dst[1:17, 1:17], src)
        np.testing.assert_array_equal(dst[1:17, 1:17], src.T)
        dst[1:17, 1:17] = 0
        assert not dst.any()


def test_widened_tiles_cover_every_row(monkeypatch):
    monkeypatch.setattr(linear_bf16_cpu, "TILE_BYTES", 4 * 96 * 8)   # 8 rows a tile
    w, x = randn(3, 45, 96).astype(np.float16), randn(4, 20, 96)
    assert_f32_close(ops.linear(x, w).astype(np.float64), x, w)


def test_bias_leading_axes_and_out(path):
    w, b = randn(3, 33, 96).astype(BF16), randn(4, 33)
    for shape in [(2, 1, 96), (2, 3, 96), (4, 5, 96)]:
        x = randn(5, *shape)
        out = np.full(shape[:-1] + (33,), np.nan, np.float32)
        y = ops.linear(x, w, b, out=out)
        assert y is out
        plain = ops.linear(x.reshape(-1, 96), w)
        np.testing.assert_array_equal(y.reshape(-1, 33), plain + b)


def test_special_values_widen_exactly(path):
    """Subnormal, tiny, huge and negative-zero weights widen exactly (one nonzero x each)."""
    for dtype, vals in [(np.float16, [6e-8, -3e-5, 65504.0, -0.0, 1.0, -2.5]),
                        (BF16, [1e-40, -3e-38, 3e38, -0.0, 1.0, -2.5])]:
        w = np.zeros((6, 64), np.float32).astype(dtype)
        w[:, 10] = np.array(vals, np.float32).astype(dtype)
        x = np.zeros((1, 64), np.float32)
        x[0, 10] = 1.0
        y = ops.linear(x, w)
        np.testing.assert_array_equal(y[0], w[:, 10].astype(np.float32))


def test_paths_agree():
    w, x = randn(5, 67, 4096).astype(BF16), randn(6, 5, 4096)
    fast = ops.linear(x, w)
    llvm_cpu.CPU_PATH, saved = "portable", llvm_cpu.CPU_PATH
    try:
        portable = ops.linear(x, w)
    finally:
        llvm_cpu.CPU_PATH = saved
    assert_f32_close(fast.astype(np.float64), x, w)
    assert_f32_close(portable.astype(np.float64), x, w)


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
def test_embedding_16bit(dtype):
    table = randn(7, 50, 96).astype(dtype)
    tokens = np.array([3, 0, 49, 3, 17], np.int64)
    got = ops.embedding(table, tokens)
    assert got.dtype == np.float32 and got.shape == (5, 96)
    np.testing.assert_array_equal(got, table.astype(np.float32)[tokens])


def test_round_bf16_is_nearest_even():
    x = np.array([[1.0, 1.00390625, 1.01171875, 1.0078125 + 2 ** -20, -3.3, 1e-40, 3.0e38,
                   -0.0]], np.float32)
    ap = np.empty((1, 4, linear_bf16_cpu.MR), np.uint32)
    linear_bf16_cpu.pack_x_bf16(ap, x)
    got = np.stack([ap[0, :, 0] & 0xFFFF, ap[0, :, 0] >> 16], axis=1).reshape(-1)
    np.testing.assert_array_equal(got.astype(np.uint16), x[0].astype(BF16).view(np.uint16))
    assert not ap[0, :, 1:].any()                 # rows past x are zeros


def test_wrong_reference_is_detected():
    """Sanity: the bound rejects one weight rounded the other way, or one product dropped."""
    w, x = randn(8, 40, 512).astype(BF16), randn(9, 3, 512)
    y = ops.linear(x, w).astype(np.float64)
    bad = w.copy()
    bad.view(np.uint16)[5, 100] += 1
    with pytest.raises(AssertionError):
        assert_f32_close(y, x, bad)
    x2 = x.copy()
    x2[1, 300] = 0
    with pytest.raises(AssertionError):
        assert_f32_close(y, x2, w)


def test_path_from_the_environment():
    """NUMBA_ATTN_CPU_PATH=portable, read at import, turns every fast path off, no-amx only AMX,
    avx2 AMX and AVX-512; other values are refused."""
    import subprocess
    import sys
    code = ("from numba_attn.kernels import llvm_cpu; "
            "print(llvm_cpu.CPU_PATH, llvm_cpu.fast_path(), llvm_cpu.fast_path('avx512vnni'))")
    env = dict(os.environ, NUMBA_ATTN_CPU_PATH="portable")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.stdout.split() == ["portable", "False", "False"], got.stderr
    env["NUMBA_ATTN_CPU_PATH"] = "no-amx"
    got = subprocess.run([sys.executable, "-c", code + "; print(llvm_cpu.amx_path())"],
                         env=env, capture_output=True, text=True)
    assert got.stdout.split() == ["no-amx", "True", str("avx512vnni" in llvm_cpu.HOST_FEATURES),
                                  "False"], got.stderr
    env["NUMBA_ATTN_CPU_PATH"] = "fastest"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    env["NUMBA_ATTN_CPU_PATH"] = "avx2"
    got = subprocess.run([sys.executable, "-c", code + "; print(llvm_cpu.fast_path('avx2'))"],
                         env=env, capture_output=True, text=True)
    assert got.stdout.split() == ["avx2", "True", "False",
                                  str("avx2" in llvm_cpu.HOST_FEATURES)], got.stderr
    env["NUMBA_ATTN_CPU_PATH"] = "fastest"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.returncode != 0 and ("must be one of 'fast', 'no-amx', 'avx2', 'portable', got "
                                    "'fastest'") in got.stderr


def test_errors():
    w = randn(0, 8, 64).astype(BF16)
    with pytest.raises(ValueError, match=r"x has 32 input features but w \(8, 64\) expects 64"):
        ops.linear(randn(1, 2, 32), w)
    with pytest.raises(TypeError, match="x must have dtype float32, got float64"):
        ops.linear(randn(1, 2, 64).astype(np.float64), w)
    with pytest.raises(ValueError, match="w must be C-contiguous"):
        ops.linear(randn(1, 2, 8), randn(0, 64, 8).astype(BF16).T)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        ops.linear(randn(1, 2, 128)[:, ::2], w)
    with pytest.raises(TypeError, match=r"w must have dtype float32, got float64; weights on cpu "
                                        r"may be float32, bfloat16, float16 or q8_0"):
        ops.linear(randn(1, 2, 64), w.astype(np.float64))
    with pytest.raises(ValueError, match="w must have 2 dimensions"):
        ops.linear(randn(1, 2, 64), w[None])
