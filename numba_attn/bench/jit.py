"""JIT cost of the whole API: the first call of every public function in a fresh process with
an empty Numba cache (cold: everything compiles), then in a second process on that cache
(warm: everything loads). Each process times the first call of each function on small inputs;
both start with `import numba_attn` timed on its own.
"""
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time


# the child: `import numba_attn` timed first, before anything of the package is loaded
CHILD = ("import time; t0 = time.perf_counter(); import numba_attn; "
         "t1 = time.perf_counter(); import json; from numba_attn.bench.jit import _first_calls; "
         "r = _first_calls(); r['import_s'] = t1 - t0; print(json.dumps(r))")


def _first_calls():
    """Time the first call of each public function (small float32 inputs). Runs in the child."""
    import numpy as np

    import numba_attn as na
    from numba_attn.bench.machine import jit_cache_counts

    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)   # noqa: E731
    table = na.RopeTable(16, 64)
    x = r(8, 4, 16)
    calls = [
        ("apply_rope half", lambda: na.apply_rope(x, table, 0, style="half")),
        ("apply_rope interleaved", lambda: na.apply_rope(x, table, 0, style="interleaved")),
        ("linear, 1 row (GEMV)", lambda: na.linear(r(1, 32), r(48, 32))),
        ("linear, 8 rows + bias (GEMM)", lambda: na.linear(r(8, 32), r(48, 32), r(48))),
        ("rmsnorm", lambda: na.rmsnorm(r(8, 32), r(32))),
        ("silu_mul", lambda: na.silu_mul(r(8, 32), r(8, 32))),
        ("causal_mask", lambda: na.causal_mask(8, 8)),
        ("MaskCache.get", lambda: na.MaskCache().get(8, 8)),
        ("masked_softmax causal", lambda: na.masked_softmax(r(4, 8, 8), causal=True)),
        ("masked_softmax + mask", lambda: na.masked_softmax(r(4, 8, 8), causal=False,
                                                             mask=na.causal_mask(8, 8))),
        ("attention prefill", lambda: na.attention(r(8, 4, 16), r(8, 2, 16), r(8, 2, 16))),
        ("attention decode", lambda: na.attention(r(1, 4, 16), r(64, 2, 16), r(64, 2, 16))),
        ("KVCache.append", lambda: na.KVCache(1, 16, 2, 16).append(0, r(8, 2, 16), r(8, 2, 16))),
    ]
    hits0, miss0 = jit_cache_counts()
    per = {}
    for name, fn in calls:
        t0 = time.perf_counter()
        fn()
        per[name] = time.perf_counter() - t0
    hits1, miss1 = jit_cache_counts()
    return {"first_call_s": per, "total_s": sum(per.values()),
            "cache_hits": hits1 - hits0, "compiled": miss1 - miss0,
            "cache_dir": os.environ.get("NUMBA_CACHE_DIR")}


def _child(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"the JIT child process failed ({p.returncode}): "
                           f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def cold_and_warm(cache_dir=None):
    """{'cold': ..., 'warm': ...}: two fresh processes on one initially empty cache dir."""
    with tempfile.TemporaryDirectory(prefix="numba-attn-jit-") as tmp:
        d = cache_dir or tmp
        cold = _child(d)
        warm = _child(d)
    return {"cold": cold, "warm": warm}


def format_jit(res, fmt="text"):
    cold, warm = res["cold"], res["warm"]
    if fmt == "json":
        return json.dumps(res, indent=1) + "\n"
    names = list(cold["first_call_s"])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["function", "cold_first_call_s", "warm_first_call_s"])
        w.writerow(["import numba_attn", cold["import_s"], warm["import_s"]])
        for n in names:
            w.writerow([n, cold["first_call_s"][n], warm["first_call_s"][n]])
        w.writerow(["total", cold["total_s"], warm["total_s"]])
        return buf.getvalue()
    from .report import _table
    rows = [["import numba_attn", f"{cold['import_s']:.2f} s", f"{warm['import_s']:.2f} s"]]
    rows += [[n, f"{cold['first_call_s'][n]:.3f} s", f"{warm['first_call_s'][n]:.3f} s"]
             for n in names]
    rows.append(["all first calls", f"{cold['total_s']:.2f} s", f"{warm['total_s']:.2f} s"])
    rows.append(["kernels compiled / loaded from cache",
                 f"{cold['compiled']} / {cold['cache_hits']}",
                 f"{warm['compiled']} / {warm['cache_hits']}"])
    table = _table(["first call of", "cold (empty cache)", "warm (second process)"], rows,
                   "md" if fmt == "md" else "text")
    return table + "\n"


