"""A GGUF file (llama.cpp, Ollama, LM Studio) as a model source, read through the `gguf`
package's GGUFReader: the config from the file's metadata, the tensors memory-mapped and read by
their Hugging Face names (the package's own name map: `blk.0.attn_q.weight` is
`model.layers.0.self_attn.q_proj.weight`).

F32, F16, BF16 and Q8_0 tensors are copied as they are when the model keeps that format (a Q8_0
block is a float16 scale and 32 int8 codes: our Q8Matrix's `d` and `qs`, split into two arrays);
other quantization types (Q4_0, Q4_K, Q5_K, Q6_K, ...) are dequantized at load through
`gguf.quants.dequantize`, then stored in the format asked for. The pages of each tensor are
released as soon as it is read, so the mapping never adds to resident memory.

llama.cpp's converter permutes the rows of each Q and K head of the `llama` architecture (not
`qwen2`) so that its rope rotates interleaved pairs (2i, 2i+1): HF row h*d + j*d/2 + i is stored
as row h*d + 2i + j. The rows are put back in Hugging Face order at load (a Q8_0 block lies
within one row), so the model runs its half-split rope on either source.
"""
import mmap
import os
from dataclasses import replace
from types import MappingProxyType

import numpy as np

from ..config import ConfigError, LlamaConfig
from ..formats import Q8_BLOCK, Q8Matrix
from ..weights import BFLOAT16, CheckpointError, row_block, store

GGUF_MAGIC = b"GGUF"
# general.architecture -> the Hugging Face architecture it is
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PERMUTED_QK = ("llama",)    # architectures whose Q/K rows the converter permutes
# GGML types copied as they are into the format of the same name
PASS_THROUGH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "Q8_0": "q8_0"}
DEQUANTIZED_INTO = "q8_0"   # what weight_dtype="auto" keeps of any other type
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])   # 34 bytes, as stored
DEQUANTIZE_ROWS = 1 << 22   # weights dequantized at a time (bounds the float32 temporaries)
MAX_CONFIG_ARRAY = 1024     # metadata arrays the config may read (not the vocabulary)


def is_gguf_file(path):
    """Whether path is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path):
    """(LlamaConfig, GGUFFile) of a GGUF file."""
    source = GGUFFile(path)
    try:
        return read_config(source), source
    except BaseException:
        source.close()
        raise


def open_reader(path):
    """The gguf package's GGUFReader over path (memory-mapped), every failure a CheckpointError:
    not a GGUF file, a header that does not parse, tensor data past the end of the file (the
    reader's views of the tensors come out short)."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"model file not found: {path}")
    if not is_gguf_file(path):
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic at its start); a "
                              f"model is a Hugging Face folder or a GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:   # the reader raises ValueError, KeyError, IndexError... on damage
        raise CheckpointError(f"corrupt or truncated GGUF file {path}: "
                              f"{type(e).__name__}: {e}") from None
    return reader


def read_metadata(reader, max_array=None):
    """{key: value} of a reader's metadata (int, float, bool, str or list), arrays longer than
    max_array left out (the model needs no vocabulary). float32 values as the shortest decimal
    that rounds to them: the 1e-05 that was written, not 9.999999747378752e-06. The reader's
    fields are one NumPy view per array element (a Llama 3 vocabulary: ~600 MB of objects),
    so a caller keeps these values and lets the reader go."""
    import gguf
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        if max_array is not None and field.types[0] == gguf.GGUFValueType.ARRAY \
                and len(field.data) > max_array:
            continue
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise CheckpointError(f"GGUF metadata {key!r} is corrupt: {e}") from None
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        values[key] = value
    return values


