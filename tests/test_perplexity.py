"""Perplexity: the windows, the score against a float64 reference forward, the CLI command."""
import json
import os

import numpy as np
import pytest

from numba_attn.model import Model
from numba_attn.perplexity import perplexity, token_logprobs, windows
from test_cli import assert_one_line_error, invoke
from test_model import ref_forward


def ref_perplexity(cfg, w, ids, context):
    nll, n = 0.0, 0
    for start in range(0, len(ids), context):
        win = ids[start:start + context]
        if len(win) < 2:
            continue
        z = ref_forward(cfg, w, win)[:-1]                        # (len - 1, vocab) float64
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(win) - 1), win[1:]].sum()
        n += len(win) - 1
    return np.exp(nll / n), n


def test_windows_cover_every_token_once():
    assert windows(45, 16) == [(0, 16), (16, 32), (32, 45)]
    assert windows(33, 16) == [(0, 16), (16, 32)]               # a lone last token scores nothing
    assert windows(2, 16) == [(0, 2)]


def test_token_logprobs_is_log_softmax():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, 5)
    z = logits.astype(np.float64)
    expect = z[np.arange(5), targets] - np.log(np.exp(z).sum(1))
    np.testing.assert_allclose(token_logprobs(logits, targets), expect, rtol=1e-12)


@pytest.mark.parametrize("n, context", [(45, 16), (33, 16), (70, 70), (130, 100)])
def test_perplexity_matches_float64_reference(make_folder, n, context):
    folder, w = make_folder(f"ppl{n}_{context}", max_pos=128, kv_heads=2)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    model = Model.from_pretrained(folder)
    ids = np.random.default_rng(n).integers(0, cfg["vocab_size"], n)
    got = perplexity(model, ids, context=min(context, model.max_seq))
    ref, scored = ref_perplexity(cfg, w, ids, min(context, model.max_seq))
    assert got.scored_tokens == scored
    np.testing.assert_allclose(got.perplexity, ref, rtol=2e-6)   # float32 logits, ~1e-7 each
    assert model.position == 0                                   # the cache is left empty


def test_all_logits_rows_equal_last_position_logits(tiny_model):
    ids = np.array([1, 40, 7, 99, 23, 5, 61], np.int64)
    every = tiny_model.forward(ids, 0, all_logits=True)
    for i in range(1, len(ids) + 1):
        last = tiny_model.forward(ids[:i], 0)
        np.testing.assert_allclose(every[i - 1], last, rtol=1e-5, atol=1e-5)


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="context must be 2 to"):
        perplexity(tiny_model, np.arange(10), context=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_model, [3])


def test_cli_perplexity(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a model. " * 12, encoding="utf-8")
    result = invoke("perplexity", str(text), "--model", tiny_folder, "--context", "32")
    assert result.exit_code == 0, result.output
    model = Model.from_pretrained(tiny_folder, max_seq=32)
    from numba_attn.tokenizer import Tokenizer
    ids = Tokenizer(tiny_folder, model.config.bos_token_id).encode(text.read_text())
    expect = perplexity(model, ids)
    assert result.stdout.startswith(f"perplexity {expect.perplexity:.4f} over "
                                    f"{expect.scored_tokens} tokens")


def test_cli_perplexity_kv_dtype(tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a model. " * 12, encoding="utf-8")
    result = invoke("perplexity", str(text), "--model", tiny_folder, "--context", "32",
                    "--kv-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "float32 weights, bfloat16 KV cache)" in result.stdout
    from numba_attn.tokenizer import Tokenizer
    model = Model.from_pretrained(tiny_folder, max_seq=32, kv_dtype="bfloat16")
    ids = Tokenizer(tiny_folder, model.config.bos_token_id).encode(text.read_text())
    assert result.stdout.startswith(f"perplexity {perplexity(model, ids).perplexity:.4f} over ")
    assert_one_line_error(invoke("perplexity", str(text), "--model", tiny_folder,
                                 "--kv-dtype", "float8"), "'--kv-dtype'")


def test_cli_perplexity_bad_input(tiny_folder, tmp_path):
    assert_one_line_error(invoke("perplexity", str(tmp_path / "none.txt"), "--model",
                                 tiny_folder), "text file not found")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe\x00")
    assert_one_line_error(invoke("perplexity", str(binary), "--model", tiny_folder),
                          "is not UTF-8 text")
    text = tmp_path / "t.txt"
    text.write_text("hello there", encoding="utf-8")
    assert_one_line_error(invoke("perplexity", str(text), "--model", tiny_folder, "--context",
                                 "1"), "'--context'")
    assert_one_line_error(invoke("perplexity", str(text), "--model", tiny_folder, "--context",
                                 "100000"), "context")
