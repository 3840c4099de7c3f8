"""Export a Hugging Face decoder to ONNX with ``torch.onnx``, with or without a native KV cache.

Without a cache (the default) the graph takes ``input_ids``, ``attention_mask`` and, where the architecture
uses positions, ``position_ids``, and returns ``logits`` over the whole sequence: the input of
:class:`kvcache.onnx.inject.KVCacheInjector`. With ``with_cache=True`` the graph also takes
``past_key_values.{i}.key|value`` and returns ``present.{i}.key|value`` (names in :mod:`kvcache.onnx.names`).

The output directory receives ``model.onnx`` (plus ``model.onnx.data`` for models over
:data:`EXTERNAL_DATA_THRESHOLD` bytes), ``config.json`` and the tokenizer files when a tokenizer is given.
It is written as a whole: a new directory is built beside the target and renamed onto it, so a failed
export leaves nothing behind and no file of an earlier export (a stale ``model_kvcache.onnx``) survives
next to the new graph. A target that already holds files is refused unless ``force=True``
(:mod:`kvcache.onnx.outputs`).
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import onnx
import torch

from kvcache.cache import model_cache_shape
from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.outputs import check_export_dir, swap_in_directory

#: weights above this many bytes are saved as external data (protobuf cannot hold more than 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1 << 30
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

#: architectures (``config.model_type``) whose forward takes no ``position_ids`` (ALiBi models)
NO_POSITION_IDS: frozenset[str] = frozenset({"bloom", "mpt"})

Exporter = Literal["legacy", "dynamo"]
#: opsets each exporter is used with here: injection needs 14+, the dynamo exporter 18+
OPSET_RANGE: dict[str, tuple[int, int]] = {"legacy": (14, 20), "dynamo": (18, 23)}


def check_export_options(exporter: str, opset: int | None) -> int:
    """The opset to export with, once ``exporter`` and ``opset`` are checked (before any model loads).

    Raises
    ------
    KVCacheError
        For an unknown exporter or an opset outside :data:`OPSET_RANGE`.
    """
    if exporter not in OPSET_RANGE:
        raise KVCacheError(f"unknown exporter {exporter!r}; choose 'legacy' or 'dynamo'")
    low, high = OPSET_RANGE[exporter]
    if opset is None:
        return 17 if exporter == "legacy" else 18
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        other = " (or --exporter legacy)" if exporter == "dynamo" and isinstance(opset, int) and opset < low \
            else ""
        raise KVCacheError(f"the {exporter} exporter supports opset {low} to {high} here, got {opset!r}; "
                           f"pick one in that range{other}")
    return opset


def uses_position_ids(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``position_ids`` (all supported architectures but ALiBi ones)."""
    return "position_ids" in inspect.signature(model.forward).parameters


class _LogitsOnly(torch.nn.Module):
    """Forward without a cache that returns only the logits, so the graph has exactly one output."""

    def __init__(self, model: torch.nn.Module, with_positions: bool) -> None:
        super().__init__()
        self.model = model
        self.with_positions = with_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "use_cache": False}
        if self.with_positions:
            kwargs["position_ids"] = position_ids
        return self.model(**kwargs).logits


class _WithPast(torch.nn.Module):
    """Forward with a flattened past (k0, v0, k1, v1, ...) that returns logits and the flattened present."""

    def __init__(self, model: torch.nn.Module, with_positions: bool) -> None:
        super().__init__()
        self.model = model
        self.with_positions = with_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # rest = ([position_ids,] k0, v0, k1, v1, ...): positional so both exporters see plain tensors
        position_ids, past = (rest[0], rest[1:]) if self.with_positions else (None, rest)
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "past_key_values": cache, "use_cache": True}
        if self.with_positions:
            kwargs["position_ids"] = position_ids
        out = self.model(**kwargs)
        flat: list[torch.Tensor] = [out.logits]
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


def export_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    with_cache: bool = False,
    opset: int | None = None,
    exporter: Exporter = "legacy",
    force: bool = False,
) -> Path:
    """Export ``model`` (a Hugging Face causal LM) to ``out_dir/model.onnx``.

    Parameters
    ----------
    model:
        A ``*ForCausalLM`` (float32 recommended for export). It is exported in eval mode; its own
        training/eval mode is left as the caller had it.
    out_dir:
        Directory to create, or to replace as a whole when ``force``; ``model.onnx``, ``config.json`` (and
        tokenizer files) land there.
    tokenizer:
        Saved beside the graph when given.
    with_cache:
        Also take ``past_key_values.{i}.key|value`` ``[batch, num_kv_heads, past, head_dim]`` and return
        ``present.{i}.key|value``.
    opset:
        ONNX opset; default 17 for the legacy exporter and 18 for the dynamo exporter.
    exporter:
        ``"legacy"`` (TorchScript-based, opset 14-20) or ``"dynamo"`` (``torch.export``, opset 18+).
    force:
        Replace ``out_dir`` when it already holds files (else that is refused).

    Returns
    -------
    Path to the written ``model.onnx``.

    Raises
    ------
    KVCacheError
        Bad options, an ``out_dir`` that is a file or already holds files (without ``force``), or an
        exporter failure (its first line).
    """
    opset = check_export_options(exporter, opset)
    out = Path(out_dir)
    check_export_dir(out, force=force)
    was_training = model.training
    try:
        return _export_eval(model, out, tokenizer, with_cache, opset, exporter)
    finally:
        # torch.onnx.export restores the wrapper's mode onto every submodule; give back the caller's
        model.train(was_training)


