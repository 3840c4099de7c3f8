"""Attention masks built from the logical position of every cached slot, per sequence and per KV head.

Before any eviction, slot ``i`` of every head holds the token of column ``i`` (shifted by the tokens
evicted), and transformers' own mask builders are right. Once a retention policy has kept different slots
per sequence and per head, the mask must come from the slots themselves: a query at column ``c`` may attend
slot ``s`` of head ``h`` iff the slot holds a real token (``position >= 0``) that is not in the future
(``position <= c``) and, for a sliding-window layer of width ``W``, not too old (``position > c - W``, as
transformers' sliding-window masks define it). That is what makes evicting a token exactly masking it.
"""

from __future__ import annotations

import torch

__all__ = ["query_columns", "slot_mask"]


def query_columns(seen: int | torch.Tensor, t_q: int, device: torch.device) -> torch.Tensor:
    """``(T_q,)`` columns of the newest ``t_q`` tokens of a layer that has seen ``seen`` tokens.

    Parameters
    ----------
    seen:
        Tokens seen by the layer after the update that stored the queries' own keys (a 0-d device tensor
        inside a compiled step).
    """
    return torch.arange(t_q, device=device) + (seen - t_q)


def slot_mask(positions: torch.Tensor, columns: torch.Tensor,
              sliding_window: int | None = None) -> torch.Tensor:
    """Which slots each query may attend.

    Parameters
    ----------
    positions:
        ``(B, H_kv, T_kv)`` logical index of every slot, ``-1`` for slots without a real token.
    columns:
        ``(T_q,)`` columns of the queries.
    sliding_window:
        Width of a sliding-window layer, ``None`` for full attention.

    Returns
    -------
    ``(B, H_kv, T_q, T_kv)`` bool, True where attention is allowed.
    """
    pos = positions[:, :, None, :].to(torch.long)
    cols = columns.to(torch.long)[None, None, :, None]
    allowed = (pos >= 0) & (pos <= cols)
    if sliding_window is not None:
        allowed &= pos > cols - sliding_window
    return allowed
