"""LlamaConfig from Hugging Face config.json dicts, as published checkpoints write them."""
import dataclasses
import json

import pytest

from numba_attn.config import ConfigError, LlamaConfig

LLAMA2 = {  # Llama-2-7b-hf
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float16",
    "pretraining_tp": 1,
}
LLAMA31 = {  # Llama-3.1-8B: rope_scaling "llama3", eos a list
    **LLAMA2, "hidden_size": 4096, "intermediate_size": 14336, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "vocab_size": 128256,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
QWEN2 = {  # Qwen2.5-0.5B-Instruct
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
    "max_window_layers": 21, "tie_word_embeddings": True, "vocab_size": 151936,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
}
MISTRAL = {  # Mistral-7B-v0.1: sliding window 4096 under a 32768 context
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000, "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_llama2():
    c = LlamaConfig.from_dict(LLAMA2)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.kv_groups) == (32, 32, 128, 1)
    assert c.rope_scaling is None and c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-5
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert not c.qkv_bias and not c.tie_word_embeddings and c.max_context == 4096
    assert c.qkv_dim == 3 * 4096


def test_llama31_rope_scaling_and_gqa():
    c = LlamaConfig.from_dict(LLAMA31)
    assert c.kv_groups == 4 and c.kv_dim == 1024 and c.rope_theta == 500000.0
    assert dict(c.rope_scaling) == {"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}
    assert c.eos_token_ids == (128001, 128008, 128009)


def test_rope_parameters_block():
    """transformers v5 writes rope_parameters instead of rope_theta + rope_scaling."""
    d = {k: v for k, v in LLAMA31.items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {**LLAMA31["rope_scaling"], "rope_theta": 500000.0}
    assert LlamaConfig.from_dict(d) == LlamaConfig.from_dict(LLAMA31)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    c = LlamaConfig.from_dict(d)
    assert c.rope_scaling is None and c.rope_theta == 250000.0


def test_old_style_type_key_and_linear():
    c = LlamaConfig.from_dict({**LLAMA2, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert dict(c.rope_scaling) == {"rope_type": "linear", "factor": 2.0}


def test_qwen2_biases_tied_no_window():
    c = LlamaConfig.from_dict(QWEN2)
    assert c.qkv_bias and not c.o_bias and c.tie_word_embeddings
    assert c.head_dim == 64 and c.sliding_window is None and c.max_context == 32768


def test_mistral_window_caps_context():
    c = LlamaConfig.from_dict(MISTRAL)
    assert c.sliding_window == 4096 and c.max_context == 4096
    assert LlamaConfig.from_dict({**MISTRAL, "sliding_window": None}).max_context == 32768


def test_head_dim_and_defaults():
    c = LlamaConfig.from_dict({**MISTRAL, "head_dim": 160, "sliding_window": None})
    assert c.head_dim == 160 and c.q_dim == 32 * 160
    d = {k: v for k, v in LLAMA2.items() if k not in ("num_key_value_heads", "rms_norm_eps")}
    c = LlamaConfig.from_dict({**d, "architectures": None, "head_dim": None})
    assert c.n_kv_heads == 32 and c.rms_norm_eps == 1e-6 and c.head_dim == 128
    assert c.architecture == "LlamaForCausalLM"  # from model_type


def test_llama_attention_bias():
    c = LlamaConfig.from_dict({**LLAMA2, "attention_bias": True})
    assert c.qkv_bias and c.o_bias


def test_generation_config_wins():
    c = LlamaConfig.from_dict(LLAMA2, {"bos_token_id": 5, "eos_token_id": [2, 7]})
    assert c.bos_token_id == 5 and c.eos_token_ids == (2, 7)


def test_frozen_and_hashable():
    c = LlamaConfig.from_dict(LLAMA31)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layers = 3
    with pytest.raises(TypeError):
        c.rope_scaling["factor"] = 2.0
    assert hash(c) == hash(LlamaConfig.from_dict(LLAMA31))


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"architectures": ["GemmaForCausalLM"]}, "supported: LlamaForCausalLM, MistralForCausalLM"),
    ({"architectures": None, "model_type": "phi3"}, "unsupported architecture 'phi3'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs a positive number "
                                                                "'low_freq_factor'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per layer type"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoints.*gptq"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ({"vocab_size": None}, "missing 'vocab_size'"),
    ({"num_hidden_layers": "32"}, "'num_hidden_layers' must be a positive integer"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps' must be a positive number"),
    ({"rope_theta": 0}, "rope_theta must be a positive number"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"head_dim": 127}, "head_dim must be even"),
    ({"eos_token_id": "2"}, "must be integers"),
])
def test_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_dict({**LLAMA2, **change})


def test_from_pretrained_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LlamaConfig.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert LlamaConfig.from_pretrained(tmp_path).eos_token_ids == (2, 3)
