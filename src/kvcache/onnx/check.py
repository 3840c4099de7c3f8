"""Does a with-past graph compute what the original no-cache graph computes? (``kvcache onnx check``)

Both graphs run on ONNX Runtime with the same random tokens. The original sees the whole sequence at once;
the graph under test sees a multi-token prefill and then one token per step, its past fed back from its own
``present`` outputs (plain numpy, no kvcache layers, so only the graph is under test). Its logits at every
step must equal the original's at the same positions. Batch 2 by default, with left padding in the second
row, because padding is where cache injections usually go wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig

from kvcache import validate
from kvcache.cache import model_cache_shape
from kvcache.errors import KVCacheError
from kvcache.onnx import names
from kvcache.onnx.provenance import check_config_matches, verify_source
from kvcache.onnx.session import DecoderSession, GraphSignature, resolve_graph


@dataclass(frozen=True)
class StepComparison:
    """Logits of one step of the graph under test against the original's.

    Attributes
    ----------
    step:
        0 for the prefill, then 1, 2, ... for single-token steps.
    tokens:
        Tokens fed in this step.
    max_abs:
        Largest absolute logit difference over the real (non-padding) positions.
    max_rel:
        ``max_abs`` divided by the largest absolute reference logit at those positions (a norm-wise
        relative error: element-wise ratios explode on logits near zero).
    problem:
        A shape or contract problem found at this step (then the step fails whatever the errors), or ``""``.
    """

    step: int
    tokens: int
    max_abs: float
    max_rel: float
    problem: str = ""


@dataclass
class CheckReport:
    """Result of :func:`check_graph`; ``ok`` when every step is within ``tol``."""

    original: str
    tested: str
    batch: int
    tol: float
    steps: list[StepComparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every step matched (relative error <= ``tol`` and no shape problem)."""
        return bool(self.steps) and all(not s.problem and s.max_rel <= self.tol for s in self.steps)

    def format(self) -> str:
        """A plain-text table, one line per step, then the verdict."""
        lines = [f"original: {self.original}",
                 f"tested:   {self.tested}  (batch {self.batch}, tol {self.tol:g})",
                 f"{'step':>4} {'tokens':>6} {'max abs err':>12} {'max rel err':>12}  result"]
        for s in self.steps:
            verdict = s.problem or ("ok" if s.max_rel <= self.tol else "MISMATCH")
            lines.append(f"{s.step:>4} {s.tokens:>6} {s.max_abs:>12.3e} {s.max_rel:>12.3e}  {verdict}")
        lines.append("PASS" if self.ok else "FAIL: the graph's step logits differ from the original's")
        return "\n".join(lines)


def _session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types; surface them as a user-facing error
        raise KVCacheError(f"ONNX Runtime could not load {path}: {exc}") from exc


def _original_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        raise KVCacheError(f"{path} has no model.onnx; pass the original .onnx file itself")
    if not path.is_file():
        raise KVCacheError(f"{path} does not exist")
    return path


