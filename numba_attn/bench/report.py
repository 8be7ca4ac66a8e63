"""Presenting a run: the terminal table, md / csv / json, baselines, and the plot.

A run is one JSON-able dict ("result"): kind ("kernels" or "model"), date, command, machine,
limits, jit, and "rows", each with a "name", a "device" and "ours" (timing.Stats as a dict).
Baselines are such results saved as JSON files; comparing matches rows by (name, device).
"""
import csv
import io
import json
import math
import os
import re

from .candle_reference import SOURCE_FILE
from .limits import Limits, roofline
from .machine import describe_lines
from .timing import format_time

NOISE = 0.02       # changes smaller than 2% are never flagged, whatever the intervals say
BASELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class BaselineError(Exception):
    """A baseline that cannot be saved or loaded (the message says why)."""


# -- helpers -------------------------------------------------------------------------------

def _ok(stats):
    """Stats of a measurement that ran (an error entry or a derived row has none)."""
    return isinstance(stats, dict) and "ci_low" in stats and stats["median"] == stats["median"]


def _ratio(x):
    if x is None or x != x:
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def _rate(row):
    """'48.1 GB/s' or '152 GFLOP/s': the rate of the binding resource (or the one known)."""
    gbs, gflops = row.get("gbs"), row.get("gflops")
    if row.get("bound") == "compute" or (gflops and not gbs):
        return _si(gflops * 1e9, "FLOP/s") if gflops else "-"
    return _si(gbs * 1e9, "B/s") if gbs else "-"


