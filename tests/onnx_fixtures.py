"""Shared ONNX test helpers: tiny exported decoders (cached per session) and logits comparisons.

Reuse from any test module (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    import onnx_fixtures
    onnx_exports = onnx_fixtures.onnx_exports  # makes the session fixture visible in this module

* ``onnx_exports`` (session fixture) is an :class:`ExportCache`: ``onnx_exports.get("llama", "eager",
  "legacy")`` exports ``random_model(arch, num_layers=2, hidden=32, num_heads=4)`` once per session into
  a temporary directory (``model.onnx`` + ``config.json``) and returns that directory;
  ``onnx_exports.injected(...)`` returns the path of the injected graph (``model_kvcache.onnx``) beside it.
  Legacy exports take ~1-2 s, dynamo exports ~20-40 s on 2 CPU cores: prefer legacy in new tests.
* The dynamo half of the injection matrix is mostly read from pre-exported graphs:
  :data:`DYNAMO_LIVE` variants are exported live (so the installed exporter is still exercised), the
  :data:`DYNAMO_FIXTURES` variants come from ``tests/fixtures/onnx/<variant>/`` (``model.onnx`` +
  ``config.json``), written by ``python scripts/make_onnx_fixtures.py`` and listed with their sha256 in
  ``tests/fixtures/onnx/MANIFEST.json``; :func:`manifest_problems` compares the two.
* Plain exports (from ``(input_ids, attention_mask)`` only, by ``scripts/export_plain.py``; the graph
  computes its own positions): the legacy ones of :data:`PLAIN_MATRIX` are exported live
  (``onnx_exports.get_plain(arch, attn)``); the dynamo ones and the legacy ones made with transformers 4.4x
  in a side environment are fixtures too (:data:`PLAIN_FIXTURES`). :func:`original_positions` gives the
  positions such a graph computed, to feed its injected graph.
* :func:`reference_logits` runs a no-cache graph over whole sequences; :func:`stepwise_logits` runs an
  injected (or natively exported with-past) graph as a prefill chunk then single-token steps, feeding
  ``present.*`` back as ``past_key_values.*``; :func:`make_batch` builds left-padded inputs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from kvcache.models.random import ARCHITECTURES, GQA_ARCHITECTURES, random_model
from kvcache.onnx import names
from kvcache.onnx.export import NO_POSITION_IDS, export_model
from kvcache.onnx.inject import check_model, inject_file

#: architectures whose random model supports attn_implementation="sdpa"
SDPA_ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "gpt_neox", "opt")
TINY = {"num_layers": 2, "hidden": 32, "num_heads": 4}
#: the injection test matrix: every architecture with eager attention, plus SDPA where available
MATRIX = [(a, "eager") for a in ARCHITECTURES] + [(a, "sdpa") for a in SDPA_ARCHS]
#: dynamo variants the default run exports live: RoPE + GQA (llama), ALiBi + sizes read from the mask (bloom)
DYNAMO_LIVE = [("llama", "eager"), ("bloom", "eager")]
#: the rest of the dynamo matrix: read from ``FIXTURE_ROOT/<fixture_name(arch, attn)>/``
DYNAMO_FIXTURES = [v for v in MATRIX if v not in DYNAMO_LIVE]
#: plain exports, from ``(input_ids, attention_mask)`` only (``scripts/export_plain.py``): the graph computes
#: its own positions. ALiBi models are left out: their regular export already is the plain one
PLAIN_MATRIX = [(a, m) for a, m in MATRIX if a not in NO_POSITION_IDS]
#: a fixture variant: ``(arch, attn, exporter, plain, release)``, release "current" or "transformers4"
Variant = tuple[str, str, str, bool, str]
#: every variant read from ``FIXTURE_ROOT``: the dynamo matrix with position_ids, the plain dynamo matrix
#: (this transformers), and plain legacy exports made with transformers 4.4x in a side environment
FIXTURE_VARIANTS: list[Variant] = (
    [(a, m, "dynamo", False, "current") for a, m in DYNAMO_FIXTURES]
    + [(a, m, "dynamo", True, "current") for a, m in PLAIN_MATRIX]
    + [(a, m, "legacy", True, "transformers4") for a, m in MATRIX]
)
#: the plain fixture variants (the last two groups above)
PLAIN_FIXTURES: list[Variant] = [v for v in FIXTURE_VARIANTS if v[3]]
FIXTURE_ROOT = Path(__file__).resolve().parent / "fixtures" / "onnx"
#: model settings of the fixture variants: TINY with a short position table, because exported position
#: embeddings and causal-mask buffers scale with it (GPT-Neo's 2048x2048 masks alone are 8 MB)
FIXTURE_MODEL = {**TINY, "max_positions": 64}
MANIFEST = "MANIFEST.json"
#: the files kept per fixture variant: the no-cache graph (weights embedded) and what the injector reads
FIXTURE_FILES = ("model.onnx", "config.json")
REGENERATE = "python scripts/make_onnx_fixtures.py"


def fixture_model(arch: str, attn: str) -> Any:
    """The PyTorch model a fixture variant was exported from (``random_model`` with :data:`FIXTURE_MODEL`)."""
    return random_model(arch, attn_implementation=attn, **FIXTURE_MODEL)


def fixture_name(arch: str, attn: str, exporter: str = "dynamo", plain: bool = False,
                 release: str = "current") -> str:
    """Directory name of a fixture variant, e.g. ``"mistral-sdpa-dynamo"``, ``"gpt2-eager-dynamo-plain"``,
    ``"opt-eager-legacy-plain-transformers4"``."""
    return f"{arch}-{attn}-{exporter}" + ("-plain" if plain else "") + ("" if release == "current" else
                                                                          f"-{release}")


def original_positions(arch: str, mask: np.ndarray) -> np.ndarray:
    """The positions ``[batch, seq]`` a plain graph computes itself: ``cumsum(mask) - 1`` for OPT (padding
    1), ``arange(seq)`` in every row for the others. Fed to its injected graph, they give the same logits."""
    if arch == "opt":
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        pos[mask == 0] = 1
        return pos
    return np.broadcast_to(np.arange(mask.shape[1]), mask.shape).copy()


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(root: Path = FIXTURE_ROOT) -> dict[str, Any]:
    """The parsed ``MANIFEST.json`` of a fixture folder."""
    return json.loads((root / MANIFEST).read_text())


def manifest_problems(root: Path = FIXTURE_ROOT) -> list[str]:
    """Differences between ``root``'s manifest, the files on disk and :data:`FIXTURE_VARIANTS`.

    Returns one line per problem (missing, extra or changed file, missing or unexpected variant); empty
    when the fixtures are exactly what the manifest says.
    """
    if not (root / MANIFEST).is_file():
        return [f"{root / MANIFEST} is missing"]
    variants: dict[str, Any] = read_manifest(root)["variants"]
    problems = []
    want = {fixture_name(*v) for v in FIXTURE_VARIANTS}
    problems += [f"variant {v} is not in the manifest" for v in sorted(want - set(variants))]
    problems += [f"variant {v} is in the manifest, not the matrix" for v in sorted(set(variants) - want)]
    on_disk = {p.name for p in root.iterdir() if p.is_dir()}
    problems += [f"directory {v}/ is not in the manifest" for v in sorted(on_disk - set(variants))]
    for name, entry in sorted(variants.items()):
        files: dict[str, str] = entry["files"]
        for fname, digest in sorted(files.items()):
            path = root / name / fname
            if not path.is_file():
                problems.append(f"{name}/{fname} is missing")
            elif sha256(path) != digest:
                problems.append(f"{name}/{fname} does not match its sha256 in the manifest")
        if (root / name).is_dir():
            extra = {p.name for p in (root / name).iterdir()} - set(files)
            problems += [f"{name}/{f} is not in the manifest" for f in sorted(extra)]
    return problems


class ExportCache:
    """Exports and injected graphs, made on first request and kept for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[tuple[str, str, str, int | None, bool], Path] = {}
        self._injected: dict[tuple[str, str, str, int | None, bool, bool, bool], Path] = {}

    def get(self, arch: str, attn: str = "eager", exporter: str = "legacy", opset: int | None = None,
            with_cache: bool = False) -> Path:
        """Directory holding ``model.onnx`` and ``config.json`` of the tiny ``arch`` model."""
        key = (arch, attn, exporter, opset, with_cache)
        if key not in self._dirs:
            out = self.root / "_".join(str(k) for k in key)
            model = random_model(arch, attn_implementation=attn, **TINY)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_model(model, out, exporter=exporter, opset=opset, with_cache=with_cache)  # type: ignore
            self._dirs[key] = out
        return self._dirs[key]

    def get_plain(self, arch: str, attn: str = "eager") -> Path:
        """Directory of the plain legacy export (``scripts/export_plain.py``) of the fixture-sized model."""
        key = (arch, attn, "plain", None, False)
        if key not in self._dirs:
            from script_modules import import_script

            plain = import_script("export_plain")
            out = self.root / "_".join(str(k) for k in key)
            out.mkdir(parents=True)
            model = fixture_model(arch, attn)
            plain.export_plain(model, out / "model.onnx", "legacy", 17)
            model.config.save_pretrained(out)
            self._dirs[key] = out
        return self._dirs[key]

    def injected(self, arch: str, attn: str = "eager", exporter: str = "legacy", opset: int | None = None,
                 attention_stats: bool = False, policies: bool = False, fused: bool = False) -> Path:
        """Path of the injected graph of :meth:`get`'s export (``model_kvcache.onnx``, ``..._stats``,
        ``..._policies`` or ``..._fused``)."""
        key = (arch, attn, exporter, opset, attention_stats, policies, fused)
        if key not in self._injected:
            d = self.get(arch, attn, exporter, opset)
            name = "model_kvcache" + "_stats" * attention_stats + "_policies" * policies + "_fused" * fused
            self._injected[key] = inject_file(d / "model.onnx", d / f"{name}.onnx",
                                              attention_stats=attention_stats, policies=policies, fused=fused)
        return self._injected[key]


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    """Session-wide :class:`ExportCache` in a temporary directory."""
    return ExportCache(tmp_path_factory.mktemp("onnx_exports"))


