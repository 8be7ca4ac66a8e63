"""linear and embedding with Q8_0 weights (a Q8Matrix) on the CPU, on every path (AVX-512 VNNI
with AMX tiles for prefill where the CPU has them, the same with prefill by the AVX-512 BF16
GEMM where it has that, AVX2 GEMVs with prefill by sgemm, and the portable loops with prefill
by sgemm), against float64 references on the dequantized weights.

Decode and a few rows quantize x per 32 values as llama.cpp does, so there are two checks:
  - exact arithmetic: against the float64 sum over blocks of d_w d_x (codes . codes) with x's
    codes and scales from an independent statement of the rule (tests/test_formats.py). The
    integer sums are exact on both paths; what remains is float32 rounding where the scaled
    partial sums (VNNI: of 4 products a lane) are added, at most nb + 8 roundings deep (nb =
    k / 32), each within u = 2^-24 of a partial sum no larger than sum_b d_w d_x |codes|.|codes|.
  - the quantization of x: each x_j is off by at most half its block's step, d_x / 2 =
    amax_b / 254, so |y - x . w| <= sum_b amax_b / 254 * sum_{j in b} |w_j| (+ the above);
    with random data the errors are independent and uniform in the step, so the RMS error over
    all outputs is sqrt(mean(sum_j w_j^2 d_x(j)^2 / 12)), which it must not exceed by 25%.
Prefill multiplies the dequantized weights by x in float32 (sgemm): the float32 bound of
tests/test_linear_bf16.py (float32 sums of k random-sign terms); on AMX tiles or the BF16 GEMM
both rounded to bfloat16 first: that bound against the rounded operands, and 2^-8 of each
product against the exact ones."""
import ml_dtypes
import numpy as np
import pytest
from numba import njit

from numba_attn import ops
from numba_attn.formats import Q8Matrix, quantize_q8_0
from numba_attn.kernels import linear_cpu, linear_q8_cpu, llvm_cpu
from numba_attn.kernels.scalar import FASTMATH_INF
from tests.test_formats import q8_0_reference

U = 2.0 ** -24
BF16 = ml_dtypes.bfloat16
FAST = llvm_cpu.fast_path("avx512vnni")
AVX2 = llvm_cpu.fast_path("avx2")
AMX = llvm_cpu.amx_path("amx-bf16")
BF16_GEMM = llvm_cpu.fast_path("avx512bf16")


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(params=["fast", "no-amx", "avx2", "portable"])
def path(request, monkeypatch):
    """Run the test on one path; the other paths' kernels raise, so the path is the one named
    (no-amx: prefill by the BF16 GEMM, or sgemm where the CPU lacks AVX-512 BF16; avx2: the
    GEMVs' AVX2 family, prefill by sgemm)."""
    if request.param in ("fast", "no-amx"):
        if not FAST:
            pytest.skip("this CPU has no AVX-512 VNNI")
        monkeypatch.setattr(linear_q8_cpu, "_gemv_rows_portable", _not_this_path)
    if request.param == "avx2":
        if not AVX2:
            pytest.skip("this CPU has no AVX2")
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "avx2")
        for name in ("_gemv_rows_portable", "gemm_amx", "_gemm_bf16"):
            monkeypatch.setattr(linear_q8_cpu, name, _not_this_path)
        assert all(linear_q8_cpu._gemv_kernel(m)[1] is linear_q8_cpu.FAMILIES["avx2"]
                   for m in (1, 2))
    if request.param == "fast" and AMX:
        for name in ("_gemm", "_gemm_bf16"):
            monkeypatch.setattr(linear_q8_cpu, name, _not_this_path)
    elif request.param == "fast" and BF16_GEMM or request.param == "no-amx":
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", request.param)
        monkeypatch.setattr(linear_q8_cpu, "gemm_amx", _not_this_path)
        if BF16_GEMM:
            monkeypatch.setattr(linear_q8_cpu, "_gemm", _not_this_path)
    elif request.param == "portable":
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "portable")
        for name in ("_gemv", "_gemv_pairs", "_gemv_rows", "gemm_amx", "_gemm_bf16"):
            monkeypatch.setattr(linear_q8_cpu, name, _not_this_path)
    return request.param


