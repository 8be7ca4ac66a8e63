"""Every input validation of ops.py, rope.py, mask.py and kvcache.py: the exception type and a
message that names the problem."""
import numpy as np
import pytest

from numba_attn import (KVCache, MaskCache, RopeTable, apply_rope, attention, causal_mask, linear,
                        masked_softmax, rmsnorm, silu_mul)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class FakeDeviceArray:
    """Looks like a CUDA array to the dispatcher (it has __cuda_array_interface__): enough to
    check that host and device arguments are not mixed, without a GPU."""
    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.float32)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False),
                                         "version": 3, "strides": None}


MIX = r"mix host \(NumPy\) and device \(CUDA\) arrays"
TAB = RopeTable(64, 16)
X = randn(7, 4, 64)                                       # (seq, heads, head_dim)


def shifted_views(shape):
    """Two C-contiguous arrays of `shape` that overlap without being the same array."""
    buf = randn(shape[0] + 1, *shape[1:])
    return buf[1:], buf[:-1]


# ---------------------------------------------------------------------------- apply_rope

X_OVER, OUT_OVER = shifted_views((7, 4, 64))

ROPE_CASES = [
    ("table type", TypeError, "table must be a RopeTable, got str",
     lambda: apply_rope(X, "table")),
    ("style", ValueError, "style must be 'half' or 'interleaved', got 'neox'",
     lambda: apply_rope(X, TAB, style="neox")),
    ("ndim 2", ValueError, r"x must have 3 or 4 dimensions, got shape \(7, 64\)",
     lambda: apply_rope(randn(7, 64), TAB)),
    ("ndim 5", ValueError, "x must have 3 or 4 dimensions",
     lambda: apply_rope(randn(1, 1, 7, 4, 64), TAB)),
    ("float64", TypeError, "x must have dtype float32, got float64",
     lambda: apply_rope(X.astype(np.float64), TAB)),
    ("int32", TypeError, "x must have dtype float32, got int32",
     lambda: apply_rope(X.astype(np.int32), TAB)),
    ("float16", TypeError, "got float16",
     lambda: apply_rope(X.astype(np.float16), TAB)),
    ("non-contiguous", ValueError, "x must be C-contiguous",
     lambda: apply_rope(randn(7, 8, 64)[:, ::2], TAB)),
    ("transposed", ValueError, "x must be C-contiguous",
     lambda: apply_rope(randn(4, 7, 64).transpose(1, 0, 2), TAB)),
    ("head_dim vs table", ValueError, "x has head_dim 128 but the RopeTable was built for 64",
     lambda: apply_rope(randn(7, 4, 128), TAB)),
    ("negative start_pos", ValueError, "start_pos must be a non-negative integer, got -1",
     lambda: apply_rope(X, TAB, -1)),
    ("float start_pos", ValueError, "start_pos must be a non-negative integer",
     lambda: apply_rope(X, TAB, 2.0)),
    ("bool start_pos", ValueError, "start_pos must be a non-negative integer",
     lambda: apply_rope(X, TAB, True)),
    ("None start_pos", ValueError, "start_pos must be a non-negative integer",
     lambda: apply_rope(X, TAB, None)),
    ("past max_positions", ValueError,
     r"positions 10\.\.16 are past the RopeTable's max_positions=16",
     lambda: apply_rope(X, TAB, 10)),
    ("start at max_positions", ValueError, "past the RopeTable's max_positions=16",
     lambda: apply_rope(randn(1, 4, 64), TAB, 16)),
    ("out shape", ValueError, r"out must have shape \(7, 4, 64\), got \(7, 4, 32\)",
     lambda: apply_rope(X, TAB, out=randn(7, 4, 32))),
    ("out 4-d for 3-d x", ValueError, "out must have shape",
     lambda: apply_rope(X, TAB, out=randn(1, 7, 4, 64))),
    ("out dtype", TypeError, "out must have dtype float32, got float64",
     lambda: apply_rope(X, TAB, out=np.empty((7, 4, 64)))),
    ("out non-contiguous", ValueError, "out must be C-contiguous",
     lambda: apply_rope(X, TAB, out=randn(7, 4, 128)[..., ::2])),
    ("out overlaps x", ValueError, "out overlaps x without being it",
     lambda: apply_rope(X_OVER, TAB, out=OUT_OVER)),
    ("x not an array", TypeError, "x must be an array, got list",
     lambda: apply_rope(X.tolist(), TAB)),
    ("out not an array", TypeError, "out must be an array, got list",
     lambda: apply_rope(X, TAB, out=[0.0])),
    ("host x, device out", ValueError, MIX,
     lambda: apply_rope(X, TAB, out=FakeDeviceArray((7, 4, 64)))),
]


