"""Model speed on a TinyLlama-1.1B-shaped model (hidden 2048, 22 layers,
32 heads / 4 KV heads, intermediate 5632, vocab 32000), random float32 weights.

    python bench/bench_model.py /tmp/tinyllama           # write the folder once (4.4 GB), measure
    python bench/bench_model.py /tmp/tiny --small        # a small shape: checks that it runs
    python bench/bench_model.py /tmp/tinyllama --json out.json

PATH gets a Hugging Face folder (config.json + model.safetensors, float32) unless it already
holds one. The measuring then runs in a fresh process, so its peak resident memory is the
engine's alone, and every figure is compared with a limit measured in that same process:

- decode: tokens/s of single-token steps after a 16-token prompt, and the weight bytes each
  step streams / its time, against NumPy's BLAS GEMV streaming the same matrices, the two
  interleaved so both see the same machine (target: >= 90% of that bandwidth);
- prefill: tokens/s of one forward pass over 512 tokens, against the rate at which NumPy's
  BLAS GEMM does the same matrix products (the prefill's FLOP floor), and GFLOP/s of each;
- peak resident memory (VmHWM) against the weight bytes plus the KV cache (target: <= 1.2x);
- the peer, when importable: Hugging Face transformers on PyTorch, same folder, same steps,
  in a process of its own.
JIT compile (or Numba cache load) is done before any timing and reported on its own.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # as numba_attn sets them: before NumPy
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
import numpy as np  # noqa: E402

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 max_position_embeddings=2048)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096)
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
REFERENCE = ("for scale, on this 2-core machine in float32: llama2.c 11.6 tok/s, llama.cpp 10.4 "
             "tok/s (decode, ~46-51 GB/s); HF transformers 3.3 tok/s decode, 72 tok/s prefill-512")


# -- writing the folder --------------------------------------------------------------------

WRITTEN_HERE = "RANDOM_WEIGHTS"   # marks a folder write_folder wrote (and may write again)


def write_folder(path, shape, dtype="float32"):
    """config.json + model.safetensors with random weights in float32 or bfloat16, into a new
    or empty folder (or one it wrote before: never over a real model). The file is
    streamed tensor by tensor in the safetensors layout (8-byte header length, JSON header,
    data), so writing 4.4 GB (or 13.5 GB) never holds more than one tensor."""
    import ml_dtypes
    if os.path.isdir(path) and os.listdir(path) \
            and not os.path.isfile(os.path.join(path, WRITTEN_HERE)):
        sys.exit(f"{path} holds other files (a model of another shape or type?): random "
                 f"weights are written only into a new or empty folder, or one written so before")
    size, code, np_dtype = {"float32": (4, "F32", np.float32),
                            "bfloat16": (2, "BF16", ml_dtypes.bfloat16)}[dtype]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, WRITTEN_HERE), "w") as f:
        f.write("random weights written by bench/bench_model.py\n")
    c = shape
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    tensors = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (q, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, q)),
                    (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (inter, h)),
                    (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter))]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in tensors:
        n = size * int(np.prod(shp))
        header[name] = {"dtype": code, "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                       # data starts 8-byte aligned
    # a prime-length random block tiled over each tensor: random-looking, at memcpy speed
    block = np.random.default_rng(0).standard_normal(1_000_003).astype(np.float32)
    tmp = os.path.join(path, "model.safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shp in tensors:
            if len(shp) == 1:                              # norm weights
                f.write(np.ones(shp, np_dtype).tobytes())
                continue
            scaled = (block * np.float32(1 / np.sqrt(shp[1]))).astype(np_dtype)
            n = int(np.prod(shp))
            for start in range(0, n, scaled.size):
                f.write(scaled[:min(scaled.size, n - start)].tobytes())
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": dtype, **shape}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def folder_matches(path, shape, dtype="float32"):
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (all(config.get(k) == v for k, v in shape.items())
            and config.get("torch_dtype") == dtype
            and os.path.isfile(os.path.join(path, "model.safetensors")))


# -- measuring (in a fresh process) --------------------------------------------------------

def vm(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def matrices(model):
    """The weight matrices one decode step streams, in forward order (name, w)."""
    out = []
    for i, lw in enumerate(model.weights.layers):
        out += [(f"{i}.qkv", lw.qkv_proj), (f"{i}.o", lw.o_proj), (f"{i}.gate", lw.gate_proj),
                (f"{i}.up", lw.up_proj), (f"{i}.down", lw.down_proj)]
    return out + [("lm_head", model.weights.lm_head)]


def blas_gemv(mats):
    """f() -> NumPy BLAS GEMV over every matrix once (a decode step's weight reads)."""
    xs = {n: np.random.default_rng(1).standard_normal(n).astype(np.float32)
          for n in {w.shape[1] for _, w in mats}}
    ys = {n: np.empty(n, np.float32) for n in {w.shape[0] for _, w in mats}}

    def run():
        for _, w in mats:
            np.dot(w, xs[w.shape[1]], out=ys[w.shape[0]])
    return run


def blas_gemm(mats, rows):
    """f() -> NumPy BLAS GEMM x (rows, in) @ w.T over every matrix except the lm_head (prefill
    computes logits for the last position only)."""
    mats = [(n, w) for n, w in mats if n != "lm_head"]
    xs = {n: np.random.default_rng(1).standard_normal((rows, n)).astype(np.float32)
          for n in {w.shape[1] for _, w in mats}}
    ys = {n: np.empty((rows, n), np.float32) for n in {w.shape[0] for _, w in mats}}

    def run():
        for _, w in mats:
            np.matmul(xs[w.shape[1]], w.T, out=ys[w.shape[0]])
    return run


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def stream_gemv(rows=12288, cols=4096):
    """f() -> one NumPy BLAS GEMV over a large float32 matrix (201 MB): the best read rate
    this machine reaches, the limit a bandwidth-bound decode of any weight format is held to."""
    w = np.random.default_rng(2).standard_normal((rows, cols), dtype=np.float32)
    x = np.ones(cols, np.float32)
    y = np.empty(rows, np.float32)
    return (lambda: np.dot(w, x, out=y)), w.nbytes


def measure(path, decode_tokens, prefill_tokens, repeat, weight_dtype="float32",
            long_context=0):
    """Ours and the BLAS limits, interleaved: decode steps alternate with GEMV passes in
    `rounds` rounds, prefill passes with GEMM passes, so both sides of each ratio see the same
    machine (the memory bandwidth here drifts by 20% between minutes). Weight formats other
    than float32 are held to the large-GEMV streaming rate only (BLAS has no GEMV of theirs).
    long_context > 0: also decode after a prompt of that many tokens. weight_dtype may name
    the KV cache's storage too, "q8_0/float32" (default: the model's "auto")."""
    from numba_attn.generation import CompileTimer
    from numba_attn.model import Model

    weight_dtype, _, kv_dtype = weight_dtype.partition("/")
    r = {"weight_dtype": weight_dtype}
    t = time.perf_counter()
    model = Model.from_pretrained(path, weight_dtype=weight_dtype, kv_dtype=kv_dtype or "auto",
                                  max_seq=max(prefill_tokens, 16 + decode_tokens,
                                              long_context + decode_tokens) + 1)
    r["weight_dtype"], r["kv_dtype"] = model.weight_dtype, model.kv_dtype
    r["load_s"] = time.perf_counter() - t
    c = model.config
    with CompileTimer() as jit:
        t = time.perf_counter()
        model.warmup()
        r["warmup_s"] = time.perf_counter() - t
    r["compile_s"] = jit.seconds
    mats = matrices(model)
    rounds = max(repeat, 3)
    f32 = model.weight_dtype == "float32"
    stream, stream_bytes = stream_gemv()
    stream()

    rng = np.random.default_rng(0)
    # decode: single-token steps after a short prompt, each picking its token by argmax; after
    # every decode_tokens / rounds steps, one GEMV pass over the same matrices
    pos = 16
    token = int(np.argmax(model.forward(rng.integers(0, c.vocab_size, pos), 0)))
    step = np.empty(1, np.int64)
    gemv = blas_gemv(mats) if f32 else (lambda: None)
    gemv()                                                # first touch of its buffers
    times, gemv_times, stream_times, round_steps = [], [], [], []
    per_round = max(1, decode_tokens // rounds)
    for i in range(decode_tokens):
        step[0] = token
        t = time.perf_counter()
        token = int(np.argmax(model.forward(step, pos)))
        times.append(time.perf_counter() - t)
        pos += 1
        if (i + 1) % per_round == 0:
            gemv_times.append(timed(gemv))
            stream_times.append(min(timed(stream) for _ in range(3)))
            round_steps.append(statistics.median(times[-per_round:]))
    step_bytes = sum(w.nbytes for _, w in mats) + model.weights.norm.nbytes + sum(
        lw.input_layernorm.nbytes + lw.post_attention_layernorm.nbytes
        for lw in model.weights.layers)
    r["decode_step_s"] = statistics.median(times)
    r["decode_tok_s"] = 1 / r["decode_step_s"]
    r["decode_GBs"] = step_bytes / r["decode_step_s"] / 1e9
    r["stream_GBs"] = stream_bytes / min(stream_times) / 1e9
    r["decode_vs_stream"] = r["decode_GBs"] / r["stream_GBs"]
    # the same share round by round: each round's median step against the stream measured
    # right after it (the bandwidth here drifts by tens of percent between minutes; the
    # share above holds the median step to the best stream of any round)
    r["decode_vs_stream_paired"] = statistics.median(
        (step_bytes / sb) / (stream_bytes / st) for st, sb in zip(stream_times, round_steps))
    if f32:
        r["gemv_s"] = statistics.median(gemv_times)
        r["gemv_GBs"] = sum(w.nbytes for _, w in mats) / r["gemv_s"] / 1e9
        r["decode_vs_gemv"] = r["decode_GBs"] / r["gemv_GBs"]
    if long_context:
        # decode after a long prompt against decode after a 16-token one, step for step in
        # turn (two caches over the same weights), so both see the same machine: its memory
        # bandwidth comes and goes by tens of percent within a minute here. Which of the two
        # goes first alternates from pair to pair
        far = Model(c, model.weights, max_seq=model.max_seq, kv_dtype=model.kv_dtype)
        sides = {"near": [model, int(np.argmax(model.forward(rng.integers(0, c.vocab_size, 16),
                                                            0))), 16, []],
                 "far": [far, int(np.argmax(far.forward(rng.integers(0, c.vocab_size,
                                                                     long_context), 0))),
                         long_context, []]}
        for i in range(decode_tokens):
            for side in (("near", "far") if i % 2 == 0 else ("far", "near")):
                m, tok, pos, times = sides[side]
                step[0] = tok
                t = time.perf_counter()
                sides[side][1] = int(np.argmax(m.forward(step, pos)))
                times.append(time.perf_counter() - t)
                sides[side][2] = pos + 1
        near_times, far_times = sides["near"][3], sides["far"][3]
        r["long_context"] = long_context
        r["long_decode_tok_s"] = 1 / statistics.median(far_times)
        r["short_decode_tok_s"] = 1 / statistics.median(near_times)
        # the median over pairs of the near step over the far one (drift within a pair is
        # small; between the pairs' moments it is not)
        r["long_vs_short"] = statistics.median(n / f for n, f in zip(near_times, far_times))

    # prefill: one pass over prefill_tokens from an empty cache, alternating with the GEMM
    # passes (best of `rounds` each). Peak memory is read after the first prefill, before the
    # GEMM allocates its own buffers
    prompt = rng.integers(0, c.vocab_size, prefill_tokens)
    model.forward(prompt, 0)
    r["peak_rss_bytes"] = vm("VmHWM")
    r["weight_bytes"] = model.weights.nbytes
    r["kv_cache_bytes"] = model.cache.nbytes
    r["rss_ratio"] = r["peak_rss_bytes"] / (r["weight_bytes"] + r["kv_cache_bytes"])
    n = prefill_tokens
    gemm = blas_gemm(mats, n) if f32 else (lambda: None)
    gemm()
    prefill_times, gemm_times = [], []
    for _ in range(rounds):
        prefill_times.append(timed(lambda: model.forward(prompt, 0)))
        gemm_times.append(timed(gemm))
    matmul_flops = 2 * n * sum(w.shape[0] * w.shape[1] for name, w in mats if name != "lm_head") \
        + 2 * c.vocab_size * c.hidden_size
    attn_flops = 4 * c.n_layers * c.n_heads * c.head_dim * n * (n + 1) // 2  # causal QK^T + PV
    r["prefill_s"] = min(prefill_times)
    r["prefill_tok_s"] = n / r["prefill_s"]
    r["prefill_GFLOPs"] = (matmul_flops + attn_flops) / r["prefill_s"] / 1e9
    if f32:
        r["gemm_s"] = min(gemm_times)
        r["gemm_tok_s"] = n / r["gemm_s"]
        r["gemm_GFLOPs"] = (matmul_flops - 2 * c.vocab_size * c.hidden_size) / r["gemm_s"] / 1e9
        r["prefill_vs_gemm"] = r["prefill_tok_s"] / r["gemm_tok_s"]
    r.update(decode_tokens=decode_tokens, prefill_tokens=n, step_bytes=step_bytes,
             layers=c.n_layers, hidden=c.hidden_size, vocab=c.vocab_size, rounds=rounds)
    return r


def measure_in_turn(path, decode_tokens, weight_dtypes):
    """Our weight formats in one process, decoding in turn token by token (each a model of its
    own over the same folder, each a 16-token prompt first): the ratios of their decode rates
    without the machine's drift between processes. Returns one row per format: its decode
    rate (of its median step), and the median over steps of float32's step just before over
    its own (the first format's, when float32 is not among them). Holds every format's
    weights at once."""
    from numba_attn.model import Model

    names = weight_dtypes.split(",")
    rng = np.random.default_rng(0)
    models, tokens, steps = [], [], []
    for name in names:
        weight_dtype, _, kv_dtype = name.partition("/")
        m = Model.from_pretrained(path, weight_dtype=weight_dtype, kv_dtype=kv_dtype or "auto",
                                  max_seq=16 + decode_tokens + 1)
        m.warmup()
        models.append(m)
        tokens.append(int(np.argmax(m.forward(rng.integers(0, m.config.vocab_size, 16), 0))))
        steps.append([])
    step = np.empty(1, np.int64)
    for i in range(decode_tokens):
        for k, m in enumerate(models):
            step[0] = tokens[k]
            t = time.perf_counter()
            tokens[k] = int(np.argmax(m.forward(step, 16 + i)))
            steps[k].append(time.perf_counter() - t)
    base = next((k for k, m in enumerate(models) if m.weight_dtype == "float32"
                 and m.kv_dtype == "float32"), 0)
    return [{"weight_dtype": m.weight_dtype, "kv_dtype": m.kv_dtype,
             "decode_tok_s": 1 / statistics.median(steps[k]),
             "vs_base": statistics.median(b / t for b, t in zip(steps[base], steps[k])),
             "base": f"{models[base].weight_dtype}, {models[base].kv_dtype}"}
            for k, m in enumerate(models)]


def measure_transformers(path, decode_tokens, prefill_tokens, repeat, weight_dtype="float32",
                         long_context=0):
    """The peer: Hugging Face transformers on PyTorch (CPU, float32 or bfloat16) on the same
    folder, the same prefill and decode steps (KV cache, last-position logits, argmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    r = {"torch_threads": torch.get_num_threads(), "weight_dtype": weight_dtype}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, weight_dtype)).eval()
    r["load_s"] = time.perf_counter() - t
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    pos = 16
    out = model(torch.tensor(rng.integers(0, vocab, (1, pos))), use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
    times = []
    for _ in range(decode_tokens):
        t = time.perf_counter()
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        times.append(time.perf_counter() - t)
    r["decode_step_s"] = statistics.median(times)
    r["decode_tok_s"] = 1 / r["decode_step_s"]
    prompt = torch.tensor(rng.integers(0, vocab, (1, prefill_tokens)))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        model(prompt, use_cache=True, logits_to_keep=1)
        best = min(best, time.perf_counter() - t)
    r["prefill_s"] = best
    r["prefill_tok_s"] = prefill_tokens / best
    r["version"] = __import__("transformers").__version__ + " / torch " + torch.__version__
    return r


# -- llama.cpp (llama-cpp-python, a dev-only peer) ---------------------------------------------

GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "q8_0": "Q8_0"}


def write_gguf(path, weight_dtype):
    """<path>/model-<type>.gguf from the folder's safetensors, for llama.cpp: the `llama`
    architecture, norms in F32, every matrix in the type asked for (Q8_0 by the gguf package's
    own quantizer), and a placeholder SentencePiece-style vocabulary of the model's size (the
    timing runs on token ids, never text). The weights are random, so the Q/K row order that
    llama.cpp's converter permutes for its rope does not matter here."""
    import gguf
    from safetensors import safe_open

    out = os.path.join(path, f"model-{GGUF_TYPES[weight_dtype].lower()}.gguf")
    if os.path.isfile(out):
        return out
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[weight_dtype])
    w = gguf.GGUFWriter(out + ".partial", "llama")
    hd = c["hidden_size"] // c["num_attention_heads"]
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_file_type({"F32": 0, "BF16": 32, "Q8_0": 7}[GGUF_TYPES[weight_dtype]])
    vocab = c["vocab_size"]
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        for name in f.keys():
            if name.startswith("model.layers."):
                i, rest = name[len("model.layers."):].split(".", 1)
                gname = f"blk.{i}.{per_layer[rest.rsplit('.', 1)[0]]}.weight"
            else:
                gname = names[name]
            t = f.get_tensor(name).astype(np.float32)
            if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(gname, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    w.close()
    os.replace(out + ".partial", out)
    return out


def measure_llama_cpp(path, decode_tokens, prefill_tokens, repeat, weight_dtype="q8_0",
                      long_context=0):
    """The peer: llama.cpp through llama-cpp-python's C API, its own GGUF of the same weights,
    2 threads, the same prefill and decode steps (argmax of the last logits). Its CPU weight
    repacking (extra buffer types) is off, as this CPU needs."""
    import llama_cpp as L

    gguf_path = write_gguf(path, weight_dtype)
    n_ctx = max(prefill_tokens, 16 + decode_tokens, long_context + decode_tokens) + 8
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    if hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(gguf_path.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, 512      # a long prompt in one batch
    cp.n_threads = cp.n_threads_batch = os.cpu_count()
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    mem = L.llama_get_memory(ctx)

    def run(ids):
        arr = (L.llama_token * len(ids))(*[int(t) for t in ids])
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    def decode_after(prompt):
        L.llama_memory_clear(mem, True)
        token, times = run(prompt), []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            token = run([token])
            times.append(time.perf_counter() - t)
        return 1 / statistics.median(times)

    rng = np.random.default_rng(0)
    r = {"weight_dtype": weight_dtype, "threads": cp.n_threads,
         "version": getattr(L, "__version__", "?")}
    r["decode_tok_s"] = decode_after(rng.integers(3, vocab, 16))
    if long_context:
        r["long_decode_tok_s"] = decode_after(rng.integers(3, vocab, long_context))
    prompt = rng.integers(3, vocab, prefill_tokens)
    best = float("inf")
    for _ in range(repeat):
        L.llama_memory_clear(mem, True)
        best = min(best, timed(lambda: run(prompt)))
    r["prefill_tok_s"] = prefill_tokens / best
    L.llama_free(ctx)
    L.llama_model_free(model)
    return r


def report_formats(runs, peers, command):
    """One row per weight format of ours and per peer: decode and prefill against our float32
    in the same run, decode bandwidth against the large-GEMV streaming rate."""
    base = next((r for r in runs if r["weight_dtype"] == "float32"
                 and r.get("kv_dtype", "float32") == "float32"), None)
    lines = [f"`{command}`", "", f"{runs[0]['layers']} layers, hidden {runs[0]['hidden']}, "
             f"vocab {runs[0]['vocab']}, {os.cpu_count()} cores; every process fresh, in this "
             f"order: {', '.join(r['who'] for r in runs + peers)}", "",
             "| engine, weights, KV cache | decode tok/s | x our f32 | GB/token | decode GB/s "
             "| % of large-GEMV stream | decode at ctx " + str(runs[0].get("long_context", "-"))
             + " (ours: against ctx 16, in turn) | prefill-" + str(runs[0]["prefill_tokens"]) + " tok/s | x our f32 "
             "| resident GB (weights + KV) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def paired(r):       # runs saved before the paired share was measured have none
        p = r.get("decode_vs_stream_paired")
        return f" (paired {p:.0%})" if p else ""

    def ratio(r, key):
        return f"{r[key] / base[key]:.2f}x" if base and key in r else "-"
    for r in runs:
        long = (f"{r['long_decode_tok_s']:.2f} against {r['short_decode_tok_s']:.2f} "
                f"({r['long_vs_short'] - 1:+.1%})" if "long_decode_tok_s" in r else "-")
        lines.append(
            f"| ours, {r['weight_dtype']}, {r.get('kv_dtype', 'float32')} | {r['decode_tok_s']:.2f} | {ratio(r, 'decode_tok_s')} "
            f"| {r['step_bytes'] / 1e9:.2f} | {r['decode_GBs']:.1f} | "
            f"{r['decode_vs_stream']:.0%} of {r['stream_GBs']:.1f}{paired(r)} | {long} "
            f"| {r['prefill_tok_s']:.1f} | {ratio(r, 'prefill_tok_s')} "
            f"| {r['peak_rss_bytes'] / 1e9:.2f} ({r['weight_bytes'] / 1e9:.2f} + "
            f"{r['kv_cache_bytes'] / 1e9:.2f}) |")
    for r in peers:
        long = (f"{r['long_decode_tok_s']:.2f} ({r['long_decode_tok_s'] / r['decode_tok_s'] - 1:+.1%})"
                if "long_decode_tok_s" in r else "-")
        lines.append(f"| {r['who']} | {r['decode_tok_s']:.2f} | {ratio(r, 'decode_tok_s')} | - | - "
                     f"| - | {long} | {r['prefill_tok_s']:.1f} | {ratio(r, 'prefill_tok_s')} | - |")
    return "\n".join(lines)


def report_in_turn(rows, command):
    """measure_in_turn's rows as a table."""
    lines = ["", f"Decode in one process, the formats in turn token by token (`{command}`): "
             f"x {rows[0]['base']} is the median over steps of its step just before over the "
             "format's own", "",
             "| ours, weights, KV cache | decode tok/s | x " + rows[0]["base"] + " |",
             "|---|---:|---:|"]
    lines += [f"| {r['weight_dtype']}, {r['kv_dtype']} | {r['decode_tok_s']:.2f} "
              f"| {r['vs_base']:.2f}x |" for r in rows]
    return "\n".join(lines)


def report_rounds(rounds):
    """Every round's prefill and decode of each of our formats against each peer, as ratios
    (rounds sorted by the first ratio; the table above is the median one)."""
    lines = ["", f"{len(rounds)} rounds, each ours then the peers in fresh processes; ours / "
             "peer per round, prefill (decode):", ""]
    for k, r in enumerate(rounds[0][0]):
        for j, p in enumerate(rounds[0][1]):
            cells = [f"{rp[0][k]['prefill_tok_s'] / rp[1][j]['prefill_tok_s']:.2f}x "
                     f"({rp[0][k]['decode_tok_s'] / rp[1][j]['decode_tok_s']:.2f}x)"
                     for rp in rounds]
            lines.append(f"- ours {r['weight_dtype']} / {p['who']}: " + ", ".join(cells))
    return "\n".join(lines)


def report(r, command):
    gb = 1e9
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    rows = [
        ("decode", f"{r['decode_tok_s']:.2f} tok/s ({r['decode_step_s'] * 1e3:.1f} ms/token, "
                   f"median of {r['decode_tokens']})", "", ""),
        ("decode weight streaming", f"{r['decode_GBs']:.1f} GB/s "
                                    f"({r['step_bytes'] / gb:.2f} GB per token)", "", ""),
        ("NumPy BLAS GEMV, same matrices", f"{r['gemv_GBs']:.1f} GB/s "
                                           f"({r['gemv_s'] * 1e3:.1f} ms)", "", ""),
        ("decode / BLAS GEMV bandwidth", f"{r['decode_vs_gemv']:.1%}", ">= 90%",
         ok(r["decode_vs_gemv"] >= 0.9)),
        (f"prefill-{r['prefill_tokens']}", f"{r['prefill_tok_s']:.1f} tok/s "
                                           f"({r['prefill_s']:.2f} s, {r['prefill_GFLOPs']:.0f} GFLOP/s)",
         ">= 72 tok/s (HF transformers)", ok(r["prefill_tok_s"] >= 72)),
        ("NumPy BLAS GEMM, same products", f"{r['gemm_tok_s']:.1f} tok/s "
                                           f"({r['gemm_GFLOPs']:.0f} GFLOP/s)", "", ""),
        ("prefill / BLAS GEMM rate", f"{r['prefill_vs_gemm']:.1%}", "close to 100%", ""),
    ]
    hf = r.get("transformers")
    if hf:
        rows += [
            ("HF transformers decode (same run)", f"{hf['decode_tok_s']:.2f} tok/s; ours "
                                                  f"{r['decode_tok_s'] / hf['decode_tok_s']:.1f}x",
             "", ""),
            ("HF transformers prefill (same run)", f"{hf['prefill_tok_s']:.1f} tok/s; ours "
                                                   f"{r['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x",
             ">= 1x", ok(r["prefill_tok_s"] >= hf["prefill_tok_s"])),
        ]
    if r.get("rounds_line"):
        rows.append(("prefill-512 ours vs transformers, every round (sorted)", r["rounds_line"],
                     "", ""))
    rows += [
        ("peak resident memory", f"{r['peak_rss_bytes'] / gb:.2f} GB = {r['rss_ratio']:.2f}x "
                                 f"(weights {r['weight_bytes'] / gb:.2f} GB + KV cache "
                                 f"{r['kv_cache_bytes'] / gb:.3f} GB)", "<= 1.2x",
         ok(r["rss_ratio"] <= 1.2)),
        ("load / JIT", f"load {r['load_s']:.1f} s; warm-up {r['warmup_s']:.1f} s, of which "
                       f"compiling {r['compile_s']:.1f} s", "", ""),
    ]
    peer = f"; peer: transformers {hf['version']}, {hf['torch_threads']} threads" if hf else ""
    lines = [f"`{command}`", "", f"{r['layers']} layers, hidden {r['hidden']}, vocab "
             f"{r['vocab']}, float32; {REFERENCE}{peer}", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="model folder to write (once) and measure, e.g. /tmp/tinyllama")
    ap.add_argument("--small", action="store_true", help="a small shape, to check the script")
    ap.add_argument("--llama2-7b", action="store_true",
                    help="Llama-2-7B's shape (32 layers, hidden 4096, 32/32 heads) instead of "
                         "TinyLlama-1.1B's")
    ap.add_argument("--file-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the type of the written checkpoint [float32]")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: 22, TinyLlama's; fewer for a quick look)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps [64]")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prefill length [512]")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of prefill alternating with GEMM (best kept) and of decode "
                         "alternating with GEMV (medians), at least 3 [3]")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure ours and the peers this many times, alternating processes; "
                         "the table is the median round by prefill ratio (with --weight-dtype: "
                         "our first format's against the first peer's), every round's ratios "
                         "listed under it [1]")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--no-peer", action="store_true",
                    help="skip Hugging Face transformers (measured when importable)")
    ap.add_argument("--weight-dtype", metavar="LIST",
                    help="weight formats of ours to compare, e.g. float32,bfloat16,q8_0 "
                         "(q8_0/float32: with that KV cache, else the model's auto): one "
                         "fresh process each, a table against our float32 and the peers")
    ap.add_argument("--peers", metavar="LIST", default="",
                    help="with --weight-dtype: peers, e.g. transformers:bfloat16,llama.cpp:q8_0,"
                         "llama.cpp:float32 (run by --peer-python)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="the Python that has the peers installed (torch, transformers, "
                         "llama-cpp-python, gguf) [this one]")
    ap.add_argument("--long-context", type=int, default=0,
                    help="also decode after a prompt of this many tokens [0: no]")
    ap.add_argument("--in-turn", action="store_true",
                    help="with --weight-dtype: also decode our formats in one process, in turn "
                         "token by token, for their ratios free of the drift between processes "
                         "(holds every format's weights at once)")
    ap.add_argument("--measure", choices=["ours", "transformers", "llama.cpp", "in-turn"],
                    help=argparse.SUPPRESS)  # the child
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # the child's format
    args = ap.parse_args()
    shape = dict(SMALL if args.small else LLAMA2_7B if args.llama2_7b else TINYLLAMA)
    if args.layers:
        shape["num_hidden_layers"] = args.layers

    if args.measure == "in-turn":
        print(json.dumps(measure_in_turn(args.path, args.decode_tokens, args.dtype)))
        return
    if args.measure:
        fn = {"ours": measure, "transformers": measure_transformers,
              "llama.cpp": measure_llama_cpp}[args.measure]
        print(json.dumps(fn(args.path, args.decode_tokens, args.prefill_tokens, args.repeat,
                            args.dtype, args.long_context)))
        return

    if not folder_matches(args.path, shape, args.file_dtype):
        print(f"writing a random {args.file_dtype} model to {args.path} ...", file=sys.stderr,
              flush=True)
        t = time.perf_counter()
        write_folder(args.path, shape, args.file_dtype)
        print(f"  written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    def child(who, dtype="float32"):
        python = sys.executable if who in ("ours", "in-turn") else args.peer_python
        cmd = [python, os.path.abspath(__file__), args.path, "--measure", who,
               "--decode-tokens", str(args.decode_tokens), "--prefill-tokens",
               str(args.prefill_tokens), "--repeat", str(args.repeat), "--dtype", dtype,
               "--long-context", str(args.long_context)]
        print(f"measuring {who} ({dtype}) in a fresh process ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        if isinstance(r, dict):                           # (measure_in_turn's: a list)
            r["who"] = f"{who}, {dtype}"
        return r

    if args.weight_dtype:
        rounds = []
        for _ in range(max(1, args.rounds)):
            runs = [child("ours", d) for d in args.weight_dtype.split(",")]
            peers = [child(*p.split(":")) for p in args.peers.split(",") if p]
            rounds.append((runs, peers))
        command = "python bench/bench_model.py " + " ".join(sys.argv[1:])
        if len(rounds) > 1 and rounds[0][1]:
            rounds.sort(key=lambda rp: rp[0][0]["prefill_tok_s"] / rp[1][0]["prefill_tok_s"])
        runs, peers = rounds[len(rounds) // 2]
        in_turn = None
        if args.in_turn:
            in_turn = child("in-turn", args.weight_dtype)
        print(report_formats(runs, peers, command))
        if len(rounds) > 1:
            print(report_rounds(rounds))
        if in_turn:
            print(report_in_turn(in_turn, command))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ours": runs, "peers": peers, "in_turn": in_turn,
                           "rounds": [{"ours": r, "peers": p} for r, p in rounds]}, f, indent=2)
        return

    peer = not args.no_peer and importlib.util.find_spec("transformers") is not None
    runs = []
    for _ in range(max(1, args.rounds)):
        r = child("ours")
        if peer:
            r["transformers"] = child("transformers")
        runs.append(r)
    if peer and len(runs) > 1:
        runs.sort(key=lambda x: x["prefill_tok_s"] / x["transformers"]["prefill_tok_s"])
        for x in runs:
            x["rounds_line"] = ", ".join(
                f"{y['prefill_tok_s']:.1f} vs {y['transformers']['prefill_tok_s']:.1f} "
                f"({y['prefill_tok_s'] / y['transformers']['prefill_tok_s']:.2f}x)" for y in runs)
    r = runs[len(runs) // 2]
    command = "python bench/bench_model.py " + " ".join(sys.argv[1:])
    print(report(r, command))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
