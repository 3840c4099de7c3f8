"""The contract every per-layer K/V store implements.

One tensor layout everywhere: keys and values are ``(B, H_kv, T, D)`` — batch, key/value heads (after GQA
grouping, so the GQA memory saving is kept), time (physical slots), head dim. Keys are stored *after* the
position encoding (RoPE) is applied, so dropping tokens never rewrites positions.

Two lengths are kept apart on purpose:

* ``seen`` (logical): how many tokens have passed through this layer. Positions, ``cache_position`` and
  ``get_seq_length()`` use it.
* ``physical_length``: how many slots the layer holds now (tensor size). Attention masks use it.

They differ once a retention policy evicts tokens (``keep``). Mixing them up gives silently wrong positions.
The layer never knows *why* tokens are dropped; ``keep(indices)`` is the only contract with policies.
The same classes serve the PyTorch path and the ONNX Runtime path (host tensors).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class CacheLayer(ABC):
    """Storage for the keys and values of one attention layer.

    Subclasses implement the storage; this base class only defines the contract and shared helpers.
    """

    #: tokens seen by this layer (logical length)
    seen: int

    def __init__(self) -> None:
        self.seen = 0

    # ----- the core contract --------------------------------------------------------------------------
    @abstractmethod
    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens and return everything the current step attends over.

        Parameters
        ----------
        key, value:
            ``(B, H_kv, T_new, D)`` keys (post-RoPE) and values of the new tokens.

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
    def physical_length(self) -> int:
        """Slots holding tokens now (``T_phys`` of :meth:`keys_values`)."""

    @abstractmethod
    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the given slots, per sequence and per KV head.

        Parameters
        ----------
        indices:
            ``(B, H_kv, n_keep)`` int64 slot indices into the current physical store, in any order; the
            layer keeps them in ascending order. ``seen`` is unchanged.
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
    def nbytes(self) -> int:
        """Bytes of memory this layer's store holds now (allocated, including preallocated slack)."""

    @abstractmethod
    def reset(self) -> None:
        """Drop all content (keeps any preallocated buffer for reuse)."""

    # ----- shared helpers ----------------------------------------------------------------------------
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
        if b == 0:
            return
        device = self._device()
        self.index_batch(torch.arange(b, device=device).repeat_interleave(repeats))

    @property
    def batch_size(self) -> int:
        """Current batch size (0 when empty)."""
        kv = self.keys_values()
        return 0 if kv is None else kv[0].shape[0]

    def _device(self) -> torch.device:
        kv = self.keys_values()
        return torch.device("cpu") if kv is None else kv[0].device