# ---------------------------------------------------------------------------- RopeTable

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


TABLE_CASES = [
    ("odd head_dim", ValueError, "head_dim must be even for RoPE, got 63",
     lambda: RopeTable(63, 16)),
    ("zero head_dim", ValueError, "head_dim must be a positive integer, got 0",
     lambda: RopeTable(0, 16)),
    ("negative head_dim", ValueError, "head_dim must be a positive integer",
     lambda: RopeTable(-64, 16)),
    ("float head_dim", ValueError, "head_dim must be a positive integer",
     lambda: RopeTable(64.0, 16)),
    ("zero max_positions", ValueError, "max_positions must be a positive integer, got 0",
     lambda: RopeTable(64, 0)),
    ("bool max_positions", ValueError, "max_positions must be a positive integer",
     lambda: RopeTable(64, True)),
    ("zero theta", ValueError, "theta must be positive, got 0.0",
     lambda: RopeTable(64, 16, theta=0.0)),
    ("negative theta", ValueError, "theta must be positive",
     lambda: RopeTable(64, 16, theta=-1e4)),
    ("nan theta", ValueError, "theta must be positive",
     lambda: RopeTable(64, 16, theta=float("nan"))),
    ("scaling not a dict", TypeError, "scaling must be a dict .* or None, got str",
     lambda: RopeTable(64, 16, scaling="llama3")),
    ("scaling list", TypeError, "scaling must be a dict",
     lambda: RopeTable(64, 16, scaling=[("factor", 8.0)])),
    ("unknown type", ValueError, "unsupported rope scaling type 'yarn'; supported: llama3, linear",
     lambda: RopeTable(64, 16, scaling={"rope_type": "yarn", "factor": 4.0})),
    ("unknown legacy type", ValueError, "unsupported rope scaling type 'dynamic'",
     lambda: RopeTable(64, 16, scaling={"type": "dynamic", "factor": 2.0})),
    ("linear without factor", ValueError, "rope scaling 'linear' needs a numeric 'factor'",
     lambda: RopeTable(64, 16, scaling={"rope_type": "linear"})),
    ("non-numeric factor", ValueError, "rope scaling 'linear' needs a numeric 'factor'",
     lambda: RopeTable(64, 16, scaling={"rope_type": "linear", "factor": "big"})),
    ("None factor", ValueError, "needs a numeric 'factor'",
     lambda: RopeTable(64, 16, scaling={"rope_type": "linear", "factor": None})),
    ("zero factor", ValueError, "rope scaling factor must be positive, got 0.0",
     lambda: RopeTable(64, 16, scaling={"rope_type": "linear", "factor": 0})),
    ("negative llama3 factor", ValueError, "rope scaling factor must be positive",
     lambda: RopeTable(64, 16, scaling={**LLAMA3, "factor": -8.0})),
    ("llama3 without factor", ValueError, "rope scaling 'llama3' needs a numeric 'factor'",
     lambda: RopeTable(64, 16, scaling=without(LLAMA3, "factor"))),
    ("llama3 without low_freq_factor", ValueError, "rope scaling 'llama3' needs 'low_freq_factor'",
     lambda: RopeTable(64, 16, scaling=without(LLAMA3, "low_freq_factor"))),
    ("llama3 without high_freq_factor", ValueError,
     "rope scaling 'llama3' needs 'high_freq_factor'",
     lambda: RopeTable(64, 16, scaling=without(LLAMA3, "high_freq_factor"))),
    ("llama3 without original length", ValueError,
     "rope scaling 'llama3' needs 'original_max_position_embeddings'",
     lambda: RopeTable(64, 16, scaling=without(LLAMA3, "original_max_position_embeddings"))),
    ("llama3 high <= low", ValueError, "needs high_freq_factor > low_freq_factor, got 1.0 and 1.0",
     lambda: RopeTable(64, 16, scaling={**LLAMA3, "high_freq_factor": 1.0})),
]


