"""`numba-attn bench`: options, outputs, baselines and errors at tiny sizes. No speed is
asserted: these runs are far too small (and CI machines too noisy) to mean anything."""
import csv
import io
import json
import os

import pytest
from click.testing import CliRunner

from numba_attn.bench import report, timing
from numba_attn.bench import kernels as K
from numba_attn.bench.cli import bench
from numba_attn.bench.machine import cuda_available

# tiny shapes, few samples, short warm-ups, no limit measurement: each run takes seconds
TINY = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--repeat", "2",
        "--time-budget", "0.01", "--limits", "none"]
ONE_OP = ["--ops", "full_attention", "--sizes", "1,8", "--peers", "numpy"] + TINY


@pytest.fixture(autouse=True)
def bench_home(tmp_path, monkeypatch):
    """Baselines go to a fresh folder in every test."""
    monkeypatch.setenv("NUMBA_ATTN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(args):
    return CliRunner().invoke(bench, args)


def ok(args):
    r = run(args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


def clean_error(r, *words):
    """One clean 'Error: ...' line on stderr, non-zero exit, no traceback."""
    assert r.exit_code != 0
    assert isinstance(r.exception, SystemExit), r.exception
    err = r.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in r.output
    last = err.splitlines()[-1]
    assert last.startswith("Error:"), err
    for w in words:
        assert w in last, last
    return last


# -- the kernels table -------------------------------------------------------------------------

def test_default_runs_kernels_every_op_text_table():
    r = ok(["--sizes", "1,8"] + TINY)          # no subcommand: `kernels`
    out = r.stdout
    for op in K.OPS:
        assert f"{op}/1" in out and f"{op}/8" in out
    for variant in ("build", "cache hit", "in softmax"):
        assert f"causal_mask/8 [{variant}]" in out
    assert "# cpu:" in out and "# versions:" in out and "numba" in out
    assert "JIT warm-up on cpu" in out
    assert "Candle" in out and "NumPy/ours" in out


def test_kernels_subcommand_rows_and_ops_selection():
    r = ok(["kernels"] + ONE_OP + ["--format", "json"])
    res = json.loads(r.stdout)
    assert [row["name"] for row in res["rows"]] == ["full_attention/1", "full_attention/8"]
    for row in res["rows"]:
        o = row["ours"]
        assert o["n"] == 2
        assert o["min"] <= o["median"] <= o["max"]
        assert o["ci_low"] <= o["median"] <= o["ci_high"]
        assert o["first_call_s"] > 0
        assert set(row["peers"]) == {"numpy"}
        assert row["speedup"]["numpy"] > 0
        assert row["flops"] > 0 and row["gflops"] > 0
    assert res["rows"][0]["candle"]["median"] == pytest.approx(11.492e-6)
    assert res["machine"]["numba_threads"] >= 1
    assert res["shape"] == {"heads": 4, "kv_heads": 2, "head_dim": 16, "hidden": 64,
                            "dtype": "float32"}
    assert res["jit"]["cpu"]["seconds"] >= 0
    assert res["command"].startswith("numba-attn bench kernels --ops full_attention")


def test_formats_md_and_csv():
    md = ok(ONE_OP + ["--format", "md"]).stdout
    assert "| op/size |" in md and "| full_attention/8 |" in md
    assert "- cpu:" in md
    text = ok(ONE_OP + ["--format", "csv"]).stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["name"] for r in rows] == ["full_attention/1", "full_attention/8"]
    assert float(rows[0]["ours_median_s"]) > 0
    assert float(rows[1]["numpy_over_ours"]) > 0


def test_causal_mask_three_figures_and_peers():
    res = json.loads(ok(["--ops", "causal_mask", "--sizes", "8", "--format", "json"]
                        + TINY).stdout)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"build", "cache hit", "in softmax"}
    assert rows["build"]["candle"]["median"] == pytest.approx(9.9312e-6)   # beside [build]
    assert rows["cache hit"]["candle"] is None
    parts = rows["in softmax"]["ours"]["parts"]
    assert parts["with"]["median"] > 0 and parts["without"]["median"] > 0
    assert rows["in softmax"]["ours"]["median"] == pytest.approx(
        parts["with"]["median"] - parts["without"]["median"])


