"""numba-attn's benchmarks, as a library and as `numba-attn bench`.

    timing.py   the measuring core: warm-up outside the timing, samples, bootstrap CI
    machine.py  what it ran on: CPU, cores, threads, GPU, versions, Numba's JIT cache
    limits.py   measured memory read bandwidth and sgemm FLOP rate (the rows' limits)
    kernels.py  the reference profile's rows against NumPy / PyTorch peers
    model.py    pp / tg tokens/s, time to first token, one decoder layer stage by stage
    jit.py      first-call compile time, cold and warm Numba cache, in fresh processes
    report.py   text / md / csv / json, baselines, plot
    cli.py      the Click `bench` group: kernels (default), model, jit
"""
from .timing import Stats, measure

__all__ = ["Stats", "measure"]
