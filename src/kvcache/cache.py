"""``KVCache``: a ``transformers`` ``Cache`` made of kvcache's per-layer stores.

Each model layer gets one :class:`~kvcache.layers.base.CacheLayer` (the storage) wrapped in a small adapter
that speaks transformers' ``CacheLayerMixin`` protocol, so ``model.generate(..., past_key_values=cache)``,
the mask builders (``get_mask_sizes``), beam search (``reorder_cache``, ``batch_repeat_interleave``),
``batch_select_indices``, ``crop`` and ``torch.compile`` (``is_compileable``) all work unchanged.

The adapter translates, and holds no state of its own: transformers' length (the *logical* length, tokens
seen, used for positions) versus the mask size (the *physical* length, slots held, plus the new tokens, with
the position offset that eviction creates), transformers' ``crop(-n)`` convention versus the layer's
``crop(length)``, and, inside a compiled step, the length as a device tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcache import compat, validate
from kvcache.errors import KVCacheError, UnsupportedSpecError
from kvcache.layers.base import CacheLayer
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.spec import CacheSpec

__all__ = ["KVCache", "HFCacheLayer", "model_cache_shape"]

#: Layer types (transformers' ``config.layer_types``) a KVCache can hold. Sliding-window layers keep every
#: token (the mask applies the window), which is correct, only not memory-optimal.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

#: Key under which the attention function (``kvcache.attention``) finds the cache's attention observer in
#: its keyword arguments. The cache puts it there from ``update`` (see :meth:`KVCache.update`).
OBSERVER_KWARG = "kvcache_observer"


class HFCacheLayer(CacheLayerMixin):
    """Adapter: one kvcache :class:`CacheLayer` seen through transformers' ``CacheLayerMixin`` protocol.

    Parameters
    ----------
    store:
        The layer storage. Reachable as ``.store``; everything kvcache-specific (``keep``, ``seen``,
        ``physical_length``, ``nbytes``) is asked of it directly.
    """

    is_croppable = True
    is_sliding = False  # every layer keeps all tokens it is given (a policy may evict, a window never)

    def __init__(self, store: CacheLayer) -> None:
        # CacheLayerMixin.__init__ is not called: it would assign ``keys``/``values``, which are views of
        # the store here, not attributes.
        self.store = store
        self.is_initialized = True  # stores allocate on their own; nothing for early_initialization to do

    def __repr__(self) -> str:
        store = self.store
        return f"HFCacheLayer({type(store).__name__}, seen={store.seen}, held={store.physical_length})"

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        # Only fixed-size stores keep tensor shapes and addresses constant from step to step.
        return self.store.max_capacity is not None

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        kv = self.store.keys_values()
        return None if kv is None else kv[0]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        kv = self.store.keys_values()
        return None if kv is None else kv[1]

    @property
    def batch_size(self) -> int:
        return self.store.batch_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: stores allocate on their first update (or at construction for static ones)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.update(key_states, value_states)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the next ``query_length`` tokens (their ``cache_position`` before
        transformers 5.4).

        ``kv_length`` is the slot count attention will see: physical, not logical (all of a preallocated
        buffer). ``kv_offset`` tells the mask builder which position slot 0 stands for: slots hold tokens in
        position order, and after eviction the newest block sits ``seen - physical_length`` positions later
        than its slot index. So the new tokens are causal among themselves and slots past the ones held
        (stale or unfilled in a static buffer) lie in the future and stay masked.
        """
        store = self.store
        capacity = store.max_capacity
        new = compat.query_length(query_length)
        kv_length = capacity if capacity is not None else store.physical_length + new
        return kv_length, store.evicted

    def get_seq_length(self) -> int:
        """Tokens seen (logical length): positions continue from here even after eviction.

        Inside a compiled step, a layer that keeps the count on the device returns it as a 0-d tensor (as
        transformers' own static layer does), so the step does not depend on a changing Python int.
        """
        if torch.compiler.is_compiling():
            seen = self.store.seen_tensor()
            if seen is not None:
                return seen  # type: ignore[return-value]
        return self.store.seen

    def get_max_length(self) -> int:
        capacity = self.store.max_capacity
        return -1 if capacity is None else capacity

    def get_max_cache_shape(self) -> int:
        """The older name of :meth:`get_max_length` (transformers up to 5.19; abstract before 5.13)."""
        return self.get_max_length()

    def offload(self) -> None:
        """No-op: placement is a kvcache layer of its own (``offload``), not a Cache-level switch."""

    def prefetch(self) -> None:
        """No-op, see :meth:`offload`."""

    def reset(self) -> None:
        self.store.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store.physical_length:
            self.store.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention: ``crop(-n)`` removes the last ``n`` tokens; before transformers 5.20,
        ``crop(n)`` with ``n > 0`` keeps the first ``n`` (``compat.crop_keeps_length``)."""
        if tokens_to_remove > 0:
            if not compat.crop_keeps_length():
                raise KVCacheError(
                    f"crop({tokens_to_remove}): pass a negative number of tokens to remove, e.g. crop(-2)"
                )
            # Cropping is only valid before eviction, where kept and seen lengths coincide.
            self.store.crop(min(tokens_to_remove, self.store.physical_length))
        elif tokens_to_remove < 0:
            self.store.crop(max(0, self.store.physical_length + tokens_to_remove))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store.physical_length:
            self.store.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.store.physical_length:
            return
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self.store.index_batch(indices)


class KVCache(Cache):
    """A ``transformers.Cache`` whose per-layer storage is kvcache's :class:`CacheLayer` objects.

    Build one with :meth:`from_spec`. Pass it as ``past_key_values=`` to ``model.generate`` or to a forward
    call; it fills in place.

    Parameters
    ----------
    stores:
        One storage object per model layer.
    spec:
        The spec the stores were built from (kept for reporting).

    Attributes
    ----------
    layers:
        ``list[HFCacheLayer]``, one per model layer; ``layers[i].store`` is the :class:`CacheLayer`.
    spec:
        The :class:`~kvcache.spec.CacheSpec` of this cache.
    observer:
        ``None``, or a callable ``observer(layer_idx, logits, weights)`` that receives every layer's masked
        attention logits and softmax weights ``(B, H, T_q, T_phys)`` from the kvcache attention function
        (``kvcache.enable(model)``), in the same pass that computes attention. Retention policies that score
        tokens by attention plug in here. It reaches the attention function as a forward argument,
        ``model(..., kvcache_observer=cache.observer)``, which is what :func:`kvcache.generate` passes and
        works on every supported transformers release. From transformers 5.24 most models (Llama, Mistral,
        Qwen2, Phi-3, Gemma, GPT-2, GPT-J, CodeGen, OPT; not GPT-NeoX) also hand their attention keyword
        arguments to ``update``, and the cache forwards it that way too (see :meth:`update`).
    """

    def __init__(self, stores: Sequence[CacheLayer], spec: str | CacheSpec = "dynamic") -> None:
        if not stores:
            raise KVCacheError("a KVCache needs at least one layer store")
        # Typed view of ``layers`` (the same objects): transformers types them as any kind of layer.
        self._adapters = [HFCacheLayer(s) for s in stores]
        super().__init__(layers=list(self._adapters))
        self.spec = CacheSpec.parse(spec)
        self.observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    # ----- construction ------------------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls,
        spec: str | CacheSpec,
        config: PretrainedConfig,
        *,
        batch_size: int = 1,
        max_cache_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Build the cache a spec describes for a model with ``config``.

        Parameters
        ----------
        spec:
            A spec string (``"dynamic"``, ``"static:capacity=4096"``, ...) or a :class:`CacheSpec`.
        config:
            The model's config (``model.config``); layer count, KV heads and head dim are read from its
            text/decoder part.
        batch_size:
            Sequences per batch (times beams for beam search), for preallocated layouts.
        max_cache_len:
            Capacity of a ``static`` layout given without ``capacity=N`` (prompt + new tokens).
        device, dtype:
            Of preallocated buffers (default: CPU, the config's dtype or float32). A mismatch with the model
            is fixed by a re-allocation on the first update; pass them to avoid it.

        Raises
        ------
        UnsupportedSpecError
            If the spec names a part not built in this version, or the model has layer types kvcache cannot
            hold (e.g. linear attention).
        KVCacheError
            If a ``static`` layout has neither ``capacity`` nor ``max_cache_len``.
        """
        spec = CacheSpec.parse(spec)
        spec.require_available()
        validate.check_cache_arguments(config, batch_size, max_cache_len, device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise KVCacheError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        num_layers, num_kv_heads, head_dims = model_cache_shape(config)
        if spec.layout.name == "static":
            capacity = spec.layout.params.get("capacity") or max_cache_len
            if capacity is None:
                raise KVCacheError(
                    "a static cache needs a capacity: write 'static:capacity=N' or pass max_cache_len=N "
                    "(prompt length + new tokens)"
                )
            dtype = dtype or _config_dtype(config)
            stores: list[CacheLayer] = [
                StaticLayer(capacity, batch_size, num_kv_heads[i], head_dims[i], dtype, device)
                for i in range(num_layers)
            ]
        else:
            stores = [DynamicLayer() for _ in range(num_layers)]
        return cls(stores, spec)

    # ----- the Cache protocol ------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``(B, H_kv, T_new, D)`` keys/values of ``layer_idx``; return what attention sees.

        Models call ``cache.update(k, v, layer_idx, kwargs=attention_kwargs)`` and then pass the same
        ``attention_kwargs`` to the attention function; when an :attr:`observer` is set, it is handed over
        that way (under ``OBSERVER_KWARG``), so attention statistics flow through arguments only.
        """
        attention_kwargs = kwargs.get("kwargs")
        if self.observer is not None and isinstance(attention_kwargs, dict):
            attention_kwargs[OBSERVER_KWARG] = self.observer
        return self._adapters[layer_idx].update(key_states, value_states)

    # ----- transformers >= 5.13 API, the same on every supported release -------------------------------
    @property
    def batch_size(self) -> int:  # type: ignore[override]
        """Sequences per batch the layers hold (0 while growable layers are still empty)."""
        sizes = {layer.batch_size for layer in self._adapters}
        if len(sizes) > 1:
            raise KVCacheError(f"the layers hold different batch sizes {sorted(sizes)}; reset the cache")
        return sizes.pop()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Capacity of ``layer_idx`` (the largest over layers when ``None``); ``-1`` when it can grow."""
        if layer_idx is None:
            return max(layer.get_max_length() for layer in self._adapters)
        if layer_idx >= len(self._adapters):
            return -1
        return self._adapters[layer_idx].get_max_length()

    # ----- kvcache additions -------------------------------------------------------------------------
    @property
    def stores(self) -> list[CacheLayer]:
        """The per-layer :class:`CacheLayer` objects."""
        return [layer.store for layer in self._adapters]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (logical length; positions continue from it)."""
        if layer_idx >= len(self.layers):
            return 0
        return self._adapters[layer_idx].get_seq_length()

    def physical_length(self, layer_idx: int = 0) -> int:
        """Slots ``layer_idx`` holds now (tokens kept)."""
        return self._adapters[layer_idx].store.physical_length

    def nbytes(self) -> int:
        """Bytes of K/V memory all layers hold now (allocated, preallocated slack included)."""
        return sum(layer.store.nbytes() for layer in self._adapters)

    def __repr__(self) -> str:
        return f"KVCache({str(self.spec)!r}, layers={len(self.layers)}, seen={self.get_seq_length()})"


def model_cache_shape(config: PretrainedConfig) -> tuple[int, list[int], list[int]]:
    """``(num_layers, kv_heads per layer, head_dim per layer)`` of a model's KV cache.

    Read from the text/decoder config the way this transformers release resolves it (``kvcache.compat``), so
    config names of every architecture (``n_layer``/``n_head`` of GPT-2, ``num_key_value_heads`` of GQA
    models, explicit ``head_dim``) resolve the way the model itself resolves them.

    Raises
    ------
    UnsupportedSpecError
        If a layer is not an attention layer kvcache can hold.
    """
    text = config.get_text_config(decoder=True)
    layer_types = compat.layer_types(text)
    unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if unsupported:
        raise UnsupportedSpecError(
            f"{type(config).__name__} has layer types {', '.join(unsupported)}, which kvcache cannot cache "
            f"yet; supported: {', '.join(SUPPORTED_LAYER_TYPES)}"
        )
    n = len(layer_types)
    heads, dims = compat.head_shapes(text, n)
    return n, heads, dims


def _config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config.get_text_config(decoder=True), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