def _export_eval(model: torch.nn.Module, out: Path, tokenizer: Any, with_cache: bool, opset: int,
                 exporter: Exporter) -> Path:
    """Body of :func:`export_model` once the options are checked; the model is switched to eval mode."""
    model.eval()
    config = model.config
    with_pos = uses_position_ids(model)
    batch, seq, past_len = 2, 5, 3
    gen = torch.Generator().manual_seed(0)
    vocab = int(config.vocab_size)
    ids = torch.randint(3, max(4, vocab), (batch, seq), generator=gen)
    # non-trivial mask and positions so the exporter cannot specialise on "all ones"
    total = seq + (past_len if with_cache else 0)
    mask = torch.ones(batch, total, dtype=torch.long)
    mask[1, 0] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    args: list[torch.Tensor] = [ids, mask] + ([pos] if with_pos else [])
    input_names = [names.INPUT_IDS, names.ATTENTION_MASK] + ([names.POSITION_IDS] if with_pos else [])
    output_names = [names.LOGITS]
    B, S = names.BATCH_DIM, names.SEQUENCE_DIM
    mask_dim = names.TOTAL_DIM if with_cache else S
    axes: dict[str, dict[int, str]] = {names.INPUT_IDS: {0: B, 1: S},
                                       names.ATTENTION_MASK: {0: B, 1: mask_dim}, names.LOGITS: {0: B, 1: S}}
    if with_pos:
        axes[names.POSITION_IDS] = {0: B, 1: S}
    if with_cache:
        layers, kv_heads, head_dims = model_cache_shape(config)
        dtype = next(model.parameters()).dtype
        for i in range(layers):
            for pname, oname in ((names.past_key(i), names.present_key(i)),
                                 (names.past_value(i), names.present_value(i))):
                shape = (batch, kv_heads[i], past_len, head_dims[i])
                args.append(torch.randn(*shape, generator=gen).to(dtype))
                input_names.append(pname)
                output_names.append(oname)
                axes[pname] = {0: B, 2: names.PAST_DIM}
                axes[oname] = {0: B, 2: names.TOTAL_DIM}
        module: torch.nn.Module = _WithPast(model, with_pos)
    else:
        module = _LogitsOnly(model, with_pos)
    # a new Module starts in training mode, and torch.onnx.export re-applies the wrapper's mode to the
    # model after tracing: without this, dropout (OPT, GPT-2, ...) would be live after the export
    module.eval()
    call_args = tuple(args)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as exc:
        raise KVCacheError(f"cannot create {out}: {exc.strerror or exc}; give a directory in a writable "
                           "place") from exc
    try:
        tmp_file = tmp / MODEL_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow are expected
            try:
                _run_exporter(module, call_args, tmp_file, exporter, opset, input_names, output_names, axes)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                other = "dynamo" if exporter == "legacy" else "legacy"
                raise KVCacheError(f"the {exporter} exporter failed on this model ({type(exc).__name__}: "
                                   f"{first}); try --exporter {other} or another --opset") from exc
        _finalize(tmp_file, model, tokenizer, tmp)
        swap_in_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / MODEL_FILE


def _run_exporter(module: torch.nn.Module, args: tuple[Any, ...], path: Path, exporter: str, opset: int,
                  input_names: list[str], output_names: list[str], axes: dict[str, dict[int, str]]) -> None:
    if exporter == "legacy":
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=axes, do_constant_folding=True)
        return
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        return dims.setdefault(name, torch.export.Dim.DYNAMIC)

    shapes: list[Any] = [{k: dim(v) for k, v in axes.get(name, {}).items()} for name in input_names]
    if isinstance(module, _WithPast):
        # torch.export sees forward(input_ids, attention_mask, *rest): the varargs are one tuple
        shapes = shapes[:2] + [tuple(shapes[2:])]
    program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                output_names=output_names, dynamic_shapes=tuple(shapes), optimize=True,
                                verbose=False)
    if program is None:
        raise KVCacheError("the dynamo exporter returned no program")
    program.save(str(path))


def _finalize(tmp_file: Path, model: torch.nn.Module, tokenizer: Any, tmp: Path) -> None:
    """Re-save weights as one external file when large; save config and tokenizer beside the graph."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    proto = onnx.load(str(tmp_file))
    for f in tmp.iterdir():
        if f != tmp_file:
            f.unlink() if f.is_file() else shutil.rmtree(f)
    tmp_file.unlink()
    if nbytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(tmp_file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, str(tmp_file))
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(tmp)
        except ValueError:
            pass  # an invalid generation config is not worth failing an export over
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def export(
    name_or_path: str,
    out_dir: str | os.PathLike[str],
    *,
    with_cache: bool = False,
    opset: int | None = None,
    exporter: Exporter = "legacy",
    force: bool = False,
) -> Path:
    """Load ``name_or_path`` (a local model directory or ``"default"``) on CPU in float32 and export it.

    The options and the output directory are checked before the model loads. See :func:`export_model`
    for the parameters.
    """
    from kvcache.models import load  # here, not at import: loading pulls in the bundled-model machinery
    check_export_options(exporter, opset)
    source = Path(name_or_path)
    if str(name_or_path) == "default" and not source.exists():
        from kvcache.models.load import DEFAULT_MODEL_DIR
        source = DEFAULT_MODEL_DIR
    if source.exists() and not (source / "config.json").is_file():
        raise KVCacheError(f"{name_or_path!r} is not a model directory (no config.json); pass a local "
                           "Hugging Face model directory or 'default'")
    check_export_dir(Path(out_dir), force=force, source=source if source.exists() else None)
    model, tokenizer = load(name_or_path, device="cpu", dtype=torch.float32)
    return export_model(model, out_dir, tokenizer=tokenizer, with_cache=with_cache, opset=opset,
                        exporter=exporter, force=force)