class GGUFFile:
    """The tensor source of a GGUF file: its tensors by Hugging Face name. Use as a context
    manager; read() each tensor once into its destination."""

    def __init__(self, path):
        import gguf

        self.path = os.fspath(path)
        reader = open_reader(self.path)
        self.meta = read_metadata(reader, max_array=MAX_CONFIG_ARRAY)   # {key: value}
        self.tensors = {t.name: t for t in reader.tensors}    # GGUF name -> ReaderTensor
        self._mapping = reader.data                           # the file, memory-mapped
        self.arch = self.meta.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{self.path}: unsupported GGUF architecture {self.arch!r}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        n_layers = _positive_int(self.meta, f"{self.arch}.block_count")
        self._names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch.upper()], n_layers)
        # query and KV head counts, for the rows of permuted Q and K tensors
        n_heads = _positive_int(self.meta, f"{self.arch}.attention.head_count")
        n_kv = _positive_int(self.meta, f"{self.arch}.attention.head_count_kv", n_heads)
        self._permuted = {"q_proj": n_heads, "k_proj": n_kv} if self.arch in PERMUTED_QK \
            else {}
        self._check_types()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.tensors = {}
        self._mapping = None     # the mapping closes with its last view

    def gguf_name(self, name):
        """The GGUF name of a Hugging Face tensor name (None when it has none)."""
        return self._names.get_name(name, try_suffixes=(".weight", ".bias"))

    def __contains__(self, name):
        return self.gguf_name(name) in self.tensors

    def _tensor(self, name):
        t = self.tensors.get(self.gguf_name(name) or "")
        if t is None:
            raise CheckpointError(f"tensor {name!r} ({self.gguf_name(name) or 'no GGUF name'}) "
                                  f"is missing from {self.path}")
        return t

    def _check_types(self):
        """Every tensor of a type we read: refused at open, before anything is loaded."""
        import gguf
        for kind in sorted({t.tensor_type for t in self.tensors.values()}):
            if kind.name in PASS_THROUGH:
                continue
            _, size = gguf.GGML_QUANT_SIZES[kind]
            try:
                gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)
            except NotImplementedError:
                name = next(t.name for t in self.tensors.values() if t.tensor_type == kind)
                raise CheckpointError(
                    f"tensor {name!r} in {self.path} is {kind.name}, which is not supported "
                    f"(F32, F16, BF16, Q8_0, and the quantized types gguf.quants dequantizes)"
                ) from None

    def _matrices(self):
        return [t for t in self.tensors.values() if len(t.shape) == 2]

    @property
    def stored_format(self):
        """What weight_dtype="auto" keeps: the format most matrix weights are stored in when it
        is F32, F16, BF16 or Q8_0, else q8_0 (the others are dequantized at load)."""
        count = {}
        for t in self._matrices():
            count[t.tensor_type.name] = count.get(t.tensor_type.name, 0) + t.n_elements
        kind = max(count, key=count.get) if count else "F32"
        return PASS_THROUGH.get(kind, DEQUANTIZED_INTO)

    def notice(self, fmt):
        """The line to tell the user when tensors of other quantization types are dequantized
        at load (None when every tensor is used as it is)."""
        other = [t for t in self.tensors.values() if t.tensor_type.name not in PASS_THROUGH]
        if not other:
            return None
        kinds = ", ".join(sorted({t.tensor_type.name for t in other}))
        return (f"{os.path.basename(self.path)}: {len(other)} tensor"
                f"{'s' if len(other) > 1 else ''} in {kinds} dequantized at load "
                f"(stored as {fmt})")

    def _heads(self, name):
        """The head count whose rows the converter permuted in tensor `name`, else None."""
        parts = name.split(".")
        return self._permuted.get(parts[-2]) if len(parts) > 2 and parts[-3] == "self_attn" \
            else None

    def read(self, name, out):
        """Read tensor `name` (a Hugging Face name) into `out` (its shape; a float32, float16 or
        bfloat16 array, or a host Q8Matrix): copied when stored in out's format, else
        converted (dequantized, widened, rounded or quantized). Returns out."""
        t = self._tensor(name)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))   # (rows, cols)
        if shape != tuple(out.shape):
            raise CheckpointError(f"tensor {name!r} ({t.name}) has shape {shape}, the config "
                                  f"implies {tuple(out.shape)}")
        heads = self._heads(name)
        if heads is not None and shape[0] % (2 * heads):
            raise CheckpointError(f"tensor {name!r} has {shape[0]} rows, not whole heads of "
                                  f"{heads}")
        kind = t.tensor_type.name
        try:
            if kind == "Q8_0" and isinstance(out, Q8Matrix):
                blocks = _hf_rows(t.data.view(Q8_0_BLOCK), heads)   # (rows, cols / 32)
                rows, cols = shape
                _head_rows(out.qs.reshape(rows, cols // Q8_BLOCK, Q8_BLOCK), heads)[...] = \
                    blocks["qs"]
                _head_rows(out.d, heads)[...] = blocks["d"]
            elif kind in ("F32", "F16", "BF16") and not isinstance(out, Q8Matrix):
                store(name, _head_rows(out, heads), _hf_rows(_floats(t), heads))
            elif heads is not None or len(shape) == 1:
                w = np.empty(shape, np.float32)           # a whole tensor in HF row order
                _head_rows(w, heads)[...] = _hf_rows(_dequantized(t, 0, shape[0]), heads)
                store(name, out, w)
            else:                                         # row blocks, few float32 at a time
                step = max(1, DEQUANTIZE_ROWS // shape[1])
                for a in range(0, shape[0], step):
                    b = min(a + step, shape[0])
                    store(name, row_block(out, a, b), _dequantized(t, a, b))
        finally:
            self._release(t)
        return out

    def _release(self, t):
        """Drop the pages of tensor t from this process's resident set (they stay in the page
        cache): the mapping holds no second copy of the weights."""
        mapped = getattr(self._mapping, "_mmap", None)
        if mapped is None or not hasattr(mapped, "madvise"):
            return
        page = mmap.PAGESIZE
        start = t.data_offset // page * page
        end = min(-(-(t.data_offset + t.n_bytes) // page) * page, len(mapped))
        try:
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def _floats(t):
    """The float array (rows, cols) or (n,) a F32, F16 or BF16 tensor's data is."""
    if t.tensor_type.name == "BF16":
        return t.data.view(BFLOAT16)                 # stored as bytes by the reader
    return t.data


def _dequantized(t, start, stop):
    """Rows start:stop of a tensor as float32, through gguf.quants (a 1-D tensor whole)."""
    import gguf
    data = t.data if t.data.ndim == 1 else t.data[start:stop]
    if t.tensor_type.name == "BF16":
        return data.view(BFLOAT16).astype(np.float32)
    return gguf.quants.dequantize(data, t.tensor_type)


def _hf_rows(a, heads):
    """A view of a's rows (first axis, the converter's order) in Hugging Face order, shaped
    (heads, 2, d/2, ...) to pair with _head_rows; a itself when heads is None."""
    if heads is None:
        return a
    d = a.shape[0] // heads
    return a.reshape(heads, d // 2, 2, *a.shape[1:]).swapaxes(1, 2)


def _head_rows(a, heads):
    """a (rows in Hugging Face order) viewed as (heads, 2, d/2, ...); a itself when heads is
    None."""
    if heads is None:
        return a
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:])


def _positive_int(meta, key, default=None):
    value = meta.get(key, default)
    if value is None:
        raise ConfigError(f"GGUF metadata {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"GGUF metadata {key!r} must be a positive integer, got {value!r}")
    return value


def _positive_float(meta, key, default):
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not np.isfinite(value):
        raise ConfigError(f"GGUF metadata {key!r} must be a positive number, got {value!r}")
    return float(value)


def read_config(source):
    """LlamaConfig from a GGUFFile's metadata (and which tensors it holds: the output head,
    biases, rope frequency factors)."""
    meta, arch, path = source.meta, source.arch, source.path

    def key(name):
        return f"{arch}.{name}"

    try:
        experts = meta.get(key("expert_count"), 0)
        if experts:
            raise ConfigError(f"mixture-of-experts models ({key('expert_count')} = {experts}) "
                              f"are not supported")
        hidden = _positive_int(meta, key("embedding_length"))
        n_heads = _positive_int(meta, key("attention.head_count"))
        n_kv = _positive_int(meta, key("attention.head_count_kv"), n_heads)
        head_dim = _positive_int(meta, key("attention.key_length"), hidden // n_heads or None)
        value_dim = _positive_int(meta, key("attention.value_length"), head_dim)
        if value_dim != head_dim:
            raise ConfigError(f"key_length {head_dim} != value_length {value_dim} is not "
                              f"supported")
        rope_dims = _positive_int(meta, key("rope.dimension_count"), head_dim)
        if rope_dims != head_dim:
            raise ConfigError(f"rope on {rope_dims} of {head_dim} head dimensions is not "
                              f"supported")
        embed = source.tensors.get("token_embd.weight")
        if embed is None:
            raise CheckpointError(f"tensor 'token_embd.weight' is missing from {path}")
        vocab = int(embed.shape[1])                   # GGML order: (hidden, vocab)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        d = {
            "architectures": [ARCHITECTURES[arch]],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": _positive_int(meta, key("feed_forward_length")),
            "num_hidden_layers": _positive_int(meta, key("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": _positive_float(meta, key("attention.layer_norm_rms_epsilon"), 1e-6),
            "rope_theta": _positive_float(meta, key("rope.freq_base"), 10000.0),
            "max_position_embeddings": _positive_int(meta, key("context_length"), 2048),
            "tie_word_embeddings": "output.weight" not in source.tensors,
            "bos_token_id": bos,
            "eos_token_id": list(dict.fromkeys(e for e in eos if e is not None)),
        }
        window = meta.get(key("attention.sliding_window"))
        if window:
            d["sliding_window"] = window
            d["use_sliding_window"] = True
        config = LlamaConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    # biases where the file has them (Qwen2 always has q, k, v biases)
    qkv_bias = arch == "qwen2" or "blk.0.attn_q.bias" in source.tensors
    o_bias = "blk.0.attn_output.bias" in source.tensors
    return replace(config, qkv_bias=qkv_bias, o_bias=o_bias,
                   rope_scaling=_rope_scaling(source, key, head_dim))


def _rope_scaling(source, key, head_dim):
    """The rope scaling a file describes: linear (rope.scaling.type and factor), or per
    frequency factors (the rope_freqs tensor, how the converter stores Llama 3's scaling);
    None for none. Other types (YaRN) are refused."""
    meta, path = source.meta, source.path
    kind = meta.get(key("rope.scaling.type"), "none")
    factor = meta.get(key("rope.scaling.factor"), meta.get(key("rope.scale_linear")))
    freqs = source.tensors.get("rope_freqs.weight")
    if freqs is not None:
        if freqs.n_elements != head_dim // 2:
            raise ConfigError(f"{path}: rope_freqs has {freqs.n_elements} factors, "
                              f"head_dim {head_dim} needs {head_dim // 2}")
        factors = _dequantized(freqs, 0, 1).reshape(-1).astype(np.float64)
        source._release(freqs)
        if not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ConfigError(f"{path}: rope_freqs holds factors that are not positive")
        return MappingProxyType({"rope_type": "freq_factors", "factors": tuple(factors)})
    if kind == "none" and factor in (None, 0, 1, 1.0):
        return None
    if kind in ("linear", "none"):
        try:
            factor = _positive_float(meta, key("rope.scaling.factor"), factor)
        except ConfigError as e:
            raise ConfigError(f"{path}: linear rope scaling: {e}") from None
        return MappingProxyType({"rope_type": "linear", "factor": factor})
    raise ConfigError(f"{path}: rope scaling type {kind!r} is not supported; supported: "
                      f"linear, llama3 frequency factors (or none)")
