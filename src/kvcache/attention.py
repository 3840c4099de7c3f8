"""kvcache's attention function, registered with transformers' ``AttentionInterface`` as ``"kvcache"``.

It does three things transformers' own functions cannot, and nothing more when none is needed:

* **Masks from slot positions.** Once a retention policy has kept different slots per sequence and per KV
  head, the mask transformers builds (one per batch, indexed by column) is wrong; the mask is then built
  from the layer's per-slot positions (:mod:`kvcache.masks`), per KV head, with causality, padding and the
  layer's sliding window.
* **Attention statistics in the same pass.** When the cache's observer requests statistics for a layer
  (:class:`~kvcache.observe.StatsRequest`), the softmax math runs here and hands over exactly what was
  asked (logits or weights; all rows, the last rows, or their sum), from the logits the model used.
* **Reporting.** It tells the cache that the layer was served, so a layer that needed it and was not served
  (a model without ``kvcache.enable``) raises instead of silently attending evicted slots.

Otherwise (no statistics requested, no softcap) it calls transformers' SDPA attention with the mask it was
given, so a dense cache pays nothing for it.

Nothing is registered at import time. :func:`enable` registers the function (once) and switches one model
to it; the returned handle restores the model's previous implementation, also as a context manager::

    with kvcache.enable(model):
        model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvcache.cache import CACHE_KWARG, KVCache
from kvcache.errors import KVCacheError
from kvcache.masks import query_columns, slot_mask
from kvcache.observe import StatsRequest, select_rows

__all__ = ["ATTENTION_NAME", "AttentionHandle", "enable", "kvcache_attention"]

#: The name under which the function is registered (``config._attn_implementation``).
ATTENTION_NAME = "kvcache"


def kvcache_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention over the cached keys, with per-slot masks and attention statistics.

    Parameters
    ----------
    module:
        The calling attention module (``module.layer_idx`` names the layer; ``module.training`` gates
        dropout).
    query:
        ``(B, H, T_q, D)``.
    key, value:
        ``(B, H_kv, T_kv, D)`` as returned by the cache, ``H`` a multiple of ``H_kv`` (GQA).
    attention_mask:
        transformers' mask for this layer type (built for ``"kvcache"`` by its SDPA mask builder): a boolean
        ``(B, 1, T_q, T_kv)`` mask (True = attend), an additive float mask, or ``None`` (causal).
    scaling:
        Logit scale; ``D ** -0.5`` when not given.
    dropout:
        Dropout probability on the weights, applied only when ``module.training``.
    softcap:
        Logit soft-capping ``tanh(x / softcap) * softcap`` (Gemma-2 style), applied before the mask.
    kwargs:
        Other attention keyword arguments of the model (``sliding_window``, positions, ...). The cache
        arrives here under :data:`kvcache.cache.CACHE_KWARG`.

    Returns
    -------
    output:
        ``(B, T_q, H, D)``.
    weights:
        ``(B, H, T_q, T_kv)`` softmax weights when the softmax ran here, else ``None``.
    """
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise KVCacheError(
                f"the model passes attention sinks ({name}), which the kvcache attention function does not "
                "implement; run this model without kvcache.enable()"
            )
    b, h, t_q, d = query.shape
    h_kv, t_kv = key.shape[1], key.shape[2]
    if h % h_kv:
        raise KVCacheError(f"{h} query heads are not a multiple of {h_kv} key/value heads")
    cache: KVCache | None = kwargs.pop(CACHE_KWARG, None)
    request: StatsRequest | None = None
    query_valid: torch.Tensor | None = None
    if cache is not None:
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int):
            raise KVCacheError(
                f"{type(module).__name__} has no integer layer_idx, so the kvcache attention function cannot "
                "tell which cache layer it serves"
            )
        store = cache.stores[layer_idx]
        positions = store.positions
        if positions is not None:
            if positions.shape[-1] != t_kv:
                raise KVCacheError(
                    f"layer {layer_idx}: attention got {t_kv} keys but the cache layer returned "
                    f"{positions.shape[-1]} slots; the model changed the cached keys on their way"
                )
            if cache.validity_unknown and attention_mask is not None and t_q > 1 and not store.slots_remapped:
                _mark_padding(positions, attention_mask, _new_slots(store, t_q))
            if store.slots_remapped:
                columns = query_columns(_seen(store), t_q, query.device)
                window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
                attention_mask = _expand_heads(slot_mask(positions, columns, window), h // h_kv)
        if cache.observer is not None:
            request = cache.observer.request(layer_idx)
            if request is not None and request.rows == "sum" and positions is not None:
                query_valid = positions[:, 0, _new_slots(store, t_q)] >= 0
        cache.attention_reported(layer_idx)
    if request is None and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out, weights, logits = _softmax_attention(module, query, key, value, attention_mask, scaling, dropout,
                                              softcap)
    if request is not None and cache is not None and cache.observer is not None:  # a request came from it
        stats = weights if request.values == "weights" else logits
        cache.observer.observe(layer_idx, select_rows(request, stats, query_valid))
    return out, weights


def _softmax_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None, dropout: float, softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager math: ``(B, T_q, H, D)`` output, ``(B, H, T_q, T_kv)`` weights and masked logits."""
    b, h, t_q, d = query.shape
    h_kv, t_kv = key.shape[1], key.shape[2]
    n_rep = h // h_kv
    if scaling is None:
        scaling = d**-0.5
    # GQA without repeating K/V: fold each KV head's group of query heads into the query-length axis, so
    # one batched matmul per KV head serves the whole group. Query head j*n_rep + r belongs to KV head j,
    # the grouping transformers' repeat_kv uses.
    q = query.reshape(b, h_kv, n_rep * t_q, d)
    logits = torch.matmul(q, key.transpose(-1, -2)).view(b, h, t_q, t_kv) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None and t_q > 1:
        # transformers leaves the mask out when plain causality (T_q == T_kv) is all there is
        attention_mask = torch.ones(t_q, t_kv, dtype=torch.bool, device=query.device).tril(t_kv - t_q)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask
    weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(probs.view(b, h_kv, n_rep * t_q, t_kv), value)
    return out.view(b, h, t_q, value.shape[-1]).transpose(1, 2).contiguous(), weights, logits


def _seen(store: Any) -> int | torch.Tensor:
    """Tokens the layer has seen, as a device tensor inside a compiled step when the store keeps one."""
    if torch.compiler.is_compiling():
        seen = store.seen_tensor()
        if seen is not None:
            return seen
    return store.seen


def _expand_heads(mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, H_kv, T_q, T_kv)`` -> ``(B, H, T_q, T_kv)``: query head ``j * n_rep + r`` uses KV head ``j``."""
    if n_rep == 1:
        return mask
    b, h_kv, t_q, t_kv = mask.shape
    return mask[:, :, None].expand(b, h_kv, n_rep, t_q, t_kv).reshape(b, h_kv * n_rep, t_q, t_kv)


def _new_slots(store: Any, t_q: int) -> slice:
    """The slots holding the newest ``t_q`` tokens: stores append after the slots they hold."""
    held = store.physical_length
    return slice(held - t_q, held)


def _mark_padding(positions: torch.Tensor, attention_mask: torch.Tensor, new: slice) -> None:
    """Give the new slots of padding tokens position -1, read off transformers' mask.

    Used when nobody announced the tokens' validity (``model.generate``, not kvcache's driver), before any
    ``keep``: transformers' mask then indexes slots as they are, and a padding token is exactly one whose own
    slot is masked in its own query row (causality always allows the diagonal; only padding removes it).

    Parameters
    ----------
    positions:
        ``(B, H_kv, T_kv)`` the layer's live slot positions (updated in place).
    attention_mask:
        ``(B or 1, 1, T_q, T_kv)`` boolean (True = attend) or additive float mask.
    """
    t_q = new.stop - new.start
    own = attention_mask[:, 0, torch.arange(t_q), torch.arange(new.start, new.stop)]  # (B, T_q)
    valid = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    if not bool(valid.all()):
        positions[:, :, new].masked_fill_(~valid.expand(positions.shape[0], -1)[:, None, :], -1)


def _register() -> None:
    """Register the attention function and its mask builder under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvcache_attention)
    # transformers builds no mask at all for an implementation without a mask builder; the eager builder
    # SDPA builder gives the boolean mask (or None for plain causality) that kvcache_attention takes.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _configs(model: PreTrainedModel) -> Iterator[PretrainedConfig]:
    """Every distinct config of the model: its own, its sub-configs (any depth), its sub-models'."""
    seen: set[int] = set()
    stack: list[PretrainedConfig] = [model.config]
    stack += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        yield config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)


