"""Injection pass 2: one causal + padding mask over ``past + current`` keys, shared by all layers.

The graph's own mask was built for ``seq x seq`` scores from an ``attention_mask`` of ``seq`` columns. After
injection ``attention_mask`` spans ``past + seq`` columns and the scores are ``[.., seq, past + seq]``, so
the pass builds (once)::

    allowed[b, 0, i, j] = attention_mask[b, j] == 1  and  j <= past + i  [and  j > past + i - window]

and feeds it (bool, negated bool, or additive 0 / most-negative float) to every mask entry point found by
:func:`kvcache.onnx.patterns.find_mask_edits`; the old mask computation becomes dead and is pruned.

A graph injected for retention policies takes the mask from the host instead, one per layer: the input
``slot_mask.{i}`` ``[batch, kv_heads, seq, past + seq]`` (True = attend), built from every slot's logical
position, which after eviction differs per layer, sequence and KV head. Each query head reads its KV head's
rows (query head ``j * n_rep + r`` belongs to KV head ``j``, as ``repeat_kv`` groups them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from kvcache.onnx import names
from kvcache.onnx.graph import Graph
from kvcache.onnx.patterns import MaskEdit

_NP_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


class MaskBuilder:
    """Builds the shared mask tensors on first use (one per kind and dtype).

    Parameters
    ----------
    g:
        The graph.
    slot_heads:
        For a graph injected for retention policies: per layer ``(kv_heads, query heads)``; the masks then
        come from the per-layer ``slot_mask.{i}`` inputs. ``None``: one mask built from ``attention_mask``.
    """

    def __init__(self, g: Graph, slot_heads: list[tuple[int, int]] | None = None) -> None:
        self.g = g
        self.slot_heads = slot_heads
        self._allowed: dict[tuple[int | None, int | None], str] = {}
        self._cache: dict[tuple[str, int, int | None, int | None], str] = {}
        self._current: str | None = None
        self._positions: tuple[str, str] | None = None

    def current_len(self) -> str:
        """1-D ``[seq]``: the number of current tokens (from ``input_ids``)."""
        if self._current is None:
            g = self.g
            if g.opset >= 15:
                self._current = g.add("Shape", [names.INPUT_IDS], hint="current_len", start=1, end=2)
            else:  # Shape has no start/end before opset 15
                shape = g.add("Shape", [names.INPUT_IDS])
                self._current = g.add("Slice", [shape, g.const([1], np.int64), g.const([2], np.int64)],
                                      hint="current_len")
        return self._current

    def _key_query_positions(self) -> tuple[str, str]:
        """``([1, total] key slots, [seq, 1] query slots)``: current tokens occupy the last ``seq`` slots."""
        if self._positions is None:
            g = self.g
            i64 = np.int64
            shape = g.add("Shape", [names.ATTENTION_MASK], hint="mask_shape")
            total = g.add("Squeeze", [g.add("Gather", [shape, g.const([1], i64)], axis=0), g.const([0], i64)],
                          hint="total_len")
            current = g.add("Squeeze", [self.current_len(), g.const([0], i64)], hint="current_scalar")
            past = g.add("Sub", [total, current], hint="past_len")
            one, zero = g.const(1, i64), g.const(0, i64)
            key_pos = g.add("Unsqueeze", [g.add("Range", [zero, total, one], hint="key_pos"),
                                          g.const([0], i64)])
            query_pos = g.add("Unsqueeze", [g.add("Range", [past, total, one], hint="query_pos"),
                                            g.const([1], i64)])
            self._positions = (key_pos, query_pos)
        return self._positions

    def allowed(self, window: int | None = None, layer: int | None = None) -> str:
        """Bool ``[batch, 1, seq, past + seq]``: True where query ``i`` may attend key ``j``.

        ``window`` adds a sliding window (Mistral, Qwen2 sliding layers, GPT-Neo local layers): key slot
        ``j`` is also required to satisfy ``j > query_slot - window``, as Hugging Face's overlay does.
        Slots equal positions unless a host-side policy evicted tokens. With slot masks (``slot_heads``),
        ``[batch, heads, seq, past + seq]`` from layer ``layer``'s input (the host applied the window).
        """
        if self.slot_heads is not None:
            if layer is None:
                raise ValueError("a graph injected with slot masks needs the layer of every mask entry")
            return self._slot_allowed(layer)
        key = (window, None)
        if key in self._allowed:
            return self._allowed[key]
        g = self.g
        key_pos, query_pos = self._key_query_positions()
        causal = g.add("LessOrEqual", [key_pos, query_pos], hint="causal")  # [seq, total]
        if window is not None:
            lower = g.add("Sub", [query_pos, g.const(int(window), np.int64)], hint="window_start")
            causal = g.add("And", [causal, g.add("Greater", [key_pos, lower], hint="in_window")],
                           hint="causal_window")
        padding = g.add("Unsqueeze", [g.add("Cast", [names.ATTENTION_MASK], to=TensorProto.BOOL),
                                      g.const([1, 2], np.int64)], hint="padding")  # [batch, 1, 1, total]
        self._allowed[key] = g.add("And", [padding, causal], hint="allowed")  # [batch, 1, seq, total]
        return self._allowed[key]

    def _slot_allowed(self, layer: int) -> str:
        """``slot_mask.{layer}`` (a new graph input) with each query head reading its KV head's rows."""
        key = (None, layer)
        if key in self._allowed:
            return self._allowed[key]
        assert self.slot_heads is not None
        g = self.g
        kv_heads, heads = self.slot_heads[layer]
        name = names.slot_mask(layer)
        g.g.input.append(onnx.helper.make_tensor_value_info(
            name, TensorProto.BOOL, [names.BATCH_DIM, kv_heads, names.SEQUENCE_DIM, names.TOTAL_DIM]))
        g.inputs.add(name)
        out = name
        if heads != kv_heads:
            groups = np.repeat(np.arange(kv_heads, dtype=np.int64), heads // kv_heads)
            out = g.add("Gather", [name, g.const(groups, np.int64)], hint="slot_mask_heads", axis=1)
        self._allowed[key] = out
        return out

    def get(self, kind: str, dtype: int, window: int | None = None, layer: int | None = None) -> str:
        """The mask of ``kind`` (see :class:`~kvcache.onnx.patterns.MaskEdit`) in element type ``dtype``."""
        if self.slot_heads is None:
            layer = None  # one mask serves every layer
        key = (kind, dtype if kind == "additive" else TensorProto.BOOL, window, layer)
        if key in self._cache:
            return self._cache[key]
        g = self.g
        if kind == "allowed":
            out = self.allowed(window, layer)
        elif kind == "blocked":
            out = g.add("Not", [self.allowed(window, layer)], hint="blocked")
        else:
            np_dtype = _NP_FLOAT.get(dtype)
            if np_dtype is None:
                raise ValueError(f"attention scores of ONNX element type {dtype} are not supported")
            # the most negative finite value (as Hugging Face does): a fully masked row (left padding)
            # then softmaxes to a uniform row instead of NaN
            low = g.const(np.array(np.finfo(np_dtype).min, dtype=np_dtype), hint="mask_min")
            out = g.add("Where", [self.allowed(window, layer), g.const(np.array(0, dtype=np_dtype)), low],
                        hint="additive")
        self._cache[key] = out
        return out


def apply_mask_edits(g: Graph, builder: MaskBuilder, edits: list[MaskEdit], dtype: int,
                     window: int | None = None, layer: int | None = None) -> None:
    """Point every mask entry point of ``layer`` at the injected mask."""
    for edit in edits:
        g.replace_input(edit.node, edit.index, builder.get(edit.kind, dtype, window, layer))


def add_mask_before_softmax(g: Graph, builder: MaskBuilder, softmax: onnx.NodeProto, dtype: int,
                            window: int | None = None, layer: int | None = None) -> None:
    """For layers where no mask entry was recognised: add the injected mask to the logits.

    Causal-only SDPA applies no mask at all; older exports (transformers 4.x GPT-2) apply masks the matcher
    does not recognise (a slice of a constant causal buffer, ``(1 - attention_mask) * min``), which still
    hold after injection: the injected mask then goes on top, and the sum is clamped back to the most
    negative finite value, so that a key masked twice does not reach ``-inf`` (a padding query row whose
    keys are all masked would softmax to NaN, and NaN values of padding reach real rows through 0 * NaN).
    """
    masked = g.add("Add", [softmax.input[0], builder.get("additive", dtype, window, layer)],
                   hint="masked_scores")
    np_dtype = _NP_FLOAT.get(dtype, np.float32)
    masked = g.add("Max", [masked, g.const(np.array(np.finfo(np_dtype).min, dtype=np_dtype))],
                   hint="masked_scores_finite")
    g.replace_input(softmax, 0, masked)