# ---------------------------------------------------------------------------- linear

LX, LW, LB = randn(3, 8), randn(5, 8), randn(5)
SQ_X, SQ_X8, SQ_W, SQ_B = randn(1, 8), randn(8, 8), randn(8, 8), randn(8)   # out fits x, w, bias
LX_OVER, LOUT_OVER = shifted_views((3, 5))

LINEAR_CASES = [
    ("x 0-d", ValueError, r"x must have 1 or 2 or 3 or 4 dimensions, got shape \(\)",
     lambda: linear(np.ones((), np.float32), LW)),
    ("x 5-d", ValueError, "x must have 1 or 2 or 3 or 4 dimensions",
     lambda: linear(randn(1, 1, 1, 3, 8), LW)),
    ("x float64", TypeError, "x must have dtype float32, got float64",
     lambda: linear(LX.astype(np.float64), LW)),
    ("x int64", TypeError, "x must have dtype float32, got int64",
     lambda: linear(LX.astype(np.int64), LW)),
    ("w 1-d", ValueError, r"w must have 2 dimensions, got shape \(8,\)",
     lambda: linear(LX, randn(8))),
    ("w 3-d", ValueError, "w must have 2 dimensions",
     lambda: linear(LX, randn(1, 5, 8))),
    ("w float64", TypeError, "w must have dtype float32, got float64",
     lambda: linear(LX, LW.astype(np.float64))),
    ("w int8 array", TypeError, "w must have dtype float32, got int8",
     lambda: linear(LX, LW.astype(np.int8))),
    ("x non-contiguous", ValueError, "x must be C-contiguous",
     lambda: linear(randn(3, 16)[:, ::2], LW)),
    ("w transposed", ValueError, "w must be C-contiguous",
     lambda: linear(LX, randn(8, 5).T)),
    ("features mismatch", ValueError,
     r"x has 8 input features but w \(5, 9\) expects 9 \(w is \(out_features, in_features\)\)",
     lambda: linear(LX, randn(5, 9))),
    ("w the wrong way round", ValueError, "x has 8 input features but w",
     lambda: linear(LX, randn(8, 5))),
    ("bias length", ValueError, r"bias must have shape \(5\), got \(4,\)",
     lambda: linear(LX, LW, randn(4))),
    ("bias 2-d", ValueError, "bias must have 1 dimensions",
     lambda: linear(LX, LW, randn(1, 5))),
    ("bias float64", TypeError, "bias must have dtype float32",
     lambda: linear(LX, LW, LB.astype(np.float64))),
    ("bias not an array", TypeError, "bias must be an array, got list",
     lambda: linear(LX, LW, [0.0] * 5)),
    ("out shape", ValueError, r"out must have shape \(3, 5\), got \(3, 6\)",
     lambda: linear(LX, LW, out=randn(3, 6))),
    ("out dtype", TypeError, "out must have dtype float32, got float64",
     lambda: linear(LX, LW, out=np.empty((3, 5), np.float64))),
    ("out overlaps x", ValueError, "out overlaps x without being it",
     lambda: linear(LX_OVER, randn(5, 5), out=LOUT_OVER)),
    ("out is x, one row", ValueError, "out must not be x, w or bias",
     lambda: linear(SQ_X, SQ_W, out=SQ_X)),
    ("out is x, many rows", ValueError, "out must not be x, w or bias",
     lambda: linear(SQ_X8, SQ_W, out=SQ_X8)),
    ("out is w", ValueError, "out must not be x, w or bias",
     lambda: linear(SQ_X8, SQ_W, out=SQ_W)),
    ("out is bias", ValueError, "out must not be x, w or bias",
     lambda: linear(SQ_X[0], SQ_W, SQ_B, out=SQ_B)),
    ("out overlaps w", ValueError, "out overlaps w",
     lambda: linear(randn(4, 8), SQ_W, out=SQ_W[:4])),
    ("w not an array", TypeError, "w must be an array, got list",
     lambda: linear(LX, LW.tolist())),
    ("host x, device w", ValueError, MIX,
     lambda: linear(LX, FakeDeviceArray((5, 8)))),
    ("host x, device bias", ValueError, MIX,
     lambda: linear(LX, LW, FakeDeviceArray((5,)))),
]


