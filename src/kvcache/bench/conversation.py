"""The conversation task: a pass key given in the first turn, filler turns, the question in the last.

Each conversation is fed turn by turn through a :class:`kvcache.Chat` (the cache carried across turns, a
retention policy selecting again at every turn) and, for comparison, the same history (the model's own
replies included) is re-read at the last turn into a fresh cache of the same spec. The ``full`` row of the
bench is the reference: re-reading the whole history with a full cache. Turns are plain text that the
conversation continues (no ``User:``/``Assistant:`` wrapping), the format the bundled model was trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from kvcache.bench.tasks import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, Filler, _key
from kvcache.chat_format import TurnFormat

__all__ = ["ContinuationFormat", "conversation_examples", "converse", "run_conversation_job"]


class ContinuationFormat(TurnFormat):
    """Turns are text appended as is (each after a space): the conversation is one growing document."""

    stop: tuple[str, ...] = ()
    name = "continuation"

    def system(self, text: str) -> str:
        return text

    def user(self, messages: list[dict[str, str]], text: str) -> str:
        return text if not messages else " " + text


def conversation_examples(filler: Filler, n: int, turns: int, turn_tokens: int,
                          seed: int) -> list[dict[str, Any]]:
    """``n`` conversations of ``turns`` turns: the pass key first, ``turns - 2`` filler turns of about
    ``turn_tokens`` tokens each, the question last (``{"turns": [...], "answer": " 12345", "seed"}``)."""
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        key = _key(rng)
        first = f"{PASSKEY_INTRO} {PASSKEY_NEEDLE.format(key=key)}"
        middle = [" ".join(filler.take(rng, turn_tokens)[0]) for _ in range(max(0, turns - 2))]
        out.append({"turns": [first, *middle, PASSKEY_QUESTION.lstrip("\n")], "answer": f" {key}",
                    "seed": seed + i})
    return out


def converse(model: Any, tokenizer: Any, spec: Any, conversation: dict[str, Any], job: dict[str, Any],
             eos: list[int], on_turn: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run one conversation with the cache carried, then re-read its history into a fresh cache.

    ``on_turn`` is called with the :class:`~kvcache.chat.Chat` after each turn (to inspect its cache).

    Returns
    -------
    dict
        ``token_ids`` (the last reply, cache carried), ``reread_token_ids`` (the same turn after re-reading
        the history), ``tokens_read`` (all turns, cache carried) against ``reread_tokens`` (what re-reading
        the history at every turn would read), ``cache_bytes``/``tokens_held`` after the last turn, and the
        timings of the last turn both ways.
    """
    import torch

    from kvcache.chat import Chat
    from kvcache.generation import generate_ids

    chat = Chat(model, tokenizer, spec, max_new_tokens=job["filler_new_tokens"], stop=[], eos_token_id=eos,
                max_cache_len=job["max_cache_len"])
    chat.format = ContinuationFormat()
    turns = conversation["turns"]
    for k, text in enumerate(turns):
        chat.send(text, max_new_tokens=job["max_new_tokens"] if k == len(turns) - 1 else None)
        if on_turn is not None:
            on_turn(chat)
    last = chat.stats[-1]
    ids = chat.token_ids
    history = ids[: len(ids) - last.new_tokens]
    again = generate_ids(model, tokenizer, torch.tensor([history]), cache=spec,
                         max_new_tokens=job["max_new_tokens"], eos_token_id=eos)
    # Re-reading at every turn reads each turn's whole history (its prompt and reply so far).
    seen_before = [s.tokens_seen - s.tokens_read for s in chat.stats]
    return {"token_ids": ids[len(ids) - last.new_tokens:], "reread_token_ids": list(again.token_ids[0]),
            "tokens_read": chat.tokens_read, "reread_tokens": sum(b + s.tokens_read
                                                                  for b, s in zip(seen_before, chat.stats,
                                                                                  strict=True)),
            "tokens_held": last.tokens_held, "tokens_seen": last.tokens_seen, "cache_bytes": last.cache_bytes,
            "last_turn_s": last.prefill_seconds + last.decode_seconds,
            "reread_last_turn_s": again.stats.prefill_seconds + again.stats.decode_seconds}


def run_conversation_job(job: dict[str, Any], system: str, run: Any, meter: Any,
                         advance: Any = None) -> dict[str, Any]:
    """The record of one system on the conversation job (``outputs``: one ``[converse(...)]`` each)."""
    import time

    from kvcache.bench.contract import CONTRACT_VERSION

    outputs = []
    t0 = time.perf_counter()
    with meter() as m:
        for conversation in job["conversations"]:
            outputs.append([run(conversation, job)])
            if advance:
                advance()
    return {"contract": CONTRACT_VERSION, "system": system, "task": job["task"], "available": True,
            "reason": None, "outputs": outputs, "rss_before_bytes": m.before, "peak_rss_bytes": m.peak,
            "wall_s": time.perf_counter() - t0, "versions": {}}


def score_conversation(outputs: list[list[dict[str, Any]]], examples: list[dict[str, Any]],
                       tokenizer: Any) -> dict[str, Any]:
    """Accuracy with the cache carried (``score``) and re-reading the history (``details``)."""
    from kvcache.bench.metrics import answer_correct

    def accuracy(key: str) -> float | None:
        ok = [answer_correct(e["answer"], tokenizer.decode(o[0][key], skip_special_tokens=True))
              for e, o in zip(examples, outputs, strict=True)]
        return sum(ok) / len(ok) if ok else None

    gens = [o[0] for o in outputs]
    n = max(1, len(gens))
    return {"score": accuracy("token_ids"), "n": len(gens),
            "cache_bytes": round(sum(g["cache_bytes"] for g in gens) / n),
            "peak_cache_bytes": max((g["cache_bytes"] for g in gens), default=None),
            "details": {"reread_accuracy": accuracy("reread_token_ids"),
                        "tokens_read": sum(g["tokens_read"] for g in gens),
                        "reread_tokens": sum(g["reread_tokens"] for g in gens),
                        "tokens_held": round(sum(g["tokens_held"] for g in gens) / n),
                        "tokens_seen": round(sum(g["tokens_seen"] for g in gens) / n),
                        "last_turn_s": sum(g["last_turn_s"] for g in gens) / n,
                        "reread_last_turn_s": sum(g["reread_last_turn_s"] for g in gens) / n}}
