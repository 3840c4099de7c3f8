"""How much memory a cache spec will take for a generation, predicted before anything is allocated.

One function, :func:`estimate_cache`, sums the layer registry's per-layer prediction
(:func:`kvcache.layers.registry.estimate_store`, held to the stores' own ``memory()`` by tests) over the
model's layers. The memory check before a generation (:mod:`kvcache.resources`), ``max_cache_memory=``
(``--max-cache-memory``: the first spec of a fallback chain that fits) and ``kvcache info --estimate`` all
use it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvcache.errors import KVCacheError
from kvcache.layers.base import MemoryUse
from kvcache.layers.offloaded import is_accelerator
from kvcache.layers.registry import LayerShape, dense_bytes, estimate_store
from kvcache.spec import CacheSpec

__all__ = ["CacheEstimate", "estimate_cache", "estimate_chain", "first_fitting", "held_tokens", "parse_size"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from a size such as ``512MiB``, ``2GiB``, ``1.5GB``, ``4096`` (plain bytes) or an int.

    ``KiB/MiB/GiB/TiB`` (and ``K/M/G``) are powers of 1024, ``kB/MB/GB/TB`` powers of 1000.

    Raises
    ------
    KVCacheError
        For text that is not a non-negative number with one of those units.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise KVCacheError(f"a memory size cannot be negative, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise KVCacheError(f"cannot read {text!r} as a memory size; write a number of bytes or a number with "
                         "a unit, e.g. 512MiB, 2GiB, 1.5GB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class CacheEstimate:
    """A spec's predicted cache memory for one generation.

    Attributes
    ----------
    spec:
        The canonical spec.
    memory:
        Bytes the cache holds at most, by place (growth headroom of a growable store not counted).
    tokens:
        Tokens each row holds at most (a retention policy bounds it).
    transient:
        Device bytes of the copies an offloaded cache has on the accelerator during a layer's turn (that
        layer's and the next one's, at full precision); 0 for resident caches.
    """

    spec: str
    memory: MemoryUse
    tokens: int
    transient: int = 0

    def device_bytes(self, device: torch.device | str | None) -> int:
        """Bytes that count against the compute device's memory: everything on the CPU (host and device are
        the same memory), the device part plus the transient copies on an accelerator."""
        if not is_accelerator(device):
            return self.memory.total
        return self.memory.device + self.transient

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: spec, tokens, device/host/total bytes."""
        return {"spec": self.spec, "tokens": self.tokens, "device_bytes": self.memory.device,
                "host_bytes": self.memory.host, "transient_device_bytes": self.transient,
                "total_bytes": self.memory.total}


def held_tokens(spec: CacheSpec, prompt_len: int, max_new_tokens: int) -> int:
    """Tokens a row holds at most: the whole sequence, or with a retention policy the prompt (while it is
    prefilled) or the policy's budget plus the steps between evictions, whichever is larger."""
    total = prompt_len + max_new_tokens
    if spec.policy.name == "full":
        return total
    from kvcache.policies import POLICIES

    policy = POLICIES[spec.policy.name].from_params(spec.policy.params)
    return min(total, max(prompt_len, policy.row_budget(prompt_len) + policy.every))


def estimate_cache(config: Any, spec: str | CacheSpec, *, batch: int, prompt_len: int, max_new_tokens: int,
                   dtype: torch.dtype = torch.float32) -> CacheEstimate:
    """Predict the cache ``spec`` builds for a model with ``config``, ``batch`` rows of ``prompt_len`` prompt
    tokens (left padding included) and ``max_new_tokens`` new ones.

    Sums :func:`~kvcache.layers.registry.estimate_store` over the model's layers
    (:func:`kvcache.cache.model_cache_shape`); a ``static`` layout without ``capacity`` is sized to prompt +
    new tokens, as :func:`kvcache.generate` sizes it.
    """
    from kvcache.cache import model_cache_shape

    spec = CacheSpec.parse(spec)
    _, heads, dims = model_cache_shape(config)
    total = prompt_len + max_new_tokens
    tokens = held_tokens(spec, prompt_len, max_new_tokens)
    use, largest = MemoryUse(), 0
    for h, d in zip(heads, dims, strict=True):
        shape = LayerShape(h, d, batch_size=batch, max_cache_len=total, dtype=dtype)
        use = use + estimate_store(spec, shape, tokens)
        largest = max(largest, dense_bytes(tokens, shape))
    offloaded = spec.placement is not None and spec.placement.name == "offload"
    return CacheEstimate(str(spec), use, tokens, transient=2 * largest if offloaded else 0)


def estimate_chain(config: Any, specs: Sequence[str | CacheSpec], *, batch: int, prompt_len: int,
                   max_new_tokens: int, dtype: torch.dtype = torch.float32) -> list[CacheEstimate]:
    """:func:`estimate_cache` of every spec, in order."""
    return [estimate_cache(config, s, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                           dtype=dtype) for s in specs]


def first_fitting(estimates: Sequence[CacheEstimate], limit: int,
                  device: torch.device | str | None) -> int | None:
    """Index of the first estimate whose device bytes are at most ``limit`` (``None``: none fits)."""
    for i, est in enumerate(estimates):
        if est.device_bytes(device) <= limit:
            return i
    return None



#: what ``kvcache info --estimate`` predicts when no ``--cache`` is given
DEFAULT_ESTIMATE_SPECS: tuple[str, ...] = ("dynamic", "static", "int8", "int4", "int2", "h2o:budget=0.25",
                                            "h2o:budget=0.25+int4", "offload")


def estimate_for_model(model: str, specs: Sequence[str], *, batch: int, prompt_len: int,
                       max_new_tokens: int) -> dict[str, Any]:
    """What ``kvcache info --estimate`` prints: each spec's predicted cache for a model (by name or path, as
    :func:`kvcache.models.load` takes it, in its own dtype) and a prompt/generation size."""
    from kvcache.models import load

    lm, _ = load(model)
    dtype = next(lm.parameters()).dtype
    parsed = [CacheSpec.parse(s) for s in specs]
    for spec in parsed:
        spec.require_available()
    estimates = estimate_chain(lm.config, parsed, batch=batch, prompt_len=prompt_len,
                               max_new_tokens=max_new_tokens, dtype=dtype)
    return {"model": model, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "prompt_tokens": prompt_len, "new_tokens": max_new_tokens,
            "estimates": [e.to_dict() for e in estimates]}


def print_estimates(data: dict[str, Any], console: Any | None = None) -> None:
    """Print :func:`estimate_for_model`'s result as a table."""
    from rich.console import Console
    from rich.table import Table

    from kvcache.resources import human_bytes

    title = (f"predicted KV cache: {data['model']} ({data['dtype']}), batch {data['batch']}, "
             f"{data['prompt_tokens']} prompt + {data['new_tokens']} new tokens")
    table = Table(title=title, title_justify="left")
    for name in ("spec", "tokens held", "device", "host", "total"):
        table.add_column(name, justify="left" if name == "spec" else "right", no_wrap=True)
    for e in data["estimates"]:
        table.add_row(e["spec"], str(e["tokens"]), *(human_bytes(e[k]) for k in ("device_bytes", "host_bytes",
                                                                                   "total_bytes")))
    (console or Console()).print(table)
