#!/usr/bin/env python3
"""Compare default-model recipe variants side by side: train each, evaluate each, print one table.

    PYTHONPATH=src python3 scripts/sweep_default_model.py scripts/default_model_sweep.toml --out /tmp/sweep
    PYTHONPATH=src python3 scripts/sweep_default_model.py scripts/default_model_sweep.toml --out /tmp/sweep \\
        --round rope --parallel 4                   # one round only
    PYTHONPATH=src python3 scripts/sweep_default_model.py scripts/default_model_sweep.toml --out /tmp/sweep \\
        --summary-only                              # re-print the table of the runs already in --out

A sweep file (TOML) names variants of one preset: each is the preset plus ``--set`` overrides and a seed,
grouped in rounds. By default every variant runs on one GPU in fp32 with the planned step count ending
the run (``--device cuda --precision fp32 --set budget_s=1e9``), which is the CPU recipe step for step, a
few minutes per variant, several at once (a 3.7M-parameter model leaves the GPU mostly idle). Each
variant's run directory ``OUT/NAME`` gets the usual train_log.json, eval.json and MODEL_CARD.md, its logs
go to ``OUT/NAME.train.log`` and ``OUT/NAME.eval.log``, and the table is written to ``OUT/sweep.md``.
A variant whose directory already has eval.json is not run again.

File layout::

    [defaults]                       # optional; shown with its defaults
    preset = "cpu"
    device = "cuda"
    precision = "fp32"
    workers = 1                      # data-loader workers per run
    set = ["budget_s=1e9"]           # overrides every variant starts from

    [variants.V1]
    round = "curriculum"             # optional grouping (--round)
    seed = 0                         # optional
    set = ["steps=3000", "curriculum=((0.35, 256, 8), (0.6, 512, 4), (1.0, 1024, 2))"]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from standalone import write_text  # scripts/ is on sys.path when a script runs

SCRIPTS = Path(__file__).resolve().parent
DEFAULTS = {"preset": "cpu", "device": "cuda", "precision": "fp32", "workers": 1, "set": ["budget_s=1e9"]}
VARIANT_KEYS = {"round", "seed", "set"}


@dataclass(frozen=True)
class Variant:
    """One recipe variant: the sweep's preset plus ``overrides`` (``FIELD=VALUE`` strings), with a seed."""

    name: str
    round: str = ""
    seed: int = 0
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sweep:
    preset: str
    device: str
    precision: str
    workers: int
    overrides: tuple[str, ...]
    variants: dict[str, Variant] = field(default_factory=dict)


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: 'set' must be a list of \"FIELD=VALUE\" strings, got {value!r}")
    bad = [v for v in value if "=" not in v]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} is not FIELD=VALUE (e.g. \"steps=3000\")")
    return tuple(value)


