"""LLVM IR pieces shared by the CPU kernels written as numba intrinsics (explicit vectors):
the scalar types, the fma, prefetch and masked-store intrinsics declared once per module, and
non-temporal stores; the AVX-512 dot-product instructions (VNNI int8, BF16) and VNNI's sums on
AVX2, the AMX tile instructions, and the check that the host has them (fast_path), which the
environment can turn off."""
import ctypes
import functools
import math
import os
import sys

import llvmlite.binding as _llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
I8P = ir.PointerType(I8)


def fma(builder, vt):
    """llvm.fma for the float vector type vt: call it as builder.call(f, [a, b, c]) = a b + c."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                          f"llvm.fma.v{vt.count}f32")


def vexp(builder, x):
    """e^x for a vector x of float32 (any lane count; x <= 88), as scalar.exp_f32 computes it:
    x = n ln2 + r with ln 2 in two parts, e^r by its degree-6 polynomial, 2^n built in the
    exponent field; 0 below -87, where e^x underflows."""
    vt = x.type
    vit = ir.VectorType(I32, vt.count)

    def k(v):
        return ir.Constant(vt, [float(np.float32(v))] * vt.count)
    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]),
                                           f"llvm.floor.v{vt.count}f32")
    vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt]),
                                          f"llvm.maxnum.v{vt.count}f32")
    vfma = fma(builder, vt)
    xc = builder.call(vmax, [x, k(-87.0)])
    n = builder.call(floor, [builder.call(vfma, [xc, k(1.4426950408889634), k(0.5)])])
    r = builder.call(vfma, [n, k(-0.693359375), xc])
    r = builder.call(vfma, [n, k(2.12194440e-4), r])
    p = k(1 / math.factorial(6))
    for i in (5, 4, 3, 2, 1, 0):
        p = builder.call(vfma, [p, r, k(1 / math.factorial(i))])
    e = builder.bitcast(builder.shl(builder.add(builder.fptosi(n, vit),
                                                ir.Constant(vit, [127] * vt.count)),
                                    ir.Constant(vit, [23] * vt.count)), vt)
    return builder.select(builder.fcmp_ordered(">=", x, k(-87.0)), builder.fmul(p, e), k(0.0))


def prefetch(builder, addr, write, locality=3):
    """Prefetch the cache line at byte address addr (an i64) for reading (write=0) or writing
    (write=1): into every cache level (locality 3), L2 and beyond (2: a line wanted later,
    kept out of L1 meanwhile), or non-temporally (0, prefetchnta: a line read once, kept out of
    the outer levels as far as the CPU can); a prefetch never faults, wherever it points."""
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


def widen16(builder, v, half):
    """<n x i16> bits of 16-bit floats -> <n x float>, exactly: fpext of float16 (F16C's
    vcvtph2ps where the CPU has it), or bfloat16's bits moved up 16."""
    n = v.type.count
    if half:
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), n)),
                             ir.VectorType(F32, n))
    wide = builder.shl(builder.zext(v, ir.VectorType(I32, n)),
                       ir.Constant(ir.VectorType(I32, n), [16] * n))
    return builder.bitcast(wide, ir.VectorType(F32, n))


def vround_bf16(builder, bits):
    """float32 bits (an <n x i32>) -> the bits of their bfloat16 rounding (to nearest, ties to
    even) as float32 bits, the low half cleared."""
    n = bits.type.count

    def k(x):
        return ir.Constant(bits.type, [x] * n)
    odd = builder.and_(builder.lshr(bits, k(16)), k(1))
    return builder.and_(builder.add(builder.add(bits, k(0x7FFF)), odd), k(-65536))


# -- instruction sets: the kernels with ISA-specific intrinsics run only where the host has them

# "portable" sends every kernel family down its plain-loop path (no ISA-specific intrinsics),
# as on a CPU without them; "no-amx" keeps the AVX-512 paths and leaves AMX tiles out; "avx2"
# leaves AVX-512 out too (the paths of a CPU with AVX2 alone, as AMD's Zen 3); read once at
# import, and the attribute may be set at run time
CPU_PATHS = ("fast", "no-amx", "avx2", "portable")
CPU_PATH = os.environ.get("NUMBA_ATTN_CPU_PATH", "fast")
if CPU_PATH not in CPU_PATHS:
    raise ValueError(f"NUMBA_ATTN_CPU_PATH must be one of {', '.join(map(repr, CPU_PATHS))}, "
                     f"got {CPU_PATH!r}")
