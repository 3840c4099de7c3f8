"""What differs between the transformers releases kvcache supports (``>=5.3,<6``), in one place.

Every difference is detected by feature (``hasattr``, ``inspect.signature``), not by version number, so a
backport or a release not seen yet takes the path its API actually has. The differences, with the first
release that has the newer form (checked on 5.2 to 5.24):

- ``cache_utils.get_layer_types_and_kwargs`` (5.14) and ``configuration_utils.get_head_shapes`` (5.18),
  which also resolve per-layer (heterogeneous) configs; before them configs are homogeneous and the
  attributes the models themselves read give the answer (:func:`layer_types`, :func:`head_shapes`).
- ``get_mask_sizes(query_length)`` (5.4) versus ``get_mask_sizes(cache_position)`` (:func:`query_length`).
- ``crop(n)``: negative only (5.20), versus keeping the first ``n`` tokens when positive
  (:func:`crop_keeps_length`).
- The per-layer maximum length: ``get_max_length`` (5.13) versus ``get_max_cache_shape`` (abstract, up to
  5.19); a cache layer defines both.
- Model ``forward``: ``cache=`` (5.24) versus ``past_key_values=``; ``cache_position`` dropped (5.4)
  (:func:`forward_arguments`).
- Models hand their attention keyword arguments to ``Cache.update(..., kwargs=...)`` (5.24, most
  architectures); before, only the model's ``forward`` keyword arguments reach the attention function, so
  per-call data for it (the cache itself) travels as a forward argument (``ForwardArguments.extra``).
  That route needs 5.3: in 5.2, ``GPT2LMHeadModel.forward`` drops its keyword arguments, hence the pin.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, cache_utils, configuration_utils

__all__ = ["ForwardArguments", "crop_keeps_length", "forward_arguments", "head_shapes", "layer_types",
           "query_length"]

@functools.cache
def crop_keeps_length() -> bool:
    """Whether transformers' ``crop(n)`` with ``n > 0`` keeps the first ``n`` tokens (up to 5.19, deprecated
    from 5.15) rather than refusing (only ``crop(-n)``, "remove the last ``n``", is valid then).

    Asked of transformers' own ``DynamicLayer`` on a 2-token cache: the parameter was renamed
    (``tokens_to_remove``) five releases before the behaviour changed, so the signature does not tell.
    """
    layer = cache_utils.DynamicLayer()
    kv = torch.zeros(1, 1, 2, 1)
    layer.update(kv, kv)
    logger = logging.getLogger(cache_utils.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # the deprecation warning of 5.15-5.19 is about this probe, not the user
    try:
        layer.crop(1)
    except ValueError:
        return False
    finally:
        logger.setLevel(level)
    return layer.get_seq_length() == 1


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention type of each layer of a text/decoder ``config``, as this release's caches see it.

    ``"full_attention"``, ``"sliding_attention"``, ...

    Layers that hold no cache of their own (KV shared with an earlier layer, MoE/MLP-only layers) come out as
    types a :class:`~kvcache.cache.KVCache` reports as unsupported.
    """
    helper = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if helper is not None:
        return list(helper(config)[0])
    # Before the helper (< 5.14): what DynamicCache/StaticCache of those releases do inline.
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            kind = "sliding_attention"
        elif getattr(config, "attention_chunk_size", None) is not None:
            kind = "chunked_attention"
        else:
            kind = "full_attention"
        types = [kind] * config.num_hidden_layers
    types = list(types)
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    if shared:
        # Those releases give these layers no cache (they read an earlier layer's); name them so.
        types[-shared:] = ["kv_shared"] * shared
    return types


def head_shapes(config: PretrainedConfig, num_layers: int) -> tuple[list[int], list[int]]:
    """``(kv heads per layer, head dim per layer)`` of a text/decoder ``config`` with ``num_layers`` layers.

    Config names differ per architecture (GPT-2's ``n_head`` is mapped to ``num_attention_heads`` by the
    config's ``attribute_map``; GQA models have ``num_key_value_heads``; some set ``head_dim`` explicitly).
    """
    helper = getattr(configuration_utils, "get_head_shapes", None)
    if helper is not None:
        heads, dims = helper(config)
    else:
        # Before the helper (< 5.18) no config is per-layer, and this is what the attention modules read.
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dims = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads_list = list(heads) if isinstance(heads, list) else [int(heads)] * num_layers
    dims_list = list(dims) if isinstance(dims, list) else [int(dims)] * num_layers
    return heads_list, dims_list


def query_length(query: int | torch.Tensor) -> int:
    """The number of new tokens from ``get_mask_sizes``' first argument.

    transformers >= 5.4 passes the query length; earlier releases pass ``cache_position``, a ``(T_q,)``
    tensor.
    """
    return query if isinstance(query, int) else int(query.shape[0])


@dataclass(frozen=True)
class ForwardArguments:
    """Names a model's ``forward`` accepts for the arguments a generation loop passes.

    Attributes
    ----------
    cache:
        Keyword of the cache: ``"cache"`` (transformers >= 5.24) or ``"past_key_values"``.
    position_ids:
        Whether it takes ``position_ids`` (BLOOM and MPT do not: ALiBi needs no positions).
    cache_position:
        Whether it takes ``cache_position`` (logical indices of the new tokens; dropped in 5.4).
    logits_to_keep:
        Whether it can skip the vocabulary projection of all but the last positions.
    extra:
        Whether it takes other keyword arguments (``**kwargs``), which reach the attention function on every
        release (the way the cache reaches the kvcache attention function, ``kvcache.cache.CACHE_KWARG``).
    """

    cache: str
    position_ids: bool
    cache_position: bool
    logits_to_keep: bool
    extra: bool


def forward_arguments(model: Any) -> ForwardArguments:
    """Inspect ``model.forward`` once: which of the generation loop's arguments it takes, under which name."""
    accepted = inspect.signature(model.forward).parameters
    return ForwardArguments(
        cache="cache" if "cache" in accepted else "past_key_values",
        position_ids="position_ids" in accepted,
        cache_position="cache_position" in accepted,
        logits_to_keep="logits_to_keep" in accepted,
        extra=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()),
    )
