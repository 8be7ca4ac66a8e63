"""Device helpers shared by the CUDA kernels: wide loads that widen 16-bit storage to float32,
and warp shuffles with a shared-memory fallback for numba's CUDA simulator.

Storage types: float32, float16 and bfloat16. NumPy has no bfloat16, so bfloat16 travels as its
raw bits in a uint16 array (a PyTorch bf16 tensor viewed as int16/uint16); `load` widens those
bits exactly (bf16 is the top half of a float32).

Loads come in chunks of CHUNK = 8 elements, the same for every storage type: one 16-byte load
for 16-bit storage, two for float32. `load8(a, i, n)` needs i % 8 == 0, a 16-byte aligned base
and n >= i + 8; `load8_tail(a, i, n)` is the guarded scalar version (zeros past n) for rows whose
length or alignment rules out wide loads.

Software pipelining splits load8 in two: `load8_raw(a, i)` issues the loads and returns the
chunk's 32-bit words as stored (8 for float32, 4 for 16-bit storage, then zeros), to be kept
in a local array of type RAW; `widen8(a, raw, u, t)` turns raw[u, t, :] into 8 float32 later,
when the loads have landed.

Int8 storage (Q8_0 codes): `load16_words(a, i)` loads 16 bytes as 4 uint32 words, `dp4a`
adds the 4 products of two words' signed bytes to an int32, and `div_rn` divides correctly
rounded inside fastmath kernels (a quantization scale that matches the CPU's).

Warp shuffles: the simulator implements neither shuffles nor syncwarp, so there `shfl_xor`
exchanges through a shared scratch array (scratch_size(threads) floats) and a barrier. Every
thread of the block must then call it together (never inside a branch that splits the block);
the kernels keep that rule on the GPU too. On the GPU the scratch is unused (declare it with
SCRATCH elements, 1 there)."""
import functools
import math
import os

import numpy as np
from numba import config, cuda, types

SIM = bool(config.ENABLE_CUDASIM)
# decode launches small grids on purpose (one block per few rows of a small batch); numba's
# low-occupancy warning would fire on most of them, and formatting it costs every launch.
# Off unless the user asks for it (NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=1)
if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
    os.environ["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] = "0"   # survives numba's config reloads
    config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
# float32 for the kernels: numba's type on the GPU; in the simulator NumPy's scalar type, the
# same values without numba's Python-side casting cost (the simulator runs kernels as Python)
if SIM:
    from numpy import float32
else:
    from numba import float32

# a small device function, inlined into its caller on the GPU
device = cuda.jit(device=True) if SIM else cuda.jit(device=True, forceinline=True)
CHUNK = 8        # elements per wide load, every storage type
ALIGN = None if SIM else 16   # alignment= of shared arrays read by load8 (the simulator has none)
FULL_MASK = 0xFFFFFFFF
# the element type of local arrays holding load8_raw's words (the simulator keeps the values)
RAW = np.float32 if SIM else types.uint32


def storage_ok(dtype):
    return np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))


@functools.cache
def sm_count():
    """Streaming multiprocessors of the current GPU (132 under the simulator)."""
    return 132 if SIM else cuda.get_current_device().MULTIPROCESSOR_COUNT


def aligned(arr):
    """Is the device array's first element 16-byte aligned?"""
    iface = arr.__array_interface__ if SIM else arr.__cuda_array_interface__
    return iface["data"][0] % 16 == 0


def wide_ok(arr, row_len):
    """Can rows of `row_len` elements of `arr` (a C-contiguous device array) use load8?"""
    return row_len % CHUNK == 0 and aligned(arr)


