"""What a retention policy is: a small dataclass that declares its parameters, the phases it acts in, the
attention statistics it needs, and how it scores the slots of one layer (higher = keep).

Everything shared lives elsewhere: the budget arithmetic and the top-k per (sequence, KV head)
(:mod:`kvcache.policies.select`), the per-slot running state that follows ``keep``/``index_batch``
(:mod:`kvcache.policies.layer`), and when to evict (:mod:`kvcache.policies.runner`). A policy never knows how
K/V are stored; it reads keys (``layer.keys_values()``), slot positions and its own accumulated scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvcache.observe import StatsRequest
from kvcache.params import ParamInfo

if TYPE_CHECKING:
    from kvcache.policies.layer import PolicyLayer
    from kvcache.policies.runner import PolicyRunner

__all__ = ["BUDGET", "EVERY", "MIN_TOKENS", "POLICY_BASE_PARAMS", "TOKENS", "Policy", "window_param"]

BUDGET = ParamInfo(
    "budget", "float", 0.5, "a fraction in (0, 1]", lambda v: 0 < v <= 1,
    "tokens kept per row, as a fraction of that row's prompt (give budget or tokens, not both)",
)
TOKENS = ParamInfo(
    "tokens", "int", None, "a whole number >= 1", lambda v: v >= 1,
    "tokens kept per row, as an absolute cap (replaces budget)",
)
MIN_TOKENS = ParamInfo(
    "min_tokens", "int", None, "a whole number >= 1", lambda v: v >= 1,
    "a floor under a fractional budget: a row holds at least this many tokens, so nothing is evicted until "
    "it has seen more (a short prompt, the first turns of a conversation)",
)
EVERY = ParamInfo(
    "every", "int", 1, "a whole number >= 1", lambda v: v >= 1,
    "decode steps between evictions: the cache grows to budget + every - 1 in between",
)
#: the parameters every policy takes
POLICY_BASE_PARAMS: tuple[ParamInfo, ...] = (BUDGET, TOKENS, MIN_TOKENS, EVERY)


def window_param(default: float) -> ParamInfo:
    """The ``window`` parameter: the share of the kept tokens reserved for the most recent ones."""
    return ParamInfo(
        "window", "float", default, "a fraction in [0, 1)", lambda v: 0 <= v < 1,
        "share of the kept tokens reserved for the most recent ones",
    )


@dataclass
class Policy:
    """A retention policy: which slots of a layer to keep.

    Subclasses set the class attributes and override :meth:`score` (and :meth:`request` /
    :meth:`accumulate` when they read attention). Parameters are dataclass fields whose names match
    :attr:`params`.

    Attributes
    ----------
    budget, tokens:
        The per-row budget: a fraction of the row's prompt, or an absolute cap (docs/spec.md, "Budgets").
    min_tokens:
        Floor under a fractional budget (``None``: none).
    every:
        Decode steps between evictions.
    """

    #: spec name
    name: ClassVar[str] = ""
    #: one line for ``kvcache info`` and docs/spec.md
    description: ClassVar[str] = ""
    #: the parameters a spec may set, declared once, here
    params: ClassVar[tuple[ParamInfo, ...]] = POLICY_BASE_PARAMS
    #: phases in which the policy evicts: "prefill" (once the prompt is in), "decode" (every ``every`` steps)
    phases: ClassVar[frozenset[str]] = frozenset({"prefill", "decode"})
    #: may evict between prefill chunks (compress a long prompt while it streams in); a policy whose prompt
    #: selection is defined on the whole prompt (SnapKV's observation window) says no
    streams: ClassVar[bool] = True

    budget: float | None = 0.5
    tokens: int | None = None
    min_tokens: int | None = None
    every: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Policy:
        """Build from a spec part's filled-in parameters."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @staticmethod
    def validate(params: dict[str, Any]) -> None:
        """Cross-parameter check on the filled-in parameters; raises ``ValueError``."""

    # ----- budget -------------------------------------------------------------------------------------
    def row_budget(self, prompt_tokens: int) -> int:
        """Slots a row with ``prompt_tokens`` real prompt tokens keeps: ``tokens``, else the ``budget``
        fraction of them, never below ``min_tokens`` (a row below the floor evicts nothing, and grows to it
        while decoding before it evicts)."""
        if self.tokens is not None:
            return self.tokens
        assert self.budget is not None
        return max(1, self.min_tokens or 1, math.ceil(self.budget * prompt_tokens - 1e-9))

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        """``(B,)`` slots of each row's budget reserved for its most recent tokens (none by default)."""
        return torch.zeros_like(budget)

    # ----- statistics ---------------------------------------------------------------------------------
    def request(self, runner: PolicyRunner, layer_idx: int) -> StatsRequest | None:
        """The attention statistics this policy needs from ``layer_idx`` in the current forward."""
        return None

    def accumulate(self, runner: PolicyRunner, layer: PolicyLayer, stats: torch.Tensor) -> None:
        """Fold one forward's statistics, reduced to ``(B, H_kv, T_kv)``, into the layer's running scores
        (default: add them)."""
        layer.add_scores(stats)

    # ----- selection ----------------------------------------------------------------------------------
    def score(self, runner: PolicyRunner, layer: PolicyLayer) -> torch.Tensor:
        """``(B, H_kv, T_held)`` float scores of the held slots: higher is kept first. Slots without a real
        token and the recent window are handled by the selection, whatever their score. Default: the
        running scores :meth:`accumulate` built from attention."""
        assert layer.scores is not None, "score() on an empty layer"
        return layer.scores
