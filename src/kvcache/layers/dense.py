"""Full-precision K/V stores: a growable one (``dynamic``) and a preallocated one (``static``).

Both keep the one layout of :mod:`kvcache.layers.base`, ``(B, H_kv, T, D)``, and are plain torch: the same
classes serve the PyTorch path (wrapped by :class:`kvcache.cache.KVCache`) and the ONNX Runtime path (host
tensors).
"""

from __future__ import annotations

import torch

from kvcache.errors import CacheCapacityError, KVCacheError
from kvcache.layers.base import (
    POSITION_DTYPE,
    CacheLayer,
    LayerCapabilities,
    MemoryUse,
    new_positions,
    state_entry,
)

__all__ = ["DynamicLayer", "StaticLayer"]


def _check_kv(key: torch.Tensor, value: torch.Tensor) -> None:
    if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
        raise KVCacheError(
            "keys and values must be (B, H_kv, T, D) with the same B, H_kv and T; "
            f"got keys {tuple(key.shape)} and values {tuple(value.shape)}"
        )


def _layout(key: torch.Tensor, value: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, H_kv, D_k, D_v): everything but the time axis."""
    return key.shape[0], key.shape[1], key.shape[3], value.shape[3]


class DynamicLayer(CacheLayer):
    """A growable store: keeps every token it is given, in a buffer that grows geometrically.

    ``torch.cat`` on every step (what ``transformers.DynamicCache`` does) copies the whole cache per token, an
    O(T) cost per step. Instead the buffer keeps spare slots and a step writes only the new tokens into them;
    when the spare slots run out it grows by a quarter (at least ``min_growth`` slots), so copying is
    amortised to O(1) per token while the slack stays under a fifth of the buffer (plus ``min_growth``).
    ``update`` returns views of the filled part, so attention sees exactly ``physical_length`` slots.

    Parameters
    ----------
    min_growth:
        The fewest slots added when the buffer grows (avoids many small re-allocations on short contexts).
    pin_memory:
        Allocate host buffers page-locked (an offloaded store on an accelerator copies them asynchronously);
        buffers re-made by ``keep``/``index_batch`` are ordinary memory (copies from them are synchronous).

    Notes
    -----
    Writes go into the buffer in place: do not run the prefill under ``torch.inference_mode`` and the decode
    steps outside it (inference tensors cannot be modified outside inference mode); ``torch.no_grad`` is fine.
    """

    capabilities = LayerCapabilities(croppable=True, keep_group=1, compileable=False, appends_in_order=True)

    def __init__(self, min_growth: int = 128, pin_memory: bool = False) -> None:
        super().__init__()
        if min_growth < 1:
            raise ValueError(f"min_growth must be >= 1, got {min_growth}")
        self.min_growth = min_growth
        # Host buffers in page-locked memory, so copies to an accelerator can run asynchronously (offload).
        self.pin_memory = pin_memory
        self._keys: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self._values: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None  # (B, H_kv, capacity) logical index of each slot, -1: none
        self._length = 0  # filled slots (physical length)

    # ----- storage ------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Slots allocated now (filled + spare)."""
        return 0 if self._keys is None else self._keys.shape[2]

    def _grow(self, key: torch.Tensor, value: torch.Tensor, needed: int) -> None:
        """Re-allocate to hold at least ``needed`` slots, copying the filled part."""
        # A quarter of headroom once decoding outgrows the buffer (amortised O(1) copies per token, slack
        # under 20%); just ``min_growth`` slots on a fresh buffer, as most generations are short.
        headroom = self.min_growth if not self._length else max(self.min_growth, needed // 4)
        new_capacity = needed + headroom
        b, h, _, dk = key.shape
        dv = value.shape[-1]
        pin = self.pin_memory and key.device.type == "cpu"
        new_k = torch.empty((b, h, new_capacity, dk), dtype=key.dtype, device=key.device, pin_memory=pin)
        new_v = torch.empty((b, h, new_capacity, dv), dtype=value.dtype, device=key.device, pin_memory=pin)
        new_p = torch.empty((b, h, new_capacity), dtype=POSITION_DTYPE, device=key.device, pin_memory=pin)
        if self._keys is not None and self._values is not None and self._pos is not None and self._length:
            new_k[:, :, : self._length].copy_(self._keys[:, :, : self._length])
            new_v[:, :, : self._length].copy_(self._values[:, :, : self._length])
            new_p[:, :, : self._length].copy_(self._pos[:, :, : self._length])
        self._keys, self._values, self._pos = new_k, new_v, new_p

    def _make_room(self, key: torch.Tensor, value: torch.Tensor, end: int) -> None:
        """Buffers laid out like ``key``/``value`` with at least ``end`` slots (the held ones kept)."""
        keys, values = self._keys, self._values
        if keys is None or values is None or not self._length:
            # Empty: (re)allocate for this batch, with room to decode without re-allocating soon.
            self._length = 0
            self._grow(key, value, end)
        elif _layout(keys, values) != _layout(key, value):
            raise KVCacheError(
                f"new keys {tuple(key.shape)} / values {tuple(value.shape)} do not match the cached "
                f"{tuple(keys.shape)} / {tuple(values.shape)} in (B, H_kv, *, D); "
                "call reset() before a new batch"
            )
        elif end > keys.shape[2]:
            self._grow(key, value, end)

    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H_kv, T_new, D)`` keys/values; return views ``(B, H_kv, T_phys, D)`` of all tokens."""
        _check_kv(key, value)
        b, h, t = key.shape[:3]
        new_pos = new_positions(self.seen, t, valid, b, h, key.device)
        end = self._length + key.shape[2]
        self._make_room(key, value, end)
        keys, values, pos = self._keys, self._values, self._pos
        if keys is None or values is None or pos is None:  # unreachable: _grow allocated them
            raise RuntimeError("DynamicLayer buffers missing after allocation")
        keys[:, :, self._length : end].copy_(key)
        values[:, :, self._length : end].copy_(value)
        pos[:, :, self._length : end].copy_(new_pos)
        self.seen += end - self._length
        self._length = end
        return keys[:, :, :end], values[:, :, :end]

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._keys is None or self._values is None or self._length == 0:
            return None
        return self._keys[:, :, : self._length], self._values[:, :, : self._length]

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Take ``(B, H_kv, T_held + T_new, D)`` keys/values as the buffers, without copying them: their first
        ``T_held`` slots hold what this store holds, the last ``T_new`` the new tokens (``valid`` as in
        :meth:`update`).

        For a runtime whose graph writes past ++ new into a fresh ``present`` tensor (ONNX Runtime): the
        store holds that tensor instead of copying the new tokens into its own buffer, and hands it back
        whole, contiguous, as the next step's past, so nothing is copied on the host. The buffers then have
        no spare slots; a later :meth:`update` grows them as usual.
        """
        _check_kv(keys, values)
        held = self._length
        if held and (self._keys is None or self._values is None
                     or _layout(self._keys, self._values) != _layout(keys, values)):
            raise KVCacheError(f"adopted keys {tuple(keys.shape)} do not match the cached layout; call "
                               "reset() before a new batch")
        end = keys.shape[2]
        if end <= held:
            raise KVCacheError(f"adopt() needs the {held} held slots plus new ones, got {end} slots")
        b, h = keys.shape[:2]
        new_pos = new_positions(self.seen, end - held, valid, b, h, keys.device)
        pos = self._pos
        if pos is None or not held or pos.shape[2] < end or pos.shape[:2] != (b, h):
            grown = torch.empty((b, h, end + max(self.min_growth, end // 4)), dtype=POSITION_DTYPE,
                                device=keys.device)
            if held and pos is not None:
                grown[:, :, :held].copy_(pos[:, :, :held])
            self._pos = pos = grown
        pos[:, :, held:end].copy_(new_pos)
        self._keys, self._values = keys, values
        self.seen += end - held
        self._length = end

    def open_slots(self, count: int, key_like: torch.Tensor,
                   value_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(B, H_kv, capacity, D)`` buffers, grown so that ``count`` slots after the held ones
        are free, for a runtime that writes the new tokens into them itself (ONNX Runtime's fused attention
        with past and present sharing one buffer); :meth:`commit_slots` then records them.

        ``key_like``/``value_like`` give batch, heads, head size, dtype and device when the store is empty.
        """
        end = self._length + count
        keys, values = self._keys, self._values
        if self._length and keys is not None and end <= keys.shape[2] and keys.shape[0] == key_like.shape[0]:
            return keys, values  # type: ignore[return-value]  # a decode step: room left (the common case)
        self._make_room(key_like, value_like, end)
        assert self._keys is not None and self._values is not None
        return self._keys, self._values

    def commit_slots(self, count: int, valid: torch.Tensor | None = None) -> None:
        """Record ``count`` tokens written in place after the held ones (see :meth:`open_slots`); ``valid``
        as in :meth:`update`."""
        pos = self._pos
        if self._keys is None or pos is None or self._length + count > self._keys.shape[2]:
            raise KVCacheError(f"commit_slots({count}) without open_slots() room for them")
        if count == 1 and valid is None and pos.device.type == "cpu":
            pos.numpy()[:, :, self._length] = self.seen  # a decode step on the host: numpy, 5x cheaper
        elif count == 1 and valid is None:
            pos[:, :, self._length].fill_(self.seen)
        else:
            b, h = pos.shape[:2]
            pos[:, :, self._length : self._length + count].copy_(
                new_positions(self.seen, count, valid, b, h, pos.device))
        self.seen += count
        self._length += count

    @property
    def positions(self) -> torch.Tensor | None:
        if self._pos is None or self._length == 0:
            return None
        return self._pos[:, :, : self._length]

    @property
    def physical_length(self) -> int:
        return self._length

    @property
    def batch_size(self) -> int:
        return 0 if self._keys is None else self._keys.shape[0]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._keys is None else self._keys.device

    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        kv, pos = self.keys_values(), self.positions
        if kv is None or pos is None or self._keys is None or self._values is None or self._pos is None:
            raise KVCacheError("keep() called on an empty layer; there is nothing to select from")
        keys, values = kv
        idx = _sorted_slots(indices, invalid, pos)
        n, held = idx.shape[-1], self._length
        if 0 < held - n <= n // 8 + 1:
            # A few slots go (decode-time eviction): fill each hole below n with a kept slot from above it,
            # in place, instead of copying the whole cache. Slots are no longer in position order, which
            # nothing relies on: masks and policies read the positions.
            if invalid is not None:
                self._pos[:, :, :held] = _marked(indices, invalid, self._pos[:, :, :held])
            order, (hb, hh, ht), src = _fill_holes(idx, held)
            for buf in (self._keys, self._values, self._pos):
                buf[hb, hh, ht] = buf[hb, hh, src]
            self._length = n
            self.slots_remapped = True
            return order
        # New buffers sized to what is kept (evicting is for saving memory), plus a little headroom so a
        # policy that evicts at every step or every few steps does not re-allocate in between.
        headroom = max(1, min(self.min_growth, n // 8 + 1))
        b, h, _, dk = keys.shape
        new_k = keys.new_empty((b, h, n + headroom, dk))
        new_v = values.new_empty((b, h, n + headroom, values.shape[-1]))
        new_p = pos.new_empty((b, h, n + headroom))
        new_k[:, :, :n] = keys.gather(2, idx[..., None].expand(-1, -1, -1, dk))
        new_v[:, :, :n] = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
        new_p[:, :, :n] = _marked(indices, invalid, pos).gather(2, idx)
        self._keys, self._values, self._pos, self._length = new_k, new_v, new_p, n
        self.slots_remapped = True
        return idx

    def index_batch(self, index: torch.Tensor) -> None:
        if self._keys is None or self._values is None:
            return
        index = index.to(self._keys.device)
        # Whole buffer, spare slots included: beam search reorders every step, and keeping the spare
        # slots avoids a re-allocation on the very next update.
        self._keys = self._keys.index_select(0, index)
        self._values = self._values.index_select(0, index)
        if self._pos is not None:
            self._pos = self._pos.index_select(0, index)

    def crop(self, length: int) -> None:
        if length < 0 or length > self._length:
            raise KVCacheError(f"crop length must be in [0, {self._length}] (tokens held), got {length}")
        if self.seen != self._length:
            raise KVCacheError("crop() is only valid before any eviction (tokens seen != tokens held)")
        self._length = length
        self.seen = length

    def memory(self) -> MemoryUse:
        return _memory(self._keys, self._values, self._pos)

    def reset(self) -> None:
        # A growable store keeps nothing: the next prompt may have another batch size or length.
        self._keys = self._values = self._pos = None
        self._length = 0
        self.seen = 0
        self.slots_remapped = False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``seen``, ``remapped`` and, when not empty, the held ``keys``/``values`` ``(B, H_kv, T, D)`` and
        ``positions`` ``(B, H_kv, T)``."""
        state = {"seen": torch.tensor(self.seen), "remapped": torch.tensor(self.slots_remapped)}
        kv, pos = self.keys_values(), self.positions
        if kv is not None and pos is not None:
            state.update(keys=kv[0].clone(), values=kv[1].clone(), positions=pos.clone())
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        seen, remapped = _state_counts(state, "DynamicLayer")
        if "keys" in state:
            keys, values, pos = _state_kv(state, "DynamicLayer", seen)
            self._keys, self._values, self._pos = keys.clone(), values.clone(), pos.clone()
            self._length = keys.shape[2]
        self.seen = seen
        self.slots_remapped = remapped


class StaticLayer(CacheLayer):
    """A preallocated store of ``capacity`` slots, written in place (``torch.compile``-friendly).

    The buffers ``(B, H_kv, capacity, D)`` are allocated once; ``update`` writes the new tokens with
    ``index_copy_`` at a position held in a 0-d device tensor, so a decode step has no host synchronisation
    and keeps the buffer addresses fixed (they are marked static for CUDA graphs). ``update`` returns the
    whole buffers; slots past the tokens held are masked by the causal mask (``KVCache.get_mask_sizes``
    reports ``capacity``).

    Lengths live in two places. Eagerly, the Python counts are the truth and ``update`` checks the capacity
    with them. Inside a compiled step (``torch.compile``), reading or bumping a Python count that changes
    every step would make it a graph input that changes every step (recompiles, no CUDA graphs), so a
    compiled step moves only the device position and the counts are re-read from it (one host sync) the
    next time they are asked for. The capacity check is then the caller's: a compiled step cannot raise
    without a host sync (``kvcache.generate`` checks ``physical_length()`` before every step).

    Parameters
    ----------
    capacity:
        Slots per sequence. An eager update that would exceed it raises
        :class:`~kvcache.errors.CacheCapacityError` before writing anything.
    batch_size, num_kv_heads, head_dim:
        Shape of the preallocated buffers.
    dtype, device:
        Of the buffers. If the first update of an empty layer brings another batch size, dtype or device
        (e.g. beam search expands the batch), the buffers are allocated again to match, once.
    pin_memory:
        Allocate host buffers page-locked (an offloaded store on an accelerator copies them asynchronously).
    """

    capabilities = LayerCapabilities(croppable=True, keep_group=1, compileable=True, appends_in_order=True)

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
    ) -> None:
        for name, v in (("capacity", capacity), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise KVCacheError(f"StaticLayer {name} must be an integer >= 1, got {v!r}")
        self.capacity = capacity
        self.pin_memory = pin_memory  # page-locked host buffers (offload: asynchronous copies)
        self._allocate(batch_size, num_kv_heads, head_dim, head_dim, dtype, torch.device(device or "cpu"))
        super().__init__()  # sets seen = 0 through the property below

    def _allocate(self, b: int, h: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device) -> None:
        pin = self.pin_memory and device.type == "cpu"
        self._keys = torch.zeros((b, h, self.capacity, dk), dtype=dtype, device=device, pin_memory=pin)
        self._values = torch.zeros((b, h, self.capacity, dv), dtype=dtype, device=device, pin_memory=pin)
        # Logical index of each slot; -1 for unfilled slots, so a mask built from it hides them.
        self._pos = torch.full((b, h, self.capacity), -1, dtype=POSITION_DTYPE, device=device,
                               pin_memory=pin)
        # Physical write position as a device tensor: a step computes its slots from it without a host sync.
        self._write_pos = torch.zeros((), dtype=torch.long, device=device)
        self._length = 0  # slots held (host copy of _write_pos, valid unless _stale)
        self._evicted = 0  # tokens seen but dropped: seen = held + evicted; changes only in eager keep/crop
        self._stale = False  # a compiled step moved _write_pos without updating _length
        self._mark_static()

    def _mark_static(self) -> None:
        # Fixed addresses: mutating them in a compiled step must not count as mutating graph inputs
        # (which would make torch.compile skip CUDA graphs).
        if not torch.compiler.is_compiling():
            for t in (self._keys, self._values, self._pos, self._write_pos):
                torch._dynamo.mark_static_address(t)

    # ----- lengths --------------------------------------------------------------------------------------
    def _held(self) -> int:
        if self._stale:
            self._length = int(self._write_pos)  # the one host sync after compiled steps
            self._stale = False
        return self._length

    @property  # type: ignore[override]
    def seen(self) -> int:
        return self._held() + self._evicted

    @seen.setter
    def seen(self, value: int) -> None:
        self._evicted = value - self._held()

    @property
    def physical_length(self) -> int:
        return self._held()

    @property
    def evicted(self) -> int:
        return self._evicted

    def seen_tensor(self) -> torch.Tensor:
        return self._write_pos + self._evicted

    @property
    def max_capacity(self) -> int | None:
        return self.capacity

    # ----- the contract ---------------------------------------------------------------------------------
    def _make_room(self, key: torch.Tensor, value: torch.Tensor, count: int) -> None:
        """Check (eagerly) that ``count`` more tokens fit, and re-allocate an empty store whose buffers are
        not laid out like ``key``/``value``.

        Raises
        ------
        CacheCapacityError
            If they do not fit.
        """
        held = self._held()
        if held + count > self.capacity:
            raise CacheCapacityError(
                f"static cache overflow: capacity is {self.capacity} tokens, {held} are held and "
                f"{count} more were requested; use a larger capacity (static:capacity=N with "
                f"N >= {held + count}) or the growable 'dynamic' layout"
            )
        k_buf, v_buf = self._keys, self._values
        same_kind = (key.dtype, key.device) == (k_buf.dtype, k_buf.device)
        if not same_kind or _layout(key, value) != _layout(k_buf, v_buf):
            if held or self._evicted:
                raise KVCacheError(
                    f"new keys {tuple(key.shape)} {key.dtype} on {key.device} do not match the static "
                    f"buffers {tuple(k_buf.shape)} {k_buf.dtype} on {k_buf.device}; "
                    "call reset() before a new batch"
                )
            b, h, _, dk = key.shape
            self._allocate(b, h, dk, value.shape[3], key.dtype, key.device)

    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``(B, H_kv, T_new, D)`` keys/values; return the full ``(B, H_kv, capacity, D)`` buffers.

        Raises
        ------
        CacheCapacityError
            If ``T_new`` more tokens do not fit (checked eagerly); nothing is written.
        """
        _check_kv(key, value)
        t = key.shape[2]
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self._make_room(key, value, t)
        slots = torch.arange(t, device=self._keys.device) + self._write_pos
        b, h = key.shape[:2]
        self._keys.index_copy_(2, slots, key)
        self._values.index_copy_(2, slots, value)
        self._pos.index_copy_(2, slots, new_positions(self.seen_tensor(), t, valid, b, h, self._keys.device))
        self._write_pos.add_(t)
        if compiling:
            self._stale = True
        else:
            self._length += t
        return self._keys, self._values

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        held = self._held()
        if held == 0:
            return None
        return self._keys[:, :, :held], self._values[:, :, :held]

    def open_slots(self, count: int, key_like: torch.Tensor,
                   value_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(B, H_kv, capacity, D)`` buffers for a runtime that writes ``count`` new tokens into
        them itself (see :meth:`DynamicLayer.open_slots`); :meth:`commit_slots` then records them.

        Raises
        ------
        CacheCapacityError
            If ``count`` more tokens do not fit.
        """
        self._make_room(key_like, value_like, count)
        return self._keys, self._values

    def commit_slots(self, count: int, valid: torch.Tensor | None = None) -> None:
        """Record ``count`` tokens written in place after the held ones (see :meth:`open_slots`)."""
        held = self._held()
        if held + count > self.capacity:
            raise KVCacheError(f"commit_slots({count}) without open_slots() room for them")
        if count == 1 and valid is None and self._pos.device.type == "cpu":
            # a decode step on the host: numpy is cheaper than two torch ops
            self._pos.numpy()[:, :, held] = held + self._evicted
            self._write_pos.numpy()[()] += 1
        else:
            b, h = self._pos.shape[:2]
            self._pos[:, :, held : held + count].copy_(
                new_positions(self.seen, count, valid, b, h, self._pos.device))
            self._write_pos.add_(count)
        self._length += count

    @property
    def positions(self) -> torch.Tensor:
        return self._pos

    @property
    def batch_size(self) -> int:
        return self._keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self._keys.device

    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        held = self._held()
        if held == 0:
            raise KVCacheError("keep() called on an empty layer; there is nothing to select from")
        keys, values = self._keys[:, :, :held], self._values[:, :, :held]
        idx = _sorted_slots(indices, invalid, self._pos[:, :, :held])
        pos = _marked(indices, invalid, self._pos[:, :, :held]).gather(2, idx)
        n = idx.shape[-1]
        new_k = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        new_v = values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
        # Compact in place into the first n slots: the buffers keep their addresses. Slots past them are
        # unfilled again (-1), so no stale position can be attended.
        self._keys[:, :, :n].copy_(new_k)
        self._values[:, :, :n].copy_(new_v)
        self._pos[:, :, :n].copy_(pos)
        self._pos[:, :, n:].fill_(-1)
        self._evicted += held - n
        self._length = n
        self._write_pos.fill_(n)
        self.slots_remapped = True
        return idx

    def index_batch(self, index: torch.Tensor) -> None:
        index = index.to(self._keys.device)
        new_k = self._keys.index_select(0, index)
        new_v = self._values.index_select(0, index)
        new_p = self._pos.index_select(0, index)
        if new_k.shape == self._keys.shape:
            # Same batch size (beam reorder): copy back so the buffer addresses stay fixed.
            self._keys.copy_(new_k)
            self._values.copy_(new_v)
            self._pos.copy_(new_p)
        else:
            self._keys, self._values, self._pos = new_k, new_v, new_p
            self._mark_static()

    def crop(self, length: int) -> None:
        held = self._held()
        if length < 0 or length > held:
            raise KVCacheError(f"crop length must be in [0, {held}] (tokens held), got {length}")
        if self._evicted:
            raise KVCacheError("crop() is only valid before any eviction (tokens seen != tokens held)")
        self._length = length
        self._write_pos.fill_(length)
        self._pos[:, :, length:].fill_(-1)

    def memory(self) -> MemoryUse:
        return _memory(self._keys, self._values, self._pos)

    def reset(self) -> None:
        # Stale K/V need no zeroing: their positions are -1, so every mask hides them.
        self._length = self._evicted = 0
        self._stale = False
        self._write_pos.zero_()
        self._pos.fill_(-1)
        self.slots_remapped = False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``capacity``, ``seen``, ``remapped`` and the held ``keys``/``values`` ``(B, H_kv, T, D)`` and
        ``positions`` ``(B, H_kv, T)`` (the held slots are always the first ``T``)."""
        held = self._held()
        return {"capacity": torch.tensor(self.capacity), "seen": torch.tensor(self.seen),
                "remapped": torch.tensor(self.slots_remapped), "keys": self._keys[:, :, :held].clone(),
                "values": self._values[:, :, :held].clone(), "positions": self._pos[:, :, :held].clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        capacity = int(state_entry(state, "capacity", "StaticLayer"))
        if capacity != self.capacity:
            raise KVCacheError(
                f"the saved static layer has capacity {capacity}, this cache {self.capacity}; "
                f"load it into a cache built with static:capacity={capacity}"
            )
        seen, remapped = _state_counts(state, "StaticLayer")
        keys, values, pos = _state_kv(state, "StaticLayer", seen)
        held = keys.shape[2]
        b, h, _, dk = keys.shape
        self._allocate(b, h, dk, values.shape[3], keys.dtype, self._keys.device)
        self._keys[:, :, :held].copy_(keys)
        self._values[:, :, :held].copy_(values)
        self._pos[:, :, :held].copy_(pos)
        self._length = held
        self._write_pos.fill_(held)
        self._evicted = seen - held
        self.slots_remapped = remapped


def _state_counts(state: dict[str, torch.Tensor], owner: str) -> tuple[int, bool]:
    """``seen`` and ``remapped`` of a saved layer state."""
    seen = state_entry(state, "seen", owner)
    remapped = state_entry(state, "remapped", owner)
    if seen.numel() != 1 or remapped.numel() != 1 or int(seen) < 0:
        raise KVCacheError(f"the saved {owner} state has a malformed 'seen' or 'remapped' entry")
    return int(seen), bool(remapped)


def _state_kv(state: dict[str, torch.Tensor], owner: str,
              seen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The saved ``keys``, ``values`` and ``positions`` of a layer, checked against each other."""
    keys, values = state_entry(state, "keys", owner), state_entry(state, "values", owner)
    pos = state_entry(state, "positions", owner)
    if (keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]
            or tuple(pos.shape) != tuple(keys.shape[:3]) or keys.dtype != values.dtype):
        raise KVCacheError(
            f"the saved {owner} state holds keys {tuple(keys.shape)}, values {tuple(values.shape)} and "
            f"positions {tuple(pos.shape)}, which do not fit together ((B, H_kv, T, D) and (B, H_kv, T))"
        )
    if keys.shape[2] > seen:
        raise KVCacheError(
            f"the saved {owner} state holds {keys.shape[2]} slots but has seen only {seen} tokens")
    return keys, values, pos.to(POSITION_DTYPE)


def _sorted_slots(indices: torch.Tensor, invalid: torch.Tensor | None,
                  positions: torch.Tensor) -> torch.Tensor:
    """Validate ``keep()``'s arguments against the held ``(B, H_kv, T)`` positions; return the slot indices
    sorted ascending (int64)."""
    b, h, length = positions.shape
    if indices.dim() != 3 or indices.shape[0] != b or indices.shape[1] != h:
        raise KVCacheError(
            f"keep() indices must be (B, H_kv, n_keep) = ({b}, {h}, n); got {tuple(indices.shape)}"
        )
    if indices.shape[2] > length:
        raise KVCacheError(f"keep() asked for {indices.shape[2]} slots but the layer holds {length}")
    if invalid is not None and invalid.shape != indices.shape:
        raise KVCacheError(
            f"keep() invalid must match indices {tuple(indices.shape)}; got {tuple(invalid.shape)}"
        )
    return indices.to(device=positions.device, dtype=torch.long).sort(dim=-1).values


def _marked(indices: torch.Tensor, invalid: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """``positions`` with the slots ``invalid`` flags (aligned with ``indices``) set to -1."""
    if invalid is None:
        return positions
    indices = indices.to(device=positions.device, dtype=torch.long)
    kept = positions.gather(2, indices).masked_fill(invalid.to(positions.device), -1)
    return positions.clone().scatter_(2, indices, kept)


def _fill_holes(idx: torch.Tensor, held: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """How to keep the slots ``idx`` (sorted, ``(B, H, n)``) of ``held`` in place: kept slots below ``n``
    stay, kept slots at or above ``n`` move into the holes below ``n``.

    Every (row, head) has as many holes below ``n`` as kept slots above it, and ``nonzero`` lists both in
    (row, head, slot) order, so the i-th hole of a (row, head) pairs with its i-th mover.

    Returns
    -------
    order:
        ``(B, H, n)``: new slot ``j`` holds old slot ``order[..., j]``.
    holes:
        ``(rows, heads, slots)`` index tensors of the holes.
    sources:
        The slot each hole takes its content from.
    """
    b, h, n = idx.shape
    kept = torch.zeros(b, h, held, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
    hb, hh, ht = (~kept[..., :n]).nonzero().unbind(1)
    src = kept[..., n:].nonzero()[:, 2] + n
    order = torch.arange(n, device=idx.device).expand(b, h, n).clone()
    order[hb, hh, ht] = src
    return order, (hb, hh, ht), src


def _memory(*tensors: torch.Tensor | None) -> MemoryUse:
    """Bytes of tensors resident where attention reads them (the compute device, CPU included)."""
    return MemoryUse(device=sum(t.nbytes for t in tensors if t is not None))