def _not_this_path(*args):
    raise AssertionError("the other path's kernel ran")


def assert_within(err, bound, what):
    bad = np.abs(err) > bound
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} outside the bound, worst "
                           f"{np.max(np.abs(err) / np.maximum(bound, 1e-300)):.3g}x it")


def assert_q8_close(y, x, q):
    """y = linear(x, q) for x (m, k), against the two references above."""
    m, k = x.shape
    wq = q.qs.astype(np.float64)
    wd = q.d.astype(np.float64)                                   # (n, nb)
    w = q.dequantize().astype(np.float64)                         # (n, k)
    if m <= linear_cpu.GEMV_MAX_ROWS:
        xq, xd = q8_0_reference(x, np.float32)
        xq, xd = xq.astype(np.float64), xd.astype(np.float64)     # (m, k), (m, nb)
        nb = k // 32
        isum = np.einsum("ibj,rbj->irb", xq.reshape(m, nb, 32), wq.reshape(-1, nb, 32))
        scales = xd[:, None, :] * wd[None, :, :]                  # (m, n, nb)
        exact = (isum * scales).sum(-1)
        iabs = np.einsum("ibj,rbj->irb", np.abs(xq).reshape(m, nb, 32),
                         np.abs(wq).reshape(-1, nb, 32))
        arith = (nb + 8) * U * (iabs * scales).sum(-1)
        assert_within(y - exact, arith, "float32 arithmetic")
        # x's quantization: worst case per output, and the RMS against the rounding model
        amax = np.abs(x.astype(np.float64)).reshape(m, nb, 32).max(-1)           # (m, nb)
        wabs = np.abs(w).reshape(-1, nb, 32).sum(-1)                             # (n, nb)
        worst = (amax / 254) @ wabs.T * (1 + 1e-6) + arith
        err = y - x.astype(np.float64) @ w.T
        assert_within(err, worst, "x's quantization")
        step2 = np.repeat(xd, 32, axis=1) ** 2                                   # (m, k)
        predicted = np.sqrt(np.mean(step2 @ (w ** 2).T / 12))
        if y.size >= 100:
            assert np.sqrt(np.mean(err ** 2)) <= 1.25 * predicted
    elif llvm_cpu.amx_path("amx-bf16") or llvm_cpu.fast_path("avx512bf16"):
        # AMX tiles or the BF16 GEMM: x and the dequantized weights rounded to bfloat16
        # (ml_dtypes: nearest even), then float32 sums; each product within 2^-8 (+ a hair) of
        # its exact value
        xb = x.astype(BF16).astype(np.float64)
        wb = w.astype(np.float32).astype(BF16).astype(np.float64)
        scale = np.sqrt((xb ** 2) @ (wb ** 2).T)
        assert_within(y - xb @ wb.T, 8 * U * np.sqrt(k) * scale, "float32 sums of bfloat16s")
        x64 = x.astype(np.float64)
        worst = (2.0 ** -8 + 2.0 ** -17) * (np.abs(x64) @ np.abs(w).T) \
            + 8 * U * np.sqrt(k) * scale
        assert_within(y - x64 @ w.T, worst, "x and w rounded to bfloat16")
    else:
        ref = x.astype(np.float64) @ w.T
        scale = np.sqrt((x.astype(np.float64) ** 2) @ (w ** 2).T)     # |x o w|_2 per output
        assert_within(y - ref, 8 * U * np.sqrt(k) * scale, "float32 GEMM")


@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize("k,n", [(32, 7), (96, 1), (96, 1000), (4128, 33)])
def test_linear_q8_matches_reference(path, m, k, n):
    q = quantize_q8_0(randn(k + n, n, k) * np.float32(0.05))
    x = randn(m * 31 + k, m, k)
    y = ops.linear(x, q)
    assert y.shape == (m, n) and y.dtype == np.float32
    assert_q8_close(y.astype(np.float64), x, q)


