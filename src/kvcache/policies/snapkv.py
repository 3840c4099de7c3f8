"""SnapKV (Li et al., 2024): the attention of the last ``observe`` prompt queries, pooled, picks per head.

At the end of the prompt, each key's score is the attention the last ``observe`` prompt queries give it
(summed over those queries and over the KV head's query group), smoothed by a 1-D average pool of width 7
over neighbouring keys (so a token's neighbours come with it); the observation window itself is always kept.
The selection is defined on the whole prompt, so it does not compress while the prompt streams in.
During decoding, new tokens have no score: the selected prompt tokens stay and the newest tokens pass through
a recent window of ``observe`` slots — SnapKV's prompt selection followed by StreamingLLM-style decoding.

Across the turns of a conversation each turn's prefill selects again. By default only the latest window votes
(SnapKV as published: what the current turn does not attend to goes). With ``remember=1`` a slot keeps the
largest vote any turn's window gave it — the window at the end of each prompt, so a long prompt read in
chunks is scored as with ``remember=0`` — and what an earlier turn asked about stays as long as it out-votes
the rest.
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
REMEMBER = ParamInfo("remember", "int", 0, "0 or 1", lambda v: v in (0, 1),
                     "1: a token keeps the largest vote any turn's observation window gave it; 0: only the "
                     "latest window votes")
#: width of the average pool over neighbouring keys (SnapKV's kernel size)
POOL = 7


@dataclass
class SnapKV(Policy):
    """Observation-window attention, pooled."""

    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV: attention of the last prompt queries, pooled, picks tokens per head"
    params: ClassVar[tuple[ParamInfo, ...]] = (*POLICY_BASE_PARAMS, OBSERVE, REMEMBER)
    streams: ClassVar[bool] = False

    observe: int = 32
    remember: int = 0

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        return budget.clamp(max=self.observe)

    def request(self, runner: PolicyRunner, layer_idx: int) -> StatsRequest | None:
        if runner.phase != "prefill" or (self.remember and not runner.last_prefill_chunk):
            return None
        return StatsRequest("weights", "last", last=self.observe)

    def accumulate(self, runner: PolicyRunner, layer: PolicyLayer, stats: torch.Tensor) -> None:
        votes = stats.sum(dim=2)  # (B, H_kv, T_kv): the observation window's attention per key
        b, h, t = votes.shape
        pooled = torch.nn.functional.avg_pool1d(votes.reshape(b * h, 1, t), POOL, stride=1, padding=POOL // 2,
                                                count_include_pad=False)
        pooled = pooled.reshape(b, h, t)
        if self.remember and layer.scores is not None:  # earlier turns' votes stay (new slots hold zeros)
            votes = pooled[..., : layer.scores.shape[-1]].to(torch.float32)
            layer.scores = torch.maximum(layer.scores, votes)
        else:
            layer.set_scores(pooled)
