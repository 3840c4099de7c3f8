"""Saving a cache to a safetensors file and loading it back, for the model it was computed with.

A file holds every layer's state (:meth:`~kvcache.layers.base.CacheLayer.state_tensors`: keys, values, slot
positions, tokens seen and, under a retention policy, its scores and budgets) under ``layers.{i}.{name}``,
and in the safetensors metadata: a format tag and version, the cache spec, the fingerprint of the model (and
tokenizer) that computed it, and whatever the caller adds (a conversation's history).

Writes are atomic (a temporary file in the same folder, then ``os.replace``) and never replace an existing
file unless asked. Loading refuses, with a :class:`~kvcache.errors.KVCacheError` naming the problem, a file
that is not a safetensors file, is truncated, is not a kvcache file, or was computed by another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from kvcache.cache import KVCache, model_cache_shape
from kvcache.errors import KVCacheError
from kvcache.files import atomic_write

__all__ = ["FORMAT", "VERSION", "cache_state", "check_fingerprint", "model_fingerprint", "read_file",
           "restore_cache", "write_file"]

#: the ``format`` metadata entry of a kvcache cache file
FORMAT = "kvcache-cache"
#: bumped when the layout of the file changes incompatibly
VERSION = "1"


def cache_state(cache: KVCache) -> dict[str, torch.Tensor]:
    """Every layer's state, keyed ``layers.{i}.{name}`` (copies, safe to keep while the cache moves on).

    Raises
    ------
    KVCacheError
        A layer's store does not support saving (it names the store).
    """
    state: dict[str, torch.Tensor] = {}
    for i, store in enumerate(cache.stores):
        for name, tensor in store.state_tensors().items():
            state[f"layers.{i}.{name}"] = tensor.detach().contiguous()
    return state


def restore_cache(cache: KVCache, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`cache_state` output into ``cache`` (built from the same spec for the same model).

    Raises
    ------
    KVCacheError
        When the state has another number of layers or a layer's state does not fit its store.
    """
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in cache.stores]
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if prefix != "layers" or not index.isdigit() or not name:
            raise KVCacheError(f"unexpected entry '{key}' in a saved cache; the file is not a kvcache cache")
        if int(index) >= len(per_layer):
            raise KVCacheError(
                f"the saved cache has a layer {index}, but the model has {len(per_layer)} layers"
            )
        per_layer[int(index)][name] = tensor
    cache.reset()
    for i, (store, layer_state) in enumerate(zip(cache.stores, per_layer, strict=True)):
        if not layer_state:
            raise KVCacheError(f"the saved cache has no state for layer {i} of {len(per_layer)}")
        store.load_state({k: v.to(store.device) for k, v in layer_state.items()})


def model_fingerprint(model: Any, tokenizer: Any = None) -> dict[str, str]:
    """What identifies the model a cache belongs to: its class, cache shape, dtype, vocabulary and a hash of
    a sample of every weight (two models of the same config with other weights differ), and the tokenizer's
    class and size (the saved token ids depend on it)."""
    layers, heads, dims = model_cache_shape(model.config)
    digest = hashlib.sha256()
    dtype = "none"
    for name, param in model.named_parameters():
        dtype = str(param.dtype).removeprefix("torch.")
        sample = param.detach().flatten()[:64].to("cpu", torch.float64)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    fingerprint = {
        "model_class": type(model).__name__,
        "cache_shape": f"{layers} layers, kv heads {heads}, head dims {dims}",
        "dtype": dtype,
        "vocab_size": str(model.get_input_embeddings().num_embeddings),
        "weights": digest.hexdigest()[:32],
    }
    if tokenizer is not None:
        fingerprint["tokenizer"] = f"{type(tokenizer).__name__} with {len(tokenizer)} tokens"
    return fingerprint


def check_fingerprint(saved: dict[str, str], current: dict[str, str], path: str | os.PathLike[str]) -> None:
    """Refuse a file whose fingerprint differs from the current model's, naming what differs."""
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differ:
        details = "; ".join(f"{k}: file {saved.get(k)!r}, model {current.get(k)!r}" for k in differ)
        raise KVCacheError(
            f"{path} was computed by another model ({details}); load it with the model (and dtype, "
            "tokenizer) that wrote it"
        )


def write_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               *, overwrite: bool = False) -> Path:
    """Write ``tensors`` and ``metadata`` (plus the format tag and version) to ``path`` atomically.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another file or pass overwrite=True to replace it")
    if target.is_dir():
        raise KVCacheError(f"{target} is a directory; give a file name such as {target / 'chat.safetensors'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT, "version": VERSION, **metadata})
    return target


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file :func:`write_file` wrote: ``(tensors on the CPU, metadata)``.

    Raises
    ------
    KVCacheError
        The file is missing, not a (complete) safetensors file, not a kvcache file, or of another version.
    """
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise KVCacheError(f"{source} does not exist or is not a file")
    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as err:  # safetensors raises its own error types, and OSError on short reads
        raise KVCacheError(
            f"{source} is not a readable safetensors file ({type(err).__name__}: {str(err)[:200]}); it is "
            "truncated, damaged or not a saved kvcache cache"
        ) from err
    if metadata.get("format") != FORMAT:
        raise KVCacheError(
            f"{source} is a safetensors file but not a saved kvcache cache (format "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if metadata.get("version") != VERSION:
        raise KVCacheError(
            f"{source} was written in format version {metadata.get('version')!r}; this kvcache reads "
            f"version {VERSION}"
        )
    return tensors, metadata


def dumps(value: Any) -> str:
    """JSON for a metadata entry."""
    return json.dumps(value, separators=(",", ":"))


def loads(metadata: dict[str, str], key: str, path: str | os.PathLike[str]) -> Any:
    """A JSON metadata entry, or a :class:`KVCacheError` when it is missing or malformed."""
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as err:
        raise KVCacheError(f"{path} has a missing or malformed '{key}' entry; the file is damaged") from err
