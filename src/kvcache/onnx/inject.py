"""KV-cache injection into an ONNX decoder graph exported without a cache.

Usage (weights are never loaded)::

    model = onnx.load(path, load_external_data=False)
    model = KVCacheInjector(model_dir).apply(model)

or :func:`inject_file` / ``kvcache onnx inject MODEL.onnx|DIR [--out PATH] [--attention-stats]``.
The injected graph's inputs and outputs are described in :mod:`kvcache.onnx.names`. The passes: find the
attention sites (:mod:`~kvcache.onnx.patterns`), add past/present around keys and values
(:mod:`~kvcache.onnx.rewrite_cache`), replace the mask (:mod:`~kvcache.onnx.rewrite_mask`), optionally
expose attention statistics (:mod:`~kvcache.onnx.rewrite_stats`), prune and re-sort.
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path
from typing import Any

import onnx
from transformers import AutoConfig, PretrainedConfig

from kvcache import validate
from kvcache.cache import model_cache_shape
from kvcache.errors import KVCacheError
from kvcache.models.random import ARCHITECTURES
from kvcache.onnx import names, provenance
from kvcache.onnx.export import NO_POSITION_IDS
from kvcache.onnx.fold_shapes import fold_shapes
from kvcache.onnx.fuse_norms import fuse_norms
from kvcache.onnx.graph import Graph, probe_shapes
from kvcache.onnx.outputs import atomic_write, check_inject_destination, copy_atomic
from kvcache.onnx.pack_projections import pack_projections
from kvcache.onnx.patterns import (
    AttentionSite,
    find_mask_edits,
    fused_site,
    kv_source,
    prob_consumer,
    score_path,
)
from kvcache.onnx.rewrite_cache import inject_cache
from kvcache.onnx.rewrite_fused import fuse_attention
from kvcache.onnx.rewrite_mask import MaskBuilder, add_mask_before_softmax, apply_mask_edits
from kvcache.onnx.rewrite_positions import rewrite_positions
from kvcache.onnx.rewrite_sizes import split_mask_sizes
from kvcache.onnx.rewrite_stats import add_attention_logits, add_attention_stats
from kvcache.resources import context_length

#: files copied beside an injected graph written to another directory
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "MODEL_CARD.md")


def _geometry(config: PretrainedConfig) -> tuple[int, int, list[int], list[int]]:
    """``(num_layers, num_heads, kv heads per layer, head dim per layer)`` of a decoder config.

    The cache shape is :func:`kvcache.cache.model_cache_shape`'s, as export, check and the runtime read it
    (per-layer configs included); the query head count is the text config's own.
    """
    num_layers, kv_heads, head_dims = model_cache_shape(config)
    heads = int(config.get_text_config(decoder=True).num_attention_heads)
    return num_layers, heads, kv_heads, head_dims


def sliding_windows(config: PretrainedConfig, num_layers: int) -> list[int | None]:
    """Per layer, the sliding-window size of its attention, or ``None`` for full causal attention."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "model_type", None) == "gpt_neo":
        kinds = getattr(text, "attention_layers", None) or ["global"] * num_layers
        return [text.window_size if k == "local" else None for k in kinds]
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * num_layers