# ---------------------------------------------------------------------------- rmsnorm, silu_mul

NX, NW = randn(3, 64), randn(64)
NX_OVER, NOUT_OVER = shifted_views((3, 64))
G, U = randn(3, 4), randn(3, 4, seed=1)
G_OVER, GOUT_OVER = shifted_views((3, 4))

NORM_CASES = [
    ("x 0-d", ValueError, "x must have 1 or 2 or 3 or 4 dimensions",
     lambda: rmsnorm(np.ones((), np.float32), NW)),
    ("x 5-d", ValueError, "x must have 1 or 2 or 3 or 4 dimensions",
     lambda: rmsnorm(randn(1, 1, 1, 3, 64), NW)),
    ("x float64", TypeError, "x must have dtype float32, got float64",
     lambda: rmsnorm(NX.astype(np.float64), NW)),
    ("x non-contiguous", ValueError, "x must be C-contiguous",
     lambda: rmsnorm(randn(3, 128)[:, ::2], NW)),
    ("weight 2-d", ValueError, "weight must have 1 dimensions",
     lambda: rmsnorm(NX, randn(1, 64))),
    ("weight length", ValueError, r"weight must have shape \(64\), got \(63,\)",
     lambda: rmsnorm(NX, randn(63))),
    ("weight float64", TypeError, "weight must have dtype float32",
     lambda: rmsnorm(NX, NW.astype(np.float64))),
    ("eps zero", ValueError, "eps must be a positive number, got 0.0",
     lambda: rmsnorm(NX, NW, 0.0)),
    ("eps negative", ValueError, "eps must be a positive number",
     lambda: rmsnorm(NX, NW, -1e-6)),
    ("eps string", ValueError, "eps must be a positive number, got '1e-6'",
     lambda: rmsnorm(NX, NW, "1e-6")),
    ("eps None", ValueError, "eps must be a positive number, got None",
     lambda: rmsnorm(NX, NW, None)),
    ("eps nan", ValueError, "eps must be a positive number",
     lambda: rmsnorm(NX, NW, float("nan"))),
    ("out shape", ValueError, r"out must have shape \(3, 64\)",
     lambda: rmsnorm(NX, NW, out=randn(64, 3))),
    ("out dtype", TypeError, "out must have dtype float32",
     lambda: rmsnorm(NX, NW, out=NX.astype(np.float64))),
    ("out overlaps x", ValueError, "out overlaps x without being it",
     lambda: rmsnorm(NX_OVER, NW, out=NOUT_OVER)),
    ("weight not an array", TypeError, "weight must be an array, got list",
     lambda: rmsnorm(NX, NW.tolist())),
    ("host x, device weight", ValueError, MIX,
     lambda: rmsnorm(NX, FakeDeviceArray((64,)))),
    ("gate float64", TypeError, "gate must have dtype float32",
     lambda: silu_mul(G.astype(np.float64), U)),
    ("up int32", TypeError, "up must have dtype float32, got int32",
     lambda: silu_mul(G, U.astype(np.int32))),
    ("gate/up shapes", ValueError,
     r"gate and up must have the same shape, got \(3, 4\) and \(4, 3\)",
     lambda: silu_mul(G, randn(4, 3))),
    ("gate non-contiguous", ValueError, "gate must be C-contiguous",
     lambda: silu_mul(randn(3, 8)[:, ::2], U)),
    ("up non-contiguous", ValueError, "up must be C-contiguous",
     lambda: silu_mul(G, randn(4, 3).T)),
    ("silu out shape", ValueError, r"out must have shape \(3, 4\)",
     lambda: silu_mul(G, U, out=randn(12))),
    ("silu out dtype", TypeError, "out must have dtype float32",
     lambda: silu_mul(G, U, out=np.empty((3, 4)))),
    ("out overlaps gate", ValueError, "out overlaps gate without being it",
     lambda: silu_mul(G_OVER, U, out=GOUT_OVER)),
    ("out overlaps up", ValueError, "out overlaps up without being it",
     lambda: silu_mul(U, G_OVER, out=GOUT_OVER)),
    ("gate not an array", TypeError, "gate must be an array, got float",
     lambda: silu_mul(1.0, U)),
    ("host gate, device up", ValueError, MIX,
     lambda: silu_mul(G, FakeDeviceArray((3, 4)))),
]


