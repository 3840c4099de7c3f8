"""Exceptions raised by kvcache.

Every error raised for user input names the problem and the fix. ``KVCacheError`` subclasses
``ValueError`` so callers that validate input generically still catch it.
"""

from __future__ import annotations


class KVCacheError(ValueError):
    """Base class for kvcache errors caused by input or configuration."""


class CacheCapacityError(KVCacheError):
    """A fixed-capacity cache (``static:capacity=N``) was asked to hold more tokens than it has room for."""


class UnsupportedSpecError(KVCacheError):
    """A spec names a layout or policy that parses but is not available in this build."""