HOST_FEATURES = frozenset(k for k, v in _llvm.get_host_cpu_features().items() if v)
HOST_CPU = _llvm.get_host_cpu_name()
# decode GEMVs (one row of x) read w one row a thread where one read stream a core is fastest
# (AMD Zen 4, 12288x4096 bfloat16 on 2 cores: 53-56 GB/s, against ~40 with 4 rows interleaved)
# and 4 rows interleaved elsewhere (an Intel Xeon's 2 cores: 28.5 against 22.4 GB/s)
ONE_STREAM_DECODE = HOST_CPU.startswith("znver")
# ... except float32 rows on Zen 3, where 4 rows interleaved streamed faster (TinyLlama's 155
# GEMVs back to back, 2 cores: 35.3 against 29.1 GB/s median, 9 of 9 rounds; 31.1 / 32.3
# against 27.6 / 25.9 in two earlier runs; its float32 decode 7.44 against 6.69 tokens/s)
ONE_STREAM_DECODE_F32 = ONE_STREAM_DECODE and HOST_CPU != "znver3"


# accumulators of 16 floats a register-blocked kernel keeps in registers at once, room left
# for its operands: 24 of AVX-512's 32 zmm; AVX2's 16 ymm take two for each, so 5. By the host
# (numba compiles for the host CPU, whatever CPU_PATH says)
ACC16 = 24 if "avx512f" in HOST_FEATURES else 5


def row_passes(rows, per_row):
    """The rows of a register-blocked kernel, per_row accumulators of 16 floats each, in passes
    whose accumulators fit the registers (ACC16): [(r0, r1), ...]."""
    step = max(1, ACC16 // per_row)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


_LEFT_OUT = {"no-amx": ("amx",), "avx2": ("amx", "avx512")}   # features' prefixes a path drops


_FAST = {}   # (CPU_PATH, features) -> fast_path's answer (asked every layer of every token)


def fast_path(*features):
    """True when the host CPU has every LLVM feature named (e.g. "avx512vnni") and CPU_PATH
    allows them."""
    key = (CPU_PATH, features)
    ok = _FAST.get(key)
    if ok is None:
        ok = _FAST[key] = CPU_PATH != "portable" and all(
            f in HOST_FEATURES and not f.startswith(_LEFT_OUT.get(CPU_PATH, ()))
            for f in features)
    return ok


@functools.lru_cache(maxsize=None)
def _amx_permitted():
    # Linux hands out AMX's tile state (8 KB a thread) only to a process that asks once:
    # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); a tile instruction faults without it
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0    # SYS_arch_prctl on x86-64
    except (OSError, AttributeError):
        return False


def amx_path(*features):
    """True when the host has AMX tiles and the AMX features named (e.g. "amx-bf16"), the
    kernel lets this process use them, and CPU_PATH allows them."""
    return fast_path("amx-tile", *features) and _amx_permitted()


def vpdpbusd(builder):
    """AVX-512 VNNI: f(acc, a, b) = acc + the sums of 4 products of a's unsigned bytes with b's
    signed bytes, per int32 lane; all <16 x i32> (64 bytes of a and b)."""
    v = ir.VectorType(I32, 16)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v, [v, v, v]),
                                          "llvm.x86.avx512.vpdpbusd.512")


def dpbusd_avx2(builder, acc, a, b):
    """vpdpbusd's sums on AVX2: acc + the sums of 4 products of a's unsigned bytes with b's
    signed bytes, per int32 lane; acc, a, b <8 x i32>. vpmaddubsw adds two products into an
    int16 with saturation, so a pair's sum must stay within 32767 (e.g. a <= 255 with |b| <= 63,
    or a <= 127 with b >= -128): then it equals vpdpbusd's; vpmaddwd by ones adds the pairs."""
    v8, v16, w16 = ir.VectorType(I8, 32), ir.VectorType(ir.IntType(16), 16), ir.VectorType(I32, 8)
    mub = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v8, v8]),
                                         "llvm.x86.avx2.pmadd.ub.sw")
    mwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(w16, [v16, v16]),
                                         "llvm.x86.avx2.pmadd.wd")
    pairs = builder.call(mub, [builder.bitcast(a, v8), builder.bitcast(b, v8)])
    return builder.add(acc, builder.call(mwd, [pairs, ir.Constant(v16, [1] * 16)]))


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


def row_sums(builder, acc):
    """Each row's accumulators (lists of pointers to float vectors) added and reduced to one
    float: a list of the rows' sums."""
    sums = []
    for row in acc:
        v = builder.load(row[0])
        for a in row[1:]:
            v = builder.fadd(v, builder.load(a))
        sums.append(hsum(builder, v))
    return sums


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


