"""LLVM IR pieces shared by the CPU kernels written as numba intrinsics (explicit vectors):
the scalar types, and the fma and prefetch intrinsics declared once per module."""
from llvmlite import ir
from numba.core import cgutils

F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
I8P = ir.PointerType(ir.IntType(8))


def fma(builder, vt):
    """llvm.fma for the float vector type vt: call it as builder.call(f, [a, b, c]) = a b + c."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                          f"llvm.fma.v{vt.count}f32")


def prefetch(builder, addr, write):
    """Prefetch the cache line at byte address addr (an i64) into every cache level, for
    reading (write=0) or writing (write=1); a prefetch never faults, wherever it points."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8P, I32, I32, I32]), "llvm.prefetch.p0")
    builder.call(fn, [builder.inttoptr(addr, I8P), ir.Constant(I32, write), ir.Constant(I32, 3),
                      ir.Constant(I32, 1)])
