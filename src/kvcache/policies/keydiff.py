"""KeyDiff (Park et al., 2025): keep the keys least similar to the mean key of their head.

Each key is normalised; the anchor is the mean of a (row, head)'s normalised real keys; a key's score is its
negative cosine similarity to the anchor, so distinctive keys are kept. No attention statistics needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvcache.params import ParamInfo
from kvcache.policies.base import POLICY_BASE_PARAMS, Policy

if TYPE_CHECKING:
    from kvcache.policies.layer import PolicyLayer
    from kvcache.policies.runner import PolicyRunner

__all__ = ["KeyDiff", "dissimilarity"]


def dissimilarity(layer: PolicyLayer) -> torch.Tensor:
    """``(B, H_kv, T_held)`` negative cosine similarity of each held key to its (row, head)'s mean normalised
    real key: higher is more distinctive."""
    keys = torch.nn.functional.normalize(layer.held_keys().to(torch.float32), dim=-1)
    valid = (layer.held_positions() >= 0)[..., None]
    anchor = (keys * valid).sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp_min(1)
    anchor = torch.nn.functional.normalize(anchor, dim=-1)
    return -(keys * anchor).sum(dim=-1)


@dataclass
class KeyDiff(Policy):
    """Least similar to the mean key first."""

    name: ClassVar[str] = "keydiff"
    description: ClassVar[str] = "keep the keys least similar to the mean key of their head"
    params: ClassVar[tuple[ParamInfo, ...]] = POLICY_BASE_PARAMS

    def score(self, runner: PolicyRunner, layer: PolicyLayer) -> torch.Tensor:
        return dissimilarity(layer)
