"""`numba-attn bench`: the kernel rows (default) and the model benchmark, from the terminal.

    numba-attn bench                                  # = bench kernels, every row, on the CPU
    numba-attn bench kernels --ops full_attention,decode_attention --sizes 128,512
    numba-attn bench kernels --device all --format md --save-baseline before
    numba-attn bench kernels --baseline before --plot kernels.png
    numba-attn bench model [--model DIR] [-p 512] [-n 128]

The table goes to standard output; the progress bar and messages to standard error.
"""
import datetime
import functools
import shlex
import sys

import click

from . import kernels as K
from . import report
from ..backend import cuda_unavailable
from ..formats import FORMATS as WEIGHT_FORMATS, KV_DTYPES
from .limits import Limits
from .machine import cuda_available, describe, jit_cache_counts
from .timing import DEFAULT_BUDGET_S

FORMATS = ("text", "md", "csv", "json")
WEIGHT_DTYPE_CHOICES = ("auto",) + tuple(WEIGHT_FORMATS)
KV_DTYPE_CHOICES = ("auto",) + tuple(KV_DTYPES["cpu"])


class _KernelsByDefault(click.Group):
    """A group that runs `kernels` when no subcommand is named (options included)."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["kernels"] + list(args)
        ctx.meta["bench_args"] = list(args)
        return super().parse_args(ctx, args)


class IntList(click.ParamType):
    """A comma-separated list of positive integers: 1,8,32."""
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        out = []
        for part in str(value).split(","):
            part = part.strip()
            try:
                n = int(part)
            except ValueError:
                self.fail(f"{part!r} is not an integer (expected a comma-separated list of "
                          f"positive integers, e.g. 1,8,32)", param, ctx)
            if n <= 0:
                self.fail(f"sizes must be positive integers, got {n}", param, ctx)
            out.append(n)
        if not out:
            self.fail("give at least one size", param, ctx)
        return out


class NameList(click.ParamType):
    """A comma-separated list of names from a fixed set."""
    name = "NAME,..."

    def __init__(self, choices, what):
        self.choices, self.what = tuple(choices), what

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        names = [p.strip() for p in str(value).split(",") if p.strip()]
        for n in names:
            if n not in self.choices:
                self.fail(f"unknown {self.what} {n!r}; choose from: {', '.join(self.choices)}",
                          param, ctx)
        return list(dict.fromkeys(names))


def _common(plot_help, devices_help):
    """Options both measuring subcommands share; --plot and --device say what they do in each."""
    return functools.partial(_add_common, plot_help=plot_help, devices_help=devices_help)


def _add_common(f, plot_help, devices_help):
    opts = [
        click.option("--device", type=click.Choice(["cpu", "cuda", "all"]), default="cpu",
                     show_default=True, help=devices_help),
        click.option("--repeat", type=click.IntRange(min=1), default=None,
                     help="Samples per measurement, >= 1. [default: as many as --time-budget "
                          "allows, at least 5]"),
        click.option("--time-budget", type=click.FloatRange(min=0, min_open=True),
                     default=None,
                     help=f"Seconds of sampling per measurement, > 0. [default: "
                          f"{DEFAULT_BUDGET_S} for kernels, 5 for the model runs]"),
        click.option("--limits", "limits_mode", type=click.Choice(["full", "small", "none"]),
                     default="full", show_default=True,
                     help="Measure the read bandwidth and sgemm rate: full (large arrays), "
                          "small (quick, cache-assisted: smoke runs only) or none."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="text",
                     show_default=True, help="Output: a text table, markdown, csv or json."),
        click.option("--save-baseline", metavar="NAME", default=None,
                     help=f"Save this run as baseline NAME (under {report.baseline_dir()}; "
                          f"$NUMBA_ATTN_HOME moves it)."),
        click.option("--baseline", metavar="NAME", default=None,
                     help="Compare each row with saved baseline NAME and flag regressions "
                          "beyond the noise (non-overlapping 95% intervals and > 2%)."),
        click.option("--fail-on-regression", is_flag=True,
                     help="With --baseline: exit with status 1 when a row regressed."),
        click.option("--plot", "plot_path", metavar="FILE.png", default=None,
                     help=plot_help + " (needs matplotlib: pip install 'numba-attn[plot]')."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group("bench", cls=_KernelsByDefault,
             context_settings={"help_option_names": ["-h", "--help"]})
def bench():
    """Benchmarks: the kernels against NumPy, PyTorch and the reference profile (`kernels`,
    the default), a model's prefill/generation speed (`model`), and the JIT's compile and
    cache-load time (`jit`).

    \b
    kernels and model run on --device cpu (the default), cuda or all
    (kernels only: every device present); jit measures the CPU kernels.
    Each subcommand's --help lists its options:
      numba-attn bench kernels --help
      numba-attn bench model --help
      numba-attn bench jit --help"""


# -- validation shared by both subcommands ---------------------------------------------------

def _devices(device):
    if device == "cpu":
        return ["cpu"]
    if cuda_available():
        return ["cpu", "cuda"] if device == "all" else ["cuda"]
    if device == "all":
        click.echo("note: no CUDA GPU here; --device all runs the CPU only", err=True)
        return ["cpu"]
    raise click.UsageError(f"--device cuda: no CUDA GPU is available here "
                           f"({cuda_unavailable()})")


def _validate(kind, save_baseline, baseline, plot_path, fail_on_regression):
    """Everything that can fail fast, before any measuring. Returns the loaded baseline."""
    try:
        if save_baseline is not None:
            report.check_baseline_name(save_baseline)
        base = report.load_baseline(baseline, kind) if baseline is not None else None
    except report.BaselineError as e:
        raise click.ClickException(str(e)) from None
    if fail_on_regression and baseline is None:
        raise click.UsageError("--fail-on-regression needs --baseline NAME")
    if plot_path is not None:
        if not plot_path.lower().endswith(".png"):
            raise click.UsageError(f"--plot writes a PNG file: give a name ending in .png, "
                                   f"got {plot_path!r}")
        if not report.plot_available():
            raise click.ClickException(report.PLOT_MISSING)
    return base


def _command(ctx):
    args = ctx.find_root().meta.get("bench_args") or ctx.meta.get("bench_args") or []
    return "numba-attn bench " + shlex.join(args)


def _limits(devices, mode, repeat, progress):
    from .limits import measure_limits
    out = {}
    for dev in devices:
        if mode == "none":
            continue
        progress(f"measuring the limits on {dev} ({mode})...")
        lim = measure_limits(dev, small=mode == "small", repeat=repeat).to_dict()
        lim["small"] = mode == "small"
        out[dev] = lim
    return out


def _finish(result, fmt, save_baseline, base, baseline, plot_path, fail_on_regression):
    regressed = report.compare(result, base, baseline) if base is not None else []
    click.echo(report.format_result(result, fmt), nl=False)
    if save_baseline:
        try:
            path = report.save_baseline(save_baseline, result)
        except report.BaselineError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"saved baseline {save_baseline!r}: {path}", err=True)
    if plot_path:
        try:
            report.plot(result, plot_path)
        except OSError as e:
            raise click.ClickException(f"cannot write the plot {plot_path}: {e}") from None
        click.echo(f"plot written: {plot_path}", err=True)
    if base is not None:
        names = ", ".join(r["name"] for r in regressed)
        click.echo(f"against baseline {baseline!r}: {len(regressed)} row(s) regressed beyond "
                   f"the noise" + (f": {names}" if regressed else ""), err=True)
        if regressed and fail_on_regression:
            sys.exit(1)


def _say(msg):
    click.echo(msg, err=True)


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# -- bench kernels ---------------------------------------------------------------------------

@bench.command("kernels")
@click.option("--ops", type=NameList(K.OPS, "op"), default=None,
              help=f"Comma-separated ops to run. [default: all: {', '.join(K.OPS)}]")
@click.option("--sizes", type=IntList(), default=None,
              help="Comma-separated positive sizes (sequence length; kv_len for "
                   "decode_attention), replacing every op's defaults. [default: the reference "
                   "profile's: " + "; ".join(f"{op} {','.join(map(str, s))}"
                                             for op, (s, _) in K.OPS.items()) + "]")
@click.option("--heads", type=click.IntRange(min=1), default=K.REFERENCE.heads,
              show_default=True, help="Query heads, >= 1 (hidden = heads x head-dim).")
@click.option("--kv-heads", type=click.IntRange(min=1), default=K.REFERENCE.kv_heads,
              show_default=True,
              help="Key/value heads of decode_attention, >= 1, dividing --heads.")
@click.option("--head-dim", type=click.IntRange(min=2), default=K.REFERENCE.head_dim,
              show_default=True, help="Head dimension, an even number >= 2.")
@click.option("--peers", type=NameList(K.PEERS + ("none",), "peer"), default="numpy,torch",
              show_default=True,
              help="Peers to time beside ours: numpy, torch, or none. Asked for by name, torch "
                   "must be installed (pip install torch); by default it is left out, with a "
                   "note, when it is not.")
@_common(plot_help="Draw time against size for each op and device (log-log): ours, the peers "
                   "and Candle's figures",
         devices_help="Where to run: cpu, cuda, or all (every device present here).")
@click.pass_context
def kernels_cmd(ctx, ops, sizes, heads, kv_heads, head_dim, peers, device, repeat, time_budget,
                limits_mode, fmt, save_baseline, baseline, fail_on_regression, plot_path):
    """The reference profile's rows: each op at each size, ours against NumPy and PyTorch,
    with achieved GB/s or GFLOP/s, the share of the measured limit and Candle's figure."""
    if heads % kv_heads:
        raise click.UsageError(f"--heads ({heads}) must be a multiple of --kv-heads "
                               f"({kv_heads})")
    if head_dim % 2:
        raise click.UsageError(f"--head-dim must be even (RoPE pairs), got {head_dim}")
    devices = _devices(device)
    base = _validate("kernels", save_baseline, baseline, plot_path, fail_on_regression)
    peers, peers_missing = _peers(ctx, peers, devices)
    ops = ops or list(K.OPS)
    shape = K.Shape(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    budget = DEFAULT_BUDGET_S if time_budget is None else time_budget

    machine = describe(devices)
    limits = _limits(devices, limits_mode, repeat, _say)
    jit, rows = {}, []
    for dev in devices:
        _say(f"JIT warm-up on {dev} (compiling or loading every kernel, outside the timings)...")
        hits0, miss0 = jit_cache_counts()
        spent = K.jit_warmup(ops, dev)
        hits1, miss1 = jit_cache_counts()
        jit[dev] = {"seconds": sum(spent.values()), "per_op": spent,
                    "cache_hits": hits1 - hits0, "compiled": miss1 - miss0}
    load = machine["load_avg"]
    machine = describe(devices)         # the threading layer is known once a kernel ran
    machine["load_avg"] = load          # the load before this run added its own
    lim_objs = {dev: Limits.from_dict(limits[dev]) if dev in limits else None for dev in devices}

    steps = [(dev, op, size) for dev in devices for op, size in K.plan(ops, sizes)]
    with click.progressbar(steps, label="bench kernels", file=sys.stderr,
                           item_show_func=lambda s: s and f"{s[1]}/{s[2]} on {s[0]}") as bar:
        for dev, op, size in bar:
            d = K.Device(dev, peers)
            try:
                cases = K.build(op, size, shape, d)
            except Exception as e:      # cannot even set up (e.g. out of memory): one row says
                cases = [K.Case(op, size, f"setup failed: {K._first_line(e)}")]
            for case in cases:
                rows.append(K.run_case(case, lim_objs[dev], device=dev, repeat=repeat,
                                       budget_s=budget))
            del cases

    # compilation the tiny warm-up could not reach (kernels specialised on the full shapes)
    # is paid at the rows' first calls, which no timing includes: report it beside the JIT
    for dev in devices:
        extra = [r["ours"]["compile_s"] for r in rows
                 if r["device"] == dev and "compile_s" in r["ours"]]
        jit[dev]["first_calls_extra_s"] = sum(x for x in extra if x > 0.01)
    result = {
        "kind": "kernels", "version": 1, "title": "numba-attn bench kernels", "date": _now(),
        "command": _command(ctx), "machine": machine, "limits": limits, "jit": jit,
        "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                  "hidden": shape.hidden, "dtype": "float32"},
        "settings": {"repeat": repeat, "time_budget_s": budget, "peers": list(peers)},
        "peers_missing": peers_missing,
        "notes": [f"shapes: hidden {shape.hidden} = {heads} heads x head_dim {head_dim}, "
                  f"float32; decode_attention {heads}/{kv_heads} heads"],
        "rows": rows,
    }
    _finish(result, fmt, save_baseline, base, baseline, plot_path, fail_on_regression)


def _peers(ctx, peers, devices):
    """(peers to run, {peer: why it is missing}). torch named on the command line must be
    importable; the default leaves it out where it is not, and the output says why."""
    peers = () if "none" in peers else tuple(peers)
    missing = {}
    if "torch" in peers:
        why = {dev: K.torch_unavailable(dev) for dev in devices}
        asked = ctx.get_parameter_source("peers") != click.core.ParameterSource.DEFAULT
        if all(why.values()):
            if asked:
                raise click.ClickException(f"--peers torch: {why[devices[0]]} (or leave it "
                                           f"out: --peers numpy)")
            peers = tuple(p for p in peers if p != "torch")
        for dev, w in why.items():
            if w:
                missing[f"torch peer{'' if len(devices) == 1 else ' on ' + dev}"] = \
                    w + ("" if "torch" in peers else "; no PyTorch column")
        for name, w in missing.items():
            _say(f"note: {name}: {w}")
    return peers, missing


# -- bench model -----------------------------------------------------------------------------

@bench.command("model")
@click.option("--model", "model_dir", metavar="DIR", default=None,
              help="Hugging Face model folder. [default: the built-in demo model if installed, "
                   "else a random TinyLlama-1.1B-shaped model]")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Layers of the random TinyLlama-shaped model, >= 1 (fewer: faster, "
                   "said in the output). [default: 22, TinyLlama's]")
@click.option("-p", "--pp", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt tokens of the prefill test (pp), >= 0; 0 = skip.")
@click.option("-n", "--tg", type=click.IntRange(min=0), default=128, show_default=True,
              help="Tokens of the generation test (tg), >= 0; 0 = skip.")
@click.option("--weight-dtype", type=click.Choice(WEIGHT_DTYPE_CHOICES), default="auto",
              show_default=True,
              help="Storage of the weights: auto (a checkpoint's own type; float32 for the "
                   "random model), float32, bfloat16, float16 or q8_0; fewer bytes, a faster "
                   "decode.")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPE_CHOICES), default="auto",
              show_default=True,
              help="Storage of the KV cache: auto (as `generate`: on the CPU 16 bits with "
                   "16-bit or q8_0 weights), float32, float16 or bfloat16 (CPU only).")
