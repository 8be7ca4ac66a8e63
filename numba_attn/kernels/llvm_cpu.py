"""LLVM IR pieces shared by the CPU kernels written as numba intrinsics (explicit vectors):
the scalar types, the fma, prefetch and masked-store intrinsics declared once per module, and
non-temporal stores."""
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
