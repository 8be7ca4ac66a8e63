"""Model sources side by side: a Hugging Face folder (hf.py) and a GGUF file (gguf.py). Each
gives the config and a tensor source; model.ModelWeights.load builds the weights from either.

A tensor source reads tensors by their Hugging Face names:

    name in source                 the tensor is stored
    source.read(name, out)         into out, a float32/float16/bfloat16 array or a host
                                   Q8Matrix of the tensor's shape: the bytes as they are when
                                   stored in out's format, else converted
    source.stored_format           the format weight_dtype="auto" keeps (a formats.FORMATS name)
    source.notice(fmt)             a line for the user about conversions at load, or None
    source.path, source.close()    (and a context manager)
"""
import os

from .gguf import is_gguf_file, open_gguf
from .hf import open_folder


def open_model_source(path):
    """(LlamaConfig, tensor source) of a Hugging Face model folder or a GGUF file. The caller
    closes the source (it is a context manager)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return open_folder(path)
    if os.path.isfile(path):
        return open_gguf(path)     # refuses a file that is not GGUF
    what = "file" if path.lower().endswith(".gguf") else "folder"
    raise FileNotFoundError(f"model {what} not found: {path}")


__all__ = ["open_model_source", "open_folder", "open_gguf", "is_gguf_file"]
