"""The CPU kernels' speed table (the package's kernel library against its targets), as markdown.

    python bench/bench_kernels.py                # full shapes, then the JIT cold/warm runs
    python bench/bench_kernels.py --no-jit       # skip the two compile-from-scratch processes
    python bench/bench_kernels.py --quick        # tiny shapes: checks that it runs, not speed

Every figure comes from numba_attn.bench (the rows of `numba-attn bench kernels`, the measured
limits, the JIT child processes); this script only picks the rows and states the targets.
"""
import argparse
import datetime
import platform
import sys

from numba_attn.bench import kernels as K
from numba_attn.bench.jit import cold_and_warm
from numba_attn.bench.limits import measure_limits
from numba_attn.bench.machine import describe, describe_lines
from numba_attn.bench.report import _limits_line, _table
from numba_attn.bench.timing import format_time


def _row(op, size, shape, limits, timing, variant=""):
    cases = [c for c in K.build(op, size, shape) if c.variant == variant]
    return K.run_case(cases[0], limits, **timing)


def _median(stats):
    return stats.get("median") if stats else None


def checks(shape, limits, timing):
    """[(check, ours, against, figure, target, met)] -- one line of the table each."""
    lim = limits
    out = []

    def ratio_line(check, row, peer, target, what):
        ours, p = _median(row["ours"]), _median(row["peers"].get(peer))
        r = row["speedup"].get(peer)
        rate = _rate(row, lim)
        out.append((check, f"{format_time(ours)}{rate}", f"{what} {format_time(p)}",
                    f"{r:.2f}x" if r else "n/a", f">= {target}x", _met(r, target)))

    r = _row("rope_forward", 128, shape, lim, timing)
    ratio_line("apply_rope, q and k, seq 128", r, "numpy", 15, "NumPy")

    r = _row("qkv_projection", 1, shape, lim, timing)
    ratio_line(f"linear {3 * shape.hidden}x{shape.hidden}, seq 1 (GEMV)", r, "numpy", 0.95,
               "NumPy BLAS")
    r = _row("qkv_projection", 128, shape, lim, timing)
    ratio_line(f"linear {3 * shape.hidden}x{shape.hidden}, seq 128 (GEMM)", r, "numpy", 0.9,
               "NumPy BLAS")

    r = _row("masked_softmax", 512, shape, lim, timing)
    ratio_line(f"masked_softmax ({shape.heads}, 512, 512) causal", r, "numpy", 3,
               "NumPy add mask + softmax")

    r = _row("causal_mask", 512, shape, lim, timing, variant="in softmax")
    parts = r["ours"].get("parts", {})
    with_, without = _median(parts.get("with")), _median(parts.get("without"))
    over = (with_ / without - 1) if with_ and without else None
    out.append((f"masked_softmax causal vs causal=False ({shape.heads}, 512, 512)",
                f"{format_time(with_)}", f"causal=False {format_time(without)}",
                f"{100 * over:+.1f}%" if over is not None else "n/a", "<= +5%",
                _met(None if over is None else -over, -0.05)))

    r = _row("causal_mask", 512, shape, lim, timing, variant="cache hit")
    t = _median(r["ours"])
    out.append(("MaskCache.get, hit", format_time(t), "-", format_time(t), "< 2 us",
                _met(None if t is None else -t, -2e-6)))

    r = _row("full_attention", 512, shape, lim, timing)
    g = r.get("gflops")
    share = g / lim.sgemm_gflops if g and lim and lim.sgemm_gflops else None
    out.append((f"attention causal 512x512, {shape.heads} heads x {shape.head_dim} "
                f"(causal FLOPs {r['flops'] / 1e9:.2f} G)",
                f"{format_time(_median(r['ours']))} = {g:.1f} GFLOP/s" if g else "n/a",
                f"sgemm {lim.sgemm_gflops:.1f} GFLOP/s" if lim else "-",
                f"{100 * share:.0f}% of sgemm" if share else "n/a", ">= 50% of sgemm",
                _met(share, 0.5)))
    ratio_line("attention causal 512 vs PyTorch SDPA", r, "torch", 1, "torch SDPA")

    r = _row("decode_attention", 4096, shape, lim, timing)
    gbs = r.get("gbs")
    share = gbs / lim.read_gbs if gbs and lim else None
    out.append((f"attention decode, q_len 1, kv 4096, {shape.heads}/{shape.kv_heads} heads",
                f"{format_time(_median(r['ours']))} = {gbs:.1f} GB/s" if gbs else "n/a",
                f"read BW {lim.read_gbs:.1f} GB/s" if lim else "-",
                f"{100 * share:.0f}% of read BW" if share else "n/a", ">= 80% of read BW",
                _met(share, 0.8)))
    return out


