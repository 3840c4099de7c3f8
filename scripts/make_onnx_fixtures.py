"""Export the pre-built dynamo graphs of the ONNX injection test matrix into ``tests/fixtures/onnx/``.

The dynamo exporter takes 15-40 s per tiny model, too slow to run the whole matrix live on every test run.
This script exports every variant of ``tests/onnx_fixtures.DYNAMO_FIXTURES`` once, with the tiny random models
of ``fixture_model`` (the tests' ``TINY`` settings with a 64-entry position table, to keep the files small)
and the exporter settings the tests use, and writes per variant::

    tests/fixtures/onnx/<arch>-<attn>-dynamo/model.onnx    # no-cache graph, weights embedded
    tests/fixtures/onnx/<arch>-<attn>-dynamo/config.json   # what the injector reads
    tests/fixtures/onnx/MANIFEST.json                      # versions, exporter, opset, sha256 per file

The exporter's per-node debug metadata (``metadata_props``: stack traces with local paths, FX node dumps;
about 60% of the file) is dropped, which leaves the computation unchanged; the injector reads only the
graph itself. Each kept graph is checked against the PyTorch model's logits. Variant directories and the
manifest are replaced atomically (staged beside the target, then ``os.replace``), so an interrupted run
leaves the previous fixtures intact.

Usage (about 6-10 minutes of CPU for the whole matrix)::

    python scripts/make_onnx_fixtures.py                    # every variant
    python scripts/make_onnx_fixtures.py mistral-sdpa-dynamo  # only these, the rest of the manifest is kept
    python scripts/make_onnx_fixtures.py --check            # verify the files against the manifest
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the matrix and model settings live with the tests

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_fixtures as fx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from kvcache.onnx.export import export_model  # noqa: E402

EXPORTER = "dynamo"
OPSET = 18  # export_model's dynamo default, spelled out so the manifest records it


def _versions() -> dict[str, str]:
    import onnxscript

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0]}


def _strip_debug_metadata(graph: onnx.GraphProto) -> None:
    """Drop node ``metadata_props``/``doc_string`` (exporter debug info) in ``graph`` and its subgraphs."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _strip_debug_metadata(sub)


def _check_against_torch(model: torch.nn.Module, graph: Path, arch: str) -> float:
    """Relative error of the exported graph's logits against PyTorch on a left-padded batch of 2."""
    ids, mask, pos = fx.make_batch(2, 7)
    got = fx.reference_logits(fx.session(graph), ids, mask, pos)
    kwargs: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if "position_ids" in {i.name for i in fx.session(graph).get_inputs()}:
        kwargs["position_ids"] = torch.from_numpy(pos)
    with torch.no_grad():
        want = model(**kwargs).logits.numpy()
    err = fx.relative_error(got, want, mask)
    if not np.isfinite(err) or err > 1e-4:
        raise SystemExit(f"{arch}: exported graph differs from PyTorch (relative error {err:.2e}); not kept")
    return err


def export_variant(root: Path, arch: str, attn: str) -> dict[str, Any]:
    """Export one variant into ``root/<name>/`` atomically; returns its manifest entry."""
    name = fx.fixture_name(arch, attn, EXPORTER)
    model = fx.fixture_model(arch, attn)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{name}-", dir=root))
    try:
        export_dir = stage / "export"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_model(model, export_dir, exporter=EXPORTER, opset=OPSET)
        keep = stage / "keep"
        keep.mkdir()
        proto = onnx.load(str(export_dir / "model.onnx"))
        _strip_debug_metadata(proto.graph)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(keep / "model.onnx"))
        shutil.copyfile(export_dir / "config.json", keep / "config.json")
        assert sorted(fx.FIXTURE_FILES) == ["config.json", "model.onnx"]
        err = _check_against_torch(model, keep / "model.onnx", arch)
        entry = {"arch": arch, "attn": attn, "exporter": EXPORTER, "opset": OPSET, "model": fx.FIXTURE_MODEL,
                 "stripped": "node metadata_props (exporter debug info)",
                 "relative_error_vs_torch": float(f"{err:.3g}"), **_versions(),
                 "files": {f: fx.sha256(keep / f) for f in fx.FIXTURE_FILES}}
        target = root / name
        if target.exists():
            os.replace(target, stage / "old")  # moved aside, removed with the stage
        os.replace(keep, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return entry


def write_manifest(root: Path, variants: dict[str, Any]) -> None:
    """Write ``MANIFEST.json`` atomically."""
    manifest = {"regenerate": fx.REGENERATE, "exporter": EXPORTER, "opset": OPSET,
                "variants": dict(sorted(variants.items()))}
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=root)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / fx.MANIFEST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help="variant names (default: all of DYNAMO_FIXTURES)")
    parser.add_argument("--out", type=Path, default=fx.FIXTURE_ROOT, help="fixture folder")
    parser.add_argument("--check", action="store_true", help="only verify the files against the manifest")
    args = parser.parse_args(argv)
    root: Path = args.out
    if args.check:
        problems = fx.manifest_problems(root)
        print("\n".join(problems) or f"{root}: all fixtures match {fx.MANIFEST}")
        return 1 if problems else 0
    matrix = {fx.fixture_name(a, m, EXPORTER): (a, m) for a, m in fx.DYNAMO_FIXTURES}
    unknown = [v for v in args.variants if v not in matrix]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(matrix)}")
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".stage-*"):  # from a killed run
        shutil.rmtree(leftover)
    existing = fx.read_manifest(root)["variants"] if (root / fx.MANIFEST).is_file() else {}
    # keep only entries still in the matrix; variants dropped from the matrix are deleted below
    variants = {k: v for k, v in existing.items() if k in matrix}
    for name in args.variants or sorted(matrix):
        start = time.perf_counter()
        variants[name] = export_variant(root, *matrix[name])
        write_manifest(root, variants)  # after each variant: an interrupted run keeps what it finished
        size = sum((root / name / f).stat().st_size for f in fx.FIXTURE_FILES)
        print(f"{name}: {size / 1024:.0f} KiB, {time.perf_counter() - start:.1f} s", flush=True)
    for stale in sorted({p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
                        - set(matrix)):
        shutil.rmtree(root / stale)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"{root}: {total / 1e6:.2f} MB in total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
