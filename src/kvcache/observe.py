"""Attention observers: what a layer's attention call hands to whoever scores tokens (retention policies).

An observer says, per layer, which statistics it needs (:class:`StatsRequest`), and the kvcache attention
function (:mod:`kvcache.attention`) computes exactly that inside the same pass that computes attention —
from the very logits the model used, with no second forward, no query recomputation and no
``output_attentions``. A request can ask for the masked logits or the softmax weights, of every query row,
of the last ``W`` rows only, or summed over the rows (padding queries excluded), so nothing of size
``T_q x T_kv`` needs to outlive one layer's call.

When a policy may act on what it observed: **never inside the observer call** (the attention function is
still reading the keys and values; a static layer's ``keep`` compacts the very buffer the value matmul
reads). Policies act at the decode driver's hooks (after a prefill chunk, at the end of the prefill, after
a decode step) or at the start of the next ``update``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

__all__ = ["AttentionObserver", "StatsRequest", "select_rows"]


@dataclass(frozen=True)
class StatsRequest:
    """The statistics one layer's attention call should report.

    Attributes
    ----------
    values:
        ``"weights"`` (softmax, float32) or ``"logits"`` (masked pre-softmax scores, masked entries at the
        dtype's minimum).
    rows:
        ``"all"``: every query row, ``(B, H, T_q, T_kv)``; ``"last"``: the last :attr:`last` rows,
        ``(B, H, min(last, T_q), T_kv)``; ``"sum"``: summed over the real (non-padding) query rows,
        ``(B, H, T_kv)``.
    last:
        Rows kept by ``rows="last"``.
    transform:
        Applied to the ``(B, H, T_q, T_kv)`` values before the rows are selected or summed (e.g. Keyformer's
        Gumbel-perturbed softmax of the logits), so the full matrix never leaves the layer's call.
    """

    values: Literal["weights", "logits"] = "weights"
    rows: Literal["all", "last", "sum"] = "all"
    last: int = 1
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.values not in ("weights", "logits"):
            raise ValueError(f"StatsRequest.values must be 'weights' or 'logits', got {self.values!r}")
        if self.rows not in ("all", "last", "sum"):
            raise ValueError(f"StatsRequest.rows must be 'all', 'last' or 'sum', got {self.rows!r}")
        if not isinstance(self.last, int) or self.last < 1:
            raise ValueError(f"StatsRequest.last must be an integer >= 1, got {self.last!r}")


class AttentionObserver(Protocol):
    """Receives attention statistics from :func:`kvcache.attention.kvcache_attention`.

    Set one on a cache (``KVCache.observer``); the attention function asks :meth:`request` for every layer
    in every forward, computes what was asked, and hands it to :meth:`observe`.
    """

    def request(self, layer_idx: int) -> StatsRequest | None:
        """What layer ``layer_idx`` should report in this forward (``None``: nothing)."""

    def observe(self, layer_idx: int, stats: torch.Tensor) -> None:
        """The statistics :meth:`request` asked for, per *query* head ``H`` (GQA groups not reduced):
        ``(B, H, T_q, T_kv)``, ``(B, H, W, T_kv)`` or ``(B, H, T_kv)``; ``T_kv`` are the slots the layer's
        ``update`` returned."""


def select_rows(request: StatsRequest, values: torch.Tensor,
                query_valid: torch.Tensor | None) -> torch.Tensor:
    """Reduce ``(B, H, T_q, T_kv)`` statistics to what ``request`` asks for.

    Parameters
    ----------
    query_valid:
        ``(B, T_q)`` bool, False for padding queries (left out of ``"sum"``); ``None``: all real.
    """
    if request.transform is not None:
        values = request.transform(values)
    if request.rows == "all":
        return values
    if request.rows == "last":
        return values[:, :, -request.last :]
    if query_valid is not None:
        values = values.masked_fill(~query_valid[:, None, :, None], 0.0)
    return values.sum(dim=2)