# ---------------------------------------------------------------------------- masked_softmax

S = randn(2, 7, 9)
S_OVER, SOUT_OVER = shifted_views((2, 7, 9))

SOFTMAX_CASES = [
    ("scores 1-d", ValueError, r"scores must have 2 or 3 or 4 or 5 dimensions, got shape \(9,\)",
     lambda: masked_softmax(randn(9))),
    ("scores 6-d", ValueError, "scores must have 2 or 3 or 4 or 5",
     lambda: masked_softmax(randn(1, 1, 1, 2, 7, 9))),
    ("scores float64", TypeError, "scores must have dtype float32, got float64",
     lambda: masked_softmax(S.astype(np.float64))),
    ("scores non-contiguous", ValueError, "scores must be C-contiguous",
     lambda: masked_softmax(randn(2, 9, 7).transpose(0, 2, 1))),
    ("scale nan", ValueError, "scale must be a finite number, got nan",
     lambda: masked_softmax(S, scale=float("nan"))),
    ("scale inf", ValueError, "scale must be a finite number",
     lambda: masked_softmax(S, scale=float("inf"))),
    ("scale string", ValueError, "scale must be a finite number, got '0.1'",
     lambda: masked_softmax(S, scale="0.1")),
    ("scale None", ValueError, "scale must be a finite number",
     lambda: masked_softmax(S, scale=None)),
    ("mask wrong kv", ValueError,
     r"mask of shape \(7, 10\) does not broadcast to \(q_len, kv_len\) = \(7, 9\)",
     lambda: masked_softmax(S, mask=randn(7, 10))),
    ("mask wrong rows", ValueError, r"mask of shape \(2, 9\) does not broadcast",
     lambda: masked_softmax(S, mask=randn(2, 9))),
    ("mask 1-d wrong", ValueError, r"mask of shape \(7,\) does not broadcast",
     lambda: masked_softmax(S, mask=randn(7))),
    ("mask larger than scores", ValueError,
     r"mask of shape \(7, 9\) does not broadcast to \(q_len, kv_len\) = \(1, 9\)",
     lambda: masked_softmax(randn(1, 9), mask=randn(7, 9))),
    ("mask 3-d", ValueError, "mask must have 1 or 2 dimensions",
     lambda: masked_softmax(S, mask=randn(1, 7, 9))),
    ("mask float64", TypeError, "mask must have dtype float32",
     lambda: masked_softmax(S, mask=np.zeros((7, 9)))),
    ("mask bool", TypeError, "mask must have dtype float32, got bool",
     lambda: masked_softmax(S, mask=np.ones((7, 9), bool))),
    ("mask not an array", TypeError, "mask must be an array, got float",
     lambda: masked_softmax(S, mask=0.0)),
    ("out shape", ValueError, r"out must have shape \(2, 7, 9\)",
     lambda: masked_softmax(S, out=randn(7, 9))),
    ("out dtype", TypeError, "out must have dtype float32",
     lambda: masked_softmax(S, out=S.astype(np.float64))),
    ("out overlaps scores", ValueError, "out overlaps scores without being it",
     lambda: masked_softmax(S_OVER, out=SOUT_OVER)),
    ("host scores, device mask", ValueError, MIX,
     lambda: masked_softmax(S, mask=FakeDeviceArray((7, 9)))),
]


