"""Injection pass 0: split sizes read from ``attention_mask`` into "current length" and "total length".

Without a cache ``input_ids`` and ``attention_mask`` have the same length, so an exporter may read the
sequence length from either. The dynamo exporter unifies the two symbols and often reads it from
``Shape(attention_mask)``, then uses it both for the queries (``view(batch, seq, heads, dim)``: must stay
the *current* length) and for key-axis tensors such as ALiBi biases (must become ``past + current``).

The pass clones the small size-arithmetic sub-graph hanging off each ``Shape(attention_mask)`` with
``Shape(input_ids)`` at its root. Consumers that build an additive score bias (ancestors of a non-mask
input of the score path: ALiBi) keep the original (the total length); every other consumer is moved to
the clone (the current length). Mask construction is replaced wholesale by the mask pass anyway.
"""

from __future__ import annotations

from math import prod

import onnx
from onnx import TensorProto

from kvcache.onnx import names
from kvcache.onnx.graph import Graph, TensorInfo
from kvcache.onnx.patterns import AttentionSite, score_path

_INT = (TensorProto.INT64, TensorProto.INT32)


def _is_size(t: str, probe: dict[str, TensorInfo]) -> bool:
    """A small integer tensor: a shape, a length, an index (not data of the model)."""
    info = probe.get(t)
    return (info is not None and info.shape is not None and None not in info.shape and len(info.shape) <= 1
            and prod(info.shape) <= 8 and info.elem_type in _INT)  # type: ignore[arg-type]


def _bias_nodes(g: Graph, sites: list[AttentionSite]) -> set[str]:
    """Keys (first outputs) of the nodes upstream of non-mask score-path inputs (biases such as ALiBi)."""
    out: set[str] = set()
    for site in sites:
        if site.softmax is None:
            continue
        path = score_path(g, site.softmax) or []
        masks = {(e.node.output[0], e.index) for e in site.mask_edits}
        for node, score_index in path[:-1]:
            if node.op_type == "Reshape":
                continue
            for k, name in enumerate(node.input):
                if k == score_index or not name or g.is_constant(name) or (node.output[0], k) in masks:
                    continue
                stack = [name]
                seen: set[str] = set()
                while stack:
                    t = stack.pop()
                    if t in seen:
                        continue
                    seen.add(t)
                    producer = g.producer.get(t)
                    if producer is None:
                        continue
                    out.add(producer.output[0])
                    if producer.op_type not in ("Shape", "Size"):
                        stack.extend(i for i in producer.input if i)
    return out


def split_mask_sizes(g: Graph, sites: list[AttentionSite], probe: dict[str, TensorInfo]) -> int:
    """Apply the pass; returns the number of consumers moved to the current length."""
    roots = [n for n in g.g.node if n.op_type == "Shape" and n.input[0] == names.ATTENTION_MASK
             and not n.name.startswith("kvcache/")]
    if not roots or names.INPUT_IDS not in g.inputs:
        return 0
    bias = _bias_nodes(g, sites)
    # the size closure: nodes downstream of the roots whose outputs are all sizes
    closure: list[onnx.NodeProto] = []
    # nodes are keyed by their first output name: protobuf wrappers are not stable identities
    in_closure: set[str] = {r.output[0] for r in roots}
    frontier = [o for r in roots for o in r.output]
    while frontier:
        t = frontier.pop()
        for node in g.consumers.get(t, []):
            if node.output[0] in in_closure:
                continue
            if node.output and all(_is_size(o, probe) for o in node.output):
                in_closure.add(node.output[0])
                closure.append(node)
                frontier.extend(node.output)
    order = {n.output[0]: k for k, n in enumerate(g.topo_order())}
    closure.sort(key=lambda n: order[n.output[0]])
    mapping: dict[str, str] = {}
    for root in roots:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in root.attribute}
        mapping[root.output[0]] = g.add("Shape", [names.INPUT_IDS], hint="current_shape", **attrs)
    clones: set[str] = set()
    for node in closure:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = g.fresh(node.op_type + "_node")
        del copy.input[:]
        copy.input.extend(mapping.get(i, i) for i in node.input)
        del copy.output[:]
        for o in node.output:
            mapping[o] = g.fresh("current_size")
            copy.output.append(mapping[o])
        g.g.node.append(copy)
        clones.add(copy.output[0])
    g.refresh()
    moved = 0
    for old, new in mapping.items():
        for node in list(g.consumers.get(old, [])):
            key = node.output[0]
            if key in in_closure or key in clones or key in bias:
                continue
            for k, name in enumerate(node.input):
                if name == old:
                    g.replace_input(node, k, new)
                    moved += 1
    return moved
