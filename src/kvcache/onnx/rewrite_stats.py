"""Injection pass 3 (optional): per-layer attention statistics for host-side retention policies.

Adds the output ``attn_scores.{i}`` ``[batch, num_heads, past + seq]``: the softmax probabilities the model
itself computed (so no second attention pass), summed over the current query rows, with query rows that are
padding (``attention_mask`` 0 in the last ``seq`` columns) left out. Policies such as H2O, TOVA and
Keyformer's accumulation take their scores from it (Keyformer's Gumbel noise is added on the host).
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
        if site.softmax is None:
            raise KVCacheError(f"layer {site.layer}: attention statistics need an explicit Softmax, and "
                               "this graph uses the fused Attention op; export with opset 17-22 for "
                               "--attention-stats")
        dtype = site.score_dtype
        if dtype not in query_valid:
            # [batch, 1, seq, 1]: 1 for real current tokens, 0 for padding
            neg = g.add("Neg", [builder.current_len()], hint="neg_current")
            current_mask = g.add("Slice", [names.ATTENTION_MASK, neg, g.const([np.iinfo(np.int64).max], i64),
                                           g.const([1], i64)], hint="current_mask")
            query_valid[dtype] = g.add("Unsqueeze", [g.add("Cast", [current_mask], to=dtype),
                                                     g.const([1, 3], i64)], hint="query_valid")
        probs = site.softmax.output[0]
        weighted = g.add("Mul", [probs, query_valid[dtype]], hint="valid_probs")
        out = names.attn_scores(site.layer)
        g.add("ReduceSum", [weighted, g.const([2], i64)], out=out, keepdims=0)
        g.g.output.append(onnx.helper.make_tensor_value_info(
            out, dtype, [names.BATCH_DIM, "num_heads", names.TOTAL_DIM]))
        g.outputs.add(out)
