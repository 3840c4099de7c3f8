"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention + a recent window.

The score of a key is the attention it has received, summed over every (real) query that has seen it and
over the query heads of its KV head. A row keeps its budget: the ``window`` share for the most recent
tokens, the rest for the heaviest hitters; the prompt is selected once it is in, then one in, one out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvcache.observe import StatsRequest
from kvcache.params import ParamInfo
from kvcache.policies.base import POLICY_BASE_PARAMS, Policy, window_param

if TYPE_CHECKING:
    from kvcache.policies.runner import PolicyRunner

__all__ = ["H2O"]


@dataclass
class H2O(Policy):
    """Heavy-hitter oracle: accumulated attention + recent window."""

    name: ClassVar[str] = "h2o"
    description: ClassVar[str] = "heavy hitters (accumulated attention) + recent window"
    params: ClassVar[tuple[ParamInfo, ...]] = (*POLICY_BASE_PARAMS, window_param(0.1))

    window: float = 0.1

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        return torch.floor(budget.to(torch.float64) * self.window + 1e-9).to(torch.long)

    def request(self, runner: PolicyRunner, layer_idx: int) -> StatsRequest:
        return StatsRequest("weights", "sum")