@click.option("--breakdown/--no-breakdown", default=True, show_default=True,
              help="Time one decoder layer stage by stage (prefill at pp tokens, and decode "
                   "of one token at position pp).")
@_common(plot_help="Draw the layer breakdown (--breakdown, the default): each stage's time "
                   "in the layer and alone, a panel for prefill and one for decode",
         devices_help="Where to run: cpu or cuda (one device at a time).")
@click.pass_context
def model_cmd(ctx, model_dir, layers, pp, tg, weight_dtype, kv_dtype, breakdown, device, repeat,
              time_budget, limits_mode, fmt, save_baseline, baseline, fail_on_regression, plot_path):
    """llama-bench style: prefill (pp) and generation (tg) tokens/s, time to first token, and
    where one decoder layer's time goes."""
    import os

    from . import model as M
    if pp == 0 and tg == 0 and not breakdown:
        raise click.UsageError("nothing to run: -p and -n are 0 and --no-breakdown is set")
    if model_dir is not None and layers is not None:
        raise click.UsageError("--layers shapes the random model; it cannot be used with "
                               "--model")
    if model_dir is not None and not os.path.isdir(model_dir):
        raise click.ClickException(f"model folder not found: {model_dir}")
    devices = _devices(device)
    if len(devices) > 1:
        raise click.UsageError("bench model runs on one device at a time: --device cpu or "
                               "--device cuda")
    dev = devices[0]
    if plot_path is not None and not breakdown:
        raise click.UsageError("--plot draws the layer breakdown, which --no-breakdown turns "
                               "off: drop one of them")
    base = _validate("model", save_baseline, baseline, plot_path, fail_on_regression)
    budget = 5.0 if time_budget is None else time_budget

    _say("loading the model..." if model_dir else "setting up the model...")
    try:
        model, model_desc = M.load_model(model_dir, layers=layers, max_seq=max(pp, tg, 1),
                                         device=dev, weight_dtype=weight_dtype,
                                         kv_dtype=kv_dtype)
    except (ValueError, OSError) as e:
        raise click.ClickException(f"cannot load the model: {e}") from None
    fitted = []
    for name, flag, n in (("pp", "-p", pp), ("tg", "-n", tg)):
        if n > model.max_seq:     # only the default demo model is loaded shorter than asked
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"{flag} {n} exceeds the model's context of "
                                       f"{model.max_seq} tokens")
            fitted.append(f"{name} {n} -> {model.max_seq}, the demo model's context")
    pp, tg = min(pp, model.max_seq), min(tg, model.max_seq)
    limits = _limits(devices, limits_mode, repeat, _say)
    lim = Limits.from_dict(limits[dev]) if dev in limits else None

    _say("JIT warm-up (a 2-token prefill and a decode step, outside the timings)...")
    import time
    hits0, miss0 = jit_cache_counts()
    t0 = time.perf_counter()
    model.warmup()
    jit = {dev: {"seconds": time.perf_counter() - t0, "cache_hits": jit_cache_counts()[0] - hits0,
                 "compiled": jit_cache_counts()[1] - miss0}}

    steps = (["generation"] if pp or tg else []) + \
        (["prefill", "decode"] if breakdown else [])
    gen, bds = {}, {}
    with click.progressbar(steps, label="bench model", file=sys.stderr,
                           item_show_func=lambda s: s) as bar:
        for step in bar:
            if step == "generation":
                gen = M.bench_generation(model, pp=pp, tg=tg, repeat=repeat, budget_s=budget)
            elif step == "prefill":
                seq = max(pp, 1)
                bds[f"prefill{seq}"] = M.breakdown(model, seq=seq, pos=0, limits=lim,
                                                   repeat=repeat, budget_s=min(budget, 0.5))
            else:
                bds[f"decode@{pp}"] = M.breakdown(model, seq=1, pos=pp, limits=lim,
                                                  repeat=repeat, budget_s=min(budget, 0.5))

    notes = [f"model: {model_desc}; weights {M.model_weight_bytes(model) / 1e9:.2f} GB"]
    if fitted:
        notes.append("shortened to fit: " + "; ".join(fitted) + " (--layers N for the "
                     "TinyLlama-shaped model)")
    model_line = None
    if layers is not None:
        demo = os.path.isfile(os.path.join(M.DEMO_MODEL, "config.json"))
        model_line = (f"model under test: a random TinyLlama-1.1B-shaped model with {layers} "
                      f"of TinyLlama's {M.TINYLLAMA['n_layers']} layers (--layers {layers})"
                      f"{', in place of the built-in demo model' if demo else ''}; random "
                      f"weights: the tokens/s are this model's, its tokens mean nothing")
    if breakdown and dev == "cuda":
        notes.append("layer breakdown on cuda: wall time with a synchronize after each stage, "
                     "so each stage pays its launch cost (~20 us a kernel)")
    rows = _model_rows(gen, bds, dev)
    for label, bd in bds.items():
        if label.startswith("decode") and "tg" in gen:
            layer = bd["rows"][-1]["median"]
            per_token = gen["tg"]["stats"]["median"] / gen["tg"]["tokens"]
            c = model.config
            est = layer * c.n_layers
            bd["per_token_line"] = (
                f"{c.n_layers} layer{'' if c.n_layers == 1 else 's'} x {layer * 1e3:.3f} ms = "
                f"{est * 1e3:.2f} ms of a measured {per_token * 1e3:.2f} ms per generated token "
                f"({100 * est / per_token:.0f}%; "
                f"the rest: embedding, final norm, lm_head {c.vocab_size}x{c.hidden_size}, argmax "
                f"and Python; tg's attention sees 0..{gen['tg']['tokens'] - 1} positions, this "
                f"layer {pp})")
    result = {
        "kind": "model", "version": 1, "title": "numba-attn bench model", "date": _now(),
        "command": _command(ctx), "machine": describe(devices), "limits": limits, "jit": jit,
        "model": model_desc, "n_layers": model.config.n_layers, "device": dev,
        "settings": {"pp": pp, "tg": tg, "repeat": repeat, "time_budget_s": budget},
        "notes": notes, "model_line": model_line, "generation": gen, "breakdown": bds,
        "rows": rows,
    }
    _finish(result, fmt, save_baseline, base, baseline, plot_path, fail_on_regression)


