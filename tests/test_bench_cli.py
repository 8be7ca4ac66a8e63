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


@pytest.mark.parametrize("kv", ["bfloat16", "int8"])
def test_model_with_a_16bit_or_8bit_kv_cache(tiny_folder, kv):
    """The generation test and the layer breakdown (its own cache, in the model's storage)
    with q8_0 weights and a bfloat16 or int8 KV cache."""
    r = ok(["model", "--model", tiny_folder, "--weight-dtype", "q8_0", "--kv-dtype", kv]
           + MODEL_TINY)
    for name in ("pp8", "tg4", "attention", "decode of 1 token at position 8"):
        assert name in r.stdout, name
    clean_error(run(["model", "--model", tiny_folder, "--kv-dtype", "int4"]), "--kv-dtype")


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
        assert len(stages) == 11 and all(r["alone"]["median"] > 0 for r in stages)


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


# -- the layer breakdown times every stage on the layer's values -------------------------------

def tiny_layer_model(weight_dtype="float32"):
    """A one-layer random model (hidden 64, 4/2 heads of 16, intermediate 192) in a format."""
    from numba_attn.bench import model as M
    from numba_attn.config import LlamaConfig
    from numba_attn.model import Model
    c = LlamaConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64,
                    intermediate_size=192, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16)
    return Model(c, M._random_weights(c, 0, weight_dtype), max_seq=64)


@pytest.mark.filterwarnings("error")     # inf/NaN reaching a NumPy matmul fails the run
def test_model_breakdown_times_each_stage_alone(tiny_folder):
    """End to end, the layer breakdown times each stage in the layer and alone, each a positive
    time, and nothing it computes reaches a NumPy matmul as inf/NaN (silu_mul works in place:
    looped alone it once compounded its values to inf). The values the alone loops leave:
    test_layer_stages_alone_is_repeatable; how the two times compare is a benchmark's business,
    not a test's (a loaded machine moves them several fold)."""
    res = json.loads(ok(["model", "--model", tiny_folder, "-p", "32", "-n", "0", "--repeat",
                         "7", "--time-budget", "0.05", "--limits", "none",
                         "--format", "json"]).stdout)
    alone = 0
    for label, bd in res["breakdown"].items():
        for r in bd["rows"]:
            if r.get("alone"):
                alone += 1
                for t in (r["median"], r["alone"]["median"], r["alone"]["min"]):
                    assert 0 < t < 1, (label, r["stage"], r["median"], r["alone"])
    assert alone >= 6, res["breakdown"]


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16", "q8_0"])
@pytest.mark.parametrize("seq, pos", [(5, 0), (1, 7)])
def test_layer_stages_alone_is_repeatable(seq, pos, weight_dtype):
    """Each stage run alone many times leaves what the layer leaves once: the down
    projection after 500 silu_mul calls reads the layer's values. The stages run on the
    model's own weights, whatever their format, and count their bytes."""
    import numpy as np

    from numba_attn.bench import model as M
    model = tiny_layer_model(weight_dtype)
    stages, layer = M.layer_stages(model, seq, pos)
    qkv = next(s for s in stages if s.name == "qkv projection")
    assert qkv.bytes >= model.weights.layers[0].qkv_proj.nbytes
    by_name = {s.name: s for s in stages}
    layer()
    want = np.array(by_name["mlp down projection"].fn())
    q_want = np.array(by_name["attention"].fn())
    for s in stages:
        if s.setup is not None:
            s.setup()
        for _ in range(500 if s.name in ("silu_mul", "rope") else 2):
            got = s.alone()
        if s.name == "attention":
            np.testing.assert_allclose(got, q_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_name["mlp down projection"].alone(), want, rtol=1e-5,
                               atol=1e-6)


# -- never a negative time, never above 100% of a limit ----------------------------------------

def _diff(a, b):
    return timing.difference(timing.summarize(a), timing.summarize(b)).to_dict()


def test_difference_within_noise_is_not_a_negative_time():
    a = [1.00e-3, 1.20e-3, 0.90e-3, 1.10e-3, 1.05e-3]
    b = [1.02e-3, 1.25e-3, 0.88e-3, 1.15e-3, 1.06e-3]
    d = _diff(a, b)
    assert d["median"] < 0 and d["ci_low"] < 0 < d["ci_high"]
    time, ci = report.format_difference(d)
    noise = timing.format_time((d["ci_high"] - d["ci_low"]) / 2)
    assert time == f"~0 (within ±{noise} noise)" and ci == ""


