"""kvcache: KV-cache layouts, retention policies and ONNX KV-cache injection for LLM generation."""

from kvcache.errors import CacheCapacityError, KVCacheError, UnsupportedSpecError
from kvcache.spec import CacheSpec, SpecError

__version__ = "0.1.0"

__all__ = [
    "CacheCapacityError",
    "CacheSpec",
    "KVCacheError",
    "SpecError",
    "UnsupportedSpecError",
    "__version__",
]
