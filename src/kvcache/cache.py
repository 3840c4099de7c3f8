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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcache import compat, validate
from kvcache.errors import KVCacheError, UnsupportedSpecError
from kvcache.layers.base import CacheLayer, MemoryUse
from kvcache.layers.registry import LayerShape, build_store
from kvcache.observe import AttentionObserver

if TYPE_CHECKING:
    from kvcache.policies.runner import PolicyRunner
from kvcache.spec import CacheSpec

__all__ = ["CACHE_KWARG", "KVCache", "HFCacheLayer", "model_cache_shape"]

#: Layer types (transformers' ``config.layer_types``) a KVCache can hold. Sliding-window layers keep every
#: token (the mask applies the window), which is correct, only not memory-optimal.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

#: Key under which the attention function (``kvcache.attention``) finds the cache in its keyword arguments:
#: a forward argument (``model(..., kvcache=cache)``), or put there by :meth:`KVCache.update`.
CACHE_KWARG = "kvcache"


class HFCacheLayer(CacheLayerMixin):
    """Adapter: one kvcache :class:`CacheLayer` seen through transformers' ``CacheLayerMixin`` protocol.

    Parameters
    ----------
    store:
        The layer storage. Reachable as ``.store``; everything kvcache-specific (``keep``, ``seen``,
        ``physical_length``, ``nbytes``) is asked of it directly.
    """

    is_sliding = False  # every layer keeps all tokens it is given (a policy may evict, a window never)

    def __init__(self, store: CacheLayer) -> None:
        # CacheLayerMixin.__init__ is not called: it would assign ``keys``/``values``, which are views of
        # the store here, not attributes.
        self.store = store
        self.is_initialized = True  # stores allocate on their own; nothing for early_initialization to do

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return self.store.capabilities.croppable

    def __repr__(self) -> str:
        store = self.store
        return f"HFCacheLayer({type(store).__name__}, seen={store.seen}, held={store.physical_length})"

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        # Only fixed-size stores keep tensor shapes and addresses constant from step to step.
        return self.store.capabilities.compileable

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
        ``None``, or an :class:`~kvcache.observe.AttentionObserver`: it declares per layer which attention
        statistics it needs, and the kvcache attention function (``kvcache.enable(model)``) hands them over in
        the same pass that computes attention.

    Notes
    -----
    The kvcache attention function finds the cache in its keyword arguments under :data:`CACHE_KWARG`. It
    gets there as a forward argument, ``model(..., kvcache=cache)``, which is what :func:`kvcache.generate`
    passes and works on every supported transformers release and architecture; from transformers 5.24 most
    models (not GPT-NeoX) also hand their attention keyword arguments to :meth:`update`, and the cache puts
    itself there too, so ``model.generate(past_key_values=cache)`` alone reaches it on those.

    A layer *needs* the kvcache attention function when its slots no longer map one to one onto the
    timeline (a retention policy called ``keep``: masks must come from the per-slot positions) or when the
    observer requests statistics for it. Each such layer must report in every forward; one that does not
    raises :class:`~kvcache.errors.KVCacheError` at the next ``update`` (or at :meth:`end_forward`),
    instead of silently attending to evicted or padding slots.
    """

    def __init__(self, stores: Sequence[CacheLayer], spec: str | CacheSpec = "dynamic") -> None:
        if not stores:
            raise KVCacheError("a KVCache needs at least one layer store")
        # Typed view of ``layers`` (the same objects): transformers types them as any kind of layer.
        self._adapters = [HFCacheLayer(s) for s in stores]
        self._stores = list(stores)  # the adapters' stores, fixed for the cache's life (read every update)
        super().__init__(layers=list(self._adapters))
        self.spec = CacheSpec.parse(spec)
        self.observer: AttentionObserver | None = None
        #: the retention policy's runner (``None`` for ``full``); it is also the observer
        self.policy: PolicyRunner | None = None
        self._valid: torch.Tensor | None = None  # (B, T_new) validity of the tokens of this forward
        self._announced = False  # begin_forward announced this forward's validity (kvcache's own driver)
        self._awaiting: int | None = None  # a layer whose attention must still report in this forward
        self._last_updated: int | None = None  # the layer updated last (released when the forward ends)

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
        num_layers, num_kv_heads, head_dims = model_cache_shape(config)
        dtype = dtype or _config_dtype(config)
        stores = [
            build_store(spec, LayerShape(heads, dim, batch_size, max_cache_len, device, dtype))
            for heads, dim in zip(num_kv_heads, head_dims, strict=True)
        ]
        if spec.policy.name == "full":
            return cls(stores, spec)
        # A retention policy: its state rides on every store, and its runner observes attention.
        from kvcache.policies import POLICIES
        from kvcache.policies.layer import PolicyLayer
        from kvcache.policies.runner import PolicyRunner

        wrapped = [PolicyLayer(store) for store in stores]
        cache = cls(wrapped, spec)
        cache.policy = PolicyRunner(POLICIES[spec.policy.name].from_params(spec.policy.params), wrapped)
        cache.observer = cache.policy
        return cache

    # ----- the Cache protocol ------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``(B, H_kv, T_new, D)`` keys/values of ``layer_idx``; return what attention sees.

        Models call ``cache.update(k, v, layer_idx, kwargs=attention_kwargs)`` and then pass the same
        ``attention_kwargs`` to the attention function; the cache puts itself there (under
        :data:`CACHE_KWARG`), so the kvcache attention function finds it through arguments only.
        Around the store's update, the next layer's store is asked to :meth:`~CacheLayer.prefetch` and the
        previous one to :meth:`~CacheLayer.release` (no-ops for resident stores).
        """
        self._check_reported()
        if layer_idx == 0 and self._last_updated is not None:
            self._adapters[self._last_updated].store.release()  # the previous forward's last layer
        attention_kwargs = kwargs.get("kwargs")
        if isinstance(attention_kwargs, dict):
            attention_kwargs[CACHE_KWARG] = self
        stores = self.stores
        store = stores[layer_idx]
        store.prefetch()
        out = store.update(key_states, value_states, self._valid)
        # Release before prefetching: at most two layers (this one, the next) have device copies at a time.
        if layer_idx > 0:
            stores[layer_idx - 1].release()
        if layer_idx + 1 < len(stores):
            stores[layer_idx + 1].prefetch()
        self._last_updated = layer_idx
        if self.needs_attention_report(layer_idx):
            self._awaiting = layer_idx
        return out

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of ``layer_idx`` for the next forward (transformers asks before any
        layer runs). A retention policy driven by ``model.generate`` evicts now, so masks fit what is held."""
        if self.policy is not None:
            self.policy.before_forward(compat.query_length(query_length))
        if layer_idx >= len(self._adapters):
            return compat.query_length(query_length), 0
        return self._adapters[layer_idx].get_mask_sizes(query_length)

    # ----- transformers >= 5.13 API, the same on every supported release -------------------------------
    @property
    def batch_size(self) -> int:  # type: ignore[override]
        """Sequences per batch the layers hold (0 while growable layers are still empty)."""
        sizes = {layer.store.batch_size for layer in self._adapters}
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

    # ----- forwards driven by kvcache (both runtimes) -------------------------------------------------
    def begin_forward(self, valid: torch.Tensor | None) -> None:
        """Announce the next forward's tokens: ``(B, T_new)`` bool, False for padding (``None``: all real).

        Their slots get position ``-1`` where False, so masks built from positions never attend them.
        """
        self._check_reported()
        self._valid = valid
        self._announced = True

    @property
    def validity_unknown(self) -> bool:
        """No :meth:`begin_forward` announced the current tokens (a ``model.generate`` call): the attention
        function reads padding off transformers' mask instead."""
        return not self._announced

    def end_forward(self, check: bool = True) -> None:
        """The forward is over: check that every layer that needed the kvcache attention function reported
        (unless ``check`` is False: the forward failed), and release the last layer's store."""
        self._valid = None
        self._announced = False
        if not check:
            self._awaiting = None
        self._check_reported()
        if self._last_updated is not None:
            self._adapters[self._last_updated].store.release()
            self._last_updated = None

    def needs_attention_report(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s attention must run through the kvcache attention function now."""
        store = self._adapters[layer_idx].store
        if store.slots_remapped:
            return True
        return self.observer is not None and self.observer.request(layer_idx) is not None

    def attention_reported(self, layer_idx: int) -> None:
        """Called by the kvcache attention function once it has served ``layer_idx`` in this forward."""
        if self._awaiting == layer_idx:
            self._awaiting = None

    def _check_reported(self) -> None:
        layer = self._awaiting
        if layer is None:
            return
        self._awaiting = None
        store = self._adapters[layer].store
        why = ("its store holds a selection of tokens (masks must come from the slots' positions)"
               if store.slots_remapped else "the cache's observer requests attention statistics for it")
        raise KVCacheError(
            f"layer {layer}'s attention did not run through the kvcache attention function, which it needs: "
            f"{why}. Switch the model with kvcache.enable(model) (kvcache.generate does), and pass the cache "
            f"to the forward too when the model does not hand it to the attention on its own: "
            f"model.generate(..., past_key_values=cache, {CACHE_KWARG}=cache). Models that do not route "
            "attention through transformers' AttentionInterface cannot use it"
        )

    # ----- kvcache additions -------------------------------------------------------------------------
    @property
    def stores(self) -> list[CacheLayer]:
        """The per-layer :class:`CacheLayer` objects."""
        return self._stores

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (logical length; positions continue from it)."""
        if layer_idx >= len(self.layers):
            return 0
        return self._adapters[layer_idx].get_seq_length()

    def physical_length(self, layer_idx: int = 0) -> int:
        """Slots ``layer_idx`` holds now (tokens kept)."""
        return self._adapters[layer_idx].store.physical_length

    def free_slots(self) -> int | None:
        """Slots left in the fullest fixed-capacity layer (``None`` when every layer can grow)."""
        free = [s.max_capacity - s.physical_length for s in self.stores if s.max_capacity is not None]
        return min(free) if free else None

    def memory(self) -> MemoryUse:
        """Bytes of K/V memory all layers hold now, by where they live."""
        total = MemoryUse()
        for store in self.stores:
            total = total + store.memory()
        return total

    def nbytes(self) -> int:
        """Bytes of K/V memory all layers hold now (allocated, preallocated slack included)."""
        return self.memory().total

    def notes(self) -> list[str]:
        """The stores' remarks on how they run here (:meth:`CacheLayer.notes`), each once, in layer order."""
        return list(dict.fromkeys(note for store in self.stores for note in store.notes()))

    def reset(self) -> None:
        """Drop every layer's content and any forward in flight."""
        super().reset()
        self._valid = None
        self._announced = False
        self._awaiting = self._last_updated = None

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
