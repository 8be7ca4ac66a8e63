"""y = x @ w.T + bias and the embedding lookup on the GPU for 16-bit float weights, bfloat16 and
float16. Twin of linear_bf16_cpu.py (which takes both formats too).

On the host a bfloat16 weight is a NumPy array of ``ml_dtypes.bfloat16``; on the device it
travels as its raw bits, a uint16 array (numba has no bfloat16 type: the formats table's
device_storage), which formats.to_device or `to_device` here makes.
bfloat16 is a storage type of the float16 path already: linear_cuda's GEMV and GEMM and
tensor_cuda's embedding take uint16 bits as bfloat16, widened in registers by util_cuda's
load8 / load (bits << 16: a float32 with its low half zero), with float16's block shapes
(GEMV_SHAPE by item size). So this family is that path, named as the CPU's: no second copy of
the kernels."""
import numpy as np
from numba import cuda

from . import linear_cuda, tensor_cuda


def bits(w):
    """A device array of 16-bit weights as the kernels take it: float16 as it is, bfloat16 as
    its uint16 bits (a view; uint16 arrays as they are)."""
    if w.dtype in (np.uint16, np.float16):
        return w
    if w.dtype.itemsize != 2:
        raise TypeError(f"expected bfloat16 (uint16 bits) or float16 weights, got {w.dtype}")
    return w.view(np.uint16)


def to_device(w, stream=0):
    """A host 16-bit weight copied to the GPU: float16 as it is, bfloat16 (ml_dtypes.bfloat16,
    or its uint16 bits) as uint16 bits."""
    w = np.ascontiguousarray(w)
    return cuda.to_device(w if w.dtype in (np.uint16, np.float16) else w.view(np.uint16),
                          stream=stream)


def linear(out, x, w, bias, *, stream=0):
    # x: (m, k) float32; w: (n, k) bfloat16 bits (uint16) or float16; bias: (n,) or (0,);
    # out: (m, n) float32. x stays float32 at every m (the CPU's BF16 prefill rounds x to
    # bfloat16 where the CPU has AVX-512 BF16)
    linear_cuda.linear(out, x, bits(w), bias, stream=stream)


def embedding(out, table, tokens, *, stream=0):
    # out: (seq, hidden) float32; table: (vocab, hidden) bfloat16 bits (uint16) or float16;
    # tokens: (seq,) int64, clipped to [0, vocab)
    tensor_cuda.embedding(out, bits(table), tokens, stream=stream)