def parse_sweep(text: str, source: str = "<sweep>") -> Sweep:
    """A :class:`Sweep` from TOML text (layout in the module docstring); errors name the bad entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML: {e}") from None
    unknown = set(doc) - {"defaults", "variants"}
    if unknown:
        raise ValueError(f"{source}: unknown table(s) {sorted(unknown)}; "
                         "expected [defaults] and [variants.NAME]")
    d = {**DEFAULTS, **doc.get("defaults", {})}
    unknown = set(d) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{source}: unknown [defaults] key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    variants: dict[str, Variant] = {}
    for name, v in doc.get("variants", {}).items():
        where = f"{source}: [variants.{name}]"
        if not isinstance(v, dict):
            raise ValueError(f"{where} must be a table")
        unknown = set(v) - VARIANT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(VARIANT_KEYS)}")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}: a name is letters, digits, '-' and '_' (it names a directory)")
        variants[name] = Variant(name, str(v.get("round", "")), int(v.get("seed", 0)),
                                 _strings(v.get("set", []), where))
    if not variants:
        raise ValueError(f"{source}: no [variants.NAME] tables")
    return Sweep(str(d["preset"]), str(d["device"]), str(d["precision"]), int(d["workers"]),
                 _strings(d["set"], f"{source}: [defaults]"), variants)


def train_command(sweep: Sweep, v: Variant, out: Path) -> list[str]:
    """The train_default_model.py command line of one variant (its overrides after the sweep's)."""
    cmd = [sys.executable, str(SCRIPTS / "train_default_model.py"), "--preset", sweep.preset,
           "--device", sweep.device, "--precision", sweep.precision, "--workers", str(sweep.workers),
           "--seed", str(v.seed), "--out", str(out / v.name)]
    for item in sweep.overrides + v.overrides:
        cmd += ["--set", item]
    return cmd


def eval_command(sweep: Sweep, v: Variant, out: Path, contexts: str, prompts: int) -> list[str]:
    return [sys.executable, str(SCRIPTS / "eval_default_model.py"), str(out / v.name),
            "--device", sweep.device, "--contexts", contexts, "--prompts", str(prompts)]


def run_variant(sweep: Sweep, v: Variant, out: Path, contexts: str, prompts: int) -> str:
    """Train then evaluate one variant; returns a one-line outcome (logs in OUT/NAME.*.log)."""
    if (out / v.name / "eval.json").is_file():
        return f"{v.name}: already evaluated, kept"
    t0 = time.time()
    for stage, cmd in (("train", train_command(sweep, v, out)),
                       ("eval", eval_command(sweep, v, out, contexts, prompts))):
        with open(out / f"{v.name}.{stage}.log", "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            return f"{v.name}: {stage} failed (exit {rc}); see {out / f'{v.name}.{stage}.log'}"
    return f"{v.name}: done in {time.time() - t0:.0f}s"


def summary_row(name: str, run_dir: Path) -> dict | None:
    """Key numbers of one evaluated run (None when it has no eval.json/train_log.json yet)."""
    try:
        ev = json.loads((run_dir / "eval.json").read_text())
        train = json.loads((run_dir / "train_log.json").read_text())
    except FileNotFoundError:
        return None
    at = {r["context"]: r for r in ev["passkey"]}
    deepest = at.get(1024, {}).get("by_depth", {}).get("0")
    return {"name": name, "seed": train["seed"], "steps": train["steps"],
            "perplexity": ev["heldout"]["perplexity"],
            "passkey": {c: r["accuracy"] for c, r in sorted(at.items())},
            "passkey_1024_depth0": deepest,
            "multi_needle": {r["context"]: r["accuracy"] for r in ev.get("multi_needle", [])}}


def table(sweep: Sweep, rows: list[dict]) -> str:
    """A Markdown table of :func:`summary_row` rows, with each variant's overrides beyond the sweep's."""
    contexts = sorted({c for r in rows for c in r["passkey"]})
    head = (["variant", "seed", "steps", "ppl"] + [f"passkey@{c}" for c in contexts]
            + ["@1024 depth 0", "multi-needle@1024", "overrides"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for r in rows:
        v = sweep.variants[r["name"]]
        sets = ", ".join(f"`{s}`" for s in v.overrides if not s.startswith("steps="))
        cells = ([r["name"], str(r["seed"]), str(r["steps"]), f"{r['perplexity']:.1f}"]
                 + [pct(r["passkey"].get(c)) for c in contexts]
                 + [pct(r["passkey_1024_depth0"]), pct(r["multi_needle"].get(1024)), sets or "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="sweep file (TOML, see the module docstring)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the runs, logs and sweep.md")
    ap.add_argument("--round", action="append", default=[], help="run only this round (repeatable)")
    ap.add_argument("--only", action="append", default=[], help="run only this variant (repeatable)")
    ap.add_argument("--parallel", type=int, default=8, help="variants trained at once (default 8)")
    ap.add_argument("--contexts", default="256,512,1024,2048", help="passkey contexts to evaluate")
    ap.add_argument("--prompts", type=int, default=100, help="evaluation prompts per context and task")
    ap.add_argument("--summary-only", action="store_true", help="only print the table of evaluated runs")
    args = ap.parse_args(argv)
    if not args.sweep.is_file():
        ap.error(f"{args.sweep}: no such sweep file")
    try:
        sweep = parse_sweep(args.sweep.read_text(), str(args.sweep))
    except ValueError as e:
        ap.error(str(e))
    chosen = [v for v in sweep.variants.values()
              if (not args.round or v.round in args.round) and (not args.only or v.name in args.only)]
    missing = sorted(set(args.only) - set(sweep.variants))
    if missing or not chosen:
        rounds = sorted({v.round for v in sweep.variants.values()})
        ap.error(f"no such variant(s) {missing}" if missing else
                 f"no variant in round(s) {args.round}; rounds: {rounds}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        print(f"{len(chosen)} variant(s), {args.parallel} at a time, into {args.out}", flush=True)
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            futures = [pool.submit(run_variant, sweep, v, args.out, args.contexts, args.prompts)
                       for v in chosen]
            for fut in futures:
                print(fut.result(), flush=True)
    rows = [r for v in chosen if (r := summary_row(v.name, args.out / v.name)) is not None]
    if not rows:
        raise SystemExit(f"no evaluated run in {args.out} yet")
    text = table(sweep, rows)
    write_text(args.out / "sweep.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
