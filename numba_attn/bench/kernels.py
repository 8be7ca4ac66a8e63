"""The kernel benchmarks: the reference profile's rows, each against its in-run peers.

Rows (at the reference shapes: hidden 4096 = 32 heads x head_dim 128, float32; GQA 32/8 for
decode), each a function of one size:

    rope_forward/S       apply_rope on q and k (S, 32, 128)           peers: NumPy, PyTorch
    qkv_projection/S     linear, x (S, 4096) @ fused w (12288, 4096)   NumPy BLAS, torch linear
    attention_scores/S   scale * Q K^T (BLAS), then the causal softmax -> (32, S, S)
    causal_mask/S        [build] causal_mask(S, S); [cache hit] MaskCache.get;
                         [in softmax] masked_softmax causal minus causal=False on (32, S, S)
    masked_softmax/S     causal softmax of (32, S, S) vs NumPy's "add the mask, then softmax"
    full_attention/S     attention, causal, q = k = v (S, 32, 128)     NumPy, torch SDPA
    decode_attention/KV  attention, q (1, 32, 128) over k, v (KV, 8, 128)

A row measures "ours" (numba-attn's public API) and its peers with timing.measure, counts the
bytes it must move and the FLOPs it must do, and reports the achieved rate of whichever of the
two is closer to the measured limit (a roofline: the binding resource), plus the reference
profile's Candle figure (criterion's [low mid high]) where the profile has one: the figures,
their source and what is known of their machine are in candle_reference.py.
"""
import functools
import math
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from .. import MaskCache, RopeTable, apply_rope, attention, causal_mask, linear, masked_softmax
from .candle_reference import CANDLE, CANDLE_VARIANT
from .limits import roofline
from .timing import difference, measure

OPS = {   # op -> (default sizes, what the size is)
    "rope_forward": ((1, 8, 32, 128), "seq"),
    "qkv_projection": ((1, 8, 32, 128), "seq"),
    "attention_scores": ((1, 8, 32, 128), "seq"),
    "causal_mask": ((8, 32, 128, 512), "seq"),
    "masked_softmax": ((128, 512), "seq"),
    "full_attention": ((1, 8, 32, 128, 512), "seq"),
    "decode_attention": ((512, 1024, 2048, 4096, 8192), "kv_len"),
}
PEERS = ("numpy", "torch")


@dataclass(frozen=True)
class Shape:
    heads: int = 32
    kv_heads: int = 8          # decode_attention (GQA); the other rows are multi-head
    head_dim: int = 128

    @property
    def hidden(self):
        return self.heads * self.head_dim


REFERENCE = Shape()


@dataclass
class Timed:
    """One thing to time: fn() runs it once; sync() waits for device work."""
    fn: object
    sync: object = None


@dataclass
class Diff:
    """A cost measured as the difference of two timings (a - b)."""
    a: Timed
    b: Timed


@dataclass
class Case:
    op: str
    size: int
    ours: object                         # Timed, Diff, or a str: why it is not available
    peers: dict = field(default_factory=dict)   # peer name -> Timed | Diff | str
    variant: str = ""
    bytes: float = 0.0                   # bytes the op must move at least
    flops: float = 0.0                   # floating-point operations it must do
    note: str = ""

    @property
    def name(self):
        return f"{self.op}/{self.size}" + (f" [{self.variant}]" if self.variant else "")


TORCH_MISSING = "PyTorch is not installed: pip install torch"


def torch_unavailable(device="cpu"):
    """Why PyTorch cannot be a peer on device ('cpu' or 'cuda'), or None when it can."""
    try:
        import torch
    except ImportError:
        return TORCH_MISSING
    except Exception as e:             # installed but broken: say how
        return f"PyTorch cannot be imported ({_first_line(e)})"
    if device == "cuda" and not torch.cuda.is_available():
        return (f"PyTorch {torch.__version__} sees no CUDA GPU (a CPU-only build?): install "
                f"a CUDA build, https://pytorch.org/get-started/locally/")
    return None


