"""The arithmetic of KV quantization: asymmetric min/max group quantization and bit packing.

KIVI's layout (Liu et al., 2024): **keys per channel** (one scale and zero point per channel for a group of
``G`` consecutive tokens: key outliers live in fixed channels, so a channel's range is tight across tokens)
and **values per token** (one scale and zero point per token for a group of ``G`` consecutive channels:
value errors average out in the attention-weighted sum over tokens).

Codes are ``round((x - zero) / scale)`` in ``[0, 2**bits - 1]`` with ``zero = min`` and
``scale = (max - min) / (2**bits - 1)`` over the group; scale and zero point are stored in the model's dtype
and the codes are computed from those *stored* values, so dequantizing reproduces exactly what was meant.
Codes are packed along the channel axis, ``k = 8 // bits`` to a byte, so a token's codes stay together and
any set of tokens can be gathered without unpacking. Byte ``j`` of a token holds channels ``j``, ``j + D/k``,
``j + 2D/k``, ... (bits ``0``, ``bits``, ``2 bits``, ...): unpacking is one shift and mask per *slice* of
channels, each slice converted straight into its part of the output, then one multiply-add over the whole
output in place (the adjacent-channel layout needs an interleaving pass and a temporary float copy of the
codes: about 40% more time per layer and step on CPU, measured).
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_keys", "dequantize_values", "pack", "quantize_keys", "quantize_values", "unpack"]


def _per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., D)`` uint8 codes below ``2**bits`` -> ``(..., D * bits // 8)`` uint8 (``D`` a multiple of
    ``8 // bits``)."""
    k = _per_byte(bits)
    if k == 1:
        return codes.contiguous()
    width = codes.shape[-1] // k
    out = codes[..., :width].clone()
    for i in range(1, k):
        out |= codes[..., i * width:(i + 1) * width] << (bits * i)
    return out


def _slices(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The codes of channel slice ``i`` (``D/k`` channels each), as uint8, for every ``i``."""
    k = _per_byte(bits)
    if k == 1:
        return [packed]
    mask = (1 << bits) - 1
    return [packed & mask if i == 0 else (packed >> (bits * i)) & mask for i in range(k)]


def unpack(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., D * bits // 8)`` uint8 -> ``(..., D)`` codes as ``dtype``."""
    return torch.cat(_slices(packed, bits), dim=-1).to(dtype)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point in ``dtype`` for ranges ``[lo, hi]`` (float32); a flat range gets scale 1."""
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo.to(dtype)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    levels = (1 << bits) - 1
    q = ((x.float() - zero.float()) / scale.float()).round_().clamp_(0, levels)
    return q.to(torch.uint8)


def _masked_range(x: torch.Tensor, real: torch.Tensor | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` (float32) over ``dim``, ignoring entries where ``real`` is False (padding, given
    up slots: their values would only widen the range). A group with no real entry gets ``[0, 0]``."""
    x = x.float()
    if real is None:
        return x.amin(dim=dim), x.amax(dim=dim)
    lo = x.masked_fill(~real, float("inf")).amin(dim=dim)
    hi = x.masked_fill(~real, float("-inf")).amax(dim=dim)
    empty = torch.isinf(lo)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def quantize_keys(keys: torch.Tensor, real: torch.Tensor | None, bits: int,
                  group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``(B, H, n * group, D)`` keys per channel, ``group`` tokens to a scale.

    Parameters
    ----------
    real:
        ``(B, H, n * group)`` bool, False for slots without a real token (left out of the ranges).

    Returns
    -------
    packed:
        ``(B, H, n * group, D * bits // 8)`` uint8.
    scale, zero:
        ``(B, H, n, D)`` in the keys' dtype.
    """
    b, h, t, d = keys.shape
    grouped = keys.reshape(b, h, t // group, group, d)
    mask = None if real is None else real.reshape(b, h, t // group, group, 1)
    lo, hi = _masked_range(grouped, mask, dim=3)
    scale, zero = _scale_zero(lo, hi, bits, keys.dtype)
    codes = _codes(grouped, scale[:, :, :, None], zero[:, :, :, None], bits).reshape(b, h, t, d)
    return pack(codes, bits), scale, zero


def quantize_values(values: torch.Tensor, real: torch.Tensor | None, bits: int,
                    group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``(B, H, T, D)`` values per token, ``group`` channels to a scale (``D % group == 0``).

    Returns
    -------
    packed:
        ``(B, H, T, D * bits // 8)`` uint8.
    scale, zero:
        ``(B, H, T, D // group)`` in the values' dtype.
    """
    b, h, t, d = values.shape
    grouped = values.reshape(b, h, t, d // group, group)
    lo, hi = _masked_range(grouped, None, dim=4)
    scale, zero = _scale_zero(lo, hi, bits, values.dtype)
    codes = _codes(grouped, scale[..., None], zero[..., None], bits).reshape(b, h, t, d)
    return pack(codes, bits), scale, zero


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                    groups: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, T, D)`` keys from their codes and per-channel group scales.

    Parameters
    ----------
    packed:
        ``(B, H, T, D * bits // 8)`` uint8.
    scale, zero:
        ``(B, H, n_groups, D)``.
    groups:
        ``(B, H, T)`` int64 group of every slot, or ``None`` when slot ``t`` belongs to group ``t // group``
        (``T`` a multiple of ``group``: nothing evicted from the quantized part).
    out:
        Optional ``(B, H, T, D)`` tensor to write into.
    """
    b, h, t, _ = packed.shape
    d = scale.shape[-1]
    if out is None:
        out = scale.new_empty((b, h, t, d))
    if groups is None:
        n = t // group
        s, z, o = scale[:, :, :n, None], zero[:, :, :n, None], out.view(b, h, n, group, d)
    else:
        index = groups[..., None].expand(b, h, t, d)
        s, z, o = scale.gather(2, index), zero.gather(2, index), out
    _codes_into(out, packed, bits)
    # one multiply-add over the whole tensor, in place (the codes were converted straight into ``out``)
    torch.addcmul(z, o, s, out=o)
    return out


def _codes_into(out: torch.Tensor, packed: torch.Tensor, bits: int) -> None:
    """Write the codes of ``packed`` ``(..., D * bits // 8)`` into ``out`` ``(..., D)`` as floats, slice by
    slice (the uint8 -> float conversion happens in the copy: no temporary float tensor)."""
    parts = _slices(packed, bits)
    width = out.shape[-1] // len(parts)
    for i, codes in enumerate(parts):
        out[..., i * width:(i + 1) * width].copy_(codes)


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, T, D)`` values from codes ``(B, H, T, D * bits // 8)`` and per-token group scales
    ``(B, H, T, D // group)``."""
    b, h, t, _ = packed.shape
    d = packed.shape[-1] * 8 // bits
    n = scale.shape[-1]
    if out is None:
        out = scale.new_empty((b, h, t, d))
    _codes_into(out, packed, bits)
    grouped = out.view(b, h, t, n, d // n)
    torch.addcmul(zero[..., None], grouped, scale[..., None], out=grouped)
    return out
