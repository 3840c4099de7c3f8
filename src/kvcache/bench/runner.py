"""``kvcache bench``: every system x every task, one finished row file at a time (so a run resumes)."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvcache.bench import kvpress_peer
from kvcache.bench.contract import run_job, unavailable
from kvcache.bench.memory import PeakRSS
from kvcache.bench.ort_system import PREFIX as ORT_PREFIX
from kvcache.bench.ort_system import OrtSystem
from kvcache.bench.outputs import ResultsDir, slug
from kvcache.bench.prompts import TASKS, PromptSettings, build_jobs, build_prompts
from kvcache.bench.score import score_record
from kvcache.bench.systems import HF_CACHES, HFCacheSystem, KVCacheSystem, SystemInfo

PEERS: tuple[str, ...] = ("hf", "kvpress")
DEFAULT_TASKS: tuple[str, ...] = ("passkey", "needles", "ppl", "consistency", "speed")


@dataclass
class BenchConfig:
    """One bench run (what ``kvcache bench`` parses its options into)."""

    out: Path
    model: str = "default"
    specs: list[str] = field(default_factory=lambda: ["full"])
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    peers: list[str] = field(default_factory=list)
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])
    presses: list[str] = field(default_factory=lambda: list(kvpress_peer.PRESSES))
    quick: bool = False
    threads: int = 1
    speed_repeats: int = 3
    kvpress_python: Path | None = None
    settings: PromptSettings | None = None
    command: str = ""

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {', '.join(bad) or '(none given)'}; "
                             f"choose from: {', '.join(TASKS)}")
        bad = [p for p in self.peers if p not in PEERS]
        if bad:
            raise ValueError(f"unknown peer(s) {', '.join(bad)}; choose from: {', '.join(PEERS)}")
        if not self.specs:
            raise ValueError("give at least one cache spec (--specs full,...)")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets are kept fractions in (0, 1], got {self.budgets}")
        if self.threads < 1 or self.speed_repeats < 1:
            raise ValueError("--threads and --repeats must be >= 1")
        for s in self.specs:  # a typo fails before the model loads
            from kvcache.spec import CacheSpec

            CacheSpec.parse(s.removeprefix(ORT_PREFIX))


def _fingerprint(cfg: BenchConfig, jobs: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"model": cfg.model, "jobs": jobs}, sort_keys=True).encode())
    return h.hexdigest()[:16]


class _Progress:
    """Rich progress bars: one over (system, task) rows, one over the current row's prompts."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn())
            self.bar.start()
            self.rows = self.bar.add_task("rows", total=total)
            self.items = self.bar.add_task("", total=1)

    def start_row(self, name: str, items: int) -> None:
        if self.bar:
            self.bar.reset(self.items, total=max(1, items), description=name)

    def tick(self) -> None:
        if self.bar:
            self.bar.advance(self.items)

    def done_row(self) -> None:
        if self.bar:
            self.bar.advance(self.rows)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _items(job: dict[str, Any]) -> int:
    if job["mode"] == "conversation":
        return len(job["conversations"])
    return len(job["prompts"] if job["mode"] == "generate" else job["windows"])


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a bench and write every output file into ``cfg.out``; return the results."""
    import torch
    from transformers.utils import logging as transformers_logging

    from kvcache.bench.report import write_reports
    from kvcache.models import load
    from kvcache.models.load import DEFAULT_MODEL_DIR

    cfg.check()
    if cfg.out.exists() and not cfg.out.is_dir():
        from kvcache.errors import KVCacheError

        raise KVCacheError(f"--out {cfg.out} is a file; give a folder (it is created if missing)")
    torch.set_num_threads(cfg.threads)
    transformers_logging.disable_progress_bar()
    model, tokenizer = load(cfg.model)
    model_dir = DEFAULT_MODEL_DIR if cfg.model == "default" else Path(cfg.model)
    settings = cfg.settings or (PromptSettings.quick() if cfg.quick else PromptSettings())
    prompts = build_prompts(tokenizer, settings, cfg.tasks,
                            max_positions=getattr(model.config, "max_position_embeddings", None))
    jobs = build_jobs(prompts, cfg.tasks, cfg.speed_repeats)
    out = ResultsDir(cfg.out, _fingerprint(cfg, jobs))
    out.write_json("prompts.json", {"settings": asdict(settings), "prompts": prompts.to_json()})

    baseline = KVCacheSystem("full", model, tokenizer)
    local: list[Any] = [baseline] + [
        OrtSystem(s, cfg.model, tokenizer, cfg.threads) if s.startswith(ORT_PREFIX)
        else KVCacheSystem(s, model, tokenizer) for s in cfg.specs if s.strip() != "full"]
    if "hf" in cfg.peers:
        local += [HFCacheSystem(lbl, model, tokenizer) for lbl in HF_CACHES]
    press_infos = kvpress_peer.systems(cfg.budgets, cfg.presses) if "kvpress" in cfg.peers else []
    infos: list[SystemInfo] = [s.info for s in local] + press_infos
    seen: set[str] = set()
    for i in infos:
        if i.label in seen:
            raise ValueError(f"row {i.label!r} is given twice; list each spec once")
        seen.add(i.label)

    # one untimed generation first: the first forward passes of a process pay one-off costs (allocator,
    # kernel selection) that would otherwise land on the first row's timings
    from kvcache.generation import generate

    generate(model, tokenizer, ["The list type"], max_new_tokens=4, progress=False)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    bars = _Progress(progress, len(infos) * len(cfg.tasks))
    try:
        for system in local:
            for task in cfg.tasks:
                rows[(system.info.label, task)] = _local_row(system, task, jobs, prompts, out, rows, bars,
                                                              tokenizer)
                bars.done_row()
        todo = []
        for info in press_infos:
            for task in cfg.tasks:
                existing = out.read_json(_row_rel(info, task))
                if existing is None and task == "conversation":
                    existing = {"record": unavailable(info.label, task, CONVERSATION_ONLY)}
                if existing is not None:
                    _finish(info, task, existing["record"], jobs, prompts, out, rows, tokenizer)
                    bars.done_row()
                else:
                    todo.append((info.label, task))
        if todo:
            def on_line(line: str) -> None:
                if line == "tick":
                    bars.tick()
                elif line.startswith("done\t"):
                    _, lbl, task = line.split("\t")
                    bars.done_row()
                    bars.start_row(f"{lbl} {task}", 1)

            bars.start_row(f"kvpress ({len(todo)} rows, side environment)", 1)
            python = kvpress_peer.find_python(cfg.kvpress_python)
            records = kvpress_peer.run(press_infos, todo, jobs, model_dir, out, python, cfg.threads, on_line)
            by_label = {i.label: i for i in press_infos}
            for (lbl, task), record in records.items():
                rows[(lbl, task)] = _finish(by_label[lbl], task, record, jobs, prompts, out, rows, tokenizer)
    finally:
        bars.close()
    meta = {"command": cfg.command, "model": cfg.model, "quick": cfg.quick, "threads": cfg.threads,
            "tasks": cfg.tasks, "specs": cfg.specs, "peers": cfg.peers, "budgets": cfg.budgets,
            "settings": asdict(settings), "speed_repeats": cfg.speed_repeats,
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": __import__("transformers").__version__},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    ordered = [rows[(i.label, t)] for i in infos for t in cfg.tasks]
    return write_reports(out, meta, infos, ordered)


#: why a peer has no conversation row
CONVERSATION_ONLY = "the conversation task carries kvcache's cache across turns (kvcache.Chat); peers do not"


def _row_rel(info: SystemInfo, task: str) -> str:
    return f"rows/{slug(info.label)}__{task}.json"


def _local_row(system: Any, task: str, jobs: dict[str, Any], prompts: Any, out: ResultsDir,
               rows: dict[tuple[str, str], dict[str, Any]], bars: _Progress,
               tokenizer: Any) -> dict[str, Any]:
    info: SystemInfo = system.info
    existing = out.read_json(_row_rel(info, task))
    if existing is not None:  # finished before: re-scored from its record (cheap), never re-run
        return _finish(info, task, existing["record"], jobs, prompts, out, rows, tokenizer)
    job = jobs[task]
    bars.start_row(f"{info.label} {task}", _items(job))
    if info.reason:
        record = unavailable(info.label, task, info.reason)
    elif task == "conversation":
        if not hasattr(system, "converse"):
            record = unavailable(info.label, task, CONVERSATION_ONLY)
        else:
            from kvcache.bench.conversation import run_conversation_job

            record = run_conversation_job(job, info.label, system.converse, PeakRSS, advance=bars.tick)
    else:
        try:
            record = run_job(job, info.label, system.generate, system.stream, PeakRSS, advance=bars.tick)
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as err:
            # a system that fails on this model/task is a row with the reason, not a crashed run
            record = unavailable(info.label, task, f"{type(err).__name__}: {err}")
    return _finish(info, task, record, jobs, prompts, out, rows, tokenizer)


def _finish(info: SystemInfo, task: str, record: dict[str, Any], jobs: dict[str, Any], prompts: Any,
            out: ResultsDir, rows: dict[tuple[str, str], dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    reference = None
    if task == "consistency" and record["available"]:
        ref = out.read_json(f"rows/{slug('full')}__consistency.json")
        reference = record if info.label == "full" else (ref["record"] if ref else None)
    row = score_record(record, jobs[task], tokenizer, prompts.retrieval.get(task), reference)
    row.update(system=info.label, peer=info.peer, family=info.family, budget=info.budget, spec=info.spec)
    out.write_json(_row_rel(info, task), {"row": row, "record": record})
    rows[(info.label, task)] = row
    return row


def parse_list(text: str) -> list[str]:
    """Split a comma-separated option, keeping the commas inside a spec's parameters.

    ``"full,keyformer:budget=0.5,window=0.3,h2o:budget=0.5"`` -> ``["full", "keyformer:budget=0.5,window=0.3",
    "h2o:budget=0.5"]``: a piece with ``=`` but no ``:`` continues the previous spec's parameters.
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece.split("+")[0] and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


