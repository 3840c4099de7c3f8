"""Per-turn latency of a conversation: the cache carried across turns against re-reading the history.

A ``--turns``-turn conversation (default 20) with the bundled model, greedy replies of ``--new`` tokens, user
messages of about ``--message`` tokens of held-out prose. Each turn is run both ways, in this run, on the
same history:

* ``reuse``: :class:`kvcache.Chat` reads only the new message (and the previous reply's last token) on top
  of the cache it kept;
* ``re-read``: :func:`kvcache.generation.generate_ids` reads the whole history so far into a fresh cache
  (what a chat without a kept cache does at every turn).

Both produce the same reply (checked at every turn). Printed: one row per turn (tokens read, milliseconds
each way, their ratio); written: ``--out`` JSON.

    python benchmarks/chat_turns.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvcache import Chat
from kvcache.bench.prompts import default_eval_dir, prose_filler
from kvcache.files import write_text_atomic
from kvcache.generation import generate_ids
from kvcache.models import load
from kvcache.models.corpus import load_eval_split


def run(turns: int, new: int, message: int, cache: str, seed: int) -> dict[str, Any]:
    model, tokenizer = load("default")
    filler = prose_filler(load_eval_split(default_eval_dir() / "prose.jsonl"), tokenizer)
    rng = random.Random(seed)
    messages = [" ".join(filler.take(rng, message)[0]) for _ in range(turns)]
    chat = Chat(model, tokenizer, cache, max_new_tokens=new, stop=[], eos_token_id=[])
    generate_ids(model, tokenizer, torch.tensor([[1, 2, 3]]), max_new_tokens=2, eos_token_id=[])  # warm-up
    rows = []
    for k, text in enumerate(messages):
        t0 = time.perf_counter()
        chat.send(text)
        reuse_s = time.perf_counter() - t0
        stats = chat.stats[-1]
        ids = chat.token_ids
        history = ids[: len(ids) - stats.new_tokens]
        t0 = time.perf_counter()
        again = generate_ids(model, tokenizer, torch.tensor([history]), cache=cache, max_new_tokens=new,
                             eos_token_id=[])
        reread_s = time.perf_counter() - t0
        same = list(again.token_ids[0]) == ids[len(ids) - stats.new_tokens:]
        rows.append({"turn": k + 1, "history_tokens": len(history), "reuse_read": stats.tokens_read,
                     "reread_read": len(history) + again.stats.decode_steps, "reuse_ms": 1000 * reuse_s,
                     "reread_ms": 1000 * reread_s, "ratio": reread_s / reuse_s, "same_reply": same})
    return {"turns": turns, "new_tokens": new, "message_tokens": message, "cache": cache,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = ["| turn | history tokens | read: reuse | read: re-read | ms: reuse | ms: re-read "
             "| re-read / reuse |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['turn']} | {r['history_tokens']:,} | {r['reuse_read']:,} | "
                     f"{r['reread_read']:,} | {r['reuse_ms']:.0f} | {r['reread_ms']:.0f} | "
                     f"{r['ratio']:.2f}x |")
    rows = result["rows"]
    first, last = rows[: len(rows) // 4 or 1], rows[-(len(rows) // 4 or 1):]
    lines.append("")
    lines.append(f"median ms, first quarter of turns -> last quarter: reuse "
                 f"{statistics.median(r['reuse_ms'] for r in first):.0f} -> "
                 f"{statistics.median(r['reuse_ms'] for r in last):.0f}, re-read "
                 f"{statistics.median(r['reread_ms'] for r in first):.0f} -> "
                 f"{statistics.median(r['reread_ms'] for r in last):.0f}; same reply both ways at "
                 f"{sum(r['same_reply'] for r in rows)}/{len(rows)} turns")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--new", type=int, default=16, help="Reply tokens per turn.")
    parser.add_argument("--message", type=int, default=48, help="About this many tokens per user message.")
    parser.add_argument("--cache", default="dynamic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/chat_turns.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.turns, args.new, args.message, args.cache, args.seed)
    print(table(result))
    write_text_atomic(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
