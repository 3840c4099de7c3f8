"""Retention policies on the bundled default model: retrieval accuracy and cache memory, one table.

Every policy at every budget runs the same fresh evaluation prompts (seeds from the evaluation range, filler
from the held-out prose, as the model card): passkey retrieval and multi-needle retrieval at ``--context``
tokens, greedy, the whole prompt compressed by the policy. The full cache runs in the same job as the
baseline. Cache bytes are those the cache holds at the end of one generation (``KVCache.nbytes()``),
relative to the full cache's.

    python benchmarks/policies.py                         # 100 passkey + 50 multi-needle prompts at 1024
    python benchmarks/policies.py --quick                 # smoke run (a few prompts, short context)
    python benchmarks/policies.py --json results/policies.json --markdown results/policies.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from kvcache.bench.accuracy import retrieval_accuracy
from kvcache.bench.prompts import default_eval_dir, prose_filler, retrieval_examples
from kvcache.files import write_text_atomic
from kvcache.generation import generate
from kvcache.models import load
from kvcache.models.corpus import load_eval_split
from kvcache.policies import POLICIES

BUDGETS = (0.5, 0.25, 0.1)
#: the peer's numbers on this model and prompt format (../shared measurements, kvpress 0.5.5, 100 prompts,
#: passkey at 1024 tokens, whole prompt compressed): press -> accuracy at 50% / 25% of the tokens
KVPRESS_PASSKEY = {"KeyDiff": (1.00, 0.81), "SnapKV": (0.73, 0.40), "StreamingLLM": (0.49, 0.23),
                   "ObservedAttention": (0.15, 0.03), "TOVA": (0.0, 0.0), "Knorm": (0.0, 0.0)}


def specs(policies: list[str], budgets: tuple[float, ...]) -> list[str]:
    return ["full"] + [f"{p}:budget={b}" for p in policies for b in budgets]


def cache_bytes(model: Any, tokenizer: Any, spec: str, prompt: str) -> int:
    """Bytes the cache holds after a short generation from one prompt."""
    return generate(model, tokenizer, prompt, cache=spec, max_new_tokens=8, progress=False).stats.cache_bytes


def run(context: int, n_passkey: int, n_needles: int, policies: list[str], budgets: tuple[float, ...],
        batch_size: int) -> dict[str, Any]:
    model, tokenizer = load("default")
    filler = prose_filler(load_eval_split(default_eval_dir() / "prose.jsonl"), tokenizer)
    tasks = {"passkey": retrieval_examples("passkey", filler, [context], n_passkey),
             "multi_needle": retrieval_examples("multi_needle", filler, [context], n_needles)}
    rows = []
    todo = specs(policies, budgets)
    with Progress() as bar:
        job = bar.add_task("policies", total=len(todo) * len(tasks))
        for spec in todo:
            row: dict[str, Any] = {"spec": spec}
            start = time.perf_counter()
            for task, examples in tasks.items():
                bar.update(job, description=f"{spec} {task}")
                ok, mean_len = retrieval_accuracy(model, tokenizer, examples, cache=spec,
                                                  batch_size=batch_size)
                row[task] = sum(ok) / len(ok)
                row[f"{task}_mean_prompt_tokens"] = mean_len
                bar.advance(job)
            row["seconds"] = time.perf_counter() - start
            row["cache_bytes"] = cache_bytes(model, tokenizer, spec, tasks["passkey"][0].prompt)
            rows.append(row)
    full = rows[0]["cache_bytes"]
    for row in rows:
        row["bytes_vs_full"] = row["cache_bytes"] / full
    return {"context": context, "passkey_prompts": n_passkey, "multi_needle_prompts": n_needles,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "rows": rows}


def table(report: dict[str, Any], budgets: tuple[float, ...]) -> str:
    """Markdown: one row per policy, passkey / multi-needle accuracy and cache bytes per budget."""
    at = {r["spec"]: r for r in report["rows"]}
    head = "| policy | " + " | ".join(f"passkey @{b:.0%} | needles @{b:.0%} | bytes @{b:.0%}"
                                     for b in budgets) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(budgets)]
    full = at["full"]
    lines.append("| full | " + " | ".join(f"{full['passkey']:.0%} | {full['multi_needle']:.0%} | 1.00x"
                                         for _ in budgets) + " |")
    for name in dict.fromkeys(s.split(":")[0] for s in at if s != "full"):
        cells = []
        for b in budgets:
            r = at.get(f"{name}:budget={b}")
            cells.append("- | - | -" if r is None else
                         f"{r['passkey']:.0%} | {r['multi_needle']:.0%} | {r['bytes_vs_full']:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"passkey: {report['passkey_prompts']} prompts, multi-needle: "
              f"{report['multi_needle_prompts']} prompts, {report['context']} tokens, greedy, whole prompt "
              "compressed.",
              "kvpress 0.5.5 on this model and prompt format (passkey @50% / @25%): " +
              ", ".join(f"{k} {a:.0%} / {b:.0%}" for k, (a, b) in KVPRESS_PASSKEY.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--passkey", type=int, default=100, help="passkey prompts (default 100)")
    parser.add_argument("--needles", type=int, default=50, help="multi-needle prompts (default 50)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="4 prompts per task at 256 tokens")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.context, args.passkey, args.needles = 256, 4, 4
    budgets = tuple(args.budgets)
    report = run(args.context, args.passkey, args.needles, args.policies, budgets, args.batch_size)
    text = table(report, budgets)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return report


if __name__ == "__main__":
    main()
