"""Injection pass (``--fused``): every attention layer becomes ONNX Runtime's fused ``GroupQueryAttention``.

The exported attention is a few dozen nodes per layer (scale, Q·K^T, mask, softmax, probabilities·V,
repeat_kv's Expand, the transposes and the reshapes with their shape arithmetic), and with a cache each step
also concatenates the whole past to the new keys/values. ONNX Runtime's contrib op
``com.microsoft.GroupQueryAttention`` does all of that in one kernel, and when ``past_key`` and
``present_key`` are the same buffer it writes the new keys/values in place instead of copying the past.

What the pass keeps from the exported graph: the projections, and the rotary embedding unless the op can
do it (then Q and K go in un-rotated with constant cos/sin tables and ``position_ids``, see
:mod:`~kvcache.onnx.rewrite_rotary`; otherwise the op gets Q and K after RoPE, so every position encoding the
position rewrite handles works unchanged); what it replaces: the Q·K^T MatMul through the probabilities·V
MatMul (or the opset-23 ``Attention`` node). Per layer::

    query [B, S, H*D], key/value [B, S, H_kv*D]   (the site's tensors, transposed and flattened)
    past_key_values.{i}.key/value [B, H_kv, P, D] -> GroupQueryAttention -> present.{i}.key/value
    output [B, S, H*D] -> back to [B, H, S, D] for the rest of the layer

The op masks causally itself; padding enters as ``attention_bias`` ``[B, 1, S, T]`` built once from
``attention_mask`` (0 where the column is a real token, the dtype's lowest value where it is padding), and
``seqlens_k`` is ``T - 1`` for every row, since the host keeps every row at the same physical length. The
score scale is read off the graph (constant scalars multiplying Q, K or the scores), a sliding window
becomes ``local_window_size``. A layer whose scores are anything more than a scaled Q·K^T plus a mask (ALiBi,
a softcap, a computed scale) is refused with the reason: inject it without ``--fused``.

Past and present: given a ``[B, H_kv, P, D]`` past (its own buffer), the present is ``[B, H_kv, P + S, D]``
as in the unfused graph. Given the *same* ``[B, H_kv, C, D]`` buffer as past and as present output (ONNX
Runtime's IO binding), the op writes the ``S`` new tokens at slots ``T - S ... T - 1`` of it and the host's
cache never moves (:class:`kvcache.onnx.session.DecoderSession`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.graph import Graph, TensorInfo
from kvcache.onnx.patterns import AttentionSite, kv_source, score_path
from kvcache.onnx.rewrite_rotary import Rotary, RotaryTables, match_rotary
from kvcache.onnx.score_terms import is_floor_clamp, is_padding_mask, is_zeros

#: element types the op's CPU and CUDA kernels take
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}
#: ops between the Softmax and the probabilities·V MatMul that change nothing at inference
_PASSIVE_PROB_OPS = frozenset({"Cast", "Where", "Identity", "Dropout", "Reshape", "IsNaN"})
#: score-path ops that carry the scores through unchanged
_PASSIVE_SCORE_OPS = frozenset({"Cast", "Reshape", "Identity"})


class FusedInputs:
    """The per-graph inputs every fused layer shares, built once from ``attention_mask`` and ``input_ids``."""

    def __init__(self, g: Graph, positions: int | None) -> None:
        self.g = g
        # tensors some graph output depends on (folded shape arithmetic leaves dead readers behind until the
        # final prune; they must not count as uses of a tensor)
        self.live: set[str] = set(g.outputs)
        for node in reversed(g.topo_order()):
            if any(o in self.live for o in node.output):
                self.live.update(i for i in node.input if i)
        mask_shape = g.add("Shape", [names.ATTENTION_MASK], hint="mask_shape")
        self.total = g.add("Gather", [mask_shape, g.const([1], np.int64)], hint="total_len", axis=0)
        self.batch = g.add("Gather", [mask_shape, g.const([0], np.int64)], hint="batch", axis=0)
        total32 = g.add("Cast", [self.total], hint="total_i32", to=onnx.TensorProto.INT32)
        # seqlens_k is "total length - 1" per row: every row holds the same physical slots (padding masked)
        self.seqlens_k = g.add("Expand", [g.add("Sub", [total32, g.const([1], np.int32)]), self.batch],
                               hint="seqlens_k")
        self.total_length = g.add("Reshape", [total32, g.const(np.zeros(0, np.int64))], hint="total_length")
        seq = g.add("Gather", [g.add("Shape", [names.INPUT_IDS]), g.const([1], np.int64)], hint="seq", axis=0)
        self.bias_shape = g.add("Concat", [self.batch, g.const([1], np.int64), seq, self.total], axis=0,
                                hint="bias_shape")
        self._bias: dict[int, str] = {}
        self.rotary = RotaryTables(g, positions)

    def bias(self, elem_type: int) -> str:
        """``[B, 1, S, T]`` additive padding mask of ``elem_type`` (built on first use per dtype)."""
        if elem_type not in self._bias:
            g, dtype = self.g, _FLOAT_TYPES[elem_type]
            real = g.add("Cast", [names.ATTENTION_MASK], hint="mask_bool", to=onnx.TensorProto.BOOL)
            flat = g.add("Where", [real, g.const(np.array(0, dtype)), g.const(np.array(np.finfo(dtype).min,
                                                                                          dtype))],
                         hint="padding_bias")
            bias4 = g.add("Unsqueeze", [flat, g.const([1, 2], np.int64)], hint="padding_bias4")
            self._bias[elem_type] = g.add("Expand", [bias4, self.bias_shape], hint="attention_bias")
        return self._bias[elem_type]


def fuse_attention(g: Graph, sites: list[AttentionSite], geometry: list[tuple[int, int, int]],
                   windows: list[int | None], probe: dict[str, TensorInfo], probe2: dict[str, TensorInfo],
                   batch: int, seq: int, seq2: int, arch: str, positions: int | None = None) -> bool:
    """Replace every site's attention by a ``GroupQueryAttention`` node with past/present (see module doc).

    ``geometry`` is ``(num_heads, num_kv_heads, head_dim)`` per layer; ``windows`` the sliding window per
    layer (``None``: full causal attention); ``positions`` the model's context length, the rows of the
    rotary tables when the op rotates Q and K itself (``None``: the rotation stays in nodes).

    Returns whether some layer's op rotates Q and K itself (its tables end at ``positions``).

    Raises
    ------
    KVCacheError
        A layer whose attention is not a scaled Q·K^T plus a mask, naming the architecture, layer and reason.
    """
    if not any(o.domain == names.CONTRIB_DOMAIN for o in g.model.opset_import):
        g.model.opset_import.add(domain=names.CONTRIB_DOMAIN, version=1)
    shared = FusedInputs(g, positions)
    for site in sites:
        heads, kv_heads, head_dim = geometry[site.layer]
        try:
            _fuse_site(g, site, shared, heads, kv_heads, head_dim, windows[site.layer], probe, probe2, batch,
                       seq, seq2)
        except _NotFusable as exc:
            raise KVCacheError(f"{arch}: layer {site.layer}: cannot fuse the attention ({exc}); inject "
                               "without --fused") from None
    return shared.rotary.cached


class _NotFusable(Exception):
    """Internal: why a site cannot become the fused op."""


def _fuse_site(g: Graph, site: AttentionSite, shared: FusedInputs, heads: int, kv_heads: int, head_dim: int,
               window: int | None, probe: dict[str, TensorInfo], probe2: dict[str, TensorInfo], batch: int,
               seq: int, seq2: int) -> None:
    if site.fused:
        query, q_layout, scale, softcap = _fused_op_query(g, site, probe, (batch, heads, seq, head_dim))
    else:
        found = kv_source(g, site.qk.input[0], (batch, heads, seq, head_dim), probe, probe2, seq2)
        if isinstance(found, str):
            raise _NotFusable(f"query: {found}")
        query, q_chain, q_layout = found
        scale, softcap = _score_scale(g, site, q_chain, probe, probe2, (batch, kv_heads, seq, head_dim), seq2)
    elem_type = probe[query].elem_type if query in probe else onnx.TensorProto.FLOAT
    if elem_type not in _FLOAT_TYPES:
        raise _NotFusable(f"queries of element type {onnx.TensorProto.DataType.Name(elem_type)}")
    out4 = site.av.output[0]
    info = probe.get(out4)
    if info is None or info.shape != (batch, heads, seq, head_dim):
        raise _NotFusable(f"the attention output is not [batch, heads, seq, head_dim] (probed "
                          f"{info.shape if info else None})")
    if site.fused and any(o and g.consumers.get(o) for o in site.av.output[1:]):
        raise _NotFusable("another output of the Attention node is used")
    v3 = _flatten_heads(g, site.value, site.value_layout, probe)
    rotary = (_rotary(g, shared, query, q_layout, head_dim, probe),
              _rotary(g, shared, site.key, site.key_layout, head_dim, probe))
    caches = None
    if rotary[0] is not None and rotary[1] is not None and \
            (rotary[0].cos, rotary[0].sin) == (rotary[1].cos, rotary[1].sin):
        caches = shared.rotary.caches(rotary[0], head_dim, _FLOAT_TYPES[elem_type])
    if caches is not None:  # the op rotates Q and K itself, looking the tables up by position_ids
        q3 = _flatten_heads(g, rotary[0].x, "bhtd", probe)
        k3 = _flatten_heads(g, rotary[1].x, "bhtd", probe)
        rotation = [caches[0], caches[1], names.POSITION_IDS]
    else:
        q3 = _rotated_flat(g, shared, query, q_layout, heads, head_dim, probe, rotary[0])
        k3 = _rotated_flat(g, shared, site.key, site.key_layout, kv_heads, head_dim, probe, rotary[1])
        rotation = ["", "", ""]
    past_k, past_v = names.past_key(site.layer), names.past_value(site.layer)
    present_k, present_v = names.present_key(site.layer), names.present_value(site.layer)
    for name in (past_k, past_v):
        g.g.input.append(onnx.helper.make_tensor_value_info(
            name, elem_type, [names.BATCH_DIM, kv_heads, names.PAST_DIM, head_dim]))
        g.inputs.add(name)
    for name in (present_k, present_v):
        g.g.output.append(onnx.helper.make_tensor_value_info(
            name, elem_type, [names.BATCH_DIM, kv_heads, names.TOTAL_DIM, head_dim]))
        g.outputs.add(name)
    attrs: dict[str, object] = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale)}
    if window is not None:
        attrs["local_window_size"] = int(window)
    if softcap:
        attrs["softcap"] = float(softcap)
    if caches is not None:
        attrs["do_rotary"] = 1
    out3 = g.fresh("gqa_out")
    node = onnx.helper.make_node(
        "GroupQueryAttention",
        [q3, k3, v3, past_k, past_v, shared.seqlens_k, shared.total_length, *rotation,
         shared.bias(elem_type)],
        [out3, present_k, present_v], name=g.fresh("GroupQueryAttention_node"), domain=names.CONTRIB_DOMAIN,
        **attrs)
    if out4 in g.outputs:
        raise _NotFusable("the attention output is a graph output")
    merged = _head_merge_target(g, out4, probe, shared.live)
    g.g.node.append(node)
    g.refresh()
    if merged is not None:  # the layer merges the heads right away: use the op's [B, S, H*D] output as is
        old, out = merged, out3
    else:
        split = g.add("Reshape", [out3, g.const([0, 0, heads, head_dim], np.int64)], hint="gqa_heads")
        old, out = out4, g.add("Transpose", [split], hint="gqa_bhsd", perm=[0, 2, 1, 3])
    for consumer in list(g.consumers.get(old, [])):
        for k, name in enumerate(consumer.input):
            if name == old:
                g.replace_input(consumer, k, out)


def _rotary(g: Graph, shared: FusedInputs, tensor: str, layout: str, head_dim: int,
            probe: dict[str, TensorInfo]) -> Rotary | None:
    """The ``rotate_half`` rotary embedding producing a query/key tensor, when it has one whose tables the
    fused ops can take (:mod:`~kvcache.onnx.rewrite_rotary`)."""
    if layout != "bhtd":
        return None
    rotary = match_rotary(g, tensor, probe, head_dim)
    return rotary if rotary is not None and shared.rotary.usable(rotary, head_dim) else None


def _rotated_flat(g: Graph, shared: FusedInputs, tensor: str, layout: str, heads: int, head_dim: int,
                  probe: dict[str, TensorInfo], rotary: Rotary | None) -> str:
    """``[B, S, heads * D]`` of a query/key tensor; its ``rotary`` embedding (:func:`_rotary`), if any,
    becomes one ``RotaryEmbedding`` node on the un-rotated tensor."""
    if rotary is not None:
        return shared.rotary.apply(rotary, _flatten_heads(g, rotary.x, "bhtd", probe), heads, head_dim)
    return _flatten_heads(g, tensor, layout, probe)


def _flatten_heads(g: Graph, tensor: str, layout: str, probe: dict[str, TensorInfo]) -> str:
    """``[B, S, heads * D]`` from a per-head tensor in ``layout`` (:data:`~kvcache.onnx.patterns.LAYOUTS`):
    the projection's output itself when ``tensor`` is its ``view(B, S, H, D).transpose(1, 2)``."""
    split = _head_split_source(g, tensor, layout, probe)
    if split is not None:
        return split
    perm = {"bhtd": [0, 2, 1, 3], "bthd": None, "bhdt": [0, 3, 1, 2]}[layout]
    bthd = tensor if perm is None else g.add("Transpose", [tensor], hint="to_bsnh", perm=perm)
    return g.add("Reshape", [bthd, g.const([0, 0, -1], np.int64)], hint="bsh")


