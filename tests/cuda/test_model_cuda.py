"""The model on CUDA (weights, KV cache and buffers on the device) against the CPU model, on the
tiny random checkpoint of tests/tiny_model.py (hidden 64, 2 layers, 4 heads / 2 KV heads):
prefill and decode logits, greedy generation token for token, float16, bfloat16 and q8_0
weight storage (against the CPU model in the same format), and `numba-attn generate --device
cuda`. Under the simulator every CUDA thread is a Python thread,
so the sequences are short there (5 prompt tokens, 3 decode steps) and the vocabulary small."""
import ml_dtypes
import numpy as np
import pytest

from numba_attn.backend import is_cuda_array
from numba_attn.formats import Q8Matrix
from numba_attn.generation import generate
from numba_attn.kernels import llvm_cpu
from numba_attn.model import Model, ModelWeights
from numba_attn.sampling import SamplingParams
from tests.cuda.conftest import MODE
from tiny_model import build_tiny_model

GPU = MODE == "gpu"
PROMPT_LEN, NEW_TOKENS = (40, 24) if GPU else (5, 4)   # NEW_TOKENS - 1 decode steps
VOCAB = None if GPU else 64        # the simulator: a small lm_head (None: the tokenizer's 300)
RTOL = 1e-4                        # max |cuda - cpu| relative to max |cpu|
GREEDY = SamplingParams(temperature=0)




def assert_close(got, ref, rtol=RTOL):
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, type(got)
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max error {err:.3g}, scale {np.abs(ref).max():.3g}"


def run(model, prompt, max_tokens):
    """Greedy generation; (tokens, logits of every forward call as host copies). A CPU model
    runs its portable kernels: float32 products, as the CUDA kernels (the AMX and AVX-512 BF16
    prefill round x to bfloat16 on the hosts that have them)."""
    logits = []
    forward = model.forward

    def recording(tokens, start_pos=0):
        out = forward(tokens, start_pos)
        logits.append(np.array(out))
        return out

    model.forward = recording
    path = llvm_cpu.CPU_PATH
    if model.device == "cpu":
        llvm_cpu.CPU_PATH = "portable"
    try:
        tokens = list(generate(model, prompt, max_tokens=max_tokens, sampling=GREEDY))
    finally:
        del model.forward
        llvm_cpu.CPU_PATH = path
    return tokens, logits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = build_tiny_model(str(tmp_path_factory.mktemp("cuda") / "llama"), vocab=VOCAB,
                               tokenizer=False, eos=None)
    return path


@pytest.fixture(scope="module")
def prompt(folder):
    vocab = VOCAB or 300
    return np.random.default_rng(7).integers(0, vocab, PROMPT_LEN)


@pytest.fixture(scope="module")
def cpu_run(folder, prompt):
    return run(Model.from_pretrained(folder, max_seq=64), prompt, NEW_TOKENS)


@pytest.fixture(scope="module")
def cuda_model(folder):
    return Model.from_pretrained(folder, device="cuda", max_seq=64)


@pytest.fixture(scope="module")
def cuda_run(cuda_model, prompt):
    return run(cuda_model, prompt, NEW_TOKENS)


def test_everything_lives_on_the_device(cuda_model):
    m = cuda_model
    assert m.device == "cuda" and m.weight_dtype == "float32"
    assert all(is_cuda_array(a) for a in m.weights.arrays())
    assert is_cuda_array(m.cache.k) and is_cuda_array(m.cache.v)
    for name in ("x", "xb", "qkv", "q", "k", "v", "att", "gate", "up", "logits", "ids"):
        assert is_cuda_array(getattr(m.buffers, name)), name
    assert isinstance(m.buffers.logits_host, np.ndarray)


def test_prefill_logits_match_cpu(cpu_run, cuda_run):
    assert_close(cuda_run[1][0], cpu_run[1][0])


def test_decode_logits_match_cpu(cpu_run, cuda_run):
    assert len(cuda_run[1]) == len(cpu_run[1]) == NEW_TOKENS
    for got, ref in zip(cuda_run[1][1:], cpu_run[1][1:]):
        assert_close(got, ref)


def test_greedy_generation_matches_cpu(cpu_run, cuda_run):
    assert len(cuda_run[0]) == NEW_TOKENS
    assert cuda_run[0] == cpu_run[0]


