"""Soak: many generations in one process keep resident memory flat, and a generation that runs
to the context limit stops with a clear message."""
import gc

import numpy as np
import pytest

from numba_attn.generation import GenerationStats, generate
from numba_attn.model import Model
from numba_attn.sampling import SamplingParams
from numba_attn.tokenizer import Tokenizer


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    pytest.skip("no /proc/self/status")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Memory, not speed, is measured here: one Numba thread keeps the many small kernel calls
    from waiting on a second thread when the machine's cores are busy with other work."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.fixture(scope="module")
def soak_model(tmp_path_factory):
    from tiny_model import build_tiny_model
    folder, _ = build_tiny_model(str(tmp_path_factory.mktemp("soak") / "m"), hidden=128,
                                 layers=2, heads=4, kv_heads=2, intermediate=320, max_pos=256,
                                 eos=None)
    return folder, Model.from_pretrained(folder)


def run_many(model, tokenizer, n, rng):
    texts = ["Once upon a time", "The quick brown fox " * 8, "héllo wörld " * 12, "Numba"]
    for i in range(n):
        ids = tokenizer.encode(texts[i % len(texts)])
        params = SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.2])),
                                top_k=int(rng.choice([0, 40])), top_p=0.9, min_p=0.05,
                                repeat_penalty=1.1, seed=i)
        stream = tokenizer.stream(ids)
        text = "".join(stream.step(t) for t in generate(model, ids, max_tokens=16,
                                                        sampling=params))
        assert isinstance(text, str)


def test_memory_flat_over_many_generations(soak_model):
    folder, model = soak_model
    tokenizer = Tokenizer(folder, model.config.bos_token_id)
    rng = np.random.default_rng(0)
    run_many(model, tokenizer, 8, rng)           # warm: kernels, buffers at their largest
    gc.collect()
    before = rss_kb()
    samples = []
    for _ in range(3):
        run_many(model, tokenizer, 12, rng)
        gc.collect()
        samples.append(rss_kb() - before)
    # one KV cache here is 256 KB and the prompt buffers ~0.4 MB: a per-generation leak of
    # either would add well over 10 MB over these 36 generations
    print("RSS growth after each round (KB):", samples)
    assert max(samples) < 2048, f"RSS grew by {samples} KB over 3 x 12 generations"
    assert samples[-1] - samples[0] < 1024, samples


def test_runs_to_the_context_limit_and_stops_cleanly(soak_model):
    _, model = soak_model
    stats = GenerationStats()
    prompt = np.arange(2, 42)
    out = list(generate(model, prompt, max_tokens=None,
                        sampling=SamplingParams(temperature=1.0, seed=3), stats=stats))
    assert len(out) == model.max_seq - len(prompt) == 216
    assert stats.stop_reason == "context"
    assert stats.message == ("stopped: the context of 256 tokens is full "
                             "(40 prompt + 216 generated)")
    assert model.position == model.max_seq - 1  # the last token was never fed back
    # the model is usable again right after
    assert len(list(generate(model, prompt, max_tokens=5))) == 5
