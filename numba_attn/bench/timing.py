"""The measuring core: warm-up outside the timing, repeated samples, robust statistics.

    stats = measure(fn)                        # fn() runs the work once
    stats = measure(fn, sync=cuda.synchronize) # device work: sync before every clock read
    stats.median, stats.ci_low, stats.ci_high  # seconds per call, 95% bootstrap CI of the median
    stats.first_call_s                         # the first call alone: JIT compile (or cache load)

How a measurement runs (as criterion and timeit do it, in this order):
1. one first call, timed on its own: it pays the JIT compilation (or the load from Numba's
   cache) and first-touch page faults, so it never enters a sample;
2. warm-up calls until `warmup` calls and a tenth of the time budget (at least 0.15 s when
   the budget allows) are spent: the CPU clocks up, and the thread pools of whatever ran
   before (a peer's BLAS or OpenMP threads, which spin for a while after their last call)
   go idle instead of competing with the measured code;
3. each sample times `inner` back-to-back calls, chosen so one sample lasts at least
   `min_sample_s` (the clock's resolution and overhead stay below 0.1% of a sample);
4. as many samples as fit in the time budget (at least `min_samples`, at most `max_samples`),
   or exactly `repeat` when given; the garbage collector is off while sampling.
"""
import gc
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_BUDGET_S = 0.5       # seconds of sampling per measurement
MIN_SAMPLE_S = 1e-3          # a sample lasts at least this long (inner calls are batched)
MIN_WARMUP_S = 0.15          # warm-up floor: other thread pools (a peer's OpenBLAS or OpenMP
                             # threads spin for ~0.1 s after their last call) go idle first
