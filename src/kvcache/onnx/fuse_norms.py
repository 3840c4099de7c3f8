"""RMS norms as ONNX Runtime's fused ``SimplifiedLayerNormalization`` ops, the residual add folded into
``SkipSimplifiedLayerNormalization`` (the ``--fused`` injection's last pass).

Exporters trace ``RMSNorm`` as ``Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul -> Mul`` (with float-to-float
casts between), and the residual connection before it as one more ``Add``. ONNX Runtime fuses the norm by
itself when the session loads the graph, but not the residual add into it. The fusions are ONNX Runtime's own
(``onnxruntime.transformers``: casts that change nothing removed, then the norm, then the skip), applied once
at injection time. LayerNorm models (GPT-2, GPT-NeoX, ...) and RMS norms in other forms are left as they are.
"""

from __future__ import annotations

import logging

import onnx


def fuse_norms(model: onnx.ModelProto) -> int:
    """Fuse ``model``'s RMS norms and their residual adds in place; returns how many fused nodes it holds."""
    import onnxruntime.transformers  # noqa: F401  (makes its fusion modules importable by their bare names)
    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
        FusionSkipSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        wrapped = OnnxModel(model)
        wrapped.remove_useless_cast_nodes()
        FusionSimplifiedLayerNormalization(wrapped).apply()
        FusionSkipSimplifiedLayerNormalization(wrapped).apply()
    finally:
        quiet.setLevel(level)
    del model.graph.value_info[:]  # shape inference's annotations: stale once the caller edits further
    return sum(n.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
               for n in model.graph.node)
