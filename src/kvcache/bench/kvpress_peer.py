"""Drive kvpress (in its side environment) from the bench: write the jobs, run the runner, read records."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvcache.bench.contract import check_record, unavailable
from kvcache.bench.outputs import ResultsDir, slug
from kvcache.bench.systems import SystemInfo

#: kvpress's presses compared, in report order (names as the runner knows them)
PRESSES: tuple[str, ...] = ("StreamingLLM", "SnapKV", "TOVA", "Knorm", "ObservedAttention",
                            "ExpectedAttention", "KeyDiff", "Decoding")
RUNNER = Path(__file__).resolve().parent / "kvpress_runner.py"
#: where ``scripts/peer-env.sh kvpress`` puts the side environment, relative to the repository root
DEFAULT_ENV = Path(".peer-envs") / "kvpress"


def label(press: str, budget: float) -> str:
    return f"kvpress {press} {round(100 * budget):g}%"


def systems(budgets: Sequence[float], presses: Sequence[str] = PRESSES) -> list[SystemInfo]:
    """One row per press and budget (kept fraction; kvpress's ``compression_ratio`` is ``1 - budget``)."""
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        raise ValueError(f"unknown kvpress press(es) {', '.join(unknown)}; choose from: {', '.join(PRESSES)}")
    return [SystemInfo(label(p, b), "kvpress", p, b) for b in budgets for p in presses]


def find_python(explicit: Path | None) -> Path | None:
    """The side environment's interpreter: ``explicit``, else ``.peer-envs/kvpress`` here or in the
    checkout."""
    if explicit is not None:
        return explicit if explicit.is_file() else None
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / DEFAULT_ENV / "bin" / "python"
        if candidate.is_file():
            return candidate
    return None


def record_rel(info: SystemInfo, task: str) -> str:
    return f"peers/kvpress/{slug(info.label)}__{task}.json"


def run(infos: Sequence[SystemInfo], todo: Sequence[tuple[str, str]], jobs: dict[str, dict[str, Any]],
        model_dir: Path, out: ResultsDir, python: Path | None, threads: int,
        on_line: Callable[[str], None] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Run the (label, task) pairs of ``todo`` in the side environment; return their checked records.

    A missing environment, a runner crash or a record breaking the contract becomes an unavailable record
    with the reason, never an exception.
    """
    by_label = {i.label: i for i in infos}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    if not todo:
        return results
    if python is None:
        reason = ("kvpress runs in a side environment (it pins transformers < 5.3): make it with "
                  "`bash scripts/peer-env.sh kvpress`, or pass --kvpress-python PATH")
        return {(lbl, t): unavailable(lbl, t, reason) for lbl, t in todo}
    spec = {"model": str(model_dir), "threads": threads, "jobs": {t: jobs[t] for _, t in todo},
            "systems": [{"label": i.label, "press": i.family, "ratio": round(1 - float(i.budget or 0), 6),
                         "file": slug(i.label)} for i in infos],
            "todo": [list(p) for p in todo]}
    out.write_json("peers/kvpress_jobs.json", spec)
    records_dir = out.path("peers/kvpress")
    proc = subprocess.Popen([str(python), str(RUNNER), str(out.path("peers/kvpress_jobs.json")),
                             str(records_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if on_line:
            on_line(line.rstrip("\n"))
    stderr = proc.stderr.read() if proc.stderr else ""
    rc = proc.wait()
    for lbl, task in todo:
        path = records_dir / f"{slug(lbl)}__{task}.json"
        try:
            record = json.loads(path.read_text())
            check_record(record, jobs[task])
        except (OSError, ValueError) as err:
            tail = " ".join(stderr.strip().splitlines()[-3:])
            reason = (f"kvpress runner exited with {rc}: {tail}" if rc else f"bad kvpress record: {err}")
            record = unavailable(lbl, task, reason)
        results[(lbl, task)] = record
    del by_label
    return results
