"""The Candle column of `numba-attn bench kernels`: figures from a reference profile, not
measured by this benchmark.

Source: a profile of a Candle (Rust) Llama attention implementation on the CPU, "TEAM-006
Benchmark Results", dated 2025-10-08, taken with criterion (`cargo bench --bench
inference_bench`); its appendix "Raw Benchmark Data" gives each row as criterion prints it,
`time: [low mid high]`: the point estimate of the time per call (mid) inside its 95%
confidence interval (low, high). The table below copies those lines; the Candle column shows
mid, Candle/ours is mid over our median.

Machine: not recorded. The profile says only "Platform: CPU (baseline)": no CPU model, core
or thread count, compiler or Candle version. So the figures come from another machine than
the one the benchmark runs on, of unknown speed: Candle/ours compares two programs and two
machines at once, and is a rough guide, not a measurement of either.

Shapes: the profile's projections are 4096x4096 (hidden 4096, float32); the benchmark's
defaults take it as 32 heads x head_dim 128, multi-head, Llama's split (other --heads /
--head-dim values leave the column beside figures of another shape). What each row timed:

    rope_forward/S       candle_nn::rotary_emb::rope_i on q and k (S, 32, 128)
    qkv_projection/S     x (S, 4096) times the three 4096x4096 projections
    attention_scores/S   Q K^T / sqrt(d) only (no softmax; ours adds the causal softmax)
    causal_mask/S        a new (S, S) mask built on every call and added to the scores:
                         shown beside our [build] row
    full_attention/S     scores, mask, softmax and the product with V

Sizes the profile did not run (and ops it did not have: masked_softmax, decode_attention)
show "-".
"""

# (op, size) -> seconds per call: criterion's (low, mid, high)
CANDLE = {
    ("rope_forward", 1): (57.132e-6, 62.639e-6, 68.629e-6),
    ("rope_forward", 8): (198.56e-6, 206.13e-6, 213.43e-6),
    ("rope_forward", 32): (457.93e-6, 467.80e-6, 476.70e-6),
    ("rope_forward", 128): (9.0709e-3, 9.2349e-3, 9.4017e-3),
    ("qkv_projection", 1): (18.533e-3, 19.119e-3, 19.717e-3),
    ("qkv_projection", 8): (20.750e-3, 20.976e-3, 21.210e-3),
    ("qkv_projection", 32): (49.603e-3, 50.805e-3, 52.067e-3),
    ("qkv_projection", 128): (64.654e-3, 65.503e-3, 66.349e-3),
    ("attention_scores", 1): (3.7524e-6, 3.8388e-6, 3.9098e-6),
    ("attention_scores", 8): (43.048e-6, 44.836e-6, 46.483e-6),
    ("attention_scores", 32): (292.47e-6, 308.46e-6, 322.33e-6),
    ("attention_scores", 128): (8.3608e-3, 8.4889e-3, 8.6188e-3),
    ("causal_mask", 8): (9.8782e-6, 9.9312e-6, 9.9854e-6),
    ("causal_mask", 32): (116.84e-6, 118.65e-6, 120.20e-6),
    ("causal_mask", 128): (2.1077e-3, 2.1167e-3, 2.1259e-3),
    ("causal_mask", 512): (58.353e-3, 58.832e-3, 59.200e-3),
    ("full_attention", 1): (11.443e-6, 11.492e-6, 11.546e-6),
    ("full_attention", 8): (119.30e-6, 119.84e-6, 120.43e-6),
    ("full_attention", 32): (1.0664e-3, 1.0714e-3, 1.0763e-3),
}

# which of our variants a Candle figure sits beside (Candle's causal_mask built the mask and
# added it to the scores on every call: closest to our [build])
CANDLE_VARIANT = {"causal_mask": "build"}

# where the output sends the reader for the above
SOURCE_FILE = "numba_attn/bench/candle_reference.py"
