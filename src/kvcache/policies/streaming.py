"""StreamingLLM (Xiao et al., 2024): the first ``sinks`` tokens ("attention sinks") + the most recent ones.

Needs no attention statistics. The sinks are each row's first real tokens (left padding is not a sink).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvcache.params import ParamInfo
from kvcache.policies.base import POLICY_BASE_PARAMS, Policy

if TYPE_CHECKING:
    from kvcache.policies.layer import PolicyLayer
    from kvcache.policies.runner import PolicyRunner

__all__ = ["Streaming"]

SINKS = ParamInfo("sinks", "int", 4, "a whole number >= 0", lambda v: v >= 0,
                  "first tokens always kept (attention sinks)")


@dataclass
class Streaming(Policy):
    """Sinks + recent window."""

    name: ClassVar[str] = "streaming"
    description: ClassVar[str] = "StreamingLLM: first sink tokens + recent window"
    params: ClassVar[tuple[ParamInfo, ...]] = (*POLICY_BASE_PARAMS, SINKS)

    sinks: int = 4

    @staticmethod
    def validate(params: dict[str, Any]) -> None:
        if params["tokens"] is not None and params["sinks"] >= params["tokens"]:
            raise ValueError(
                f"sinks={params['sinks']} leaves no room for recent tokens under tokens={params['tokens']}; "
                "use fewer sinks or a larger tokens cap"
            )

    def score(self, runner: PolicyRunner, layer: PolicyLayer) -> torch.Tensor:
        positions = layer.held_positions().to(torch.long)
        valid = positions >= 0
        # Newer is better; the `sinks` oldest real tokens of each (row, head) come first of all.
        oldest_first = torch.where(valid, positions, torch.full_like(positions, torch.iinfo(torch.long).max))
        order = oldest_first.argsort(dim=-1)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))
        score = positions.to(torch.float32)
        return torch.where(valid & (rank < self.sinks), torch.full_like(score, float("inf")), score)
