"""The public kernel functions: validate, pick the backend from the arguments, call the kernel.

NumPy arrays run kernels/<family>_cpu.py; CUDA arrays run kernels/<family>_cuda.py, whose
functions have the same names and arguments. Results come back on the arguments' side."""
import math

import numpy as np

from . import checks
from .backend import as_device, backend_of, device_id, empty, kernels, reshape, view
from .formats import FORMATS, KV_DTYPES, KV_INT8, Int8KV, Q8Matrix, weight_format
from .rope import RopeTable

F32 = (np.float32,)
_F32_DTYPE = np.dtype(np.float32)
IDS = (np.int64,)
# dtypes of the arrays accepted for attention's K/V, by backend (formats.KV_DTYPES; int8 K/V
# come as formats.Int8KV)
STORAGE = {backend: tuple(dt for name, dt in dtypes.items() if name != KV_INT8)
           for backend, dtypes in KV_DTYPES.items()}


_EMPTY = {}  # (shape, backend, device) -> an empty float32 array: "no bias", "no mask"


def _empty(shape, backend):
    """A zero-size float32 placeholder, made once per backend (and CUDA device)."""
    key = (shape, backend, _current_device(backend))
    if key not in _EMPTY:
        _EMPTY[key] = empty(shape, np.float32, backend)
    return _EMPTY[key]


def _current_device(backend):
    if backend == "cpu":
        return None
    return device_id()


def _prepare(backend, *arrays):
    """Device arrays as numba views (CuPy, PyTorch...), host arrays unchanged. An object passed
    twice (out is x) gets one view, so the `out is x` checks still see it. A Q8Matrix passes
    as it is (its arrays were made numba views when it was built)."""
    if backend == "cuda":
        views = {}
        for a in arrays:
            if a is not None and id(a) not in views:
                views[id(a)] = a if isinstance(a, Q8Matrix) else as_device(a)
        return [None if a is None else views[id(a)] for a in arrays]
    return list(arrays)


def _output(name, out, shape, backend, inputs=()):
    """A fresh output, or the caller's out= checked for shape, dtype and overlap."""
    if out is None:
        return empty(shape, np.float32, backend)
    checks.out_array(name, out, shape)
    if backend == "cpu":
        for x_name, x in inputs:
            if x is not None and out is not x and np.may_share_memory(out, x):
                raise ValueError(f"{name} overlaps {x_name} without being it; pass a separate "
                                 f"buffer (or {x_name} itself where in place is allowed)")
    return out


def _same_shape_f32(name_a, a, name_b, b):
    """The two inputs of an elementwise op: float32, C-contiguous, the same shape."""
    checks.array(name_a, a, dtypes=F32)
    checks.array(name_b, b, dtypes=F32)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


_ROPE_CPU = None


def _rope_cpu():
    global _ROPE_CPU
    _ROPE_CPU = kernels("rope", "cpu")
    return _ROPE_CPU


def _rope_host_ok(x, table, start_pos, out):
    """apply_rope's checks for host arrays, as one expression; False sends the call down the
    general path, which says what is wrong."""
    shape = x.shape
    return (x.dtype == _F32_DTYPE and out.dtype == _F32_DTYPE and out.shape == shape
            and 3 <= len(shape) <= 4 and x.flags.c_contiguous and out.flags.c_contiguous
            and shape[-1] == table.head_dim and start_pos >= 0
            and start_pos + shape[-3] <= table.max_positions
            and (out is x or not np.may_share_memory(out, x)))