def test_torch_peer_when_importable():
    pytest.importorskip("torch")
    res = json.loads(ok(["--ops", "decode_attention,rope_forward", "--sizes", "8",
                         "--format", "json"] + TINY).stdout)
    for row in res["rows"]:
        assert "torch" in row["peers"]
        assert "median" in row["peers"]["torch"] or "error" in row["peers"]["torch"]


def test_limits_small_gives_shares():
    res = json.loads(ok(["--ops", "qkv_projection", "--sizes", "1", "--peers", "none",
                         "--format", "json"] + TINY[:-2] + ["--limits", "small"]).stdout)
    lim = res["limits"]["cpu"]
    assert lim["read_gbs"] > 0 and lim["sgemm_gflops"] > 0 and lim["small"]
    row = res["rows"][0]
    assert row["bound"] in ("memory", "compute") and row["share"] > 0


# -- baselines ---------------------------------------------------------------------------------

def test_save_and_compare_baseline(bench_home):
    r = ok(ONE_OP + ["--save-baseline", "before"])
    path = bench_home / "baselines" / "kernels-before.json"
    assert path.is_file() and "saved baseline 'before'" in r.stderr
    r = ok(ONE_OP + ["--baseline", "before"])
    assert "vs before" in r.stdout
    assert "against baseline 'before'" in r.stderr
    res = json.loads(ok(ONE_OP + ["--baseline", "before", "--format", "json"]).stdout)
    for row in res["rows"]:
        assert row["baseline"]["verdict"] in ("regressed", "improved", "within noise")


def test_regression_flagged_and_fail_on_regression(bench_home):
    ok(ONE_OP + ["--save-baseline", "fast"])
    path = bench_home / "baselines" / "kernels-fast.json"
    base = json.loads(path.read_text())
    for row in base["rows"]:             # pretend the baseline was 1000x faster
        for k in ("median", "ci_low", "ci_high", "min", "max"):
            row["ours"][k] /= 1000
    path.write_text(json.dumps(base))
    r = ok(ONE_OP + ["--baseline", "fast"])
    assert "REGRESSED" in r.stdout and "2 row(s) regressed" in r.stderr
    r = run(ONE_OP + ["--baseline", "fast", "--fail-on-regression"])
    assert r.exit_code == 1 and "REGRESSED" in r.stdout


def test_compare_verdicts():
    def res(median, hw):
        return {"kind": "kernels", "rows": [{"name": "x/1", "device": "cpu", "ours": {
            "median": median, "ci_low": median - hw, "ci_high": median + hw}}]}
    cases = [((1.0, 0.01), (1.5, 0.01), "regressed"), ((1.0, 0.01), (0.5, 0.01), "improved"),
             ((1.0, 0.01), (1.005, 0.01), "within noise"),     # intervals overlap
             ((1.0, 0.001), (1.01, 0.001), "within noise"),    # apart, but under 2%
             ((1.0, 0.3), (1.5, 0.3), "within noise")]         # big change, noisy
    for (bm, bh), (cm, ch), verdict in cases:
        cur = res(cm, ch)
        report.compare(cur, res(bm, bh), "b")
        assert cur["rows"][0]["baseline"]["verdict"] == verdict, (bm, cm)


def test_missing_baseline_is_one_clean_line(bench_home):
    clean_error(run(ONE_OP + ["--baseline", "nope"]), "baseline 'nope' not found",
                "no kernels baselines saved yet")
    ok(ONE_OP + ["--save-baseline", "one"])
    clean_error(run(ONE_OP + ["--baseline", "two"]), "saved kernels baselines: one")


def test_bad_baseline_name():
    clean_error(run(ONE_OP + ["--save-baseline", "../x"]), "not valid")


# -- plot --------------------------------------------------------------------------------------

def test_plot_without_matplotlib_is_a_clean_error(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "plot_available", lambda: False)
    line = clean_error(run(ONE_OP + ["--plot", str(tmp_path / "p.png")]), "matplotlib")
    assert "numba-attn[plot]" in line
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    r = ok(ONE_OP + ["--plot", str(out)])
    assert out.stat().st_size > 1000 and "plot written" in r.stderr


