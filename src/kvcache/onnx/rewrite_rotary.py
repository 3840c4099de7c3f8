"""Rotary embedding as one ONNX Runtime ``RotaryEmbedding`` node per query/key (the ``--fused`` injection).

Exporters trace the rotary embedding of Llama-style models (``rotate_half``) as, per layer and per query or
key tensor ``x`` ``[B, H, S, D]``::

    x * Unsqueeze(cos, 1) + Concat(-x[..., D/2:], x[..., :D/2]) * Unsqueeze(sin, 1)

six to eight nodes, where ``cos``/``sin`` ``[B, S, D]`` are computed once per step from ``position_ids``.
ONNX Runtime's contrib op ``com.microsoft.RotaryEmbedding`` does the same in one kernel, looking up a
``[rows, D/2]`` cosine/sine table with a ``[B, S]`` index. The pass feeds it the graph's own tables,
flattened to ``B * S`` rows, with the index ``b * S + s``: whatever the model computes for its positions
(scaling variants included) is what the op applies, for any position.

A match requires the ``rotate_half`` structure above and tables whose two halves are equal (checked by
evaluating the table sub-graph, which reads only ``position_ids`` and constants, on two rows of positions).
Anything else (interleaved rotation as in GPT-J, partial rotation as in GPT-NeoX) stays as exported.

When the tables are a function of the position alone (evaluated for every position of the model's context
in one row, they give the same rows as for short probes anywhere in it: no scaling reads the sequence
length), :meth:`RotaryTables.caches` turns them into constant ``[context, D/2]`` tables, and the rotation
moves into the attention op itself (``GroupQueryAttention``'s ``do_rotary``, looked up by ``position_ids``):
no rotary node and no table computation is left in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from kvcache.onnx import names
from kvcache.onnx.graph import Graph, TensorInfo, evaluate_upstream


@dataclass(frozen=True)
class Rotary:
    """A matched rotary application ``x * cos + rotate_half(x) * sin`` (``cos``/``sin``: ``[B, S, D]``)."""

    x: str
    cos: str
    sin: str


def _node(g: Graph, tensor: str, op: str) -> onnx.NodeProto | None:
    node = g.producer.get(tensor)
    return node if node is not None and node.op_type == op else None


def _ints(g: Graph, name: str) -> list[int] | None:
    value = g.const_value(name) if name else None
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _last_axis_slice(g: Graph, tensor: str, head_dim: int) -> tuple[str, str] | None:
    """``(x, "first"|"second")`` when ``tensor`` is the first or second half of ``x`` along its last axis."""
    node = _node(g, tensor, "Slice")
    if node is None or len(node.input) < 4:
        return None
    starts, ends, axes = (_ints(g, node.input[k]) for k in (1, 2, 3))
    steps = _ints(g, node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if starts is None or ends is None or axes not in ([3], [-1]) or steps != [1]:
        return None
    half = head_dim // 2
    if starts == [0] and ends == [half]:
        return node.input[0], "first"
    if starts == [half] and ends[0] >= head_dim:
        return node.input[0], "second"
    return None


def _unsqueezed_table(g: Graph, tensor: str, probe: dict[str, TensorInfo], head_dim: int) -> str | None:
    """The ``[B, S, D]`` table ``t`` when ``tensor`` is ``Unsqueeze(t, axes=[1])``."""
    node = _node(g, tensor, "Unsqueeze")
    if node is None:
        return None
    axes = _ints(g, node.input[1]) if len(node.input) > 1 else next(
        (list(a.ints) for a in node.attribute if a.name == "axes"), None)
    info = probe.get(node.input[0])
    if axes != [1] or info is None or info.shape is None or len(info.shape) != 3 or info.shape[2] != head_dim:
        return None
    return node.input[0]


def match_rotary(g: Graph, tensor: str, probe: dict[str, TensorInfo], head_dim: int) -> Rotary | None:
    """The rotary application producing ``tensor`` (``[B, H, S, D]``), or ``None``."""
    add = _node(g, tensor, "Add")
    if add is None or len(add.input) != 2:
        return None
    muls = [_node(g, i, "Mul") for i in add.input]
    if any(m is None for m in muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        assert plain is not None and rotated is not None
        for r_side in range(2):
            concat = _node(g, rotated.input[r_side], "Concat")
            if concat is None or len(concat.input) != 2 or \
                    not any(a.name == "axis" and a.i in (3, -1) for a in concat.attribute):
                continue
            neg = _node(g, concat.input[0], "Neg")
            second = _last_axis_slice(g, neg.input[0], head_dim) if neg is not None else None
            first = _last_axis_slice(g, concat.input[1], head_dim)
            if second is None or first is None or second[1] != "second" or first[1] != "first" \
                    or second[0] != first[0]:
                continue
            x = first[0]
            if x not in plain.input:
                continue
            cos = _unsqueezed_table(g, plain.input[1 - list(plain.input).index(x)], probe, head_dim)
            sin = _unsqueezed_table(g, rotated.input[1 - r_side], probe, head_dim)
            if cos is not None and sin is not None:
                return Rotary(x=x, cos=cos, sin=sin)
    return None


def tables_have_equal_halves(g: Graph, cos: str, sin: str, head_dim: int) -> bool:
    """Evaluate the ``cos``/``sin`` sub-graph (it may read only ``position_ids`` and embedded constants) on
    two rows of positions; True when each table's two halves are equal (``rotate_half`` tables)."""
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], dtype=np.int64)
    values = evaluate_upstream(g, [cos, sin], {names.POSITION_IDS: positions})
    if values is None:
        return False
    half = head_dim // 2
    for table in values.values():
        table = np.asarray(table)
        if table.shape != (2, 5, head_dim) or not np.array_equal(table[..., :half], table[..., half:]):
            return False
    return True


