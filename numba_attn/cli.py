"""The `numba-attn` command line: a Click group. `generate`, `chat` and `perplexity` live here;
other commands (bench) register themselves at the bottom with main.add_command(...)."""
import functools
import os
import sys
import time
import warnings

import click

from . import DEMO_MODEL, __version__
from .formats import FORMATS, KV_DTYPES

WEIGHT_DTYPE_CHOICES = ("auto",) + tuple(FORMATS)
WEIGHT_DTYPE_HELP = ("Storage of the weights: auto (the checkpoint's own type; q8_0 for a GGUF "
                     "file of other quantized types), float32, bfloat16, float16 or q8_0 "
                     "(8-bit blocks, quantized at load); fewer bytes are a faster decode, "
                     "arithmetic is float32 throughout.")
KV_DTYPE_CHOICES = ("auto",) + tuple(KV_DTYPES["cpu"])
KV_DTYPE_HELP = ("Storage of the KV cache: auto (on the CPU: float32 with float32 weights, "
                 "16 bits with 16-bit weights, int8 with q8_0 where the CPU has AVX-512 VNNI, "
                 "else bfloat16; on CUDA: float32), float32, float16, bfloat16 (CPU only) or "
                 "int8 (CPU only: 8-bit codes and a scale a row); 16 bits halve the bytes "
                 "decode reads at long context, int8 quarters them.")
DEFAULT_MAX_TOKENS = 256   # generate's default (fewer when the context has less room); chat's
                           # per reply


