"""The model on CUDA (weights, KV cache and buffers on the device) against the CPU model, on the
tiny random checkpoint of tests/tiny_model.py (hidden 64, 2 layers, 4 heads / 2 KV heads):
prefill and decode logits, greedy generation token for token, float16 weight storage, and
`numba-attn generate --device cuda`. Under the simulator every CUDA thread is a Python thread,
so the sequences are short there (5 prompt tokens, 3 decode steps) and the vocabulary small."""
import numpy as np
import pytest

from numba_attn.backend import is_cuda_array
from numba_attn.generation import generate
from numba_attn.model import Model, ModelWeights
from numba_attn.sampling import SamplingParams
from tests.cuda.conftest import MODE
from tiny_model import build_tiny_model

GPU = MODE == "gpu"
PROMPT_LEN, NEW_TOKENS = (40, 24) if GPU else (5, 4)   # NEW_TOKENS - 1 decode steps
VOCAB = None if GPU else 64        # the simulator: a small lm_head (None: the tokenizer's 300)
RTOL = 1e-4                        # max |cuda - cpu| relative to max |cpu|
GREEDY = SamplingParams(temperature=0)


pytestmark = pytest.mark.usefixtures("fast_simulator")   # many launches: tests/cuda/conftest.py


def assert_close(got, ref, rtol=RTOL):
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, type(got)
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max error {err:.3g}, scale {np.abs(ref).max():.3g}"


def run(model, prompt, max_tokens):
    """Greedy generation; (tokens, logits of every forward call as host copies)."""
    logits = []
    forward = model.forward

    def recording(tokens, start_pos=0):
        out = forward(tokens, start_pos)
        logits.append(np.array(out))
        return out

    model.forward = recording
    try:
        tokens = list(generate(model, prompt, max_tokens=max_tokens, sampling=GREEDY))
    finally:
        del model.forward
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


def test_weights_load_straight_to_the_device(folder):
    cfg = Model.from_pretrained(folder, max_seq=8).config
    host = ModelWeights.load(cfg, folder)
    half = ModelWeights.load(cfg, folder, device="cuda", weight_dtype="float16")
    assert half.device == "cuda" and half.weight_dtype == "float16"
    np.testing.assert_array_equal(half.layers[1].qkv_proj.copy_to_host(),
                                  host.layers[1].qkv_proj.astype(np.float16))
    np.testing.assert_array_equal(half.norm.copy_to_host(), host.norm)
    with pytest.raises(ValueError, match="weight_dtype must be one of float32, float16 on cuda"):
        Model.from_pretrained(folder, device="cuda", weight_dtype="bfloat16")