# ---------------------------------------------------------------------------- attention

Q, K, V = randn(7, 4, 16), randn(9, 2, 16, seed=1), randn(9, 2, 16, seed=2)
SQ, SK, SV = randn(7, 2, 16), randn(7, 2, 16, seed=1), randn(7, 2, 16, seed=2)   # out could be k, v
K_OVER, AOUT_OVER = shifted_views((7, 2, 16))

ATTENTION_CASES = [
    ("q 2-d", ValueError, r"q must have 3 or 4 dimensions, got shape \(7, 16\)",
     lambda: attention(randn(7, 16), K, V)),
    ("q 5-d", ValueError, "q must have 3 or 4 dimensions",
     lambda: attention(randn(1, 1, 7, 4, 16), K, V)),
    ("q float64", TypeError, "q must have dtype float32, got float64",
     lambda: attention(Q.astype(np.float64), K, V)),
    ("k float64", TypeError, "k must have dtype float32, float16, bfloat16, got float64",
     lambda: attention(Q, K.astype(np.float64), V)),
    ("k float32, v float16", ValueError, "k and v must match",
     lambda: attention(Q, K, V.astype(np.float16))),
    ("k rank differs from q", ValueError, "k must have 3 dimensions",
     lambda: attention(Q, K[None], V[None])),
    ("v rank differs from q", ValueError, "v must have 3 dimensions",
     lambda: attention(Q, K, V[None])),
    ("q non-contiguous", ValueError, "q must be C-contiguous",
     lambda: attention(randn(7, 8, 16)[:, ::2], K, V)),
    ("k non-contiguous", ValueError, "k must be C-contiguous",
     lambda: attention(Q, randn(9, 4, 16)[:, ::2], V)),
    ("v non-contiguous", ValueError, "v must be C-contiguous",
     lambda: attention(Q, K, randn(2, 9, 16).transpose(1, 0, 2))),
    ("k/v length mismatch", ValueError,
     r"k and v must match, got \(9, 2, 16\) float32 and \(8, 2, 16\) float32",
     lambda: attention(Q, K, V[:8])),
    ("k/v heads mismatch", ValueError, "k and v must match",
     lambda: attention(Q, K, randn(9, 4, 16))),
    ("batch mismatch", ValueError, r"q and k have different batch sizes: \[2\] and \[3\]",
     lambda: attention(randn(2, 7, 4, 16), randn(3, 9, 2, 16), randn(3, 9, 2, 16))),
    ("head_dim mismatch", ValueError, "q has head_dim 16 but k and v have 8",
     lambda: attention(Q, randn(9, 2, 8), randn(9, 2, 8))),
    ("heads not a multiple", ValueError,
     r"query heads \(6\) must be a multiple of key/value heads \(4\)",
     lambda: attention(randn(7, 6, 16), K[:, :1].repeat(4, 1), V[:, :1].repeat(4, 1))),
    ("more kv heads than q heads", ValueError,
     r"query heads \(2\) must be a multiple of key/value heads \(4\)",
     lambda: attention(randn(7, 2, 16), randn(9, 4, 16), randn(9, 4, 16))),
    ("zero kv heads", ValueError, r"must be a multiple of key/value heads \(0\)",
     lambda: attention(Q, np.zeros((9, 0, 16), np.float32), np.zeros((9, 0, 16), np.float32))),
    ("q_len 0", ValueError, "q_len and kv_len must be at least 1, got 0 and 9",
     lambda: attention(randn(0, 4, 16), K, V)),
    ("kv_len 0", ValueError, "q_len and kv_len must be at least 1, got 7 and 0",
     lambda: attention(Q, randn(0, 2, 16), randn(0, 2, 16))),
    ("scale nan", ValueError, "scale must be a finite number, got nan",
     lambda: attention(Q, K, V, scale=float("nan"))),
    ("scale -inf", ValueError, "scale must be a finite number",
     lambda: attention(Q, K, V, scale=-float("inf"))),
    ("scale string", ValueError, "scale must be a finite number",
     lambda: attention(Q, K, V, scale="0.25")),
    ("out is q", ValueError, "out must not be q",
     lambda: attention(SQ, SK, SV, out=SQ)),
    ("out is k", ValueError, "out must not be k or v",
     lambda: attention(SQ, SK, SV, out=SK)),
    ("out is v", ValueError, "out must not be k or v",
     lambda: attention(SQ, SK, SV, out=SV)),
    ("out overlaps k", ValueError, "out overlaps k without being it",
     lambda: attention(SQ, K_OVER, SV, out=AOUT_OVER)),
    ("out shape", ValueError, r"out must have shape \(7, 4, 16\), got \(7, 2, 16\)",
     lambda: attention(Q, K, V, out=randn(7, 2, 16))),
    ("out dtype", TypeError, "out must have dtype float32",
     lambda: attention(Q, K, V, out=Q.astype(np.float64))),
    ("k not an array", TypeError, "k must be an array, got list",
     lambda: attention(Q, K.tolist(), V)),
    ("host q, device k", ValueError, MIX,
     lambda: attention(Q, FakeDeviceArray((9, 2, 16)), V)),
    ("host q, device out", ValueError, MIX,
     lambda: attention(Q, K, V, out=FakeDeviceArray((7, 4, 16)))),
]


