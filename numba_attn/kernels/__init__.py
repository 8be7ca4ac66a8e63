"""Kernels, one module per family and backend: <family>_cpu.py (numba.njit) beside its
<family>_cuda.py twin (numba.cuda.jit) with the same function names, argument order and
semantics. All are out-first: the first argument is written, nothing is returned."""