def _model_rows(gen, bds, dev):
    """Flat rows (name, device, ours) for csv and baselines."""
    rows = []
    for key in ("pp", "tg", "ttft"):
        if key in gen:
            g = gen[key]
            name = f"{key}{g['tokens']}" if key != "ttft" else f"ttft/{g['tokens']}"
            rows.append({"name": name, "device": dev, "ours": g["stats"],
                         "tok_s": g.get("tok_s"), "gbs": g.get("gbs")})
    for label, bd in bds.items():
        for r in bd["rows"]:
            rows.append({"name": f"layer/{label}: {r['stage']}", "device": dev,
                         "ours": r["stats"], "median": r["median"], "share": r["share"],
                         "gbs": r.get("gbs"), "gflops": r.get("gflops")})
    return rows


# -- bench jit -------------------------------------------------------------------------------

@bench.command("jit")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Output: text, md, csv or json.")
def jit_cmd(fmt):
    """Cold against warm start: the first call of every public function compiling its
    kernels, then loading them from Numba's cache.

    \b
    Two fresh processes time each first call (CPU kernels, small inputs):
      cold: an empty Numba cache, so each first call compiles;
      warm: a second process on the cache the first wrote, so each loads.
    Also timed: `import numba_attn` in each. Slow: compiles everything once.
    --device does not apply (the CPU kernels only)."""
    from .jit import cold_and_warm, format_jit
    _say("compiling the whole API in a fresh process with an empty cache (may take a minute)...")
    click.echo(format_jit(cold_and_warm(), fmt), nl=False)