def test_plot_needs_png_name(tmp_path):
    clean_error(run(ONE_OP + ["--plot", str(tmp_path / "p.pdf")]), ".png")


# -- bad options -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--ops", "rope_forward,nope"], ["unknown op 'nope'"]),
    (["--sizes", "8,0"], ["positive"]),
    (["--sizes", "-4"], ["positive"]),
    (["--sizes", "eight"], ["not an integer"]),
    (["--heads", "6", "--kv-heads", "4"], ["multiple"]),
    (["--head-dim", "15"], ["even"]),
    (["--repeat", "0"], ["--repeat"]),
    (["--time-budget", "0"], ["--time-budget"]),
    (["--device", "tpu"], ["--device"]),
    (["--format", "xml"], ["--format"]),
    (["--peers", "jax"], ["unknown peer"]),
    (["--fail-on-regression"], ["--baseline"]),
])
def test_bad_options(args, words):
    clean_error(run(["kernels", "--sizes", "1"] + args), *words)


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_device_cuda_without_gpu_is_refused():
    clean_error(run(ONE_OP + ["--device", "cuda"]), "--device cuda", "no CUDA GPU")


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_device_all_without_gpu_runs_cpu():
    r = ok(ONE_OP + ["--device", "all", "--format", "json"])
    assert {row["device"] for row in json.loads(r.stdout)["rows"]} == {"cpu"}
    assert "no CUDA GPU" in r.stderr


def test_help_lists_subcommands():
    r = ok(["--help"])
    for name in ("kernels", "model", "jit"):
        assert name in r.stdout


# -- bench model -------------------------------------------------------------------------------

MODEL_TINY = ["-p", "8", "-n", "4", "--repeat", "2", "--time-budget", "0.01",
              "--limits", "none"]


def test_model_text(tiny_folder):
    r = ok(["model", "--model", tiny_folder] + MODEL_TINY)
    for name in ("pp8", "tg4", "ttft/8", "attention norm", "qkv projection", "rope",
                 "attention", "output projection", "mlp gate + up projections",
                 "unaccounted", "layer total", "decode of 1 token at position 8"):
        assert name in r.stdout, name
    assert "JIT warm-up" in r.stdout


@pytest.fixture(scope="module")
def model_json(tiny_folder):
    return json.loads(ok(["model", "--model", tiny_folder, "--format", "json"]
                         + MODEL_TINY).stdout)


def test_model_json_generation(model_json):
    res = model_json
    assert res["generation"]["pp"]["tok_s"] > 0 and res["generation"]["tg"]["tok_s"] > 0
    assert res["generation"]["tg"]["stats"]["n"] == 2
    assert res["jit"]["cpu"]["seconds"] > 0
    names = [r["name"] for r in res["rows"]]
    assert names[:3] == ["pp8", "tg4", "ttft/8"]
    assert len(names) == len(set(names))            # unique: baselines match rows by name


def test_model_json_breakdown_adds_up(model_json):
    assert set(model_json["breakdown"]) == {"prefill8", "decode@8"}
    for bd in model_json["breakdown"].values():
        parts = [r for r in bd["rows"] if r["stage"] != "layer total"]
        total = bd["rows"][-1]
        assert total["stage"] == "layer total"
        assert sum(r["median"] for r in parts) == pytest.approx(total["median"])
        assert sum(r["share"] for r in parts) == pytest.approx(1.0)
        stages = [r for r in parts if r["stats"]]
        assert len(stages) == 13 and all(r["alone"]["median"] > 0 for r in stages)


def test_model_csv_md_and_baseline(tiny_folder, bench_home):
    rows = list(csv.DictReader(io.StringIO(
        ok(["model", "--model", tiny_folder, "--format", "csv", "--no-breakdown"]
           + MODEL_TINY).stdout)))
    assert [r["name"] for r in rows] == ["pp8", "tg4", "ttft/8"]
    assert float(rows[0]["tokens_per_s"]) > 0
    ok(["model", "--model", tiny_folder, "--no-breakdown", "--save-baseline", "m"] + MODEL_TINY)
    assert (bench_home / "baselines" / "model-m.json").is_file()
    md = ok(["model", "--model", tiny_folder, "--no-breakdown", "--format", "md",
             "--baseline", "m"] + MODEL_TINY).stdout
    assert "| pp8 |" in md and "vs m" in md
    # a kernels baseline is not a model baseline
    clean_error(run(ONE_OP + ["--baseline", "m"]), "not found")


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/folder"], ["model folder not found"]),
    (["--model", "/tmp", "--layers", "2"], ["--layers"]),
    (["-p", "0", "-n", "0", "--no-breakdown"], ["nothing to run"]),
    (["-p", "-1"], ["-p"]),
])
def test_model_bad_options(args, words):
    clean_error(run(["model"] + args + ["--limits", "none"]), *words)