# ---------------------------------------------------------------------------- masks

MASK_CASES = [
    ("q_len 0", ValueError, "q_len must be a positive integer, got 0",
     lambda: causal_mask(0, 3)),
    ("kv_len negative", ValueError, "kv_len must be a positive integer, got -1",
     lambda: causal_mask(3, -1)),
    ("q_len float", ValueError, "q_len must be a positive integer, got 2.0",
     lambda: causal_mask(2.0, 3)),
    ("kv_len bool", ValueError, "kv_len must be a positive integer, got True",
     lambda: causal_mask(2, True)),
    ("bad device", ValueError, "device must be 'cpu' or 'cuda', got 'gpu'",
     lambda: causal_mask(2, 3, device="gpu")),
    ("max_entries 0", ValueError, "max_entries must be a positive integer, got 0",
     lambda: MaskCache(0)),
    ("max_entries float", ValueError, "max_entries must be a positive integer",
     lambda: MaskCache(2.5)),
    ("max_entries string", ValueError, "max_entries must be a positive integer",
     lambda: MaskCache("8")),
    ("get q_len 0", ValueError, "q_len must be a positive integer",
     lambda: MaskCache().get(0, 3)),
    ("get kv_len float", ValueError, "kv_len must be a positive integer",
     lambda: MaskCache().get(2, 3.5)),
    ("get bad device", ValueError, "device must be 'cpu' or 'cuda', got 'gpu'",
     lambda: MaskCache().get(2, 3, device="gpu")),
]


# ---------------------------------------------------------------------------- KVCache

def kv_append(layer=0, k=None, v=None, n_layers=2):
    cache = KVCache(n_layers, 8, 2, 16)
    k = randn(3, 2, 16) if k is None else k
    v = randn(3, 2, 16, seed=1) if v is None else v
    return cache.append(layer, k, v)


def kv_overflow():
    cache = KVCache(1, 8, 2, 16)
    cache.append(0, randn(6, 2, 16), randn(6, 2, 16))
    cache.append(0, randn(3, 2, 16), randn(3, 2, 16))


