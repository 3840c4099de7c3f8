"""Does a generation fit? The model's context length and the memory a cache will take, checked up front.

A request such as ``static:capacity=1000000000`` or ``max_new_tokens=10**12`` would otherwise fail deep in
an allocator with a C++ message (or make the machine swap); here it is compared with the memory the device
has free *before* anything is allocated, and refused with a message that names the setting to lower.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from kvcache.errors import KVCacheError

#: config fields that hold a model's context length, by architecture family
CONTEXT_FIELDS: tuple[str, ...] = (
    "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class CacheMemoryError(KVCacheError):
    """What a generation asks for (cache capacity, new tokens) does not fit in the device's free memory."""


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for, or ``None`` when its config sets none (ALiBi models)."""
    text = config.get_text_config(decoder=True)
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now (``None`` when it cannot be told: other accelerators)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop always returns


def _spec_capacity(spec: Any) -> int | None:
    """``N`` of a ``static:capacity=N`` layout, else ``None``."""
    layout = getattr(spec, "layout", None)
    params = getattr(layout, "params", None) or {}
    capacity = params.get("capacity") if hasattr(params, "get") else None
    return int(capacity) if isinstance(capacity, int) else None


def _is_static(spec: Any) -> bool:
    return getattr(getattr(spec, "layout", None), "name", "dynamic") == "static"


def _bounded_by_policy(spec: Any) -> bool:
    """A retention policy other than ``full`` caps the cache below the sequence length."""
    policy = getattr(spec, "policy", None)
    return getattr(policy, "name", "full") != "full"


def estimate_bytes(config: Any, spec: Any, *, batch: int, prompt_len: int, max_new_tokens: int,
                   dtype: torch.dtype) -> tuple[int, str]:
    """Bytes a generation allocates for its cache and masks at most, and the setting that drives them.

    A preallocated layout (``static``) takes its whole capacity at once; a growable one takes the full
    sequence when it runs to ``max_new_tokens`` and no retention policy bounds it. Quantized precisions
    are counted at full precision (an upper bound).
    """
    from kvcache.cache import model_cache_shape

    total = prompt_len + max_new_tokens
    layers, kv_heads, head_dims = model_cache_shape(config)
    per_token = 2 * batch * sum(h * d for h, d in zip(kv_heads, head_dims, strict=True)) * dtype.itemsize
    capacity = _spec_capacity(spec)
    if capacity is not None:
        length, knob = max(capacity, prompt_len), "static:capacity=N"
    elif _is_static(spec) or not _bounded_by_policy(spec):
        length, knob = total, "max_new_tokens (--max-new-tokens)"
    else:
        # A retention policy holds at most the prompt (while it is prefilled) and then its budget, which a
        # floor (min_tokens) may raise above the prompt while decoding.
        floor = getattr(spec.policy, "params", {}).get("min_tokens") or 0
        length, knob = max(prompt_len, min(total, floor)), "max_new_tokens (--max-new-tokens)"
    # the decode loop's attention mask spans every position (and every slot of a static cache), int64
    mask = batch * max(total, capacity or 0) * 8
    return per_token * length + mask, knob


def check_fits(config: Any, spec: Any, *, batch: int, prompt_len: int, max_new_tokens: int,
               device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse a prompt longer than the model's context, and a cache that cannot fit in free memory.

    A prompt that fits but would run past the context while generating gets a warning: positions past the
    trained range make the text degrade (or fail on learned position tables) from that point on.

    Raises
    ------
    KVCacheError
        The prompt is longer than the model's context.
    CacheMemoryError
        The cache and masks would need more memory than ``device`` has free.
    """
    context = context_length(config)
    if context is not None and prompt_len > context:
        raise KVCacheError(f"the prompt has {prompt_len} tokens (left padding included) but the model's "
                           f"context is {context} tokens; shorten the prompt")
    need, knob = estimate_bytes(config, spec, batch=batch, prompt_len=prompt_len,
                                max_new_tokens=max_new_tokens, dtype=dtype)
    free = available_memory(device)
    if free is not None and need > free:
        # With a policy the cache is bounded already: what grows is the attention mask over every token.
        fix = (" (the attention mask spans every token generated, 8 bytes each per row)"
               if _bounded_by_policy(spec)
               else ", or bound the cache with a retention policy (e.g. h2o:budget=0.25)")
        raise CacheMemoryError(
            f"this generation needs up to {human_bytes(need)} for its KV cache and masks ({batch} row(s), "
            f"{prompt_len} prompt + {max_new_tokens} new tokens) but {torch.device(device)} has "
            f"{human_bytes(free)} free; lower {knob}{fix}")
    if context is not None and prompt_len + max_new_tokens > context:
        warnings.warn(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                      f"context of {context} tokens; text generated past it is unreliable", stacklevel=3)
