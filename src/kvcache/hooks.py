"""The decode driver's hooks: where retention policies act, between forwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcache.cache import KVCache

__all__ = ["DecodeHooks", "chain"]


@dataclass
class DecodeHooks:
    """Where a retention policy acts; each hook gets the cache, between forwards.

    Attributes
    ----------
    after_prefill_chunk:
        After each prefill chunk (a long prompt can be compressed while it streams in).
    after_prefill:
        Once, after the last prefill chunk and before the first token is sampled.
    after_step:
        After each decode step's forward.
    """

    after_prefill_chunk: Callable[[KVCache], None] | None = None
    after_prefill: Callable[[KVCache], None] | None = None
    after_step: Callable[[KVCache], None] | None = None


def chain(*hooks: DecodeHooks | None) -> DecodeHooks:
    """One set of hooks calling each given set in turn (``None`` entries skipped)."""
    present = [h for h in hooks if h is not None]

    def run(name: str) -> Callable[[KVCache], None] | None:
        calls = [getattr(h, name) for h in present if getattr(h, name) is not None]
        if not calls:
            return None

        def call(cache: KVCache) -> None:
            for fn in calls:
                fn(cache)

        return call

    return DecodeHooks(run("after_prefill_chunk"), run("after_prefill"), run("after_step"))