class OneLineErrors(click.Group):
    """A Click group whose errors (bad options included) print one line, `Error: ...`, and exit
    non-zero: no usage block, no traceback. With no arguments at all it prints its help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        if not (sys.argv[1:] if args is None else args):
            args = ["--help"]
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


# -- options the generating commands share --

MODEL_OPTIONS = [
    click.option("--model", "model_dir", metavar="DIR|FILE", default=None,
                 help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json) "
                      "or GGUF file. [default: the built-in demo model]"),
    click.option("--context", type=click.IntRange(min=1), default=None,
                 help="KV cache length in tokens, 1 to the model's max_position_embeddings. "
                      "[default: the model's context, at most 4096]"),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
                 show_default=True, help="Where to run: cpu or cuda."),
    click.option("--weight-dtype", type=click.Choice(WEIGHT_DTYPE_CHOICES), default="auto",
                 show_default=True, help=WEIGHT_DTYPE_HELP),
    click.option("--kv-dtype", type=click.Choice(KV_DTYPE_CHOICES), default="auto",
                 show_default=True, help=KV_DTYPE_HELP),
]

GENERATION_OPTIONS = [
    click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8,
                 show_default=True,
                 help="Sampling temperature, >= 0; 0 = greedy (always the most likely token)."),
    click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
                 help="Sample among the K most likely tokens, K >= 0; 0 = off."),
    click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.95,
                 show_default=True,
                 help="Nucleus sampling: the smallest set of tokens whose probability reaches "
                      "P, 0 < P <= 1; 1 = off."),
    click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.05, show_default=True,
                 help="Drop tokens less likely than P x the most likely one, 0 <= P <= 1; "
                      "0 = off."),
    click.option("--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True),
                 default=1.0, show_default=True,
                 help="Penalty on tokens seen in the last --repeat-last-n tokens, > 0; 1 = off, "
                      "> 1 discourages repeats."),
    click.option("--repeat-last-n", type=click.IntRange(min=0), default=64, show_default=True,
                 help="How many recent tokens the repeat penalty looks at, >= 0."),
    click.option("--seed", type=click.IntRange(min=0), default=None,
                 help="Random seed, 0 to 2^63-1, for reproducible sampling. [default: a random "
                      "one, printed in the summary line]"),
    click.option("--stop", multiple=True, metavar="TEXT",
                 help="Stop at this text, which is not printed; repeatable. [default: none]"),
]


def model_options(command):
    """--model, --context, --device, --weight-dtype and --kv-dtype, as they are."""
    for option in reversed(MODEL_OPTIONS):
        command = option(command)
    return command


def generation_options(command):
    """The sampling options and --stop, given to the command as `sampling` (a SamplingParams,
    checked, with a fresh seed when sampling without --seed) and `stop` (a tuple)."""
    @functools.wraps(command)
    def with_sampling(*args, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                      seed, stop, **kwargs):
        if seed is None and temperature > 0:
            seed = random_seed()
        sampling = _sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                             seed=seed)
        if not all(stop):
            raise click.UsageError("--stop takes a non-empty text")
        return command(*args, sampling=sampling, stop=stop, **kwargs)

    for option in reversed(GENERATION_OPTIONS):
        with_sampling = option(with_sampling)
    return with_sampling


class Engine:
    """What a generating command runs on: the model and its tokenizer (from load(), which says
    when the kernels compile), the sampling, and the summary line after each generation."""

    def __init__(self, model_dir, *, device, context, weight_dtype, kv_dtype, sampling):
        self.model, self.tokenizer, self.jit = load(model_dir, device=device, context=context,
                                                    weight_dtype=weight_dtype, kv_dtype=kv_dtype)
        self.sampling = sampling

    def report(self, stats):
        """The summary line of a generation, on standard error."""
        seed = None if self.sampling.greedy else self.sampling.seed
        click.echo(summary(stats, self.jit, self.model, seed=seed), err=True)

    def chat_template(self, instead):
        """The model's chat template; a click error saying what to do `instead` when it has
        none."""
        from .chat import ChatTemplate, ChatTemplateError
        try:
            return ChatTemplate.from_tokenizer(self.tokenizer, self.model.config.eos_token_ids)
        except ChatTemplateError as e:
            raise click.ClickException(f"{e}; {instead}") from None


@main.command()
@click.argument("prompt", required=False)
@model_options
@click.option("--max-tokens", type=click.IntRange(min=-1), default=None,
              help="Tokens to generate, 0 or more; -1 = until end-of-sequence or the context "
                   "is full. [default: 256, or fewer when the context has less room]")
@generation_options
@click.option("--chat", is_flag=True, default=False,
              help="Apply the model's chat template: PROMPT is one user message, the output "
                   "the assistant's reply. [default: off]")
@click.option("--system", metavar="TEXT", default=None,
              help="A system message before PROMPT (with --chat). [default: none]")
@click.option("--show-prompt/--no-show-prompt", default=None,
              help="Print the prompt before its continuation (with --chat: the conversation "
                   "as the template renders it). [default: on when standard output is a "
                   "terminal, off when it is piped]")
def generate(prompt, model_dir, context, device, weight_dtype, kv_dtype, max_tokens, sampling,
             stop, chat, system, show_prompt):
    """Generate text from PROMPT (or standard input: no PROMPT, or -), streaming it as it
    comes; a summary line goes to standard error."""
    from .chat import end_token_ids
    from .generation import STOP_STRING, GenerationStats
    from .generation import generate as run

    # -- validate everything before loading anything heavy --
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    prompt = _read_prompt(prompt)
    if show_prompt is None:
        show_prompt = _isatty(sys.stdout)

    engine = Engine(model_dir, device=device, context=context, weight_dtype=weight_dtype,
                    kv_dtype=kv_dtype, sampling=sampling)
    model, tokenizer = engine.model, engine.tokenizer
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = _render(engine.chat_template("without --chat, generate continues the plain "
                                              "prompt"), messages)
        ids = tokenizer.encode(text, add_bos=False)
        eos = end_token_ids(model, tokenizer)
    else:
        text, ids, eos = prompt, tokenizer.encode(prompt), None
    limit = _token_limit(model, len(ids), max_tokens)

    stats = GenerationStats()
    stream = tokenizer.stream(ids, stop=stop)
    if show_prompt:
        click.echo(text, nl=False)
    tokens = run(model, ids, max_tokens=limit, sampling=sampling, eos_token_ids=eos,
                 stats=stats)
    try:
        for token in tokens:
            click.echo(stream.step(token), nl=False)
            if stream.stopped:
                stats.stop_reason = STOP_STRING
                break
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(stream.flush())
    engine.report(stats)


@main.command()
@model_options
@click.option("--system", metavar="TEXT", default=None,
              help="A system message that opens the conversation (and stays after /reset). "
                   "[default: none]")
@click.option("--max-tokens", type=click.IntRange(min=-1), default=DEFAULT_MAX_TOKENS,
              show_default=True,
              help="Tokens per reply, 1 or more; -1 = as many as the context holds. A reply "
                   "is cut short when the context fills.")
@generation_options
@click.option("--stats", "show_stats", is_flag=True, default=False,
              help="Print the summary line (as generate's) after each reply, on standard "
                   "error. [default: off]")
def chat(model_dir, context, device, weight_dtype, kv_dtype, system, max_tokens, sampling,
         stop, show_stats):
    """Chat with the model through its chat template. One message per line, typed at the "> "
    prompt or piped in; the reply streams as it is written. /reset starts a new conversation,
    /exit or the end of input (Ctrl-D) ends the session, Ctrl-C stops a reply (the part
    written stays in the conversation). Each turn prefills only its new tokens: the KV cache
    keeps the conversation until the context is full."""
    from .chat import ChatSession

    if max_tokens == 0:
        raise click.UsageError("--max-tokens is 1 or more (or -1) for a reply")
    engine = Engine(model_dir, device=device, context=context, weight_dtype=weight_dtype,
                    kv_dtype=kv_dtype, sampling=sampling)
    template = engine.chat_template("`numba-attn generate` continues plain text instead")
    session = ChatSession(engine.model, engine.tokenizer, template=template, system=system,
                          sampling=sampling, stop=stop,
                          max_tokens=None if max_tokens == -1 else max_tokens)
    _converse(session, engine, show_stats)


def _converse(session, engine, show_stats):
    """The chat loop: read a line, run a command or send it, stream the reply."""
    from .chat import ChatTemplateError, ContextFullError
    from .generation import STOP_CONTEXT

    full = (f"the context of {engine.model.max_seq} tokens is full: /reset starts a new "
            f"conversation")
    interactive = _isatty(sys.stdin)
    if interactive:
        _line_editing()
        click.echo(f"context {engine.model.max_seq} tokens. /reset starts a new conversation, "
                   f"/exit or Ctrl-D ends, Ctrl-C stops a reply.", err=True)
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() == "/exit":
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            session.reset()
            click.echo("(new conversation)", err=True)
            continue
        if line.startswith("/") and " " not in line:
            click.echo(f"unknown command {line}: /reset, /exit", err=True)
            continue
        try:
            reply = session.send(line)
        except ContextFullError:
            click.echo(full, err=True)
            continue
        except ChatTemplateError as e:
            raise click.ClickException(str(e)) from None
        try:
            for piece in reply:
                click.echo(piece, nl=False)
            click.echo()
        except KeyboardInterrupt:        # stops the reply; what it wrote stays
            reply.close()
            click.echo()
            click.echo("(reply stopped)", err=True)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        if show_stats:
            engine.report(session.stats)
        if session.stats.stop_reason == STOP_CONTEXT:
            click.echo(full, err=True)


def _render(template, messages):
    from .chat import ChatTemplateError
    try:
        return template.render(messages)
    except ChatTemplateError as e:
        raise click.ClickException(str(e)) from None


def _read_line(interactive):
    """The next line of input; None at its end, or on Ctrl-C / Ctrl-D at the prompt."""
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
        return line or None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            click.echo()
        return None


def _line_editing():
    """Arrow keys and history at the prompt, where Python has readline."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", metavar="DIR|FILE", default=None,
              help="Hugging Face model folder or GGUF file. [default: the built-in demo "
                   "model]")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Window length in tokens, 2 to the model's context; the text is scored in "
                   "non-overlapping windows of this many tokens. [default: the model's "
                   "context, at most 4096]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to run: cpu or cuda.")
