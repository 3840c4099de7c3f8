"""The bench's conversation task with more conversations, and where each policy loses the pass key.

The conversations are ``kvcache bench --tasks conversation``'s (the same generator, seeds and sizes: a pass
key in the first turn, filler turns, the question last; the first 20 are the bench's); each runs through
:func:`kvcache.bench.conversation.converse` with the bundled model: turn by turn with the cache carried
(:class:`kvcache.Chat`), then its history re-read at once into a fresh cache of the same spec. After every
turn of the carried run, the share of the pass key's tokens (both mentions, every layer and KV head) the
cache still holds is recorded, so a policy's losses can be traced to the turn that made them.

Printed: one row per spec (accuracy carried / re-read, tokens held / seen after the last turn, the key's
share held after each turn); written: ``--out`` JSON.

    python benchmarks/conversation_retention.py --n 40 --threads 1 \\
        --specs full h2o:budget=0.5 snapkv:budget=0.5 keydiff:budget=0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from kvcache.bench.conversation import converse, score_conversation
from kvcache.bench.prompts import PromptSettings, build_jobs, build_prompts
from kvcache.bench.tasks import PASSKEY_INTRO
from kvcache.files import write_text_atomic
from kvcache.models import load


def key_positions(tokenizer: Any, ids: list[int], key: str) -> torch.Tensor:
    """Positions of the tokens that spell the pass key in the first turn (after the introduction)."""
    start = len(tokenizer(PASSKEY_INTRO)["input_ids"])
    out = []
    for p in range(start, len(ids)):
        text = tokenizer.decode([ids[p]]).strip()
        if text and text.isdigit() and text in key:
            out.append(p)
    return torch.tensor(out, dtype=torch.long)


def held_share(chat: Any, positions: torch.Tensor) -> float:
    """Share of ``positions`` held, over every layer and KV head of the (batch-1) cache."""
    shares = []
    for store in chat.cache.stores:
        held = store.positions[0, :, : store.physical_length].to(torch.long)  # (H_kv, T)
        shares.append((held[:, :, None] == positions).any(dim=1).to(torch.float32).mean())
    return float(torch.stack(shares).mean())


def run(specs: list[str], n: int, turns: int, turn_tokens: int) -> dict[str, Any]:
    model, tokenizer = load("default")
    settings = PromptSettings(conversation_n=n, conversation_turns=turns,
                              conversation_turn_tokens=turn_tokens)
    prompts = build_prompts(tokenizer, settings, ["conversation"])
    job = build_jobs(prompts, ["conversation"], 1)["conversation"]
    eos = model.generation_config.eos_token_id
    eos = [tokenizer.eos_token_id if eos is None else eos]
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        outputs, traces = [], []
        for conversation in job["conversations"]:
            trace: list[float] = []
            state: dict[str, torch.Tensor] = {}

            def on_turn(chat: Any, trace: list[float] = trace, state: dict[str, torch.Tensor] = state,
                        key: str = conversation["answer"].strip()) -> None:
                if "key" not in state:  # after the first turn: the key's positions in what was read
                    state["key"] = key_positions(tokenizer, chat.token_ids, key)
                trace.append(held_share(chat, state["key"]))

            outputs.append([converse(model, tokenizer, spec, conversation, job, eos, on_turn=on_turn)])
            traces.append(trace)
        scored = score_conversation(outputs, job["conversations"], tokenizer)
        per_turn = [sum(t[k] for t in traces) / len(traces) for k in range(turns)]
        details = scored["details"]
        row = {"spec": spec, "n": len(outputs), "carried": scored["score"],
               "reread": details["reread_accuracy"], "tokens_held": details["tokens_held"],
               "tokens_seen": details["tokens_seen"], "key_held_per_turn": per_turn,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{spec:<40} carried {row['carried']:6.1%}  re-read {row['reread']:6.1%}  "
              f"held {row['tokens_held']}/{row['tokens_seen']}  key held per turn: "
              + " ".join(f"{x:4.0%}" for x in per_turn), flush=True)
    return {"n": n, "turns": turns, "turn_tokens": turn_tokens, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=["full", "h2o:budget=0.5", "snapkv:budget=0.5",
                                                       "keydiff:budget=0.5", "diffsnap:budget=0.5",
                                                       "streaming:budget=0.5", "keyformer:budget=0.5"])
    parser.add_argument("--n", type=int, default=40, help="conversations per spec")
    parser.add_argument("--turns", type=int, default=PromptSettings.conversation_turns)
    parser.add_argument("--turn-tokens", type=int, default=PromptSettings.conversation_turn_tokens)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("conversation_retention.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.specs, args.n, args.turns, args.turn_tokens)
    result["command"] = "python benchmarks/conversation_retention.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items())
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
