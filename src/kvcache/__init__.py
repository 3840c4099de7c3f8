"""kvcache: KV-cache layouts, retention policies and ONNX KV-cache injection for LLM generation."""

from kvcache.errors import CacheCapacityError, KVCacheError, UnsupportedSpecError

__version__ = "0.1.0"

__all__ = [
    "CacheCapacityError",
    "KVCacheError",
    "UnsupportedSpecError",
    "__version__",
]
