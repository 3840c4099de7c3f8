"""Injection pass: graphs that compute their own token positions get a ``position_ids`` input instead.

A decoder exported from ``(input_ids, attention_mask)`` alone computes the positions of its tokens itself:
``arange(seq)`` from the sequence length (``Range`` over ``Shape(input_ids)``, or the legacy exporter's
``ConstantOfShape`` + ``CumSum`` form of it), or ``cumsum(attention_mask) - 1`` (OPT). Once a cache is
injected every step's graph sees only the current tokens, so those positions would restart at 0 on every
step. This pass finds the position tensors and points what feeds the position encoding (a learned
position-embedding ``Gather``, the RoPE frequencies, GPT-J's sin/cos table ``Gather``) at a new graph input
``position_ids`` ``[batch, seq]`` (see :mod:`kvcache.onnx.names`). The mask path is left alone: the mask
pass replaces it wholesale.

Pattern -> check -> rewrite:

* **pattern** (:func:`find_positions`): the *size closure* of the graph is every tensor computed only from
  sizes (``Shape``/``Size`` of anything), the values of ``attention_mask`` and constants. Its integer tensors
  of shape ``[1 | batch, seq]`` are evaluated on probe inputs (left-padded rows) and kept when their
  values are positions: ``arange(seq)`` in every row, or ``cumsum(attention_mask) - 1`` on real tokens.
  A position tensor whose consumer is not itself a position tensor, and whose values reach the rest of
  the model (hidden states) other than through a mask entry point, feeds the position encoding.
* **check** (:func:`check_positions`): after the rewrite every layer's keys depend on ``position_ids`` and
  no position tensor computed from the sequence length still reaches the model; otherwise the error names
  the architecture, the layer and what was missing.
* **rewrite** (:func:`add_position_ids`): each such consumer reads ``position_ids`` (cast to the tensor's
  element type) instead.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import TensorProto, helper

from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.graph import Graph, TensorInfo, evaluate_upstream
from kvcache.onnx.patterns import AttentionSite

_INT = (TensorProto.INT64, TensorProto.INT32)
#: ops through which a tensor's *values* do not flow (only its size does)
_SIZE_OPS = ("Shape", "Size")


def size_closure(g: Graph, roots: tuple[str, ...] = (names.ATTENTION_MASK,)) -> set[str]:
    """Tensors computed only from sizes, the values of ``roots`` (graph inputs) and constants."""
    closed: set[str] = set(roots) | set(g.initializers)
    for node in g.topo_order():
        if node.op_type in _SIZE_OPS or all(not i or i in closed for i in node.input):
            closed.update(o for o in node.output if o)
    return closed


def _probe_feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Probe inputs: row ``b`` is left-padded by ``b`` tokens (at least one real token per row)."""
    mask = np.ones((batch, seq), np.int64)
    for b in range(1, batch):
        mask[b, : min(seq - 1, b)] = 0
    return {names.INPUT_IDS: np.zeros((batch, seq), np.int64), names.ATTENTION_MASK: mask}


def _evaluate(g: Graph, tensors: list[str], probe: dict[str, TensorInfo], batch: int,
              seq: int) -> dict[str, np.ndarray]:
    """Values of size-closure ``tensors`` for :func:`_probe_feeds` inputs (sizes taken from ``probe``).

    ``Shape``/``Size`` of a tensor other than the inputs become constants from the shape probe, so no weight
    is read; tensors whose computation needs an unknown size are left out, and nothing is returned when one
    needs an external initializer.
    """
    feeds = _probe_feeds(batch, seq)
    return evaluate_upstream(g, tensors, {k: v for k, v in feeds.items() if k in g.inputs}, probe) or {}


def _position_kind(value: np.ndarray, mask: np.ndarray) -> str | None:
    """``"arange"``, ``"cumsum"`` or ``None``: whether ``value`` ``[1|batch, seq, 1...]`` holds positions."""
    if value.ndim < 2 or any(d != 1 for d in value.shape[2:]):
        return None
    value = value.reshape(value.shape[:2])
    if value.shape[1] != mask.shape[1] or value.shape[0] not in (1, mask.shape[0]):
        return None
    seq = mask.shape[1]
    if np.array_equal(value, np.broadcast_to(np.arange(seq), value.shape)):
        return "arange"
    if value.shape[0] == mask.shape[0]:
        want = mask.cumsum(-1) - 1
        real = mask.astype(bool)
        if np.array_equal(value[real], want[real]):
            return "cumsum"
    return None


