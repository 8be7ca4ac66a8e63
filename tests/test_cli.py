"""`numba-attn generate` end to end on a tiny model folder, streaming text, and every bad input
(one clean `Error:` line, non-zero exit, no traceback)."""
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from numba_attn import __version__, cli
from numba_attn.backend import cuda_unavailable
from numba_attn.generation import generate
from numba_attn.model import Model
from numba_attn.sampling import SamplingParams
from numba_attn.tokenizer import StreamDecoder, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args, input=None):
    try:
        runner = CliRunner(mix_stderr=False)   # click 8.1
    except TypeError:
        runner = CliRunner()                   # click >= 8.2: stderr kept apart
    return runner.invoke(cli.main, list(args), input=input)


def assert_one_line_error(result, match):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_generate_greedy_streams_the_api_tokens(tiny_folder):
    result = invoke("generate", "Once upon a time", "--model", tiny_folder, "--max-tokens", "12",
                    "--temperature", "0")
    assert result.exit_code == 0, result.output
    model = Model.from_pretrained(tiny_folder)
    tok = Tokenizer(tiny_folder, model.config.bos_token_id)
    ids = tok.encode("Once upon a time")
    assert ids[0] == model.config.bos_token_id            # BOS from the config
    out = list(generate(model, ids, max_tokens=12, sampling=SamplingParams(temperature=0)))
    assert result.stdout == tok.decode(out) + "\n"
    summary = result.stderr.strip().splitlines()[-1]
    assert f"prompt {len(ids)} tokens, generated {len(out)} tokens" in summary
    for part in ("first token", " ms", "prefill", "decode", "tok/s", "stopped: max tokens",
                 "kernels"):
        assert part in summary
    assert "seed" not in summary                           # greedy: no seed to repeat


def test_generate_sampling_options_and_stdin(tiny_folder):
    args = ["--model", tiny_folder, "--max-tokens", "8", "--temperature", "0.9", "--top-k", "20",
            "--top-p", "0.9", "--min-p", "0.02", "--repeat-penalty", "1.2", "--seed", "5"]
    a = invoke("generate", "The quick brown fox", *args)
    b = invoke("generate", *args, input="The quick brown fox")   # prompt from stdin
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout == b.stdout


def test_empty_prompt_starts_from_bos(tiny_folder):
    # sampled without a seed, the random tiny model may draw its end-of-sequence early
    result = invoke("generate", "", "--model", tiny_folder, "--max-tokens", "3")
    assert result.exit_code == 0
    assert re.search(r"prompt 1 token, generated [123] tokens? \|", result.stderr), result.stderr


def test_compiling_message_when_numba_compiles(tiny_folder, monkeypatch):
    """The message comes when Numba starts compiling (a cold cache), before the wait."""
    import numba

    def warmup_that_compiles(self):
        numba.njit(lambda x: x + 1)(1)               # a fresh function: a real compilation

    monkeypatch.setattr(Model, "warmup", warmup_that_compiles)
    result = invoke("generate", "hi", "--model", tiny_folder, "--max-tokens", "2")
    assert result.exit_code == 0
    assert result.stderr.startswith("compiling kernels (first run)...\n")
    assert "kernels compiled this run" in result.stderr


def test_no_compiling_message_when_cached(tiny_folder):
    invoke("generate", "hi", "--model", tiny_folder, "--max-tokens", "2")
    result = invoke("generate", "hi", "--model", tiny_folder, "--max-tokens", "2")
    assert "compiling" not in result.stderr and "kernels loaded from cache" in result.stderr


def test_runs_to_the_context_limit(make_folder):
    folder, _ = make_folder("ctx", max_pos=40, eos=None)
    result = invoke("generate", "Once upon", "--model", folder, "--max-tokens", "-1")
    assert result.exit_code == 0
    summary = result.stderr.strip().splitlines()[-1]
    assert "stopped: context full" in summary
    n_prompt = int(summary.split("prompt ")[1].split(" tokens")[0])
    assert f"generated {40 - n_prompt} tokens" in summary  # prompt + generated = context


def test_context_option(tiny_folder):
    result = invoke("generate", "Once upon", "--model", tiny_folder, "--context", "20",
                    "--max-tokens", "30")
    assert_one_line_error(result, "more in the context of 20, not --max-tokens 30")


