"""What a graph injected with ``--policies`` needs from the host cache, and what it gives back to a policy.

A retention policy keeps different tokens per layer, sequence and KV head, so one 2-D ``attention_mask``
cannot say what each query may attend. Such a graph takes one ``slot_mask.{i}`` per layer instead, built
here from the logical position of every held slot and of the new tokens with the very function the PyTorch
attention uses (:func:`kvcache.masks.slot_mask`: causality, padding, sliding window), so evicting a token is
exactly masking it on both runtimes.

In return the graph outputs every layer's masked attention logits (``attn_logits.{i}``); the policy's
request for the layer (:class:`~kvcache.observe.StatsRequest`) is served from them by the code the PyTorch
attention function runs on its own logits (softmax in float32, :func:`kvcache.observe.select_rows`), layer
after layer, right after the layer's store received the new keys — the order of a PyTorch forward, so a
stochastic score (Keyformer's Gumbel noise) draws the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from kvcache.cache import KVCache
from kvcache.errors import KVCacheError
from kvcache.layers.base import new_positions
from kvcache.masks import query_columns, slot_mask
from kvcache.observe import select_rows

__all__ = ["slot_masks", "wants_logits", "observe_layer"]


def slot_masks(cache: KVCache, valid: torch.Tensor, windows: list[int | None],
               kv_heads: list[int]) -> list[torch.Tensor]:
    """Per layer ``(B, H_kv, S, T_held + S)`` bool: which slot each new token may attend.

    Parameters
    ----------
    cache:
        The host cache before the step's update (the new tokens will be appended after the held slots).
    valid:
        ``(B, S)`` bool, False for padding tokens.
    windows:
        Per layer, the sliding-window width or ``None``.
    kv_heads:
        Per layer, the KV heads (the shape of an empty layer's mask).
    """
    batch, seq = valid.shape
    masks = []
    for store, window, heads in zip(cache.stores, windows, kv_heads, strict=True):
        seen, held = store.seen, store.physical_length
        positions = store.positions
        new = new_positions(seen, seq, valid, batch, heads, valid.device)
        slots = new if positions is None or not held else torch.cat([positions[..., :held], new], dim=-1)
        masks.append(slot_mask(slots, query_columns(seen + seq, seq, valid.device), window))
    return masks


def wants_logits(cache: KVCache) -> bool:
    """Whether the cache's policy will ask any layer for attention statistics in the coming forward."""
    observer = cache.observer
    return observer is not None and any(observer.request(i) is not None for i in range(len(cache.stores)))


def observe_layer(cache: KVCache, layer_idx: int, logits: torch.Tensor, seq: int) -> None:
    """Hand layer ``layer_idx``'s statistics to the cache's observer, as the PyTorch attention does.

    Parameters
    ----------
    logits:
        ``(B, H, S, T)`` masked logits of the layer, ``T`` the slots its store holds after the update.
    seq:
        ``S``, the tokens of this forward.
    """
    observer = cache.observer
    if observer is None:
        return
    request = observer.request(layer_idx)
    if request is None:
        return
    store = cache.stores[layer_idx]
    positions = store.positions
    held = store.physical_length
    if positions is None or logits.shape[-1] != held:
        raise KVCacheError(f"layer {layer_idx}: the graph's attention logits cover {logits.shape[-1]} slots "
                           f"but the cache holds {held}; the graph and the host cache are out of step")
    query_valid = positions[:, 0, held - seq : held] >= 0 if request.rows == "sum" else None
    stats = nn.functional.softmax(logits, dim=-1, dtype=torch.float32) if request.values == "weights" \
        else logits
    observer.observe(layer_idx, select_rows(request, stats, query_valid))
