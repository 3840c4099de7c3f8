"""The results folder: atomic writes that never overwrite a file the bench did not write itself.

Every file the bench writes is listed in ``OUT/.kvcache-bench.json`` (with the fingerprint of the run's
inputs); a file already in the folder but not in that list is the user's, and writing over it is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kvcache.errors import KVCacheError
from kvcache.files import atomic_write

MANIFEST = ".kvcache-bench.json"


def slug(label: str) -> str:
    """A file-name-safe form of a row label (``"kvpress SnapKV 50%"`` -> ``"kvpress_SnapKV_50pct"``)."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label.replace("%", "pct")).strip("_") or "row"


class ResultsDir:
    """``OUT``, with the list of the files the bench wrote there.

    Raises
    ------
    KVCacheError
        If ``out`` is a file, or was written by a run with other inputs (``fingerprint`` differs).
    """

    def __init__(self, out: Path, fingerprint: str) -> None:
        if out.exists() and not out.is_dir():
            raise KVCacheError(f"--out {out} is a file; give a folder (it is created if missing)")
        out.mkdir(parents=True, exist_ok=True)
        self.root = out
        self.manifest_path = out / MANIFEST
        self.manifest: dict[str, Any] = {"fingerprint": fingerprint, "files": []}
        if self.manifest_path.is_file():
            old = json.loads(self.manifest_path.read_text())
            if old.get("fingerprint") != fingerprint:
                raise KVCacheError(
                    f"{out} holds results of a run with other settings (model, tasks, sizes or budgets); "
                    "resume only with the same settings, or give another --out")
            self.manifest = old

    def path(self, rel: str) -> Path:
        return self.root / rel

    def owns(self, rel: str) -> bool:
        return rel in self.manifest["files"]

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``OUT/rel`` atomically; refuse if it exists and the bench did not write it."""
        target = self.root / rel
        if target.exists() and not self.owns(rel):
            raise KVCacheError(f"refusing to overwrite {target}: the bench did not write it; "
                               "move it away or give another --out")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp:
            tmp.write_bytes(data)
        if not self.owns(rel):
            self.manifest["files"].append(rel)
            self._save_manifest()
        return target

    def write_text(self, rel: str, text: str) -> Path:
        return self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, data: Any) -> Path:
        return self.write_text(rel, json.dumps(data, indent=1) + "\n")

    def read_json(self, rel: str) -> Any | None:
        """The JSON of ``OUT/rel`` if the bench wrote it (a finished row), else ``None``."""
        p = self.root / rel
        if not (self.owns(rel) and p.is_file()):
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes, but a broken file is simply redone

    def _save_manifest(self) -> None:
        with atomic_write(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1), encoding="utf-8")
