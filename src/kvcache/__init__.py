"""kvcache: KV-cache layouts, retention policies and ONNX KV-cache injection for LLM generation."""

from kvcache.attention import enable
from kvcache.cache import KVCache
from kvcache.chat import Chat, TurnStats
from kvcache.errors import CacheCapacityError, KVCacheError, UnsupportedSpecError
from kvcache.generation import GenerationResult, GenerationStats, generate
from kvcache.spec import CacheSpec, SpecError

__version__ = "0.1.0"

__all__ = [
    "CacheCapacityError",
    "CacheSpec",
    "Chat",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "KVCacheError",
    "SpecError",
    "TurnStats",
    "UnsupportedSpecError",
    "__version__",
    "enable",
    "generate",
]