def _reaches_model(g: Graph, start: list[str], closure: set[str],
                   mask_entries: set[tuple[str, int]]) -> onnx.NodeProto | None:
    """The first node outside the closure that the values of ``start`` reach other than through a mask entry.

    ``mask_entries`` holds ``(node first output, input index)`` of the score-path mask inputs. Values do
    not flow through ``Shape``/``Size``.
    """
    seen: set[str] = set()
    queue = deque(start)
    while queue:
        out = queue.popleft()
        if out in seen:
            continue
        seen.add(out)
        for consumer in g.consumers.get(out, []):
            if consumer.op_type in _SIZE_OPS:
                continue
            if consumer.output[0] in closure:
                queue.extend(o for o in consumer.output if o)
                continue
            entries = [k for k, i in enumerate(consumer.input) if i == out]
            if any((consumer.output[0], k) not in mask_entries for k in entries):
                return consumer
    return None


def find_positions(g: Graph, sites: list[AttentionSite], probe: dict[str, TensorInfo], batch: int,
                   seq: int) -> list[tuple[str, onnx.NodeProto, str]]:
    """``(position tensor, consumer, kind)`` where computed positions enter the position encoding; kind is
    ``"arange"`` or ``"cumsum"`` (see :func:`_position_kind`)."""
    closure = size_closure(g)
    candidates = []
    for t in sorted(closure):
        info = probe.get(t)
        if info is None or info.elem_type not in _INT or info.shape is None or len(info.shape) < 2:
            continue
        if info.shape[1] == seq and info.shape[0] in (1, batch) and all(d == 1 for d in info.shape[2:]) \
                and t not in g.initializers:
            candidates.append(t)  # [1 | batch, seq, 1, ...]: the exporter may have merged later unsqueezes
    values = _evaluate(g, candidates, probe, batch, seq) if candidates else {}
    mask = _probe_feeds(batch, seq)[names.ATTENTION_MASK]
    kinds = {t: _position_kind(np.asarray(v), mask) for t, v in values.items()}
    positions = {t for t, kind in kinds.items() if kind is not None}
    entries = {(e.node.output[0], e.index) for s in sites for e in s.mask_edits}
    found = []
    for t in sorted(positions):
        for consumer in g.consumers.get(t, []):
            # a size read from the positions (GPT-J repeats its sin/cos table to the positions' batch)
            # follows them too; a consumer that computes more positions is not an entry point itself
            sizes = consumer.op_type in _SIZE_OPS
            if not sizes and all(o in positions for o in consumer.output if o):
                continue
            if (sizes or consumer.output[0] in closure) and \
                    _reaches_model(g, list(consumer.output), closure, entries) is None:
                continue  # only the mask (replaced by the mask pass) uses it
            found.append((t, consumer, str(kinds[t])))
    return found


def add_position_ids(g: Graph, uses: list[tuple[str, onnx.NodeProto, str]],
                     probe: dict[str, TensorInfo]) -> None:
    """Add the ``position_ids`` ``[batch, seq]`` input and point every ``uses`` consumer at it."""
    dims = [d for i in g.g.input if i.name == names.INPUT_IDS for d in i.type.tensor_type.shape.dim]
    shape = [d.dim_param or d.dim_value or None for d in dims] or [names.BATCH_DIM, names.SEQUENCE_DIM]
    g.g.input.append(helper.make_tensor_value_info(names.POSITION_IDS, TensorProto.INT64, shape))
    g.inputs.add(names.POSITION_IDS)
    made: dict[tuple[int, int], str] = {}
    for tensor, consumer, _ in uses:
        info = probe[tensor]
        key = (info.elem_type, len(info.shape or ()))
        if key not in made:
            value = names.POSITION_IDS
            if key[1] > 2:  # [batch, seq] -> [batch, seq, 1, ...] like the tensor it replaces
                value = g.add("Unsqueeze", [value, g.const(list(range(2, key[1])), np.int64)],
                              hint="position_ids")
            if key[0] != TensorProto.INT64:
                value = g.add("Cast", [value], hint="position_ids", to=key[0])
            made[key] = value
        for k, name in enumerate(consumer.input):
            if name == tensor:
                g.replace_input(consumer, k, made[key])
    _batch_reshapes(g, [c for _, c, _ in uses], probe)