if not SIM:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    def _widen(builder, dtype, word_vals):
        # word_vals: 32-bit integers each holding two 16-bit values (low half first)
        out = []
        i16, i32, f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
        for w in word_vals:
            if dtype == types.float16:
                lo = builder.bitcast(builder.trunc(w, i16), ir.HalfType())
                hi = builder.bitcast(builder.trunc(builder.lshr(w, ir.Constant(i32, 16)), i16),
                                     ir.HalfType())
                out += [builder.fpext(lo, f32), builder.fpext(hi, f32)]
            else:  # bfloat16 bits: a float32 with the low 16 bits zero
                lo = builder.bitcast(builder.shl(w, ir.Constant(i32, 16)), f32)
                hi = builder.bitcast(builder.and_(w, ir.Constant(i32, 0xFFFF0000)), f32)
                out += [lo, hi]
        return out

    def _as_float32(builder, dtype, words):
        # 32-bit words of 8 stored elements (8 words for float32, 4 for 16-bit) as 8 float32
        if dtype == types.float32:
            return [builder.bitcast(w, ir.FloatType()) for w in words[:CHUNK]]
        return _widen(builder, dtype, words[:4])

    def _element_ptr(context, builder, sig, args):
        # the address of arr[idx], the intrinsic's first two arguments
        aty, ity = sig.args[:2]
        ary = context.make_array(aty)(context, builder, args[0])
        return builder.gep(ary.data, [context.cast(builder, args[1], ity, types.intp)])

    def _load_words(context, builder, sig, args):
        # the 32-bit words of a[idx:idx+8] (16-byte aligned): 8 for float32, 4 for 16-bit
        aty = sig.args[0]
        ptr = _element_ptr(context, builder, sig, args)
        i32 = ir.IntType(32)
        vty = ir.VectorType(i32, 4).as_pointer()
        words = []
        for half in range(2 if aty.dtype == types.float32 else 1):
            p = builder.gep(ptr, [ir.Constant(ir.IntType(64), 4 * half)])
            v = builder.load(builder.bitcast(p, vty), align=16)
            words += [builder.extract_element(v, ir.Constant(i32, c)) for c in range(4)]
        return words

    def _storage(arr):
        return isinstance(arr, types.Array) and arr.dtype in (types.float32, types.float16,
                                                              types.uint16)

    def _load8_intrinsic(raw):
        # raw False: 8 consecutive elements of a 1-D array from element idx (16-byte aligned),
        # as float32; raw True: their 32-bit words as stored (4 for 16-bit storage, then zeros)
        @intrinsic
        def load8(typingctx, arr, idx):
            if not _storage(arr):
                return None
            sig = types.UniTuple(types.uint32 if raw else types.float32, CHUNK)(arr, idx)

            def codegen(context, builder, sig, args):
                words = _load_words(context, builder, sig, args)
                if raw:
                    vals = words + [ir.Constant(ir.IntType(32), 0)] * (CHUNK - len(words))
                else:
                    vals = _as_float32(builder, sig.args[0].dtype, words)
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen
        return load8

    _load8, _load8_raw = _load8_intrinsic(False), _load8_intrinsic(True)

    @intrinsic
    def _widen8(typingctx, arr, words):
        # _load8_raw's words of an array like arr as 8 float32
        if not _storage(arr):
            return None
        sig = types.UniTuple(types.float32, CHUNK)(arr, words)

        def codegen(context, builder, sig, args):
            aty, wty = sig.args
            w = [context.cast(builder, builder.extract_value(args[1], c), wty[c], types.uint32)
                 for c in range(CHUNK)]
            return context.make_tuple(builder, sig.return_type, _as_float32(builder, aty.dtype, w))

        return sig, codegen

    def _prefetch_into(level):
        @intrinsic
        def prefetch(typingctx, arr, idx):
            # ask for the cache line of a[idx] in L1 or L2 (prefetch.L1 / .L2: no register, no
            # wait)
            if not isinstance(arr, types.Array):
                return None
            sig = types.void(arr, idx)

            def codegen(context, builder, sig, args):
                ptr = _element_ptr(context, builder, sig, args)
                fnty = ir.FunctionType(ir.VoidType(), [ptr.type])
                asm = ir.InlineAsm(fnty, f"prefetch.{level} [$0];", "l", side_effect=True)
                builder.call(asm, [ptr])
                return context.get_dummy_value()

            return sig, codegen
        return prefetch

    _prefetch_l1, _prefetch_l2 = _prefetch_into("L1"), _prefetch_into("L2")

    @intrinsic
    def _arrive(typingctx, arr, idx):
        # arr[idx] += 1 (float32), atomically at GPU scope with acquire-release semantics;
        # the old value
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
        sig = types.float32(arr, idx)

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig, args)
            fnty = ir.FunctionType(ir.FloatType(), [ptr.type])
            asm = ir.InlineAsm(fnty, "{ .reg .u64 g; cvta.to.global.u64 g, $1; "
                               "atom.acq_rel.gpu.global.add.f32 $0, [g], 0f3F800000; }",
                               "=f,l,~{memory}", side_effect=True)
            return builder.call(asm, [ptr])

        return sig, codegen

    @intrinsic
    def _load1(typingctx, arr, idx):
        # one element of a 1-D array as float32
        if not _storage(arr):
            return None
        sig = types.float32(arr, idx)

        def codegen(context, builder, sig, args):
            aty = sig.args[0]
            v = builder.load(_element_ptr(context, builder, sig, args))
            f32 = ir.FloatType()
            if aty.dtype == types.float32:
                return v
            if aty.dtype == types.float16:
                if v.type != ir.HalfType():        # stored as i16 in some data models
                    v = builder.bitcast(v, ir.HalfType())
                return builder.fpext(v, f32)
            w = builder.zext(v, ir.IntType(32))
            return builder.bitcast(builder.shl(w, ir.Constant(ir.IntType(32), 16)), f32)

        return sig, codegen

    @intrinsic
    def _store8(typingctx, arr, idx, vals):
        # a[idx:idx+8] = vals (float32 array, 16-byte aligned idx)
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
        sig = types.void(arr, idx, vals)

        def codegen(context, builder, sig, args):
            vty_ = sig.args[2]
            ptr = _element_ptr(context, builder, sig, args)
            vals = [context.cast(builder, builder.extract_value(args[2], c), vty_[c],
                                 types.float32) for c in range(CHUNK)]
            vecty = ir.VectorType(ir.FloatType(), 4)
            i32 = ir.IntType(32)
            for half in range(2):
                v = ir.Constant(vecty, ir.Undefined)
                for c in range(4):
                    v = builder.insert_element(v, vals[4 * half + c], ir.Constant(i32, c))
                p = builder.gep(ptr, [ir.Constant(ir.IntType(64), 4 * half)])
                builder.store(v, builder.bitcast(p, vecty.as_pointer()), align=16)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _load4(typingctx, arr, idx):
        # a[idx:idx+4] of a float32 array (16-byte aligned idx)
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
        sig = types.UniTuple(types.float32, 4)(arr, idx)

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig, args)
            vty = ir.VectorType(ir.FloatType(), 4)
            v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=16)
            vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), c)) for c in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def _store4(typingctx, arr, idx, vals):
        # a[idx:idx+4] = vals (float32 array, 16-byte aligned idx)
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
        sig = types.void(arr, idx, vals)

        def codegen(context, builder, sig, args):
            vty_ = sig.args[2]
            ptr = _element_ptr(context, builder, sig, args)
            vecty = ir.VectorType(ir.FloatType(), 4)
            v = ir.Constant(vecty, ir.Undefined)
            for c in range(4):
                x = context.cast(builder, builder.extract_value(args[2], c), vty_[c],
                                 types.float32)
                v = builder.insert_element(v, x, ir.Constant(ir.IntType(32), c))
            builder.store(v, builder.bitcast(ptr, vecty.as_pointer()), align=16)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _load_words4(typingctx, arr, idx):
        # the 4 32-bit words of the 16 bytes at a[idx] (an int8 or uint32 array, 16-byte
        # aligned), as stored
        if not (isinstance(arr, types.Array) and arr.dtype in (types.int8, types.uint32)):
            return None
        sig = types.UniTuple(types.uint32, 4)(arr, idx)

        def codegen(context, builder, sig, args):
            return context.make_tuple(builder, sig.return_type,
                                      _load_words(context, builder, sig, args))

        return sig, codegen

    def _asm_codegen(text, constraints, sig):
        # codegen of one PTX instruction on scalar registers, opaque to LLVM (fastmath cannot
        # reassociate or approximate it)
        ll = {types.int32: ir.IntType(32), types.uint32: ir.IntType(32),
              types.float32: ir.FloatType()}

        def codegen(context, builder, sig_, args):
            vals = [context.cast(builder, v, t, want)
                    for v, t, want in zip(args, sig_.args, sig.args)]
            fnty = ir.FunctionType(ll[sig.return_type], [ll[t] for t in sig.args])
            return builder.call(ir.InlineAsm(fnty, text, constraints), vals)

        return codegen

    _DP4A = types.int32(types.uint32, types.uint32, types.int32)
    _DIV = types.float32(types.float32, types.float32)

    @intrinsic
    def _dp4a(typingctx, a, b, c):
        # c + the sum of the 4 products of the signed bytes of a and b (exact in int32)
        return (types.int32(a, b, c),
                _asm_codegen("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", _DP4A))

    @intrinsic
    def _div_rn(typingctx, a, b):
        # a / b rounded to nearest, as IEEE (fastmath would make it div.approx)
        return types.float32(a, b), _asm_codegen("div.rn.f32 $0, $1, $2;", "=f,f,f", _DIV)

    @device
    def load16_words(a, i):
        """The 16 bytes at a[i] (int8 array, i % 16 == 0, 16-byte aligned base; or uint32
        array, i % 4 == 0) as 4 uint32 words, little-endian: byte j of word 0 is a[i + j]."""
        return _load_words4(a, i)

    @device
    def dp4a(a, b, c):
        """c + sum over j < 4 of signed byte j of a times signed byte j of b (int32)."""
        return _dp4a(a, b, c)

    @device
    def div_rn(a, b):
        """a / b in float32, correctly rounded even in a fastmath kernel (CPU's result)."""
        return _div_rn(a, b)

    @device
    def load4(a, i):
        """a[i:i+4] of a float32 array as 4 float32 (i % 4 == 0, aligned base)."""
        return _load4(a, i)

    @device
    def store4(a, i, vals):
        """a[i:i+4] = vals (4 float32; i % 4 == 0, aligned float32 array)."""
        _store4(a, i, vals)

    @device
    def store8(a, i, vals):
        """a[i:i+8] = vals (8 float32; i % 8 == 0, aligned float32 array)."""
        _store8(a, i, vals)

    @device
    def load(a, i):
        """a[i] as float32 (a: float32, float16 or bf16-bits uint16, 1-D)."""
        return _load1(a, i)

    @device
    def load8(a, i, n):
        """a[i:i+8] as 8 float32 (i % 8 == 0, aligned base; n unused)."""
        return _load8(a, i)

    @device
    def prefetch_l1(a, i):
        """Start bringing the cache line of a[i] into L1 (nothing to wait for)."""
        _prefetch_l1(a, i)

    @device
    def prefetch_l2(a, i):
        """Start bringing the cache line of a[i] into L2 (nothing to wait for)."""
        _prefetch_l2(a, i)

    @device
    def arrive(a, i):
        """a[i] += 1 atomically (float32 a), the old value: a release of the writes this thread
        made or saw (a block's, after a barrier) and an acquire of those of every earlier
        arrival (one instruction where threadfence + atomic + threadfence took three)."""
        return _arrive(a, i)

    @device
    def load8_raw(a, i):
        """The stored words of a[i:i+8] (i % 8 == 0, aligned base), for widen8."""
        return _load8_raw(a, i)

    @device
    def widen8(a, raw, u, t):
        """raw[u, t, :8], words load8_raw read from an array like a, as 8 float32."""
        return _widen8(a, (raw[u, t, 0], raw[u, t, 1], raw[u, t, 2], raw[u, t, 3],
                           raw[u, t, 4], raw[u, t, 5], raw[u, t, 6], raw[u, t, 7]))

    @device
    def load8_tail(a, i, n):
        """a[i:i+8] as 8 float32, zeros at and past n (any alignment)."""
        return (_load1(a, i) if i < n else float32(0),
                _load1(a, i + 1) if i + 1 < n else float32(0),
                _load1(a, i + 2) if i + 2 < n else float32(0),
                _load1(a, i + 3) if i + 3 < n else float32(0),
                _load1(a, i + 4) if i + 4 < n else float32(0),
                _load1(a, i + 5) if i + 5 < n else float32(0),
                _load1(a, i + 6) if i + 6 < n else float32(0),
                _load1(a, i + 7) if i + 7 < n else float32(0))

    @device
    def exp2(x):
        """2**x in one ex2 instruction (fastmath kernels)."""
        return math.exp2(x)

    @device
    def shfl_xor(v, offset, scratch, tid):
        """v of the lane `lane ^ offset` (offset < 32); scratch, tid unused on the GPU."""
        return cuda.shfl_xor_sync(FULL_MASK, v, offset)

