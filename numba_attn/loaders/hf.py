"""A Hugging Face model folder as a model source: config.json (+ generation_config.json) and the
tensors of its safetensors files, read through the `safetensors` library.

One `model.safetensors`, or shards listed in `model.safetensors.index.json`. Tensors are read
one at a time straight into an array the caller allocated (a fused QKV weight is filled part by
part), so loading never holds a second full copy of the model: each file is opened with
safetensors' "pread" backend, which reads a tensor's bytes without mapping the file (with the
"mmap" backend every page read during loading would also count as resident memory until the
file is closed). float32, float16 and bfloat16 tensors load into float32, float16 or bfloat16
(ml_dtypes) arrays, or are quantized into a Q8Matrix.

safetensors' NumPy framework refuses BF16 tensors. For those we take the tensor's byte range
from the file header (the safetensors format: 8-byte little-endian header length, JSON header
with `data_offsets` relative to the end of the header): into a bfloat16 array as they are, or
widened: a bfloat16 is the top 16 bits of a float32, so `f32_bits = uint32(bf16_bits) << 16`
is exact.
"""
import json
import os

import numpy as np

from ..config import LlamaConfig
from ..formats import Q8Matrix
from ..weights import BFLOAT16, CheckpointError, store

try:
    from safetensors import SafetensorError, safe_open
except ImportError:  # pragma: no cover - safetensors is a dependency
    safe_open = None
    SafetensorError = Exception

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype code -> NumPy dtype of the stored bits
STORED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# the storage format a checkpoint's own type maps to
STORED_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
FORMAT_OF_STORED = {v: k for k, v in STORED_NAMES.items()}


def open_folder(folder):
    """(LlamaConfig, Checkpoint) of a Hugging Face model folder."""
    config = LlamaConfig.from_pretrained(folder)
    return config, Checkpoint(folder)


def find_weight_files(folder):
    """{tensor name: file path} for a folder: the sharded index when present, else one file."""
    folder = os.fspath(folder)
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict) and weight_map
        except (ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index_path} is not a valid safetensors index "
                                  f"(expected a non-empty 'weight_map')") from None
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointError(f"shard {shard} listed in {INDEX_FILE} is missing "
                                      f"from {folder}")
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.isfile(single):
        others = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
        if len(others) != 1:
            raise CheckpointError(f"no {SINGLE_FILE} (or {INDEX_FILE}) in {folder}"
                                  + (f"; found {', '.join(others)}" if others else ""))
        single = os.path.join(folder, others[0])
    return {name: single for name in _open(single).keys()}


def _open(path):
    """A safetensors handle; the library validates the header and that the file is complete."""
    try:
        try:
            return safe_open(path, framework="numpy", backend="pread")
        except TypeError:  # safetensors < 0.8 has no backend choice: memory-mapped
            return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None
    except FileNotFoundError:
        raise CheckpointError(f"weights file not found: {path}") from None


class Checkpoint:
    """The tensor source of a folder: tensors by name across its safetensors files. Use as a
    context manager; read() each tensor once into its destination."""

    def __init__(self, folder):
        self.path = os.fspath(folder)
        self.files = find_weight_files(self.path)     # {name: path}
        self._handles = {}                            # path -> safe_open handle
        self._headers = {}                            # path -> (data_start, header) for BF16

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._handles.clear()
        self._headers.clear()

    def __contains__(self, name):
        return name in self.files

    @property
    def stored_format(self):
        """The matrices' own format (a FORMATS name): what weight_dtype="auto" keeps."""
        name = next((n for n in self.files if n.endswith("_proj.weight")
                     or n.endswith("embed_tokens.weight")), None)
        return FORMAT_OF_STORED.get(self.info(name)[0], "float32") if name else "float32"

    def notice(self, fmt):
        """A line about conversions at load into fmt worth telling the user: none here (the
        CLI's progress bar shows quantizing)."""
        return None

    def _handle(self, name):
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in "
                                  f"{self.path}")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open(path)
        return path, self._handles[path]

    def info(self, name):
        """(safetensors dtype code, shape) of a tensor, without reading it."""
        path, f = self._handle(name)
        try:
            s = f.get_slice(name)
        except SafetensorError as e:
            raise CheckpointError(f"tensor {name!r} not found in {path}: {e}") from None
        return s.get_dtype(), tuple(s.get_shape())

    def read(self, name, out):
        """Read tensor `name` into `out` (same shape; a float32, float16 or bfloat16 array, or a
        host Q8Matrix), converting from the stored type (to bfloat16 and float16 by rounding to
        nearest even, to Q8_0 by quantizing). A tensor stored in out's own type is read straight
        into it. Returns out."""
        if isinstance(out, Q8Matrix):
            return store(name, out, self.read(name, np.empty(out.shape, np.float32)))
        path, f = self._handle(name)
        dtype, shape = self.info(name)
        if shape != out.shape:
            raise CheckpointError(f"tensor {name!r} has shape {shape}, the config implies "
                                  f"{out.shape}")
        if dtype not in STORED_DTYPES:
            raise CheckpointError(f"tensor {name!r} is {dtype}; supported: "
                                  f"{', '.join(STORED_DTYPES)}")
        try:
            if dtype == "BF16" and out.dtype == BFLOAT16:
                self._read_raw(path, name, out.view(np.uint16))   # the bytes as they are
            elif dtype == "BF16":
                bits = np.empty(shape, np.uint16)     # one tensor's raw bits, freed on return
                self._read_raw(path, name, bits)
                if out.dtype == np.float32:
                    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
                else:
                    store(name, out, bits.view(BFLOAT16))
            elif STORED_NAMES.get(out.dtype.name) == dtype:
                out[...] = f.get_tensor(name)         # the stored type: a copy
            else:
                store(name, out, f.get_tensor(name))
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {name!r} from {path}: {e}") from None
        return out

    def _read_raw(self, path, name, buf):
        """The stored bytes of one tensor into buf (a C-contiguous array of the right size)."""
        if path not in self._headers:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        data_start, header = self._headers[path]
        begin, end = header[name]["data_offsets"]
        view = memoryview(buf).cast("B")
        if end - begin != view.nbytes:
            raise CheckpointError(f"tensor {name!r} in {path}: {end - begin} bytes stored, "
                                  f"{view.nbytes} expected")
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            done = 0
            while done < view.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"truncated safetensors file {path}")
                done += n