def test_model_default_demo_fits_its_context():
    """Without --model: the demo model (context 256); the default pp 512 is shortened to fit
    and said so, an explicit -p beyond the context is refused."""
    res = json.loads(ok(["model", "-n", "2", "--no-breakdown", "--format", "json", "--repeat",
                         "1", "--time-budget", "0.01", "--limits", "none"]).stdout)
    assert "built-in demo model" in res["model"]
    assert res["generation"]["pp"]["tokens"] == 256
    assert any("pp 512 -> 256" in n for n in res["notes"])
    clean_error(run(["model", "-p", "300", "-n", "2", "--limits", "none"]),
                "-p 300 exceeds the model's context of 256 tokens")


def test_model_bad_folder_is_clean(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    clean_error(run(["model", "--model", str(tmp_path)] + MODEL_TINY), "cannot load the model")


# -- the measuring core ------------------------------------------------------------------------

def test_measure_repeat_inner_and_first_call():
    calls = []
    s = timing.measure(lambda: calls.append(1), repeat=7, budget_s=0.01, inner=3, warmup=2)
    assert s.n == 7 and s.inner == 3 and len(s.samples) == 7
    assert len(calls) >= 1 + 2 + 7 * 3
    assert s.first_call_s >= 0 and s.compile_s >= 0
    assert s.min <= s.ci_low <= s.median <= s.ci_high <= s.max


def test_measure_budget_picks_samples_and_sync_is_called():
    synced = []
    s = timing.measure(lambda: None, sync=lambda: synced.append(1), budget_s=0.02)
    assert timing.MIN_SAMPLES <= s.n <= timing.MAX_SAMPLES
    assert s.inner > 1                      # a no-op is batched to outlast the clock
    assert len(synced) >= s.n               # a sync before reading the clock, every sample


def test_difference_and_format_time():
    a = timing.summarize([2.0, 2.1, 2.2])
    b = timing.summarize([1.0, 1.1, 1.2])
    d = timing.difference(a, b)
    assert d.median == pytest.approx(1.0) and d.ci_low <= d.median <= d.ci_high
    assert timing.format_time(1.234e-3) == "1.23 ms"
    assert timing.format_time(45.6e-6) == "45.6 us"
    assert timing.format_time(123e-3) == "123 ms"
    assert timing.format_time(None) == "-"


def test_main_cli_has_bench():
    from numba_attn import cli
    assert "bench" in cli.main.commands
    r = CliRunner().invoke(cli.main, ["bench"] + ONE_OP)
    assert r.exit_code == 0 and "full_attention/8" in r.stdout


def test_baseline_dir_follows_env(bench_home):
    assert report.baseline_dir() == os.path.join(str(bench_home), "baselines")


def test_jit_table_format():
    from numba_attn.bench.jit import format_jit
    side = {"import_s": 0.5, "first_call_s": {"apply_rope half": 3.0, "attention decode": 20.0},
            "total_s": 23.0, "compiled": 11, "cache_hits": 0, "process_wall_s": 25.0}
    warm = dict(side, first_call_s={"apply_rope half": 0.03, "attention decode": 0.05},
                total_s=0.08, compiled=0, cache_hits=11)
    res = {"cold": side, "warm": warm}
    text = format_jit(res)
    assert "attention decode" in text and "20.000 s" in text and "11 / 0" in text
    assert "| all first calls |" in format_jit(res, "md")
    assert json.loads(format_jit(res, "json"))["warm"]["compiled"] == 0
    assert "apply_rope half,3.0,0.03" in format_jit(res, "csv")