def position_tables(g: Graph, cos: str, sin: str, head_dim: int,
                    positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``[positions, D/2]`` cosine and sine tables of the ``cos``/``sin`` sub-graph when it computes a
    function of the position alone, else ``None``.

    The sub-graph is evaluated once for positions ``0 .. positions - 1`` in one row, then for short rows at
    the start, the middle and the end of that range (two rows in one batch): every probe must find the
    rows of the long evaluation, so a table that depends on the batch, the sequence length or a graph input
    other than ``position_ids`` is never taken for a constant.
    """
    full = evaluate_upstream(g, [cos, sin], {names.POSITION_IDS: np.arange(positions, dtype=np.int64)[None]})
    if full is None or any(np.asarray(t).shape != (1, positions, head_dim) for t in full.values()):
        return None
    starts = np.array([[0], [positions // 2], [max(0, positions - 5)]], dtype=np.int64)
    probes = np.minimum(starts + np.arange(5, dtype=np.int64), positions - 1)
    for pair in (probes[:2], probes[1:]):
        short = evaluate_upstream(g, [cos, sin], {names.POSITION_IDS: pair})
        if short is None:
            return None
        for name, table in short.items():
            if not np.allclose(np.asarray(table), np.asarray(full[name])[0][pair], rtol=1e-5, atol=1e-6):
                return None
    half = head_dim // 2
    return np.asarray(full[cos])[0, :, :half], np.asarray(full[sin])[0, :, :half]


class RotaryTables:
    """The tables shared by every fused rotary: ``[B * S, D/2]`` tables and the ``[B, S]`` row index of the
    ``RotaryEmbedding`` nodes, or constant ``[positions, D/2]`` tables for the attention op's own rotation.

    ``positions``: the model's context length (rows of the constant tables); ``None`` keeps the rotation in
    ``RotaryEmbedding`` nodes.
    """

    def __init__(self, g: Graph, positions: int | None = None) -> None:
        self.g = g
        self.positions = positions
        self._tables: dict[tuple[str, int], str] = {}
        self._index: str | None = None
        self._checked: dict[tuple[str, str, int], bool] = {}
        self._caches: dict[tuple[str, str, int, int], tuple[str, str] | None] = {}

    def usable(self, rotary: Rotary, head_dim: int) -> bool:
        key = (rotary.cos, rotary.sin, head_dim)
        if key not in self._checked:
            self._checked[key] = tables_have_equal_halves(self.g, rotary.cos, rotary.sin, head_dim)
        return self._checked[key]

    def caches(self, rotary: Rotary, head_dim: int, dtype: type) -> tuple[str, str] | None:
        """Constant ``[positions, D/2]`` cosine and sine tables (:func:`position_tables`) in ``dtype`` for the
        attention op's ``cos_cache``/``sin_cache``, or ``None`` when the rotation must stay in nodes."""
        if self.positions is None or head_dim % 16 or not self.usable(rotary, head_dim):
            return None  # ONNX Runtime's op rotates heads of a multiple of 16 only
        key = (rotary.cos, rotary.sin, head_dim, np.dtype(dtype).num)
        if key not in self._caches:
            tables = position_tables(self.g, rotary.cos, rotary.sin, head_dim, self.positions)
            self._caches[key] = None if tables is None else (
                self.g.const(tables[0].astype(dtype), hint="cos_cache"),
                self.g.const(tables[1].astype(dtype), hint="sin_cache"))
        return self._caches[key]

    @property
    def cached(self) -> bool:
        """Whether :meth:`caches` made constant tables (some attention op rotates Q and K itself)."""
        return any(c is not None for c in self._caches.values())

    def table(self, tensor: str, head_dim: int) -> str:
        key = (tensor, head_dim)
        if key not in self._tables:
            g = self.g
            half = g.add("Slice", [tensor, g.const([0], np.int64), g.const([head_dim // 2], np.int64),
                                   g.const([2], np.int64)], hint="rotary_half")
            self._tables[key] = g.add("Reshape", [half, g.const([-1, head_dim // 2], np.int64)],
                                      hint="rotary_table")
        return self._tables[key]

    def index(self, like: str) -> str:
        """``b * S + s`` as ``[B, S]`` int64, for the ``[B, S, D]`` table ``like``."""
        if self._index is None:
            g = self.g
            shape = g.add("Slice", [g.add("Shape", [like]), g.const([0], np.int64), g.const([2], np.int64)],
                          hint="rotary_shape")
            rows = g.add("ReduceProd", [shape], hint="rotary_rows", keepdims=0)
            flat = g.add("Range", [g.const(np.array(0, np.int64)), rows, g.const(np.array(1, np.int64))],
                         hint="rotary_flat")
            self._index = g.add("Reshape", [flat, shape], hint="rotary_index")
        return self._index

    def apply(self, rotary: Rotary, flat: str, heads: int, head_dim: int) -> str:
        """``RotaryEmbedding`` of ``flat`` (``[B, S, heads * D]``, the un-rotated ``x`` flattened)."""
        g = self.g
        out = g.fresh("rotary")
        g.g.node.append(helper.make_node(
            "RotaryEmbedding", [flat, self.index(rotary.cos), self.table(rotary.cos, head_dim),
                                self.table(rotary.sin, head_dim)],
            [out], name=g.fresh("RotaryEmbedding_node"), domain=names.CONTRIB_DOMAIN, num_heads=heads,
            rotary_embedding_dim=head_dim))
        g.refresh()
        return out
