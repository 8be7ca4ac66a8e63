"""numba-attn: attention and Llama-style inference kernels on plain arrays, CPU and CUDA."""
import os

# OpenBLAS worker threads spin for ~0.1 s after each BLAS call (the default timeout, 2^28
# cycles), holding the cores our Numba kernels run on next (the norm, rope and attention between
# a prefill's GEMMs); 2^4 cycles lets them sleep at once: prefill-512 of a 4-layer TinyLlama
# shape 505 -> 611 tokens/s on 2 cores (bench/RESULTS.md). Read when OpenBLAS
# loads, so this works when numba_attn is imported before NumPy (as the CLI does); set it in
# the environment yourself otherwise. A value already set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# The same the other way round: Numba's OpenMP threads spin ~300000 iterations (GNU libgomp's
# default) after each parallel region, taking cores from the GEMM that follows. 30000 keeps
# back-to-back decode regions warm: prefill-512 +5-12%, decode -1.5-3.4% (4 TinyLlama layers,
# three runs each way, bench/RESULTS.md). Read when Numba starts its OpenMP pool.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

from .kvcache import KVCache  # noqa: E402
from .mask import MaskCache, causal_mask
from .ops import (add_rmsnorm, apply_rope, attention, linear, masked_softmax, rmsnorm,
                  silu_mul)
from .rope import RopeTable
from .model import Model
from .formats import FORMATS, KV_DTYPES, Q8Matrix, quantize_q8_0
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .generation import GenerationStats, generate
from .chat import ChatSession, ChatTemplate, ChatTemplateError, ContextFullError

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "demo")
"""The built-in demo model's folder: a 3.2M-parameter Llama trained on Jane Austen's novels."""

try:
    __version__ = version("numba-attn")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = [
    "RopeTable", "apply_rope", "linear", "rmsnorm", "add_rmsnorm", "silu_mul", "causal_mask", "MaskCache",
    "masked_softmax", "attention", "KVCache", "Model", "Tokenizer", "SamplingParams",
    "GenerationStats", "generate", "ChatSession", "ChatTemplate", "ChatTemplateError",
    "ContextFullError", "DEMO_MODEL", "Q8Matrix", "quantize_q8_0", "FORMATS", "KV_DTYPES",
    "__version__",
]
