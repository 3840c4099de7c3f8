"""The contract every per-layer K/V store implements, and the base class of stores that wrap another.

One tensor layout everywhere: keys and values are ``(B, H_kv, T, D)`` — batch, key/value heads (after GQA
grouping, so the GQA memory saving is kept), time (physical slots), head dim. Keys are stored *after* the
position encoding (RoPE) is applied, so dropping tokens never rewrites positions.

Two lengths are kept apart on purpose:

* ``seen`` (logical): how many tokens have passed through this layer. Positions, ``cache_position`` and
  ``get_seq_length()`` use it.
* ``physical_length``: how many slots the layer holds now (tensor size). Attention masks use it.

They differ once a retention policy evicts tokens (``keep``). Mixing them up gives silently wrong positions.

Next to its keys and values every layer keeps the **logical index of every slot**, ``positions`` of shape
``(B, H_kv, T_phys)`` (int32): the token's column in the batch's timeline (0 for the first token fed, left
padding included), or ``-1`` for a slot that holds no real token (left padding, a slot a policy gave up,
an unfilled slot of a preallocated buffer). Attention masks after eviction are built from it, per sequence
and per KV head: slot ``s`` of head ``h`` may be attended by the query at column ``c`` iff
``0 <= positions[b, h, s] <= c`` (and within a sliding window, if the layer has one). That is what makes
"evicting a token" exactly "masking it".

The layer never knows *why* tokens are dropped; ``keep(indices)`` is the only contract with policies.
The same classes serve the PyTorch path and the ONNX Runtime path (host tensors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvcache.errors import KVCacheError

__all__ = ["CacheLayer", "LayerCapabilities", "LayerWrapper", "MemoryUse", "new_positions", "state_entry"]

#: dtype of the per-slot logical positions (half the bytes of int64; 2**31 tokens is out of reach)
POSITION_DTYPE = torch.int32


@dataclass(frozen=True)
class LayerCapabilities:
    """What a store can do, asked by policies and wrappers instead of type checks.

    Attributes
    ----------
    croppable:
        ``crop`` works (before any eviction).
    keep_group:
        ``1`` when ``keep`` drops exactly the slots not named; ``g > 1`` when storage is shared by groups of
        ``g`` consecutive slots (a quantization group): the store still honours ``keep`` exactly for
        attention, but memory is freed a whole group at a time.
    compileable:
        Shapes and buffer addresses stay fixed from step to step (``torch.compile``/CUDA graphs).
    appends_in_order:
        ``update`` writes the new tokens into slots ``physical_length ..`` and leaves the held slots as they
        were, so a copy of the held slots made elsewhere (an offloaded layer's device copy) stays valid and
        only the new tokens need to join it. False (the safe default) for stores that rewrite held slots
        (a quantized store moving tokens out of its full-precision window).
    """

    croppable: bool = True
    keep_group: int = 1
    compileable: bool = False
    appends_in_order: bool = False


@dataclass(frozen=True)
class MemoryUse:
    """Bytes a store holds, by where they live."""

    device: int = 0
    host: int = 0

    @property
    def total(self) -> int:
        """All bytes, wherever they live."""
        return self.device + self.host

    def __add__(self, other: MemoryUse) -> MemoryUse:
        return MemoryUse(self.device + other.device, self.host + other.host)


def new_positions(start: int | torch.Tensor, length: int, valid: torch.Tensor | None, batch: int, heads: int,
                  device: torch.device) -> torch.Tensor:
    """Logical positions ``(B, H_kv, length)`` of ``length`` new tokens fed from column ``start``.

    Parameters
    ----------
    start:
        Column of the first new token (``seen`` before the update); a 0-d device tensor in a compiled step.
    valid:
        ``(B, length)`` bool, False for padding (its slots get ``-1``); ``None`` when every token is real.
    """
    cols = torch.arange(length, device=device, dtype=POSITION_DTYPE) + start
    pos = cols.to(POSITION_DTYPE).expand(batch, heads, length)
    if valid is not None:
        if valid.shape != (batch, length):
            raise KVCacheError(
                f"the validity mask of the new tokens is {tuple(valid.shape)}, expected (B, T_new) = "
                f"({batch}, {length}); pass one entry per new token"
            )
        pos = pos.masked_fill(~valid.to(device=device, dtype=torch.bool)[:, None, :], -1)
    return pos


def state_entry(state: dict[str, torch.Tensor], name: str, owner: str) -> torch.Tensor:
    """``state[name]``, or a :class:`KVCacheError` naming the missing entry (a damaged or foreign state)."""
    if name not in state:
        raise KVCacheError(
            f"the saved state of a {owner} has no '{name}' entry "
            f"(entries: {', '.join(sorted(state)) or 'none'}); "
            "the file is damaged or was written for another layout"
        )
    return state[name]


class CacheLayer(ABC):
    """Storage for the keys and values of one attention layer.

    Subclasses implement the storage; this base class defines the contract and shared helpers.
    ``seen``, ``batch_size`` and ``device`` are cheap: they never dequantize, fetch or copy the store.
    """

    #: tokens seen by this layer (logical length)
    seen: int
    #: ``keep`` has re-selected slots since the last reset: slot ``i`` no longer holds column ``i`` shifted by
    #: the evicted count, so attention masks must be built from :attr:`positions`
    slots_remapped: bool
    #: what this store can do (class-level default; stores with parameters may set it per instance)
    capabilities: LayerCapabilities = LayerCapabilities()

    def __init__(self) -> None:
        self.seen = 0
        self.slots_remapped = False

    # ----- the core contract --------------------------------------------------------------------------
    @abstractmethod
    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens and return everything the current step attends over.

        Parameters
        ----------
        key, value:
            ``(B, H_kv, T_new, D)`` keys (post-RoPE) and values of the new tokens.
        valid:
            ``(B, T_new)`` bool, False where a new token is padding; ``None``: all real.

        Returns
        -------
        keys, values:
            ``(B, H_kv, T_phys, D)`` with the new tokens last. ``T_phys`` may exceed the slots holding
            real tokens for preallocated layouts (the mask covers the rest).
        """

    @abstractmethod
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored ``(B, H_kv, T_phys, D)`` keys and values (dequantized/fetched), or ``None`` if empty."""

    @property
    @abstractmethod
    def positions(self) -> torch.Tensor | None:
        """``(B, H_kv, T)`` int32 logical index of every slot ``update`` returns (``-1``: no real token), or
        ``None`` while the layer is empty. ``T`` is the length of the tensors ``update`` returns (the whole
        buffer for preallocated layouts)."""

    @property
    @abstractmethod
    def physical_length(self) -> int:
        """Slots holding tokens now (``T_phys`` of :meth:`keys_values`)."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Sequences held (0 while a growable store is empty)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where attention reads this store's tensors."""

    @abstractmethod
    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        """Keep only the given slots, per sequence and per KV head.

        Parameters
        ----------
        indices:
            ``(B, H_kv, n_keep)`` int64 slot indices into the current physical store, in any order.
            ``seen`` is unchanged.
        invalid:
            ``(B, H_kv, n_keep)`` bool aligned with ``indices``: slots to keep but never attend to again
            (their position becomes ``-1``). Rows of a batch that keep fewer real tokens than others fill the
            rectangle with such slots.

        Returns
        -------
        ``(B, H_kv, n_keep)`` int64: new slot ``j`` holds what old slot ``order[..., j]`` held. The kept slots
        need not stay in position order (a store may fill holes in place); per-slot state kept beside the
        store (a policy's scores) follows by gathering with it.
        """

    @abstractmethod
    def index_batch(self, index: torch.Tensor) -> None:
        """Re-index the batch dimension: ``store = store[index]`` (beam search reorder, select, repeat).

        Parameters
        ----------
        index:
            ``(B_new,)`` int64 indices into the current batch.
        """

    @abstractmethod
    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (undo speculative tokens). Only valid before any eviction."""

    @abstractmethod
    def memory(self) -> MemoryUse:
        """Bytes this store holds now (allocated, preallocated slack and slot positions), by place."""

    @abstractmethod
    def reset(self) -> None:
        """Drop all content (keeps any preallocated buffer for reuse)."""

    # ----- saving and restoring (conversation files, forks) ------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the store holds, as named tensors (copies): what :meth:`load_state` restores exactly.

        Stores that cannot be saved keep this default, which refuses. Wrappers do not forward it: a wrapper
        with state of its own must save it (and its inner store's) itself.

        Raises
        ------
        KVCacheError
            The store does not implement saving.
        """
        raise KVCacheError(
            f"{type(self).__name__} does not support saving its state (state_tensors/load_state); "
            "use a dynamic or static layout, with or without a retention policy, for a cache you save or fork"
        )

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the store's content by a :meth:`state_tensors` result (tensors on any device).

        Raises
        ------
        KVCacheError
            The store does not implement saving, or ``state`` does not fit it (entries missing, shapes).
        """
        self.state_tensors()  # refuses the same way for stores without the API
        raise KVCacheError(f"{type(self).__name__} implements state_tensors() but not load_state()")

    # ----- placement hooks (no-ops for resident stores) ---------------------------------------------------
    def prefetch(self) -> None:  # noqa: B027 (a no-op by design, overridden by placement wrappers)
        """Start bringing the store to :attr:`device` ahead of use (called before the layer's turn)."""

    def release(self) -> None:  # noqa: B027
        """The layer's attention is done for this forward: device copies may be dropped."""

    def take_relayout(self) -> torch.Tensor | None:
        """Slots the store moved on its own since last asked (a quantized store drops padding as it
        quantizes), and forget them: ``(B, H_kv, T_phys)`` int64, new slot ``j`` holds what old slot
        ``order[..., j]`` held, or ``None`` when nothing moved. Per-slot state kept beside the store (a
        policy's scores) follows by gathering with it, as after :meth:`keep`."""
        return None

    def notes(self) -> tuple[str, ...]:
        """Remarks on how this store runs here (e.g. a placement that has nothing to do on this machine),
        reported once per generation in its statistics."""
        return ()

    # ----- shared helpers ----------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this store holds now, wherever they live (``memory().total``)."""
        return self.memory().total

    @property
    def evicted(self) -> int:
        """Tokens seen but no longer held (``seen - physical_length``): the position shift of the slots."""
        return self.seen - self.physical_length

    def seen_tensor(self) -> torch.Tensor | None:
        """``seen`` as a 0-d device tensor, for layers that keep it on the device (compiled steps read it
        without turning a changing Python int into a graph input); ``None`` for host-only layers."""
        return None

    @property
    def max_capacity(self) -> int | None:
        """The fixed number of slots for preallocated layouts, ``None`` for growable ones."""
        return None

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search reorder: ``(B,)`` indices of the surviving beams' parents."""
        self.index_batch(beam_idx)

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence ``repeats`` times along the batch (e.g. expanding a prompt to beams)."""
        b = self.batch_size
        if b:
            self.index_batch(torch.arange(b, device=self.device).repeat_interleave(repeats))


class LayerWrapper(CacheLayer):
    """A store that adds behaviour around another (offloading, quantization front-ends, instrumentation).

    Every method forwards to :attr:`inner`; subclasses override what they change. ``seen`` is the inner
    store's, so the logical length has one owner.

    Parameters
    ----------
    inner:
        The wrapped store.
    """

    def __init__(self, inner: CacheLayer) -> None:
        # CacheLayer.__init__ is not called: ``seen`` belongs to the inner store (property below).
        self.inner = inner

    @property  # type: ignore[override]
    def seen(self) -> int:
        return self.inner.seen

    @seen.setter
    def seen(self, value: int) -> None:
        self.inner.seen = value

    @property
    def capabilities(self) -> LayerCapabilities:  # type: ignore[override]
        return self.inner.capabilities

    @property  # type: ignore[override]
    def slots_remapped(self) -> bool:
        return self.inner.slots_remapped

    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.update(key, value, valid)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.keys_values()

    @property
    def positions(self) -> torch.Tensor | None:
        return self.inner.positions

    @property
    def physical_length(self) -> int:
        return self.inner.physical_length

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.keep(indices, invalid)

    def index_batch(self, index: torch.Tensor) -> None:
        self.inner.index_batch(index)

    def crop(self, length: int) -> None:
        self.inner.crop(length)

    def memory(self) -> MemoryUse:
        return self.inner.memory()

    def reset(self) -> None:
        self.inner.reset()

    def prefetch(self) -> None:
        self.inner.prefetch()

    def take_relayout(self) -> torch.Tensor | None:
        return self.inner.take_relayout()

    def release(self) -> None:
        self.inner.release()

    def notes(self) -> tuple[str, ...]:
        return self.inner.notes()

    @property
    def evicted(self) -> int:
        return self.inner.evicted

    def seen_tensor(self) -> torch.Tensor | None:
        return self.inner.seen_tensor()

    @property
    def max_capacity(self) -> int | None:
        return self.inner.max_capacity
