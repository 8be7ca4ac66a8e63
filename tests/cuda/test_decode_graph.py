"""The CUDA decode step (cuda_decode.py): the kernels reading their position from device memory
(`at`) against the same kernels given it by value, and the model's decode through the bound
step (a graph on the GPU; plain launches under the simulator, where graphs don't exist) against
the public ops path and the CPU model: logits and greedy tokens, across several split plans
of the attention, and after a reset."""
import numpy as np
import pytest
from numba import cuda

from numba_attn.cuda_decode import CudaDecoder, graphs_unavailable
from numba_attn.generation import generate
from numba_attn.kernels import attention_cuda, rope_cuda, tensor_cuda
from numba_attn.model import Model
from numba_attn.rope import RopeTable
from numba_attn.sampling import SamplingParams
from tests.cuda.conftest import MODE
from tests.cuda.helpers import dev, poisoned, randn
from tiny_model import build_tiny_model

GPU = MODE == "gpu"


def at(pos):
    return dev(np.array([pos], np.int64))


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("d", [8, 6])                 # 16-byte path and scalar path
def test_rope_position_read_on_the_device(style, d):
    rng = np.random.default_rng(d)
    table = RopeTable(d, 40)
    cos, sin = table.tables("cuda")
    x = dev(randn(rng, 1, 1, 3, d))
    fn = rope_cuda.rope_half if style == "half" else rope_cuda.rope_interleaved
    by_value, on_device = poisoned((1, 1, 3, d)), poisoned((1, 1, 3, d))
    fn(by_value, x, cos, sin, 29)
    fn(on_device, x, cos, sin, 0, at=at(29))
    np.testing.assert_array_equal(on_device.copy_to_host(), by_value.copy_to_host())
    fn(on_device, x, cos, sin, 0, at=at(3))          # another position: another result
    assert not np.array_equal(on_device.copy_to_host(), by_value.copy_to_host())


def test_append_kv_position_read_on_the_device():
    rng = np.random.default_rng(1)
    layers, max_seq, row = 2, 7, 12
    k_cache, v_cache = dev(randn(rng, layers * max_seq * row)), dev(randn(rng, layers * max_seq * row))
    want_k, want_v = k_cache.copy_to_host(), v_cache.copy_to_host()
    k, v = randn(rng, row), randn(rng, row)
    base = max_seq * row                             # layer 1
    tensor_cuda.append_kv(k_cache, v_cache, dev(k), dev(v), base, at=at(5), row=row)
    want_k[base + 5 * row:base + 6 * row], want_v[base + 5 * row:base + 6 * row] = k, v
    np.testing.assert_array_equal(k_cache.copy_to_host(), want_k)
    np.testing.assert_array_equal(v_cache.copy_to_host(), want_v)


# (H, Hkv, d, cache length, positions): GQA, a head dim under the padding, one key, keys
# spread over several splits of a plan made for the whole cache
ATTN = [(4, 2, 16, 64, [0, 9, 63]), (6, 2, 12, 40, [1, 20])]
ATTN_FULL = [(32, 4, 64, 2048, [0, 100, 1000, 2047]), (32, 8, 128, 4096, [5, 777, 4095])]


@pytest.mark.parametrize("case", ATTN + (ATTN_FULL if GPU else []))
def test_attention_length_read_on_the_device(case):
    H, Hkv, d, cap, positions = case
    rng = np.random.default_rng(cap)
    q = dev(randn(rng, 1, 1, H, d))
    k, v = dev(randn(rng, 1, cap, Hkv, d)), dev(randn(rng, 1, cap, Hkv, d))
    _, _, splits, counters, partials = attention_cuda.decode_plan(1, 1, H, Hkv, d, 4, cap)
    ws = attention_cuda.new_workspace(counters, partials)
    kh, vh = k.copy_to_host(), v.copy_to_host()
    for pos in positions:
        ref = poisoned((1, 1, H, d))
        attention_cuda.attention(ref, q, dev(kh[:, :pos + 1]), dev(vh[:, :pos + 1]),
                                 d ** -0.5, True)
        out = poisoned((1, 1, H, d))
        attention_cuda.attention(out, q, k, v, d ** -0.5, True, at=at(pos), splits=splits,
                                 workspace=ws)
        np.testing.assert_allclose(out.copy_to_host(), ref.copy_to_host(), rtol=2e-6,
                                   atol=2e-6)


# -- the model: decode through the bound step against the public path and the CPU ---------

PROMPT, STEPS = (40, 100) if GPU else (5, 3)   # GPU: keys 41..140, three split plans
VOCAB = None if GPU else 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = build_tiny_model(str(tmp_path_factory.mktemp("graph") / "llama"), vocab=VOCAB,
                               tokenizer=False, eos=None, max_pos=256)
    return path


def decode_logits(model, prompt, steps):
    """Greedy decode after the prompt: (tokens, logits of each decode step, host copies)."""
    logits = [np.array(model.forward(prompt, 0))]
    tokens = []
    for i in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(np.array(model.forward([tokens[-1]], len(prompt) + i)))
    return tokens, logits