@click.option("--weight-dtype", type=click.Choice(WEIGHT_DTYPE_CHOICES), default="auto",
              show_default=True, help=WEIGHT_DTYPE_HELP)
@click.option("--kv-dtype", type=click.Choice(KV_DTYPE_CHOICES), default="auto",
              show_default=True, help=KV_DTYPE_HELP)
def perplexity(file, model_dir, context, device, weight_dtype, kv_dtype):
    """Perplexity of the text in FILE under the model (lower is better): its token ids, BOS
    first, in non-overlapping windows of --context tokens, each scoring its tokens after the
    first. The number to compare across weight types, as llama.cpp's llama-perplexity."""
    from .perplexity import perplexity as score
    from .perplexity import windows

    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise click.ClickException(f"text file not found: {file}") from None
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{file} is not UTF-8 text ({e.reason} at byte "
                                   f"{e.start})") from None
    except OSError as e:
        raise click.ClickException(f"cannot read {file}: {e.strerror}") from None
    model, tokenizer, jit = load(model_dir, device=device, context=context,
                                 weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise click.ClickException(f"{file} has {len(ids)} token; at least 2 are needed to "
                                   f"score one")
    n_windows = len(windows(len(ids), model.max_seq))
    t0 = time.perf_counter()
    with click.progressbar(length=n_windows, label="scoring", file=sys.stderr,
                           hidden=not _isatty(sys.stderr)) as bar:
        result = score(model, ids, on_window=lambda done, total: bar.update(1))
    seconds = time.perf_counter() - t0
    click.echo(f"perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
               f"({result.windows} window{'' if result.windows == 1 else 's'} of up to "
               f"{model.max_seq} tokens, {model.weight_dtype} weights, {model.kv_dtype} "
               f"KV cache)")
    click.echo(f"{len(ids)} tokens in {seconds:.2f} s ({len(ids) / seconds:.1f} tok/s) | {jit}",
               err=True)


# -- the steps every generating command shares: read, load, check room, report --

def random_seed():
    """A fresh seed in SamplingParams' range, so that a run can be repeated with --seed."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def _sampling(**options):
    from .sampling import SamplingParams
    try:
        return SamplingParams(**options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _read_prompt(prompt):
    """The prompt argument, or standard input when it is missing or '-' (one trailing newline,
    the one `echo` adds, is not part of the prompt)."""
    if prompt is not None and prompt != "-":
        return prompt
    if sys.stdin is None or (prompt is None and _isatty(sys.stdin)):
        return ""
    text = sys.stdin.read()
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


class LoadTimer:
    """What load() reports of the kernels: compiled in this run, or loaded from Numba's cache,
    and how long that took."""

    def __init__(self, compiled_s, load_s):
        self.compiled_s, self.load_s = compiled_s, load_s

    def __str__(self):
        if self.compiled_s > 0:
            return f"kernels compiled this run ({self.compiled_s:.1f} s)"
        return f"kernels loaded from cache ({self.load_s:.1f} s)"


def load(model_dir, *, device="cpu", context=None, weight_dtype="auto", kv_dtype="auto"):
    """The model (a Hugging Face folder or a GGUF file; the demo when model_dir is None), its
    tokenizer, and its kernels compiled or loaded (saying so first when they compile): (model,
    tokenizer, LoadTimer). Every failure is a one-line click error; a conversion at load worth
    knowing of is a `note:` line."""
    from .generation import CompileTimer
    from .loaders import is_gguf_file
    from .model import WEIGHT_DTYPES, Model
    from .tokenizer import Tokenizer
    from .weights import LoadNotice

    if weight_dtype != "auto" and weight_dtype not in WEIGHT_DTYPES[device]:
        needs = [d for d, names in WEIGHT_DTYPES.items() if weight_dtype in names]
        raise click.UsageError(f"--weight-dtype {weight_dtype} needs --device "
                               f"{' or '.join(needs)}")
    if kv_dtype != "auto" and kv_dtype not in KV_DTYPES[device]:
        raise click.UsageError(f"--kv-dtype {kv_dtype} runs on the CPU only; --device "
                               f"{device} takes {', '.join(KV_DTYPES[device])}")
    if model_dir is None:
        model_dir = DEMO_MODEL
        if not os.path.isdir(model_dir):
            raise click.ClickException(f"the built-in demo model is not installed "
                                       f"({model_dir}); pass --model DIR")
    elif os.path.isfile(model_dir) and not is_gguf_file(model_dir):
        raise click.ClickException(f"--model {model_dir} is a file; it takes a Hugging Face "
                                   f"model folder (config.json, *.safetensors, tokenizer.json) "
                                   f"or a GGUF file, and this one is not GGUF")
    elif not os.path.exists(model_dir):
        what = "file" if model_dir.lower().endswith(".gguf") else "folder"
        raise click.ClickException(f"model {what} not found: {model_dir}")
    bar = _LoadBar()
    try:
        with bar, warnings.catch_warnings(record=True) as notices:
            warnings.simplefilter("always", LoadNotice)
            model = Model.from_pretrained(model_dir, device=device, max_seq=context,
                                          weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                                          progress=bar.update)
            tokenizer = Tokenizer(model_dir, model.config.bos_token_id)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    except MemoryError:
        raise click.ClickException(f"not enough memory to load {model_dir}") from None
    for notice in notices:            # e.g. quantized GGUF tensors dequantized: one line each
        click.echo(f"note: {notice.message}", err=True)

    def say_compiling():
        click.echo("compiling kernels (first run)...", err=True)

    with CompileTimer(on_compile=say_compiling) as jit:     # outside the timed generation
        t0 = time.perf_counter()
        model.warmup()
        load_s = time.perf_counter() - t0
    return model, tokenizer, LoadTimer(jit.seconds, load_s)


class _LoadBar:
    """A progress bar on a terminal's standard error while q8_0 weights load (quantized, or
    dequantized from other GGUF types, at load)."""

    def __init__(self):
        self.bar = None

    def update(self, done, total, fmt):
        if self.bar is None:
            if fmt != "q8_0" or not _isatty(sys.stderr):
                return
            self.bar = click.progressbar(length=total, label=f"loading {fmt} weights",
                                         file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _token_limit(model, n_prompt, max_tokens):
    """generate()'s max_tokens from --max-tokens (None given: 256 or fewer when the context has
    less room; -1: until the context is full), refused when the prompt leaves no room."""
    context = model.max_seq
    if n_prompt < 1:
        raise click.ClickException("the prompt is empty and the model has no BOS token to "
                                   "start from")
    if n_prompt > context or (n_prompt == context and max_tokens != 0):
        raise click.ClickException(f"the prompt of {n_prompt} tokens fills the context of "
                                   f"{context} (raise --context or shorten the prompt)")
    if max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, context - n_prompt)
    if max_tokens == -1:
        return None
    if n_prompt + max_tokens > context:
        raise click.ClickException(f"the prompt of {n_prompt} tokens leaves room for "
                                   f"{context - n_prompt} more in the context of {context}, "
                                   f"not --max-tokens {max_tokens}")
    return max_tokens


STOP_WORDS = {"eos": "end-of-sequence", "max_tokens": "max tokens", "context": "context full",
              "stop": "stop string"}


def summary(stats, jit, model, *, seed=None):
    """The line after a generation: counts, time to first token, rates, why it stopped, the
    weights' storage and the bytes a token reads, the KV cache's storage, the seed (when
    sampling), and how the kernels were loaded."""
    n = stats.generated_tokens
    cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
    parts = [f"prompt {stats.prompt_tokens} token{'' if stats.prompt_tokens == 1 else 's'}"
             f"{cached}, generated {n} token{'' if n == 1 else 's'}",
             f"first token {stats.first_token_s * 1e3:.0f} ms",
             f"prefill {_rate(stats.prefill_tok_s)} tok/s",
             f"decode {_rate(stats.decode_tok_s)} tok/s",
             f"stopped: {STOP_WORDS.get(stats.stop_reason, 'interrupted')}",
             f"{model.weight_dtype} weights, {_megabytes(model.weights.bytes_per_token)}/token",
             f"{model.kv_dtype} KV cache"]
    if seed is not None:
        parts.append(f"seed {seed}")
    parts.append(str(jit))
    return " | ".join(parts)


def _megabytes(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _rate(x):
    return "-" if x != x else f"{x:.1f}"   # NaN (nothing timed) -> "-"


# -- commands defined in other modules --
from .bench.cli import bench  # noqa: E402

main.add_command(bench)


if __name__ == "__main__":   # python -m numba_attn.cli ...
    main()
