"""TOVA (Oren et al., 2024): keep the tokens the current query attends to most.

At every step the score of each key is the attention the newest query gives it (summed over the KV head's
query group); at the prompt, the last prompt query's. No recent window: the newest token competes like the
others.
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

__all__ = ["TOVA"]


@dataclass
class TOVA(Policy):
    """Token omission via attention: the current query's weights."""

    name: ClassVar[str] = "tova"
    description: ClassVar[str] = "TOVA: evict the token the current query attends to least"
    params: ClassVar[tuple[ParamInfo, ...]] = POLICY_BASE_PARAMS

    def request(self, runner: PolicyRunner, layer_idx: int) -> StatsRequest:
        return StatsRequest("weights", "last", last=1)

    def accumulate(self, runner: PolicyRunner, layer: PolicyLayer, stats: torch.Tensor) -> None:
        layer.set_scores(stats[:, :, -1])
