"""CUDA embedding, add and split_qkv (kernels/tensor_cuda.py) against their CPU twins, directly
and through ops.py's dispatch on device arrays."""
import numpy as np
import pytest
from numba import cuda

from numba_attn import ops
from numba_attn.kernels import tensor_cpu, tensor_cuda
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn, stored

GPU = MODE == "gpu"

# (seq, hidden, vocab): hidden past one block of threads and not a multiple of it, seq 1
EMBED = [(1, 8, 5), (3, 37, 11), (2, 300, 7)]
EMBED_FULL = [(512, 4096, 32000), (1, 2048, 128256)]


@pytest.mark.parametrize("st", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", EMBED + (EMBED_FULL if GPU else []))
def test_embedding(shape, st):
    seq, hidden, vocab = shape
    rng = np.random.default_rng(seq * 31 + hidden)
    table, values = stored(randn(rng, vocab, hidden), st)
    tokens = rng.integers(0, vocab, seq)
    tokens[0] = vocab - 1
    out = poisoned((seq, hidden))
    tensor_cuda.embedding(out, dev(table), dev(tokens))
    np.testing.assert_array_equal(out.copy_to_host(), values[tokens].astype(np.float32))
    if st == "f32":
        cpu = np.empty((seq, hidden), np.float32)
        tensor_cpu.embedding(cpu, table, tokens)
        np.testing.assert_array_equal(out.copy_to_host(), cpu)


def test_embedding_clips_ids_like_the_cpu():
    rng = np.random.default_rng(0)
    table, tokens = randn(rng, 6, 4), np.array([-2, 3, 9])
    out = poisoned((3, 4))
    tensor_cuda.embedding(out, dev(table), dev(tokens))
    cpu = np.empty((3, 4), np.float32)
    tensor_cpu.embedding(cpu, table, tokens)
    np.testing.assert_array_equal(out.copy_to_host(), cpu)


@pytest.mark.parametrize("n", [1, 13, 300] + ([4096, 2048 * 512 + 3] if GPU else []))
def test_add(n):
    rng = np.random.default_rng(n)
    a, b = randn(rng, n), randn(rng, n)
    out = poisoned((n,))
    tensor_cuda.add(out, dev(a), dev(b))
    np.testing.assert_array_equal(out.copy_to_host(), a + b)
    ad = dev(a)                                      # in place, the residual stream
    tensor_cuda.add(ad, ad, dev(b))
    np.testing.assert_array_equal(ad.copy_to_host(), a + b)


# (seq, nq, nk): blocks not a multiple of the block of threads, GQA widths, seq 1
SPLIT = [(1, 16, 8), (3, 24, 8), (2, 256, 64)]
SPLIT_FULL = [(512, 4096, 1024), (7, 4096, 4096)]


@pytest.mark.parametrize("shape", SPLIT + (SPLIT_FULL if GPU else []))
def test_split_qkv(shape):
    seq, nq, nk = shape
    qkv = randn(np.random.default_rng(nq), seq, nq + 2 * nk)
    q, k, v = poisoned((seq, nq)), poisoned((seq, nk)), poisoned((seq, nk))
    tensor_cuda.split_qkv(q, k, v, dev(qkv))
    cpu = [np.empty((seq, n), np.float32) for n in (nq, nk, nk)]
    tensor_cpu.split_qkv(*cpu, qkv)
    for got, ref in zip((q, k, v), cpu):
        np.testing.assert_array_equal(got.copy_to_host(), ref)


def test_ops_dispatch_device_arrays():
    """ops.embedding / add / split_qkv on device arrays run the CUDA kernels and return device
    arrays; one row of split_qkv is views, more rows fill the given buffers."""
    rng = np.random.default_rng(5)
    table, tokens = randn(rng, 9, 16), np.array([4, 0, 8])
    x = ops.embedding(dev(table), dev(tokens))
    assert hasattr(x, "copy_to_host")                # a device array
    np.testing.assert_array_equal(x.copy_to_host(), table[tokens])
    y = dev(table[:3])
    ops.add(x, y, out=x)                             # in place (ops returns a view of out)
    np.testing.assert_array_equal(x.copy_to_host(), table[tokens] + table[:3])

    heads, kv_heads, d = 2, 1, 8
    qkv = randn(rng, 3, (heads + 2 * kv_heads) * d)
    bufs = tuple(cuda.device_array((3, h, d), np.float32) for h in (heads, kv_heads, kv_heads))
    parts = ops.split_qkv(dev(qkv), heads, kv_heads, out=bufs)
    ref = ops.split_qkv(qkv, heads, kv_heads)
    for got, buf, r in zip(parts, bufs, ref):
        np.testing.assert_array_equal(buf.copy_to_host(), r)   # filled the given buffers
        np.testing.assert_array_equal(got.copy_to_host(), r)
    one = ops.split_qkv(dev(qkv[:1]), heads, kv_heads, out=bufs)
    for got, r in zip(one, ops.split_qkv(qkv[:1], heads, kv_heads)):
        assert got.shape == r.shape
        np.testing.assert_array_equal(got.copy_to_host(), r)