def test_float16_weights(tmp_path):
    """weight_dtype="float16" stores the linear weights (and a tied embedding table, read by
    the embedding kernel) in half precision: the result is the CPU model's on the same
    rounded weights. Qwen2: q/k/v biases on the device too."""
    path, _ = build_tiny_model(str(tmp_path / "qwen2"), arch="Qwen2ForCausalLM", tie=True,
                               vocab=VOCAB, tokenizer=False, eos=None)
    cpu = Model.from_pretrained(path, max_seq=64)
    w = cpu.weights
    for a in [w.embed_tokens] + [getattr(lw, n) for lw in w.layers
                                 for n in ("qkv_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj")]:
        a[...] = a.astype(np.float16)                # round in place: the CPU reference
    gpu = Model(cpu.config, w, device="cuda", max_seq=64, weight_dtype="float16")
    assert gpu.weight_dtype == "float16"
    assert gpu.weights.lm_head is gpu.weights.embed_tokens        # still tied
    assert gpu.weights.embed_tokens.dtype == np.float16
    assert gpu.weights.norm.dtype == np.float32 and gpu.weights.layers[0].qkv_bias is not None
    assert gpu.weights.nbytes < 0.6 * w.nbytes
    tokens = np.arange(PROMPT_LEN) % cpu.config.vocab_size
    assert_close(gpu.forward(tokens, 0), cpu.forward(tokens, 0).astype(np.float64))
    assert_close(gpu.forward([3], PROMPT_LEN), cpu.forward([3], PROMPT_LEN).astype(np.float64))


def test_float16_kv_cache_matches_cpu(folder, prompt):
    """A float16 KV cache on the device (float32 keys and values rounded by the append
    kernel, read by the attention kernels as float16) against the CPU model's float16 cache."""
    cpu = Model.from_pretrained(folder, max_seq=64, kv_dtype="float16")
    gpu = Model.from_pretrained(folder, device="cuda", max_seq=64, kv_dtype="float16")
    assert gpu.kv_dtype == "float16" and gpu.cache.k.dtype == np.float16
    cpu_tokens, cpu_logits = run(cpu, prompt, NEW_TOKENS)
    gpu_tokens, gpu_logits = run(gpu, prompt, NEW_TOKENS)
    for got, ref in zip(gpu_logits, cpu_logits):
        assert_close(got, ref.astype(np.float64))
    assert gpu_tokens == cpu_tokens
    # the same float16 keys, but where the float32 values before rounding differ in their
    # last bits: one float16 step at most, or (a key near zero, its sums cancelling) some
    # float32 steps of the keys' scale
    ref = cpu.cache.k[:, :PROMPT_LEN].astype(np.float32)
    np.testing.assert_allclose(gpu.cache.k.copy_to_host()[:, :PROMPT_LEN].astype(np.float32),
                               ref, rtol=2.0 ** -10, atol=1e-5 * np.abs(ref).max())


def test_weights_load_straight_to_the_device(folder):
    cfg = Model.from_pretrained(folder, max_seq=8).config
    host = ModelWeights.load(cfg, folder)
    half = ModelWeights.load(cfg, folder, device="cuda", weight_dtype="float16")
    assert half.device == "cuda" and half.weight_dtype == "float16"
    np.testing.assert_array_equal(half.layers[1].qkv_proj.copy_to_host(),
                                  host.layers[1].qkv_proj.astype(np.float16))
    np.testing.assert_array_equal(half.norm.copy_to_host(), host.norm)
    with pytest.raises(ValueError, match="one of float32, bfloat16, float16, q8_0 on cuda"):
        Model.from_pretrained(folder, device="cuda", weight_dtype="int4")


# -- bfloat16 and q8_0: the CUDA model against the CPU model in the same format -------------

# bfloat16 on the Llama checkpoint; q8_0 on a tied Qwen2 one (the lm_head is the embedding
# table, read by both kernel kinds; q/k/v biases)
FORMAT_CASES = {"bfloat16": {}, "q8_0": {"arch": "Qwen2ForCausalLM", "tie": True}}