def test_difference_below_and_above_noise():
    slow, fast = [2.0e-3, 2.01e-3, 1.99e-3, 2.0e-3], [1.0e-3, 1.01e-3, 0.99e-3, 1.0e-3]
    time, ci = report.format_difference(_diff(fast, slow))     # the first saves 1 ms
    assert time == "saves 1.00 ms" and ci.startswith("±") and "-" not in time + ci
    time, ci = report.format_difference(_diff(slow, fast))
    assert time == "1.00 ms" and ci.startswith("[") and "-" not in time + ci


def test_unaccounted_never_negative():
    assert report._unaccounted({"median": -3e-6, "noise": 5e-6}) == \
        "~0 (within ±5.00 us noise)"
    assert report._unaccounted({"median": -30e-6, "noise": 5e-6}) == \
        "~0 (the stages' medians add up to 30.0 us more)"
    assert report._unaccounted({"median": 30e-6, "noise": 5e-6}) == "30.0 us"


class _Limits:
    read_gbs, sgemm_gflops, cache_read_gbs = 30.0, 200.0, 120.0


def test_roofline_never_above_the_limit():
    from numba_attn.bench.limits import roofline
    assert roofline(15.0, None, _Limits) == ("memory", 0.5)
    assert roofline(60.0, None, _Limits) == ("cache", 0.5)         # faster than memory
    assert roofline(300.0, None, _Limits) == ("cache", None)       # faster than that too
    no_cache = type("L", (), {"read_gbs": 30.0, "sgemm_gflops": None})
    assert roofline(60.0, None, no_cache) == ("cache", None)
    assert roofline(1.0, 300.0, _Limits) == ("compute", None)
    assert roofline(1.0, 100.0, _Limits) == ("compute", 0.5)
    assert report._share({"bound": "cache", "share": 0.5}) == "50% cache BW"
    assert report._share({"bound": "cache", "share": None}) == "in cache"
    assert report._share({"bound": "compute", "share": None}) == "above sgemm"
    assert report._share({"bound": "memory", "share": 0.61}) == "61% read BW"


def test_kernels_table_negative_difference_and_cache_rows():
    """A table with a difference below zero and a row faster than memory: no negative time,
    no share above 100%."""
    import re
    res = json.loads(ok(["--ops", "causal_mask,rope_forward", "--sizes", "8", "--format",
                         "json"] + TINY).stdout)
    for r in res["rows"]:
        if r["variant"] == "in softmax":                # within its noise, then below it
            r["ours"] = _diff([1.0, 1.2, 0.9, 1.1], [1.02, 1.25, 0.88, 1.15]) | \
                {"parts": {"with": timing.summarize([1.0]).to_dict(),
                           "without": timing.summarize([1.02]).to_dict()}}
        if r["op"] == "rope_forward":
            r["gbs"], r["bound"], r["share"] = 300.0, "cache", None
    res["limits"] = {"cpu": {"device": "cpu", "read_gbs": 30.0, "readers": {"x": 30.0},
                             "copy_gbs": 20.0, "sgemm_gflops": 200.0, "sgemm_source": "s",
                             "cache_read_gbs": 120.0}}
    text = report.format_result(res, "text")
    table = text.split("\n\n")[1]
    assert not re.search(r"(?<![\w.])-\d", table), table          # no negative number
    assert all(int(p) <= 100 for p in re.findall(r"(\d+)% ", table))
    assert "within ±" in table and "in cache" in table
    assert "ours is a difference of two timings" in text
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(report.format_result(res, "csv")))}
    diff = rows["causal_mask/8 [in softmax]"]
    assert diff["ours_min_s"] == diff["ours_max_s"] == "" and float(diff["ours_median_s"]) < 0


# -- plots: each command's shows what its help says ---------------------------------------------

def test_model_plot_without_breakdown_is_refused(tiny_folder, tmp_path):
    out = tmp_path / "m.png"
    clean_error(run(["model", "--model", tiny_folder, "--no-breakdown", "--plot", str(out)]
                    + MODEL_TINY), "--plot", "--no-breakdown")
    assert not out.exists()


def test_plot_help_per_command():
    assert "time against size" in " ".join(ok(["kernels", "--help"]).stdout.split())
    model_help = " ".join(ok(["model", "--help"]).stdout.split())
    assert "Draw the layer breakdown" in model_help and "time against size" not in model_help