else:  # numba's CUDA simulator: plain Python, run per thread
    import threading

    def _host(a):
        # the flat NumPy array inside a simulator device array (kernels index flat)
        return getattr(a, "_ary", a).reshape(-1)

    def _widen_np(v):
        # NumPy values as float32; uint16 holds bfloat16 bits
        if v.dtype == np.uint16:
            return (v.astype(np.uint32) << 16).view(np.float32)
        return v.astype(np.float32)

    @cuda.jit(device=True)
    def load(a, i):
        return _widen_np(_host(a)[i:i + 1])[0]

    @cuda.jit(device=True)
    def load8(a, i, n):
        assert i % CHUNK == 0 and i + CHUNK <= n
        return _widen_np(_host(a)[i:i + CHUNK])

    @cuda.jit(device=True)
    def prefetch_l1(a, i):
        pass

    @cuda.jit(device=True)
    def prefetch_l2(a, i):
        pass

    @cuda.jit(device=True)
    def arrive(a, i):
        return cuda.atomic.add(a, i, float32(1))

    @cuda.jit(device=True)
    def load8_raw(a, i):
        assert i % CHUNK == 0
        return _widen_np(_host(a)[i:i + CHUNK])

    @cuda.jit(device=True)
    def widen8(a, raw, u, t):
        return raw[u, t, :]

    @cuda.jit(device=True)
    def store8(a, i, vals):
        _host(a)[i:i + CHUNK] = vals

    @cuda.jit(device=True)
    def load16_words(a, i):
        h = _host(a)
        if h.dtype == np.uint32:
            return h[i:i + 4].copy()
        assert i % 16 == 0
        return h[i:i + 16].copy().view(np.uint32)

    @cuda.jit(device=True)
    def dp4a(a, b, c):
        ab = np.array([a], np.uint32).view(np.int8).astype(np.int32)
        bb = np.array([b], np.uint32).view(np.int8).astype(np.int32)
        return np.int32(c + int((ab * bb).sum()))

    @cuda.jit(device=True)
    def div_rn(a, b):
        return np.float32(a) / np.float32(b)

    @cuda.jit(device=True)
    def load4(a, i):
        assert i % 4 == 0
        return _host(a)[i:i + 4].astype(np.float32)

    @cuda.jit(device=True)
    def store4(a, i, vals):
        _host(a)[i:i + 4] = vals

    @cuda.jit(device=True)
    def load8_tail(a, i, n):
        v = np.zeros(CHUNK, np.float32)
        if i < n:
            w = _widen_np(_host(a)[i:min(i + CHUNK, n)])
            v[:w.shape[0]] = w
        return v

    @cuda.jit(device=True)
    def exp2(x):
        return np.exp2(x)       # Python's math.exp2 is 3.11+

    @cuda.jit(device=True)
    def shfl_xor(v, offset, scratch, tid):
        # every thread of the block calls this together. scratch: two exchange buffers of one
        # slot per thread, used in turn (the parity lives on the simulator's thread object);
        # a buffer is rewritten only after the next exchange's barrier, by which time every
        # thread has read it, so one barrier per exchange is enough
        t = scratch.shape[0] // 2
        th = threading.current_thread()
        par = th.__dict__.get("_shfl_parity", 0)
        th.__dict__["_shfl_parity"] = 1 - par
        scratch[par * t + tid] = v
        cuda.syncthreads()          # all values written before any is read
        return scratch[par * t + (tid ^ offset)]