class Device:
    """Where inputs live and how to wait for work: 'cpu' (NumPy) or 'cuda' (numba arrays)."""

    def __init__(self, name, peers=PEERS):
        self.name = name
        self.sync = None
        self.torch = None
        self.torch_sync = None
        if name == "cuda":
            from numba import cuda
            self.sync = cuda.synchronize
        if "torch" in peers:
            try:
                import torch
                if name == "cpu" or torch.cuda.is_available():
                    self.torch = torch
                    if name == "cuda":
                        self.torch_sync = torch.cuda.synchronize
            except Exception:
                self.torch = None
        self.numpy = name == "cpu" and "numpy" in peers

    def put(self, a):
        if self.name == "cuda":
            from numba import cuda
            return cuda.to_device(a)
        return a

    def empty(self, shape):
        if self.name == "cuda":
            from numba import cuda
            return cuda.device_array(shape, np.float32)
        return np.empty(shape, np.float32)

    def tensor(self, a):
        """A torch tensor of host array a, on this device (shares memory on the CPU)."""
        t = self.torch.from_numpy(a)
        return t.cuda() if self.name == "cuda" else t

    def ours(self, fn):
        return Timed(fn, self.sync)

    def peer_torch(self, fn):
        return Timed(fn, self.torch_sync)


def _rng(size, tag):
    return np.random.default_rng([size, zlib.crc32(tag.encode())])   # same data every run