@pytest.fixture(params=["vnni", "avx2"])
def isa(request, monkeypatch):
    """The GEMVs' kernel family by instruction set, each where the CPU has it."""
    if not (FAST if request.param == "vnni" else AVX2):
        pytest.skip(f"this CPU has no {request.param.upper()}")
    if request.param == "avx2":
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "avx2")
    assert linear_q8_cpu._gemv_kernel(1)[1] is linear_q8_cpu.FAMILIES[request.param]
    return request.param


@pytest.mark.parametrize("one_stream", [True, False], ids=["one-row", "two-rows"])
@pytest.mark.parametrize("k,n", [(32, 7), (96, 1000), (4128, 33), (4128, 1001)])
def test_decode_reads_one_or_two_rows(monkeypatch, isa, one_stream, k, n):
    """Decode's two ways through w (one row a step on AMD Zen, 2 rows elsewhere), each on any
    CPU; the other kernels raise. 4128 x 1001: an odd block count and row count, on every
    thread."""
    monkeypatch.setattr(linear_q8_cpu, "ONE_STREAM_DECODE", one_stream)
    monkeypatch.setattr(linear_q8_cpu, "_gemv_pairs" if one_stream else "_gemv", _not_this_path)
    monkeypatch.setattr(linear_q8_cpu, "_gemv_rows", _not_this_path)
    q = quantize_q8_0(randn(k + n, n, k) * np.float32(0.05))
    x = randn(k, 1, k)
    assert_q8_close(ops.linear(x, q).astype(np.float64), x, q)


