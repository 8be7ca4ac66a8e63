"""What 8-bit attention products would cost in quality, before any kernel takes them: the demo
model's attention replaced by a float64 NumPy emulation of each scheme, then perplexity over a
text (as `numba-attn perplexity` scores it) and the mean KL divergence of the next-token
distributions from float32's over its first window, one row a scheme.

Schemes (each adds one rounding to the one before; scales are float64, products exact):
- exact: the attention in float64 (checks the emulation against the model's own kernels);
- q8.k8: q and K in 8 bits, one scale per (position, head) row, |x| / 127 (as vpdpbusd
  would take q k^T);
- +v8: V in 8 bits the same way, P V otherwise exact;
- +p8: the probabilities times V's row scales in 8 bits too (unsigned, one scale per query
  row and block of 64 keys: the block's largest over 255), as vpdpbusd would take P V; the
  softmax's sums stay exact;
- +p7: the same weights in 7 bits (over 127: signed bytes, for V's codes as the unsigned
  operand);
- +p7b: 7 bits with the step from a bound instead of the largest weight: the block's largest
  probability of the row times its largest value scale, over 127 (known before the weights
  are: one pass less);
- q7.k8+v8+p7: as +p7 with q in 7 bits (|q| / 63), as AVX2's vpmaddubsw takes q k^T.

    python bench/quality_kv8_emulated.py [--model DIR] [--text FILE] [--context 256]
        [--block 64]"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numba_attn import Model  # noqa: E402
from numba_attn import model as model_module  # noqa: E402
from quality_formats import parser, quality, reference  # noqa: E402  (bench/)

SCHEMES = ("exact", "q8.k8", "q8.k8+v8", "q8.k8+v8+p8", "q8.k8+v8+p7", "q8.k8+v8+p7b",
           "q7.k8+v8+p7")
BLOCK = 64                     # keys per block of the decode kernel's online softmax (--block)


def rows_8bit(x, levels=127.0):
    """x (..., d) as 8-bit codes (|codes| <= levels) and one scale per row: x ~ codes * scale."""
    scale = np.abs(x).max(axis=-1, keepdims=True) / levels
    safe = np.where(scale > 0, scale, 1.0)
    return np.round(x / safe), scale


def emulated_attention(scheme, block=BLOCK):
    """An attention(q, k, v, causal, out) step for the model's forward pass, in float64."""
    def attention(q, k, v, *, causal=True, scale=None, out=None):
        q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))   # (S, H, d), (T, Hkv, d)
        S, H, d = q.shape
        T, Hkv = k.shape[:2]
        G = H // Hkv
        scale = 1.0 / np.sqrt(d) if scale is None else scale
        if scheme != "exact":
            q, k = (codes * row_scale for codes, row_scale in
                    (rows_8bit(q, 63.0 if scheme.startswith("q7") else 127.0), rows_8bit(k)))
        vq, dv = (v, np.ones((T, Hkv, 1))) if scheme in ("exact", "q8.k8") else rows_8bit(v)
        seen = np.arange(T)[None, :] <= (T - S + np.arange(S))[:, None]        # (S, T)
        n_blk = -(-T // block)
        res = np.empty((S, H, d))
        for h in range(H):
            hk = h // G
            s = scale * q[:, h] @ k[:, hk].T                                     # (S, T)
            s = np.where(seen, s, -np.inf) if causal else s
            m = s.max(axis=1, keepdims=True)
            if scheme[-2:] in ("p8", "p7") or scheme.endswith("p7b"):
                pad = np.full((S, n_blk * block), -np.inf)
                pad[:, :T] = s
                blk = pad.reshape(S, n_blk, block)
                mb = blk.max(axis=2, keepdims=True)                              # block max
                mb_safe = np.where(np.isfinite(mb), mb, 0.0)
                p = np.exp(blk - mb_safe)                                        # <= 1
                w = p * np.pad(dv[:, hk, 0], (0, n_blk * block - T)).reshape(1, n_blk, block)
                wmax = w.max(axis=2, keepdims=True)
                if scheme.endswith("p7b"):             # p's block max is 1 here
                    wmax = np.pad(dv[:, hk, 0], (0, n_blk * block - T)).reshape(
                        1, n_blk, block).max(axis=2, keepdims=True) * np.ones((S, 1, 1))
                levels = 255.0 if scheme.endswith("p8") else 127.0   # p7, p7b
                wstep = np.where(wmax > 0, wmax / levels, 1.0)
                w8 = np.round(w / wstep) * wstep                  # the 8-bit weights' values
                rescale = np.exp(mb_safe - m[:, :, None])
                weights = (w8 * rescale).reshape(S, -1)[:, :T]
                total = (p * rescale).reshape(S, -1)[:, :T].sum(axis=1, keepdims=True)
                res[:, h] = weights @ vq[:, hk] / total
            else:
                p = np.exp(s - m)
                res[:, h] = (p * dv[:, hk, 0]) @ vq[:, hk] / p.sum(axis=1, keepdims=True)
        if out is None:
            return res.astype(np.float32)
        out[...] = res
        return out
    return attention


def main():
    ap = parser(__doc__)
    ap.add_argument("--block", type=int, default=BLOCK, help="keys a block of P V's weights")
    args = ap.parse_args()
    model = Model.from_pretrained(args.model, weight_dtype="float32", kv_dtype="float32")
    ids, ref_lp, ref_ppl = reference(model, args)
    print("| attention products | perplexity | vs float32 | mean KL from float32 (nats) |")
    print("|---|---:|---:|---:|")
    kernel = model_module.STEPS.attention
    try:
        for scheme in SCHEMES:
            model_module.STEPS.attention = emulated_attention(scheme, args.block)
            ppl, kl = quality(model, ids, args.context, ref_lp)
            print(f"| {scheme} | {ppl:.4f} | {ppl / ref_ppl - 1:+.4%} | {kl:.2e} |", flush=True)
    finally:
        model_module.STEPS.attention = kernel


if __name__ == "__main__":
    main()