def _positions(mask: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Hugging Face's positions: real tokens seen before each one, padding gets 1."""
    pos = seen[:, None] + np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def check_graph(
    original: str | Path,
    tested: str | Path,
    *,
    batch: int = 2,
    prefill: int = 5,
    steps: int = 4,
    tol: float = 1e-4,
    seed: int = 0,
) -> CheckReport:
    """Compare a with-past graph's step-by-step logits to the original no-cache graph's.

    Parameters
    ----------
    original:
        The no-cache graph (``.onnx`` or a directory holding ``model.onnx``): inputs ``input_ids``,
        ``attention_mask`` (and ``position_ids`` if it uses them), output ``logits`` ``[batch, seq, vocab]``.
    tested:
        The injected (or natively exported with-past) graph, or its directory.
    batch:
        Rows; every row after the first is left-padded by one more token than the previous (up to
        ``prefill - 1``).
    prefill:
        Tokens in the first (multi-token) step.
    steps:
        Single-token steps after the prefill.
    tol:
        Largest accepted relative error (see :class:`StepComparison`).
    seed:
        Seed of the random tokens.

    Raises
    ------
    ValueError, KVCacheError
        Bad arguments, or a graph that does not load or does not follow the contract.
    """
    if batch < 1 or prefill < 1 or steps < 0:
        raise ValueError(f"need batch >= 1, prefill >= 1 and steps >= 0; got {batch}, {prefill}, {steps}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    orig_path = _original_path(original)
    tested_path, tested_dir = resolve_graph(tested)
    verify_source(tested_path, orig_path)
    ref_sess = _session(orig_path)
    ref_inputs = {i.name for i in ref_sess.get_inputs()}
    if any(names.is_cache_input(n) for n in ref_inputs):
        raise KVCacheError(f"{orig_path} already takes a KV cache; pass the original no-cache graph first")
    # the runtime's session: it runs a step the graph's ops cannot take whole the way they can (a fused
    # graph's first step of a left-padded batch, row by row)
    decoder = DecoderSession(tested_path)
    sess, sig = decoder.session, decoder.signature
    total = prefill + steps
    rng = np.random.default_rng(seed)

    # Learn the vocabulary from one tiny run when the graph does not declare it.
    vocab = sig.vocab_size or int(_run_reference(ref_sess, ref_inputs, np.zeros((1, 1), np.int64),
                                                 np.ones((1, 1), np.int64)).shape[-1])
    ids = rng.integers(0, vocab, size=(batch, total), dtype=np.int64)
    mask = np.ones((batch, total), np.int64)
    for row in range(1, batch):
        mask[row, : min(row, prefill - 1)] = 0
    reference = _run_reference(ref_sess, ref_inputs, ids, mask)

    # an original that computed arange(seq) positions itself (a plain export, see META_POSITIONS) gave
    # padding slots positions too: the tested graph gets the same slot indices to be comparable
    meta = sess.get_modelmeta().custom_metadata_map
    slot_positions = names.POSITION_IDS not in ref_inputs and meta.get(names.META_POSITIONS) == "arange"
    report = CheckReport(original=str(orig_path), tested=str(tested_path), batch=batch, tol=tol)
    cache_dtype = np.float16 if sig.dtype.itemsize == 2 else np.float32
    heads, dim = _expected_geometry(tested_dir, sig)
    slot_layout = _slot_layout(tested_dir) if sig.has_slot_masks else None
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    seen = np.zeros(batch, np.int64)
    bounds = [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]
    for step, (start, end) in enumerate(bounds):
        cur_mask = mask[:, start:end]
        positions = None
        if sig.has_position_ids and slot_positions:
            positions = np.broadcast_to(np.arange(start, end), cur_mask.shape).copy()
        elif sig.has_position_ids:
            positions = _positions(cur_mask, seen)
        seen = seen + cur_mask.sum(axis=1)
        slot_masks = None
        if slot_layout is not None:
            slot_masks = [torch.from_numpy(m) for m in _slot_masks(mask, start, end, *slot_layout).values()]
        if past is None:
            if heads is None or dim is None:
                raise KVCacheError(f"{tested_path} declares neither the KV head count nor the head size of "
                                   "its cache inputs; cannot build the empty first past")
            empty = torch.from_numpy(np.zeros((batch, heads, 0, dim), cache_dtype))
            past = [(empty, empty)] * sig.num_layers
        try:
            out = decoder.run(torch.from_numpy(ids[:, start:end].copy()),
                              torch.from_numpy(mask[:, :end].copy()),
                              None if positions is None else torch.from_numpy(positions), past, slot_masks)
        except KVCacheError as exc:
            raise KVCacheError(f"step {step} of {tested_path}: {exc}") from exc
        logits = out.logits.numpy()
        presents = [t.numpy() for pair in out.presents for t in pair]
        problem = _shape_problem(presents, batch, end, heads, dim)
        past = out.presents
        real = cur_mask.astype(bool)
        got, want = logits[real].astype(np.float64), reference[:, start:end][real].astype(np.float64)
        if got.shape != want.shape:
            problem = problem or f"logits shape {logits.shape} != {(batch, end - start, vocab)}"
            max_abs = max_rel = float("inf")
        else:
            max_abs = float(np.max(np.abs(got - want))) if got.size else 0.0
            max_rel = max_abs / max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
            if not np.isfinite(max_abs):
                max_abs = max_rel = float("inf")
        report.steps.append(StepComparison(step, end - start, max_abs, max_rel, problem))
    return report


def _expected_geometry(directory: Path, sig: GraphSignature) -> tuple[int | None, int | None]:
    """Cache ``(num_kv_heads, head_dim)`` the graph must use: from ``config.json`` beside it when there is
    one (so a graph that caches all query heads of a GQA model fails), else as the graph declares them."""
    if not (directory / "config.json").is_file():
        return sig.num_kv_heads, sig.head_dim
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KVCacheError(f"cannot read {directory / 'config.json'}: {str(exc)[:300]}") from exc
    validate.check_config(config, f"{directory / 'config.json'}")
    # layer count too: a config of another model would otherwise fail inside ONNX Runtime
    if sig.num_layers != model_cache_shape(config)[0]:
        check_config_matches(sig, config, directory)
    _, kv_heads, head_dims = model_cache_shape(config)
    return kv_heads[0], head_dims[0]


def _slot_layout(directory: Path) -> tuple[list[int], list[int | None]]:
    """Per layer KV heads and sliding window of a graph injected with ``--policies`` (from its config)."""
    from kvcache.onnx.inject import sliding_windows

    if not (directory / "config.json").is_file():
        raise KVCacheError(f"{directory} has no config.json, which a graph taking slot masks needs to be "
                           "checked (KV heads and sliding windows per layer)")
    config = AutoConfig.from_pretrained(directory)
    layers, kv_heads, _ = model_cache_shape(config)
    return kv_heads, sliding_windows(config, layers)


def _slot_masks(mask: np.ndarray, start: int, end: int, kv_heads: list[int],
                windows: list[int | None]) -> dict[str, np.ndarray]:
    """``slot_mask.{i}`` ``[batch, kv_heads, end - start, end]`` when no token was evicted: causal, padding
    and sliding window, as :func:`kvcache.masks.slot_mask` builds them from slots that follow the columns."""
    keys = np.arange(end)[None, :]
    queries = np.arange(start, end)[:, None]
    padding = mask[:, None, None, :end].astype(bool)
    feeds = {}
    for i, (heads, window) in enumerate(zip(kv_heads, windows, strict=True)):
        causal = keys <= queries
        if window is not None:
            causal &= keys > queries - window
        allowed = padding & causal[None, None]
        feeds[names.slot_mask(i)] = np.ascontiguousarray(
            np.broadcast_to(allowed, (mask.shape[0], heads, end - start, end)))
    return feeds


def _run_reference(sess: ort.InferenceSession, inputs: set[str], ids: np.ndarray,
                   mask: np.ndarray) -> np.ndarray:
    """The original graph's ``(B, T, V)`` logits for the whole sequence."""
    feeds = {names.INPUT_IDS: ids}
    if names.ATTENTION_MASK in inputs:
        feeds[names.ATTENTION_MASK] = mask
    if names.POSITION_IDS in inputs:
        feeds[names.POSITION_IDS] = _positions(mask, np.zeros(ids.shape[0], np.int64))
    unknown = inputs - set(feeds)
    if unknown:
        listed = ", ".join(sorted(unknown))
        raise KVCacheError(f"the original graph has inputs the check cannot feed: {listed}; "
                           "it should take input_ids, attention_mask and optionally position_ids")
    return sess.run([names.LOGITS], feeds)[0]


def _shape_problem(presents: list[np.ndarray], batch: int, total: int, heads: int | None,
                   dim: int | None) -> str:
    """Describe the first present output whose shape breaks ``[batch, heads, total, dim]``."""
    for idx, p in enumerate(presents):
        layer, kind = divmod(idx, 2)
        want = (batch, heads or p.shape[1], total, dim or p.shape[3])
        if p.ndim != 4 or tuple(p.shape) != want:
            return f"present.{layer}.{('key', 'value')[kind]} has shape {tuple(p.shape)}, expected {want}"
    return ""
