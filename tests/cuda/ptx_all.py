"""Compile every CUDA kernel of numba_attn to PTX for sm_90, for each storage type it takes,
with no GPU and without the simulator (which checks no types): `python ptx_all.py` prints one
line per kernel and exits 1 if any failed. Run by test_ptx.py in its own process;
`python ptx_all.py WORD...` compiles only the kernels whose name contains one of the words.

Also checks the PTX for what would make a kernel slow without failing it: float64 arithmetic
(a silent promotion such as `acc = 0.0`) and local-memory arrays (a register array indexed at
run time)."""
import os
import re
import sys
import time
import types as pytypes

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from numba import cuda, types as T  # noqa: E402
import numba.cuda.dispatcher as _dispatcher  # noqa: E402

# device functions called from a kernel are compiled for "the current device"; without a GPU
# there is none: tell numba-cuda it is an sm_90 (compile_ptx itself takes cc=)
_dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))

from numba_attn.kernels import (attention_cuda as A, linear_cuda as L, norm_cuda as N,  # noqa
                                rope_cuda as R, softmax_cuda as S, tensor_cuda as TN)
from numba_attn.kernels import linear_q8_cuda as Q8  # noqa: E402

F32, F16, U16 = T.float32[::1], T.float16[::1], T.uint16[::1]
STORAGE = {"f32": F32, "f16": F16, "bf16": U16}
I, F, B = T.int64, T.float32, T.boolean
M2 = T.float32[:, ::1]
AT = T.int64[::1]       # a position read on the device
DEC = (F, B, I, I, I, I, AT, I, I, I, I, I)   # attention decode's arguments after ws


