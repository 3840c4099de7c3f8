"""Building a layer's store from a cache spec: one builder per layout, one per wrapping kind.

A spec names at most one layout (``dynamic``, ``static``), one precision (``quantized``) and one placement
(``offload``). A precision's builder makes the store in place of the layout's (given the layout part: a
quantized store of fixed capacity for ``static``), else the layout's builder makes it; a placement's builder
then wraps it (what is stored, then where it lives). A kind without a builder here is not built yet and is
refused with the parts that are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvcache.errors import KVCacheError, UnsupportedSpecError
from kvcache.layers.base import POSITION_DTYPE, CacheLayer, MemoryUse
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.layers.offloaded import build_offloaded, host_shape, offloaded_bytes
from kvcache.layers.quantized import QuantizedLayer, quantized_bytes
from kvcache.spec import CacheSpec, SpecPart

__all__ = [
    "INNER_SHAPES", "LayerShape", "LAYOUTS", "LAYOUT_SLOTS", "PRECISIONS", "PRECISION_BYTES", "WRAPPERS",
    "WRAPPER_BYTES", "build_store", "dense_bytes", "estimate_store",
]


@dataclass(frozen=True)
class LayerShape:
    """What a builder needs to know about one layer and the run.

    Attributes
    ----------
    num_kv_heads, head_dim:
        Of this layer.
    batch_size:
        Sequences per batch (times beams), for preallocated stores.
    max_cache_len:
        Prompt + new tokens, the capacity of a ``static`` layout given without ``capacity=N``.
    device, dtype:
        Of preallocated buffers.
    pin_memory:
        Host buffers page-locked (the inner store of an offloaded layer on an accelerator).
    """

    num_kv_heads: int
    head_dim: int
    batch_size: int = 1
    max_cache_len: int | None = None
    device: torch.device | str | None = None
    dtype: torch.dtype = torch.float32
    pin_memory: bool = False


LayoutBuilder = Callable[[Mapping[str, Any], LayerShape], CacheLayer]
WrapperBuilder = Callable[[CacheLayer, Mapping[str, Any], LayerShape], CacheLayer]
#: (layout params, shape, tokens held) -> slots the layout allocates for them
LayoutSlots = Callable[[Mapping[str, Any], LayerShape, int], int]
#: (bytes of the inner store, its slots, params, shape) -> bytes once wrapped
WrapperBytes = Callable[[MemoryUse, int, Mapping[str, Any], LayerShape], MemoryUse]
PrecisionBuilder = Callable[[SpecPart, Mapping[str, Any], LayerShape], CacheLayer]
#: (layout part, tokens held, params, shape) -> bytes of the store
PrecisionBytes = Callable[[SpecPart, int, Mapping[str, Any], LayerShape], MemoryUse]


def _dynamic(params: Mapping[str, Any], shape: LayerShape) -> CacheLayer:
    return DynamicLayer(pin_memory=shape.pin_memory)


def _static_capacity(params: Mapping[str, Any], shape: LayerShape, what: str = "a static cache",
                     example: str = "static:capacity=N") -> int:
    """The fixed slot count of a ``static`` layout: ``capacity=N``, else the run's ``max_cache_len``."""
    capacity = params.get("capacity") or shape.max_cache_len
    if capacity is None:
        raise KVCacheError(
            f"{what} needs a capacity: write '{example}' or pass max_cache_len=N (prompt length + new tokens)"
        )
    return int(capacity)


def _static(params: Mapping[str, Any], shape: LayerShape) -> CacheLayer:
    capacity = _static_capacity(params, shape)
    return StaticLayer(capacity, shape.batch_size, shape.num_kv_heads, shape.head_dim, shape.dtype,
                       shape.device, pin_memory=shape.pin_memory)


def _static_slots(params: Mapping[str, Any], shape: LayerShape, tokens: int) -> int:
    return int(params.get("capacity") or shape.max_cache_len or tokens)


#: layout name -> builder of the store
LAYOUTS: dict[str, LayoutBuilder] = {"dynamic": _dynamic, "static": _static}
#: layout name -> slots it allocates to hold a number of tokens (a growable layout: the tokens themselves)
LAYOUT_SLOTS: dict[str, LayoutSlots] = {"dynamic": lambda params, shape, tokens: tokens,
                                        "static": _static_slots}


