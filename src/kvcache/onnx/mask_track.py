"""The 2-D attention mask of an append-only host cache, kept across decode steps instead of rebuilt.

A decode step of ONNX Runtime's fused graph (``--fused``) takes ``attention_mask`` ``(B, T)`` over the
``T - S`` slots held and the ``S`` new tokens. Rebuilding it every step from the stores' slot positions costs
a handful of tensor operations, each slow right after a forward has evicted the CPU caches. A store that only
appends (a dense cache, no eviction) changes its validity columns only by appending, so the mask is kept in
one growing buffer and each step writes just its new columns. The tracker follows one cache object and a
length; anything else (another cache, a cache cropped or reset, a failed step) rebuilds it from the cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch

from kvcache.cache import KVCache


class MaskTracker:
    """``(B, T)`` int64 attention masks of successive steps over the same append-only cache."""

    def __init__(self) -> None:
        self._cache: weakref.ref[KVCache] | None = None
        self._buf = np.zeros((0, 0), dtype=np.int64)
        self._length = -1

    def mask(self, cache: KVCache, held: int, valid: torch.Tensor,
             past: Callable[[], torch.Tensor]) -> np.ndarray:
        """The mask for a step adding ``valid`` ``(B, S)`` tokens after ``held`` slots, C-contiguous.

        ``past()`` gives the ``(B, held)`` validity of the held slots when the tracker has to rebuild.
        Call :meth:`advance` once the step has run.
        """
        batch, seq = valid.shape
        end = held + seq
        tracked = self._cache is not None and self._cache() is cache and self._length == held \
            and self._buf.shape[0] == batch
        if not tracked or end > self._buf.shape[1]:
            grown = np.zeros((batch, max(2 * end, 64)), dtype=np.int64)
            grown[:, :held] = self._buf[:, :held] if tracked else past().numpy()
            self._buf = grown
        self._cache = weakref.ref(cache)
        self._length = -1  # until advance(): a failed step must not leave a stale length behind
        self._buf[:, held:end] = valid.numpy()
        view = self._buf[:, :end]
        return view if batch == 1 else np.ascontiguousarray(view)

    def advance(self, length: int) -> None:
        """The step ran: the cache now holds ``length`` slots, all recorded in the mask."""
        self._length = length
