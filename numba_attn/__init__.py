"""numba-attn: attention and Llama-style inference kernels on plain arrays, CPU and CUDA."""
from importlib.metadata import PackageNotFoundError, version

from .kvcache import KVCache
from .mask import MaskCache, causal_mask
from .ops import apply_rope, attention, linear, masked_softmax, rmsnorm, silu_mul
from .rope import RopeTable
from .model import Model

try:
    __version__ = version("numba-attn")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = [
    "RopeTable", "apply_rope", "linear", "rmsnorm", "silu_mul", "causal_mask", "MaskCache",
    "masked_softmax", "attention", "KVCache", "Model", "__version__",
]