def test_subprocess_run(tiny_folder):
    """A real process, as a user runs it (python -m works without installing)."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "numba_attn.cli", "generate", "héllo wörld", "--model",
           tiny_folder, "--max-tokens", "6", "--temperature", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "generated 6" in p.stderr.splitlines()[-1]
    bad = subprocess.run(cmd[:6] + ["/no/such/model"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 1 and bad.stderr == "Error: model folder not found: /no/such/model\n"


# -- bad input: one line, non-zero exit, no traceback --

@pytest.mark.parametrize("option, value, match", [
    ("--temperature", "-1", "'--temperature': -1.0 is not in the range x>=0.0"),
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--top-k", "-1", "'--top-k'"),
    ("--top-p", "0", "'--top-p'"),
    ("--top-p", "1.5", "'--top-p'"),
    ("--min-p", "-0.5", "'--min-p'"),
    ("--min-p", "2", "'--min-p'"),
    ("--repeat-penalty", "0", "'--repeat-penalty'"),
    ("--repeat-last-n", "-3", "'--repeat-last-n'"),
    ("--seed", "-1", "'--seed'"),
    ("--seed", "99999999999999999999", "seed must be in"),
    ("--max-tokens", "-2", "'--max-tokens'"),
    ("--max-tokens", "ten", "'ten' is not a valid integer"),
    ("--device", "tpu", "'--device'"),
    ("--context", "0", "'--context'"),
])
def test_out_of_range_options(tiny_folder, option, value, match):
    assert_one_line_error(invoke("generate", "hi", "--model", tiny_folder, option, value), match)


def test_missing_folder_and_files(tmp_path, make_folder, monkeypatch):
    assert_one_line_error(invoke("generate", "hi", "--model", str(tmp_path / "nope")),
                          "model folder not found")
    monkeypatch.setattr(cli, "DEMO_MODEL", str(tmp_path / "demo"))
    assert_one_line_error(invoke("generate", "hi"), "built-in demo model is not installed")
    assert_one_line_error(invoke("generate", "hi", "--model", str(tmp_path)),
                          "config.json not found")
    folder, _ = make_folder("notok")
    os.remove(os.path.join(folder, "tokenizer.json"))
    assert_one_line_error(invoke("generate", "hi", "--model", folder),
                          "tokenizer.json not found")
    folder, _ = make_folder("badtok")
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": 7}')
    assert_one_line_error(invoke("generate", "hi", "--model", folder), "cannot read")
    folder, _ = make_folder("noweights")
    os.remove(os.path.join(folder, "model.safetensors"))
    assert_one_line_error(invoke("generate", "hi", "--model", folder), "no model.safetensors")


@pytest.mark.parametrize("cut", [100, 20000])
def test_truncated_or_corrupt_safetensors(make_folder, cut):
    folder, _ = make_folder(f"trunc{cut}")
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])                 # mid-header / mid-data
    assert_one_line_error(invoke("generate", "hi", "--model", folder),
                          "corrupt or truncated safetensors file")


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"hidden_size": 65}, "model.embed_tokens.weight' has shape"),
])
def test_unsupported_config(make_folder, change, match):
    folder, _ = make_folder("cfg")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **change}, f)
    assert_one_line_error(invoke("generate", "hi", "--model", folder), match)


def test_prompt_plus_max_tokens_beyond_context(tiny_folder):
    result = invoke("generate", "hi " * 20, "--model", tiny_folder, "--max-tokens", "120")
    assert_one_line_error(result, "leaves room for")
    assert "more in the context of 128, not --max-tokens 120" in result.stderr


def test_readme_command_default_fits_the_context():
    # README's main job, as written there: the demo model (a 256-token context) and the default
    # --max-tokens, which is 256 or fewer when the context has less room (never an error here)
    result = invoke("generate", "The old sea", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert "generated" in result.stderr and "tok/s" in result.stderr


def test_default_max_tokens_still_refuses_a_full_context(tiny_folder):
    # the prompt alone fills the 128-token context: no room for even one token
    result = invoke("generate", "hi " * 200, "--model", tiny_folder)
    assert_one_line_error(result, "tokens fills the context of 128 (raise --context")


@pytest.mark.skipif(cuda_unavailable() is None, reason="a GPU is present")
def test_device_cuda_without_gpu(tiny_folder):
    assert_one_line_error(invoke("generate", "hi", "--model", tiny_folder, "--device", "cuda"),
                          "CUDA requested but no GPU is available")


@pytest.mark.skipif(cuda_unavailable() is None, reason="a GPU is present")
@pytest.mark.parametrize("fmt", ["bfloat16", "q8_0"])
def test_weight_dtype_on_cuda_without_gpu(tiny_folder, fmt):
    # every format runs on CUDA: the option is accepted and the missing GPU is the error
    assert_one_line_error(invoke("generate", "hi", "--model", tiny_folder, "--weight-dtype",
                                 fmt, "--device", "cuda"),
                          "CUDA requested but no GPU is available")


def test_every_option_help_gives_default_and_range():
    result = invoke("generate", "--help")
    assert result.exit_code == 0
    for opt in cli.generate.params:
        if isinstance(opt, cli.click.Option) and opt.name != "help":
            assert "default" in (opt.help or "") or opt.show_default, opt.name


# -- streaming text --

def test_stream_decoder_multibyte(tiny_folder):
    tok = Tokenizer(tiny_folder, 0)
    text = "héllo wörld, ça va? 日本語のテキスト。 ✓ done"
    ids = tok.hf.encode(text).ids
    stream = StreamDecoder(tok)
    chunks = [stream.step(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)      # never half a character


def test_stream_decoder_keeps_sentencepiece_spaces(tmp_path):
    """Metaspace tokenizers (Llama 2, TinyLlama) drop the leading space of a decode: the
    stream must still print ' world' after 'Hello'."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers
    hf = HF(models.BPE(byte_fallback=True, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    hf.train_from_iterator(["Hello world, hello there. Once upon a time."] * 5,
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>"]
                                               + byte_tokens, show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(str(tmp_path), None)
    ids = tok.encode("Hello world there")
    assert len(ids) >= 3
    stream = tok.stream(ids[:1])                       # prompt "Hello", then the rest streams
    out = "".join(stream.step(i) for i in ids[1:]) + stream.flush()
    assert tok.decode(ids[:1]) == "Hello" and out == " world there"


# -- the command line as a newcomer meets it --

def test_no_arguments_prints_the_help():
    result = invoke()
    assert result.exit_code == 0 and "Usage:" in result.stdout and "generate" in result.stdout
    assert "Error" not in result.output


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "numba_attn", "--version"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0 and __version__ in p.stdout


def test_prompt_from_stdin_drops_one_trailing_newline(tiny_folder):
    args = ["--model", tiny_folder, "--max-tokens", "5", "--temperature", "0"]
    direct = invoke("generate", "Once upon a time", *args)
    piped = invoke("generate", *args, input="Once upon a time\n")
    dash = invoke("generate", "-", *args, input="Once upon a time\r\n")
    two = invoke("generate", "-", *args, input="Once upon a time\n\n")
    assert direct.exit_code == piped.exit_code == dash.exit_code == two.exit_code == 0
    assert direct.stdout == piped.stdout == dash.stdout
    n = lambda r: r.stderr.strip().splitlines()[-1].split(" tokens,")[0]  # noqa: E731
    assert n(direct) == n(piped) == n(dash) != n(two)   # only one newline is dropped


def test_show_prompt_before_the_continuation(tiny_folder):
    args = ["Once upon a time", "--model", tiny_folder, "--max-tokens", "5", "--temperature", "0"]
    plain = invoke("generate", *args)                         # piped: the continuation alone
    shown = invoke("generate", *args, "--show-prompt")
    assert shown.stdout == "Once upon a time" + plain.stdout
    assert invoke("generate", *args, "--no-show-prompt").stdout == plain.stdout


def test_the_summary_gives_the_seed_to_repeat_a_run(tiny_folder):
    args = ["Once upon a time", "--model", tiny_folder, "--max-tokens", "12",
            "--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--min-p", "0"]
    first = invoke("generate", *args)
    summary = first.stderr.strip().splitlines()[-1]
    seed = summary.split("| seed ")[1].split(" |")[0]
    again = invoke("generate", *args, "--seed", seed)
    assert int(seed) >= 0 and again.stdout == first.stdout
    assert f"| seed {seed} |" in again.stderr


def test_one_token_is_singular_and_first_token_in_ms(tiny_folder):
    result = invoke("generate", "Once", "--model", tiny_folder, "--max-tokens", "1",
                    "--temperature", "0")
    summary = result.stderr.strip().splitlines()[-1]
    assert "generated 1 token |" in summary
    ms = summary.split("first token ")[1].split(" |")[0]
    assert ms.endswith(" ms") and float(ms[:-3]) >= 0


def test_stop_reason_end_of_sequence(make_folder):
    folder, _ = make_folder("eos_none", eos=None)
    model = Model.from_pretrained(folder)
    greedy = list(generate(model, Tokenizer(folder, model.config.bos_token_id).encode("Once"),
                           max_tokens=1, sampling=SamplingParams(temperature=0)))
    folder, _ = make_folder("eos_first", eos=int(greedy[0]))   # the greedy token ends the text
    result = invoke("generate", "Once", "--model", folder, "--temperature", "0")
    assert result.exit_code == 0 and "stopped: end-of-sequence" in result.stderr
    assert "generated 0 tokens" in result.stderr


def test_model_that_is_a_file(tiny_folder):
    path = os.path.join(tiny_folder, "config.json")
    assert_one_line_error(invoke("generate", "hi", "--model", path),
                          f"--model {path} is a file; it takes a Hugging Face model folder")