def apply_rope(x, table, start_pos=0, *, style="half", out=None):
    """Rotate x (seq, heads, d) or (batch, seq, heads, d) at positions start_pos..start_pos+seq-1.

    style="half" pairs i with i + d/2 (Hugging Face Llama/Mistral/Qwen2, NeoX);
    style="interleaved" pairs 2i with 2i+1 (Meta Llama, GGUF, llama2.c, Candle rope_i).
    In place when out is x."""
    if (type(x) is np.ndarray and type(out) is np.ndarray and type(table) is RopeTable
            and type(start_pos) is int and _rope_host_ok(x, table, start_pos, out)):
        # host arrays that pass every check below, in fewer Python steps: the kernel streams
        # 2 x 2 MB through the caches at seq 128, leaving the interpreter's own data cold, so
        # each step of the general path costs ~10x its warm time (about 25 us of 145 per call)
        rope = _ROPE_CPU or _rope_cpu()
        x4, out4 = (x[None], out[None]) if x.ndim == 3 else (x, out)
        if style == "half":
            rope.rope_half(out4, x4, table.cos, table.sin, start_pos)
            return out
        if style == "interleaved":
            rope.rope_interleaved(out4, x4, table.cos, table.sin, start_pos)
            return out
    backend = backend_of(x, out)
    if not isinstance(table, RopeTable):
        raise TypeError(f"table must be a RopeTable, got {type(table).__name__}")
    if style not in ("half", "interleaved"):
        raise ValueError(f"style must be 'half' or 'interleaved', got {style!r}")
    x, out = _prepare(backend, x, out)
    checks.array("x", x, ndim=(3, 4), dtypes=F32)
    if x.shape[-1] != table.head_dim:
        raise ValueError(f"x has head_dim {x.shape[-1]} but the RopeTable was built for "
                         f"{table.head_dim}")
    start_pos = checks.nonnegative_int("start_pos", start_pos)
    seq = x.shape[-3]
    if start_pos + seq > table.max_positions:
        raise ValueError(f"positions {start_pos}..{start_pos + seq - 1} are past the RopeTable's "
                         f"max_positions={table.max_positions}")
    out = _output("out", out, x.shape, backend, [("x", x)])
    x4 = reshape(x, (1,) + tuple(x.shape)) if len(x.shape) == 3 else x
    out4 = reshape(out, (1,) + tuple(out.shape)) if len(out.shape) == 3 else out
    cos, sin = table.tables(backend)
    rope = kernels("rope", backend)
    (rope.rope_half if style == "half" else rope.rope_interleaved)(out4, x4, cos, sin, start_pos)
    return out


def _weight_format(name, w, backend):
    """The WeightFormat of a weight argument, checked: a Q8Matrix, or a 2-D C-contiguous array
    of a format the backend runs (formats.weight_format: on CUDA a uint16 array is bfloat16)."""
    if isinstance(w, Q8Matrix):
        fmt = FORMATS["q8_0"]
    else:
        checks.array(name, w, ndim=2, dtypes=None, contiguous=False)
        try:
            fmt = weight_format(w)
        except TypeError:
            fmt = None
    if fmt is None or backend not in fmt.devices:
        got = fmt.name if fmt is not None else np.dtype(w.dtype).name
        ok = [f.name for f in FORMATS.values() if backend in f.devices]
        bits = " and bfloat16 as a uint16 array of its bits (formats.to_device)" \
            if backend == "cuda" else ""
        raise TypeError(f"{name} must have dtype float32, got {got}; weights on {backend} may be "
                        f"{', '.join(ok[:-1])} or {ok[-1]} (a formats.Q8Matrix for q8_0{bits})")
    if not isinstance(w, Q8Matrix):
        checks.array(name, w, dtypes=None)   # C-contiguous
    return fmt


def _weight_array(w):
    """The array holding a weight's bytes (a Q8Matrix's codes), for the overlap checks."""
    return w.qs if isinstance(w, Q8Matrix) else w


def _backend_with_weight(name, w, *arrays):
    """backend_of the arguments of a call taking a weight, w's side read from its array (a
    Q8Matrix's codes); a Q8Matrix on the other side than the arrays is named in the error."""
    try:
        return backend_of(_weight_array(w), *arrays)
    except ValueError:
        if not isinstance(w, Q8Matrix):
            raise
        other = "cpu" if w.device == "cuda" else "cuda"
        move = "to_device()" if w.device == "cpu" else "copy_to_host()"
        raise ValueError(f"{name} is a Q8Matrix on {w.device} but the other arguments are on "
                         f"{other}; move it with {name}.{move}") from None


