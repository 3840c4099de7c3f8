"""Keyformer (Adnan et al., MLSys 2024): key tokens by a Gumbel-regularised accumulated score + recent window.

The score of a key is the sum, over every query that has seen it, of ``softmax((x + g) / tau)`` where ``x``
are the masked attention logits the model used and ``g ~ Gumbel(0, 1)`` fresh noise per entry — used for
scoring only; attention itself uses the plain softmax. The temperature moves linearly from ``tau_init`` at
the prompt to ``tau_end`` at the last new token (``tau_t = tau_init + t * (tau_end - tau_init) / n_new``,
``t`` the decode step). A row keeps its budget: the ``window`` share of it for the most recent tokens, the
rest for the top-scoring "key tokens"; the prompt is selected once it is in, then one token in, one out at
every decode step. Unlike the reference code, selection is per sequence and per KV head (the reference sums
the score over the batch) and evicted tokens are freed, not masked.
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

__all__ = ["Keyformer", "gumbel_scores", "temperature"]

TAU = ParamInfo(
    "tau", "range", (1.0, 2.0), "numbers > 0, START-END or one value", lambda v: v[0] > 0 and v[1] > 0,
    "Gumbel-softmax temperature, from tau_init at the prompt to tau_end at the last new token",
)


def temperature(tau: tuple[float, float], step: int, max_new_tokens: int | None) -> float:
    """``tau_init + step * (tau_end - tau_init) / max_new_tokens`` (``tau_init`` if the length is unknown)."""
    if not max_new_tokens:
        return tau[0]
    return tau[0] + step * (tau[1] - tau[0]) / max_new_tokens


def gumbel_scores(logits: torch.Tensor, noise: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax((logits + noise) / tau)`` over the keys, in float32.

    Parameters
    ----------
    logits:
        ``(B, H, T_q, T_kv)`` masked attention logits (masked entries at the dtype's minimum stay at 0).
    noise:
        Gumbel(0, 1) samples of the same shape.
    """
    return torch.softmax((logits.to(torch.float32) + noise) / tau, dim=-1)


def gumbel_noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) samples ``-log(-log(U))``, ``U`` uniform in (0, 1)."""
    tiny = torch.finfo(torch.float32).tiny
    uniform = torch.rand(shape, generator=generator, device=device).clamp_(tiny, 1.0 - 1e-7)
    return -torch.log(-torch.log(uniform))


@dataclass
class Keyformer(Policy):
    """Keyformer's key-token selection (see the module docstring)."""

    name: ClassVar[str] = "keyformer"
    description: ClassVar[str] = (
        "key tokens by a Gumbel-regularised accumulated attention score + recent window"
    )
    params: ClassVar[tuple[ParamInfo, ...]] = (*POLICY_BASE_PARAMS, window_param(0.3), TAU)

    window: float = 0.3
    tau: tuple[float, float] = (1.0, 2.0)

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        return torch.floor(budget.to(torch.float64) * self.window + 1e-9).to(torch.long)

    def request(self, runner: PolicyRunner, layer_idx: int) -> StatsRequest:
        tau = temperature(self.tau, runner.decode_step, runner.max_new_tokens)

        def perturbed(logits: torch.Tensor) -> torch.Tensor:
            noise = gumbel_noise(logits.shape, runner.random(logits.device), logits.device)
            return gumbel_scores(logits, noise, tau)

        return StatsRequest("logits", "sum", transform=perturbed)
