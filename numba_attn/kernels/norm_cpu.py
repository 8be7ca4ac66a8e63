"""RMSNorm (alone, or after the residual add: add_rmsnorm) and the SwiGLU gate on the CPU.
Twin: norm_cuda.py.

Each kernel is a serial function over a range of rows (or elements) and a thin parallel driver
over ranges; small inputs (a decode step's single row) skip the thread pool, whose wake-up costs
more than the work. With AVX-512, silu_mul's parallel driver runs 16 elements at a time in
LLVM IR of its own (1.7-2x the plain loop on a prefill's 512 x 5632 gate)."""
import math

from llvmlite import ir
from numba import float32, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .llvm_cpu import F32, I64, fast_path, fma, vexp
from .scalar import silu_vec
from .cpu_pool import PRANGE

PARALLEL_MIN = 1 << 15  # elements below which the serial function runs alone
SILU_CHUNK = 4096       # elements per parallel task


@njit(fastmath=True, cache=True)
def _rmsnorm_rows(out, x, weight, eps, r0, r1):
    # rows r0..r1-1 of x, out: (m, n); weight: (n,). out = x / sqrt(mean(x^2) + eps) * weight
    n = x.shape[1]
    for r in range(r0, r1):
        ss = float32(0)
        for j in range(n):
            ss += x[r, j] * x[r, j]
        inv = float32(1) / math.sqrt(ss / float32(n) + float32(eps))
        for j in range(n):
            out[r, j] = x[r, j] * inv * weight[j]


@njit(parallel=PRANGE, cache=True)
def _rmsnorm_parallel(out, x, weight, eps):
    for r in prange(x.shape[0]):
        _rmsnorm_rows(out, x, weight, eps, r, r + 1)


def rmsnorm(out, x, weight, eps):
    # x, out: (m, n); weight: (n,)
    if x.size < PARALLEL_MIN:
        _rmsnorm_rows(out, x, weight, eps, 0, x.shape[0])
    else:
        _rmsnorm_parallel(out, x, weight, eps)


@njit(fastmath=True, cache=True)
def _add_rmsnorm_rows(out, x, y, weight, eps, r0, r1):
    # rows r0..r1-1: x += y (the residual stream, in place), out = rmsnorm(x) * weight; out may
    # be y (each row of y is read before that row of out is written)
    n = x.shape[1]
    for r in range(r0, r1):
        ss = float32(0)
        for j in range(n):
            v = x[r, j] + y[r, j]
            x[r, j] = v
            ss += v * v
        inv = float32(1) / math.sqrt(ss / float32(n) + float32(eps))
        for j in range(n):
            out[r, j] = x[r, j] * inv * weight[j]


@njit(parallel=PRANGE, cache=True)
def _add_rmsnorm_parallel(out, x, y, weight, eps):
    for r in prange(x.shape[0]):
        _add_rmsnorm_rows(out, x, y, weight, eps, r, r + 1)


def add_rmsnorm(out, x, y, weight, eps):
    # x, y, out: (m, n); weight: (n,). x += y, then out = rmsnorm(x) * weight
    if x.size < PARALLEL_MIN:
        _add_rmsnorm_rows(out, x, y, weight, eps, 0, x.shape[0])
    else:
        _add_rmsnorm_parallel(out, x, y, weight, eps)


@njit(fastmath=True, error_model="numpy", cache=True)
def _silu_mul_range(out, gate, up, i0, i1, into):
    # elements i0..i1-1 of gate, up, out: (n,). silu(gate) * up into out (into 0), gate (into 1)
    # or up (into 2). In place gets its own loop: with out the same memory as gate, the loop
    # would fail its runtime overlap check and run scalar (3x slower). error_model="numpy": no
    # division-by-zero check (1 + e^-x > 0). Loops run over views from 0: an index from
    # range(i0, i1) might be negative to Numba, and its wraparound check blocks vectorising
    g, u = gate[i0:i1], up[i0:i1]
    if into == 1:
        for i in range(g.shape[0]):
            g[i] = silu_vec(g[i]) * u[i]
    elif into == 2:
        for i in range(g.shape[0]):
            u[i] = silu_vec(g[i]) * u[i]
    else:
        o = out[i0:i1]
        for i in range(g.shape[0]):
            o[i] = silu_vec(g[i]) * u[i]


