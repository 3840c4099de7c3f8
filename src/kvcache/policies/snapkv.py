"""SnapKV (Li et al., 2024): the attention of the last ``observe`` prompt queries, pooled, picks per head.

At the end of the prompt, each key's score is the attention the last ``observe`` prompt queries give it
(summed over those queries and over the KV head's query group), smoothed by a 1-D average pool of width 7
over neighbouring keys (so a token's neighbours come with it); the observation window itself is always kept.
The selection is defined on the whole prompt, so it does not compress while the prompt streams in.
During decoding, new tokens have no score: the selected prompt tokens stay and the newest tokens pass through
a recent window of ``observe`` slots — SnapKV's prompt selection followed by StreamingLLM-style decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvcache.observe import StatsRequest
from kvcache.params import ParamInfo
from kvcache.policies.base import POLICY_BASE_PARAMS, Policy

if TYPE_CHECKING:
    from kvcache.policies.layer import PolicyLayer
    from kvcache.policies.runner import PolicyRunner

__all__ = ["SnapKV"]

OBSERVE = ParamInfo("observe", "int", 32, "a whole number >= 1", lambda v: v >= 1,
                    "last prompt queries whose attention selects the tokens")
#: width of the average pool over neighbouring keys (SnapKV's kernel size)
POOL = 7


@dataclass
class SnapKV(Policy):
    """Observation-window attention, pooled."""

    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV: attention of the last prompt queries, pooled, picks tokens per head"
    params: ClassVar[tuple[ParamInfo, ...]] = (*POLICY_BASE_PARAMS, OBSERVE)
    streams: ClassVar[bool] = False

    observe: int = 32

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        return budget.clamp(max=self.observe)

    def request(self, runner: PolicyRunner, layer_idx: int) -> StatsRequest | None:
        return StatsRequest("weights", "last", last=self.observe) if runner.phase == "prefill" else None

    def accumulate(self, runner: PolicyRunner, layer: PolicyLayer, stats: torch.Tensor) -> None:
        votes = stats.sum(dim=2)  # (B, H_kv, T_kv): the observation window's attention per key
        b, h, t = votes.shape
        pooled = torch.nn.functional.avg_pool1d(votes.reshape(b * h, 1, t), POOL, stride=1, padding=POOL // 2,
                                                count_include_pad=False)
        layer.set_scores(pooled.reshape(b, h, t))
