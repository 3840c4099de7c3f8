"""Turn a system's record (see :mod:`kvcache.bench.contract`) into one scored row."""

from __future__ import annotations

import statistics
from typing import Any

from kvcache.bench.metrics import answer_correct, perplexity, prefix_agreement, rouge_l, spread

#: task -> (name of its score, True when higher is better)
SCORE_NAMES: dict[str, tuple[str, bool]] = {
    "passkey": ("accuracy", True), "needles": ("accuracy", True), "kv": ("accuracy", True),
    "ppl": ("perplexity", False), "consistency": ("rouge_l", True), "speed": ("decode_ms_per_token", False),
    "conversation": ("accuracy", True),
}


def _speeds(outputs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    gens = [g for per in outputs for g in per]
    prefill_s = sum(g["prefill_s"] for g in gens)
    decode_s = sum(g["decode_s"] for g in gens)
    steps = sum(g["decode_steps"] for g in gens)
    per_token = [1000 * g["decode_s"] / g["decode_steps"] for g in gens if g["decode_steps"]]
    return {"prefill_tok_s": sum(g["prompt_tokens"] for g in gens) / prefill_s if prefill_s > 0 else None,
            "decode_tok_s": steps / decode_s if decode_s > 0 and steps else None,
            "decode_ms_per_token": spread(per_token),
            "cache_bytes": round(statistics.mean(g["cache_bytes"] for g in gens)) if gens else None,
            "peak_cache_bytes": max((g["peak_cache_bytes"] for g in gens), default=None)}


def score_record(record: dict[str, Any], job: dict[str, Any], tokenizer: Any,
                 examples: list[dict[str, Any]] | None = None,
                 reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``record`` (one system, one task).

    Parameters
    ----------
    examples:
        Retrieval tasks: the examples (``answer``, ``context``, ``depth``) in job order.
    reference:
        Consistency: the full cache's record of the same job (the outputs compared against).

    Returns
    -------
    dict
        ``score`` (see :data:`SCORE_NAMES`), ``n``, speeds and cache bytes, ``peak_rss_bytes``,
        ``rss_delta_bytes`` and task ``details``; ``available: False`` with the ``reason`` when the
        system could not run.
    """
    task = job["task"]
    name, higher = SCORE_NAMES[task]
    row: dict[str, Any] = {"task": task, "score_name": name, "higher_is_better": higher,
                           "available": bool(record["available"]), "reason": record.get("reason")}
    if not record["available"]:
        return row
    outputs = record["outputs"]
    row.update(peak_rss_bytes=record["peak_rss_bytes"],
               rss_delta_bytes=record["peak_rss_bytes"] - record["rss_before_bytes"], wall_s=record["wall_s"],
               versions=record.get("versions", {}))
    details: dict[str, Any] = {}
    if job["mode"] == "conversation":
        from kvcache.bench.conversation import score_conversation

        row.update(score_conversation(outputs, job["conversations"], tokenizer))
        return row
    if job["mode"] == "stream":
        nll = sum(o[0]["nll"] for o in outputs)
        tokens = sum(o[0]["tokens"] for o in outputs)
        per_window_ms = [1000 * o[0]["seconds"] / o[0]["tokens"] for o in outputs]
        row.update(score=perplexity(nll, tokens), n=tokens, decode_ms_per_token=spread(per_window_ms),
                   cache_bytes=round(statistics.mean(o[0]["cache_bytes"] for o in outputs)))
        row["details"] = {"windows": len(outputs), "prefix": job["prefix"]}
        return row
    row.update(_speeds(outputs))
    row["n"] = len(outputs)
    texts = [tokenizer.decode(per[0]["token_ids"], skip_special_tokens=True) for per in outputs]
    if task in ("passkey", "needles", "kv"):
        if examples is None:
            raise ValueError(f"scoring {task} needs its examples (answers)")
        ok = [answer_correct(e["answer"], t) for e, t in zip(examples, texts, strict=True)]
        row["score"] = sum(ok) / len(ok) if ok else None
        groups: dict[str, list[bool]] = {}
        for e, o in zip(examples, ok, strict=True):
            groups.setdefault(f"{e['context']}", []).append(o)
            if e.get("depth") is not None and task == "passkey":
                groups.setdefault(f"{e['context']}@depth {e['depth']:g}", []).append(o)
        details["accuracy_by"] = {k: sum(v) / len(v) for k, v in groups.items()}
        details["samples"] = [{"answer": e["answer"], "generated": t} for e, t in list(zip(examples, texts,
                                                                                            strict=True))[:5]]
    elif task == "consistency":
        if reference is None or not reference.get("available"):
            raise ValueError("scoring consistency needs the full cache's record of the same prompts")
        ref_ids = [per[0]["token_ids"] for per in reference["outputs"]]
        ref_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ref_ids]
        rouge = [rouge_l(r, t) for r, t in zip(ref_texts, texts, strict=True)]
        prefix = [prefix_agreement(r, per[0]["token_ids"]) for r, per in zip(ref_ids, outputs, strict=True)]
        row["score"] = statistics.mean(rouge) if rouge else None
        details.update(rouge_l=spread(rouge), prefix_agreement=statistics.mean(prefix) if prefix else None,
                       exact=sum(p == 1.0 for p in prefix))
        row["prefix_agreement"] = details["prefix_agreement"]
    elif task == "speed":
        by_context = []
        for prompt, per in zip(job["prompts"], outputs, strict=True):
            ms = [1000 * g["decode_s"] / g["decode_steps"] for g in per if g["decode_steps"]]
            by_context.append({"context": len(prompt["ids"]), "decode_ms_per_token": spread(ms),
                               "cache_bytes": per[-1]["cache_bytes"],
                               "peak_cache_bytes": max(g["peak_cache_bytes"] for g in per)})
        details["by_context"] = by_context
        row["score"] = row["decode_ms_per_token"]["median"]
    row["details"] = details
    return row
