"""The small tensor steps of the forward pass on the CPU (kernels/tensor_cpu.py through ops.py):
token embedding, elementwise add, splitting the fused q|k|v projection, and their validation."""
import numpy as np
import pytest

from numba_attn import ops
from numba_attn.kernels import tensor_cpu


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("seq,hidden,vocab", [(1, 8, 5), (3, 37, 11), (7, 300, 50)])
def test_embedding(seq, hidden, vocab):
    table = randn(vocab, hidden, seed=seq)
    tokens = np.random.default_rng(seq).integers(0, vocab, seq)
    got = ops.embedding(table, tokens)
    assert got.dtype == np.float32 and got.shape == (seq, hidden)
    np.testing.assert_array_equal(got, table[tokens])
    out = np.full((seq, hidden), np.nan, np.float32)
    assert ops.embedding(table, tokens, out=out) is out
    np.testing.assert_array_equal(out, table[tokens])


def test_embedding_kernel_clips_ids():
    table = randn(6, 4)
    out = np.empty((3, 4), np.float32)
    tensor_cpu.embedding(out, table, np.array([-2, 3, 9]))
    np.testing.assert_array_equal(out, table[[0, 3, 5]])


@pytest.mark.parametrize("shape", [(1,), (13,), (3, 37), (2, 4, 300)])
def test_add(shape):
    a, b = randn(*shape, seed=1), randn(*shape, seed=2)
    np.testing.assert_array_equal(ops.add(a, b), a + b)
    ref = a + b
    x = a.copy()
    assert ops.add(x, b, out=x) is x                 # in place into a (the residual stream)
    np.testing.assert_array_equal(x, ref)
    y = b.copy()
    assert ops.add(a, y, out=y) is y                 # in place into b
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("seq,heads,kv_heads,d", [(1, 4, 2, 16), (5, 4, 2, 16), (3, 6, 1, 24),
                                                   (9, 32, 8, 8)])
def test_split_qkv(seq, heads, kv_heads, d):
    qkv = randn(seq, (heads + 2 * kv_heads) * d, seed=seq)
    nq, nk = heads * d, kv_heads * d
    q, k, v = ops.split_qkv(qkv, heads, kv_heads)
    assert q.shape == (seq, heads, d) and k.shape == v.shape == (seq, kv_heads, d)
    for got, ref in ((q, qkv[:, :nq]), (k, qkv[:, nq:nq + nk]), (v, qkv[:, nq + nk:])):
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got.reshape(seq, -1), ref)
    bufs = (np.empty((seq, heads, d), np.float32), np.empty((seq, kv_heads, d), np.float32),
            np.empty((seq, kv_heads, d), np.float32))
    q2, k2, v2 = ops.split_qkv(qkv, heads, kv_heads, out=bufs)
    for got, buf, ref in zip((q2, k2, v2), bufs, (q, k, v)):
        np.testing.assert_array_equal(got, ref)
        # one row: views of qkv (no copy); more rows: the caller's buffers
        assert np.shares_memory(got, qkv) if seq == 1 else got is buf


@pytest.mark.parametrize("rows,width", [(4, 40), (411, 2560)], ids=["numpy", "parallel"])
def test_split_qkv_kernel(rows, width):
    """Both ways: NumPy's three copies, and rows on every core from SPLIT_PARALLEL_MIN."""
    assert (rows * width >= tensor_cpu.SPLIT_PARALLEL_MIN) == (rows > 4)
    qkv = randn(rows, width)
    nk = width // 5
    q, k, v = (np.full((rows, width - 2 * nk), np.nan, np.float32),
               np.full((rows, nk), np.nan, np.float32), np.full((rows, nk), np.nan, np.float32))
    tensor_cpu.split_qkv(q, k, v, qkv)
    np.testing.assert_array_equal(np.concatenate([q, k, v], axis=1), qkv)


TABLE = randn(10, 8)
IDS = np.array([1, 2, 3])
QKV = randn(3, 64)

CASES = [
    ("table rank", ValueError, "table must have 2 dimensions", lambda: ops.embedding(TABLE[0], IDS)),
    ("table dtype", TypeError, "table must have dtype float32, got float64",
     lambda: ops.embedding(TABLE.astype(np.float64), IDS)),
    ("ids dtype", TypeError, "tokens must have dtype int64, got int32",
     lambda: ops.embedding(TABLE, IDS.astype(np.int32))),
    ("ids rank", ValueError, "tokens must have 1 dimensions", lambda: ops.embedding(TABLE, IDS[None])),
    ("embedding out shape", ValueError, r"out must have shape \(3, 8\), got \(3, 9\)",
     lambda: ops.embedding(TABLE, IDS, out=np.empty((3, 9), np.float32))),
    ("embedding out overlaps", ValueError, "out overlaps table",
     lambda: ops.embedding(TABLE, IDS, out=TABLE[:3])),
    ("add shapes", ValueError, r"a and b must have the same shape, got \(3,\) and \(4,\)",
     lambda: ops.add(randn(3), randn(4))),
    ("add dtype", TypeError, "b must have dtype float32, got float64",
     lambda: ops.add(randn(3), np.zeros(3))),
    ("add out overlaps", ValueError, "out overlaps a",
     lambda: (lambda buf: ops.add(buf[1:], buf[:-1], out=buf[:-1]))(randn(5))),
    ("add non-contiguous", ValueError, "a must be C-contiguous",
     lambda: ops.add(randn(3, 4)[:, ::2], randn(3, 2))),
    ("mixed devices", ValueError, r"mix host \(NumPy\) and device \(CUDA\) arrays",
     lambda: ops.add(randn(3), _FakeDevice((3,)))),
    ("split width", ValueError, "qkv has 64 columns, not a multiple of n_heads \\+ 2 \\* n_kv_heads = 6",
     lambda: ops.split_qkv(QKV, 4, 1)),
    ("split heads", ValueError, "n_kv_heads must be a positive integer, got 0",
     lambda: ops.split_qkv(QKV, 4, 0)),
    ("split out", ValueError, "out must be a \\(q, k, v\\) tuple",
     lambda: ops.split_qkv(QKV, 2, 1, out=np.empty((3, 2, 16), np.float32))),
    ("split out shape", ValueError, r"out k must have shape \(3, 1, 16\)",
     lambda: ops.split_qkv(QKV, 2, 1, out=(np.empty((3, 2, 16), np.float32),
                                           np.empty((3, 2, 16), np.float32),
                                           np.empty((3, 1, 16), np.float32)))),
]


class _FakeDevice:
    def __init__(self, shape):
        self.shape, self.dtype = shape, np.dtype(np.float32)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False),
                                         "version": 3, "strides": None}


@pytest.mark.parametrize("name,exc,match,call", CASES, ids=[c[0] for c in CASES])
def test_validation(name, exc, match, call):
    with pytest.raises(exc, match=match):
        call()