_MAX_VIEWS = 64   # views kept per array (KV-cache views change length every decode step)


def view(a, shape, offset=0):
    """A C-contiguous view `shape` of the C-contiguous device array a, starting `offset`
    elements in. numba's reshape and slicing cost 10-70 us of Python per view (measured on the
    H200's host), which a decode step pays dozens of times: here the device array is built
    directly, and kept on `a` for the next call with the same shape and offset."""
    shape = tuple(shape)
    if SIM:
        return a.reshape(-1)[offset:offset + _prod(shape)].reshape(shape)
    views = a.__dict__.get("_views")
    if views is None:
        views = a.__dict__["_views"] = {}
    key = (shape, offset)
    v = views.get(key)
    if v is None:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        n = _prod(shape)
        if offset < 0 or offset + n > a.size:
            raise ValueError(f"view {shape} at {offset} is past an array of {a.size} elements")
        item = a.dtype.itemsize
        strides, step = [], item
        for dim in reversed(shape):
            strides.append(step)
            step *= dim
        data = a.gpu_data if offset == 0 and n == a.size else \
            a.gpu_data.view(offset * item, (offset + n) * item)
        v = DeviceNDArray(shape, tuple(reversed(strides)), a.dtype, stream=a.stream,
                          gpu_data=data)
        if len(views) >= _MAX_VIEWS:
            views.clear()
        views[key] = v
    return v


