"""DiffSnap (kvcache's own): the union of KeyDiff's most distinctive keys and SnapKV's most attended keys.

Measured on the bundled model, two signals find the tokens a retrieval question needs: key dissimilarity
(KeyDiff: keys least similar to their head's mean key) ranks a hidden fact's keys near the top in most
heads, and the attention of the last prompt queries — the question — (SnapKV) ranks them high in the few
retrieval heads where dissimilarity may not. DiffSnap keeps both: each (row, KV head) ranks its slots by
each signal, and a slot's priority is its better rank, so the budget is shared by interleaving the two
rankings (the top ``k/2`` of each, then the next ones). The last ``observe`` prompt tokens (the question)
are always kept. During decoding new tokens have no attention score; they compete by dissimilarity.

How it differs from the papers: KeyDiff scores by dissimilarity alone; SnapKV by pooled observation-window
attention alone (and keeps nothing but its selection plus the window); neither combines the two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch

from kvcache.params import ParamInfo
from kvcache.policies.base import POLICY_BASE_PARAMS, Policy
from kvcache.policies.keydiff import dissimilarity
from kvcache.policies.snapkv import OBSERVE, REMEMBER, SnapKV

if TYPE_CHECKING:
    from kvcache.policies.layer import PolicyLayer
    from kvcache.policies.runner import PolicyRunner

__all__ = ["DiffSnap"]


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, T)`` rank of each slot (0 = highest score) within its row and head."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))


@dataclass
class DiffSnap(SnapKV):
    """KeyDiff's ranking interleaved with SnapKV's, the question always kept."""

    name: ClassVar[str] = "diffsnap"
    description: ClassVar[str] = (
        "KeyDiff's most distinctive keys + SnapKV's most attended keys (kvcache's own)"
    )
    params: ClassVar[tuple[ParamInfo, ...]] = (*POLICY_BASE_PARAMS, replace(OBSERVE, default=16), REMEMBER)
    streams: ClassVar[bool] = False

    observe: int = 16

    def score(self, runner: PolicyRunner, layer: PolicyLayer) -> torch.Tensor:
        distinct = _ranks(dissimilarity(layer))
        attended = _ranks(Policy.score(self, runner, layer))
        best = torch.minimum(distinct, attended).to(torch.float32)
        # Higher is kept: the better rank first, the other rank breaking ties.
        return -(best + torch.maximum(distinct, attended).to(torch.float32) / (2 * best.shape[-1] + 1))
