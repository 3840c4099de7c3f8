"""The shared selection: top-k per (sequence, KV head) under per-row budgets, recent window, padding last.

Every (row, head) keeps the same number of slots so tensors stay rectangular: the largest row budget. A row
with a smaller budget keeps its own budget of real tokens; the rest of its slots are kept *invalid* (never
attended), which is exactly evicting them (docs/spec.md, "Budgets").
"""

from __future__ import annotations

import torch

__all__ = ["select"]


def select(scores: torch.Tensor, positions: torch.Tensor, budget: torch.Tensor,
           recent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slots to keep.

    Parameters
    ----------
    scores:
        ``(B, H_kv, T)`` policy scores of the held slots (higher is kept first).
    positions:
        ``(B, H_kv, T)`` logical positions; ``-1`` for slots without a real token, which rank below every
        real token.
    budget:
        ``(B,)`` real tokens each row keeps.
    recent:
        ``(B,)`` of each row's budget reserved for its most recent real tokens (kept whatever their score).

    Returns
    -------
    indices:
        ``(B, H_kv, n)`` slot indices, ``n = min(T, max(budget))``, in descending priority.
    invalid:
        ``(B, H_kv, n)`` bool, True for slots beyond the row's budget or without a real token.
    """
    b, h, t = scores.shape
    n = min(t, int(budget.max()))
    valid = positions >= 0
    pos = positions.to(torch.long)
    # Rank of each slot among its row's real tokens, newest first (0 = newest).
    newest_first = torch.where(valid, pos, torch.full_like(pos, -1)).argsort(dim=-1, descending=True)
    age = torch.empty_like(newest_first).scatter_(-1, newest_first, torch.arange(t, device=scores.device)
                                                  .expand(b, h, t))
    in_window = valid & (age < recent.to(scores.device)[:, None, None])
    # Priority: recent window first, then by score; padding and invalid slots last.
    key = scores.to(torch.float32).clone()
    key = torch.where(in_window, torch.full_like(key, float("inf")), key)
    key = torch.where(valid, key, torch.full_like(key, float("-inf")))
    # Stable tie-breaking towards the newer token: sort by position first, then stably by priority.
    order = pos.argsort(dim=-1, descending=True, stable=True)
    ranked = key.gather(-1, order).argsort(dim=-1, descending=True, stable=True)
    indices = order.gather(-1, ranked)[..., :n]
    rank = torch.arange(n, device=scores.device).expand(b, h, n)
    invalid = (rank >= budget.to(scores.device)[:, None, None]) | ~valid.gather(-1, indices)
    return indices, invalid
