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
    keys = layer.held_keys().to(torch.float32)
    norms = torch.linalg.vector_norm(keys, dim=-1).clamp_min(1e-12)  # (B, H, T)
    # The mean of the real keys' unit vectors without materialising them: sum_t (valid_t / |k_t|) k_t
    weights = (layer.held_positions() >= 0).to(torch.float32) / norms
    anchor = torch.nn.functional.normalize(torch.matmul(weights[:, :, None, :], keys), dim=-1)  # (B, H, 1, D)
    return -torch.matmul(keys, anchor.transpose(-1, -2))[..., 0] / norms


@dataclass
class KeyDiff(Policy):
    """Least similar to the mean key first."""

    name: ClassVar[str] = "keydiff"
    description: ClassVar[str] = "keep the keys least similar to the mean key of their head"
    params: ClassVar[tuple[ParamInfo, ...]] = POLICY_BASE_PARAMS

    def score(self, runner: PolicyRunner, layer: PolicyLayer) -> torch.Tensor:
        return dissimilarity(layer)
