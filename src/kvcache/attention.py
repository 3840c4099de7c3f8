"""kvcache's attention function, registered with transformers' ``AttentionInterface`` as ``"kvcache"``.

The math is plain softmax attention, the same as transformers' eager path: ``softmax(QK^T * scale
[+ softcap] + mask) V``, with grouped-query attention and dropout only in training. What it adds is one
extension point: when the cache has an attention observer (``KVCache.observer``), the masked logits and the
softmax weights of every layer are handed to it in the same pass — retention policies score tokens from
exactly the numbers the model used, without hooks that recompute queries and without ``output_attentions``.

Nothing is registered at import time. :func:`enable` registers the function (once) and switches one model
to it; the returned handle restores the model's previous implementation, also as a context manager::

    with kvcache.enable(model):
        model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kvcache.cache import OBSERVER_KWARG
from kvcache.errors import KVCacheError

__all__ = ["ATTENTION_NAME", "AttentionHandle", "AttentionObserver", "enable", "kvcache_attention"]

#: The name under which the function is registered (``config._attn_implementation``).
ATTENTION_NAME = "kvcache"


class AttentionObserver(Protocol):
    """Receives one layer's attention statistics from :func:`kvcache_attention`."""

    def __call__(self, layer_idx: int, logits: torch.Tensor, weights: torch.Tensor) -> None:
        """``logits``: masked pre-softmax scores, ``weights``: softmax; both ``(B, H, T_q, T_kv)``."""


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the cached keys, with the policy extension point.

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
        Additive float mask ``(B, 1, T_q, T_kv)`` (built for ``"kvcache"`` by transformers' eager mask
        builder, so padding, causality and sliding windows are already in it), a boolean mask (True = attend),
        or ``None``.
    scaling:
        Logit scale; ``D ** -0.5`` when not given.
    dropout:
        Dropout probability on the weights, applied only when ``module.training``.
    softcap:
        Logit soft-capping ``tanh(x / softcap) * softcap`` (Gemma-2 style), applied before the mask.
    kwargs:
        Other attention keyword arguments of the model (positions, ...). The cache's observer arrives here
        under ``kvcache.cache.OBSERVER_KWARG``.

    Returns
    -------
    output:
        ``(B, T_q, H, D)``.
    weights:
        ``(B, H, T_q, T_kv)`` softmax weights.
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
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + attention_mask
    weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    observer: AttentionObserver | None = kwargs.get(OBSERVER_KWARG)
    if observer is not None:
        observer(int(getattr(module, "layer_idx", 0)), logits, weights)
    probs = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(probs.view(b, h_kv, n_rep * t_q, t_kv), value)
    return out.view(b, h, t_q, value.shape[-1]).transpose(1, 2).contiguous(), weights


def _register() -> None:
    """Register the attention function and its mask builder under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvcache_attention)
    # transformers builds no mask at all for an implementation without a mask builder; the eager builder
    # gives the additive float mask kvcache_attention expects.
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


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
