"""GGUF files as a model source: tiny random models written as llama.cpp's converter writes
them (tests/gguf_file.py) give the logits of the same model loaded from its Hugging Face folder,
in every type the engine keeps as it is (F32, F16, BF16, Q8_0) and in quantized types it
dequantizes at load (Q4_0, Q4_K, Q6_K); the converter's Q/K row permutation is undone; damaged,
foreign and unsupported files are refused with one clean error, before anything loads."""
import os
import warnings

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_file import permute, write_gguf
from numba_attn import Q8Matrix, Tokenizer, cli
from numba_attn.config import ConfigError
from numba_attn.model import Model
from numba_attn.weights import CheckpointError, LoadNotice
from tiny_model import LLAMA3_SCALING, write_safetensors

IDS = np.array([0, 5, 17, 42, 7, 99, 3, 250, 11, 64, 128, 2])


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)   # click 8.1
    except TypeError:
        runner = CliRunner()                   # click >= 8.2: stderr kept apart
    return runner.invoke(cli.main, [str(a) for a in args])


def logits(model, ids=IDS):
    """Prefill logits of every position, and one decode step after them."""
    full = model.forward(ids, 0, all_logits=True)
    step = model.forward(np.array([9]), len(ids)).copy()
    return np.vstack([full, step])


