"""Injection pass 1: extend each layer's keys/values with the past and expose the result as ``present``.

For every :class:`~kvcache.onnx.patterns.AttentionSite` the pass adds the inputs
``past_key_values.{i}.key|value`` ``[batch, num_kv_heads, past, head_dim]``, inserts
``Concat([past, current], axis=2)`` at the site's key/value tensors (before repeat_kv, so GQA keeps
``num_kv_heads``), names the Concat outputs ``present.{i}.key|value`` and repoints every former consumer.

The layout nodes between the Concat and the attention (repeat_kv's Expand/Reshape, bloom's head merge...)
were traced with targets computed from the *current* sequence length; every target dimension that the
shape probes show following the sequence length is replaced, at run time, by the present length.
"""

from __future__ import annotations

import numpy as np
import onnx

from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.graph import Graph, TensorInfo
from kvcache.onnx.patterns import LAYOUTS, AttentionSite


def inject_cache(g: Graph, site: AttentionSite, site_geometry: tuple[int, int], probe: dict[str, TensorInfo],
                 probe2: dict[str, TensorInfo], seq: int, seq2: int, arch: str) -> tuple[str, str]:
    """Insert the past/present Concats of one layer; returns the ``(present_key, present_value)`` names."""
    presents = []
    heads, head_dim = site_geometry
    for tensor, layout, past_name, present_name in (
        (site.key, site.key_layout, names.past_key(site.layer), names.present_key(site.layer)),
        (site.value, site.value_layout, names.past_value(site.layer), names.present_value(site.layer)),
    ):
        elem_type = probe[tensor].elem_type
        g.g.input.append(onnx.helper.make_tensor_value_info(
            past_name, elem_type, [names.BATCH_DIM, heads, names.PAST_DIM, head_dim]))
        g.inputs.add(past_name)
        old_consumers = list(g.consumers.get(tensor, []))
        perm = LAYOUTS[layout]
        # a tensor found transposed (e.g. [batch, seq, heads, dim] when the exporter merged two
        # transposes into one) is brought to the cache layout and back; ORT folds the transpose pair
        current = tensor if perm is None else g.add("Transpose", [tensor], hint="to_cache", perm=list(perm))
        present = g.add("Concat", [past_name, current], out=present_name, axis=2)
        replacement = present if perm is None else g.add("Transpose", [present], hint="from_cache",
                                                          perm=list(perm))
        for node in old_consumers:
            for k, name in enumerate(node.input):
                if name == tensor:
                    g.replace_input(node, k, replacement)
        g.g.output.append(onnx.helper.make_tensor_value_info(
            present_name, elem_type, [names.BATCH_DIM, heads, names.TOTAL_DIM, head_dim]))
        g.outputs.add(present_name)
        presents.append(present)
    total = g.add("Gather", [g.add("Shape", [presents[0]], hint="present_shape"), g.const([2], np.int64)],
                  hint="total_len", axis=0)
    for node in site.chain:
        if node.op_type in ("Reshape", "Expand"):
            _retarget(g, node, total, probe, probe2, seq, seq2, arch, site.layer)
    return presents[0], presents[1]


def _retarget(g: Graph, node: onnx.NodeProto, total: str, probe: dict[str, TensorInfo],
              probe2: dict[str, TensorInfo], seq: int, seq2: int, arch: str, layer: int) -> None:
    """Make the shape input of a Reshape/Expand use ``total`` wherever it used the sequence length."""
    out1, out2 = probe.get(node.output[0]), probe2.get(node.output[0])
    if out1 is None or out2 is None or out1.shape is None or out2.shape is None or None in out1.shape \
            or None in out2.shape:
        # Expand targets often stay unknown to shape inference (repeat_kv's group count); use the input
        # shape then: only dimensions that follow the sequence length move
        src1, src2 = probe.get(node.input[0]), probe2.get(node.input[0])
        if src1 is None or src2 is None or src1.shape is None or src2.shape is None \
                or node.op_type != "Expand":
            raise KVCacheError(f"{arch}: layer {layer}: cannot size {node.op_type} node {node.name!r} on the "
                               "key/value path (shape inference gave no shape)")
        flags = [a != b for a, b in zip(src1.shape, src2.shape, strict=True)]
        # Expand broadcasts: a target dim of 1 keeps the (now longer) input dim
        shape_in = node.input[1]
        mask = g.const(np.array(flags, dtype=bool), hint="seq_dims")
        node.input[1] = g.add("Where", [mask, g.const([1], np.int64), shape_in], hint="expand_shape")
        return
    flags = []
    for a, b in zip(out1.shape, out2.shape, strict=True):
        if a == b:
            flags.append(False)
        elif a == seq and b == seq2:
            flags.append(True)
        else:
            raise KVCacheError(f"{arch}: layer {layer}: {node.op_type} node {node.name!r} on the key/value "
                               f"path has a dimension that is a multiple of the sequence length ({a})")
    if not any(flags):
        return
    mask = g.const(np.array(flags, dtype=bool), hint="seq_dims")
    target = g.add("Where", [mask, total, node.input[1]], hint=f"{node.op_type.lower()}_shape")
    g.replace_input(node, 1, target)
