"""Key-norm (Devoto et al., 2024): keep the tokens whose keys have the lowest L2 norm; needs no statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvcache.params import ParamInfo
from kvcache.policies.base import POLICY_BASE_PARAMS, Policy

if TYPE_CHECKING:
    from kvcache.policies.layer import PolicyLayer
    from kvcache.policies.runner import PolicyRunner

__all__ = ["KNorm"]


@dataclass
class KNorm(Policy):
    """Lowest key norm first."""

    name: ClassVar[str] = "knorm"
    description: ClassVar[str] = "keep the tokens whose keys have the lowest norm"
    params: ClassVar[tuple[ParamInfo, ...]] = POLICY_BASE_PARAMS

    def score(self, runner: PolicyRunner, layer: PolicyLayer) -> torch.Tensor:
        return -layer.held_keys().to(torch.float32).norm(dim=-1)