@intrinsic
def copy_lines(typingctx, dst, src, n, dst_stride, src_stride):
    """n copies of 64 bytes, src + i src_stride -> dst + i dst_stride (byte addresses, any
    alignment): one vector load and store each."""
    sig = types.void(dst, src, n, dst_stride, src_stride)

    def codegen(context, builder, signature, args):
        dst, src, n, ds, ss = [context.cast(builder, v, t, types.int64)
                               for v, t in zip(args, signature.args)]
        vp = ir.PointerType(ir.VectorType(I64, 8))
        with cgutils.for_range(builder, n) as loop:
            i = loop.index
            v = builder.load(builder.inttoptr(builder.add(src, builder.mul(i, ss)), vp), align=1)
            builder.store(v, builder.inttoptr(builder.add(dst, builder.mul(i, ds)), vp), align=1)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def store_transposed16(typingctx, dst, ld, src):
    """The 16 x 16 float32 block at byte address src (rows 64 bytes apart) stored transposed:
    row c of dst (byte address dst + 4 c ld) = column c of src. In registers: four rounds of
    16 two-vector shuffles, each swapping one bit of the row index with the column's."""
    sig = types.void(dst, ld, src)

    def codegen(context, builder, signature, args):
        dst, ld, src = [context.cast(builder, v, t, types.int64)
                        for v, t in zip(args, signature.args)]
        vt = ir.VectorType(F32, 16)
        vp = ir.PointerType(vt)
        rows = [builder.load(builder.inttoptr(builder.add(src, ir.Constant(I64, 64 * r)), vp),
                             align=4) for r in range(16)]
        for b in (1, 2, 4, 8):
            lo = ir.Constant(ir.VectorType(I32, 16),
                             [c if c & b == 0 else 16 + (c ^ b) for c in range(16)])
            hi = ir.Constant(ir.VectorType(I32, 16),
                             [c ^ b if c & b == 0 else 16 + c for c in range(16)])
            for r in range(16):
                if r & b == 0:
                    a, bb = rows[r], rows[r | b]
                    rows[r] = builder.shuffle_vector(a, bb, lo)
                    rows[r | b] = builder.shuffle_vector(a, bb, hi)
        row_bytes = builder.mul(ld, ir.Constant(I64, 4))
        for c in range(16):
            at = builder.add(dst, builder.mul(ir.Constant(I64, c), row_bytes))
            builder.store(rows[c], builder.inttoptr(at, vp), align=4)
        return context.get_dummy_value()
    return sig, codegen


# -- AMX: eight tile registers (up to 16 rows of 64 bytes), numbered by immediates

def _amx(builder, name, *arg_types):
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), list(arg_types)), f"llvm.x86.{name}")


def tile_load(builder, tile, addr, stride):
    """Tile register `tile` = its rows read from byte address addr, stride bytes apart."""
    builder.call(_amx(builder, "tileloadd64", I8, I8P, I64),
                 [ir.Constant(I8, tile), builder.inttoptr(addr, I8P), stride])


def tile_store(builder, tile, addr, stride):
    """Tile register `tile`'s rows written at byte address addr, stride bytes apart."""
    builder.call(_amx(builder, "tilestored64", I8, I8P, I64),
                 [ir.Constant(I8, tile), builder.inttoptr(addr, I8P), stride])


def tile_zero(builder, tile):
    builder.call(_amx(builder, "tilezero", I8), [ir.Constant(I8, tile)])


def tile_dpbf16ps(builder, c, a, b):
    """AMX-BF16: tile c (16 x 16 float32) += tile a (16 rows x 32 bfloat16) times tile b (16
    pairs of rows x 16 columns, each column's bfloat16 pair side by side)."""
    builder.call(_amx(builder, "tdpbf16ps", I8, I8, I8),
                 [ir.Constant(I8, c), ir.Constant(I8, a), ir.Constant(I8, b)])


@intrinsic
def tile_config(typingctx, cfg):
    """Load the calling thread's tile configuration from the 64 bytes at address cfg (see
    tile_config_bytes); it stays until tile_release."""
    sig = types.void(cfg)

    def codegen(context, builder, signature, args):
        a = context.cast(builder, args[0], signature.args[0], types.int64)
        builder.call(_amx(builder, "ldtilecfg", I8P), [builder.inttoptr(a, I8P)])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def tile_release(typingctx):
    """Drop the calling thread's tile state (so context switches stop saving it)."""
    def codegen(context, builder, signature, args):
        builder.call(_amx(builder, "tilerelease"), [])
        return context.get_dummy_value()
    return types.void(), codegen


def tile_config_bytes(tiles=8, rows=16, colsb=64):
    """The 64-byte tile configuration (palette 1): the first `tiles` registers rows x colsb
    bytes each."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:48].view(np.uint16)[:tiles] = colsb
    cfg[48:48 + tiles] = rows
    return cfg
