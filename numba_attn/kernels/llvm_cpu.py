"""LLVM IR pieces shared by the CPU kernels written as numba intrinsics (explicit vectors):
the scalar types, the fma, prefetch and masked-store intrinsics declared once per module, and
non-temporal stores; the AVX-512 dot-product instructions (VNNI int8, BF16) and the check
that the host has them (fast_path), which the environment can turn off."""
import os

import llvmlite.binding as _llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
I8P = ir.PointerType(ir.IntType(8))


def fma(builder, vt):
    """llvm.fma for the float vector type vt: call it as builder.call(f, [a, b, c]) = a b + c."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                          f"llvm.fma.v{vt.count}f32")


def prefetch(builder, addr, write, locality=3):
    """Prefetch the cache line at byte address addr (an i64) for reading (write=0) or writing
    (write=1): into every cache level (locality 3), or L2 and beyond (2: a line wanted later,
    kept out of L1 meanwhile); a prefetch never faults, wherever it points."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8P, I32, I32, I32]), "llvm.prefetch.p0")
    builder.call(fn, [builder.inttoptr(addr, I8P), ir.Constant(I32, write),
                      ir.Constant(I32, locality), ir.Constant(I32, 1)])


def store_nt(builder, v, ptr):
    """Store vector v at ptr, aligned to its size, non-temporally: the line goes to memory
    without being read first (no read for ownership) and leaves every cache level."""
    st = builder.store(v, ptr, align=v.type.count * 4)
    st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(I32, 1)]))


def masked_store(builder, v, ptr, lanes):
    """Store the lanes of float vector v whose flag in lanes (a list of bools) is set, at ptr
    (aligned to 4 bytes); the other lanes' memory is left untouched."""
    vt = v.type
    mt = ir.VectorType(ir.IntType(1), vt.count)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        ir.VoidType(), [vt, ptr.type, I32, mt]), f"llvm.masked.store.v{vt.count}f32.p0")
    builder.call(fn, [v, ptr, ir.Constant(I32, 4), ir.Constant(mt, lanes)])


# -- instruction sets: the kernels with ISA-specific intrinsics run only where the host has them

# "portable" sends every kernel family down its plain-loop path (no ISA-specific intrinsics),
# as on a CPU without them; read once at import, and the attribute may be set at run time
CPU_PATH = os.environ.get("NUMBA_ATTN_CPU_PATH", "fast")
if CPU_PATH not in ("fast", "portable"):
    raise ValueError(f"NUMBA_ATTN_CPU_PATH must be 'fast' or 'portable', got {CPU_PATH!r}")
HOST_FEATURES = frozenset(k for k, v in _llvm.get_host_cpu_features().items() if v)


def fast_path(*features):
    """True when the host CPU has every LLVM feature named (e.g. "avx512vnni") and the portable
    path is not forced (CPU_PATH)."""
    return CPU_PATH != "portable" and all(f in HOST_FEATURES for f in features)


def vpdpbusd(builder):
    """AVX-512 VNNI: f(acc, a, b) = acc + the sums of 4 products of a's unsigned bytes with b's
    signed bytes, per int32 lane; all <16 x i32> (64 bytes of a and b)."""
    v = ir.VectorType(I32, 16)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v, [v, v, v]),
                                          "llvm.x86.avx512.vpdpbusd.512")


def dpbf16ps(builder):
    """AVX-512 BF16: f(acc, a, b) = acc + a[2i] b[2i] + a[2i+1] b[2i+1] per float lane i; acc
    <16 x float>, a and b 32 bfloat16s each, passed as <16 x i32> (pairs of bits)."""
    v, f = ir.VectorType(I32, 16), ir.VectorType(F32, 16)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, v, v]),
                                          "llvm.x86.avx512bf16.dpbf16ps.512")


def hsum(builder, v):
    """The sum of a float vector's lanes (halves added, log2(lanes) steps)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        lo, hi = (builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, h),
                                                             list(range(s, s + h))))
                  for s in (0, h))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(I32, 0))


@intrinsic
def bits_as_float32(typingctx, bits):
    """The float32 whose bits are the low 32 bits of the integer bits (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, I32)
        return builder.bitcast(v, F32)
    return types.float32(bits), codegen


@intrinsic
def float32_bits(typingctx, f):
    """The bits of the float32 f as an int32 (no conversion)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], I32)
    return types.int32(f), codegen