def _randn(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _np_softmax_(s):
    """In-place, numerically stable softmax over the last axis (rows of -inf give NaN, as
    plain NumPy code does; our shapes never have one)."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _np_mask(q, kv):
    """The NumPy way to build the bottom-right causal mask."""
    return np.triu(np.full((q, kv), -np.inf, np.float32), kv - q + 1)


# -- the rows ------------------------------------------------------------------------------

def rope_forward(size, sh, dev):
    rng = _rng(size, "rope")
    S, H, d = size, sh.heads, sh.head_dim
    table = RopeTable(d, max(S, 1))
    qh, kh = _randn(rng, (S, H, d)), _randn(rng, (S, H, d))
    q, k = dev.put(qh), dev.put(kh)
    qo, ko = dev.empty((S, H, d)), dev.empty((S, H, d))

    def ours():
        apply_rope(q, table, 0, out=qo)
        apply_rope(k, table, 0, out=ko)

    nbytes = 2 * (2 * qh.nbytes) + 2 * table.cos[:S].nbytes
    case = Case("rope_forward", S, dev.ours(ours), bytes=nbytes, flops=2 * 6 * S * H * d // 2,
                note="q and k, style half (Candle: rope_i)")
    half = d // 2
    cos, sin = table.cos[:S, None, :], table.sin[:S, None, :]      # (S, 1, d/2)
    if dev.numpy:
        qn, kn = np.empty_like(qh), np.empty_like(kh)

        def numpy_rope():
            for x, o in ((qh, qn), (kh, kn)):
                x1, x2 = x[..., :half], x[..., half:]
                o[..., :half] = x1 * cos - x2 * sin
                o[..., half:] = x2 * cos + x1 * sin
        case.peers["numpy"] = Timed(numpy_rope)
    if dev.torch:
        T = dev.torch
        tq, tk = dev.tensor(qh), dev.tensor(kh)
        tc, ts = dev.tensor(np.ascontiguousarray(cos)), dev.tensor(np.ascontiguousarray(sin))

        def torch_rope():
            for x in (tq, tk):
                x1, x2 = x[..., :half], x[..., half:]
                T.cat((x1 * tc - x2 * ts, x2 * tc + x1 * ts), dim=-1)
        case.peers["torch"] = dev.peer_torch(torch_rope)
    return [case]


def qkv_projection(size, sh, dev):
    rng = _rng(size, "qkv")
    S, n_in = size, sh.hidden
    n_out = 3 * sh.hidden                      # fused wq | wk | wv (multi-head, as the profile)
    xh = _randn(rng, (S, n_in))
    wh = _randn(rng, (n_out, n_in)) * np.float32(1 / math.sqrt(n_in))
    x, w, out = dev.put(xh), dev.put(wh), dev.empty((S, n_out))
    case = Case("qkv_projection", S, dev.ours(lambda: linear(x, w, out=out)),
                bytes=wh.nbytes + xh.nbytes + S * n_out * 4, flops=2 * S * n_in * n_out,
                note=f"fused w ({n_out}, {n_in})")
    if dev.numpy:
        on = np.empty((S, n_out), np.float32)
        case.peers["numpy"] = Timed(lambda: np.matmul(xh, wh.T, out=on))
    if dev.torch:
        F = dev.torch.nn.functional
        tx, tw = dev.tensor(xh), dev.tensor(wh)
        case.peers["torch"] = dev.peer_torch(lambda: F.linear(tx, tw))
    return [case]


def attention_scores(size, sh, dev):
    rng = _rng(size, "scores")
    S, H, d = size, sh.heads, sh.head_dim
    scale = 1 / math.sqrt(d)
    qh, kh = _randn(rng, (S, H, d)), _randn(rng, (S, H, d))
    qT, kT = qh.transpose(1, 0, 2), kh.transpose(1, 2, 0)          # (H, S, d), (H, d, S)
    nbytes = qh.nbytes + kh.nbytes + 3 * H * S * S * 4            # + scores written, re-read
    flops = 2 * H * S * S * d
    note = "QK^T by BLAS, then the causal softmax (Candle's figure: QK^T/sqrt(d) only)"
    if dev.name == "cpu":
        scores = np.empty((H, S, S), np.float32)

        def ours():
            np.matmul(qT, kT, out=scores)
            masked_softmax(scores, causal=True, scale=scale, out=scores)
        ours = Timed(ours)
    else:
        ours = "no scores product in the API on cuda (attention is fused)"
    case = Case("attention_scores", S, ours, bytes=nbytes, flops=flops, note=note)
    if dev.numpy:
        sn = np.empty((H, S, S), np.float32)
        mask = _np_mask(S, S)

        def numpy_scores():
            np.matmul(qT, kT, out=sn)
            np.multiply(sn, np.float32(scale), out=sn)
            np.add(sn, mask, out=sn)
            _np_softmax_(sn)
        case.peers["numpy"] = Timed(numpy_scores)
    if dev.torch:
        T = dev.torch
        tq, tk = dev.tensor(qh).transpose(0, 1), dev.tensor(kh).permute(1, 2, 0)
        tm = dev.tensor(_np_mask(S, S))
        case.peers["torch"] = dev.peer_torch(
            lambda: T.softmax(T.matmul(tq, tk) * scale + tm, dim=-1))
    return [case]


def causal_mask_rows(size, sh, dev):
    S, H = size, sh.heads
    device = dev.name
    # [build]: a fresh mask each call, as the reference profile did
    build = Case("causal_mask", S, dev.ours(lambda: causal_mask(S, S, device=device)),
                 variant="build", bytes=S * S * 4, note="a new (S, S) mask each call")
    # [cache hit]: MaskCache.get of a mask already in the cache
    cache = MaskCache()
    cache.get(S, S, device=device)
    hit = Case("causal_mask", S, dev.ours(lambda: cache.get(S, S, device=device)),
               variant="cache hit", note="NumPy peer: functools.lru_cache hit")
    # [in softmax]: what the causal rule costs inside masked_softmax
    rng = _rng(size, "mask")
    sh_scores = _randn(rng, (H, S, S))
    scores, buf = dev.put(sh_scores), dev.empty((H, S, S))
    in_softmax = Case(
        "causal_mask", S,
        Diff(dev.ours(lambda: masked_softmax(scores, causal=True, out=buf)),
             dev.ours(lambda: masked_softmax(scores, causal=False, out=buf))),
        variant="in softmax",
        note=f"ours: causal minus causal=False on ({H}, S, S); peers: adding the mask")
    if dev.numpy:
        build.peers["numpy"] = Timed(lambda: _np_mask(S, S))
        cached = functools.lru_cache(maxsize=64)(_np_mask)
        cached(S, S)
        hit.peers["numpy"] = Timed(lambda: cached(S, S))
        mask, nb = _np_mask(S, S), np.empty_like(sh_scores)
        in_softmax.peers["numpy"] = Timed(lambda: np.add(sh_scores, mask, out=nb))
    if dev.torch:
        T = dev.torch
        tdev = "cuda" if device == "cuda" else "cpu"
        build.peers["torch"] = dev.peer_torch(
            lambda: T.triu(T.full((S, S), float("-inf"), device=tdev), diagonal=1))
        ts, tm = dev.tensor(sh_scores), dev.tensor(_np_mask(S, S))
        tb = T.empty_like(ts)
        in_softmax.peers["torch"] = dev.peer_torch(lambda: T.add(ts, tm, out=tb))
    return [build, hit, in_softmax]


def masked_softmax_row(size, sh, dev):
    rng = _rng(size, "softmax")
    S, H = size, sh.heads
    sh_scores = _randn(rng, (H, S, S))
    scores, out = dev.put(sh_scores), dev.empty((H, S, S))
    case = Case("masked_softmax", S,
                dev.ours(lambda: masked_softmax(scores, causal=True, out=out)),
                bytes=2 * sh_scores.nbytes, note=f"causal, ({H}, S, S); peers add the mask")
    if dev.numpy:
        mask = _np_mask(S, S)
        t = np.empty_like(sh_scores)

        def numpy_softmax():
            np.add(sh_scores, mask, out=t)
            _np_softmax_(t)
        case.peers["numpy"] = Timed(numpy_softmax)
    if dev.torch:
        T = dev.torch
        ts, tm = dev.tensor(sh_scores), dev.tensor(_np_mask(S, S))
        case.peers["torch"] = dev.peer_torch(lambda: T.softmax(ts + tm, dim=-1))
    return [case]


def _numpy_attention(qh, kh, vh, scale, causal):
    """Vectorised NumPy attention: scores, add the mask, softmax, @ v. q (S, H, d), k and v
    (KV, Hkv, d), H a multiple of Hkv. The result stays laid out (Hkv, g*S, d), as computed
    (PyTorch's peer likewise returns (1, H, S, d))."""
    S, H, d = qh.shape
    kv, hkv = kh.shape[:2]
    g = H // hkv
    qT = qh.transpose(1, 0, 2)                                    # (H, S, d) view
    kT, vT = kh.transpose(1, 2, 0), vh.transpose(1, 0, 2)        # (Hkv, d, KV), (Hkv, KV, d)
    mask = np.tile(_np_mask(S, kv), (g, 1)) if causal and S > 1 else None   # (g*S, KV)
    s = np.empty((hkv, g * S, kv), np.float32)
    o = np.empty((hkv, g * S, d), np.float32)

    def run():
        # the queries of the g heads that share a KV head, stacked: (Hkv, g*S, d); a view
        # when it can be, else the copy NumPy code pays on every call
        qg = qT.reshape(hkv, g * S, d) if g > 1 else qT
        np.matmul(qg, kT, out=s)
        np.multiply(s, np.float32(scale), out=s)
        if mask is not None:
            np.add(s, mask, out=s)
        _np_softmax_(s)
        np.matmul(s, vT, out=o)
    return run


def full_attention(size, sh, dev):
    rng = _rng(size, "attn")
    S, H, d = size, sh.heads, sh.head_dim
    qh, kh, vh = (_randn(rng, (S, H, d)) for _ in range(3))
    q, k, v, out = dev.put(qh), dev.put(kh), dev.put(vh), dev.empty((S, H, d))
    case = Case("full_attention", S, dev.ours(lambda: attention(q, k, v, causal=True, out=out)),
                bytes=4 * qh.nbytes, flops=4 * d * H * S * (S + 1) // 2,
                note=f"causal, {H} heads; FLOPs of the causal half only")
    if dev.numpy:
        case.peers["numpy"] = Timed(_numpy_attention(qh, kh, vh, 1 / math.sqrt(d), True))
    if dev.torch:
        F = dev.torch.nn.functional
        tq, tk, tv = (dev.tensor(a).transpose(0, 1)[None] for a in (qh, kh, vh))  # (1, H, S, d)
        case.peers["torch"] = dev.peer_torch(
            lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True))
    return [case]


def decode_attention(size, sh, dev):
    rng = _rng(size, "decode")
    kv, H, hkv, d = size, sh.heads, sh.kv_heads, sh.head_dim
    qh = _randn(rng, (1, H, d))
    kh, vh = _randn(rng, (kv, hkv, d)), _randn(rng, (kv, hkv, d))
    q, k, v, out = dev.put(qh), dev.put(kh), dev.put(vh), dev.empty((1, H, d))
    case = Case("decode_attention", kv,
                dev.ours(lambda: attention(q, k, v, causal=True, out=out)),
                bytes=kh.nbytes + vh.nbytes + 2 * qh.nbytes, flops=4 * d * H * kv,
                note=f"q_len 1, {H}/{hkv} heads")
    if dev.numpy:
        case.peers["numpy"] = Timed(_numpy_attention(qh, kh, vh, 1 / math.sqrt(d), True))
    if dev.torch:
        F = dev.torch.nn.functional
        tq = dev.tensor(qh).transpose(0, 1)[None]                   # (1, H, 1, d)
        tk, tv = (dev.tensor(a).transpose(0, 1)[None] for a in (kh, vh))  # (1, Hkv, kv, d)
        if hkv == H:
            case.peers["torch"] = dev.peer_torch(
                lambda: F.scaled_dot_product_attention(tq, tk, tv))
        else:
            case.peers["torch"] = dev.peer_torch(
                lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True))
    return [case]


