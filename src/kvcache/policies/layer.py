"""A store wrapper that carries a policy's per-slot state along with the slots it describes.

Accumulated scores live next to the keys they score: appended (as zeros) when tokens arrive, gathered with
the same indices when ``keep`` drops slots, re-indexed with the batch (beam search), cropped and reset with
the store, so they can never drift out of line with their keys. The row budgets, fixed once the prompt is
in, follow the batch the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvcache.errors import KVCacheError
from kvcache.layers.base import CacheLayer, LayerWrapper

if TYPE_CHECKING:
    from kvcache.policies.runner import PolicyRunner

__all__ = ["PolicyLayer"]


class PolicyLayer(LayerWrapper):
    """Wraps any store with a retention policy's state.

    Attributes
    ----------
    scores:
        ``(B, H_kv, T_held)`` float32 running scores of the held slots, or ``None`` while empty.
    budget:
        ``(B,)`` int64 real tokens each row keeps, fixed at the first eviction (``None`` before).
    pruned:
        The prompt-time selection has run (decode-time evictions follow every ``every`` steps).
    runner:
        The :class:`~kvcache.policies.runner.PolicyRunner` that decides when to evict (set by it).
    """

    def __init__(self, inner: CacheLayer) -> None:
        super().__init__(inner)
        self.scores: torch.Tensor | None = None
        self.budget: torch.Tensor | None = None
        self.pruned = False
        self.runner: PolicyRunner | None = None

    # ----- the store contract, with the state kept in line ----------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.runner is not None:
            self.runner.before_update(self, key.shape[2])
        out = self.inner.update(key, value, valid)
        new = key.shape[2]
        self._follow(self.inner.take_relayout())
        held = self.inner.physical_length - new
        zeros = torch.zeros(key.shape[0], key.shape[1], new, dtype=torch.float32, device=key.device)
        self.scores = zeros if self.scores is None or not held else torch.cat([self.scores, zeros], dim=-1)
        return out

    def release(self) -> None:
        if self.runner is not None:
            self.runner.before_release(self)
        self.inner.release()
        self._follow(self.inner.take_relayout())

    def _follow(self, order: torch.Tensor | None) -> None:
        """The store moved its slots on its own: the scores move with them."""
        if order is not None and self.scores is not None:
            self.scores = self.scores.gather(-1, order.to(self.scores.device))

    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        order = self.inner.keep(indices, invalid)
        if self.scores is not None:
            self.scores = self.scores.gather(-1, order.to(self.scores.device))
        return order

    def index_batch(self, index: torch.Tensor) -> None:
        self.inner.index_batch(index)
        if self.scores is not None:
            self.scores = self.scores.index_select(0, index.to(self.scores.device))
        if self.budget is not None:
            self.budget = self.budget.index_select(0, index.to(self.budget.device))

    def crop(self, length: int) -> None:
        self.inner.crop(length)
        if self.scores is not None:
            self.scores = self.scores[..., :length]

    def reset(self) -> None:
        self.inner.reset()
        self.scores = self.budget = None
        self.pruned = False

    # ----- saving and restoring ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The inner store's state (``inner.*``), ``pruned`` and, when set, ``scores`` and ``budget``."""
        state = {f"inner.{k}": v for k, v in self.inner.state_tensors().items()}
        state["pruned"] = torch.tensor(self.pruned)
        if self.scores is not None:
            state["scores"] = self.scores.clone()
        if self.budget is not None:
            state["budget"] = self.budget.clone()
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state({k[len("inner."):]: v for k, v in state.items() if k.startswith("inner.")})
        device = self.inner.device
        scores, budget = state.get("scores"), state.get("budget")
        held = self.inner.physical_length
        if held and (scores is None or tuple(scores.shape) != (self.inner.batch_size,
                                                                self.held_positions().shape[1], held)):
            shape = None if scores is None else tuple(scores.shape)
            raise KVCacheError(
                f"the saved policy scores {shape} do not match the {held} slots the layer holds; "
                "the file is damaged or was written for another policy"
            )
        self.scores = None if scores is None or not held else scores.to(device, torch.float32).clone()
        self.budget = None if budget is None else budget.to(device, torch.long).clone()
        self.pruned = bool(state.get("pruned", torch.tensor(False)))

    # ----- what policies read and write ----------------------------------------------------------------
    def held_positions(self) -> torch.Tensor:
        """``(B, H_kv, T_held)`` logical positions of the held slots (``-1``: no real token)."""
        positions = self.inner.positions
        assert positions is not None, "held_positions() on an empty layer"
        return positions[..., : self.inner.physical_length]

    def held_keys(self) -> torch.Tensor:
        """``(B, H_kv, T_held, D)`` keys of the held slots."""
        kv = self.inner.keys_values()
        assert kv is not None, "held_keys() on an empty layer"
        return kv[0]

    def add_scores(self, stats: torch.Tensor) -> None:
        """Add ``(B, H_kv, T_kv)`` statistics (``T_kv`` >= slots held: a preallocated buffer reports all its
        slots) to the running scores."""
        if self.scores is not None:
            self.scores = self.scores + stats[..., : self.scores.shape[-1]].to(torch.float32)

    def set_scores(self, stats: torch.Tensor) -> None:
        """Replace the running scores by ``(B, H_kv, T_kv)`` statistics (policies that look only at now)."""
        if self.scores is not None:
            self.scores = stats[..., : self.scores.shape[-1]].to(torch.float32).clone()
