"""Fused-graph pass: the query, key and value projections of a layer become one packed projection.

After :mod:`~kvcache.onnx.rewrite_fused`, each ``GroupQueryAttention`` node reads three projections of the
same hidden states, ``x @ W_q (+ b_q)``, ``x @ W_k (+ b_k)`` and ``x @ W_v (+ b_v)``: three MatMuls and up to
three Adds per layer and step. The op also takes them packed, one ``[B, S, (H + 2 H_kv) D]`` query with no
key and value, which is what this pass feeds it::

    x @ Concat(W_q, W_k, W_v, axis=1) (+ Concat(b_q, b_k, b_v))

The weights are concatenated by ``Concat`` nodes over the existing constants rather than rewritten: ONNX
Runtime folds them into one weight when the session loads, and the graph's initializers (in the file or in
external data) stay as they were. A layer is packed only when all three are such projections of one tensor
with constant 2-D weights (and constant biases on all three or none), each used by the attention op alone,
and the op gets its query, key and value separately (when the rotation stays in ``RotaryEmbedding`` nodes,
the rotated query and key are not projections and the layer is left as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from kvcache.onnx import names
from kvcache.onnx.graph import Graph


@dataclass(frozen=True)
class _Projection:
    """``x @ weight (+ bias)``, its nodes and the tensor the attention op reads."""

    x: str
    weight: str
    bias: str | None
    nodes: tuple[onnx.NodeProto, ...]


def _only_use(g: Graph, tensor: str, user: onnx.NodeProto) -> bool:
    uses = g.consumers.get(tensor, [])
    return len(uses) == 1 and uses[0] is user and tensor not in g.outputs


def _projection(g: Graph, tensor: str, user: onnx.NodeProto) -> _Projection | None:
    """The projection producing ``tensor`` (read by ``user`` only), or ``None``."""
    if not tensor or not _only_use(g, tensor, user):
        return None
    node = g.producer.get(tensor)
    bias = None
    nodes: tuple[onnx.NodeProto, ...] = ()
    if node is not None and node.op_type == "Add":
        const = [i for i in node.input if g.is_constant(i)]
        data = [i for i in node.input if not g.is_constant(i)]
        if len(const) != 1 or len(data) != 1 or not _only_use(g, data[0], node):
            return None
        bias, nodes, node = const[0], (node,), g.producer.get(data[0])
    if node is None or node.op_type != "MatMul" or not g.is_constant(node.input[1]):
        return None
    if _rank(g, node.input[1]) != 2 or (bias is not None and _rank(g, bias) != 1):
        return None
    return _Projection(x=node.input[0], weight=node.input[1], bias=bias, nodes=(node, *nodes))


def _rank(g: Graph, name: str) -> int | None:
    """Rank of a constant (an initializer's declared dims; a Constant node's value)."""
    if name in g.initializers:
        return len(g.initializers[name].dims)
    value = g.const_value(name)
    return None if value is None else value.ndim


def pack_projections(g: Graph) -> int:
    """Pack the projections of every fused attention op that allows it (see the module doc); returns how many
    layers were packed. Leaves the replaced nodes for the caller's prune."""
    packed = 0
    for node in list(g.g.node):
        if node.op_type != "GroupQueryAttention" or node.domain != names.CONTRIB_DOMAIN:
            continue
        found = [_projection(g, node.input[k], node) for k in range(3)]
        if any(p is None for p in found):
            continue
        projections = [p for p in found if p is not None]
        if len({p.x for p in projections}) != 1 or len({p.bias is None for p in projections}) != 1:
            continue
        weight = g.add("Concat", [p.weight for p in projections], hint="qkv_weight", axis=1)
        out = g.add("MatMul", [projections[0].x, weight], hint="qkv_proj")
        if projections[0].bias is not None:
            bias = g.add("Concat", [p.bias for p in projections if p.bias is not None], hint="qkv_bias",
                         axis=0)
            out = g.add("Add", [out, bias], hint="qkv")
        for k, name in enumerate((out, "", "")):
            node.input[k] = name
        packed += 1
    g.refresh()
    return packed