def _batch_reshapes(g: Graph, start: list[onnx.NodeProto], probe: dict[str, TensorInfo]) -> None:
    """Let reshapes downstream of the new positions keep their batch dimension.

    Positions computed from the sequence length have batch 1, and the dynamo exporter may bake that 1 into
    a constant reshape target (CodeGen's ``repeat_interleave`` of the sin/cos table: ``[1, -1, 1, 4]``).
    Such a leading 1 becomes 0 ("copy the input's dimension"): the same for the original batch of 1, the
    batch of ``position_ids`` now.
    """
    closure = size_closure(g, (names.ATTENTION_MASK, names.POSITION_IDS))
    seen: set[str] = set()
    queue = deque(start)
    while queue:
        node = queue.popleft()
        if node.output[0] in seen or node.op_type in _SIZE_OPS:
            continue
        seen.add(node.output[0])
        if node.op_type == "Reshape" and len(node.input) > 1:
            target = g.const_value(node.input[1])
            info = probe.get(node.input[0])
            leading_one = target is not None and target.ndim == 1 and target.size and target[0] == 1 \
                and 0 not in target
            if leading_one and info is not None and info.shape and info.shape[0] == 1:
                fixed = target.copy()
                fixed[0] = 0
                g.replace_input(node, 1, g.const(fixed, np.int64, hint="batch_reshape"))
                for attr in node.attribute:  # the exporter's allowzero=1 would read the 0 literally
                    if attr.name == "allowzero":
                        attr.i = 0
        for out in node.output:
            queue.extend(c for c in g.consumers.get(out, []) if c.output[0] in closure)


def check_positions(g: Graph, sites: list[AttentionSite], probe: dict[str, TensorInfo], batch: int, seq: int,
                    arch: str) -> None:
    """Every layer's keys depend on ``position_ids``, and no computed position reaches the model any more."""
    left = find_positions(g, sites, probe, batch, seq)
    if left:
        tensor, consumer, _ = left[0]
        raise KVCacheError(f"{arch}: positions computed in the graph ({tensor!r}) still reach "
                           f"{consumer.op_type} node {consumer.name!r} after the position rewrite; every "
                           "step would restart at position 0. Export with a position_ids input")
    reached: set[str] = {names.POSITION_IDS}
    for node in g.topo_order():
        if node.op_type not in _SIZE_OPS and any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
    for site in sites:
        if site.key not in reached:
            raise KVCacheError(f"{arch}: layer {site.layer}: the keys ({site.key!r}) do not depend on the "
                               "token positions: no sub-graph computing positions from the sequence length "
                               "(Range over Shape(input_ids), CumSum) or from attention_mask feeds this "
                               "layer's position encoding. Export with a position_ids input")


def rewrite_positions(g: Graph, sites: list[AttentionSite], probe: dict[str, TensorInfo], batch: int,
                      seq: int, arch: str) -> str:
    """Apply the pass (pattern, rewrite, check).

    Returns what the graph computed, for :data:`kvcache.onnx.names.META_POSITIONS`: ``"arange"`` (slot
    indices, padding included) or ``"cumsum"`` (real tokens seen).
    """
    uses = find_positions(g, sites, probe, batch, seq)
    kinds = sorted({kind for _, _, kind in uses})
    if not uses:
        raise KVCacheError(f"{arch}: layer 0: the graph has no position_ids input and no sub-graph computing "
                           "token positions (Range over Shape(input_ids), ConstantOfShape+CumSum, or "
                           "CumSum(attention_mask)) that feeds the position encoding was found; export "
                           "with a position_ids input")
    add_position_ids(g, uses, probe)
    check_positions(g, sites, probe, batch, seq, arch)
    return ",".join(kinds)