BUILDERS = {
    "rope_forward": rope_forward,
    "qkv_projection": qkv_projection,
    "attention_scores": attention_scores,
    "causal_mask": causal_mask_rows,
    "masked_softmax": masked_softmax_row,
    "full_attention": full_attention,
    "decode_attention": decode_attention,
}
assert set(BUILDERS) == set(OPS)


def build(op, size, shape=REFERENCE, device="cpu", peers=PEERS):
    """The Cases of one (op, size)."""
    dev = device if isinstance(device, Device) else Device(device, peers)
    return BUILDERS[op](size, shape, dev)


def plan(ops=None, sizes=None):
    """[(op, size)] in table order; sizes (if given) replace every op's default sizes."""
    ops = list(OPS) if not ops else list(ops)
    return [(op, s) for op in ops for s in (sizes or OPS[op][0])]


# -- measuring -----------------------------------------------------------------------------

def _first_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _time(item, timing):
    """Stats (as a dict) of a Timed or Diff, or {'error': ...} when it cannot run."""
    if isinstance(item, str):
        return {"error": item}
    try:
        if isinstance(item, Diff):
            a = measure(item.a.fn, sync=item.a.sync, **timing)
            b = measure(item.b.fn, sync=item.b.sync, **timing)
            d = difference(a, b).to_dict()
            d["parts"] = {"with": a.to_dict(), "without": b.to_dict()}
            return d
        return measure(item.fn, sync=item.sync, **timing).to_dict()
    except Exception as e:            # an op or a peer that cannot run here: say why, go on
        return {"error": _first_line(e)}


