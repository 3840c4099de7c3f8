"""What retention policies cost and save in time and memory, on the decode benchmark's model.

The model is the one of ``benchmarks/decode_speed.py`` (random Llama: 8 layers, hidden 512, 8 query heads,
2 KV heads; nothing downloaded). A ``--context``-token prompt (default 4096) is prefilled, then ``--steps``
tokens are decoded greedily; each configuration runs ``--repeats`` times, round-robin, and the median decode
time per token is reported. The rows, all measured in this run:

* ``dense``: the full cache (holds the whole prompt);
* each policy at ``budget=0.5`` (holds half of it);
* ``dense @half``: a full cache fed a prompt of half the length, holding as many tokens as the policies do.
  A policy's *scoring overhead* is its time over this row's: what choosing tokens costs beyond attending
  fewer of them.

Then a long prompt (``--long``, default 16384 tokens) is streamed in chunks of 512 through
``keyformer:tokens=1024`` (compressed after each chunk) and through the full cache: peak cache bytes and peak
resident memory of each.

    python benchmarks/policy_speed.py --threads 1
    python benchmarks/policy_speed.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from kvcache.bench.memory import PeakRSS
from kvcache.files import write_text_atomic
from kvcache.generation import generate_ids
from kvcache.models import DEFAULT_MODEL_DIR
from kvcache.models.load import load_tokenizer
from kvcache.models.random import random_model

MODEL = dict(num_layers=8, hidden=512, num_heads=8, num_kv_heads=2, vocab_size=4096, intermediate_size=1408)
QUICK_MODEL = dict(
    num_layers=2, hidden=128, num_heads=4, num_kv_heads=2, vocab_size=4096, intermediate_size=352
)
POLICIES = ("keyformer", "h2o", "streaming", "keydiff")


def _ms_per_token(model: Any, tok: Any, ids: torch.Tensor, spec: str, steps: int) -> tuple[float, int]:
    result = generate_ids(model, tok, ids, cache=spec, max_new_tokens=steps + 1, eos_token_id=[])
    return 1e3 / result.stats.decode_tokens_per_s, result.stats.cache_bytes


def run(context: int, steps: int, repeats: int, long: int, model_kwargs: dict[str, int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = random_model("llama", max_positions=max(context, long) + steps + 64, **model_kwargs)
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    vocab = model.config.vocab_size
    prompt = torch.randint(4, vocab, (1, context))
    configs = {"dense": (prompt, "dynamic"), "dense @half": (prompt[:, context // 2 :], "dynamic")}
    configs |= {f"{p}:budget=0.5": (prompt, f"{p}:budget=0.5") for p in POLICIES}
    times: dict[str, list[float]] = {name: [] for name in configs}
    held: dict[str, int] = {}
    for ids, spec in configs.values():  # one untimed warm-up each
        _ms_per_token(model, tok, ids, spec, 2)
    for repeat in range(repeats):
        names = list(configs)
        names = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in names:
            ids, spec = configs[name]
            ms, held[name] = _ms_per_token(model, tok, ids, spec, steps)
            times[name].append(ms)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [
        {
            "config": name,
            "ms_per_token": median[name],
            "samples_ms": times[name],
            "cache_bytes": held[name],
            "vs_dense": median[name] / median["dense"],
            "vs_dense_half": median[name] / median["dense @half"],
        }
        for name in configs
    ]
    streaming = []
    long_prompt = torch.randint(4, vocab, (1, long))
    for spec in ("keyformer:tokens=1024", "dynamic"):
        with PeakRSS() as rss:
            result = generate_ids(
                model, tok, long_prompt, cache=spec, max_new_tokens=2, eos_token_id=[], prefill_chunk_size=512
            )
        streaming.append(
            {
                "spec": spec,
                "prompt_tokens": long,
                "peak_cache_bytes": result.stats.peak_cache_bytes,
                "peak_rss_bytes": rss.peak,
                "rss_before_bytes": rss.before,
                "prefill_tokens_per_s": result.stats.prefill_tokens_per_s,
            }
        )
    return {
        "model": {"arch": "llama", **model_kwargs},
        "context": context,
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
        "streaming_prefill": streaming,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"decode after a {report['context']}-token prompt, median of {report['repeats']} x "
        f"{report['steps']} steps, {report['threads']} thread(s)",
        "",
        "| config | ms/token | x dense | x dense @half (scoring overhead) | cache MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['ms_per_token']:.2f} | {r['vs_dense']:.3f} | {r['vs_dense_half']:.3f} | "
            f"{r['cache_bytes'] / 2**20:.1f} |"
        )
    lines += [
        "",
        "| long prompt, chunks of 512 | prompt tokens | peak cache MiB | peak RSS MiB (before) "
        "| prefill tok/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in report["streaming_prefill"]:
        lines.append(
            f"| {s['spec']} | {s['prompt_tokens']} | {s['peak_cache_bytes'] / 2**20:.1f} | "
            f"{s['peak_rss_bytes'] / 2**20:.0f} ({s['rss_before_bytes'] / 2**20:.0f}) | "
            f"{s['prefill_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = QUICK_MODEL if args.quick else MODEL
    if args.quick:
        args.context, args.steps, args.repeats, args.long = 256, 4, 2, 2048
    report = run(args.context, args.steps, args.repeats, args.long, model_kwargs)
    print(table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
