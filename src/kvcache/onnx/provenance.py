"""Which graph an injected graph came from, and whether the files beside it still belong to it.

An injected graph records the file name and sha256 of the no-cache graph it was made from
(:data:`~kvcache.onnx.names.META_SOURCE_SHA256`). Before it runs, :func:`verify_source` compares that with
the graph now beside it: a re-export into the same directory that left an older injected graph behind
would otherwise run the *old* model with the *new* config and tokenizer, silently.
:func:`check_config_matches` compares the graph's cache inputs with ``config.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx

from kvcache.errors import KVCacheError
from kvcache.onnx import names


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record(model: onnx.ModelProto, source: Path) -> None:
    """Write ``source``'s file name and sha256 into ``model``'s metadata (replacing earlier values)."""
    meta = {names.META_SOURCE_FILE: source.name, names.META_SOURCE_SHA256: sha256_file(source)}
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def recorded_source(graph: Path) -> tuple[str, str] | None:
    """``(file name, sha256)`` of the graph ``graph`` was injected from, or ``None`` when not recorded."""
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise KVCacheError(f"{graph} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    if names.META_SOURCE_SHA256 not in meta:
        return None
    return meta.get(names.META_SOURCE_FILE, "model.onnx"), meta[names.META_SOURCE_SHA256]


def verify_source(graph: Path, source: Path | None = None) -> None:
    """Refuse an injected graph whose source graph has changed since it was injected.

    Parameters
    ----------
    graph:
        The injected graph.
    source:
        The no-cache graph it should come from; default: the recorded file name beside ``graph``. When
        that file does not exist (only the injected graph was shipped) there is nothing to compare.

    Raises
    ------
    KVCacheError
        The source's sha256 differs from the recorded one.
    """
    recorded = recorded_source(graph)
    if recorded is None:
        return
    name, digest = recorded
    path = source if source is not None else graph.parent / name
    if not path.is_file() or path.resolve() == graph.resolve():
        return
    if sha256_file(path) != digest:
        where = f"{path}" if source is not None else f"the {name} now beside it"
        raise KVCacheError(
            f"{graph} was injected from another graph than {where} (sha256 {digest[:12]}... recorded): it "
            f"belongs to an earlier export; inject again with `kvcache onnx inject {path}`")


def check_config_matches(signature: Any, config: Any, graph: Path) -> None:
    """Refuse a ``config.json`` whose layer count or cache shape differs from the graph's inputs.

    Raises
    ------
    KVCacheError
        Naming the first difference.
    """
    from kvcache.cache import model_cache_shape

    layers, kv_heads, head_dims = model_cache_shape(config)
    problems = []
    if signature.num_layers != layers:
        problems.append(f"{signature.num_layers} cache layers in the graph, {layers} in the config")
    if signature.num_kv_heads is not None and signature.num_kv_heads != kv_heads[0]:
        problems.append(f"{signature.num_kv_heads} KV heads in the graph, {kv_heads[0]} in the config")
    if signature.head_dim is not None and signature.head_dim != head_dims[0]:
        problems.append(f"head size {signature.head_dim} in the graph, {head_dims[0]} in the config")
    if problems:
        raise KVCacheError(f"{graph} does not match the config.json beside it ({'; '.join(problems)}); "
                           "export the model again so graph and config come from the same model")