class AttentionHandle:
    """Switches a model back to its previous attention implementation; also a context manager.

    Returned by :func:`enable`. :meth:`disable` (or leaving the ``with`` block) restores exactly what each
    of the model's configs had before; calling it twice is harmless.
    """

    def __init__(self, model: PreTrainedModel, previous: list[tuple[PretrainedConfig, Any]]) -> None:
        self.model = model
        self._previous = previous
        self.active = True

    def disable(self) -> None:
        """Restore the previous attention implementation of the model and its sub-models."""
        if not self.active:
            return
        for config, implementation in self._previous:
            # The internal attribute, as transformers' own set_attn_implementation does: the public setter
            # would re-dispatch to sub-configs, which are restored individually here.
            config._attn_implementation_internal = implementation
        self.active = False

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disable()

    def __repr__(self) -> str:
        return f"AttentionHandle({type(self.model).__name__}, active={self.active})"


def enable(model: PreTrainedModel) -> AttentionHandle:
    """Switch ``model`` (and its sub-models) to the kvcache attention function.

    Parameters
    ----------
    model:
        A transformers model whose attention goes through ``AttentionInterface`` (Llama, Mistral, Qwen2,
        Phi-3, Gemma, GPT-2, GPT-NeoX, GPT-J, CodeGen, OPT, ...).

    Returns
    -------
    AttentionHandle
        Call ``.disable()`` or use it in a ``with`` block to restore the previous implementation.

    Raises
    ------
    KVCacheError
        If the model is not a transformers model, or its architecture does not dispatch attention through
        ``AttentionInterface`` (GPT-Neo, BLOOM, MPT; GPT-J and CodeGen before transformers 5.24); nothing is
        changed then.
    """
    if not isinstance(model, PreTrainedModel):
        raise KVCacheError(
            f"kvcache.enable expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    _register()
    previous = [(c, c._attn_implementation_internal) for c in _configs(model)]
    handle = AttentionHandle(model, previous)
    model.set_attn_implementation(ATTENTION_NAME)
    not_switched = sorted(
        {type(m).__name__ for m in model.modules()
         if isinstance(m, PreTrainedModel) and m.config._attn_implementation != ATTENTION_NAME}
    )
    if not_switched:
        handle.disable()
        raise KVCacheError(
            f"{', '.join(not_switched)} does not route attention through transformers' AttentionInterface, "
            "so kvcache.enable cannot switch it; use the model as is (caches still work, attention-based "
            "retention policies do not)"
        )
    return handle