def linear(x, w, bias=None, *, out=None):
    """x (..., in) @ w.T + bias -> (..., out), with w (out, in) as stored in checkpoints.

    w is in any weight format (formats.FORMATS), on x's side: float32, float16, bfloat16 (on
    the host an ml_dtypes.bfloat16 array, on CUDA a uint16 array of its bits:
    formats.to_device(w)) or a Q8Matrix (formats.quantize_q8_0, .to_device()). The products
    are summed in float32 (Q8_0 up to 16 rows of x: x is quantized per 32 values too and the
    blocks' sums are exact in int32).
    One row (decode) is a matrix-vector product bound by reading w; many rows (prefill) a GEMM.
    A fused QKV projection is one w holding wq, wk and wv stacked along its first axis."""
    backend = _backend_with_weight("w", w, x, bias, out)
    x, w, bias, out = _prepare(backend, x, w, bias, out)
    checks.array("x", x, ndim=(1, 2, 3, 4), dtypes=F32)
    fmt = _weight_format("w", w, backend)
    n_out, n_in = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} input features but w {tuple(w.shape)} expects "
                         f"{n_in} (w is (out_features, in_features))")
    if bias is not None:
        checks.array("bias", bias, ndim=1, dtypes=F32)
        checks.shape("bias", bias, (n_out,))
    out = _output("out", out, tuple(x.shape[:-1]) + (n_out,), backend,
                  [("x", x), ("w", _weight_array(w)), ("bias", bias)])
    if out is x or out is w or out is bias:  # _output lets `out is x` through; not in place here
        raise ValueError("out must not be x, w or bias: each output reads all of x; "
                         "pass a separate buffer")
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    no_bias = _empty((0,), backend) if bias is None else bias
    kernels(fmt.family(backend), backend).linear(reshape(out, (m, n_out)),
                                                 reshape(x, (m, n_in)), w, no_bias)
    return out


def rmsnorm(x, weight, eps=1e-6, *, out=None):
    """x / sqrt(mean(x^2, last axis) + eps) * weight. In place when out is x."""
    backend = backend_of(x, weight, out)
    x, weight, out = _prepare(backend, x, weight, out)
    checks.array("x", x, ndim=(1, 2, 3, 4), dtypes=F32)
    checks.array("weight", weight, ndim=1, dtypes=F32)
    n = x.shape[-1]
    checks.shape("weight", weight, (n,))
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    out = _output("out", out, x.shape, backend, [("x", x)])
    m = x.size // n
    kernels("norm", backend).rmsnorm(reshape(out, (m, n)), reshape(x, (m, n)), weight,
                                     float(eps))
    return out


def add_rmsnorm(x, y, weight, eps=1e-6, *, out=None):
    """The residual add and the next RMSNorm in one pass: x += y (in place: x is the residual
    stream), then out = x / sqrt(mean(x^2, last axis) + eps) * weight. out may be y (not x).
    Returns out."""
    backend = backend_of(x, y, weight, out)
    x, y, weight, out = _prepare(backend, x, y, weight, out)
    _same_shape_f32("x", x, "y", y)
    checks.array("weight", weight, ndim=1, dtypes=F32)
    n = x.shape[-1]
    checks.shape("weight", weight, (n,))
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if out is x:
        raise ValueError("out must not be x: x receives the sum; pass y or another buffer")
    if backend == "cpu" and np.may_share_memory(x, y):
        raise ValueError("y overlaps x; pass a separate buffer")
    out = _output("out", out, x.shape, backend, [("x", x)] + ([] if out is y else [("y", y)]))
    m = x.size // n
    kernels("norm", backend).add_rmsnorm(reshape(out, (m, n)), reshape(x, (m, n)),
                                         reshape(y, (m, n)), weight, float(eps))
    return out


def silu_mul(gate, up, *, out=None):
    """SwiGLU's gate: silu(gate) * up, elementwise. In place when out is gate or up."""
    backend = backend_of(gate, up, out)
    gate, up, out = _prepare(backend, gate, up, out)
    _same_shape_f32("gate", gate, "up", up)
    if out is not None and backend == "cpu" and out is up:
        pass  # in place into up is fine: each element is read before it is written
    out = _output("out", out, gate.shape, backend, [("gate", gate)] + ([] if out is up else [("up", up)]))
    n = gate.size
    kernels("norm", backend).silu_mul(reshape(out, (n,)), reshape(gate, (n,)), reshape(up, (n,)))
    return out