def _rate(row, lim):
    if row.get("bound") == "compute" and row.get("gflops"):
        return f" = {row['gflops']:.1f} GFLOP/s ({100 * row['share']:.0f}% of sgemm)"
    if row.get("gbs"):
        share = f" ({100 * row['share']:.0f}% of read BW)" if row.get("share") else ""
        return f" = {row['gbs']:.1f} GB/s{share}"
    return ""


def _met(value, target):
    if value is None:
        return "n/a"
    return "yes" if value >= target else "NO"


class _Lim:
    def __init__(self, lim):
        self.read_gbs, self.sgemm_gflops = lim.read_gbs, lim.sgemm_gflops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and small limit arrays: a smoke run, not a measurement")
    ap.add_argument("--no-jit", action="store_true", help="skip the JIT cold/warm processes")
    ap.add_argument("--time-budget", type=float, default=1.0,
                    help="seconds of sampling per measurement (default 1.0)")
    ap.add_argument("--repeat", type=int, default=None, help="exact samples per measurement")
    args = ap.parse_args(argv)

    shape = K.Shape(heads=4, kv_heads=2, head_dim=16) if args.quick else K.REFERENCE
    print("measuring limits...", file=sys.stderr)
    limits = measure_limits("cpu", small=args.quick, repeat=args.repeat)
    ops = list(K.OPS)
    print("JIT warm-up...", file=sys.stderr)
    K.jit_warmup(ops)
    timing = {"repeat": args.repeat, "budget_s": args.time_budget}
    print("timing the rows...", file=sys.stderr)
    rows = checks(shape, _Lim(limits), timing)

    cmd = "python bench/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## CPU kernel speed table -- {datetime.date.today().isoformat()}\n")
    print(f"Command: `{cmd.strip()}`\n")
    for line in describe_lines(describe()) + [_limits_line(limits.to_dict())]:
        print(f"- {line}")
    if args.quick:
        print("- QUICK RUN: tiny shapes and cache-sized limit arrays; not a measurement")
    print()
    print(_table(["check", "ours", "against", "result", "target", "met"],
                 [list(r) for r in rows], "md"))
    print()
    if not args.no_jit:
        print("JIT: compiling the whole API in fresh processes...", file=sys.stderr)
        res = cold_and_warm()
        cold, warm = res["cold"], res["warm"]
        print(_table(
            ["JIT (first call of the whole API)", "cold: empty NUMBA_CACHE_DIR",
             "warm: second process, same cache"],
            [["import numba_attn", f"{cold['import_s']:.2f} s", f"{warm['import_s']:.2f} s"],
             ["first calls, all functions", f"{cold['total_s']:.2f} s",
              f"{warm['total_s']:.2f} s"],
             ["kernels compiled / loaded from cache",
              f"{cold['compiled']} / {cold['cache_hits']}",
              f"{warm['compiled']} / {warm['cache_hits']}"],
             ["whole process (python start to exit)", f"{cold['process_wall_s']:.2f} s",
              f"{warm['process_wall_s']:.2f} s"]], "md"))
        print()
    print(f"Python {platform.python_version()}; timings: median of repeated samples after a "
          f"warm-up, JIT outside every timing; ratios: NumPy (or PyTorch) time over ours.")


if __name__ == "__main__":
    main()
