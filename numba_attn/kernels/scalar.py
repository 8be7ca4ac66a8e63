"""Scalar math shared by the CPU loops and the CUDA kernels (plain @njit functions can be called
from both)."""
import math

import numpy as np
from llvmlite import ir
from numba import float32, int32, njit, types
from numba.extending import intrinsic

# fastmath without 'nnan'/'ninf': kernels that use -inf as "masked" must keep infinities exact
FASTMATH_INF = {"nsz", "arcp", "contract", "afn", "reassoc"}
# ... and with 'nnan', for loops over values known not to be NaN (scores of finite inputs)
FASTMATH_NNAN = FASTMATH_INF | {"nnan"}


@njit(inline="always", fastmath=True, cache=True)
def silu(x):
    # x * sigmoid(x), in float32. exp's argument is capped: exp(-x) overflowing to inf made
    # x / inf a NaN under fastmath for x < -88; past the cap the result is ~x * e^-80, i.e. 0
    return x / (float32(1) + math.exp(min(-x, float32(80))))


@njit(inline="always", fastmath=True, cache=True)
def rope_pair(x0, x1, c, s):
    # rotate the pair (x0, x1) by the angle whose cosine and sine are (c, s)
    return x0 * c - x1 * s, x1 * c + x0 * s



@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    # reinterpret an int32's bits as a float32 (no conversion)
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_LN2_HI = float32(0.693359375)            # ln 2 split in two so n * ln2 subtracts exactly
_LN2_LO = float32(-2.12194440e-4)
_LOG2E = float32(1.4426950408889634)
_E2, _E3, _E4, _E5, _E6 = (float32(1 / math.factorial(i)) for i in range(2, 7))


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def exp_f32(x):
    # e^x in float32 for x <= 88 (softmax arguments are <= 0), relative error ~2e-7; plain
    # arithmetic, so loops calling it vectorise (libm's expf does not).
    # x = n ln2 + r, e^x = 2^n e^r, |r| <= ln2/2.
    xc = max(x, float32(-87.0))           # below this e^x underflows (to 0, below)
    n = np.floor(xc * _LOG2E + float32(0.5))     # float32 (math.floor gives an int64)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = float32(1) + r * (float32(1) + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * _E6)))))
    y = p * _int32_bits_as_float32((int32(n) + int32(127)) << 23)
    return y if x >= float32(-87.0) else float32(0)


@njit(inline="always", fastmath=FASTMATH_NNAN, cache=True)
def row_max(S, r, n, init):
    # max(init, S[r, 0], ..., S[r, n - 1]) for values without NaN (-inf is fine). Four running
    # maxima, so four compares are in flight: 2.7x faster than one chain of max() here
    m0 = init
    m1 = init
    m2 = init
    m3 = init
    j = 0
    while j + 4 <= n:
        s0, s1, s2, s3 = S[r, j], S[r, j + 1], S[r, j + 2], S[r, j + 3]
        m0 = s0 if s0 > m0 else m0
        m1 = s1 if s1 > m1 else m1
        m2 = s2 if s2 > m2 else m2
        m3 = s3 if s3 > m3 else m3
        j += 4
    for t in range(j, n):
        s = S[r, t]
        m0 = s if s > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@njit(inline="always", fastmath=True, cache=True)
def silu_vec(x):
    # silu for CPU loops: as silu, with exp_f32, so a loop over it vectorises (libm's expf does
    # not; the caller needs error_model="numpy" too, or the division's zero check blocks it).
    # The cap keeps exp's argument in exp_f32's range
    return x / (float32(1) + exp_f32(min(-x, float32(80))))


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def dots_4x1(a0, a1, a2, a3, b):
    # the dot products of four vectors with b (all of one length), in one pass over b: b's
    # elements are loaded once for four products (GEMV's 4 rows of w, attention's 4 query rows)
    s0 = float32(0)
    s1 = float32(0)
    s2 = float32(0)
    s3 = float32(0)
    for c in range(b.shape[0]):
        bc = b[c]
        s0 += a0[c] * bc
        s1 += a1[c] * bc
        s2 += a2[c] * bc
        s3 += a3[c] * bc
    return s0, s1, s2, s3


@njit(inline="always", fastmath=FASTMATH_INF, cache=True)
def dots_4x2(a0, a1, a2, a3, b0, b1):
    # as dots_4x1 against two vectors at once, so each element of a0..a3 serves two products:
    # (a0.b0, a1.b0, a2.b0, a3.b0, a0.b1, a1.b1, a2.b1, a3.b1)
    s0 = float32(0)
    s1 = float32(0)
    s2 = float32(0)
    s3 = float32(0)
    t0 = float32(0)
    t1 = float32(0)
    t2 = float32(0)
    t3 = float32(0)
    for c in range(b0.shape[0]):
        x0, x1, x2, x3 = a0[c], a1[c], a2[c], a3[c]
        p, q = b0[c], b1[c]
        s0 += x0 * p
        s1 += x1 * p
        s2 += x2 * p
        s3 += x3 * p
        t0 += x0 * q
        t1 += x1 * q
        t2 += x2 * q
        t3 += x3 * q
    return s0, s1, s2, s3, t0, t1, t2, t3