@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_one_row_dots_at_every_unroll(isa, unroll):
    """The one-row decode dots at 1, 2 or 4 block pairs a loop step (each a host's choice),
    with a pair count no multiple of 4 (the loop's remainder)."""
    dots = linear_q8_cpu._make_block_dots(isa, 1, unroll, linear_cpu.STREAM_PREFETCH_BYTES,
                                          linear_cpu.STREAM_LOCALITY)

    @njit
    def gemv(out, x, wq, wd):
        xq = np.empty(x.shape, np.int8)
        xc, xd = linear_q8_cpu._codes(x, xq)
        n, k = wq.shape
        nb = xd.shape[1]
        for r in range(n):
            s, = dots(xq.ctypes.data, xc.ctypes.data, xd.ctypes.data, wq.ctypes.data + r * k,
                      wd.ctypes.data + 2 * r * nb, k, nb // 2)
            out[0, r] = s

    k, n = 32 * 2 * 7, 37                             # 7 block pairs a row
    q = quantize_q8_0(randn(k + n, n, k) * np.float32(0.05))
    x = randn(unroll, 1, k)
    y = np.full((1, n), np.nan, np.float32)
    gemv(y, x, q.qs, q.d.view(np.uint16))
    assert_q8_close(y.astype(np.float64), x, q)


def test_few_rows_read_four_rows(monkeypatch, isa):
    """A few rows of x (2 to GEMV_MAX_ROWS) go through w 4 rows a pass, on any CPU."""
    for name in ("_gemv", "_gemv_pairs"):
        monkeypatch.setattr(linear_q8_cpu, name, _not_this_path)
    q = quantize_q8_0(randn(3, 1001, 4128) * np.float32(0.05))
    x = randn(4, 5, 4128)
    assert_q8_close(ops.linear(x, q).astype(np.float64), x, q)


def test_paths_agree_on_block_sums(isa):
    """The paths share every block's integer sum; only float32 additions differ."""
    q = quantize_q8_0(randn(1, 67, 4096))
    x = randn(2, 5, 4096)
    fast = ops.linear(x, q)
    saved = llvm_cpu.CPU_PATH
    llvm_cpu.CPU_PATH = "portable"
    try:
        portable = ops.linear(x, q)
    finally:
        llvm_cpu.CPU_PATH = saved
    np.testing.assert_allclose(fast, portable, rtol=0, atol=2e-5 * np.abs(fast).max())


def test_codes_of_minus_128_on_every_path(isa):
    """A code of -128 (outside the Q8_0 rule's [-127, 127], but a byte a file may hold) counts
    as -128 on every path: AVX2 takes |w| as the unsigned operand."""
    q = quantize_q8_0(randn(2, 9, 128) * np.float32(0.05))
    q.qs[:, ::5] = -128
    x = randn(3, 1, 128)
    assert_q8_close(ops.linear(x, q).astype(np.float64), x, q)


def test_bias_leading_axes_and_out(path):
    q, b = quantize_q8_0(randn(3, 33, 96)), randn(4, 33)
    x = randn(5, 2, 3, 96)
    out = np.full((2, 3, 33), np.nan, np.float32)
    y = ops.linear(x, q, b, out=out)
    assert y is out
    plain = ops.linear(x.reshape(6, 96), q)
    np.testing.assert_array_equal(y.reshape(6, 33), plain + b)


def test_negative_max_rows_and_tiny_blocks(path):
    """Rows whose largest weight is negative, blocks of zeros and of tiny weights, x with a
    block of zeros: the scales and codes' signs all reach the sums."""
    w = randn(6, 9, 64) * np.float32(0.1)
    w[0] = -np.abs(w[0])
    w[1, :32] = 0
    w[2, 32:] *= np.float32(1e-6)
    w[3, 5] = -3.0
    q = quantize_q8_0(w)
    for m in (1, 4, 30):
        x = randn(7 + m, m, 64)
        x[0, :32] = 0
        assert_q8_close(ops.linear(x, q).astype(np.float64), x, q)


@pytest.mark.parametrize("seq", [1, 5])
def test_embedding_q8(seq):
    q = quantize_q8_0(randn(8, 50, 96))
    tokens = np.array([3, 0, 49, 3, 17][:seq], np.int64)
    got = ops.embedding(q, tokens)
    assert got.dtype == np.float32 and got.shape == (seq, 96)
    np.testing.assert_array_equal(got, q.dequantize()[tokens])


def test_gemm_tiles_cover_every_row(monkeypatch):
    """Prefill in several tiles of w (a small tile size), the last one partial."""
    monkeypatch.setattr(linear_q8_cpu, "TILE_BYTES", 4 * 96 * 8)   # 8 rows a tile
    q, x = quantize_q8_0(randn(9, 45, 96)), randn(10, 20, 96)
    assert_q8_close(ops.linear(x, q).astype(np.float64), x, q)


# _quantize_x as its callers may compile it: numba compiles a function called from a jitted one
# with the caller's fastmath flags, and the GEMVs' allow reciprocals and fused products
QUANTIZE_X = {"as called from Python": linear_q8_cpu._quantize_x,
              "with the GEMVs' fastmath": njit(fastmath=FASTMATH_INF)(
                  linear_q8_cpu._quantize_x.py_func)}


def rounded_up_to_halves():
    """Blocks of max |x| 100.3 whose other values times 1 / d round in float32 up to k + 0.5
    exactly, the exact product below it: roundf of the float32 product gives k + 1, the product
    fused with the rounding's subtraction would give k."""
    a = np.float32(100.3)
    inv = np.float32(1) / np.float32(a / np.float32(127))
    found = []
    for k in range(126):
        x = np.float32((k + 0.5) / float(inv))
        for _ in range(4):
            if np.float32(x * inv) == k + 0.5 and float(x) * float(inv) < k + 0.5:
                found.append(x)
            x = np.nextafter(x, np.float32(np.inf))
    assert len(found) >= 31
    rows = np.array(found[:31 * (len(found) // 31)], np.float32).reshape(-1, 31)
    return np.concatenate([np.full((len(rows), 1), a, np.float32), rows], axis=1) * \
        np.where(np.arange(32) % 2, np.float32(-1), np.float32(1))


@pytest.mark.parametrize("how", list(QUANTIZE_X))
@pytest.mark.parametrize("codes_dtype", [np.int8, np.float32])
def test_x_codes_follow_the_q8_0_rule(codes_dtype, how):
    """x's codes, scales and VNNI starting lanes, against the independent statement of the rule:
    random rows of several magnitudes, rows of exact halves (codes on .5, rounded away from
    zero), rows whose largest |x| is negative, at each lane of a block in turn, and blocks whose
    float32 products x / d round up onto k + 0.5; a block holding a NaN gets a NaN scale, one
    holding an infinity an infinite one."""
    quantize = QUANTIZE_X[how]
    rng = np.random.default_rng(21)
    rows = [randn(22, 64, 320) * np.float32(s) for s in (1e-5, 1.0, 3e4)]
    halves = (rng.integers(-254, 255, (2, 320)) / 2).astype(np.float32)
    halves[:, ::32] = 127                             # d = 1: x itself is the code, halves too
    peaks = randn(24, 32, 320)
    peaks[np.arange(32), np.arange(32) * 5] = -100.0   # a negative largest |x| at every lane
    for x in rows + [halves, peaks, rounded_up_to_halves()]:
        nb = x.shape[1] // 32
        xq = np.empty(x.shape, codes_dtype)
        xc, xd = (np.empty((x.shape[0], nb), t) for t in (np.int32, np.float32))
        quantize(xq, xc, xd, x)
        want_q, want_d = q8_0_reference(x, np.float32)
        np.testing.assert_array_equal(xq, want_q.astype(codes_dtype))
        np.testing.assert_array_equal(xd, want_d)
        np.testing.assert_array_equal(
            xc, -16 * want_q.astype(np.int32).reshape(x.shape[0], nb, 32).sum(-1))
    x = randn(23, 1, 128)
    x[0, 5], x[0, 70] = np.nan, -np.inf
    xq, xc, xd = np.empty(x.shape, np.int8), np.empty((1, 4), np.int32), np.empty((1, 4), np.float32)
    quantize(xq, xc, xd, x)
    assert np.isnan(xd[0, 0]) and xd[0, 2] == np.inf and np.isfinite(xd[0, [1, 3]]).all()


def test_nan_in_x_reaches_y(path):
    """A NaN in x gives NaN in its row of y, as float32 arithmetic would (not a quantized 0)."""
    q = quantize_q8_0(randn(13, 9, 96))
    for m in (1, 3):
        x = randn(14, m, 96)
        x[m - 1, 50] = np.nan
        y = ops.linear(x, q)
        assert np.isnan(y[m - 1]).all() and np.isfinite(y[:m - 1]).all()


def test_wrong_reference_is_detected():
    """Sanity: the bounds reject the result with one block's scale wrong or one code off."""
    q, x = quantize_q8_0(randn(11, 40, 128)), randn(12, 3, 128)
    y = ops.linear(x, q).astype(np.float64)
    bad = Q8Matrix(q.qs.copy(), q.d.copy())
    bad.d[5, 2] *= np.float16(1.01)
    with pytest.raises(AssertionError):
        assert_q8_close(y, x, bad)
    bad = Q8Matrix(q.qs.copy(), q.d.copy())
    bad.qs[7, 70] += np.int8(1) if bad.qs[7, 70] < 127 else np.int8(-1)
    with pytest.raises(AssertionError):
        assert_q8_close(y, x, bad)


def test_errors():
    q = quantize_q8_0(randn(0, 8, 64))
    with pytest.raises(ValueError, match=r"x has 32 input features but w \(8, 64\) expects 64"):
        ops.linear(randn(1, 2, 32), q)
    with pytest.raises(TypeError, match="x must have dtype float32, got float64"):
        ops.linear(randn(1, 2, 64).astype(np.float64), q)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        ops.linear(randn(1, 2, 128)[:, ::2], q)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(randn(0, 8, 48))
    with pytest.raises(ValueError, match=r"bias must have shape \(8\)"):
        ops.linear(randn(1, 2, 64), q, randn(2, 7))
    with pytest.raises(TypeError, match="tokens must have dtype int64"):
        ops.embedding(q, np.array([1], np.int32))
