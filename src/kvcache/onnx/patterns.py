"""Attention sub-graph matchers for KV-cache injection: pattern -> check (with the reason) -> site.

An attention layer of an exported decoder without cache, whatever the exporter or architecture, is::

    scores = MatMul(Q, K^T) -> (scale, masks, biases: Mul/Div/Add/Where/Cast/Reshape...) -> Softmax
    out    = MatMul(Softmax -> (IsNaN/Where, Cast, Reshape...), V)

or the opset-23 fused ``Attention(Q, K, V, mask)`` op. For each layer the matcher finds

* ``key`` / ``value``: the farthest-upstream tensor on the K (V) operand path, moving only through layout
  ops (Transpose, Reshape, Expand, Unsqueeze, scalar Mul...), whose probed shape is
  ``[batch, num_kv_heads, seq, head_dim]``: keys after RoPE and *before* GQA's repeat_kv, so the cache
  keeps ``num_kv_heads``;
* ``chain``: the layout nodes between those tensors and the attention, whose reshape/expand targets are
  recomputed once the key length becomes ``past + seq``;
* ``mask_edits``: the places where a causal/padding mask enters the scores (an input of an ``Add`` or the
  condition of a ``Where`` whose ancestry compares positions), to be replaced by the injected mask.
  Additive biases that compare no positions (ALiBi) are left alone.

Every ``check_*`` function returns ``None`` on success or a sentence saying what was missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from kvcache.onnx.graph import COMPARISONS, Graph, TensorInfo

#: elementwise/reshaping ops allowed between the Q·K MatMul and the Softmax
SCORE_OPS: frozenset[str] = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Tanh", "Reshape",
                                       "Identity", "Max", "Min", "Clip"})
#: ops allowed between Softmax and the probabilities·V MatMul
PROB_OPS: frozenset[str] = frozenset({"Cast", "Where", "Identity", "Dropout", "Reshape", "Mul"})
#: layout-only ops allowed between the cached K/V and the attention MatMul
LAYOUT_OPS: frozenset[str] = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast",
                                        "Identity", "Mul", "Div", "Flatten"})


@dataclass
class MaskEdit:
    """One mask entry point: ``node.input[index]`` gets the injected mask of kind ``kind``.

    ``kind`` is ``"additive"`` (0 where allowed, a very negative number elsewhere), ``"allowed"`` (bool,
    True where attention is allowed) or ``"blocked"`` (bool, True where it is not).
    """

    node: onnx.NodeProto
    index: int
    kind: str


@dataclass
class AttentionSite:
    """Everything the rewrite passes need to know about one attention layer."""

    layer: int
    qk: onnx.NodeProto                 # MatMul(Q, K^T), or the fused Attention node
    av: onnx.NodeProto                 # MatMul(probs, V), or the fused Attention node
    softmax: onnx.NodeProto | None     # None for the fused Attention op
    key: str                           # per-head key tensor to extend with the past
    value: str
    key_layout: str = "bhtd"           # a key of LAYOUTS: how `key` is laid out
    value_layout: str = "bhtd"
    chain: list[onnx.NodeProto] = field(default_factory=list)   # layout nodes between key/value and qk/av
    mask_edits: list[MaskEdit] = field(default_factory=list)
    score_dtype: int = onnx.TensorProto.FLOAT

    @property
    def fused(self) -> bool:
        """True for the opset-23 ``Attention`` op."""
        return self.qk.op_type == "Attention"


class PatternError(Exception):
    """Internal: a matcher did not find its pattern (the message says what was missing)."""


def _is_activation_matmul(g: Graph, node: onnx.NodeProto) -> bool:
    """A MatMul of two computed tensors (not a projection with a weight)."""
    return node.op_type == "MatMul" and not any(g.is_constant(i) for i in node.input)


def score_path(g: Graph, softmax: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]] | None:
    """Nodes from the Softmax back to the Q·K MatMul as ``(node, score input index)``; last = MatMul."""

    def walk(tensor: str, depth: int) -> list[tuple[onnx.NodeProto, int]] | None:
        node = g.producer.get(tensor)
        if node is None or depth > 16:
            return None
        if _is_activation_matmul(g, node):
            return [(node, -1)]
        if node.op_type not in SCORE_OPS:
            return None
        candidates = range(1, 3) if node.op_type == "Where" else range(len(node.input))
        if node.op_type == "Reshape":
            candidates = range(1)
        for k in candidates:
            if not node.input[k] or g.is_constant(node.input[k]):
                continue
            rest = walk(node.input[k], depth + 1)
            if rest is not None:
                return [(node, k)] + rest
        return None

    return walk(softmax.input[0], 0)


def prob_consumer(g: Graph, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """The MatMul that multiplies the attention probabilities with V (through IsNaN guards, casts...)."""
    frontier = [softmax.output[0]]
    for _ in range(6):
        nxt = []
        for t in frontier:
            for node in g.consumers.get(t, []):
                if node.op_type == "MatMul" and node.input[0] == t and _is_activation_matmul(g, node):
                    return node
                if node.op_type in PROB_OPS:
                    nxt.append(node.output[0])
        frontier = nxt
    return None


#: layouts a cached tensor may be found in, with the permutation to (and from) [batch, heads, seq, dim]
LAYOUTS: dict[str, tuple[int, int, int, int] | None] = {"bhtd": None, "bthd": (0, 2, 1, 3),
                                                       "bhdt": (0, 1, 3, 2)}


def _layout_of(shape: tuple[int | None, ...] | None, want: tuple[int, int, int, int]) -> str | None:
    if shape is None or len(shape) != 4:
        return None
    b, h, t, d = want
    return {(b, h, t, d): "bhtd", (b, t, h, d): "bthd", (b, h, d, t): "bhdt"}.get(tuple(shape))  # type: ignore


def kv_source(g: Graph, tensor: str, want: tuple[int, int, int, int], probe: dict[str, TensorInfo],
              probe2: dict[str, TensorInfo], seq2: int) -> tuple[str, list[onnx.NodeProto], str] | str:
    """Walk up from an attention operand to the farthest per-head K/V tensor through layout ops.

    Returns ``(tensor, chain, layout)``: the tensor, the layout nodes between it and the attention, and its
    layout (a key of :data:`LAYOUTS`: ``[batch, num_kv_heads, seq, head_dim]`` or a transpose of it);
    or the reason the walk failed. ``want`` is ``(batch, num_kv_heads, seq, head_dim)`` in the first
    probe; the second probe (sequence ``seq2``) must agree, so a static dimension equal to ``seq`` is not
    mistaken for the sequence.
    """
    want2 = (want[0], want[1], seq2, want[3])
    best: tuple[str, int, str] | None = None
    path: list[onnx.NodeProto] = []
    seen_shapes: list[str] = []
    t = tensor
    for _ in range(32):
        info = probe.get(t)
        info2 = probe2.get(t)
        shape = info.shape if info else None
        seen_shapes.append(str(list(shape)) if shape else "?")
        layout = _layout_of(shape, want)
        if layout is not None and info2 is not None and _layout_of(info2.shape, want2) == layout:
            best = (t, len(path), layout)
        node = g.producer.get(t)
        if node is None or node.op_type not in LAYOUT_OPS:
            break
        # a scale may be computed (SDPA's decomposition scales K by sqrt(1/sqrt(head_dim)) from shapes)
        data = [i for i in node.input[:1]] if node.op_type not in ("Mul", "Div") else \
            [i for i in node.input if not g.is_constant(i) and not _is_scalar(g, i, probe)]
        if len(data) != 1 or (node.op_type == "Div" and data[0] != node.input[0]):
            break
        if node.op_type in ("Mul", "Div"):
            other = [i for i in node.input if i != data[0]]
            if not other or not _is_scalar(g, other[0], probe):
                break
        path.append(node)
        t = data[0]
    if best is None:
        return (f"no tensor of shape [batch={want[0]}, num_kv_heads={want[1]}, seq={want[2]}, "
                f"head_dim={want[3]}] (or a transpose of it) on its path (shapes seen, walking up: "
                f"{' <- '.join(seen_shapes)})")
    return best[0], path[: best[1]], best[2]


def _is_scalar(g: Graph, name: str, probe: dict[str, TensorInfo]) -> bool:
    value = g.const_value(name)
    if value is not None:
        return value.size == 1
    info = probe.get(name)
    return info is not None and info.shape is not None and all(d == 1 for d in info.shape)


def mask_kind(g: Graph, node: onnx.NodeProto, side: int, score_index: int) -> str | None:
    """What injected mask ``node.input[side]`` should receive, or ``None`` when it is not a mask.

    A mask compares positions somewhere upstream (``kv_idx <= q_idx``); a constant scale or an ALiBi bias
    does not.
    """
    name = node.input[side]
    if not name or g.is_constant(name):
        return None
    ops, _ = g.ancestor_ops(name)
    if not ops & COMPARISONS:
        return None
    if node.op_type == "Add":
        return "additive"
    if node.op_type == "Where" and side == 0:
        return "allowed" if score_index == 1 else "blocked"
    return "unsupported"


def find_mask_edits(g: Graph, path: list[tuple[onnx.NodeProto, int]]) -> list[MaskEdit] | str:
    """Mask entry points on a score path (see :func:`score_path`), or the reason one cannot be replaced."""
    edits: list[MaskEdit] = []
    for node, score_index in path[:-1]:
        if node.op_type == "Reshape":
            continue  # its second input is a target shape, not a mask
        for side in range(len(node.input)):
            if side == score_index:
                continue
            kind = mask_kind(g, node, side, score_index)
            if kind == "unsupported":
                return (f"a mask enters the scores through {node.op_type} node {node.name!r} "
                        f"(input {side}) in a way the injector does not rewrite")
            if kind is not None:
                edits.append(MaskEdit(node, side, kind))
    return edits


def fused_site(g: Graph, node: onnx.NodeProto, layer: int, want: tuple[int, int, int, int],
               probe: dict[str, TensorInfo], probe2: dict[str, TensorInfo], seq2: int) -> AttentionSite | str:
    """A site for the opset-23 ``Attention(Q, K, V, [mask])`` op (4-D inputs, as torch exports it).

    The op's own ``past_key``/``past_value`` inputs are not used: the Concat goes before repeat_kv instead,
    so the cache keeps ``num_kv_heads`` even when the exporter repeated K/V for the op. The op's
    ``is_causal`` flag is cleared (the injected mask is causal with the past offset). Returns the reason
    when the pattern does not match.
    """
    if len(node.input) > 4 and any(node.input[4:]):
        return f"Attention node {node.name!r} already takes a past"
    found = []
    for index, what in ((1, "key"), (2, "value")):
        r = kv_source(g, node.input[index], want, probe, probe2, seq2)
        if isinstance(r, str):
            return f"{what} of Attention node {node.name!r}: {r}"
        found.append(r)
    edits: list[MaskEdit] = []
    dtype = probe[node.input[0]].elem_type if node.input[0] in probe else onnx.TensorProto.FLOAT
    if len(node.input) > 3 and node.input[3]:
        mask_info = probe.get(node.input[3])
        is_bool = mask_info is not None and mask_info.elem_type == onnx.TensorProto.BOOL
        edits.append(MaskEdit(node, 3, "allowed" if is_bool else "additive"))
    else:
        while len(node.input) < 4:
            node.input.append("")
        edits.append(MaskEdit(node, 3, "additive"))
    for attr in node.attribute:
        if attr.name == "is_causal":
            attr.i = 0
    return AttentionSite(layer=layer, qk=node, av=node, softmax=None, key=found[0][0], value=found[1][0],
                         key_layout=found[0][2], value_layout=found[1][2], chain=found[0][1] + found[1][1],
                         mask_edits=edits, score_dtype=dtype)