_ZERO_OFFSETS = {}   # device id -> int64 device array [0]


def zero_offset():
    """An int64 device array holding 0, one per device: the `at` of a launch whose positions
    are all passed by value (kernels taking `at` add at[0], read on the device, to them)."""
    dev = 0 if SIM else cuda.get_current_device().id
    z = _ZERO_OFFSETS.get(dev)
    if z is None:
        z = _ZERO_OFFSETS[dev] = cuda.to_device(np.zeros(1, np.int64))
    return z


def flat(a):
    """The C-contiguous device array a as 1-D (a cached view)."""
    return view(a, (a.size,))


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def scratch_size(threads):
    """Shared scratch elements a kernel of `threads` threads declares for shfl_xor."""
    return 2 * threads if SIM else 1


@device
def group_sum(v, width, scratch, tid):
    """Sum of v over aligned groups of `width` lanes (a power of two <= 32); all lanes get it."""
    off = width // 2
    while off > 0:
        v += shfl_xor(v, off, scratch, tid)
        off //= 2
    return v


@device
def group_max(v, width, scratch, tid):
    """Maximum of v over aligned groups of `width` lanes; all lanes get it."""
    off = width // 2
    while off > 0:
        v = max(v, shfl_xor(v, off, scratch, tid))
        off //= 2
    return v
