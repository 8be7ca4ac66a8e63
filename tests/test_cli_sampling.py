"""`numba-attn generate` honours its sampling options: --temperature, --top-k, --top-p, --min-p,
--repeat-penalty, --repeat-last-n and --seed reach the sampler.

Two kinds of check, on the built-in demo model:
- identities: --top-k 1, a tiny --top-p and --min-p 1 at a high temperature print the greedy
  (--temperature 0) text, while the same temperature without them does not;
- each option: the CLI prints exactly what numba_attn.generate gives with that option, and
  that differs from what it gives with the option at its default (so a CLI that dropped the
  option, falling back to the default, fails)."""
import dataclasses
import re

import pytest
from click.testing import CliRunner

import numba_attn
from numba_attn import Model, SamplingParams, Tokenizer, cli, generate

DEMO = numba_attn.DEMO_MODEL
PROMPT = "It is a truth universally acknowledged"
MAX_TOKENS = 24
HOT = ["--temperature", "5"]


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)   # click 8.1
    except TypeError:
        runner = CliRunner()                   # click >= 8.2: stderr kept apart
    return runner.invoke(cli.main, list(args))


def cli_text(*options):
    """The generated text `generate` prints (standard output; the summary goes to stderr)."""
    result = invoke("generate", PROMPT, "--model", DEMO, "--max-tokens", str(MAX_TOKENS),
                    *options)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def api():
    """api(SamplingParams) -> the text the CLI should print for it (with its newline)."""
    model = Model.from_pretrained(DEMO)
    tok = Tokenizer(DEMO, model.config.bos_token_id)
    ids = tok.encode(PROMPT)

    def text(params):
        return tok.decode(list(generate(model, ids, max_tokens=MAX_TOKENS,
                                        sampling=params))) + "\n"
    return text


@pytest.fixture(scope="module")
def greedy_text():
    return cli_text("--temperature", "0")


def test_greedy_cli_is_the_api(api, greedy_text):
    assert greedy_text == api(SamplingParams(temperature=0.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_1_is_greedy_at_a_high_temperature(greedy_text, seed):
    assert cli_text(*HOT, "--top-k", "1", "--seed", str(seed)) == greedy_text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_top_p_is_greedy_at_a_high_temperature(greedy_text, seed):
    assert cli_text(*HOT, "--top-p", "0.0001", "--seed", str(seed)) == greedy_text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_p_1_is_greedy_at_a_high_temperature(greedy_text, seed):
    assert cli_text(*HOT, "--min-p", "1", "--seed", str(seed)) == greedy_text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_high_temperature_alone_is_not_greedy(greedy_text, seed):
    """The control: with the default filters (top-k 40, top-p 0.95, min-p 0.05), or none,
    the same temperature and seeds leave the greedy text."""
    assert cli_text(*HOT, "--seed", str(seed)) != greedy_text
    assert cli_text(*HOT, "--top-k", "0", "--top-p", "1", "--min-p", "0",
                    "--seed", str(seed)) != greedy_text


# option -> (CLI arguments, the SamplingParams they mean, the field that option sets)
OFF = ["--top-k", "0", "--top-p", "1", "--min-p", "0"]
NO_FILTERS = dict(top_k=0, top_p=1.0, min_p=0.0)
CASES = {
    "temperature": (["--temperature", "3", *OFF, "--seed", "4"],
                    dict(temperature=3.0, **NO_FILTERS, seed=4), "temperature"),
    "top-k": (["--temperature", "3", "--top-k", "3", "--top-p", "1", "--min-p", "0",
               "--seed", "4"],
              dict(temperature=3.0, **{**NO_FILTERS, "top_k": 3}, seed=4), "top_k"),
    "top-p": (["--temperature", "3", "--top-k", "0", "--top-p", "0.3", "--min-p", "0",
               "--seed", "4"],
              dict(temperature=3.0, **{**NO_FILTERS, "top_p": 0.3}, seed=4), "top_p"),
    "min-p": (["--temperature", "3", "--top-k", "0", "--top-p", "1", "--min-p", "0.3",
               "--seed", "4"],
              dict(temperature=3.0, **{**NO_FILTERS, "min_p": 0.3}, seed=4), "min_p"),
    "repeat-penalty": (["--temperature", "0", "--repeat-penalty", "1e9",
                        "--repeat-last-n", "16"],
                       dict(temperature=0.0, repeat_penalty=1e9, repeat_last_n=16),
                       "repeat_penalty"),
    "repeat-last-n": (["--temperature", "0", "--repeat-penalty", "1e9",
                       "--repeat-last-n", "2"],
                      dict(temperature=0.0, repeat_penalty=1e9, repeat_last_n=2),
                      "repeat_last_n"),
    "seed": (["--temperature", "1.5", *OFF, "--seed", "11"],
             dict(temperature=1.5, **NO_FILTERS, seed=11), "seed"),
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
DEFAULTS["seed"] = 12          # no seed would draw a random one: any other seed will do


@pytest.mark.parametrize("option", list(CASES))
def test_cli_option_reaches_the_sampler(api, option):
    args, params, field = CASES[option]
    want = api(SamplingParams(**params))
    assert cli_text(*args) == want
    # the option matters here: at its default the API gives another text
    assert api(SamplingParams(**{**params, field: DEFAULTS[field]})) != want, option


def test_seed_reproduces_and_the_drawn_seed_is_reported():
    args = ["generate", PROMPT, "--model", DEMO, "--max-tokens", str(MAX_TOKENS), *HOT, *OFF]
    assert cli_text(*HOT, *OFF, "--seed", "5") == cli_text(*HOT, *OFF, "--seed", "5")
    assert cli_text(*HOT, *OFF, "--seed", "5") != cli_text(*HOT, *OFF, "--seed", "6")
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    drawn = re.search(r"seed (\d+)", first.stderr)
    assert drawn, first.stderr                      # no --seed: the summary gives the one drawn
    assert cli_text(*HOT, *OFF, "--seed", drawn.group(1)) == first.stdout
