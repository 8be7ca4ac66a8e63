"""CUDA flash attention (decode with key splits, prefill) against the float64 reference and the
CPU kernel: GQA 4/2 and 8/1, q_len < kv_len, seq 1, head dims that are not powers of two,
float16 and bfloat16 K/V, a batch axis, rows that see nothing."""
import zlib

import numpy as np
import pytest

from numba_attn.kernels import attention_cpu, attention_cuda, llvm_cpu
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn, rel_err, stored
from tests.reference import attention_ref

GPU = MODE == "gpu"

# (batch, q_len, kv_len, H, Hkv, d, causal): decode (q_len <= 4) and prefill
ATTN = [
    (1, 1, 37, 4, 2, 16, True),       # decode, GQA 4/2 (here 2 per group)
    (1, 1, 300, 8, 1, 16, True),      # decode, GQA 8/1, several key splits
    (2, 3, 50, 4, 1, 32, True),       # decode, 3 rows, batch 2
    (1, 2, 300, 4, 2, 32, True),      # decode, q_len < kv_len, key splits
    (2, 1, 600, 2, 2, 16, False),     # non-causal decode, splits, batch
    (1, 2, 9, 2, 2, 20, True),        # head dim 20: padded, scalar loads
    (1, 9, 9, 2, 1, 16, True),        # prefill
    (1, 7, 40, 2, 2, 32, True),       # prefill over a cached prefix
    (1, 12, 20, 1, 1, 24, True),      # prefill, head dim 24
    (1, 5, 5, 2, 2, 16, False),       # non-causal prefill
    (1, 6, 3, 2, 1, 16, True),        # q_len > kv_len: the first rows see nothing
    (1, 9, 9, 2, 1, 40, True),        # prefill, head dim 40 -> 64
    (1, 5, 66, 1, 1, 48, True),       # prefill, several key tiles, a cached prefix
]
ATTN_FULL = [
    (1, 1, 8192, 32, 32, 128, True),
    (1, 1, 8192, 32, 8, 128, True),
    (2, 1, 4097, 8, 1, 128, True),
    (1, 4, 3000, 32, 8, 128, True),
    (1, 1, 1000, 16, 16, 64, True),
    (1, 1, 513, 8, 2, 80, True),
    (1, 512, 512, 32, 8, 128, True),
    (1, 700, 900, 16, 16, 128, True),
    (2, 129, 1200, 8, 2, 64, True),
    (1, 300, 300, 8, 8, 128, False),
    (1, 77, 77, 4, 4, 256, True),
    (1, 200, 260, 4, 2, 96, True),
    (1, 1024, 1024, 4, 4, 128, True),
]


# the simulator is slow: 16-bit storage on a few cases; on a GPU each variant compiles once
# (seconds): every full-size case in float32, the head-dim-128 ones in 16-bit storage too
CASES = [(c, "f32") for c in ATTN] + [(ATTN[1], "f16"), (ATTN[2], "bf16"), (ATTN[5], "f16"),
                                      (ATTN[7], "bf16"), (ATTN[12], "f16")]
if GPU:
    CASES += [(c, t) for c in ATTN_FULL for t in ("f32", "f16", "bf16")
              if t == "f32" or (c[5] == 128 and c[1] in (1, 512))]


@pytest.mark.parametrize("case,kv_dtype", CASES)
def test_attention(case, kv_dtype, monkeypatch):
    B, ql, kl, H, Hkv, d, causal = case
    rng = np.random.default_rng(zlib.crc32(repr((case, kv_dtype)).encode()))
    q = randn(rng, B, ql, H, d)
    k, k64 = stored(randn(rng, B, kl, Hkv, d), kv_dtype)
    v, v64 = stored(randn(rng, B, kl, Hkv, d), kv_dtype)
    scale = 1 / np.sqrt(d)
    out = poisoned(q.shape)
    attention_cuda.attention(out, dev(q), dev(k), dev(v), scale, causal)
    got = out.copy_to_host()
    ref = attention_ref(q, k64, v64, causal=causal, scale=scale)
    assert rel_err(got, ref) < 1e-5
    assert np.abs(got - ref).max() < 1e-4
    if not GPU or ql * kl <= 10**6:       # the CPU twin, on the same stored K and V
        # its portable path: float32 products, as the CUDA kernel's (a host with AVX-512 BF16
        # takes decode's over a bfloat16 cache in bfloat16)
        monkeypatch.setattr(llvm_cpu, "CPU_PATH", "portable")
        cpu = np.empty_like(q)
        attention_cpu.attention(cpu, q, k, v, scale, causal)
        np.testing.assert_allclose(got, cpu, rtol=1e-4, atol=1e-5)


def test_decode_twice_same_workspace():
    # the split counters reset themselves: a second call on the same workspace is right too
    rng = np.random.default_rng(5)
    B, kl, H, Hkv, d = 1, 300, 4, 2, 16
    for _ in range(2):
        q, k, v = randn(rng, B, 1, H, d), randn(rng, B, kl, Hkv, d), randn(rng, B, kl, Hkv, d)
        out = poisoned(q.shape)
        attention_cuda.attention(out, dev(q), dev(k), dev(v), 0.25, True)
        assert rel_err(out.copy_to_host(), attention_ref(q, k, v, True, 0.25)) < 1e-5


# decode's other shapes (the tuned variants): 8, 16 or 32 head dims per lane (more or fewer
# lanes per key), 1 to 4 keys per lane group and step, loads pipelined or not
@pytest.mark.parametrize("dpl,keys,pipe", [(8, 1, False), (32, 1, False), (16, 2, False),
                                           (8, 4, False), (32, 2, False), (16, 1, True),
                                           (8, 2, True), (16, 4, True)])
@pytest.mark.parametrize("case,kv_dtype", [(ATTN[3], "f32"), (ATTN[2], "f16")] +
                         ([(ATTN_FULL[0], "f16"), (ATTN_FULL[3], "f32")] if GPU else []))
def test_decode_shapes(monkeypatch, dpl, keys, pipe, case, kv_dtype):
    monkeypatch.setattr(attention_cuda, "DECODE_SHAPE",
                        {key: (dpl, keys, bps, pipe) for key, (_, _, bps, _)
                         in attention_cuda.DECODE_SHAPE.items()})
    test_attention(case, kv_dtype, monkeypatch)


# decode's key splits with the GPU's constants (2 steps per split at least, one split up to 4
# steps in all) on a 132-SM H200: 32/8 heads, 2 row tiles per KV head, 2 blocks per SM
@pytest.mark.parametrize("kv_len,kpb,tiles,max_blocks,want", [
    (1, 64, 16, 264, 1), (256, 64, 16, 264, 1), (257, 64, 16, 264, 2),
    (1024, 64, 16, 264, 8), (8192, 64, 16, 264, 16), (32768, 64, 16, 264, 16),
    (32768, 32, 32, 396, 12), (1 << 20, 32, 1, 10 ** 6, attention_cuda.DEC_THREADS)])
def test_key_splits(kv_len, kpb, tiles, max_blocks, want):
    n, split_len = attention_cuda.key_splits(kv_len, kpb, tiles, max_blocks, 2, 4)
    assert n == want
    assert split_len % kpb == 0
    assert (n - 1) * split_len < kv_len <= n * split_len      # every key, no empty split
    assert n * tiles <= max(max_blocks, tiles)               # one wave
    assert n == 1 or split_len >= 2 * kpb