def assert_close(got, ref, rtol=1e-4):
    err = np.abs(np.asarray(got, np.float64) - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max error {err:.3g}"


def test_decode_step_matches_public_path_and_cpu(folder):
    prompt = np.random.default_rng(3).integers(0, VOCAB or 300, PROMPT)
    cpu = Model.from_pretrained(folder, max_seq=256)
    gpu = Model.from_pretrained(folder, device="cuda", max_seq=256)
    assert isinstance(gpu.decoder, CudaDecoder)
    ref_tokens, ref_logits = decode_logits(cpu, prompt, STEPS)
    tokens, logits = decode_logits(gpu, prompt, STEPS)
    assert tokens == ref_tokens
    for got, ref in zip(logits, ref_logits):
        assert_close(got, ref)
    assert gpu.position == PROMPT + STEPS and gpu.cache.lengths == [gpu.position] * 2
    if GPU and graphs_unavailable() is None:
        assert gpu.decoder.why_plain is None, gpu.decoder.why_plain
        assert gpu.decoder.graphs
    # the public ops path (no bound step) gives the same logits
    decoder, gpu.decoder = gpu.decoder, None
    try:
        public_tokens, public_logits = decode_logits(gpu, prompt, STEPS)
    finally:
        gpu.decoder = decoder
    assert public_tokens == tokens
    for got, ref in zip(logits, public_logits):
        assert_close(got, ref, rtol=1e-6)
    # after a reset, a new sequence decodes the same through the graphs captured before
    gpu.reset()
    again_tokens, again_logits = decode_logits(gpu, prompt, STEPS)
    assert again_tokens == tokens
    np.testing.assert_array_equal(again_logits[-1], logits[-1])


@pytest.mark.skipif(not GPU, reason="graphs need the GPU")
def test_graph_and_plain_launches_agree(folder):
    """The captured step against the same bound kernels launched one by one, 64 greedy steps."""
    prompt = np.random.default_rng(4).integers(0, 300, 24)
    model = Model.from_pretrained(folder, device="cuda", max_seq=128)
    greedy = SamplingParams(temperature=0)
    graph_tokens = list(generate(model, prompt, max_tokens=64, sampling=greedy))
    assert model.decoder.graphs and model.decoder.why_plain is None
    graphs = model.decoder.graphs
    model.decoder.why_plain, model.decoder.graphs = "forced by the test", {}
    plain_tokens = list(generate(model, prompt, max_tokens=64, sampling=greedy))
    assert not model.decoder.graphs                  # nothing captured, nothing replayed
    assert graph_tokens == plain_tokens and graphs


@pytest.mark.skipif(not GPU, reason="graphs need the GPU")
def test_one_graph_per_split_plan(tmp_path):
    """Longer contexts take more key splits: a graph for each plan, each right."""
    path, _ = build_tiny_model(str(tmp_path / "wide"), heads=8, kv_heads=8, head_dim=64,
                               hidden=128, tokenizer=False, eos=None, max_pos=2048)
    cpu = Model.from_pretrained(path, max_seq=2048)
    gpu = Model.from_pretrained(path, device="cuda", max_seq=2048)
    prompt = np.random.default_rng(5).integers(0, 300, 1500)
    ref_tokens, ref_logits = decode_logits(cpu, prompt, 8)
    tokens, logits = decode_logits(gpu, prompt, 8)
    short_tokens, _ = decode_logits(gpu, prompt[:20], 8)
    assert len(gpu.decoder.graphs) >= 2, gpu.decoder.graphs.keys()
    assert tokens == ref_tokens
    for got, ref in zip(logits, ref_logits):
        assert_close(got, ref)


def test_decoder_buffers_are_its_own(folder):
    """A prefill longer than any before grows the model's buffers; the decode step keeps its
    own (a captured graph holds their addresses)."""
    model = Model.from_pretrained(folder, device="cuda", max_seq=64)
    before = model.decoder.buffers
    model.forward(np.arange(9) % (VOCAB or 300), 0)
    assert model.buffers.rows == 9 and model.decoder.buffers is before
    assert model.decoder.buffers.rows == 1


def test_capture_runs_on_this_steps_token_and_position(folder, monkeypatch):
    """A capture first runs the step as plain launches (to load every kernel); that run reads
    the token and position from the device, so they must be this step's, copied in before it
    (before the first step the device's copy is uninitialised: a stale position wrote keys
    and values out of place)."""
    model = Model.from_pretrained(folder, device="cuda", max_seq=64)
    decoder = model.decoder
    seen = []

    def capture(splits):      # records what the plain run would read; no graph: plain launches
        decoder.stream.synchronize()
        seen.append(tuple(int(v) for v in decoder.step_dev.copy_to_host()))
        return None
    monkeypatch.setattr(decoder, "_capture", capture)
    monkeypatch.setattr(decoder, "why_plain", None)
    prompt = np.arange(1, 6) % (VOCAB or 300)
    model.forward(prompt, 0)
    steps = [(7, 5), (11, 6), (13, 7)]
    for token, pos in steps:
        model.forward([token], pos)
    assert seen == steps