def load_quietly(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Model.from_pretrained(path, **kw)
    return model, [str(w.message) for w in caught if issubclass(w.category, LoadNotice)]


# model variants: build_tiny_model kwargs
VARIANTS = {
    "llama-gqa": {},
    "llama-tied-headdim": {"tie": True, "head_dim": 24},
    "llama-biases-llama3-rope": {"attention_bias": True, "rope_scaling": LLAMA3_SCALING},
    "llama-linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "qwen2-tied": {"arch": "Qwen2ForCausalLM", "tie": True},
    "mistral": {"arch": "MistralForCausalLM", "kv_heads": 1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_file_gives_the_folders_logits(make_folder, tmp_path, variant):
    folder, _ = make_folder(variant, **VARIANTS[variant])
    path = tmp_path / f"{variant}.gguf"
    write_gguf(folder, path, "F32")
    hf = Model.from_pretrained(folder)
    model, notices = load_quietly(path)
    assert not notices and model.weight_dtype == "float32"
    c, h = model.config, hf.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                "n_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "qkv_bias", "o_bias", "bos_token_id", "eos_token_ids", "max_context"):
        assert getattr(c, key) == getattr(h, key), key
    if variant == "llama-biases-llama3-rope":                  # rope_freqs, as the converter
        assert c.rope_scaling["rope_type"] == "freq_factors"
        np.testing.assert_allclose(model.rope.cos, hf.rope.cos, atol=2e-6)
    np.testing.assert_allclose(logits(model), logits(hf), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("file_type, dtype", [("F16", "float16"), ("BF16", "bfloat16")])
def test_16_bit_files_keep_their_type(make_folder, tmp_path, file_type, dtype):
    """A float16 / bfloat16 file loads as it is: the folder of the same checkpoint type gives
    the same weights bit for bit and the same logits."""
    folder, _ = make_folder(dtype, dtype=dtype, arch="Qwen2ForCausalLM")
    path = tmp_path / f"m-{file_type}.gguf"
    write_gguf(folder, path, file_type)
    hf = Model.from_pretrained(folder)
    model, _ = load_quietly(path)
    assert model.weight_dtype == hf.weight_dtype == dtype
    for a, b in zip(model.weights.arrays(), hf.weights.arrays()):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    np.testing.assert_array_equal(logits(model), logits(hf))


def test_q8_0_file_is_used_without_requantizing(make_folder, tmp_path):
    """The gguf package's Q8_0 blocks become our Q8Matrix as they are (Q/K rows put back in
    place, block by block): equal to quantizing the float32 folder at load, and within Q8_0's
    error of float32."""
    folder, w = make_folder("q8", layers=3)
    path = tmp_path / "m-q8_0.gguf"
    write_gguf(folder, path, "Q8_0")
    model, notices = load_quietly(path)
    assert not notices and model.weight_dtype == "q8_0"
    ours = Model.from_pretrained(folder, weight_dtype="q8_0")
    for a, b in zip(model.weights.arrays(), ours.weights.arrays()):
        if isinstance(a, Q8Matrix):
            np.testing.assert_array_equal(a.qs, b.qs)
            np.testing.assert_array_equal(a.d, b.d)
        else:
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logits(model), logits(ours))
    f32 = logits(Model.from_pretrained(folder))
    assert np.abs(logits(model) - f32).max() < 0.05 * np.abs(f32).max()
    # the file's blocks themselves (token_embd is not permuted)
    raw = gguf.GGUFReader(path).tensors
    embd = next(t for t in raw if t.name == "token_embd.weight").data
    assert bytes(embd[3, :2]) == model.weights.embed_tokens.d[3, :1].tobytes()
    # the same file read as float32: the blocks' values
    as_f32, _ = load_quietly(path, weight_dtype="float32")
    for a, b in zip(as_f32.weights.arrays(), model.weights.arrays()):
        np.testing.assert_array_equal(a, b.dequantize() if isinstance(b, Q8Matrix) else b)


def test_qk_permutation_is_undone(make_folder, tmp_path):
    """The file holds the converter's permuted Q and K rows (and biases); the model gets the
    Hugging Face rows back. A file written without the permutation (as if its rope were
    half-split) loads into a different model."""
    folder, w = make_folder("perm", attention_bias=True)
    path = tmp_path / "perm.gguf"
    write_gguf(folder, path, "F32")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    q = w["model.layers.1.self_attn.q_proj.weight"]
    kb = w["model.layers.1.self_attn.k_proj.bias"]
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"].data, permute(q, 4))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.bias"].data, permute(kb, 2))
    assert not np.array_equal(permute(q, 4), q)
    model, _ = load_quietly(path)
    hf = Model.from_pretrained(folder)
    c = model.config
    np.testing.assert_array_equal(model.weights.layers[1].qkv_proj[:c.q_dim], q)
    np.testing.assert_array_equal(model.weights.layers[1].qkv_bias[c.q_dim:c.q_dim + c.kv_dim],
                                  kb)
    np.testing.assert_allclose(logits(model), logits(hf), rtol=1e-5, atol=1e-5)
    unpermuted = tmp_path / "unpermuted.gguf"
    write_gguf(folder, unpermuted, "F32", permute_qk=False)
    wrong, _ = load_quietly(unpermuted)
    assert np.abs(logits(wrong) - logits(hf)).max() > 1e-2


def q_k_blocks(kind, rows, cols, rng):
    """Random but valid Q4_K / Q6_K bytes (rows, cols) with weights of size ~1/sqrt(cols): the
    gguf package cannot quantize k-quants, so the test writes blocks and dequantizes them."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.float16(1.0 / np.sqrt(cols) / (15 * 63 if kind == "Q4_K" else 32 * 127))
    scale_bytes = np.frombuffer(scale.tobytes(), np.uint8)
    if kind == "Q4_K":                        # d, dmin, 12 bytes of 6-bit scales and mins, qs
        data[..., 0:2] = scale_bytes
        data[..., 2:4] = scale_bytes
    else:                                     # Q6_K: ql, qh, 16 int8 scales, d last
        data[..., 208:210] = scale_bytes
    return data.reshape(rows, -1)


def test_k_quants_are_dequantized_into_q8_0(make_folder, tmp_path):
    """A file of mostly quantized types (Q4_0, Q4_K, Q5_1, Q6_K; one Q8_0 and one F16 tensor):
    auto keeps q8_0 with one notice; the weights are the file's dequantized values, as a
    float32 folder of them gives."""
    folder, w = make_folder("kq", hidden=256, intermediate=256, heads=4, kv_heads=2)
    rng = np.random.default_rng(1)
    raw = {"model.layers.0.mlp.up_proj.weight": (q_k_blocks("Q4_K", 256, 256, rng), "Q4_K"),
           "model.layers.1.mlp.down_proj.weight": (q_k_blocks("Q6_K", 256, 256, rng), "Q6_K"),
           "model.layers.1.self_attn.o_proj.weight": (q_k_blocks("Q4_K", 256, 256, rng),
                                                      "Q4_K")}
    types = {"model.layers.1.self_attn.k_proj.weight": "Q5_1", "lm_head.weight": "Q8_0",
             "model.layers.0.self_attn.v_proj.weight": "F16"}
    path = tmp_path / "kq.gguf"
    stored = write_gguf(folder, path, "Q4_0", types=types, raw=raw)
    reference = tmp_path / "kq-dequantized"
    os.makedirs(reference)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        with open(os.path.join(folder, name), "rb") as src, \
                open(reference / name, "wb") as dst:
            dst.write(src.read())
    write_safetensors(str(reference), stored)
    model, notices = load_quietly(path)
    assert model.weight_dtype == "q8_0"
    assert notices == ["kq.gguf: 14 tensors in Q4_0, Q4_K, Q5_1, Q6_K dequantized at load "
                       "(stored as q8_0)"]
    np.testing.assert_array_equal(logits(model),
                                  logits(Model.from_pretrained(reference, weight_dtype="q8_0")))
    as_f32, notices = load_quietly(path, weight_dtype="float32")
    assert notices == [notices[0]] and "stored as float32" in notices[0]
    np.testing.assert_allclose(logits(as_f32), logits(Model.from_pretrained(reference)),
                               rtol=1e-5, atol=1e-5)


def test_tokenizer_and_generation_from_the_file(tiny_folder, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_folder, path, "F32", chat_template="{{ messages[0]['content'] }}")
    hf_tok, tok = Tokenizer(tiny_folder, 0), Tokenizer(path)
    text = "Once upon a time, héllo wörld 123 ✓"
    assert tok.encode(text) == hf_tok.encode(text) and tok.chat_template.startswith("{{")
    result = invoke("generate", text, "--model", path, "--max-tokens", 6, "--temperature", 0)
    expect = invoke("generate", text, "--model", tiny_folder, "--max-tokens", 6,
                    "--temperature", 0)
    assert result.exit_code == 0 and result.stdout == expect.stdout


def test_cli_prints_the_dequantize_notice_in_one_line(make_folder, tmp_path):
    folder, _ = make_folder("q40")
    path = tmp_path / "q4_0.gguf"
    write_gguf(folder, path, "Q4_0")
    result = invoke("generate", "hi", "--model", path, "--max-tokens", 2)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == ["note: q4_0.gguf: 16 tensors in Q4_0 dequantized at load (stored as "
                     "q8_0)"]


# -- refused files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    from tiny_model import build_tiny_model
    base = tmp_path_factory.mktemp("gguf")
    folder, _ = build_tiny_model(str(base / "m"))
    path = base / "good.gguf"
    write_gguf(folder, path, "Q8_0")
    return folder, path


def damaged(good_file, tmp_path, how):
    data = open(good_file[1], "rb").read()
    path = tmp_path / f"{how}.gguf"
    if how == "truncated":
        data = data[:-1000]
    elif how == "cut-in-header":
        data = data[:3000]
    elif how == "corrupt-header":
        data = data[:8] + b"\xff" * 64 + data[72:]
    elif how == "empty":
        data = b""
    elif how == "not-gguf":
        data = b'{"architectures": ["LlamaForCausalLM"]}'
    open(path, "wb").write(data)
    return path


@pytest.mark.parametrize("how, error, match", [
    ("truncated", CheckpointError, "corrupt or truncated GGUF file"),
    ("cut-in-header", CheckpointError, "corrupt or truncated GGUF file"),
    ("corrupt-header", CheckpointError, "corrupt or truncated GGUF file"),
    ("empty", CheckpointError, "is not a GGUF file"),
    ("not-gguf", CheckpointError, "is not a GGUF file"),
])
def test_damaged_files_are_refused(good_file, tmp_path, how, error, match):
    path = damaged(good_file, tmp_path, how)
    with pytest.raises(error, match=match) as e:
        Model.from_pretrained(path)
    assert "\n" not in str(e.value)
    assert_cli_one_line_error(path)


def assert_cli_one_line_error(path):
    result = invoke("generate", "hi", "--model", path)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ")
    assert "Traceback" not in result.output


def test_foreign_and_unsupported_files_are_refused(good_file, tmp_path):
    folder, _ = good_file
    cases = [
        ({"arch": "gpt2"}, ConfigError, "unsupported GGUF architecture 'gpt2'; supported: "
                                        "llama, qwen2"),
        ({"metadata": {"llama.expert_count": 8}}, ConfigError, "mixture-of-experts"),
        ({"metadata": {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}},
         ConfigError, "rope scaling type 'yarn' is not supported"),
        ({"skip": ("model.layers.1.mlp.up_proj.weight",)}, CheckpointError,
         r"'model.layers.1.mlp.up_proj.weight' \(blk.1.ffn_up.weight\) is missing"),
    ]
    for i, (kw, error, match) in enumerate(cases):
        path = tmp_path / f"case{i}.gguf"
        write_gguf(folder, path, "F32", **kw)
        with pytest.raises(error, match=match) as e:
            Model.from_pretrained(path)
        assert "\n" not in str(e.value)
        assert_cli_one_line_error(path)
    # a tensor type no one dequantizes: integers
    path = tmp_path / "int.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 16), ("embedding_length", 64), ("block_count", 1),
                       ("feed_forward_length", 96), ("attention.head_count", 4)):
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", np.ones((300, 64), np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'token_embd.weight' .* is I32, which is not "
                                              "supported"):
        Model.from_pretrained(path)
    assert_cli_one_line_error(path)


def test_missing_gguf_path_and_cli_file_messages(tmp_path, tiny_folder):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Model.from_pretrained(tmp_path / "nope.gguf")
    result = invoke("generate", "hi", "--model", tmp_path / "nope.gguf")
    assert result.exit_code == 1 and "Error: model file not found" in result.stderr
    config = os.path.join(tiny_folder, "config.json")
    result = invoke("generate", "hi", "--model", config)
    assert result.exit_code == 1 and "or a GGUF file, and this one is not GGUF" in result.stderr
