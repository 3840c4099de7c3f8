"""Export the pre-built graphs of the ONNX injection test matrix into ``tests/fixtures/onnx/``.

The dynamo exporter takes 15-40 s per tiny model, too slow to run the whole matrix live on every test run,
and graphs made with an older transformers release need a side environment. This script exports every
variant of ``tests/onnx_fixtures.FIXTURE_VARIANTS`` once, with the tiny random models of ``fixture_model``
(the tests' ``TINY`` settings with a 64-entry position table, to keep the files small):

* ``<arch>-<attn>-dynamo``: dynamo exporter, with a ``position_ids`` input (``kvcache onnx export``);
* ``<arch>-<attn>-dynamo-plain``: dynamo exporter, from ``(input_ids, attention_mask)`` only
  (``scripts/export_plain.py``): the graph computes its own positions;
* ``<arch>-<attn>-legacy-plain-transformers4``: the same plain export by the legacy exporter, made with
  transformers 4.4x in the side environment of ``scripts/peer-env.sh`` (run there as a subprocess:
  ``--old-python``, default ``/tmp/kvcache-transformers4/bin/python``).

and writes per variant::

    tests/fixtures/onnx/<variant>/model.onnx    # no-cache graph, weights embedded
    tests/fixtures/onnx/<variant>/config.json   # what the injector reads
    tests/fixtures/onnx/MANIFEST.json           # versions, exporter, opset, sha256 per file

The exporter's per-node debug metadata (``metadata_props``: stack traces with local paths, FX node dumps;
about 60% of the file) is dropped, which leaves the computation unchanged; the injector reads only the
graph itself. Each kept graph is checked against the PyTorch model's logits (the old-release ones in the
side environment). Variant directories and the manifest are replaced atomically (staged beside the
target, then ``os.replace``), so an interrupted run leaves the previous fixtures intact.

Usage (about 15-20 minutes of CPU for everything)::

    bash scripts/peer-env.sh transformers4                  # once: the transformers 4.4x environment
    python scripts/make_onnx_fixtures.py                    # every variant
    python scripts/make_onnx_fixtures.py mistral-sdpa-dynamo  # only these, the rest of the manifest is kept
    python scripts/make_onnx_fixtures.py --missing          # only variants not in the manifest yet
    python scripts/make_onnx_fixtures.py --check            # verify the files against the manifest
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the matrix and model settings live with the tests
sys.path.insert(0, str(ROOT / "scripts"))  # export_plain and its neighbour standalone

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_fixtures as fx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from kvcache.files import write_text_atomic  # noqa: E402
from kvcache.onnx.export import export_model  # noqa: E402

#: opset per exporter: export_model's defaults, spelled out so the manifest records them
OPSETS = {"dynamo": 18, "legacy": 17}
OLD_PYTHON = Path(os.environ.get("KVCACHE_OLD_PYTHON", "/tmp/kvcache-transformers4/bin/python"))


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


def _compact_names(graph: onnx.GraphProto) -> None:
    """Give intermediate tensors short names (``t0``, ``t1``...) and drop node names and value_info.

    The legacy exporter names every tensor after its module path (``/model/model/layers.0/self_attn/...``):
    about 40% of a tiny model's file. Graph inputs, outputs and initializers keep their names, and the
    computation is unchanged; the injector matches by structure, not by name.
    """
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    keep |= {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}
    for node in graph.node:
        node.name = ""
        for out in node.output:
            if out and out not in keep:
                renamed[out] = f"t{len(renamed)}"
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    del graph.value_info[:]


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


def _export_old(arch: str, attn: str, exporter: str, out: Path, python: Path) -> dict[str, Any]:
    """Run ``export_plain.py`` in the older-transformers environment; returns its JSON summary."""
    if not python.is_file():
        raise SystemExit(f"{python} does not exist: make the side environment with "
                         "`bash scripts/peer-env.sh transformers4` or pass --old-python")
    cmd = [str(python), str(ROOT / "scripts" / "export_plain.py"), arch, attn, "--exporter", exporter,
           "--opset", str(OPSETS[exporter]), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"{arch}/{attn} in {python}: export failed:\n{run.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    if not summary["transformers"].startswith("4."):
        raise SystemExit(f"{python} has transformers {summary['transformers']}, not a 4.x release")
    return summary


def export_variant(root: Path, variant: fx.Variant, old_python: Path = OLD_PYTHON) -> dict[str, Any]:
    """Export one variant into ``root/<name>/`` atomically; returns its manifest entry."""
    arch, attn, exporter, plain, release = variant
    name = fx.fixture_name(*variant)
    opset = OPSETS[exporter]
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{name}-", dir=root))
    try:
        export_dir = stage / "export"
        model = None
        if release != "current":
            made = _export_old(arch, attn, exporter, export_dir, old_python)
            err = float(made["relative_error_vs_torch"])
            versions = {k: made[k] for k in ("torch", "transformers", "onnx", "onnxruntime", "python")}
        else:
            model = fx.fixture_model(arch, attn)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if plain:
                    import export_plain

                    export_dir.mkdir()
                    export_plain.export_plain(model, export_dir / "model.onnx", exporter, opset)
                    model.config.save_pretrained(export_dir)
                else:
                    export_model(model, export_dir, exporter=exporter, opset=opset)
            versions = _versions()
        keep = stage / "keep"
        keep.mkdir()
        proto = onnx.load(str(export_dir / "model.onnx"))
        _strip_debug_metadata(proto.graph)
        if plain:  # the with-position_ids fixtures predate this and are kept byte for byte
            _compact_names(proto.graph)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(keep / "model.onnx"))
        shutil.copyfile(export_dir / "config.json", keep / "config.json")
        assert sorted(fx.FIXTURE_FILES) == ["config.json", "model.onnx"]
        if model is not None:
            err = _check_against_torch(model, keep / "model.onnx", arch)
        inputs = [i.name for i in proto.graph.input]
        entry = {"arch": arch, "attn": attn, "exporter": exporter, "opset": opset, "plain": plain,
                 "release": release, "inputs": inputs, "model": fx.FIXTURE_MODEL,
                 "stripped": "node metadata_props (exporter debug info)"
                 + ("; node names, value_info, intermediate tensor names shortened" if plain else ""),
                 "relative_error_vs_torch": float(f"{err:.3g}"), **versions,
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
    manifest = {"regenerate": fx.REGENERATE, "variants": dict(sorted(variants.items()))}
    write_text_atomic(root / fx.MANIFEST, json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help="variant names (default: all of FIXTURE_VARIANTS)")
    parser.add_argument("--out", type=Path, default=fx.FIXTURE_ROOT, help="fixture folder")
    parser.add_argument("--missing", action="store_true", help="only the variants not in the manifest")
    parser.add_argument("--old-python", type=Path, default=OLD_PYTHON,
                        help="python of the transformers 4.4x environment "
                             "(scripts/peer-env.sh transformers4)")
    parser.add_argument("--check", action="store_true", help="only verify the files against the manifest")
    args = parser.parse_args(argv)
    root: Path = args.out
    if args.check:
        problems = fx.manifest_problems(root)
        print("\n".join(problems) or f"{root}: all fixtures match {fx.MANIFEST}")
        return 1 if problems else 0
    matrix = {fx.fixture_name(*v): v for v in fx.FIXTURE_VARIANTS}
    unknown = [v for v in args.variants if v not in matrix]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(matrix)}")
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".stage-*"):  # from a killed run
        shutil.rmtree(leftover)
    existing = fx.read_manifest(root)["variants"] if (root / fx.MANIFEST).is_file() else {}
    # keep only entries still in the matrix; variants dropped from the matrix are deleted below
    variants = {k: v for k, v in existing.items() if k in matrix}
    todo = args.variants or sorted(matrix)
    if args.missing:
        todo = [v for v in todo if v not in variants]
    for name in todo:
        start = time.perf_counter()
        variants[name] = export_variant(root, matrix[name], args.old_python)
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