def _quantized(layout: SpecPart, params: Mapping[str, Any], shape: LayerShape) -> CacheLayer:
    # Replaces the layout's store (its slots hold codes now); a static layout gives it a fixed capacity.
    capacity = None
    if layout.name == "static":
        capacity = _static_capacity(layout.params, shape, "a quantized static cache",
                                    "static:capacity=N+int4")
    return QuantizedLayer(params.get("bits", 4), params.get("group", 64), params.get("residual", 128),
                          capacity=capacity)


def _quantized_bytes(layout: SpecPart, tokens: int, params: Mapping[str, Any],
                     shape: LayerShape) -> MemoryUse:
    capacity = _static_slots(layout.params, shape, tokens) if layout.name == "static" else None
    return MemoryUse(device=quantized_bytes(
        tokens, shape.batch_size, shape.num_kv_heads, shape.head_dim, shape.dtype, params.get("bits", 4),
        params.get("group", 64), params.get("residual", 128), capacity=capacity))


#: precision name -> builder of a store that replaces the layout's (given the layout part)
PRECISIONS: dict[str, PrecisionBuilder] = {"quantized": _quantized}
#: precision name -> bytes of its store for the layout part and a number of tokens
PRECISION_BYTES: dict[str, PrecisionBytes] = {"quantized": _quantized_bytes}
#: placement name -> builder that wraps the store
WRAPPERS: dict[str, WrapperBuilder] = {"offload": build_offloaded}
#: placement name -> how it changes the bytes (and their place) of the store it wraps
WRAPPER_BYTES: dict[str, WrapperBytes] = {"offload": offloaded_bytes}
#: placement name -> the shape the layout and precision under it are built with (offload: on the host)
INNER_SHAPES: dict[str, Callable[[LayerShape], LayerShape]] = {"offload": host_shape}


def build_store(spec: CacheSpec, shape: LayerShape) -> CacheLayer:
    """The store of one layer for ``spec``.

    Raises
    ------
    UnsupportedSpecError
        When a part of the spec has no builder in this release.
    KVCacheError
        When the parts' parameters do not fit the run (e.g. ``static`` without a capacity).
    """
    built = set(LAYOUTS) | set(PRECISIONS) | set(WRAPPERS)
    missing = [p.name for p in _storage_parts(spec) if p.name not in built]
    if missing:
        raise UnsupportedSpecError(
            f"the cache spec '{spec}' names {', '.join(missing)}, which this release cannot build; "
            f"built: {', '.join(sorted(built))}"
        )
    placement = spec.placement
    inner = INNER_SHAPES[placement.name](shape) if placement is not None and placement.name in INNER_SHAPES \
        else shape
    if spec.precision is not None:
        store = PRECISIONS[spec.precision.name](spec.layout, spec.precision.params, inner)
    else:
        store = LAYOUTS[spec.layout.name](spec.layout.params, inner)
    if placement is not None:
        store = WRAPPERS[placement.name](store, placement.params, shape)
    return store


def _storage_parts(spec: CacheSpec) -> list[SpecPart]:
    """The parts that decide how K/V are stored: layout, then precision and placement when given."""
    return [p for p in (spec.layout, spec.precision, spec.placement) if p is not None]


def dense_bytes(slots: int, shape: LayerShape) -> int:
    """Bytes of a full-precision store of ``slots`` slots: keys, values and slot positions, all rows."""
    per_slot = shape.num_kv_heads * (2 * shape.head_dim * shape.dtype.itemsize + POSITION_DTYPE.itemsize)
    return shape.batch_size * slots * per_slot


def estimate_store(spec: CacheSpec, shape: LayerShape, tokens: int) -> MemoryUse:
    """Bytes one layer's store for ``spec`` holds with ``tokens`` tokens per row, by place, unbuilt.

    The same arithmetic as the stores' own :meth:`~kvcache.layers.base.CacheLayer.memory` (a test holds
    them together), for choosing a spec before anything is allocated (``--max-cache-memory``, ``kvcache
    info``). Growth headroom of a growable store is not counted.
    """
    layout = spec.layout
    slots = LAYOUT_SLOTS[layout.name](layout.params, shape, tokens)
    if spec.precision is not None:
        use = PRECISION_BYTES[spec.precision.name](layout, tokens, spec.precision.params, shape)
    else:
        use = MemoryUse(device=dense_bytes(slots, shape))
    if spec.placement is not None and spec.placement.name in WRAPPER_BYTES:
        use = WRAPPER_BYTES[spec.placement.name](use, slots, spec.placement.params, shape)
    return use
