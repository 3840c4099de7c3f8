"""A quantized K/V store: 2/4/8-bit codes for old tokens, full precision for the most recent ones (KIVI).

Slots come in two regions, in this order in everything the store returns: the **quantized** region (codes
of tokens that left the residual window, :mod:`kvcache.layers.quantize_ops` says how they are coded) and the
**residual** window (the newest tokens at full precision). A token is quantized exactly once, when it leaves
the residual window: once the window holds ``residual + group`` slots, its oldest slots go, a whole number
of ``group`` tokens at a time (keys share scales across ``group`` tokens, channel by channel), and the window
keeps between ``residual`` and ``residual + group - 1``. Codes are never dequantized and re-quantized, so
there is no drift.

Quantization waits until the layer's attention is done for the forward (:meth:`release`, or the next
:meth:`update`): a retention policy selecting the prompt inside the prefill forward drops tokens while they
are still at full precision, and only what it keeps is quantized.

Attention reads full-precision tensors: :meth:`update` dequantizes this layer's quantized region into a
transient buffer and appends the residual window (one layer at a time, so the full-precision working set is
one layer's, not the cache's). Why not attend to the codes block by block: see docs/quantized.md.

Eviction (:meth:`keep`) gathers codes slot by slot: a token's codes are packed along its channels and its
value scales are its own, so any subset of tokens can be kept exactly, and the memory of every dropped
token is freed. Key scales belong to a channel group of ``group`` tokens: once tokens of several groups sit
side by side, every slot records its group, and a group's scales are freed when the last of its tokens (in
that row and head) is dropped. Rows and heads may keep different numbers of quantized and residual tokens;
each region is as long as the longest, the shorter ones padded with slots that hold no token (position -1).
"""

from __future__ import annotations

import torch

from kvcache.errors import CacheCapacityError, KVCacheError
from kvcache.layers import quantize_ops as ops
from kvcache.layers.base import (
    POSITION_DTYPE,
    CacheLayer,
    LayerCapabilities,
    MemoryUse,
    new_positions,
    state_entry,
)
from kvcache.layers.dense import _marked, _sorted_slots

__all__ = ["QuantizedLayer", "quantized_bytes"]


def _grown(t: torch.Tensor | None, used: int, needed: int, like: torch.Tensor, shape_tail: tuple[int, ...],
           dtype: torch.dtype, capacity: int) -> torch.Tensor:
    """``t`` (time on dim 2) with room for ``needed`` slots: itself when it has it, else a new buffer of
    ``capacity`` slots holding its first ``used``."""
    if t is not None and t.shape[2] >= needed:
        return t
    b, h = like.shape[:2]
    new = torch.empty((b, h, capacity, *shape_tail), dtype=dtype, device=like.device)
    if t is not None and used:
        new[:, :, :used].copy_(t[:, :, :used])
    return new


