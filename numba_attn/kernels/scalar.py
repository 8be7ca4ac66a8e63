"""Scalar math shared by the CPU loops and the CUDA kernels (plain @njit functions can be called
from both)."""
import math

from numba import float32, njit


@njit(inline="always", fastmath=True, cache=True)
def silu(x):
    # x * sigmoid(x), in float32
    return x / (float32(1) + math.exp(-x))


@njit(inline="always", fastmath=True, cache=True)
def rope_pair(x0, x1, c, s):
    # rotate the pair (x0, x1) by the angle whose cosine and sine are (c, s)
    return x0 * c - x1 * s, x1 * c + x0 * s


# fastmath without 'nnan'/'ninf': kernels that use -inf as "masked" must keep infinities exact
FASTMATH_INF = {"nsz", "arcp", "contract", "afn", "reassoc"}
