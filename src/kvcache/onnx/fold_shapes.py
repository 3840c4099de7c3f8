"""Fold a decoder graph's shape arithmetic into constants (the ``--fused`` injection's clean-up pass).

Exporters trace ``x.view(batch, seq, heads, head_dim)`` as ``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape`` and ``x[..., : x.shape[-1] // 2]`` as ``Shape -> Gather -> Div -> Slice``: a few dozen tiny nodes
per layer that ONNX Runtime runs at every step although only the batch and sequence sizes can ever change.
On a small model they cost as much as the layer's matrix products.

The pass evaluates every integer tensor computed from shapes alone (``Shape`` of a tensor whose dimensions
the shape probes know, then ``Gather``/``Concat``/``Div``/...) at probe sizes that differ in batch and
sequence length, sizes of 1 included (a decode step feeds one token, and broadcasting treats a dimension of 1
apart), with :class:`onnx.reference.ReferenceEvaluator`:

* a value that is the same at all of them does not depend on the batch or the sequence: it becomes a constant;
* a ``Reshape`` target that varies becomes a constant with ``0`` (copy the input's dimension) and ``-1``
  (the rest) where the probes show those rules give the probed output shape;
* an ``Expand`` target that varies only where it equals the input's dimension gets ``1`` there.

Everything else is left as it was; nodes nothing reads any more are pruned by the caller.
"""

from __future__ import annotations

import numpy as np
import onnx

from kvcache.onnx.graph import Graph, TensorInfo, evaluate_upstream

#: ops evaluated when all their inputs are known shape values
_FOLDABLE = frozenset({
    "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub", "Mul", "Div", "Equal", "Where",
    "Reshape", "ConstantOfShape", "Expand", "Neg", "Floor", "Ceil", "Identity", "Max", "Min", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "ReduceProd", "ReduceSum", "Range", "Mod",
    "Abs", "Sqrt", "Pow", "Tile", "Constant",
})
#: largest folded constant (elements): shape values are tiny; a mask or position table is not folded
_MAX_FOLDED = 256


def _known(info: TensorInfo | None) -> tuple[int, ...] | None:
    if info is None or info.shape is None or any(d is None for d in info.shape):
        return None
    return tuple(int(d) for d in info.shape)  # type: ignore[arg-type]


def _shape_nodes(g: Graph, probes: list[dict[str, TensorInfo]]) -> list[onnx.NodeProto]:
    """Nodes whose outputs are computed from probed shapes and small constants only, in graph order."""
    known: set[str] = set()
    for name, t in g.initializers.items():
        if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) <= _MAX_FOLDED:
            known.add(name)
    picked = []
    for node in g.topo_order():
        if node.op_type in ("Shape", "Size"):
            if all(_known(p.get(node.input[0])) is not None for p in probes):
                picked.append(node)
                known.update(node.output)
            continue
        if node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") \
                and all(not i or i in known for i in node.input) and len(node.output) == 1:
            picked.append(node)
            known.update(node.output)
    return picked


def fold_shapes(g: Graph, probes: list[dict[str, TensorInfo]]) -> int:
    """Fold shape arithmetic (see the module doc); returns how many node inputs became constants.

    ``probes`` are :func:`~kvcache.onnx.graph.probe_shapes` results at sizes that differ in batch and in
    sequence length (sizes of 1 among them). Call :meth:`Graph.prune` afterwards.
    """
    nodes = _shape_nodes(g, probes)
    if not nodes:
        return 0
    outputs = [o for n in nodes for o in n.output]
    evaluated = [evaluate_upstream(g, outputs, {}, p) for p in probes]
    values = [v for v in evaluated if v is not None and len(v) == len(outputs)]
    if len(values) != len(probes):
        return 0  # an op the reference evaluator cannot run: fold nothing
    inside = {id(n) for n in nodes}
    folded = 0
    constants: dict[str, str] = {}
    for node in list(g.g.node):
        if id(node) in inside:
            continue
        for k, name in enumerate(node.input):
            if not name or name not in values[0] or g.is_constant(name):
                continue
            replacement = _constant_for(g, node, k, [v[name] for v in values], probes, constants)
            if replacement is not None:
                g.replace_input(node, k, replacement)
                folded += 1
    return folded


def _constant_for(g: Graph, node: onnx.NodeProto, index: int, vals: list[np.ndarray],
                  probes: list[dict[str, TensorInfo]], cache: dict[str, str]) -> str | None:
    """A constant that can stand for ``node.input[index]`` (whose values at the probes are ``vals``)."""
    first = vals[0]
    if first.size > _MAX_FOLDED:
        return None
    if all(v.shape == first.shape and np.array_equal(v, first) for v in vals[1:]):
        key = f"{first.dtype}:{first.shape}:{first.tobytes().hex()}"
        if key not in cache:
            cache[key] = g.const(first, dtype=first.dtype, hint="folded")
        return cache[key]
    if index != 1 or node.op_type not in ("Reshape", "Expand") or first.ndim != 1:
        return None
    ins = [_known(p.get(node.input[0])) for p in probes]
    if any(s is None for s in ins) or any(v.shape != first.shape for v in vals):
        return None
    if node.op_type == "Expand":
        target = _expand_target(vals, ins)
    else:
        outs = [_known(p.get(node.output[0])) for p in probes]
        target = None if any(o is None for o in outs) else _reshape_target(vals, ins, outs, node)
    return None if target is None else g.const(np.array(target, dtype=np.int64), hint="folded_shape")


def _reshape_target(vals: list[np.ndarray], ins: list[tuple[int, ...] | None],
                    outs: list[tuple[int, ...] | None], node: onnx.NodeProto) -> list[int] | None:
    if any(a.name == "allowzero" and a.i for a in node.attribute):
        return None
    target: list[int] = []
    for i in range(vals[0].size):
        column = [int(v[i]) for v in vals]
        if len(set(column)) == 1 and column[0] != 0:
            target.append(column[0])
        elif all(s is not None and i < len(s) and s[i] == c for s, c in zip(ins, column, strict=True)):
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1:
        return None
    # the rules must give the shapes the probes found
    for s, out in zip(ins, outs, strict=True):
        assert s is not None and out is not None
        got = [s[i] if t == 0 else t for i, t in enumerate(target)]
        if -1 in got:
            rest = int(np.prod(s)) // max(1, int(np.prod([d for d in got if d != -1])))
            got = [rest if d == -1 else d for d in got]
        if tuple(got) != out:
            return None
    return target


def _expand_target(vals: list[np.ndarray], ins: list[tuple[int, ...] | None]) -> list[int] | None:
    rank = vals[0].size
    target: list[int] = []
    for i in range(rank):
        column = [int(v[i]) for v in vals]
        if len(set(column)) == 1:
            target.append(column[0])
            continue
        j = i - (rank - len(ins[0] or ()))  # Expand aligns dimensions from the right
        if j >= 0 and all(s is not None and s[j] == c for s, c in zip(ins, column, strict=True)):
            target.append(1)
        else:
            return None
    return target