class QuantizedLayer(CacheLayer):
    """Keys per channel and values per token in ``bits``-bit groups, with a full-precision residual window.

    Parameters
    ----------
    bits:
        2, 4 or 8 bits per stored value.
    group:
        Tokens sharing a key scale (per channel); channels sharing a value scale (per token), capped at the
        head dim (which it must then divide).
    residual:
        Most recent tokens kept at full precision (``0``: quantize every token once the forward is done).
    capacity:
        ``None`` for a growable store; else the fixed number of slots (``int8+static``): the quantized
        buffers are allocated once, at their first use, and an update past it raises
        :class:`~kvcache.errors.CacheCapacityError`. Unlike a ``static`` full-precision store, attention sees
        only the slots held (:attr:`max_capacity` stays ``None``): the dequantized tensors are built per
        step anyway, so there is no fixed buffer for a compiled step to reuse.
    min_growth:
        Fewest slots a growable buffer grows by.
    """

    capabilities = LayerCapabilities(croppable=True, keep_group=1, compileable=False)

    def __init__(self, bits: int = 4, group: int = 64, residual: int = 128, capacity: int | None = None,
                 min_growth: int = 128) -> None:
        super().__init__()
        if bits not in (2, 4, 8):
            raise KVCacheError(f"quantized bits must be 2, 4 or 8, got {bits!r}")
        if group < 1 or residual < 0 or (capacity is not None and capacity < 1):
            raise KVCacheError(f"quantized needs group >= 1, residual >= 0 and capacity >= 1; got "
                               f"group={group}, residual={residual}, capacity={capacity}")
        self.bits, self.group, self.residual, self.capacity = bits, group, residual, capacity
        self.min_growth = min_growth
        self.reset()

    # ----- sizes ---------------------------------------------------------------------------------------
    def _value_group(self, dv: int) -> int:
        return self.group if dv % self.group == 0 else dv

    def _check_dims(self, dk: int, dv: int) -> None:
        per_byte = 8 // self.bits
        if dk % per_byte or dv % per_byte:
            raise KVCacheError(f"{self.bits}-bit codes pack {per_byte} channels to a byte, but the head dims "
                               f"are {dk} (keys) and {dv} (values); use int8 for this model")

    @property
    def physical_length(self) -> int:
        return self._q_len + self._r_len

    @property
    def quantized_length(self) -> int:
        """Slots in the quantized region."""
        return self._q_len

    @property
    def batch_size(self) -> int:
        return 0 if self._r_keys is None else self._r_keys.shape[0]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._r_keys is None else self._r_keys.device

    # ----- the contract --------------------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H_kv, T_new, D)`` keys/values; return ``(B, H_kv, T_phys, D)`` full-precision keys and
        values of every slot (quantized region dequantized, then the residual window)."""
        if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
            raise KVCacheError(f"keys and values must be (B, H_kv, T, D) with the same B, H_kv and T; got "
                               f"keys {tuple(key.shape)} and values {tuple(value.shape)}")
        b, h, t, dk = key.shape
        dv = value.shape[-1]
        self._relayout = None  # whoever keeps state beside the slots took it after the last call, or never
        if self._r_keys is None or self._r_values is None or not (self.seen or self.physical_length):
            self._check_dims(dk, dv)
            self.reset()  # a new batch may bring another shape
        else:
            held = (*self._r_keys.shape[:2], self._r_keys.shape[3], self._r_values.shape[3])
            if (b, h, dk, dv) != held:
                raise KVCacheError(f"new keys {tuple(key.shape)} / values {tuple(value.shape)} do not match "
                                   f"the cached (B, H_kv, D_k, D_v) = {held}; call reset() first")
            self._flush()
        if self.capacity is not None:
            # Counted in tokens: rows padded to the longest (fillers) do not use up a row's capacity.
            positions = self.positions
            held = 0 if positions is None else int((positions >= 0).sum(-1).max())
            if held + t > self.capacity:
                raise CacheCapacityError(
                    f"the quantized static cache holds {self.capacity} tokens per sequence; {held} are held "
                    f"and {t} more do not fit: raise static:capacity=N (or max_cache_len)")
        new_pos = new_positions(self.seen, t, valid, b, h, key.device)
        end = self._r_len + t
        # Growth headroom, but never past the window's own size unless a prompt chunk is larger.
        room = min(end + max(self.min_growth, end // 4), max(end, self.residual + self.group))
        if self.capacity is not None:  # never more slots than the layer may hold
            room = min(room, max(end, self.capacity))
        self._r_keys = _grown(self._r_keys, self._r_len, end, key, (dk,), key.dtype, room)
        self._r_values = _grown(self._r_values, self._r_len, end, key, (dv,), value.dtype, room)
        self._r_pos = _grown(self._r_pos, self._r_len, end, key, (), POSITION_DTYPE, room)
        self._r_keys[:, :, self._r_len:end].copy_(key)
        self._r_values[:, :, self._r_len:end].copy_(value)
        self._r_pos[:, :, self._r_len:end].copy_(new_pos)
        self._r_len = end
        self.seen += t
        self._positions = None
        kv = self.keys_values()
        assert kv is not None
        return kv

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.physical_length or self._r_keys is None or self._r_values is None:
            return None
        q, r = self._q_len, self._r_len
        b, h, _, dk = self._r_keys.shape
        keys = self._r_keys.new_empty((b, h, q + r, dk))
        values = self._r_values.new_empty((b, h, q + r, self._r_values.shape[-1]))
        if q:
            ops.dequantize_keys(self._q_keys[:, :, :q], self._k_scale, self._k_zero, self.bits, self.group,
                                self._groups if self._groups is None else self._groups[:, :, :q],
                                out=keys[:, :, :q])
            ops.dequantize_values(self._q_values[:, :, :q], self._v_scale[:, :, :q], self._v_zero[:, :, :q],
                                  self.bits, out=values[:, :, :q])
        keys[:, :, q:].copy_(self._r_keys[:, :, :r])
        values[:, :, q:].copy_(self._r_values[:, :, :r])
        return keys, values

    @property
    def positions(self) -> torch.Tensor | None:
        if not self.physical_length or self._r_pos is None:
            return None
        if self._positions is None:
            parts = [self._r_pos[:, :, : self._r_len]]
            if self._q_len:
                parts.insert(0, self._q_pos[:, :, : self._q_len])
            self._positions = torch.cat(parts, dim=2)
        return self._positions

    def release(self) -> None:
        """The layer's attention is done for this forward: quantize what left the residual window."""
        self._flush()

    def _flush(self) -> None:
        """Quantize, in every row and head, the oldest real tokens of the window beyond ``residual``, a whole
        number of groups; slots without a token (left padding, slots given up) leave the window with them
        and are dropped.

        Decisions count each row's *real* tokens, so a row's groups hold the same tokens as when it runs
        alone (a left-padded batch gives each row its solo result). When rows differ (padding, per-head
        eviction), each region is as long as its longest row, the others padded with empty slots."""
        g = self.group
        if self._r_keys is None or self._r_values is None or self._r_pos is None or \
                self._r_len < self.residual + g:
            return
        pos = self._r_pos[:, :, : self._r_len]
        real = pos >= 0
        take = ((real.sum(-1) - self.residual).clamp(min=0) // g * g)[..., None]  # (B, H, 1)
        n = int(take.max())
        if not n:
            return
        leaving = real & (real.cumsum(-1) <= take)
        if bool((take == n).all()) and bool(leaving[..., :n].all()):
            # Every row and head sends its first n slots: slices, and slots keep their columns.
            q_idx = None
            filler = None
            stay = torch.arange(n, self._r_len, device=pos.device).expand(*pos.shape[:2], -1)
            r_pad = None
        else:
            # Leaving slots first (in arrival order), then staying real ones, then the rest (dropped).
            rank = torch.where(leaving, 0, torch.where(real, 1, 2)).to(torch.int8)
            order = torch.argsort(rank, dim=-1, stable=True)
            q_idx = order[..., :n]
            filler = torch.arange(n, device=pos.device) >= take
            stays = (real & ~leaving).sum(-1, keepdim=True)
            m = int(stays.max())
            stay = order.gather(-1, (take + torch.arange(m, device=pos.device)).clamp(max=self._r_len - 1))
            r_pad = torch.arange(m, device=pos.device) >= stays
            self.slots_remapped = True
            q = self._q_len
            moved = torch.cat([torch.arange(q, device=pos.device).expand(*pos.shape[:2], q), q_idx + q,
                               stay + q], dim=-1)
        self._append_quantized(q_idx, filler, n)
        self._keep_window(stay, r_pad)
        if q_idx is not None:
            # Rows that sent fewer tokens than the longest were padded: squeeze the padding out again, so
            # it never piles up over many flushes (the region stays as long as its fullest row).
            squeezed = self._compact_quantized()
            if squeezed is not None:
                moved = moved.gather(-1, squeezed)
            self._relayout = moved if self._relayout is None else self._relayout.gather(-1, moved)

    def _compact_quantized(self) -> torch.Tensor | None:
        """Drop the quantized slots that hold no token (fillers, slots given up), each row and head keeping
        its tokens in order; the region becomes as long as the row with most. Returns the move (new slot ->
        old slot, window included) or ``None`` when there was nothing to drop."""
        q = self._q_len
        real = self._q_pos[:, :, :q] >= 0
        count = real.sum(-1, keepdim=True)
        keep = max(int(count.max()), 1)
        if keep >= q:
            return None
        order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)[..., :keep]
        pad = torch.arange(keep, device=order.device) >= count
        self._keep_quantized(order, pad, self._q_pos[:, :, :q])
        window = torch.arange(q, q + self._r_len, device=order.device).expand(*order.shape[:2], -1)
        self._positions = None
        return torch.cat([order, window], dim=-1)

    def take_relayout(self) -> torch.Tensor | None:
        order, self._relayout = self._relayout, None
        return order

    def _append_quantized(self, index: torch.Tensor | None, filler: torch.Tensor | None, n: int) -> None:
        """Quantize window slots ``index`` ``(B, H, n)`` (``None``: the first ``n``; ``filler``: slots that
        only pad a row) and append them to the quantized region."""
        def window(t: torch.Tensor) -> torch.Tensor:
            if index is None:
                return t[:, :, :n]
            return t.gather(2, index if t.dim() == 3 else index[..., None].expand(-1, -1, -1, t.shape[-1]))

        g = self.group
        keys, values, pos = window(self._r_keys), window(self._r_values), window(self._r_pos)
        if filler is not None:
            pos = pos.masked_fill(filler, -1)
        pk, ks, kz = ops.quantize_keys(keys, pos >= 0, self.bits, g)
        pv, vs, vz = ops.quantize_values(values, None, self.bits, self._value_group(values.shape[-1]))
        q, ng, end = self._q_len, self._n_groups, self._q_len + n
        # Slack for a group or two: a re-allocation copies codes only, every few dozen groups on long runs.
        room = end + max(g, end // 64)
        if self.capacity is not None:  # allocated once, with a group of room for the fillers of ragged rows
            room = max(room, self.capacity + g)
        groups_room = max(-(-room // g), ng + n // g + 1)  # kept tokens may come from more groups than that
        self._q_keys = _grown(self._q_keys, q, end, keys, (pk.shape[-1],), torch.uint8, room)
        self._q_values = _grown(self._q_values, q, end, keys, (pv.shape[-1],), torch.uint8, room)
        self._v_scale = _grown(self._v_scale, q, end, keys, (vs.shape[-1],), vs.dtype, room)
        self._v_zero = _grown(self._v_zero, q, end, keys, (vz.shape[-1],), vz.dtype, room)
        self._q_pos = _grown(self._q_pos, q, end, keys, (), POSITION_DTYPE, room)
        self._k_scale = _grown(self._k_scale, ng, ng + n // g, keys, (ks.shape[-1],), ks.dtype, groups_room)
        self._k_zero = _grown(self._k_zero, ng, ng + n // g, keys, (kz.shape[-1],), kz.dtype, groups_room)
        self._q_keys[:, :, q:end] = pk
        self._q_values[:, :, q:end] = pv
        self._v_scale[:, :, q:end] = vs
        self._v_zero[:, :, q:end] = vz
        self._q_pos[:, :, q:end] = pos
        self._k_scale[:, :, ng:ng + n // g] = ks
        self._k_zero[:, :, ng:ng + n // g] = kz
        if self._groups is not None:
            self._groups = _grown(self._groups, q, end, keys, (), torch.long, room)
            self._groups[:, :, q:end] = ng + torch.arange(n, device=keys.device) // g
        self._q_len, self._n_groups = end, ng + n // g
        self._positions = None

    def _keep_window(self, stay: torch.Tensor, pad: torch.Tensor | None) -> None:
        """Keep window slots ``stay`` ``(B, H, m)`` (``pad``: filler slots, emptied), in a buffer no larger
        than the window needs (a long prompt made it large)."""
        m = stay.shape[-1]
        room = max(m, self.residual + self.group)
        for name in ("_r_keys", "_r_values", "_r_pos"):
            buf = getattr(self, name)
            index = stay if buf.dim() == 3 else stay[..., None].expand(-1, -1, -1, buf.shape[-1])
            kept = buf.gather(2, index)
            if name == "_r_pos" and pad is not None:
                kept = kept.masked_fill(pad, -1)
            if buf.shape[2] > room + self.min_growth:
                buf = buf.new_empty((*buf.shape[:2], room, *buf.shape[3:]))
                setattr(self, name, buf)
            buf[:, :, :m] = kept
        self._r_len = m
        self._positions = None

    def keep(self, indices: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        positions = self.positions
        if positions is None:
            raise KVCacheError("keep() called on an empty layer; there is nothing to select from")
        idx = _sorted_slots(indices, invalid, positions)
        marked = _marked(indices, invalid, positions)
        n, q = idx.shape[-1], self._q_len
        in_q = (idx < q).sum(-1, keepdim=True)  # (B, H, 1): quantized slots kept by each row and head
        nq, nr = int(in_q.max()), int((n - in_q).max())
        # Each region as long as its longest row/head; shorter ones point at slot 0 of the region, as -1.
        jq = torch.arange(nq, device=idx.device)
        q_pad = jq >= in_q
        q_sel = idx[..., :nq].masked_fill(q_pad, 0)
        jr = torch.arange(nr, device=idx.device)
        r_pad = jr >= n - in_q
        r_sel = idx.gather(-1, (in_q + jr).clamp(max=max(n - 1, 0))).masked_fill(r_pad, q)
        if nq:
            self._keep_quantized(q_sel, q_pad, marked)
        else:
            self._drop_quantized()
        r_pos = marked.gather(2, r_sel).masked_fill(r_pad, -1)
        r_local = r_sel - q
        self._r_keys = self._r_keys.gather(2, r_local[..., None].expand(-1, -1, -1, self._r_keys.shape[-1]))
        self._r_values = self._r_values.gather(
            2, r_local[..., None].expand(-1, -1, -1, self._r_values.shape[-1]))
        self._r_pos, self._r_len = r_pos, nr
        self.slots_remapped = True
        self._positions = None
        order = torch.cat([q_sel, r_sel], dim=-1)
        if self._relayout is not None:  # slots moved since the caller last looked: map to what it knows
            order, self._relayout = self._relayout.gather(-1, order), None
        return order

    def _keep_quantized(self, sel: torch.Tensor, pad: torch.Tensor, marked: torch.Tensor) -> None:
        """Gather the kept quantized slots ``sel`` ``(B, H, n)`` (``pad``: fillers); free unused groups."""
        def take(t: torch.Tensor) -> torch.Tensor:
            index = sel if t.dim() == 3 else sel[..., None].expand(-1, -1, -1, t.shape[-1])
            return t.gather(2, index)

        q = self._q_len
        groups = self._groups[:, :, :q] if self._groups is not None else (
            torch.arange(q, device=sel.device) // self.group).expand(*sel.shape[:2], q)
        self._q_keys, self._q_values = take(self._q_keys[:, :, :q]), take(self._q_values[:, :, :q])
        self._v_scale, self._v_zero = take(self._v_scale[:, :, :q]), take(self._v_zero[:, :, :q])
        self._q_pos = marked[:, :, :q].gather(2, sel).masked_fill(pad, -1)
        kept_groups = groups.gather(2, sel)
        # Key groups still referenced by a real kept slot, renumbered per (row, head) in their old order.
        count = torch.zeros(*sel.shape[:2], self._n_groups, dtype=torch.int32, device=sel.device)
        count.scatter_add_(2, kept_groups, (~pad).to(torch.int32).expand_as(kept_groups).contiguous())
        used = count > 0
        n_groups = max(int(used.sum(-1).max()), 1)
        renumber = (used.cumsum(-1) - 1).clamp(min=0)
        order = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)[..., :n_groups]
        index = order[..., None].expand(-1, -1, -1, self._k_scale.shape[-1])
        self._k_scale = self._k_scale[:, :, : self._n_groups].gather(2, index)
        self._k_zero = self._k_zero[:, :, : self._n_groups].gather(2, index)
        self._groups = renumber.gather(2, kept_groups)
        self._q_len, self._n_groups = sel.shape[-1], n_groups

    def _drop_quantized(self) -> None:
        self._q_keys = self._q_values = self._v_scale = self._v_zero = self._q_pos = None
        self._k_scale = self._k_zero = self._groups = None
        self._q_len = self._n_groups = 0

    def index_batch(self, index: torch.Tensor) -> None:
        for name in ("_r_keys", "_r_values", "_r_pos", "_q_keys", "_q_values", "_v_scale", "_v_zero",
                     "_q_pos", "_k_scale", "_k_zero", "_groups", "_relayout"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
        self._positions = None

    def crop(self, length: int) -> None:
        if length < 0 or length > self.physical_length:
            raise KVCacheError(f"crop length must be in [0, {self.physical_length}] (tokens held), "
                               f"got {length}")
        if self.seen != self.physical_length:
            raise KVCacheError("crop() is only valid before any eviction (tokens seen != tokens held)")
        if length >= self._q_len:
            self._r_len = length - self._q_len
        else:
            if self._groups is None and length % self.group:
                b, h = self._q_pos.shape[:2]
                self._groups = (torch.arange(self._q_pos.shape[2], device=self._q_pos.device)
                                // self.group).expand(b, h, -1).clone()
            if self._groups is None:
                self._n_groups = length // self.group
            self._q_len, self._r_len = length, 0
        self.seen = length
        self._positions = None

    # ----- saving ---------------------------------------------------------------------------------------
    _REGIONS = {"_r_keys": "window_keys", "_r_values": "window_values", "_r_pos": "window_positions",
                "_q_keys": "codes_keys", "_q_values": "codes_values", "_v_scale": "value_scale",
                "_v_zero": "value_zero", "_q_pos": "quantized_positions", "_groups": "key_group_of_slot",
                "_k_scale": "key_scale", "_k_zero": "key_zero"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The packed form: codes, scales, positions and the window as held, with the layer's settings and
        counts (``bits``, ``group``, ``residual``, ``capacity`` (-1: none), ``seen``, ``remapped``)."""
        state = {"bits": torch.tensor(self.bits), "group": torch.tensor(self.group),
                 "residual": torch.tensor(self.residual), "capacity": torch.tensor(self.capacity or -1),
                 "seen": torch.tensor(self.seen), "remapped": torch.tensor(self.slots_remapped)}
        for attr, name in self._REGIONS.items():
            t = getattr(self, attr)
            if t is not None:
                used = self._n_groups if attr in ("_k_scale", "_k_zero") else (
                    self._r_len if attr.startswith("_r") else self._q_len)
                state[name] = t[:, :, :used].clone()
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, mine in (("bits", self.bits), ("group", self.group), ("residual", self.residual),
                           ("capacity", self.capacity or -1)):
            saved = int(state_entry(state, name, "QuantizedLayer"))
            if saved != mine:
                raise KVCacheError(f"the saved quantized layer has {name}={saved}, this cache {name}={mine}; "
                                   "load it into a cache built with the spec it was saved with")
        self.reset()
        seen, remapped = int(state_entry(state, "seen", "QuantizedLayer")), bool(
            state_entry(state, "remapped", "QuantizedLayer"))
        for attr, name in self._REGIONS.items():
            if name in state:
                setattr(self, attr, state[name].clone())
        if self._r_keys is None or self._r_values is None or self._r_pos is None:
            if seen:
                state_entry(state, "window_keys", "QuantizedLayer")  # raises: a non-empty layer needs it
            return
        self._r_len = self._r_keys.shape[2]
        self._q_len = 0 if self._q_keys is None else self._q_keys.shape[2]
        self._n_groups = 0 if self._k_scale is None else self._k_scale.shape[2]
        shapes_fit = (self._r_values.shape[:3] == self._r_keys.shape[:3] == (*self._r_pos.shape,)
                      and (self._q_keys is None or (self._q_pos is not None
                                                    and self._q_keys.shape[:3] == self._q_pos.shape)))
        if not shapes_fit or self.physical_length > seen:
            raise KVCacheError("the saved quantized layer's tensors do not fit together; the file is damaged")
        self.seen, self.slots_remapped = seen, remapped

    def memory(self) -> MemoryUse:
        tensors = (self._r_keys, self._r_values, self._r_pos, self._q_keys, self._q_values, self._v_scale,
                   self._v_zero, self._q_pos, self._k_scale, self._k_zero, self._groups)
        return MemoryUse(device=sum(t.nbytes for t in tensors if t is not None))

    def reset(self) -> None:
        self._r_keys: torch.Tensor | None = None  # (B, H, C_r, D) residual window, full precision
        self._r_values: torch.Tensor | None = None
        self._r_pos: torch.Tensor | None = None  # (B, H, C_r)
        self._r_len = 0
        self._q_keys: torch.Tensor | None = None  # (B, H, C_q, D * bits / 8) uint8 codes
        self._q_values: torch.Tensor | None = None
        self._v_scale: torch.Tensor | None = None  # (B, H, C_q, D / group_v) per token
        self._v_zero: torch.Tensor | None = None
        self._q_pos: torch.Tensor | None = None  # (B, H, C_q)
        self._k_scale: torch.Tensor | None = None  # (B, H, C_groups, D) per channel, per key group
        self._k_zero: torch.Tensor | None = None
        self._groups: torch.Tensor | None = None  # (B, H, C_q) key group of each slot; None: slot // group
        self._q_len = self._n_groups = 0
        self._positions: torch.Tensor | None = None
        self._relayout: torch.Tensor | None = None  # slots moved by a flush, not yet taken
        self.seen = 0
        self.slots_remapped = False


def quantized_bytes(tokens: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype, bits: int,
                    group: int, residual: int, capacity: int | None = None) -> int:
    """Bytes a :class:`QuantizedLayer` holds with ``tokens`` tokens per row (growth headroom not counted).

    Once the residual window has been flushed, ``(tokens - residual) // group * group`` tokens are quantized
    and the rest sit in the window, a buffer of ``residual + group`` slots. With a ``capacity`` the quantized
    buffers hold ``capacity`` slots.
    """
    value_group = group if head_dim % group == 0 else head_dim
    itemsize = dtype.itemsize
    pos = POSITION_DTYPE.itemsize
    quantized = max(0, (tokens - residual) // group) * group
    # the window's buffer holds residual + group slots once tokens started leaving it
    window = tokens - quantized if not quantized else residual + group
    if capacity is not None:  # buffers allocated once, a group larger (fillers of ragged rows)
        window = min(residual + group, capacity)
        quantized = capacity + group if capacity >= residual + group else 0  # else nothing leaves the window
    per_quantized = 2 * head_dim * bits // 8 + 2 * (head_dim // value_group) * itemsize + pos
    key_groups = -(-quantized // group) * 2 * head_dim * itemsize
    per_window = 2 * head_dim * itemsize + pos
    return batch * heads * (quantized * per_quantized + key_groups + window * per_window)
