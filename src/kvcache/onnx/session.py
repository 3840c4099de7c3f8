"""One forward step of a with-past decoder graph on ONNX Runtime, without copies.

:class:`DecoderSession` reads the graph's signature (the names in :mod:`kvcache.onnx.names`: injected graphs
and natively exported with-past graphs share it) and runs one step on torch tensors whose memory ORT reads
and writes directly (numpy views both ways), so the past keys/values going in and the present/logits
coming out are not copied between torch, numpy and ORT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kvcache import validate
from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.provenance import verify_source

#: ONNX Runtime element types of cache inputs -> the torch dtype of the host cache
_ORT_TO_TORCH: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
}

#: file names tried, in order, when a directory is given: the injector's default output
#: (``kvcache onnx inject DIR``), then the exporter's (``kvcache onnx export --with-cache``)
GRAPH_FILE_NAMES: tuple[str, ...] = ("model_kvcache.onnx", "model.onnx")


def resolve_graph(path: str | Path) -> tuple[Path, Path]:
    """The ``.onnx`` file and its directory for a file or a model directory.

    Raises
    ------
    KVCacheError
        When the path does not exist, a directory holds none of :data:`GRAPH_FILE_NAMES`, or the graph was
        injected from another graph than the one beside it (:func:`kvcache.onnx.provenance.verify_source`).
    """
    if not isinstance(path, (str, Path)):
        raise KVCacheError(f"the graph must be a path (a model directory or an .onnx file), got "
                           f"{type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        for name in GRAPH_FILE_NAMES:
            if (path / name).is_file():
                verify_source(path / name)
                return path / name, path
        raise KVCacheError(f"{path} holds none of {', '.join(GRAPH_FILE_NAMES)}; pass the .onnx file itself")
    if not path.is_file():
        raise KVCacheError(f"{path} does not exist; pass a model directory or an .onnx file")
    verify_source(path)
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
    has_slot_masks:
        The graph takes ``slot_mask.{i}`` per layer and returns ``attn_logits.{i}`` (injected with
        ``--policies``: it runs retention policies).
    fused:
        Every attention layer is ONNX Runtime's ``GroupQueryAttention`` (injected with ``--fused``): past
        and present may be one preallocated buffer (:meth:`DecoderSession.run_in_place`).
    rotary_positions:
        Positions the rotary tables of a fused graph's attention op cover (the model's context), when the
        op rotates Q and K itself; ``None`` otherwise.
    """

    num_layers: int
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    dtype: torch.dtype
    has_position_ids: bool
    has_attn_scores: bool
    has_slot_masks: bool = False
    fused: bool = False
    rotary_positions: int | None = None

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
        slot_masks = [names.slot_mask(i) for i in range(len(layers))]
        has_slots = all(n in inputs for n in slot_masks)
        if has_slots and not all(names.attn_logits(i) in outputs for i in range(len(layers))):
            raise KVCacheError(f"{source} takes slot_mask.{{i}} inputs but lacks attn_logits.{{i}} outputs; "
                               "inject with `kvcache onnx inject --policies`")
        known = set(expected_in) | {names.POSITION_IDS} | (set(slot_masks) if has_slots else set())
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
            has_slot_masks=has_slots,
            fused=meta.get(names.META_FUSED) == "1",
            rotary_positions=_meta_int(meta, names.META_ROTARY_POSITIONS),
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
    attn_logits:
        Per layer ``(B, H_q, S, past + S)`` masked logits when they were asked for, else ``None``.
    """

    logits: torch.Tensor
    presents: list[tuple[torch.Tensor, torch.Tensor]]
    attn_scores: list[torch.Tensor] | None
    attn_logits: list[torch.Tensor] | None = None


class DecoderSession:
    """An ORT session of a with-past decoder graph, run on torch CPU tensors without copying them.

    Inputs reach ORT as numpy views of the torch tensors' memory and outputs come back as torch views of
    the arrays ORT returns, so no tensor is copied between torch, numpy and ORT; only cache views that are
    not contiguous (a slice of a longer growable buffer) are packed, into buffers reused across steps, as
    ORT needs dense inputs.

    Why ``session.run`` and not an ``IOBinding``: measured on CPU (Llama 8x512, vocab 32000, 1024 tokens
    of context, one thread) a binding with preallocated outputs took 95 ms a step against 72 ms (fresh
    output buffers fault their pages in every step), and with reused output buffers 65.6 ms against
    63.7 ms; on a tiny model the binding's Python overhead costs 0.3 ms a step. A binding pays off when
    the tensors live on an accelerator, which this CPU build does not serve.

    Parameters
    ----------
    path:
        The ``.onnx`` file (external data beside it is found by ORT).
    providers:
        ORT execution providers (default: CPU).
    threads:
        Intra-op threads (default: ORT's choice, one per physical core); set on ``session_options``.
    session_options:
        Full control over the session options.
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
            validate.check_int("threads", threads, minimum=1)
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types; re-raise as a user-facing error
            raise KVCacheError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.signature = GraphSignature.from_session(self.session, source=str(path))
        sig = self.signature
        self._outputs = [names.LOGITS] + [n for i in range(sig.num_layers)
                                          for n in (names.present_key(i), names.present_value(i))]
        if sig.has_attn_scores:
            self._outputs += [names.attn_scores(i) for i in range(sig.num_layers)]
        self._scratch: dict[str, np.ndarray] = {}
        self._binding: ort.IOBinding | None = None
        self._bound: dict[str, torch.Tensor] = {}  # cache input -> the buffer bound to it (kept alive)
        self._bound_logits: torch.Tensor | None = None  # a caller's logits buffer bound now (kept alive)
        self._np_dtype = np.dtype(torch.empty(0, dtype=self.signature.dtype).numpy().dtype)
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == names.LOGITS)
        self.logits_dtype = _ORT_TO_TORCH.get(logits_type, torch.float32)
        self._logits_np_dtype = np.dtype(torch.empty(0, dtype=self.logits_dtype).numpy().dtype)

    def _packed(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` as a dense numpy array for input ``name``: a view when it is contiguous, else packed
        into a buffer kept per input and reused every step.

        Packing into fresh memory cost 2.1 ms per 1 MiB cache tensor (page faults of the new allocation),
        a third of a decode step at 1024 tokens; the reused buffer's pages stay mapped. numpy copies on
        the calling thread: torch's intra-op pool would fight ORT's spinning worker threads for the
        cores (measured 10-20x slower).
        """
        array = _as_numpy(tensor)
        if array.flags.c_contiguous:
            return array
        buf = self._scratch.get(name)
        if buf is None or buf.size < array.size or buf.dtype != array.dtype:
            # grow geometrically so a growing cache re-allocates rarely
            buf = np.empty(max(array.size, int(1.5 * (0 if buf is None else buf.size))), array.dtype)
            self._scratch[name] = buf
        dense = buf[: array.size].reshape(array.shape)
        np.copyto(dense, array)
        return dense

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        past: list[tuple[torch.Tensor, torch.Tensor]],
        slot_masks: list[torch.Tensor] | None = None,
        logits_of_attention: bool = False,
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
            Per layer ``(key, value)`` of shape ``(B, H_kv, past, D)`` in the graph's cache dtype, on CPU.
        slot_masks:
            Per layer ``(B, H_kv, S, past + S)`` bool (True = attend), for graphs that take them.
        logits_of_attention:
            Also fetch ``attn_logits.{i}`` (graphs injected with ``--policies``).
        """
        sig = self.signature
        if len(past) != sig.num_layers:
            raise KVCacheError(f"the graph has {sig.num_layers} layers but {len(past)} past pairs were given")
        split = _split(sig, input_ids, attention_mask, position_ids, past[0][0].shape[2])
        if split == "rows":
            rows = [self.run(input_ids[b : b + 1], attention_mask[b : b + 1],
                             None if position_ids is None else position_ids[b : b + 1],
                             [(k[b : b + 1], v[b : b + 1]) for k, v in past]) for b in range(len(input_ids))]
            presents = [(torch.cat([r.presents[i][0] for r in rows]),
                         torch.cat([r.presents[i][1] for r in rows])) for i in range(len(past))]
            return StepOutput(logits=torch.cat([r.logits for r in rows]), presents=presents, attn_scores=None)
        if split == "head":
            assert position_ids is not None  # _split asks for a head step only on positions it read
            head = self.run(input_ids[:, :1], attention_mask[:, :1], position_ids[:, :1], past)
            rest = self.run(input_ids[:, 1:], attention_mask, position_ids[:, 1:], head.presents)
            return StepOutput(logits=torch.cat([head.logits, rest.logits], dim=1), presents=rest.presents,
                              attn_scores=None)
        feeds = {names.INPUT_IDS: self._packed(names.INPUT_IDS, input_ids),
                 names.ATTENTION_MASK: self._packed(names.ATTENTION_MASK, attention_mask)}
        if sig.has_position_ids:
            if position_ids is None:
                raise KVCacheError("this graph takes position_ids; pass them")
            feeds[names.POSITION_IDS] = self._packed(names.POSITION_IDS, position_ids)
        for i, (k, v) in enumerate(past):
            for name, tensor in ((names.past_key(i), k), (names.past_value(i), v)):
                feeds[name] = self._packed(name, tensor)
        if sig.has_slot_masks:
            if slot_masks is None:
                raise KVCacheError("this graph takes slot_mask.{i} inputs (it was injected with --policies); "
                                   "pass slot_masks")
            for i, mask in enumerate(slot_masks):
                feeds[names.slot_mask(i)] = self._packed(names.slot_mask(i), mask)
        fetch = self._outputs
        if logits_of_attention:
            if not sig.has_slot_masks:
                raise KVCacheError("this graph has no attn_logits.{i} outputs; inject with --policies")
            fetch = fetch + [names.attn_logits(i) for i in range(sig.num_layers)]
        try:
            results = self.session.run(fetch, feeds)
        except Exception as exc:
            if type(exc).__name__ != "InvalidArgument":  # ORT's own exception types
                raise
            raise KVCacheError(f"ONNX Runtime rejected the step's inputs ({str(exc)[:300]}); the graph and "
                               "the config.json beside it may not belong together") from exc
        outputs = [torch.from_numpy(o) for o in results]
        n = sig.num_layers
        presents = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(n)]
        scores = outputs[1 + 2 * n : 1 + 3 * n] if sig.has_attn_scores else None
        first = len(self._outputs)
        attn_logits = outputs[first : first + n] if logits_of_attention else None
        return StepOutput(logits=outputs[0], presents=presents, attn_scores=scores, attn_logits=attn_logits)

    def _bind_buffers(self, binding: ort.IOBinding, layer: int, key: torch.Tensor,
                      value: torch.Tensor) -> None:
        """Bind a layer's buffers as its past and present (the tensors are kept, so their memory stays)."""
        sig = self.signature
        for past, present, buf in ((names.past_key(layer), names.present_key(layer), key),
                                   (names.past_value(layer), names.present_value(layer), value)):
            if not buf.is_contiguous() or buf.dtype != sig.dtype or buf.device.type != "cpu":
                raise KVCacheError(f"layer {layer}: in-place buffers must be contiguous {sig.dtype} CPU "
                                   f"tensors, got {buf.dtype} on {buf.device}")
            shape, ptr = tuple(buf.shape), buf.data_ptr()
            binding.bind_input(past, "cpu", 0, self._np_dtype, shape, ptr)
            binding.bind_output(present, "cpu", 0, self._np_dtype, shape, ptr)
            self._bound[past] = buf

    def run_in_place(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | np.ndarray,
                     position_ids: torch.Tensor | None,
                     buffers: list[tuple[torch.Tensor, torch.Tensor]],
                     logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step of a ``--fused`` graph whose past and present are the same buffers; returns the
        ``(B, S, V)`` logits.

        Parameters
        ----------
        input_ids, position_ids:
            ``(B, S)`` int64, as in :meth:`run`.
        attention_mask:
            ``(B, T)`` int64 over the ``T - S`` slots held and the ``S`` new tokens.
        buffers:
            Per layer the whole ``(B, H_kv, C, D)`` key and value buffers (contiguous, ``C >= T``) whose
            first ``T - S`` slots hold the past: the graph reads those and writes the new tokens' keys and
            values at slots ``T - S ... T - 1``, in place. Nothing of the cache is copied.
        logits_out:
            A contiguous ``(B, S, V)`` tensor to write the logits into (kept bound while it is passed again,
            so a decode loop that reuses it binds nothing per step); ``None``: a new tensor.

        The buffers stay bound to the session between steps (an ``IOBinding``) and are bound again only when
        one moves or changes shape (a grown store), so a step binds just its three small inputs.
        """
        sig = self.signature
        if not sig.fused:
            raise KVCacheError("run_in_place needs a graph injected with --fused (its attention writes the "
                               "new keys/values into the past buffer)")
        if len(buffers) != sig.num_layers:
            raise KVCacheError(f"the graph has {sig.num_layers} layers but {len(buffers)} buffer pairs were "
                               "given")
        past = attention_mask.shape[1] - input_ids.shape[1]
        split = _split(sig, input_ids, attention_mask, position_ids, past)
        if split == "rows":
            return torch.cat([self.run_in_place(input_ids[b : b + 1], attention_mask[b : b + 1],
                                                None if position_ids is None else position_ids[b : b + 1],
                                                [(k[b : b + 1], v[b : b + 1]) for k, v in buffers])
                              for b in range(len(input_ids))])
        if split == "head":
            assert position_ids is not None
            seq = input_ids.shape[1]
            head = self.run_in_place(input_ids[:, :1], attention_mask[:, : 1 - seq], position_ids[:, :1],
                                     buffers)
            rest = self.run_in_place(input_ids[:, 1:], attention_mask, position_ids[:, 1:], buffers)
            return torch.cat([head, rest], dim=1)
        binding = self._binding
        if binding is None:
            binding = self._binding = self.session.io_binding()
            # bound first, so it is the first output
            binding.bind_output(names.LOGITS, "cpu")
        feeds = [(names.INPUT_IDS, input_ids), (names.ATTENTION_MASK, attention_mask)]
        if sig.has_position_ids:
            if position_ids is None:
                raise KVCacheError("this graph takes position_ids; pass them")
            feeds.append((names.POSITION_IDS, position_ids))
        for name, tensor in feeds:  # small: ORT copies them
            binding.bind_cpu_input(name, tensor if isinstance(tensor, np.ndarray) else _as_numpy(tensor))
        bound = self._bound
        for i, (k, v) in enumerate(buffers):
            if bound.get(names.past_key(i)) is not k or bound.get(names.past_value(i)) is not v:
                self._bind_buffers(binding, i, k, v)
        logits = logits_out
        if logits is None and sig.vocab_size is not None:  # written by ORT straight into a tensor of ours
            logits = torch.empty((*input_ids.shape, sig.vocab_size), dtype=self.logits_dtype)
        if logits is None:
            binding.bind_output(names.LOGITS, "cpu")  # ORT allocates it each run: its shape follows S
            self._bound_logits = None
        elif self._bound_logits is not logits:
            binding.bind_output(names.LOGITS, "cpu", 0, self._logits_np_dtype, tuple(logits.shape),
                                logits.data_ptr())
            self._bound_logits = logits if logits is logits_out else None
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            if type(exc).__name__ not in ("InvalidArgument", "Fail", "RuntimeException"):
                raise
            raise KVCacheError(f"ONNX Runtime rejected the step ({str(exc)[:300]})") from exc
        return logits if logits is not None else torch.from_numpy(binding.get_outputs()[0].numpy())




def _split(sig: GraphSignature, input_ids: torch.Tensor, attention_mask: torch.Tensor | np.ndarray,
           position_ids: torch.Tensor | None, past: int) -> str | None:
    """How a step of a fused graph runs when the attention op cannot take it whole, else ``None``.

    * ``"rows"``: each row alone, on its own rows of the buffers (the work is the same, in ``B`` runs), for
      several tokens per row on top of a past (ONNX Runtime: "batch_size must be 1 when sequence_length > 1
      and past context is given"), and for a first step whose rows' positions differ (below);
    * ``"head"``: the first token alone, then the rest on top of it. An op that rotates Q and K itself
      rotates the tokens of a step on an empty cache at ``position_ids[0, 0] + s``, reading no other
      position; that is right for a row whose real tokens are numbered on from its first, wrong for a
      left-padded one (its padding holds position 1). With a past, the op reads every position.
    """
    if not sig.fused:
        return None
    batch, seq = input_ids.shape
    if batch > 1 and seq > 1 and past > 0:
        return "rows"
    if past > 0 or sig.rotary_positions is None or position_ids is None:
        return None
    pos = position_ids.numpy()
    real = np.asarray(attention_mask)[:, -seq:] != 0
    if np.all((pos == pos[0, 0] + np.arange(seq)) | ~real):
        return None
    return "rows" if batch > 1 else "head"


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (no copy)."""
    if tensor.device.type != "cpu":
        raise KVCacheError(f"ONNX Runtime inputs must be CPU tensors, got one on {tensor.device}")
    return tensor.numpy()