def _head_split_source(g: Graph, tensor: str, layout: str, probe: dict[str, TensorInfo]) -> str | None:
    """``y`` ``[B, S, H*D]`` when ``tensor`` is ``Reshape(y, [B, S, H, D])`` (layout ``bthd``), possibly
    followed by ``Transpose(0, 2, 1, 3)`` (layout ``bhtd``)."""
    node = g.producer.get(tensor)
    if layout == "bhtd":
        if node is None or node.op_type != "Transpose" or \
                not any(a.name == "perm" and list(a.ints) == [0, 2, 1, 3] for a in node.attribute):
            return None
        node = g.producer.get(node.input[0])
    elif layout != "bthd":
        return None
    if node is None or node.op_type != "Reshape":
        return None
    source, out = probe.get(node.input[0]), probe.get(node.output[0])
    if source is None or out is None or source.shape is None or out.shape is None or len(source.shape) != 3 \
            or len(out.shape) != 4 or source.shape[:2] != out.shape[:2] \
            or None in out.shape or source.shape[2] != out.shape[2] * out.shape[3]:
        return None
    return node.input[0]


def _head_merge_target(g: Graph, tensor: str, probe: dict[str, TensorInfo], live: set[str]) -> str | None:
    """The ``[B, S, H*D]`` output of ``Reshape(Transpose(tensor, (0, 2, 1, 3)), [B, S, H*D])`` when that is
    the only use of ``tensor`` (``[B, H, S, D]``, the attention output; reshapes that keep its shape may come
    between), else ``None``. Only nodes with an output in ``live`` count as uses."""

    def uses(name: str) -> list[onnx.NodeProto]:
        return [u for u in g.consumers.get(name, []) if any(o in live for o in u.output)]

    users = uses(tensor)
    while len(users) == 1 and users[0].op_type == "Reshape" and probe.get(users[0].output[0]) is not None \
            and probe.get(tensor) is not None and probe[users[0].output[0]].shape == probe[tensor].shape:
        users = uses(users[0].output[0])
    if len(users) != 1 or users[0].op_type != "Transpose" or \
            not any(a.name == "perm" and list(a.ints) == [0, 2, 1, 3] for a in users[0].attribute):
        return None
    after = uses(users[0].output[0])
    if len(after) != 1 or after[0].op_type != "Reshape":
        return None
    source, out = probe.get(tensor), probe.get(after[0].output[0])
    if source is None or out is None or source.shape is None or out.shape is None or len(out.shape) != 3 \
            or None in source.shape or out.shape != (source.shape[0], source.shape[2],
                                                     source.shape[1] * source.shape[3]):
        return None
    return after[0].output[0]


