"""LlamaConfig: one frozen dataclass read from a Hugging Face `config.json`.

Covers LlamaForCausalLM (Llama 2, Llama 3.x with "llama3" rope scaling, TinyLlama, SmolLM),
MistralForCausalLM and Qwen2ForCausalLM (biases on q/k/v). Everything else is refused with a
ValueError that says what was found and what is supported.
"""
import json
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType

# architecture name in config.json -> (model_type, q/k/v bias, o_proj bias)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
}
MODEL_TYPES = {model_type: arch for arch, (model_type, _, _) in ARCHITECTURES.items()}

# rope scaling types RopeTable implements ("default" = no scaling); the parameters each needs
ROPE_SCALING_PARAMS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


class ConfigError(ValueError):
    """config.json describes a model this engine does not run (or is not valid)."""


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str            # "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"
    vocab_size: int
    hidden_size: int             # width of the residual stream
    intermediate_size: int       # width of the SwiGLU MLP
    n_layers: int
    n_heads: int                 # query heads
    n_kv_heads: int              # key/value heads (GQA: n_heads is a multiple)
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3" | "linear", ...parameters}, or (from a GGUF file's
    # rope_freqs) {"rope_type": "freq_factors", "factors": (head_dim // 2,)}; read-only mapping
    rope_scaling: MappingProxyType | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral/Qwen2: attention window (caps the context)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False       # Qwen2 (and Llama with attention_bias)
    o_bias: bool = False         # Llama with attention_bias
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()    # generation stops at any of these
    torch_dtype: str | None = None

    # -- derived values --
    @property
    def kv_groups(self):
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self):
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_dim(self):
        """Rows of the fused QKV weight: wq, wk, wv stacked along the output dimension."""
        return self.q_dim + 2 * self.kv_dim

    @property
    def max_context(self):
        """Longest sequence the engine runs exactly: positions the model was trained for, and
        at most one sliding window (inside a window, full causal attention is exact)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    # -- loading --
    @classmethod
    def from_dict(cls, d, generation_config=None):
        """From the parsed config.json (and generation_config.json, whose token ids win)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        arch = _architecture(d)
        model_type, qkv_bias, o_bias = ARCHITECTURES[arch]
        if d.get("attention_bias"):                  # Llama option: bias on q, k, v and o
            qkv_bias, o_bias = True, True
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported (no bias in the MLP projections)")
        if "quantization_config" in d:
            method = d["quantization_config"].get("quant_method", "?")
            raise ConfigError(f"quantized checkpoints are not supported (quantization_config: "
                              f"{method}); use a float32, float16 or bfloat16 checkpoint")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu', SwiGLU)")

        hidden = _int(d, "hidden_size")
        n_heads = _int(d, "num_attention_heads")
        n_kv_heads = _int(d, "num_key_value_heads", default=n_heads)
        head_dim = d.get("head_dim") or None
        head_dim = _int(d, "head_dim") if head_dim else hidden // n_heads
        if n_heads % n_kv_heads:
            raise ConfigError(f"num_attention_heads ({n_heads}) must be a multiple of "
                              f"num_key_value_heads ({n_kv_heads})")
        if head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported")
        theta, scaling = _rope(d)

        sliding_window = None
        if model_type == "mistral":
            sliding_window = d.get("sliding_window")
        elif model_type == "qwen2" and d.get("use_sliding_window"):
            sliding_window = d.get("sliding_window")
        if sliding_window is not None:
            sliding_window = _int(d, "sliding_window")

        gen = generation_config or {}
        bos = gen.get("bos_token_id", d.get("bos_token_id"))
        eos = gen.get("eos_token_id", d.get("eos_token_id"))
        if isinstance(bos, list):                     # some configs write a one-element list
            bos = bos[0] if bos else None
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(t, int) for t in eos) or not isinstance(bos, (int, type(None))):
            raise ConfigError(f"bos_token_id / eos_token_id must be integers, got {bos!r} / "
                              f"{eos!r}")

        return cls(
            architecture=arch,
            vocab_size=_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            n_layers=_int(d, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_float(d, "rms_norm_eps", default=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_int(d, "max_position_embeddings", default=2048),
            sliding_window=sliding_window,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            bos_token_id=bos,
            eos_token_ids=eos,
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
        )

    @classmethod
    def from_pretrained(cls, path):
        """From a model folder: config.json, plus generation_config.json when present."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder not found: {path}")
        d = _read_json(os.path.join(path, "config.json"), required=True)
        gen = _read_json(os.path.join(path, "generation_config.json"), required=False)
        return cls.from_dict(d, gen)


def _architecture(d):
    archs = d.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise ConfigError(f"expected one entry in 'architectures', got {archs!r}")
        arch = archs[0]
    elif d.get("model_type") in MODEL_TYPES:
        arch = MODEL_TYPES[d["model_type"]]
    else:
        arch = d.get("model_type", "<none given>")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {arch!r}; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    return arch


def _rope(d):
    """(theta, scaling) from `rope_theta` + `rope_scaling` (most published checkpoints) or from
    the `rope_parameters` block recent transformers releases write instead. scaling is None or
    a read-only {"rope_type": ..., parameters...}."""
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"rope_parameters per layer type is not supported: {params!r}")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING_PARAMS:
        raise ConfigError(f"rope scaling type {kind!r} is not supported; supported: "
                          f"{', '.join(ROPE_SCALING_PARAMS)} (or none)")
    out = {"rope_type": kind}
    for key in ROPE_SCALING_PARAMS[kind]:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"rope scaling {kind!r} needs a positive number {key!r}, "
                              f"got {value!r}")
        out[key] = value
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return float(theta), MappingProxyType(out)


def _int(d, key, default=None):
    value = d.get(key, default)
    if value is None:
        raise ConfigError(f"config.json is missing {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def _float(d, key, default):
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise ConfigError(f"config.json: {key!r} must be a positive number, got {value!r}")
    return float(value)


def _read_json(path, required):
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{os.path.basename(path)} not found in "
                                    f"{os.path.dirname(path)}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
