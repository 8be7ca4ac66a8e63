"""The `numba-attn` command line: a Click group. `generate` lives here; other commands (bench)
register themselves at the bottom with main.add_command(...)."""
import os
import sys
import time

import click

from . import DEMO_MODEL, __version__
DEFAULT_MAX_TOKENS = 256   # generate's default: fewer when the context has less room


class OneLineErrors(click.Group):
    """A Click group whose errors (bad options included) print one line, `Error: ...`, and exit
    non-zero: no usage block, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="numba-attn")
def main():
    """numba-attn: attention kernels and a Llama-family inference engine in Python + Numba."""


@main.command()
@click.argument("prompt", required=False)
@click.option("--model", "model_dir", metavar="DIR", default=None,
              help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json). "
                   "[default: the built-in demo model]")
@click.option("--max-tokens", type=click.IntRange(min=-1), default=None,
              help="Tokens to generate, 0 or more; -1 = until end-of-sequence or the context "
                   "is full. [default: 256, or fewer when the context has less room]")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="Sampling temperature, >= 0; 0 = greedy (always the most likely token).")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
              help="Sample among the K most likely tokens, K >= 0; 0 = off.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.95,
              show_default=True,
              help="Nucleus sampling: the smallest set of tokens whose probability reaches P, "
                   "0 < P <= 1; 1 = off.")
@click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.05, show_default=True,
              help="Drop tokens less likely than P x the most likely one, 0 <= P <= 1; 0 = off.")
@click.option("--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True,
              help="Penalty on tokens seen in the last --repeat-last-n tokens, > 0; 1 = off, "
                   "> 1 discourages repeats.")
@click.option("--repeat-last-n", type=click.IntRange(min=0), default=64, show_default=True,
              help="How many recent tokens the repeat penalty looks at, >= 0.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Random seed, 0 to 2^63-1, for reproducible sampling. [default: random]")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="KV cache length in tokens, 1 to the model's max_position_embeddings. "
                   "[default: the model's context, at most 4096]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to run: cpu or cuda.")
@click.option("--weight-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True,
              help="Storage of the linear weights: float32, or float16 (--device cuda only: "
                   "half the bytes per token, float32 arithmetic).")
def generate(prompt, model_dir, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
             repeat_last_n, seed, context, device, weight_dtype):
    """Generate text from PROMPT (or standard input), streaming it as it comes."""
    from .generation import STOP_CONTEXT, CompileTimer, GenerationStats, check_room
    from .generation import generate as run
    from .model import Model
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

    # -- validate everything before loading anything heavy --
    try:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, repeat_penalty=repeat_penalty,
                                  repeat_last_n=repeat_last_n, seed=seed)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if prompt is None:
        prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if model_dir is None:
        model_dir = DEMO_MODEL
        if not os.path.isdir(model_dir):
            raise click.ClickException(f"the built-in demo model is not installed "
                                       f"({model_dir}); pass --model DIR")
    elif not os.path.isdir(model_dir):
        raise click.ClickException(f"model folder not found: {model_dir}")
    limit = None if max_tokens == -1 else max_tokens      # None given: DEFAULT_MAX_TOKENS

    try:
        model = Model.from_pretrained(model_dir, device=device, max_seq=context,
                                      weight_dtype=weight_dtype)
        tokenizer = Tokenizer(model_dir, model.config.bos_token_id)
        ids = tokenizer.encode(prompt)
        if max_tokens is None:   # the default fits the context; an explicit count must fit
            limit = max(1, min(DEFAULT_MAX_TOKENS, model.max_seq - len(ids)))
        check_room(model, len(ids), limit)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    except MemoryError:
        raise click.ClickException(f"not enough memory to load {model_dir}") from None

    # -- compile (first run) or load the kernels outside the timed generation --
    def say_compiling():
        click.echo("compiling kernels (first run)...", err=True)

    with CompileTimer(on_compile=say_compiling) as jit:
        t0 = time.perf_counter()
        model.warmup()
        jit_s = time.perf_counter() - t0

    stats = GenerationStats()
    stream = tokenizer.stream(ids)
    try:
        for token in run(model, ids, max_tokens=limit, sampling=sampling, stats=stats):
            click.echo(stream.step(token), nl=False)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(stream.flush())

    if stats.stop_reason == STOP_CONTEXT:
        click.echo(stats.message, err=True)
    kernels = (f"kernels compiled this run ({jit.seconds:.1f} s)" if jit.seconds > 0
               else f"kernels loaded from cache ({jit_s:.1f} s)")
    click.echo(f"prompt {stats.prompt_tokens} tokens, generated {stats.generated_tokens} | "
               f"first token {stats.first_token_s:.2f} s | "
               f"prefill {_rate(stats.prefill_tok_s)} tok/s | "
               f"decode {_rate(stats.decode_tok_s)} tok/s | {kernels}", err=True)


def _rate(x):
    return "-" if x != x else f"{x:.1f}"   # NaN (nothing timed) -> "-"


# -- commands defined in other modules --
from .bench.cli import bench  # noqa: E402

main.add_command(bench)


if __name__ == "__main__":   # python -m numba_attn.cli ...
    main()
