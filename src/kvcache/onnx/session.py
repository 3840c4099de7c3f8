"""One forward step of a with-past decoder graph on ONNX Runtime, without copies.

:class:`DecoderSession` reads the graph's signature (the names in :mod:`kvcache.onnx.names`: injected graphs
and natively exported with-past graphs share it) and runs it with an ``IOBinding``: the inputs are bound to
the memory of the caller's torch tensors and the outputs to torch tensors allocated here, so neither the
past keys/values going in nor the present/logits coming out are copied between torch, numpy and ORT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kvcache.errors import KVCacheError
from kvcache.onnx import names

#: ONNX Runtime element type strings -> torch dtypes we can bind without conversion
_ORT_TO_TORCH: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
}
_TORCH_TO_NUMPY: dict[torch.dtype, type] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
}


#: file names tried, in order, when a directory is given: the injector's default output
#: (``kvcache onnx inject DIR``), then the exporter's (``kvcache onnx export --with-cache``)
GRAPH_FILE_NAMES: tuple[str, ...] = ("model_kvcache.onnx", "model.onnx")


def resolve_graph(path: str | Path) -> tuple[Path, Path]:
    """The ``.onnx`` file and its directory for a file or a model directory.

    Raises
    ------
    KVCacheError
        When the path does not exist or a directory holds none of :data:`GRAPH_FILE_NAMES`.
    """
    path = Path(path)
    if path.is_dir():
        for name in GRAPH_FILE_NAMES:
            if (path / name).is_file():
                return path / name, path
        raise KVCacheError(f"{path} holds none of {', '.join(GRAPH_FILE_NAMES)}; pass the .onnx file itself")
    if not path.is_file():
        raise KVCacheError(f"{path} does not exist; pass a model directory or an .onnx file")
    return path, path.parent


def _static_dim(shape: list[object], axis: int) -> int | None:
    """The size of ``axis`` when the graph declares it as a number (not a symbolic name)."""
    if len(shape) <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and dim > 0 else None


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    value = meta.get(key)
    return int(value) if value is not None and value.isdigit() else None


@dataclass(frozen=True)
class GraphSignature:
    """What a with-past decoder graph takes and returns (read from an ORT session).

    Attributes
    ----------
    num_layers:
        Number of ``past_key_values.{i}.key|value`` input pairs.
    num_kv_heads, head_dim:
        Cache shape ``[batch, num_kv_heads, past, head_dim]`` when the graph declares them, else ``None``.
    vocab_size:
        Last dimension of ``logits`` when declared, else ``None``.
    dtype:
        Element type of the cache tensors.
    has_position_ids:
        The graph takes ``position_ids`` (architectures with learned or rotary positions).
    has_attn_scores:
        The graph returns ``attn_scores.{i}`` (attention statistics for host-side policies).
    """

    num_layers: int
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    dtype: torch.dtype
    has_position_ids: bool
    has_attn_scores: bool

    @classmethod
    def from_session(cls, session: ort.InferenceSession, source: str = "graph") -> GraphSignature:
        """Validate a session against the with-past graph contract and describe it.

        Raises
        ------
        KVCacheError
            When an input or output of the contract is missing, naming it and how to get a valid graph.
        """
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        layers = sorted({int(n.split(".")[1]) for n in inputs if names.is_cache_input(n)})
        if not layers:
            raise KVCacheError(
                f"{source} has no '{names.PAST_PREFIX}.{{i}}.key|value' inputs, so it has no KV cache; "
                "inject one with `kvcache onnx inject` or export with `kvcache onnx export --with-cache`"
            )
        expected_in = [names.INPUT_IDS, names.ATTENTION_MASK]
        expected_out = [names.LOGITS]
        for i in range(len(layers)):
            expected_in += [names.past_key(i), names.past_value(i)]
            expected_out += [names.present_key(i), names.present_value(i)]
        missing = [n for n in expected_in if n not in inputs] + [n for n in expected_out if n not in outputs]
        if missing:
            raise KVCacheError(
                f"{source} does not follow the with-past graph contract: missing {', '.join(missing)}; "
                "see kvcache.onnx.names for the expected inputs and outputs"
            )
        known = set(expected_in) | {names.POSITION_IDS}
        unknown = [n for n in inputs if n not in known]
        if unknown:
            raise KVCacheError(f"{source} has inputs the with-past contract does not define: "
                               f"{', '.join(unknown)}")
        past = inputs[names.past_key(0)]
        if past.type not in _ORT_TO_TORCH:
            raise KVCacheError(f"{source}: cache element type {past.type} is not supported "
                               "(float32, float16 and float64 are)")
        has_scores = all(names.attn_scores(i) in outputs for i in range(len(layers)))
        # the injector records the cache geometry in the metadata when the shapes stay symbolic
        meta = session.get_modelmeta().custom_metadata_map
        kv_heads = _static_dim(past.shape, 1) or _meta_int(meta, names.META_NUM_KV_HEADS)
        head_dim = _static_dim(past.shape, 3) or _meta_int(meta, names.META_HEAD_DIM)
        return cls(
            num_layers=len(layers),
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_static_dim(outputs[names.LOGITS].shape, 2),
            dtype=_ORT_TO_TORCH[past.type],
            has_position_ids=names.POSITION_IDS in inputs,
            has_attn_scores=has_scores,
        )


@dataclass
class StepOutput:
    """Outputs of one :meth:`DecoderSession.run`.

    Attributes
    ----------
    logits:
        ``(B, S, V)``.
    presents:
        Per layer ``(key, value)``, each ``(B, H_kv, past + S, D)``.
    attn_scores:
        Per layer ``(B, H_q, past + S)`` when the graph returns attention statistics, else ``None``.
    """

    logits: torch.Tensor
    presents: list[tuple[torch.Tensor, torch.Tensor]]
    attn_scores: list[torch.Tensor] | None


class DecoderSession:
    """An ORT session of a with-past decoder graph, run through an ``IOBinding`` on torch tensors.

    Parameters
    ----------
    path:
        The ``.onnx`` file (external data beside it is found by ORT).
    providers:
        ORT execution providers (default: CPU).
    threads:
        Intra-op threads (default: ORT's choice, one per physical core).
    session_options:
        Full control over the session options; ``threads`` is applied on top when given.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        session_options: ort.SessionOptions | None = None,
    ) -> None:
        opts = session_options or ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types; re-raise as a user-facing error
            raise KVCacheError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.signature = GraphSignature.from_session(self.session, source=str(path))
        self._binding = self.session.io_binding()

    def _bind_input(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_contiguous():
            # A cache view (B, H, T, D) of a longer buffer must be packed for ORT. On CPU numpy packs it on
            # the calling thread: torch's intra-op pool would fight ORT's spinning threads for the cores
            # (measured 10-20x slower in the decode loop).
            if tensor.device.type == "cpu":
                tensor = torch.from_numpy(np.ascontiguousarray(tensor.numpy()))
            else:
                tensor = tensor.contiguous()
        self._binding.bind_input(
            name, tensor.device.type, tensor.device.index or 0, _TORCH_TO_NUMPY[tensor.dtype],
            tuple(tensor.shape), tensor.data_ptr(),
        )
        return tensor  # the caller keeps it alive until the run is over

    def _bind_output(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
        self._binding.bind_output(
            name, out.device.type, out.device.index or 0, _TORCH_TO_NUMPY[out.dtype], shape, out.data_ptr(),
        )
        return out

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> StepOutput:
        """Run one step.

        Parameters
        ----------
        input_ids:
            ``(B, S)`` int64 current tokens.
        attention_mask:
            ``(B, past + S)`` int64, columns following the physical cache slots then the current tokens.
        position_ids:
            ``(B, S)`` int64 logical positions (ignored when the graph takes none).
        past:
            Per layer ``(key, value)`` of shape ``(B, H_kv, past, D)`` in the graph's cache dtype.
        """
        sig = self.signature
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        keep_alive = [self._bind_input(names.INPUT_IDS, input_ids),
                      self._bind_input(names.ATTENTION_MASK, attention_mask)]
        if sig.has_position_ids:
            if position_ids is None:
                raise KVCacheError("this graph takes position_ids; pass them")
            keep_alive.append(self._bind_input(names.POSITION_IDS, position_ids))
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        for i, (k, v) in enumerate(past):
            keep_alive.append(self._bind_input(names.past_key(i), k))
            keep_alive.append(self._bind_input(names.past_value(i), v))
        ref = past[0][0]
        # outputs whose shape the graph does not fully declare are allocated by ORT and fetched after
        order: list[str] = []  # binding order, which get_outputs() follows
        logits: torch.Tensor | None = None
        if sig.vocab_size is not None:
            logits = self._bind_output(names.LOGITS, (batch, seq, sig.vocab_size), ref)
        else:
            self._binding.bind_output(names.LOGITS, ref.device.type, ref.device.index or 0)
        order.append(names.LOGITS)
        presents = []
        for i, (k, _) in enumerate(past):
            shape = (batch, k.shape[1], total, k.shape[3])
            presents.append((self._bind_output(names.present_key(i), shape, ref),
                             self._bind_output(names.present_value(i), shape, ref)))
            order += [names.present_key(i), names.present_value(i)]
        if sig.has_attn_scores:
            for i in range(sig.num_layers):
                # the statistics are per query head, a count the cache shape does not give
                self._binding.bind_output(names.attn_scores(i), ref.device.type, ref.device.index or 0)
                order.append(names.attn_scores(i))
        self.session.run_with_iobinding(self._binding)
        del keep_alive
        scores = None
        if logits is None or sig.has_attn_scores:
            fetched = dict(zip(order, self._binding.get_outputs(), strict=True))
            if logits is None:
                logits = torch.from_numpy(fetched[names.LOGITS].numpy())
            if sig.has_attn_scores:
                scores = [torch.from_numpy(fetched[names.attn_scores(i)].numpy())
                          for i in range(sig.num_layers)]
        return StepOutput(logits=logits, presents=presents, attn_scores=scores)
