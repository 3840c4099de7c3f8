"""Terms on an exported attention's score path that the fused attention op makes redundant.

Older exports (transformers 4.x, eager attention) add more to the scores than a scaled Q·K^T and the causal
mask: a padding mask read off ``attention_mask`` (``(1 - mask) * min``, expanded), a zero tensor that
``baddbmm`` starts from (GPT-NeoX), a clamp of the scores at the dtype's lowest value (OPT). The fused op
masks padding itself (its ``attention_bias``), and the other two change nothing. Each is recognised by what it
computes, not by its shape in the graph: the padding mask is evaluated on a test batch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from kvcache.onnx import names
from kvcache.onnx.graph import Graph, evaluate_upstream

#: scores are finite and far above this: a clamp at it (or at the dtype's lowest value) changes nothing
_LOWEST = -1e30
#: where a padding mask blocks a slot, it adds at most this (float16's lowest is -65504)
_BLOCKED = -1e4


def is_padding_mask(g: Graph, tensor: str) -> bool:
    """True when ``tensor`` is an additive padding mask: computed from the graph's ``[batch, seq]`` inputs
    only, and on a test batch (one row left-padded by two tokens) 0 at every real key and at most -1e4 at
    every padded one, for every query row and head; keys after the query (which the op's causal mask hides
    anyway) may hold either."""
    if names.ATTENTION_MASK not in g.ancestor_ops(tensor)[1]:
        return False
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)
    feeds = {names.INPUT_IDS: np.full((2, 5), 3, np.int64), names.ATTENTION_MASK: mask,
             names.POSITION_IDS: np.clip(mask.cumsum(-1) - 1, 0, None)}
    found = evaluate_upstream(g, [tensor], {k: v for k, v in feeds.items() if k in g.inputs})
    if found is None:
        return False
    value = found[tensor]
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 4 or value.shape[0] != 2 or value.shape[-1] != 5:
        return False
    keys = np.broadcast_to(mask[:, None, None, :].astype(bool), value.shape)
    seen = np.ones(value.shape, dtype=bool)
    if value.shape[2] == 5:  # one row per query: only keys up to the query are the mask's to decide
        seen = np.broadcast_to(np.tril(np.ones((5, 5), dtype=bool)), value.shape)
    return bool(np.all(value[keys & seen] == 0) and np.all(value[~keys & seen] <= _BLOCKED))


def is_zeros(g: Graph, tensor: str) -> bool:
    """True when ``tensor`` is ``ConstantOfShape`` of zero (through casts, reshapes and scalings):
    ``baddbmm``'s starting tensor times its ``beta``."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type in ("Cast", "Reshape", "Identity", "Expand", "Mul"):
        if node.op_type == "Mul":
            scalars = [i for i in node.input if (v := g.const_value(i)) is not None and v.size == 1]
            rest = [i for i in node.input if i not in scalars]
            if len(rest) != 1:
                return False
            node = g.producer.get(rest[0])
            continue
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "ConstantOfShape":
        return False
    value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1))
    return bool(np.all(value == 0))


def is_floor_clamp(g: Graph, node: onnx.NodeProto, index: int) -> bool:
    """True when ``node`` is ``Max(scores, c)`` with a constant ``c`` at or below the lowest finite scores
    (OPT clamps at the dtype's lowest value): it changes no finite score."""
    if node.op_type != "Max" or len(node.input) != 2:
        return False
    value = g.const_value(node.input[1 - index])
    return value is not None and value.size == 1 and float(value.reshape(())) <= _LOWEST