@njit(parallel=PRANGE, cache=True)
def _silu_mul_parallel(out, gate, up, into):
    n = gate.shape[0]
    for c in prange((n + SILU_CHUNK - 1) // SILU_CHUNK):
        _silu_mul_range(out, gate, up, c * SILU_CHUNK, min(n, (c + 1) * SILU_CHUNK), into)


@intrinsic
def _silu_mul16(typingctx, out, gate, up, n16):
    """out[i] = silu(gate[i]) up[i] for i < 16 n16, 16 at a time in AVX-512 registers (byte
    addresses; out may be gate or up): e^-g by llvm_cpu.vexp (exp_f32's arithmetic), and
    1 / (1 + e^-g) by vrcp14ps and one Newton step (relative error ~1e-7, as a division's)
    instead of the division, whose throughput bounded the plain loop (256-bit vectors, about
    1.4 cycles an element)."""
    sig = types.void(out, gate, up, n16)

    def codegen(context, builder, signature, args):
        out, gate, up, n16 = [context.cast(builder, v, t, types.int64)
                              for v, t in zip(args, signature.args)]
        vf = ir.VectorType(F32, 16)
        vp = ir.PointerType(vf)
        mask = ir.IntType(16)

        def k(x):
            return ir.Constant(vf, [x] * 16)
        vmin = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf]),
                                              "llvm.minnum.v16f32")
        rcp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, mask]),
                                             "llvm.x86.avx512.rcp14.ps.512")
        vfma = fma(builder, vf)
        with cgutils.for_range(builder, n16) as loop:
            off = builder.mul(loop.index, ir.Constant(I64, 64))
            g = builder.load(builder.inttoptr(builder.add(gate, off), vp), align=4)
            u = builder.load(builder.inttoptr(builder.add(up, off), vp), align=4)
            d = builder.fadd(vexp(builder, builder.call(vmin, [builder.fneg(g), k(80.0)])),
                             k(1.0))                                  # 1 + e^-g, -g capped
            y = builder.call(rcp, [d, k(0.0), ir.Constant(mask, -1)])
            y = builder.fmul(y, builder.call(vfma, [builder.fneg(d), y, k(2.0)]))   # Newton
            res = builder.fmul(builder.fmul(g, y), u)
            builder.store(res, builder.inttoptr(builder.add(out, off), vp), align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", cache=True)
def _silu_mul_range16(out, gate, up, i0, i1):
    # _silu_mul_range with AVX-512: whole 16s in registers, the rest (under 16) in the plain
    # loop
    n16 = (i1 - i0) // 16
    _silu_mul16(out.ctypes.data + 4 * i0, gate.ctypes.data + 4 * i0, up.ctypes.data + 4 * i0,
                n16)
    _silu_mul_range(out, gate, up, i0 + 16 * n16, i1, 0)


@njit(cache=True)
def _silu_mul16_serial(out, gate, up):
    # a decode step's silu_mul (TinyLlama's 5632 elements: 2.0 us against 2.4 in the plain loop)
    _silu_mul_range16(out, gate, up, 0, gate.shape[0])


@njit(parallel=PRANGE, cache=True)
def _silu_mul_parallel16(out, gate, up):
    n = gate.shape[0]
    for c in prange((n + SILU_CHUNK - 1) // SILU_CHUNK):
        _silu_mul_range16(out, gate, up, c * SILU_CHUNK, min(n, (c + 1) * SILU_CHUNK))


def silu_mul_call(out, gate, up):
    """(kernel, args): silu_mul(out, gate, up) is kernel(*args), its kernel picked for these
    arrays (a decode step's buffers, every token: linear_cpu.bind_gemv's reason)."""
    if fast_path("avx512f"):
        kernel = _silu_mul16_serial if gate.size < PARALLEL_MIN else _silu_mul_parallel16
        return kernel, (out, gate, up)
    at = out.ctypes.data
    into = 1 if at == gate.ctypes.data else 2 if at == up.ctypes.data else 0
    if gate.size < PARALLEL_MIN:
        return _silu_mul_range, (out, gate, up, 0, gate.shape[0], into)
    return _silu_mul_parallel, (out, gate, up, into)


def bind_silu_mul(out, gate, up):
    """f() = silu_mul(out, gate, up) for these arrays, its kernel picked once."""
    kernel, args = silu_mul_call(out, gate, up)
    return lambda: kernel(*args)


def silu_mul(out, gate, up):
    # gate, up, out: (n,); out may be gate or up (the same memory, not just overlapping)
    bind_silu_mul(out, gate, up)()