def _si(x, unit):
    """48.1 GB/s, 152 GFLOP/s, 3.20 MB/s."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
        if abs(x) >= scale or prefix == "":
            v = x / scale
            digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
            return f"{v:.{digits}f} {prefix}{unit}"


def _share(row, key="share"):
    """'61% read BW', '40% cache BW', '33% sgemm'; never above 100%: a rate beyond every
    limit measured for it says where it ran ('in cache', 'above sgemm') and gives no share."""
    s, bound = row.get(key), row.get("bound")
    if s is None:
        return {"cache": "in cache", "compute": "above sgemm"}.get(bound, "-")
    what = {"memory": "read BW", "cache": "cache BW", "compute": "sgemm"}.get(bound, "")
    return f"{100 * min(s, 1.0):.0f}% {what}".strip()


def _ci(stats):
    return f"[{format_time(stats['ci_low'])}, {format_time(stats['ci_high'])}]"


def format_difference(stats):
    """(time, interval) cells of a difference of two timings (timing.difference as a dict),
    never a negative time: above its noise, the difference and its 95% interval; within it
    (the interval holds 0), '~0 (within ±X noise)'; below it, what the first saves over the
    second ('saves X', ±noise)."""
    med = stats["median"]
    noise = (stats["ci_high"] - stats["ci_low"]) / 2
    if stats["ci_low"] > 0:
        return format_time(med), _ci(stats)
    if stats["ci_high"] < 0:
        return f"saves {format_time(-med)}", f"±{format_time(noise)}"
    return f"~0 (within ±{format_time(noise)} noise)", ""


def _is_difference(stats):
    return _ok(stats) and "parts" in stats


def _peer_time(row, peer):
    p = row["peers"].get(peer)
    if p is None:
        return "-"
    return format_time(p["median"]) if _ok(p) else "n/a"


def _table(header, rows, fmt):
    """Aligned text (fmt 'text') or a markdown pipe table."""
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    out = []
    for r in [header] + rows:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _preamble(result, fmt):
    """The machine, limits and JIT lines, as '# ...' (text) or a bullet list (md)."""
    lines = [f"{result['title']} -- {result['date']}", f"command: {result['command']}"]
    lines += describe_lines(result["machine"])
    load = result["machine"].get("load_avg")
    cores = result["machine"].get("cores") or 1
    if load is not None and load > 0.5 * cores:
        lines.append(f"WARNING: the machine was busy (1-minute load average {load:.1f} on "
                     f"{cores} cores at the start): parallel kernels wait for descheduled "
                     f"threads, so their timings are inflated; rerun on a quiet machine")
    for dev, lim in result.get("limits", {}).items():
        lines.append(_limits_line(lim))
    for dev, jit in result.get("jit", {}).items():
        lines.append(_jit_line(dev, jit))
    lines += result.get("notes", [])
    if fmt == "md":
        return "\n".join(f"- {line}" for line in lines)
    return "\n".join(f"# {line}" for line in lines)


def _limits_line(lim):
    if lim is None:
        return "limits: not measured (--no-limits)"
    readers = ", ".join(f"{k} {v:.1f}" for k, v in lim["readers"].items())
    how = "device-to-device" if lim["device"] == "cuda" else "NumPy, 1 thread,"
    copy = (f"; copy {lim['copy_gbs']:.1f} GB/s ({how} read + write)"
            if lim.get("copy_gbs") else "")
    sgemm = (f"; sgemm {lim['sgemm_gflops']:.1f} GFLOP/s ({lim['sgemm_source']})"
             if lim.get("sgemm_gflops") else "; sgemm: not measured")
    small = " [small arrays: cache-assisted, not the true limits]" if lim.get("small") else ""
    cache = (f"; cache read {lim['cache_read_gbs']:.1f} GB/s (1 MiB read again and again: "
             f"the limit of rows faster than memory)" if lim.get("cache_read_gbs") else "")
    return (f"limits on {lim['device']}: read {lim['read_gbs']:.1f} GB/s (best of: {readers})"
            f"{copy}{cache}{sgemm}{small}")


def _jit_line(dev, jit):
    how = ("loaded from Numba's cache" if jit.get("compiled", 0) == 0
           else f"{jit['compiled']} compiled, {jit.get('cache_hits', 0)} from cache")
    extra = jit.get("first_calls_extra_s") or 0
    more = (f"; the rows' first calls cost {extra:.2f} s more than warm calls (compilation "
            f"for the full shapes, first touch of memory; also untimed)" if extra > 0.05 else "")
    return (f"JIT warm-up on {dev} (outside every timing): {jit['seconds']:.2f} s, kernels "
            f"{how}{more}")


# -- kernels -------------------------------------------------------------------------------

def _kernel_rows(result, fmt):
    has_base = any("baseline" in r for r in result["rows"])
    base = result.get("baseline_name", "baseline")
    peers = [p for p in PEER_COLUMNS if p in _peers_run(result)]
    header = ["op/size", "device", "ours", "95% CI", "min..max"]
    for p in peers:
        header += PEER_COLUMNS[p]
    header += ["achieved", "of limit", "Candle", "Candle/ours"]
    if has_base:
        header.append(f"vs {base}")
    rows = []
    for r in result["rows"]:
        o = r["ours"]
        if _is_difference(o):           # min..max of a difference bounds nothing measured
            (ours, ci), mm = format_difference(o), "-"
        elif _ok(o):
            ours, ci = format_time(o["median"]), _ci(o)
            mm = f"{format_time(o['min'])}..{format_time(o['max'])}"
        else:
            ours, ci, mm = "n/a", "", ""
        candle = r.get("candle")
        cells = [r["name"], r["device"], ours, ci, mm]
        for p in peers:
            cells += [_peer_time(r, p), _ratio(r["speedup"].get(p))]
        cells += [_rate(r), _share(r),
                 format_time(candle["median"]) if candle else "-",
                 _ratio(r.get("candle_speedup"))]
        if has_base:
            cells.append(_baseline_cell(r.get("baseline")))
        rows.append(cells)
    return header, rows


PEER_COLUMNS = {"numpy": ["NumPy", "NumPy/ours"], "torch": ["PyTorch", "torch/ours"]}


def _peers_run(result):
    """The peers this run timed (a run saved before settings.peers: every peer it has)."""
    peers = (result.get("settings") or {}).get("peers")
    if peers is None:
        peers = {p for r in result["rows"] for p in r.get("peers", {})}
    return set(peers)


def _footnotes(result):
    notes, seen = [], set()
    for r in result["rows"]:
        if r.get("note") and (r["op"], r.get("variant"), r["note"]) not in seen:
            seen.add((r["op"], r.get("variant"), r["note"]))
            label = r["op"] + (f" [{r['variant']}]" if r.get("variant") else "")
            notes.append(f"{label}: {r['note']}")
    for r in result["rows"]:
        o = r["ours"]
        if _is_difference(o):
            w, wo = o["parts"]["with"], o["parts"]["without"]
            notes.append(f"{r['name']} on {r['device']}: ours is a difference of two timings, "
                         f"{format_time(w['median'])} {_ci(w)} - {format_time(wo['median'])} "
                         f"{_ci(wo)}; its noise is their intervals' half-widths added in "
                         f"quadrature")
    for r in result["rows"]:
        if "error" in r["ours"]:
            notes.append(f"{r['name']} on {r['device']}, ours not measured: {r['ours']['error']}")
        for peer, p in r["peers"].items():
            if "error" in p:
                notes.append(f"{r['name']} on {r['device']}, {peer} not measured: {p['error']}")
    return notes


def format_kernels(result, fmt="text"):
    if fmt == "json":
        return json.dumps(result, indent=1, default=_json_default)
    if fmt == "csv":
        return _kernels_csv(result)
    header, rows = _kernel_rows(result, fmt)
    legend = ("ours: median seconds per call of numba-attn's public function, with the 95% "
              "bootstrap confidence interval of the median; X/ours: X's time over ours (above "
              "1: ours is faster); achieved: bytes or FLOPs over the median, whichever is "
              "nearer its measured limit (of limit: the read bandwidth, or the cache read rate "
              "for a row faster than memory, its data in cache; 'in cache' where it passes "
              "that too)")
    notes = [legend, _candle_legend(result)] + _peer_notes(result)
    if any("baseline" in r for r in result["rows"]):
        notes.append(_baseline_legend(result))
    parts = [_preamble(result, fmt), "", _table(header, rows, fmt), ""]
    notes += _footnotes(result)
    parts.append("\n".join(("- " if fmt == "md" else "  ") + n for n in notes))
    return "\n".join(parts) + "\n"


def _candle_legend(result):
    shape = result.get("shape") or {}
    other = ("; this run's shapes are not the profile's (hidden 4096 = 32 x 128), so the "
             "column compares different sizes" if shape and
             (shape.get("heads"), shape.get("head_dim")) != (32, 128) else "")
    return (f"Candle: a reference profile's figure, not measured here: criterion's middle "
            f"estimate, from another machine the profile does not describe, on the CPU only "
            f"(figures, source and machine: {SOURCE_FILE}){other}")


def _peer_notes(result):
    """Why a peer asked for has no figures (PyTorch not installed, or without the GPU)."""
    return [f"{name}: {why}" for name, why in (result.get("peers_missing") or {}).items()]


def _baseline_legend(result):
    name = result.get("baseline_name", "baseline")
    return (f"vs {name}: change of the median from the saved baseline {name!r}"
            f"{' (' + result['baseline_date'] + ')' if result.get('baseline_date') else ''}; "
            f"REGRESSED / improved: the 95% intervals do not overlap and the change passes "
            f"{100 * NOISE:.0f}%; ~: within the noise (intervals overlap, or a change under "
            f"{100 * NOISE:.0f}%); new: a row the baseline does not have")


def _kernels_csv(result):
    buf = io.StringIO()
    cols = ["name", "op", "size", "variant", "device", "ours_median_s", "ours_ci_low_s",
            "ours_ci_high_s", "ours_min_s", "ours_max_s", "ours_samples", "first_call_s",
            "numpy_median_s", "numpy_over_ours", "torch_median_s", "torch_over_ours", "gb_s",
            "gflop_s", "bound", "limit_share", "candle_median_s", "candle_over_ours",
            "baseline_median_s", "baseline_change", "baseline_verdict", "note", "error"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in result["rows"]:
        o, b = r["ours"], r.get("baseline") or {}
        np_, to = r["peers"].get("numpy", {}), r["peers"].get("torch", {})
        errors = [o.get("error")] + [f"{k}: {p['error']}" for k, p in r["peers"].items()
                                     if "error" in p]
        diff = _is_difference(o)          # min and max of a difference bound no sample
        w.writerow([r["name"], r["op"], r["size"], r.get("variant", ""), r["device"],
                    o.get("median"), o.get("ci_low"), o.get("ci_high"),
                    None if diff else o.get("min"), None if diff else o.get("max"), o.get("n"), o.get("first_call_s"), np_.get("median"),
                    r["speedup"].get("numpy"), to.get("median"), r["speedup"].get("torch"),
                    r.get("gbs"), r.get("gflops"), r.get("bound"), r.get("share"),
                    (r.get("candle") or {}).get("median"), r.get("candle_speedup"),
                    b.get("median"), b.get("change"), b.get("verdict"), r.get("note", ""),
                    "; ".join(e for e in errors if e)])
    return buf.getvalue()


# -- model ---------------------------------------------------------------------------------

def format_model(result, fmt="text"):
    if fmt == "json":
        return json.dumps(result, indent=1, default=_json_default)
    if fmt == "csv":
        return _model_csv(result)
    has_base = any("baseline" in r for r in result["rows"])
    base = result.get("baseline_name", "baseline")
    by_name = {r["name"]: r for r in result["rows"]}
    parts = [_preamble(result, fmt), ""]
    if result.get("model_line"):
        parts += [result["model_line"], ""]
    gen = result["generation"]
    header = ["test", "tokens/s", "time (median)", "95% CI", "min..max", "notes"]
    if has_base:
        header.append(f"vs {base}")
    rows = []
    for key in ("pp", "tg", "ttft"):
        if key not in gen:
            continue
        g = gen[key]
        s = g["stats"]
        name = f"{key}{g['tokens']}" if key != "ttft" else f"ttft/{g['tokens']}"
        rate = f"{g['tok_s']:.2f}" if "tok_s" in g else "-"
        note = ""
        if key == "tg":
            note = f"weights {g['weight_bytes'] / 1e9:.2f} GB/token -> {g['gbs']:.1f} GB/s"
            lim = next(iter(result.get("limits", {}).values()), None)
            if lim:
                bound, share = roofline(g["gbs"], None, Limits.from_dict(lim))
                note += f" ({_share({'bound': bound, 'share': share})})"
        elif key == "pp":
            note = f"{g['tokens']} tokens in one pass"
        else:
            note = f"prompt of {g['tokens']} tokens to the first token id"
        cells = [name, rate, format_time(s["median"]), _ci(s),
                 f"{format_time(s['min'])}..{format_time(s['max'])}", note]
        if has_base:
            cells.append(_baseline_cell(by_name.get(name, {}).get("baseline")))
        rows.append(cells)
    if rows:
        parts += [_table(header, rows, fmt), ""]
    for label, bd in result.get("breakdown", {}).items():
        parts.append(_breakdown_title(label, bd, result) + ("\n" if fmt == "md" else ""))
        header = ["stage", "in layer", "95% CI", "share", "alone", "achieved", "of limit"]
        if has_base:
            header.append(f"vs {base}")
        rows = []
        for r in bd["rows"]:
            st, alone = r.get("stats"), r.get("alone")
            cells = [r["stage"], _unaccounted(r) if "noise" in r else format_time(r["median"]),
                     _ci(st) if st else "",
                     f"{100 * r['share']:.1f}%", format_time(alone["median"]) if alone else "-",
                     _rate(r) if st else "-", _share(r, "limit_share") if st else "-"]
            if has_base:
                cells.append(_baseline_cell(by_name.get(f"layer/{label}: {r['stage']}", {})
                                            .get("baseline")))
            rows.append(cells)
        parts += [_table(header, rows, fmt), ""]
        if bd.get("per_token_line"):
            parts += [bd["per_token_line"], ""]
    if has_base:
        parts += [_baseline_legend(result), ""]
    return "\n".join(parts) + "\n"


def _unaccounted(row):
    """The layer total's median minus the stages' medians, never a negative time: within the
    noise of the timings it comes from, '~0 (within ±X noise)'."""
    rest, noise = row["median"], row["noise"]
    if abs(rest) <= noise:
        return f"~0 (within ±{format_time(noise)} noise)"
    if rest < 0:
        return f"~0 (the stages' medians add up to {format_time(-rest)} more)"
    return format_time(rest)


def _breakdown_title(label, bd, result):
    n = result.get("n_layers")
    what = (f"prefill of {bd['seq']} tokens" if label.startswith("prefill")
            else f"decode of 1 token at position {bd['pos']}")
    return (f"one decoder layer ({what}; public kernels on buffers shaped like the model's "
            f"layer{', 1 of ' + str(n) if n else ''}): each stage timed in place in the running "
            f"layer (shares of the layer total, adding up to 100%) and alone in a loop:")


def _model_csv(result):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "device", "median_s", "ci_low_s", "ci_high_s", "min_s", "max_s",
                "samples", "tokens_per_s", "share_of_layer", "gb_s", "gflop_s",
                "baseline_median_s", "baseline_change", "baseline_verdict"])
    for r in result["rows"]:
        o, b = r["ours"] or {}, r.get("baseline") or {}
        w.writerow([r["name"], r["device"], r.get("median", o.get("median")), o.get("ci_low"),
                    o.get("ci_high"), o.get("min"), o.get("max"), o.get("n"), r.get("tok_s"), r.get("share"),
                    r.get("gbs"), r.get("gflops"), b.get("median"), b.get("change"),
                    b.get("verdict")])
    return buf.getvalue()


def format_result(result, fmt="text"):
    return (format_model if result["kind"] == "model" else format_kernels)(result, fmt)


def _json_default(o):
    if hasattr(o, "item"):            # NumPy scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- baselines -----------------------------------------------------------------------------

def baseline_dir():
    """$NUMBA_ATTN_HOME/baselines, else $XDG_CACHE_HOME (or ~/.cache)/numba-attn/baselines."""
    home = os.environ.get("NUMBA_ATTN_HOME")
    if home:
        return os.path.join(home, "baselines")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "numba-attn", "baselines")


def check_baseline_name(name):
    if not BASELINE_NAME.match(name or ""):
        raise BaselineError(f"baseline name {name!r} is not valid: use letters, digits, '.', "
                            f"'_' and '-' (at most 100, not starting with '.', '_' or '-')")
    return name


def baseline_path(name, kind):
    return os.path.join(baseline_dir(), f"{kind}-{check_baseline_name(name)}.json")


def saved_baselines(kind):
    try:
        files = sorted(os.listdir(baseline_dir()))
    except OSError:
        return []
    return [f[len(kind) + 1:-5] for f in files if f.startswith(kind + "-") and f.endswith(".json")]


def save_baseline(name, result):
    path = baseline_path(name, result["kind"])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=_json_default)
        os.replace(tmp, path)
    except OSError as e:
        raise BaselineError(f"cannot save baseline {name!r} to {path}: {e.strerror or e}") \
            from None
    return path


def load_baseline(name, kind):
    path = baseline_path(name, kind)
    if not os.path.isfile(path):
        saved = saved_baselines(kind)
        have = f"saved {kind} baselines: {', '.join(saved)}" if saved else \
            f"no {kind} baselines saved yet (save one with --save-baseline NAME)"
        raise BaselineError(f"baseline {name!r} not found in {baseline_dir()} ({have})")
    try:
        with open(path) as f:
            base = json.load(f)
        if base.get("kind") != kind or not isinstance(base.get("rows"), list):
            raise ValueError("not a saved benchmark run")
    except (OSError, ValueError) as e:
        raise BaselineError(f"baseline {name!r} ({path}) cannot be read: {e}") from None
    return base


def compare(result, base, name, noise=NOISE):
    """Attach row["baseline"] = {median, change, verdict} to every row the baseline also has.

    verdict: 'regressed' when the 95% intervals do not overlap and ours is slower by more than
    `noise`; 'improved' likewise faster; else 'within noise'. Returns the regressed rows."""
    index = {(r["name"], r["device"]): r for r in base["rows"]}
    regressed = []
    for r in result["rows"]:
        b = index.get((r["name"], r["device"]))
        if b is None:
            continue
        cur, old = r.get("ours") or {}, b.get("ours") or {}
        if not (_ok(cur) and _ok(old)):
            continue
        change = cur["median"] / old["median"] - 1 if old["median"] > 0 else None
        big = change is None or abs(change) > noise
        if cur["ci_low"] > old["ci_high"] and big:
            verdict = "regressed"
            regressed.append(r)
        elif cur["ci_high"] < old["ci_low"] and big:
            verdict = "improved"
        else:
            verdict = "within noise"
        r["baseline"] = {"median": old["median"], "ci_low": old["ci_low"],
                         "ci_high": old["ci_high"], "change": change, "verdict": verdict}
    result["baseline_name"] = name
    result["baseline_date"] = base.get("date")
    return regressed


def _baseline_cell(b):
    if not b:
        return "new"
    ch = b.get("change")
    pct = f"{100 * ch:+.1f}%" if ch is not None else \
        f"{format_time(b['median'])} before"
    mark = {"regressed": "REGRESSED", "improved": "improved"}.get(b["verdict"], "~")
    return f"{pct} {mark}"


# -- plot ----------------------------------------------------------------------------------

def plot_available():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


PLOT_MISSING = ("--plot needs matplotlib, which is not installed; install the extra: "
                "pip install 'numba-attn[plot]'")


def _plottable(stats):
    """A positive time (log axes): a measurement, a Candle figure, or a difference above
    its noise."""
    if _is_difference(stats):
        return stats["ci_low"] > 0
    m = stats.get("median") if isinstance(stats, dict) else None
    return m is not None and m == m and m > 0


def kernels_plot_data(result):
    """The kernels plot's panels, one per (op, variant, device): {title, xlabel, series:
    {label: [(size, seconds)]}}; only positive times (a difference within its noise has no
    point: log axes)."""
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["op"], r.get("variant", ""), r["device"]), []).append(r)
    names = {"numpy": "NumPy", "torch": "PyTorch"}
    panels = []
    for (op, variant, device), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["size"])
        stats = {"numba-attn": [r["ours"] for r in rows]}
        for peer in sorted(_peers_run(result), key=list(names).index):
            stats[names[peer]] = [r["peers"].get(peer, {}) for r in rows]
        stats["Candle (reference)"] = [r.get("candle") or {} for r in rows]
        series = {}
        for label, column in stats.items():
            pts = [(r["size"], st["median"]) for r, st in zip(rows, column) if _plottable(st)]
            if pts:
                series[label] = pts
        panels.append({"title": f"{op}" + (f" [{variant}]" if variant else "") + f" ({device})",
                       "xlabel": "kv_len" if op == "decode_attention" else "sequence length",
                       "series": series})
    return panels


def model_plot_data(result):
    """The model plot's panels, one per breakdown (prefill, decode): {title, stages,
    in_layer, alone} (seconds, the stages in layer order; no total, no 'unaccounted')."""
    panels = []
    for label, bd in (result.get("breakdown") or {}).items():
        rows = [r for r in bd["rows"] if r.get("stats") and r["stage"] != "layer total"]
        what = (f"prefill of {bd['seq']} tokens" if label.startswith("prefill")
                else f"decode of 1 token at position {bd['pos']}")
        panels.append({"title": f"one decoder layer, {what}",
                       "stages": [r["stage"] for r in rows],
                       "in_layer": [r["median"] for r in rows],
                       "alone": [(r.get("alone") or {}).get("median") for r in rows]})
    return panels


def plot(result, path):
    """Kernels: time against size for each op (log-log), ours against the peers and Candle.
    Model: each stage of one decoder layer, its time in the layer and alone. A model run
    without a breakdown has nothing to draw (the CLI refuses --plot with --no-breakdown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result["kind"] == "model":
        panels = model_plot_data(result)
        if not panels:
            raise ValueError("nothing to plot: the run has no layer breakdown")
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
        for ax, p in zip(axes[0], panels):
            ys = range(len(p["stages"]))
            ax.barh([y - 0.2 for y in ys], [1e6 * t for t in p["in_layer"]], height=0.4,
                    label="in the layer")
            ax.barh([y + 0.2 for y in ys], [1e6 * (t or 0) for t in p["alone"]], height=0.4,
                    label="alone, in a loop")
            ax.set_yticks(list(ys), p["stages"])
            ax.invert_yaxis()
            ax.set_xlabel("us (median)")
            ax.set_title(p["title"])
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    panels = kernels_plot_data(result)
    n = len(panels)
    cols = min(3, n) or 1
    rows_n = math.ceil(n / cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for label, pts in p["series"].items():
            ax.plot(*zip(*pts), marker="o", label=label,
                    linestyle="--" if label.startswith("Candle") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel("seconds")
        ax.set_title(p["title"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