def test_model_plot_data(model_json):
    panels = report.model_plot_data(model_json)
    assert [p["title"] for p in panels] == ["one decoder layer, prefill of 8 tokens",
                                            "one decoder layer, decode of 1 token at position 8"]
    for p in panels:
        assert len(p["stages"]) == 11 and "layer total" not in p["stages"]
        assert all(t > 0 for t in p["in_layer"] + p["alone"])
    assert report.model_plot_data({"kind": "model", "breakdown": {}}) == []


def test_kernels_plot_data():
    res = json.loads(ok(["--ops", "causal_mask,full_attention", "--sizes", "1,8",
                         "--format", "json"] + TINY).stdout)
    panels = {p["title"]: p for p in report.kernels_plot_data(res)}
    fa = panels["full_attention (cpu)"]
    assert [x for x, _ in fa["series"]["numba-attn"]] == [1, 8]
    assert set(fa["series"]) == {"numba-attn", "NumPy", "Candle (reference)"}
    assert fa["series"]["Candle (reference)"] == [(1, 11.492e-6), (8, 119.84e-6)]
    for r in res["rows"]:               # a difference within its noise has no point
        if r["variant"] == "in softmax":
            r["ours"]["ci_low"] = -1.0
    panels = {p["title"]: p for p in report.kernels_plot_data(res)}
    assert "numba-attn" not in panels["causal_mask [in softmax] (cpu)"]["series"]


# -- PyTorch missing says so -------------------------------------------------------------------

def test_peers_torch_missing_is_a_clean_error(monkeypatch):
    monkeypatch.setattr(K, "torch_unavailable", lambda device="cpu": K.TORCH_MISSING)
    clean_error(run(["--peers", "torch"] + ONE_OP[:4] + TINY), "PyTorch is not installed",
                "pip install torch")
    clean_error(run(["--peers", "numpy,torch"] + ONE_OP[:4] + TINY), "pip install torch")


def test_default_peers_without_torch_say_so(monkeypatch):
    monkeypatch.setattr(K, "torch_unavailable", lambda device="cpu": K.TORCH_MISSING)
    r = ok(ONE_OP[:4] + TINY)               # --peers left at its default: numpy,torch
    assert "PyTorch is not installed: pip install torch" in r.stdout
    assert "PyTorch is not installed" in r.stderr
    header = r.stdout.split("\n\n")[1].splitlines()[0]
    assert "NumPy" in header and "PyTorch" not in header


@pytest.mark.skipif(K.torch_unavailable() is None, reason="PyTorch is installed")
def test_peers_torch_not_installed_here():
    clean_error(run(["--peers", "torch"] + ONE_OP[:4] + TINY), "PyTorch is not installed",
                "pip install torch")


# -- the output explains itself ----------------------------------------------------------------

def test_candle_reference_file_named_and_complete():
    from numba_attn.bench import candle_reference as C
    out = ok(ONE_OP).stdout
    legend = [line for line in out.splitlines() if line.strip().startswith("Candle:")]
    assert legend and C.SOURCE_FILE in legend[0] and "another machine" in legend[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, C.SOURCE_FILE)
    assert os.path.isfile(path) and os.path.samefile(path, C.__file__)
    doc = " ".join(C.__doc__.split())
    for words in ("Source:", "Machine:", "criterion", "2025-10-08", "95% confidence"):
        assert words in doc, words
    assert C.CANDLE is K.CANDLE and C.CANDLE[("causal_mask", 512)][1] == 58.832e-3


def test_baseline_legend_explains_tilde(bench_home):
    ok(ONE_OP + ["--save-baseline", "b"])
    out = ok(ONE_OP + ["--baseline", "b"]).stdout
    assert "~: within the noise" in out and "REGRESSED" in out


def test_model_layers_said_outside_the_header():
    out = ok(["model", "--layers", "1", "-p", "2", "-n", "1", "--no-breakdown", "--repeat",
              "1", "--time-budget", "0.01", "--limits", "none"]).stdout
    lines = [line for line in out.splitlines()
             if "--layers 1" in line and not line.startswith("#")]
    assert lines and "random TinyLlama-1.1B-shaped model with 1 of TinyLlama's 22 layers" \
        in lines[0]
    assert "in place of the built-in demo model" in lines[0]


def test_help_device_and_jit():
    group = " ".join(ok(["--help"]).stdout.split())
    assert "--device cpu" in group and "cuda" in group and "kernels --help" in group
    for cmd in ("kernels", "model"):
        assert "--device" in ok([cmd, "--help"]).stdout
    jit = " ".join(ok(["jit", "--help"]).stdout.split())
    for words in ("cold", "warm", "compiles", "loads", "empty Numba cache", "--device"):
        assert words in jit, words
