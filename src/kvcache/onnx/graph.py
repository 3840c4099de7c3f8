"""A small mutable view of an ONNX graph for the injection passes, and shape probing.

The passes work on the ``onnx.ModelProto`` in place: weights stay wherever they are (usually external data
that was never loaded), only nodes and value names change. :class:`Graph` keeps producer/consumer indexes,
creates uniquely named nodes and constants, removes dead nodes and restores topological order.

:func:`probe_shapes` runs ONNX shape inference (with data propagation) on a weight-free copy of the graph
whose dynamic input dimensions are pinned to chosen sizes. Running it twice with different sequence lengths
tells which dimensions of every intermediate tensor follow the sequence length: that is how the passes find
the ``[batch, num_kv_heads, seq, head_dim]`` key/value tensors and fix reshape targets, without a runtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from kvcache.errors import KVCacheError

#: comparison ops: a causal mask compares key and query positions, an ALiBi bias does not
COMPARISONS: frozenset[str] = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Trilu"})


@dataclass(frozen=True)
class TensorInfo:
    """Concrete shape (``None`` where inference gave up) and ONNX element type of one tensor."""

    shape: tuple[int | None, ...] | None
    elem_type: int


class Graph:
    """Indexes over ``model.graph`` plus helpers to add nodes; call :meth:`refresh` after bulk edits."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self._counter = 0
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.refresh()

    # ----- indexes ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the producer/consumer/initializer indexes from the protobuf."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.initializers = {t.name: t for t in self.g.initializer}
        self.inputs = {i.name for i in self.g.input} - set(self.initializers)
        self.outputs = {o.name for o in self.g.output}

    def is_constant(self, name: str) -> bool:
        """True for initializers and outputs of ``Constant`` nodes (parameters included)."""
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of a small embedded constant, or ``None`` (unknown, computed, or external data)."""
        if name in self.initializers:
            t = self.initializers[name]
            if t.data_location == TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(t)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(a))
                if a.name in ("value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(a))
        return None

    def ancestor_ops(self, name: str, limit: int = 5000) -> tuple[set[str], set[str]]:
        """``(op types, graph inputs)`` found upstream of tensor ``name`` (bounded walk).

        The walk does not pass through ``Shape``/``Size``: what flows through them is a size, never the
        values of the tensors above them (otherwise every layer would "depend" on the previous layers' masks).
        """
        ops: set[str] = set()
        inputs: set[str] = set()
        seen: set[str] = set()
        stack = [name]
        while stack and len(seen) < limit:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.inputs:
                inputs.add(t)
            node = self.producer.get(t)
            if node is None:
                continue
            ops.add(node.op_type)
            if node.op_type not in ("Shape", "Size"):
                stack.extend(i for i in node.input if i)
        return ops, inputs

    # ----- edits --------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor/node name not used yet, prefixed so injected parts are recognisable."""
        while True:
            self._counter += 1
            name = f"kvcache/{hint}_{self._counter}"
            if name not in self.producer and name not in self.initializers:
                return name

    def add(self, op: str, inputs: Iterable[str], *, out: str | None = None, hint: str | None = None,
            **attrs: object) -> str:
        """Append a node ``op(inputs)`` and return its (single) output name."""
        output = out or self.fresh(hint or op)
        made = helper.make_node(op, list(inputs), [output], name=self.fresh(op + "_node"), **attrs)
        self.g.node.append(made)
        node = self.g.node[-1]  # the container holds a copy: index the copy, the one later edits must change
        self.producer[output] = node
        for i in node.input:
            if i:
                self.consumers.setdefault(i, []).append(node)
        return output

    def const(self, value: np.ndarray | list[int] | int | float, dtype: np.dtype | type | None = None,
              hint: str = "const") -> str:
        """Append a ``Constant`` node holding ``value`` and return its name."""
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        return self.add("Constant", [], out=name, value=numpy_helper.from_array(arr, name=name))

    def replace_input(self, node: onnx.NodeProto, index: int, new: str) -> None:
        """Point input ``index`` of ``node`` at tensor ``new``."""
        old = node.input[index]
        node.input[index] = new
        if old in self.consumers and node in self.consumers[old] and old not in node.input:
            self.consumers[old] = [n for n in self.consumers[old] if n is not node]
        self.consumers.setdefault(new, []).append(node)

    def prune(self) -> None:
        """Drop nodes, initializers and value_info that no graph output depends on."""
        live: set[str] = set(self.outputs)
        keep: list[onnx.NodeProto] = []
        for node in reversed(self.topo_order()):
            if any(o in live for o in node.output):
                keep.append(node)
                live.update(i for i in node.input if i)
        keep.reverse()
        del self.g.node[:]
        self.g.node.extend(keep)
        used = {i for n in keep for i in n.input} | self.outputs
        dead = [t for t in self.g.initializer if t.name not in used]
        for t in dead:
            self.g.initializer.remove(t)
        self.refresh()

    def topo_order(self) -> list[onnx.NodeProto]:
        """Nodes in a topological order (stable with respect to the current order)."""
        available = set(self.inputs) | set(self.initializers) | {""}
        pending = list(self.g.node)
        order: list[onnx.NodeProto] = []
        while pending:
            progressed = False
            rest = []
            for node in pending:
                if all(i in available for i in node.input):
                    order.append(node)
                    available.update(node.output)
                    progressed = True
                else:
                    rest.append(node)
            if not progressed:
                missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
                raise KVCacheError(f"the graph has a cycle or undefined tensors: {', '.join(missing)}")
            pending = rest
        return order

    def sort(self) -> None:
        """Rewrite the node list in topological order (ONNX requires it)."""
        order = self.topo_order()
        del self.g.node[:]
        self.g.node.extend(order)


def probe_shapes(model: onnx.ModelProto, batch: int, seq: int) -> dict[str, TensorInfo]:
    """Concrete shapes of every tensor when the ``[batch, seq]`` inputs take the given sizes.

    Parameters
    ----------
    model:
        A decoder graph without cache whose inputs are all ``[batch, sequence]`` (``input_ids``,
        ``attention_mask``, ``position_ids``). Weights are not read (external data need not be loaded;
        embedded ones are dropped from the copy).
    batch, seq:
        The sizes to pin; pick values no head count or head size of the model equals.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    # drop weight bytes from the copy: shape inference only needs their dims
    for t in probe.graph.initializer:
        if t.raw_data and len(t.raw_data) > 4096:
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value="__probe__")
    del probe.graph.value_info[:]
    init_names = {t.name for t in probe.graph.initializer}
    for vi in probe.graph.input:
        if vi.name in init_names:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != 2:
            raise KVCacheError(f"graph input {vi.name!r} has rank {len(dims)}; a decoder graph without cache "
                               "takes only [batch, sequence] inputs (input_ids, attention_mask, position_ids)"
                               )
        for d, value in zip(dims, (batch, seq), strict=True):
            d.Clear()
            d.dim_value = value
    for vi in probe.graph.output:
        vi.type.tensor_type.ClearField("shape")
    info: dict[str, TensorInfo] = {}
    # ONNX Runtime's symbolic inference evaluates shape arithmetic (Shape->Gather->Concat->Reshape) much
    # further than onnx's data propagation; the latter fills in what the former could not do
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        _collect(SymbolicShapeInference.infer_shapes(probe, auto_merge=True), info)
    except Exception:  # any failure there just means we rely on onnx's inference alone
        pass
    try:
        fallback: dict[str, TensorInfo] = {}
        _collect(shape_inference.infer_shapes(probe, data_prop=True), fallback)
    except Exception as exc:  # onnx raises InferenceError and friends; report them as one kind
        if not info:
            raise KVCacheError(f"ONNX shape inference failed on this graph: {exc}") from exc
        fallback = {}
    for name, value in fallback.items():
        known = info.get(name)
        if known is None or known.shape is None or None in known.shape:
            info[name] = value
    for t in probe.graph.initializer:
        info[t.name] = TensorInfo(tuple(t.dims), t.data_type)
    return info


def _collect(model: onnx.ModelProto, info: dict[str, TensorInfo]) -> None:
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        info[vi.name] = TensorInfo(shape, tt.elem_type)


def evaluate_upstream(g: Graph, outputs: list[str], feeds: dict[str, np.ndarray],
                      probe: dict[str, TensorInfo] | None = None) -> dict[str, np.ndarray] | None:
    """Values of ``outputs`` computed by the nodes above them from the graph inputs in ``feeds`` and embedded
    constants, with :class:`onnx.reference.ReferenceEvaluator`.

    With a shape ``probe``, ``Shape``/``Size`` of a tensor that is not fed become constants from it (so no
    weight is read to size an activation); an output whose computation needs a size the probe does not know
    is left out of the result. Without one they are evaluated like any node.

    Returns ``None`` when the computation reads a graph input that is not fed or an external weight, or uses
    an operator the reference evaluator cannot run: the caller then treats the tensors as unknown.
    """
    from onnx.reference import ReferenceEvaluator

    def sized(node: onnx.NodeProto) -> bool:
        return probe is not None and node.op_type in ("Shape", "Size") and node.input[0] not in feeds

    needed: set[str] = set()
    stack = list(outputs)
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in needed:
            continue
        needed.add(tensor)
        node = g.producer.get(tensor)
        if node is not None and not sized(node):
            stack.extend(node.input)
    made: list[onnx.NodeProto] = []
    unknown: set[str] = set()
    for node in g.topo_order():
        if not any(o in needed for o in node.output):
            continue
        if sized(node):
            info = probe.get(node.input[0]) if probe is not None else None
            if info is None or info.shape is None or None in info.shape:
                unknown.update(node.output)
                continue
            shape = np.array(info.shape, dtype=np.int64)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            value = np.array(shape.size if node.op_type == "Size" else
                             shape[attrs.get("start", 0): attrs.get("end", len(shape))], dtype=np.int64)
            made.append(helper.make_node("Constant", [], [node.output[0]],
                                         value=numpy_helper.from_array(value)))
        elif any(i in unknown for i in node.input):
            unknown.update(node.output)
        else:
            made.append(node)
    inputs = sorted(needed & g.inputs)
    if any(name not in feeds for name in inputs):
        return None
    initializers = [g.initializers[t] for t in sorted(needed & set(g.initializers))]
    if any(t.data_location == TensorProto.EXTERNAL for t in initializers):
        return None
    wanted = [t for t in outputs if t not in unknown]
    if not wanted:
        return {}
    graph = helper.make_graph(
        made, "upstream",
        [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                       list(feeds[name].shape)) for name in inputs],
        [helper.make_empty_tensor_value_info(name) for name in wanted], initializer=initializers)
    try:
        values = ReferenceEvaluator(helper.make_model(graph, opset_imports=list(g.model.opset_import))).run(
            None, {name: feeds[name] for name in inputs})
    except Exception:  # noqa: BLE001 - an operator the reference evaluator cannot run
        return None
    return {name: np.asarray(v) for name, v in zip(wanted, values, strict=True)}