def _scalar(g: Graph, node: onnx.NodeProto, data: str) -> float | None:
    """The constant scalar ``node`` (a Mul or Div) applies to its ``data`` input, or ``None``."""
    others = [i for i in node.input if i != data]
    if len(others) != 1:
        return None
    value = g.const_value(others[0])
    if value is None or value.size != 1:
        return None
    factor = float(value.reshape(()))
    if node.op_type == "Mul":
        return factor
    if node.op_type == "Div" and node.input[0] == data and factor != 0:
        return 1.0 / factor
    return None


def _chain_scale(g: Graph, chain: list[onnx.NodeProto], what: str) -> float:
    """Product of the constant scalars on a Q or K layout chain (SDPA's decomposition scales both)."""
    scale = 1.0
    for node in chain:
        if node.op_type in ("Mul", "Div"):
            data = next((i for i in node.input if g.const_value(i) is None), node.input[0])
            factor = _scalar(g, node, data)
            if factor is None:
                raise _NotFusable(f"the {what} is scaled by a computed value ({node.op_type} {node.name!r})")
            scale *= factor
    return scale


def _score_scale(g: Graph, site: AttentionSite, q_chain: list[onnx.NodeProto], probe: dict[str, TensorInfo],
                 probe2: dict[str, TensorInfo], kv_want: tuple[int, int, int, int],
                 seq2: int) -> tuple[float, float]:
    """``(scale, softcap)`` of a MatMul-Softmax-MatMul site; raises :class:`_NotFusable` when the scores are
    more than a scaled Q·K^T plus the masks the injector knows."""
    key = kv_source(g, site.qk.input[1], kv_want, probe, probe2, seq2)
    value = kv_source(g, site.av.input[1], kv_want, probe, probe2, seq2)
    if isinstance(key, str) or isinstance(value, str):
        raise _NotFusable("the key or value path changed")
    if any(n.op_type in ("Mul", "Div") for n in value[1]):
        raise _NotFusable("the values are scaled")
    scale = _chain_scale(g, q_chain, "query") * _chain_scale(g, key[1], "key")
    assert site.softmax is not None
    path = score_path(g, site.softmax)
    if path is None:
        raise _NotFusable("no score path")
    masks = {(id(e.node), e.index) for e in site.mask_edits}
    for node, index in path[:-1]:
        if node.op_type in _PASSIVE_SCORE_OPS:
            continue
        sides = [k for k in range(len(node.input)) if k != index and node.input[k]]
        if node.op_type == "Add" and all((id(node), k) in masks or is_padding_mask(g, node.input[k])
                                         or is_zeros(g, node.input[k]) for k in sides):
            continue  # a mask: the op masks causally, padding comes as its attention_bias
        if is_floor_clamp(g, node, index):
            continue
        if node.op_type == "Where" and ((id(node), 0) in masks or not g.ancestor_ops(node.input[0])[1]):
            # masked scores replaced by a fill value, the condition being an injected mask or a structure
            # that reads no input (GPT-Neo's causal/local band sliced from a constant): the op's causal
            # mask and local window do the same
            continue
        if node.op_type in ("Mul", "Div") and len(sides) == 1:
            factor = _scalar(g, node, node.input[index])
            if factor is not None:
                scale *= factor
                continue
        raise _NotFusable(f"the scores pass through {node.op_type} node {node.name!r} (a bias, softcap or "
                          "computed scale the fused op does not express)")
    _check_prob_path(g, site)
    return scale, 0.0


def _check_prob_path(g: Graph, site: AttentionSite) -> None:
    """Between the Softmax and the probabilities·V MatMul only inference no-ops (NaN guards, casts)."""
    assert site.softmax is not None
    stack, seen = [site.softmax.output[0]], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in g.consumers.get(tensor, []):
            if node is site.av:
                continue
            if node.op_type not in _PASSIVE_PROB_OPS:
                raise _NotFusable(f"the probabilities pass through {node.op_type} node {node.name!r}")
            stack.extend(node.output)


def _fused_op_query(g: Graph, site: AttentionSite, probe: dict[str, TensorInfo],
                    want: tuple[int, int, int, int]) -> tuple[str, str, float, float]:
    """``(query, layout, scale, softcap)`` of an opset-23 ``Attention`` node with 4-D inputs."""
    query = site.qk.input[0]
    info = probe.get(query)
    if info is None or info.shape != want:
        raise _NotFusable(f"the Attention node's query is not [batch, heads, seq, head_dim] (probed "
                          f"{info.shape if info else None})")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in site.qk.attribute}
    scale = attrs.get("scale", 1.0 / math.sqrt(want[3]))
    return query, "bhtd", float(scale), float(attrs.get("softcap", 0.0))