def masked_softmax(scores, *, causal=True, scale=1.0, mask=None, out=None):
    """Softmax over the last axis of scale * scores (..., q_len, kv_len) [+ mask].

    causal=True applies the bottom-right causal rule inside the kernel (key j is visible to
    query i iff j <= kv_len - q_len + i); mask is an optional additive array broadcastable to
    (q_len, kv_len). A row with nothing visible gives zeros. In place when out is scores."""
    backend = backend_of(scores, mask, out)
    scores, mask, out = _prepare(backend, scores, mask, out)
    checks.array("scores", scores, ndim=(2, 3, 4, 5), dtypes=F32)
    q_len, kv_len = scores.shape[-2:]
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if mask is None:
        mask2 = _empty((0, 0), backend)
    else:
        checks.array("mask", mask, ndim=(1, 2), dtypes=F32, contiguous=False)
        try:
            np.broadcast_shapes(tuple(mask.shape), (q_len, kv_len))
            assert np.broadcast_shapes(tuple(mask.shape), (q_len, kv_len)) == (q_len, kv_len)
        except (ValueError, AssertionError):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"(q_len, kv_len) = ({q_len}, {kv_len})") from None
        mask2 = kernels("softmax", backend).broadcast_mask(mask, q_len, kv_len)
    out = _output("out", out, scores.shape, backend, [("scores", scores)])
    b = scores.size // (q_len * kv_len) if scores.size else 0
    kernels("softmax", backend).masked_softmax(
        reshape(out, (b, q_len, kv_len)), reshape(scores, (b, q_len, kv_len)), mask2,
        float(scale), bool(causal))
    return out


def attention(q, k, v, *, causal=True, scale=None, out=None):
    """Fused softmax(scale * q k^T [causal]) v with grouped-query heads.

    q (q_len, H, d), k and v (kv_len, Hkv, d), or with a leading batch axis; H a multiple of
    Hkv. Query i sits at position kv_len - q_len + i (bottom-right), which serves prefill
    (q_len = kv_len), prefill over a cached prefix (q_len < kv_len) and decode (q_len = 1).
    k and v are arrays (KV_DTYPES) or, on the host, both formats.Int8KV (the 8-bit cache's).
    scale defaults to 1/sqrt(d)."""
    int8 = [isinstance(a, Int8KV) for a in (k, v)]
    backend = backend_of(q, out, *(a for a, i in zip((k, v), int8) if not i))
    q, k, v, out = _prepare(backend, q, k, v, out)
    checks.array("q", q, ndim=(3, 4), dtypes=F32)
    if any(int8):
        if not all(int8) or backend != "cpu":
            raise TypeError(f"int8 keys and values (Int8KV) go together, with host (NumPy) q "
                            f"and out; got k {type(k).__name__}, v {type(v).__name__} and "
                            f"{backend} arrays")
        if k.ndim != len(q.shape):
            raise ValueError(f"k must have {len(q.shape)} axes as q, got shape {k.shape}")
    else:
        checks.array("k", k, ndim=len(q.shape), dtypes=STORAGE[backend])
        checks.array("v", v, ndim=len(q.shape), dtypes=STORAGE[backend])
    if tuple(k.shape) != tuple(v.shape) or k.dtype != v.dtype:
        raise ValueError(f"k and v must match, got {tuple(k.shape)} {k.dtype} and "
                         f"{tuple(v.shape)} {v.dtype}")
    *batch, q_len, n_heads, d = q.shape
    *kbatch, kv_len, n_kv_heads, kd = k.shape
    if batch != kbatch:
        raise ValueError(f"q and k have different batch sizes: {batch} and {kbatch}")
    if kd != d:
        raise ValueError(f"q has head_dim {d} but k and v have {kd}")
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads "
                         f"({n_kv_heads})")
    if kv_len == 0 or q_len == 0:
        raise ValueError(f"q_len and kv_len must be at least 1, got {q_len} and {kv_len}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    out = _output("out", out, q.shape, backend, [("q", q)] + [
        (name, a.codes if isinstance(a, Int8KV) else a) for name, a in (("k", k), ("v", v))])
    if out is q:
        raise ValueError("out must not be q: attention reads every query of a tile before writing")
    if out is k or out is v:  # _output lets `out is k` through; other tiles still read k and v
        raise ValueError("out must not be k or v: other tiles still read them while out is written")
    add = (lambda a: a[None] if isinstance(a, Int8KV) else reshape(a, (1,) + tuple(a.shape))) \
        if not batch else (lambda a: a)
    kernels("attention", backend).attention(add(out), add(q), add(k), add(v), float(scale),
                                            bool(causal))
    return out


