"""The built-in demo model's golden check (tests/test_demo_golden.py, tests/data/demo_golden.json)
on CUDA: Model.from_pretrained(demo, device="cuda") reproduces the golden last-position logits
and greedy continuations.

On a GPU: every case, every golden token, with float32 and float16 weight storage (the demo
checkpoint is float16, so both hold the same values). Under the simulator (each CUDA thread a
Python thread; the demo's 4096-row lm_head alone is 512 blocks): one prompt's prefill, checked
against the golden logits and the first golden token. A missing demo model or golden file
fails with a message saying so: it is part of the package, not optional."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.cuda.conftest import MODE
from tests.test_demo_golden import DEMO, GOLDEN, REQUIRED_FILES, check_last_logits

GPU = MODE == "gpu"
# NUMBA_ATTN_DEMO_DIR / NUMBA_ATTN_DEMO_GOLDEN: check another export (e.g. a training smoke run)
DEMO = Path(os.environ.get("NUMBA_ATTN_DEMO_DIR", DEMO))
GOLDEN = Path(os.environ.get("NUMBA_ATTN_DEMO_GOLDEN", GOLDEN))
SIM_NEW_TOKENS = 1                 # golden tokens checked per prompt under the simulator
WEIGHT_DTYPES = ["float32", "float16"] if GPU else ["float32"]




@pytest.fixture(scope="module")
def golden():
    missing = [str(DEMO / f) for f in REQUIRED_FILES if not (DEMO / f).is_file()]
    if not GOLDEN.is_file():
        missing.append(str(GOLDEN))
    if missing:
        pytest.fail("the demo model or its golden data is missing: " + ", ".join(missing)
                    + " (written by tools/demo/train.py when training finishes)", pytrace=False)
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=WEIGHT_DTYPES)
def engine(request, golden):
    from numba_attn import Model
    return Model.from_pretrained(str(DEMO), device="cuda", weight_dtype=request.param)


@pytest.fixture(scope="module")
def prefill(engine, golden):
    """Logits of the last_logits case's prompt (a host copy): shared by both tests."""
    ids = np.array(golden["last_logits"]["prompt_ids"], dtype=np.int64)
    return np.array(engine.forward(ids, start_pos=0))


def test_engine_last_logits_cuda(prefill, golden):
    assert prefill.dtype == np.float32
    check_last_logits(prefill, golden)


def test_engine_greedy_cuda(engine, prefill, golden):
    first = golden["last_logits"]["case"]
    cases = range(len(golden["cases"])) if GPU else [first]
    n_new = golden["max_new_tokens"] if GPU else SIM_NEW_TOKENS
    for index in cases:
        case = golden["cases"][index]
        prompt = np.array(case["prompt_ids"], dtype=np.int64)
        # the simulator's single token is the prefill's argmax: reuse that prefill (minutes there)
        reuse = index == first and n_new == 1
        logits = prefill if reuse else np.asarray(engine.forward(prompt, start_pos=0))
        pos, out = len(prompt), []
        for step in range(n_new):
            tok = int(np.argmax(logits))
            out.append(tok)
            if step + 1 < n_new:
                logits = np.asarray(engine.forward(np.array([tok], dtype=np.int64),
                                                   start_pos=pos))
                pos += 1
        assert out == case["generated_ids"][:n_new], case["prompt"]
