"""Injection pass 3 (optional): per-layer attention statistics for host-side retention policies.

Adds the output ``attn_scores.{i}`` ``[batch, num_heads, past + seq]``: the softmax probabilities the model
itself computed (the Softmax output, or output 3 of the fused ``Attention`` op switched to
``qk_matmul_output_mode=3``: no second attention pass), summed over the current query rows, leaving out
query rows that are padding (``attention_mask`` 0 in the last ``seq`` columns). Policies such as H2O, TOVA
and Keyformer's accumulation take their scores from it (Keyformer's Gumbel noise is added on the host).

For graphs injected for retention policies, :func:`add_attention_logits` adds ``attn_logits.{i}``
``[batch, num_heads, seq, past + seq]``: the masked logits the softmax reads (the fused op's
``qk_matmul_output_mode=2`` output), from which the host derives whatever a policy asks for, with the same
code as the PyTorch attention function (:func:`kvcache.observe.select_rows`).
"""

from __future__ import annotations

import numpy as np
import onnx

from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.graph import Graph
from kvcache.onnx.patterns import AttentionSite
from kvcache.onnx.rewrite_mask import MaskBuilder


def add_attention_stats(g: Graph, sites: list[AttentionSite], builder: MaskBuilder) -> None:
    """Add ``attn_scores.{i}`` for every site (needs the Softmax of the unfused pattern)."""
    i64 = np.int64
    query_valid: dict[int, str] = {}
    for site in sites:
        probs = site.softmax.output[0] if site.softmax is not None else _fused_probs(g, site)
        dtype = site.score_dtype
        if dtype not in query_valid:
            # [batch, 1, seq, 1]: 1 for real current tokens, 0 for padding
            neg = g.add("Neg", [builder.current_len()], hint="neg_current")
            current_mask = g.add("Slice", [names.ATTENTION_MASK, neg, g.const([np.iinfo(np.int64).max], i64),
                                           g.const([1], i64)], hint="current_mask")
            query_valid[dtype] = g.add("Unsqueeze", [g.add("Cast", [current_mask], to=dtype),
                                                     g.const([1, 3], i64)], hint="query_valid")
        weighted = g.add("Mul", [probs, query_valid[dtype]], hint="valid_probs")
        out = names.attn_scores(site.layer)
        g.add("ReduceSum", [weighted, g.const([2], i64)], out=out, keepdims=0)
        g.g.output.append(onnx.helper.make_tensor_value_info(
            out, dtype, [names.BATCH_DIM, "num_heads", names.TOTAL_DIM]))
        g.outputs.add(out)


def add_attention_logits(g: Graph, sites: list[AttentionSite]) -> None:
    """Add ``attn_logits.{i}`` for every site: the masked logits its softmax reads."""
    for site in sites:
        logits = site.softmax.input[0] if site.softmax is not None else _fused_probs(g, site, mode=2)
        out = names.attn_logits(site.layer)
        g.add("Identity", [logits], out=out)
        g.g.output.append(onnx.helper.make_tensor_value_info(
            out, site.score_dtype, [names.BATCH_DIM, "num_heads", names.SEQUENCE_DIM, names.TOTAL_DIM]))
        g.outputs.add(out)


def _fused_probs(g: Graph, site: AttentionSite, mode: int = 3) -> str:
    """Ask the opset-23 ``Attention`` op for its softmax output (``qk_matmul_output_mode=3``, output 3), or
    with ``mode=2`` for the logits its softmax reads."""
    node = site.qk
    for attr in node.attribute:
        if attr.name == "qk_matmul_output_mode":
            if attr.i not in (0, mode):
                raise KVCacheError(f"layer {site.layer}: Attention node {node.name!r} already outputs "
                                   f"qk_matmul_output_mode={attr.i}, and one output cannot serve both the "
                                   "attention statistics and the logits: inject with --policies alone")
            attr.i = mode
            break
    else:
        node.attribute.append(onnx.helper.make_attribute("qk_matmul_output_mode", mode))
    while len(node.output) < 4:
        node.output.append("")
    if not node.output[3]:
        node.output[3] = g.fresh("attention_probs")
        g.producer[node.output[3]] = node
    return node.output[3]