class KVCacheInjector:
    """Adds a KV cache to a decoder graph exported without one.

    Parameters
    ----------
    model_dir:
        Directory holding the model's ``config.json`` (the export directory), or a ``PretrainedConfig``.
    attention_stats:
        Also output ``attn_scores.{i}`` ``[batch, num_heads, past + seq]`` per layer (see
        :mod:`kvcache.onnx.names`).
    policies:
        Make the graph run retention policies on the host: per-layer ``slot_mask.{i}`` inputs replace the
        mask built from ``attention_mask`` (slots differ per layer and KV head after eviction), and
        ``attn_logits.{i}`` outputs give the host the masked logits policies score from.
    fused:
        Rewrite every attention layer into ONNX Runtime's fused ``GroupQueryAttention`` op
        (:mod:`~kvcache.onnx.rewrite_fused`): the fastest graph on ONNX Runtime, whose past and present can
        share one preallocated buffer. It runs on ONNX Runtime only and serves caches without a retention
        policy (no ``attention_stats`` or ``policies``).
    """

    #: architectures (``config.model_type``) tested end to end; others are attempted with the generic matcher
    supported_models: tuple[str, ...] = ARCHITECTURES

    def __init__(self, model_dir: str | os.PathLike[str] | PretrainedConfig, *,
                 attention_stats: bool = False, policies: bool = False, fused: bool = False) -> None:
        if fused and (attention_stats or policies):
            raise KVCacheError("--fused cannot be combined with --attention-stats or --policies: the fused "
                               "attention op gives no per-slot statistics and takes no per-head slot masks; "
                               "inject one graph with --fused for full caches and one with --policies")
        if isinstance(model_dir, PretrainedConfig):
            self.config = model_dir
        else:
            path = Path(model_dir)
            if not (path / "config.json").is_file():
                raise KVCacheError(f"{path} has no config.json: pass the directory the model was exported to "
                                   "(it needs the model's config to know layers, heads and head size)")
            try:
                self.config = AutoConfig.from_pretrained(str(path))
            except (OSError, ValueError, KeyError) as exc:
                raise KVCacheError(f"cannot read {path / 'config.json'}: {str(exc)[:300]}") from exc
        validate.check_config(self.config, "the config.json of the graph")
        self.arch = getattr(self.config, "model_type", "unknown")
        self.num_layers, self.num_heads, self.kv_heads, self.head_dims = _geometry(self.config)
        self.attention_stats = attention_stats
        self.policies = policies
        self.fused = fused
        #: rows of the rotary tables of a fused graph whose attention op rotates Q and K (set by apply)
        self.rotary_positions: int | None = None

    # ----- validation ---------------------------------------------------------------------------------
    def _validate(self, model: onnx.ModelProto) -> None:
        inputs = {i.name for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        meta = {p.key for p in model.metadata_props}
        if any(names.is_cache_input(n) for n in inputs) or any(names.is_cache_output(n) for n in outputs) \
                or names.META_INJECTED in meta:
            raise KVCacheError("this graph already has a KV cache (past_key_values.* inputs / present.* "
                               "outputs); inject into the graph exported without cache")
        missing = [n for n in (names.INPUT_IDS, names.ATTENTION_MASK) if n not in inputs]
        if missing or names.LOGITS not in outputs:
            raise KVCacheError(
                f"not a decoder graph: expected inputs input_ids and attention_mask and output logits, found "
                f"inputs {sorted(inputs)} and outputs {sorted(outputs)}; export with `kvcache onnx export`")

    def _sentinels(self) -> tuple[int, int, int, int]:
        """Batch, two sequence sizes and a second batch size that no static dimension of the model equals."""
        taken = {self.num_heads, 1}
        for kv, dim in zip(self.kv_heads, self.head_dims, strict=True):
            taken |= {kv, dim, self.num_heads // kv, self.num_heads * dim, kv * dim}
        primes = [p for p in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47) if p not in taken]
        return primes[0], primes[1], primes[2], primes[3]

    # ----- matching -----------------------------------------------------------------------------------
    def find_sites(self, g: Graph, probe: dict, probe2: dict, batch: int, seq: int,
                   seq2: int) -> list[AttentionSite]:
        """Locate every attention layer; raises :class:`KVCacheError` naming what is missing."""
        sites: list[AttentionSite] = []
        softmaxes = [n for n in g.topo_order() if n.op_type == "Softmax"]
        fused = [n for n in g.topo_order() if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
        reasons: list[str] = []

        def want(layer: int) -> tuple[int, int, int, int]:
            layer = min(layer, self.num_layers - 1)  # a surplus layer fails the count check below
            return batch, self.kv_heads[layer], seq, self.head_dims[layer]

        for node in fused:
            site = fused_site(g, node, len(sites), want(len(sites)), probe, probe2, seq2)
            if isinstance(site, str):
                raise KVCacheError(f"{self.arch}: layer {len(sites)}: {site}")
            sites.append(site)
        for softmax in softmaxes:
            layer = len(sites)
            path = score_path(g, softmax)
            if path is None:
                reasons.append(f"Softmax {softmax.name!r}: no MatMul(Q, K^T) feeds it")
                continue
            qk = path[-1][0]
            av = prob_consumer(g, softmax)
            if av is None:
                raise KVCacheError(f"{self.arch}: layer {layer}: the attention probabilities of Softmax "
                                   f"{softmax.name!r} reach no MatMul with V")
            k = kv_source(g, qk.input[1], want(layer), probe, probe2, seq2)
            if isinstance(k, str):
                raise KVCacheError(f"{self.arch}: layer {layer}: key of MatMul {qk.name!r}: {k}")
            v = kv_source(g, av.input[1], want(layer), probe, probe2, seq2)
            if isinstance(v, str):
                raise KVCacheError(f"{self.arch}: layer {layer}: value of MatMul {av.name!r}: {v}")
            edits = find_mask_edits(g, path)
            if isinstance(edits, str):
                raise KVCacheError(f"{self.arch}: layer {layer}: {edits}")
            info = probe.get(softmax.input[0])
            dtype = info.elem_type if info is not None else onnx.TensorProto.FLOAT
            sites.append(AttentionSite(layer=layer, qk=qk, av=av, softmax=softmax, key=k[0], value=v[0],
                                       key_layout=k[2], value_layout=v[2], chain=k[1] + v[1],
                                       mask_edits=edits, score_dtype=dtype))
        if len(sites) != self.num_layers:
            detail = "; ".join(reasons[:3])
            raise KVCacheError(f"{self.arch}: found {len(sites)} attention layers in the graph but the "
                               f"config says {self.num_layers}" + (f" ({detail})" if detail else ""))
        return sites

    # ----- the pass -----------------------------------------------------------------------------------
    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Inject the cache into ``model`` (modified in place and returned).

        Raises
        ------
        KVCacheError
            The graph is not a decoder without cache, or an attention layer does not match; the message
            names the architecture, the layer and what was missing.
        """
        self._validate(model)
        self.rotary_positions = None
        g = Graph(model)
        if g.opset < 13:
            raise KVCacheError(f"opset {g.opset} is too old for injection; export with opset 14 or newer")
        batch, seq, seq2, batch2 = self._sentinels()
        probe = probe_shapes(model, batch, seq)
        probe2 = probe_shapes(model, batch, seq2)
        sites = self.find_sites(g, probe, probe2, batch, seq, seq2)
        self.positions = "input" if names.POSITION_IDS in g.inputs else "none"
        if self.arch not in NO_POSITION_IDS and names.POSITION_IDS not in g.inputs:
            # the graph computes arange(seq) itself: every step would restart at 0 unless replaced
            self.positions = rewrite_positions(g, sites, probe, batch, seq, self.arch)
        # before any edit: sizes the exporter read from the mask are split into current/total lengths
        split_mask_sizes(g, sites, probe)
        windows = sliding_windows(self.config, self.num_layers)
        if self.fused:
            # Shape arithmetic folded once position_ids is an input: before, a table could look
            # batch-independent that position_ids then gives a batch (GPT-J's sin/cos). What the probes
            # cannot tell apart (the current tokens from the total) feeds only the masks, which the fused
            # attention replaces. Sizes of 1 (a decode step, one row) are probed too.
            if fold_shapes(g, [probe_shapes(model, b, s) for b, s in
                               ((batch, seq), (batch, seq2), (batch2, seq), (batch, 1), (1, seq))]):
                # constant targets let shape inference see through reshapes it could not size before
                probe, probe2 = probe_shapes(model, batch, seq), probe_shapes(model, batch, seq2)
            geometry = [(self.num_heads, kv, dim)
                        for kv, dim in zip(self.kv_heads, self.head_dims, strict=True)]
            if fuse_attention(g, sites, geometry, windows, probe, probe2, batch, seq, seq2, self.arch,
                              positions=context_length(self.config)):
                self.rotary_positions = context_length(self.config)
            g.prune()  # the replaced attention's nodes go: the projections' only use is the op now
            pack_projections(g)
            g.prune()
            g.sort()
            fuse_norms(model)
            g = Graph(model)
            g.prune()
            g.sort()
            self._finish_io(model, sites, probe)
            return model
        builder = MaskBuilder(g, [(kv, self.num_heads) for kv in self.kv_heads] if self.policies else None)
        for site in sites:
            inject_cache(g, site, (self.kv_heads[site.layer], self.head_dims[site.layer]), probe, probe2, seq,
                         seq2, self.arch)
            window = windows[site.layer]
            if site.mask_edits:
                apply_mask_edits(g, builder, site.mask_edits, site.score_dtype, window, site.layer)
            elif site.softmax is not None:
                add_mask_before_softmax(g, builder, site.softmax, site.score_dtype, window, site.layer)
        if self.attention_stats:
            add_attention_stats(g, sites, builder)
        if self.policies:
            add_attention_logits(g, sites)
        g.prune()
        g.sort()
        self._finish_io(model, sites, probe)
        return model

    def _finish_io(self, model: onnx.ModelProto, sites: list[AttentionSite], probe: dict) -> None:
        """Symbolic dims on the mask input; drop stale value_info; record the cache geometry."""
        batch_dim = names.BATCH_DIM
        for vi in model.graph.input:
            if vi.name == names.INPUT_IDS:
                first = vi.type.tensor_type.shape.dim[0]
                batch_dim = first.dim_param or batch_dim
        for vi in list(model.graph.input) + list(model.graph.output):
            dims = vi.type.tensor_type.shape.dim
            if vi.name == names.ATTENTION_MASK and len(dims) == 2:
                dims[1].Clear()
                dims[1].dim_param = names.TOTAL_DIM
            # one batch symbol everywhere (the exporter's name for it, e.g. from the dynamo exporter)
            if names.parse_cache_name(vi.name) is not None or vi.name == names.ATTENTION_MASK:
                dims[0].Clear()
                dims[0].dim_param = batch_dim
        del model.graph.value_info[:]
        meta = {
            names.META_INJECTED: "1",
            names.META_ARCHITECTURE: self.arch,
            names.META_NUM_LAYERS: str(self.num_layers),
            names.META_NUM_HEADS: str(self.num_heads),
            names.META_NUM_KV_HEADS: _per_layer(self.kv_heads),
            names.META_HEAD_DIM: _per_layer(self.head_dims),
            names.META_ATTENTION_STATS: "1" if self.attention_stats else "0",
            names.META_POLICIES: "1" if self.policies else "0",
            names.META_POSITIONS: self.positions,
            names.META_FUSED: "1" if self.fused else "0",
        }
        if self.rotary_positions is not None:
            meta[names.META_ROTARY_POSITIONS] = str(self.rotary_positions)
        kept = [p for p in model.metadata_props if p.key not in meta]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)


def _per_layer(values: list[int]) -> str:
    """Metadata value of a per-layer count: ``"8"`` when every layer has it, else ``"8,8,4,..."``."""
    return str(values[0]) if len(set(values)) == 1 else ",".join(str(v) for v in values)


def _resolve(path: Path) -> tuple[Path, Path]:
    """``(model file, model directory)`` for a ``.onnx`` file or a directory holding ``model.onnx``."""
    if path.is_dir():
        candidates = [path / "model.onnx"] if (path / "model.onnx").is_file() else sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise KVCacheError(f"{path} must hold exactly one .onnx file (or model.onnx); found "
                               f"{[c.name for c in candidates]}")
        return candidates[0], path
    if not path.is_file():
        raise KVCacheError(f"{path} does not exist")
    return path, path.parent


def inject_file(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                attention_stats: bool = False, policies: bool = False, fused: bool = False,
                force: bool = False) -> Path:
    """Inject a KV cache into the graph at ``path`` and write it atomically.

    Parameters
    ----------
    path:
        A ``.onnx`` file (with ``config.json`` beside it) or its directory.
    out:
        Output file (``*.onnx``), or a directory to write ``<name>_kvcache.onnx`` in (an existing one, or a
        new path ending in ``/`` or without the ``.onnx`` suffix, created); default ``<name>_kvcache.onnx``
        beside the input. Written to a temporary file first, then moved in place with ``os.replace``.
        When ``out`` is in another directory, the external-data, config and tokenizer files it needs are
        copied beside it (files already there are never replaced; a different weights file is refused).
    attention_stats, policies, fused:
        See :class:`KVCacheInjector`.
    force:
        Overwrite an existing ``out`` that is not a graph this function wrote, or the input itself when
        ``out`` names it. Without it such an ``out`` is refused before any work.

    Returns
    -------
    The path written. Its metadata records the input's file name and sha256
    (:data:`~kvcache.onnx.names.META_SOURCE_SHA256`), so a run beside a different ``model.onnx`` is refused.
    """
    src, model_dir = _resolve(Path(path))
    dest = Path(out) if out is not None else src.with_name(src.stem + "_kvcache.onnx")
    # a directory: one that exists, or a new path written as a folder (`out/`) or without the .onnx suffix
    named_dir = dest.is_dir() or (out is not None and not dest.exists() and (
        str(out).endswith(("/", os.sep)) or dest.suffix.lower() != ".onnx"))
    if named_dir:
        dest = dest / (src.stem + "_kvcache.onnx")
    if not (force and dest.exists() and dest.resolve() == src.resolve()):
        check_inject_destination(dest, src, force=force)
    injector = KVCacheInjector(model_dir, attention_stats=attention_stats, policies=policies, fused=fused)
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise KVCacheError(f"{src} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    model = injector.apply(model)
    provenance.record(model, src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _place_external(model, src.parent.resolve(), dest.parent.resolve())
    try:
        with atomic_write(dest, suffix=".onnx") as tmp:
            onnx.save_model(model, str(tmp))
            check_model(tmp)
    except onnx.checker.ValidationError as exc:
        raise KVCacheError(f"the injected graph failed onnx.checker: {exc}") from exc
    if dest.parent.resolve() != model_dir.resolve():
        for name in _SIDE_FILES:
            if (model_dir / name).is_file() and not (dest.parent / name).exists():
                copy_atomic(model_dir / name, dest.parent / name)
    return dest


#: ONNX Runtime operators registered in the default ONNX domain, which onnx.checker does not know
_ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def check_model(path: str | os.PathLike[str]) -> None:
    """``onnx.checker`` on an injected graph file. A ``--fused`` graph is checked with ONNX Runtime's
    default-domain operators (its fused RMS norm, written in that domain by onnxruntime-genai too) counted as
    contrib operators, which the checker leaves to the runtime that registers them.

    Raises
    ------
    onnx.checker.ValidationError
        When the graph is not valid ONNX.
    """
    copy = onnx.load(str(path), load_external_data=False)
    if not any(p.key == names.META_FUSED and p.value == "1" for p in copy.metadata_props):
        onnx.checker.check_model(str(path))
        return
    for node in copy.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _ORT_DEFAULT_DOMAIN_OPS:
            node.domain = names.CONTRIB_DOMAIN
    onnx.checker.check_model(copy)


def _place_external(model: onnx.ModelProto, src_dir: Path, dest_dir: Path) -> None:
    """Make external-data files resolvable from ``dest_dir`` by copying them there.

    ONNX and ONNX Runtime refuse data files outside the model's directory, so a relative ``../`` path
    would not do. A different file already there under the same name is refused, never used or replaced.
    """
    if src_dir == dest_dir:
        return
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    for loc in sorted(locations):
        target = dest_dir / loc
        if target.exists():
            if not filecmp.cmp(src_dir / loc, target, shallow=False):
                raise KVCacheError(f"{target} exists and differs from the graph's weights {src_dir / loc}; "
                                   "write the injected graph to another directory or remove that file")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # a copy, not a hard link: onnx.checker rejects multiply-linked data files ("hardlink attack")
        copy_atomic(src_dir / loc, target)


def inject(model: onnx.ModelProto, model_dir: str | os.PathLike[str] | PretrainedConfig,
           **kwargs: Any) -> onnx.ModelProto:
    """Functional shortcut: ``KVCacheInjector(model_dir, **kwargs).apply(model)``."""
    return KVCacheInjector(model_dir, **kwargs).apply(model)