@pytest.fixture(scope="module", params=list(FORMAT_CASES))
def format_models(request, tmp_path_factory):
    """(format, checkpoint folder, CPU model, CUDA model), both models in the format."""
    fmt = request.param
    path, _ = build_tiny_model(str(tmp_path_factory.mktemp(fmt) / "model"), vocab=VOCAB,
                               tokenizer=False, eos=None, **FORMAT_CASES[fmt])
    cpu = Model.from_pretrained(path, max_seq=64, weight_dtype=fmt, kv_dtype="float32")
    gpu = Model.from_pretrained(path, device="cuda", max_seq=64, weight_dtype=fmt)
    assert gpu.kv_dtype == "float32"                  # CUDA's "auto"
    return fmt, path, cpu, gpu


def host_copy(w):
    """A device weight's bytes on the host: a Q8Matrix's (codes, scales), an array's values."""
    if isinstance(w, Q8Matrix):
        h = w.copy_to_host()
        return h.qs, h.d
    return (w.copy_to_host(),)


def assert_same_weights(dw, hw):
    """Device weights dw hold hw's bytes (bfloat16 as its bits), matrix for matrix."""
    for name, d, h in [("embed_tokens", dw.embed_tokens, hw.embed_tokens),
                       ("lm_head", dw.lm_head, hw.lm_head), ("norm", dw.norm, hw.norm)] + \
            [(f"{i}.{k}", getattr(dl, k), getattr(hl, k))
             for i, (dl, hl) in enumerate(zip(dw.layers, hw.layers)) for k in vars(hl)
             if getattr(hl, k) is not None]:
        want = (h.qs, h.d) if isinstance(h, Q8Matrix) else \
            (h.view(np.uint16) if h.dtype == np.dtype(ml_dtypes.bfloat16) else h,)
        for got, ref in zip(host_copy(d), want):
            assert got.dtype == ref.dtype, name
            np.testing.assert_array_equal(got, ref, err_msg=name)


def test_formats_stored_on_the_device(format_models):
    fmt, path, cpu, gpu = format_models
    dw, hw = gpu.weights, cpu.weights
    assert gpu.weight_dtype == dw.weight_dtype == cpu.weight_dtype == fmt
    assert dw.nbytes == hw.nbytes and dw.bytes_per_token == hw.bytes_per_token
    matrices = [dw.embed_tokens, dw.lm_head] + [getattr(lw, k) for lw in dw.layers
                                                for k in ("qkv_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj")]
    for m in matrices:
        if fmt == "q8_0":
            assert isinstance(m, Q8Matrix) and m.device == "cuda"
        else:     # bfloat16 on the GPU: a uint16 device array of its bits
            assert is_cuda_array(m) and m.dtype == np.uint16
    assert is_cuda_array(dw.norm) and dw.norm.dtype == np.float32
    assert (dw.lm_head is dw.embed_tokens) == (fmt == "q8_0")        # tied stays tied
    assert_same_weights(dw, hw)
    # host weights to the GPU: in their own format by default (Model(..., device="cuda")),
    # or converted on the host from float32 weights; the same bytes as loading straight there
    assert_same_weights(hw.to_device(), hw)
    f32 = ModelWeights.load(cpu.config, path)
    moved = Model(cpu.config, f32, device="cuda", max_seq=8, weight_dtype=fmt).weights
    assert moved.weight_dtype == fmt and (moved.lm_head is moved.embed_tokens) == (fmt == "q8_0")
    assert_same_weights(moved, hw)


def test_formats_match_cpu(format_models):
    """Prefill and decode logits, and the greedy tokens, of the CUDA model against the CPU
    model on the same stored weights (q8_0: both quantize x per 32 values the same way)."""
    fmt, _, cpu, gpu = format_models
    prompt = np.random.default_rng(11).integers(0, cpu.config.vocab_size, PROMPT_LEN)
    cpu_tokens, cpu_logits = run(cpu, prompt, NEW_TOKENS)
    gpu_tokens, gpu_logits = run(gpu, prompt, NEW_TOKENS)
    assert len(gpu_logits) == len(cpu_logits) == NEW_TOKENS     # prefill + decode steps
    for got, ref in zip(gpu_logits, cpu_logits):
        assert_close(got, ref.astype(np.float64))
    assert gpu_tokens == cpu_tokens