MIN_SAMPLES = 5
MAX_SAMPLES = 200
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass
class Stats:
    """Seconds per call. ci_low/ci_high: bootstrap confidence interval of the median."""
    median: float
    mean: float
    min: float
    max: float
    ci_low: float
    ci_high: float
    n: int                   # samples
    inner: int               # calls per sample
    first_call_s: float      # the first call alone (compile or cache load + one run)
    samples: list = field(default_factory=list, repr=False)

    @property
    def compile_s(self):
        """What the first call cost beyond a warm call: JIT compilation or cache load."""
        return max(0.0, self.first_call_s - self.median)

    @property
    def half_width(self):
        return (self.ci_high - self.ci_low) / 2

    def to_dict(self, samples=False):
        d = asdict(self)
        if not samples:
            d.pop("samples")
        d["compile_s"] = self.compile_s
        return d

    @classmethod
    def from_dict(cls, d):
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def bootstrap_median_ci(samples, confidence=CONFIDENCE, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """Percentile bootstrap confidence interval of the median of samples."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)   # fixed seed: the same samples give the same interval
    medians = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(medians, [alpha, 1 - alpha])
    return float(lo), float(hi)


def summarize(samples, *, inner=1, first_call_s=float("nan")):
    x = np.asarray(samples, dtype=np.float64)
    lo, hi = bootstrap_median_ci(x)
    return Stats(median=float(np.median(x)), mean=float(x.mean()), min=float(x.min()),
                 max=float(x.max()), ci_low=lo, ci_high=hi, n=int(x.size), inner=int(inner),
                 first_call_s=float(first_call_s), samples=[float(s) for s in x])


def measure(fn, *, sync=None, repeat=None, budget_s=DEFAULT_BUDGET_S, warmup=2, warmup_s=None,
            min_samples=MIN_SAMPLES, max_samples=MAX_SAMPLES, min_sample_s=MIN_SAMPLE_S,
            inner=None):
    """Time fn() and return Stats (seconds per call).

    sync: called after the work and before every clock read (numba.cuda.synchronize for
    device work: kernel launches return before the GPU is done). repeat: exact number of
    samples (else as many as budget_s allows). inner: calls per sample (else chosen)."""
    sync = sync or (lambda: None)
    clock = time.perf_counter

    # 1. the first call, on its own: compilation or cache load, never inside a sample
    sync()
    t0 = clock()
    fn()
    sync()
    first = clock() - t0

    # 2. warm-up: `warmup` calls and at least warmup_s seconds
    if warmup_s is None:
        warmup_s = max(0.1 * budget_s, min(MIN_WARMUP_S, budget_s))
    spent, calls, fastest = 0.0, 0, first
    while calls < warmup or (spent < warmup_s and calls < 10 * max_samples):
        t0 = clock()
        fn()
        sync()
        dt = clock() - t0
        spent += dt
        calls += 1
        fastest = min(fastest, dt)

    # 3. calls per sample, so a sample outlasts the clock's resolution
    if inner is None:
        inner = max(1, math.ceil(min_sample_s / max(fastest, 1e-9)))
    per_sample = max(fastest, 1e-9) * inner
    if repeat is None:
        n = int(min(max_samples, max(min_samples, budget_s // per_sample)))
    else:
        n = int(repeat)

    # 4. samples, with the garbage collector off
    samples = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        started = clock()
        for _ in range(n):
            sync()
            t0 = clock()
            for _ in range(inner):
                fn()
            sync()
            samples.append((clock() - t0) / inner)
            # a call that turned out much slower than the warm-up estimate: stop at the
            # budget's double rather than run for minutes (never below min_samples)
            if repeat is None and len(samples) >= min_samples and clock() - started > 2 * budget_s:
                break
    finally:
        if gc_was_on:
            gc.enable()
    return summarize(samples, inner=inner, first_call_s=first)


def measure_chain(fns, *, repeat=None, budget_s=DEFAULT_BUDGET_S, min_samples=MIN_SAMPLES,
                  max_samples=MAX_SAMPLES, sync=None):
    """Time a sequence of calls run back to back, each part in place: the clock is read
    between parts, so a part pays what the parts before it leave behind (caches, busy thread
    pools), as in the real sequence. Returns ([Stats of each part], Stats of the whole run);
    the whole is the sum of the parts run by run (plus clock reads, ~0.1 us each)."""
    sync = sync or (lambda: None)
    clock = time.perf_counter

    def run_once(parts):
        t_start = t_prev = clock()
        for i, fn in enumerate(fns):
            fn()
            sync()
            t = clock()
            parts[i].append(t - t_prev)
            t_prev = t
        return t_prev - t_start

    scratch = [[] for _ in fns]
    t0 = clock()
    run_once(scratch)                         # first run: compilation, first touch
    first = clock() - t0
    est = min(run_once(scratch), run_once(scratch))   # warm-up
    n = int(repeat) if repeat is not None else \
        int(min(max_samples, max(min_samples, budget_s // max(est, 1e-9))))
    parts, totals = [[] for _ in fns], []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n):
            totals.append(run_once(parts))
    finally:
        if gc_was_on:
            gc.enable()
    return [summarize(p) for p in parts], summarize(totals, first_call_s=first)


def difference(a, b):
    """Stats-like figures of a - b (e.g. causal minus non-causal): the median difference, with
    a conservative interval (the half-widths added in quadrature around it)."""
    med = a.median - b.median
    hw = math.hypot(a.half_width, b.half_width)
    return Stats(median=med, mean=a.mean - b.mean, min=a.min - b.max, max=a.max - b.min,
                 ci_low=med - hw, ci_high=med + hw, n=min(a.n, b.n), inner=a.inner,
                 first_call_s=float("nan"))


def cuda_sync():
    """numba.cuda.synchronize, for timing device work."""
    from numba import cuda
    return cuda.synchronize


def format_time(s):
    """1.23 ms, 45.6 us, 123 ms, 2.00 s; '-' for None/NaN."""
    if s is None or s != s:
        return "-"
    a = abs(s)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if a >= scale or unit == "ns":
            v = s / scale
            digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
            return f"{v:.{digits}f} {unit}"