KV_CASES = [
    ("n_layers 0", ValueError, "n_layers must be a positive integer, got 0",
     lambda: KVCache(0, 8, 2, 16)),
    ("max_seq 0", ValueError, "max_seq must be a positive integer, got 0",
     lambda: KVCache(1, 0, 2, 16)),
    ("n_kv_heads negative", ValueError, "n_kv_heads must be a positive integer",
     lambda: KVCache(1, 8, -2, 16)),
    ("head_dim float", ValueError, "head_dim must be a positive integer",
     lambda: KVCache(1, 8, 2, 16.0)),
    ("bad device", ValueError, "device must be 'cpu' or 'cuda', got 'gpu'",
     lambda: KVCache(1, 8, 2, 16, device="gpu")),
    ("int16 cache", ValueError, "a cpu KV cache stores float32, float16, bfloat16, int8; got "
     "'int16'", lambda: KVCache(1, 8, 2, 16, dtype=np.int16)),
    ("layer negative", ValueError, r"layer must be an integer in \[0, 2\), got -1",
     lambda: kv_append(-1)),
    ("layer past the end", ValueError, r"layer must be an integer in \[0, 2\), got 2",
     lambda: kv_append(2)),
    ("layer float", ValueError, "layer must be an integer in",
     lambda: kv_append(1.0)),
    ("layer bool", ValueError, "layer must be an integer in",
     lambda: kv_append(True)),
    ("layer None", ValueError, "layer must be an integer in",
     lambda: kv_append(None)),
    ("k float64", TypeError, "k must have dtype float32, got float64",
     lambda: kv_append(k=randn(3, 2, 16).astype(np.float64))),
    ("v int32", TypeError, "v must have dtype float32, got int32",
     lambda: kv_append(v=np.ones((3, 2, 16), np.int32))),
    ("k 4-d", ValueError, "k must have 3 dimensions",
     lambda: kv_append(k=randn(1, 3, 2, 16))),
    ("k heads", ValueError, r"k must have shape \(\*, 2, 16\), got \(3, 4, 16\)",
     lambda: kv_append(k=randn(3, 4, 16))),
    ("v head_dim", ValueError, r"v must have shape \(\*, 2, 16\), got \(3, 2, 8\)",
     lambda: kv_append(v=randn(3, 2, 8))),
    ("k/v lengths", ValueError,
     r"k and v must have the same shape and dtype, got \(3, 2, 16\) float32 and "
     r"\(2, 2, 16\) float32",
     lambda: kv_append(v=randn(2, 2, 16))),
    ("k non-contiguous", ValueError, "k must be C-contiguous",
     lambda: kv_append(k=randn(3, 4, 16)[:, ::2])),
    ("k not an array", TypeError, "k must be an array, got list",
     lambda: kv_append(k=randn(3, 2, 16).tolist())),
    ("device arrays into a CPU cache", ValueError, "this KVCache lives on cpu; got cuda arrays",
     lambda: kv_append(k=FakeDeviceArray((3, 2, 16)), v=FakeDeviceArray((3, 2, 16)))),
    ("host k, device v", ValueError, MIX,
     lambda: kv_append(v=FakeDeviceArray((3, 2, 16)))),
    ("overflow", ValueError,
     r"KV cache full: layer 0 holds 6 of 8 positions and cannot take 3 more; reset\(\) it",
     kv_overflow),
]


ALL_CASES = (ROPE_CASES + TABLE_CASES + LINEAR_CASES + NORM_CASES + SOFTMAX_CASES + ATTENTION_CASES
             + MASK_CASES + KV_CASES)
GROUPS = (["apply_rope"] * len(ROPE_CASES) + ["RopeTable"] * len(TABLE_CASES)
          + ["linear"] * len(LINEAR_CASES) + ["norm"] * len(NORM_CASES)
          + ["masked_softmax"] * len(SOFTMAX_CASES) + ["attention"] * len(ATTENTION_CASES)
          + ["mask"] * len(MASK_CASES) + ["KVCache"] * len(KV_CASES))


@pytest.mark.parametrize("exc,match,call", [c[1:] for c in ALL_CASES],
                         ids=[f"{g}: {c[0]}" for g, c in zip(GROUPS, ALL_CASES)])
def test_validation(exc, match, call):
    with pytest.raises(exc, match=match):
        call()


def test_case_ids_are_unique():
    ids = [f"{g}: {c[0]}" for g, c in zip(GROUPS, ALL_CASES)]
    assert len(ids) == len(set(ids))


def test_errors_leave_out_untouched():
    """A call that fails validation writes nothing (a caller's buffer keeps its contents)."""
    out = randn(7, 4, 64)
    saved = out.copy()
    with pytest.raises(ValueError):
        apply_rope(X, TAB, 10, out=out)
    with pytest.raises(ValueError):
        attention(randn(7, 4, 64), randn(9, 3, 64), randn(9, 3, 64), out=out)
    np.testing.assert_array_equal(out, saved)