# -- the small steps between the kernels of a forward pass: embedding, residual add, q|k|v --

def embedding(table, tokens, *, out=None):
    """Rows of table (vocab, hidden) for the token ids tokens (seq,) int64 -> (seq, hidden)
    float32. Ids outside [0, vocab) are clipped (check them first). table is in any weight
    format, as linear's w (the picked rows widened or dequantized). On CUDA, tokens is a device
    array too."""
    backend = _backend_with_weight("table", table, tokens, out)
    table, tokens, out = _prepare(backend, table, tokens, out)
    fmt = _weight_format("table", table, backend)
    checks.array("tokens", tokens, ndim=1, dtypes=IDS)
    out = _output("out", out, (tokens.shape[0], table.shape[1]), backend,
                  [("table", _weight_array(table))])
    family = fmt.family(backend)   # float32's embedding is the tensor family's
    kernels("tensor" if family == "linear" else family, backend).embedding(out, table, tokens)
    return out


def add(a, b, *, out=None):
    """a + b, elementwise (float32, same shapes). In place when out is a or b (the residual
    stream: add(x, y, out=x))."""
    backend = backend_of(a, b, out)
    a, b, out = _prepare(backend, a, b, out)
    _same_shape_f32("a", a, "b", b)
    inputs = [(name, x) for name, x in (("a", a), ("b", b)) if x is not out]
    out = _output("out", out, a.shape, backend, inputs)
    n = int(np.prod(a.shape, dtype=np.int64))
    kernels("tensor", backend).add(reshape(out, (n,)), reshape(a, (n,)), reshape(b, (n,)))
    return out


def split_qkv(qkv, n_heads, n_kv_heads, *, out=None):
    """q (seq, n_heads, d), k and v (seq, n_kv_heads, d) out of a fused projection qkv
    (seq, (n_heads + 2 * n_kv_heads) * d), each C-contiguous as the kernels take them.

    One row (decode): views of qkv, no copy (out is not used). More rows: the column blocks
    are strided, so they are copied into out = (q, k, v) (new arrays when None)."""
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 3):
        raise ValueError("out must be a (q, k, v) tuple of three arrays")
    backend = backend_of(qkv, *(out or ()))
    qkv, = _prepare(backend, qkv)
    checks.array("qkv", qkv, ndim=2, dtypes=F32)
    n_heads = checks.positive_int("n_heads", n_heads)
    n_kv_heads = checks.positive_int("n_kv_heads", n_kv_heads)
    seq, width = qkv.shape
    heads = n_heads + 2 * n_kv_heads
    if width % heads:
        raise ValueError(f"qkv has {width} columns, not a multiple of n_heads + 2 * n_kv_heads "
                         f"= {heads}")
    d = width // heads
    shapes = [(seq, n_heads, d), (seq, n_kv_heads, d), (seq, n_kv_heads, d)]
    bounds = [0, n_heads * d, (n_heads + n_kv_heads) * d, width]
    if seq == 1:
        return tuple(view(qkv, shapes[i], bounds[i]) for i in range(3))
    if out is None:
        out = tuple(empty(s, np.float32, backend) for s in shapes)
    out = _prepare(backend, *out)
    for name, o, s in zip("qkv", out, shapes):
        _output(f"out {name}", o, s, backend, [("qkv", qkv)])
    q, k, v = out
    kernels("tensor", backend).split_qkv(reshape(q, (seq, bounds[1])),
                                         reshape(k, (seq, n_kv_heads * d)),
                                         reshape(v, (seq, n_kv_heads * d)), qkv)
    return tuple(out)