def run_case(case, limits, *, device="cpu", repeat=None, budget_s=0.5):
    """Measure one Case and return its row (a JSON-able dict)."""
    timing = {"repeat": repeat, "budget_s": budget_s}
    ours = _time(case.ours, timing)
    peers = {name: _time(item, timing) for name, item in case.peers.items()}
    row = {
        "name": case.name, "op": case.op, "size": case.size, "variant": case.variant,
        "device": device, "note": case.note, "bytes": case.bytes, "flops": case.flops,
        "ours": ours, "peers": peers,
    }
    t = ours.get("median")
    if "parts" in ours and not ours["ci_low"] > 0:
        t = None                        # a difference within (or below) its noise: no ratio
    row["speedup"] = {n: p["median"] / t for n, p in peers.items()
                      if t and t > 0 and "median" in p}
    # achieved rates, and the one nearer its limit (roofline: the binding resource)
    row["gbs"] = case.bytes / t / 1e9 if t and t > 0 and case.bytes else None
    row["gflops"] = case.flops / t / 1e9 if t and t > 0 and case.flops else None
    row["bound"], row["share"] = roofline(row["gbs"], row["gflops"], limits)
    candle = CANDLE.get((case.op, case.size)) if device == "cpu" else None
    if candle and CANDLE_VARIANT.get(case.op, "") != case.variant:
        candle = None
    row["candle"] = dict(zip(("low", "median", "high"), candle)) if candle else None
    row["candle_speedup"] = candle[1] / t if candle and t and t > 0 else None
    return row


def jit_warmup(ops, device="cpu"):
    """Call every selected op once at a tiny shape, at a decode-like and a prefill-like size,
    so every kernel signature the rows use is compiled (or loaded from Numba's cache) before
    any timing. Returns {op: seconds}."""
    import time
    tiny = Shape(heads=2, kv_heads=1, head_dim=8)
    dev = Device(device, peers=())
    spent = {}
    for op in ops:
        t0 = time.perf_counter()
        for size in (1, 8):
            for case in BUILDERS[op](size, tiny, dev):
                for item in ([case.ours.a, case.ours.b] if isinstance(case.ours, Diff)
                             else [case.ours]):
                    if isinstance(item, Timed):
                        try:
                            item.fn()
                            if item.sync:
                                item.sync()
                        except Exception:
                            pass          # reported on the row when it is measured
        spent[op] = time.perf_counter() - t0
    return spent


def with_shape(shape, heads=None, kv_heads=None, head_dim=None):
    return replace(shape, **{k: v for k, v in
                             (("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim))
                             if v is not None})
