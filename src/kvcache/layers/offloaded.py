"""``offload``: a store whose K/V live in host memory, brought to the accelerator one layer ahead of use.

The wrapped store (any layout, any precision) is built on the host (page-locked when the compute device is
an accelerator) and stays the one authoritative copy. Around each layer's turn (``KVCache.update`` calls
these hooks):

1. ``prefetch()`` — called while the *previous* layer computes — starts copying the held K/V to the device
   on a side stream and records an event;
2. ``update()`` makes the compute stream wait for that event (never the host), brings the new tokens to
   the host store, and returns the device copy with the new tokens joined to it: only the new tokens cross
   the bus at this point when the store appends in order (``LayerCapabilities.appends_in_order``); a store
   that rewrites held slots (quantization moving tokens out of its window) is copied whole instead;
3. ``release()`` — once the next layer has started — drops the device copy.

So at most two layers' K/V are on the device at a time. Every transfer goes through a small *mover* object
(:class:`StreamMover` on an accelerator), which tests replace to check the protocol on a machine without
one. Device handling comes from the tensors and the generic ``torch.Stream``/``torch.Event``/
``torch.accelerator`` APIs, never from a named backend.

When the compute device is the CPU there is nothing to move: the layer is a pass-through to its inner store
and says so once in the generation's statistics (:meth:`notes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from kvcache.layers.base import CacheLayer, LayerCapabilities, LayerWrapper, MemoryUse

__all__ = ["HOST", "Mover", "OffloadedLayer", "StreamMover", "Transfer", "is_accelerator"]

#: where an offloaded store keeps its K/V
HOST = torch.device("cpu")

PASS_THROUGH_NOTE = ("offload: the compute device is the CPU, so K/V already live in host memory; "
                     "offload is a pass-through here (no copies, no prefetch)")


def is_accelerator(device: torch.device | str | None) -> bool:
    """Whether ``device`` is something other than host memory (``None``: the host)."""
    return device is not None and torch.device(device).type not in ("cpu", "meta")


@dataclass
class Transfer:
    """Copies started by :meth:`Mover.fetch`: the destination tensors and what tells when they are done."""

    tensors: tuple[torch.Tensor, ...]
    event: Any = None


class Mover(Protocol):
    """Moves tensors between the host and the compute device (the injectable part of offloading)."""

    device: torch.device

    def fetch(self, tensors: Sequence[torch.Tensor]) -> Transfer:
        """Start copying host ``tensors`` to the device without blocking the compute stream or the host."""

    def wait(self, transfer: Transfer) -> tuple[torch.Tensor, ...]:
        """Order the compute stream after ``transfer``; return its device tensors, ready to use there."""

    def settle(self, transfer: Transfer) -> None:
        """Block the host until ``transfer`` has read its host memory (before that memory is written)."""

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` to the device, ordered on the compute stream."""

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` to the host; it is complete when this returns (the host writes it next)."""


class StreamMover:
    """The accelerator mover: a side stream for prefetches, events for ordering, nothing backend-specific.

    Parameters
    ----------
    device:
        The compute device (``cuda:0``, ``xpu:0``, ...).

    Notes
    -----
    Device copies made on the side stream are used and freed on the compute stream, so each is marked with
    ``record_stream`` (the caching allocator then does not reuse its memory before the compute stream is
    done with it). Copies read page-locked host memory asynchronously; from ordinary memory they are
    synchronous (still correct).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.Stream(self.device)

    def _compute_stream(self) -> torch.Stream:
        return torch.accelerator.current_stream(self.device)

    def fetch(self, tensors: Sequence[torch.Tensor]) -> Transfer:
        with self.stream:
            out = tuple(t.to(self.device, non_blocking=t.is_pinned()) for t in tensors)
        return Transfer(out, self.stream.record_event())

    def wait(self, transfer: Transfer) -> tuple[torch.Tensor, ...]:
        compute = self._compute_stream()
        compute.wait_event(transfer.event)
        for t in transfer.tensors:
            t.record_stream(compute)
        return transfer.tensors

    def settle(self, transfer: Transfer) -> None:
        transfer.event.synchronize()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=tensor.is_pinned())

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        # Blocking on purpose: the host store reads it right away. Only the new tokens come this way.
        return tensor.to(HOST)


def _nbytes(tensors: Sequence[torch.Tensor] | None) -> int:
    return sum(t.nbytes for t in tensors) if tensors else 0


class OffloadedLayer(LayerWrapper):
    """Keeps ``inner`` (built on the host) in host memory; the device sees a copy only during its turn.

    Parameters
    ----------
    inner:
        The host store (any layout/precision).
    device:
        The compute device the store is built for; the first update's tensors decide in the end.
    mover:
        Transfers (default: a :class:`StreamMover` made at the first update on an accelerator, none on the
        CPU, where the layer passes through). Tests inject a recording mover to check the protocol.
    """

    def __init__(self, inner: CacheLayer, device: torch.device | str | None = None,
                 mover: Mover | None = None) -> None:
        super().__init__(inner)
        self._device = torch.device(device) if device is not None else HOST
        self._mover = mover
        self._pending: Transfer | None = None  # prefetched copy of the held K/V, not yet waited for
        self._view: tuple[torch.Tensor, ...] | None = None  # device (keys, values, positions) of this turn

    # ----- placement --------------------------------------------------------------------------------
    @property
    def passthrough(self) -> bool:
        """No mover: the compute device is the host, nothing is copied."""
        return self._mover is None

    def _ensure_mover(self, device: torch.device) -> Mover | None:
        if self._mover is None and is_accelerator(device):
            self._mover = StreamMover(device)
        return self._mover

    @property
    def device(self) -> torch.device:
        return self._mover.device if self._mover is not None else self._device

    @property
    def capabilities(self) -> LayerCapabilities:  # type: ignore[override]
        # Host copies and transfers each step: never a fixed-address, sync-free step.
        return replace(self.inner.capabilities, compileable=False)

    def notes(self) -> tuple[str, ...]:
        own = (PASS_THROUGH_NOTE,) if self.passthrough and not is_accelerator(self._device) else ()
        return (*self.inner.notes(), *own)

    def prefetch(self) -> None:
        mover = self._mover
        if mover is None or self._pending is not None or self._view is not None:
            return
        if not self.inner.capabilities.appends_in_order:
            return  # its update may rewrite held slots: the whole store is copied after it, nothing to join
        kv = self.inner.keys_values()
        if kv is not None:
            self._pending = mover.fetch(kv)

    def release(self) -> None:
        self._view = None

    def _drop(self) -> None:
        """Forget every device copy before the host store changes (a pending copy must finish reading)."""
        if self._pending is not None and self._mover is not None:
            self._mover.settle(self._pending)
        self._pending = self._view = None

    # ----- the store contract -------------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mover = self._ensure_mover(key.device)
        if mover is None:
            return self.inner.update(key, value, valid)
        held = self.inner.physical_length
        copy: tuple[torch.Tensor, ...] | None = None
        if self._pending is not None:
            copy = mover.wait(self._pending)
            mover.settle(self._pending)  # the host store is written next
            self._pending = None
        self._view = None
        host_k, host_v = self.inner.update(mover.to_host(key), mover.to_host(value),
                                           None if valid is None else valid.to(HOST))
        positions = self.inner.positions
        assert positions is not None  # just updated
        length = host_k.shape[2]
        t = key.shape[2]
        joinable = self.inner.capabilities.appends_in_order and length >= held + t
        if joinable and held == 0:
            keys, values = _join(None, key, length), _join(None, value, length)
        elif joinable and copy is not None and copy[0].shape[2] == held:
            keys, values = _join(copy[0], key, length), _join(copy[1], value, length)
        else:
            keys, values = mover.to_device(host_k), mover.to_device(host_v)
        self._view = (keys, values, mover.to_device(positions))
        return keys, values

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        mover = self._mover
        if mover is None:
            return self.inner.keys_values()
        held = self.inner.physical_length
        if self._view is not None:
            return (self._view[0][:, :, :held], self._view[1][:, :, :held]) if held else None
        if self._pending is not None:
            keys, values = mover.wait(self._pending)
            return keys, values
        kv = self.inner.keys_values()
        return None if kv is None else (mover.to_device(kv[0]), mover.to_device(kv[1]))

    @property
    def positions(self) -> torch.Tensor | None:
        if self._view is not None:
            return self._view[2]
        positions = self.inner.positions
        if positions is None or self._mover is None:
            return positions
        return self._mover.to_device(positions)

    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        self._drop()
        order = self.inner.keep(indices.to(HOST), None if invalid is None else invalid.to(HOST))
        return order.to(self.device)

    def index_batch(self, index: torch.Tensor) -> None:
        self._drop()
        self.inner.index_batch(index.to(HOST))

    def crop(self, length: int) -> None:
        self._drop()
        self.inner.crop(length)

    def reset(self) -> None:
        self._drop()
        self.inner.reset()

    def memory(self) -> MemoryUse:
        """The inner store's bytes as host memory, plus the device copies held right now (during a turn)."""
        inner = self.inner.memory()
        pending = self._pending.tensors if self._pending is not None else None
        return MemoryUse(device=_nbytes(self._view) + _nbytes(pending), host=inner.total)


def _join(held: torch.Tensor | None, new: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, H, length, D)``: the held slots, then the new tokens, then zeros up to ``length`` (the unfilled
    slots of a preallocated store, masked by their ``-1`` positions; zeros so they can never be NaN)."""
    parts = [p for p in (held, new) if p is not None]
    filled = sum(p.shape[2] for p in parts)
    if length > filled:
        parts.append(new.new_zeros((*new.shape[:2], length - filled, new.shape[3])))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


# ----- registry entries ------------------------------------------------------------------------------
def host_shape(shape: Any) -> Any:
    """The shape the inner store of an offloaded layer is built with: host memory, page-locked when the
    compute device is an accelerator (so prefetches copy asynchronously)."""
    return replace(shape, device=HOST, pin_memory=is_accelerator(shape.device))


def build_offloaded(store: CacheLayer, params: Mapping[str, Any], shape: Any) -> CacheLayer:
    """Registry builder: wrap the host store built from :func:`host_shape`."""
    return OffloadedLayer(store, device=shape.device)


def offloaded_bytes(inner: MemoryUse, slots: int, params: Mapping[str, Any], shape: Any) -> MemoryUse:
    """Registry byte estimate: every byte of the wrapped store moves to the host. The device copies that
    exist during a layer's turn (this layer's and the next one's) are transient and counted separately
    (:func:`kvcache.estimate.estimate_cache`)."""
    return MemoryUse(device=0, host=inner.total)