def session(path: Path | str) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with warnings silenced."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def make_batch(batch: int, length: int, *, pad: int = 3, seed: int = 0, vocab: int = 128
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask, position_ids)`` of shape ``[batch, length]``; rows after the first are
    left-padded by ``pad`` (times the row index) tokens. Positions follow Hugging Face: ``cumsum - 1``,
    padding gets 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, : min(length - 1, pad * b)] = 0
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    pos[mask == 0] = 1
    return ids, mask, pos


def reference_logits(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray,
                     pos: np.ndarray) -> np.ndarray:
    """Full-sequence logits ``[batch, length, vocab]`` of a graph without cache."""
    inputs = {i.name for i in sess.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in inputs:
        feeds["position_ids"] = pos
    return sess.run(["logits"], feeds)[0]


def stepwise_logits(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                    prefill: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of a cached graph run as one ``prefill``-token chunk, then one token at a time.

    Returns the concatenated logits ``[batch, length, vocab]`` and the last step's outputs by name.
    """
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    batch, length = ids.shape
    past: dict[str, np.ndarray] = {}
    for name, info in inputs.items():
        if name.startswith("past_key_values."):
            past[name] = np.zeros((batch, int(info.shape[1]), 0, int(info.shape[3])), np.float32)
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
    logits = []
    last: dict[str, np.ndarray] = {}
    for start, end in chunks:
        feeds = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end], **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = pos[:, start:end]
        last = dict(zip(outputs, sess.run(outputs, feeds), strict=True))
        logits.append(last["logits"])
        past = {name: last[name.replace("past_key_values.", "present.")] for name in past}
    return np.concatenate(logits, axis=1), last


def relative_error(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    """Max abs difference over real (unpadded) positions, relative to the largest reference magnitude."""
    real = mask.astype(bool)
    return float(np.abs(got - want)[real].max() / np.abs(want[real]).max())


def check_injected(original: Path, injected: Path, arch: str, label: str, plain: bool = False) -> None:
    """Injected graph: passes onnx.checker, step logits equal ``original``'s full-sequence logits for batch
    1 and 2 (left padding), cache outputs keep the model's KV heads. ``plain``: ``original`` computes its
    own positions; the injected graph gets those (:func:`original_positions`) as ``position_ids``."""
    check_model(injected)
    ref, inj = session(original), session(injected)
    kv_heads = 2 if arch in GQA_ARCHITECTURES else 4
    has_positions = names.POSITION_IDS in {i.name for i in inj.get_inputs()}
    assert has_positions == (arch not in NO_POSITION_IDS), f"{label}: position_ids input {has_positions}"
    for batch in (1, 2):
        ids, mask, pos = make_batch(batch, 9, seed=batch)
        want = reference_logits(ref, ids, mask, pos)
        if plain:
            assert names.POSITION_IDS not in {i.name for i in ref.get_inputs()}
            pos = original_positions(arch, mask)
        got, last = stepwise_logits(inj, ids, mask, pos, prefill=5)
        err = relative_error(got, want, mask)
        assert err < 1e-4, f"{label} batch {batch}: relative error {err:.2e}"
        assert last[names.present_key(1)].shape == (batch, kv_heads, 9, 8)
        assert last[names.present_value(0)].shape == (batch, kv_heads, 9, 8)