def kernels():
    """(name, dispatcher, argument types) for every kernel and variant."""
    for wide in (True, False):
        yield f"rmsnorm[wide={wide}]", N.rmsnorm_kernel(wide), (F32, F32, F32, F32, F, I)
        yield (f"add_rmsnorm[wide={wide}]", N.rmsnorm_kernel(wide, True),
               (F32, F32, F32, F32, F, I))
        yield f"silu_mul[wide={wide}]", N.silu_mul_kernel(wide), (F32, F32, F32, I)
        yield (f"masked_softmax[wide={wide}]", S.masked_softmax_kernel(wide),
               (F32, F32, F32, F, B, I, I))
    yield "fill_causal_mask", S._fill_causal_mask, (F32, I, I)
    yield "broadcast_copy", S._broadcast_copy, (M2, T.float32[:, :])
    for name, k in (("rope_half", R._rope_half), ("rope_interleaved", R._rope_interleaved)):
        yield name, k, (F32, F32, M2, M2, I, AT, I, I, I)
    for st, W in STORAGE.items():
        for wide in (True, False):
            yield f"gemv[{st},wide={wide}]", L.gemv_kernel(wide), (F32, F32, W, F32, I, I)
        yield f"gemm[{st}]", L._gemm, (F32, F32, W, F32, I, I, I)
        yield (f"attention_decode[{st},D=128,QR=4]", A.decode_kernel(128, 4, True),
               (F32, F32, W, W, F32) + DEC)
        for qr, dpl, ku in ((1, 16, 4), (2, 16, 2)):
            yield (f"attention_decode[{st},D=128,QR={qr},dpl={dpl},keys={ku},pipe]",
                   A.decode_kernel(128, qr, True, dpl, ku, True),
                   (F32, F32, W, W, F32) + DEC)
        yield (f"attention_prefill[{st},D=128]", A.prefill_kernel(128, True),
               (F32, F32, W, W, F, B, I, I, I, I, I))
    for st in ("f32", "f16"):
        for qr, dpl, ku in ((1, 8, 1), (1, 32, 2), (4, 8, 4), (2, 16, 4), (1, 16, 4), (2, 8, 2)):
            yield (f"attention_decode[{st},D=128,QR={qr},dpl={dpl},keys={ku}]",
                   A.decode_kernel(128, qr, True, dpl, ku),
                   (F32, F32, STORAGE[st], STORAGE[st], F32) + DEC)
        for rpw, unroll, threads in ((2, 4, 256), (2, 2, 512), (1, 8, 256), (2, 2, 128)):
            yield (f"gemv[{st},rows/warp={rpw},unroll={unroll},threads={threads}]",
                   L.gemv_kernel(True, rpw, unroll, threads),
                   (F32, F32, STORAGE[st], F32, I, I))
    yield ("attention_decode[f32,D=128,QR=1]", A.decode_kernel(128, 1, True),
           (F32, F32, F32, F32, F32) + DEC)
    yield ("attention_decode[f16,D=64,QR=2,scalar]", A.decode_kernel(64, 2, False),
           (F32, F32, F16, F16, F32) + DEC)
    yield ("attention_prefill[f32,D=64,scalar]", A.prefill_kernel(64, False),
           (F32, F32, F32, F32, F, B, I, I, I, I, I))
    yield ("attention_prefill[bf16,D=256]", A.prefill_kernel(256, True),
           (F32, F32, U16, U16, F, B, I, I, I, I, I))
    for ks, rows in ((1, 1), (4, 4)):
        yield (f"attention_prefill[f32,D=128,{ks} keys x {rows} rows]",
               A.prefill_kernel(128, True, ks=ks, rows=rows),
               (F32, F32, F32, F32, F, B, I, I, I, I, I))
    for wide in (True, False):
        yield (f"softmax_rows[wide={wide}]", S.softmax_rows_kernel(wide),
               (F32, F32, F32, F, B, I, I))
    yield ("rope_half4", R._rope_half4, (F32, F32, M2, M2, I, AT, I, I, I))
    yield ("rope_interleaved4", R._rope_interleaved4, (F32, F32, M2, M2, I, AT, I, I, I))
    yield "workspace_zero", A._zero, (F32,)
    for st, W in STORAGE.items():
        yield f"embedding[{st}]", TN._embedding, (F32, W, T.int64[::1], I, I)
    # Q8_0 weights: int8 codes, float16 scales
    Q, H = T.int8[::1], T.float16[::1]
    for wide in (True, False):
        for xr in (1, 2, 4):
            yield (f"gemv_q8[wide={wide},x rows={xr}]", Q8.gemv_kernel(wide, xr=xr),
                   (F32, F32, Q, H, F32, I, I, I))
    for rpw, unroll, threads, lanes, ahead in ((2, 2, 256, 1, 0), (1, 4, 256, 1, 1),
                                               (2, 4, 256, 2, 0), (4, 2, 128, 1, 1),
                                               (1, 2, 512, 2, 0)):
        yield (f"gemv_q8[rows/warp={rpw},unroll={unroll},threads={threads},lanes={lanes},"
               f"ahead={ahead}]", Q8.gemv_kernel(True, rpw, unroll, threads, lanes, 1, ahead),
               (F32, F32, Q, H, F32, I, I, I))
    yield "gemm_q8", Q8._gemm, (F32, F32, Q, H, F32, I, I, I)
    yield "embedding_q8", Q8._embedding, (F32, Q, H, T.int64[::1], I, I)
    yield "add", TN._add, (F32, F32, F32, I)
    yield "split_qkv", TN._split_qkv, (F32, F32, F32, F32, I, I, I)
    for st, W in STORAGE.items():
        yield f"append_kv[{st}]", TN._append_kv, (W, W, W, W, I, AT, I, I)


def main():
    failed = []
    words = sys.argv[1:]
    for name, k, sig in kernels():
        if words and not any(w in name for w in words):
            continue
        t = time.perf_counter()
        try:
            ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0),
                                      fastmath=k.targetoptions.get("fastmath", False))
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        problems = []
        if re.search(r"\.f64\b", ptx):
            problems.append("float64 arithmetic")
        if ".local" in ptx:
            problems.append("local memory")
        if problems:
            failed.append(name)
        print(f"{'FAIL' if problems else 'ok  '} {name} ({time.perf_counter() - t:.1f} s)"
              + (": " + ", ".join(problems) if problems else ""), flush=True)
    print(f"{len(failed)} failed" if failed else "all kernels compiled", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
