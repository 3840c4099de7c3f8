"""Task accuracy through kvcache's own caches: what the model card and the bench both measure with.

``scripts/eval_default_model.py`` (the model card) calls these with the full cache; the bench runs the same
examples (:func:`kvcache.bench.prompts.retrieval_examples`) through every cache spec and peer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kvcache.bench.tasks import TaskExample, is_correct


def greedy_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, cache: str = "dynamic",
                 max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``prompts`` with :func:`kvcache.generate` and a cache built from ``cache``,
    ``batch_size`` prompts per left-padded batch."""
    from kvcache.generation import generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        result = generate(model, tokenizer, list(prompts[i:i + batch_size]), cache=cache,
                          max_new_tokens=max_new_tokens, progress=False)
        out += result.texts
    return out


def retrieval_accuracy(model: Any, tokenizer: Any, examples: Sequence[TaskExample], *, cache: str = "dynamic",
                       batch_size: int = 8, max_new_tokens: int = 8) -> tuple[list[bool], float]:
    """Whether each example is answered right (:func:`kvcache.bench.tasks.is_correct`), and the mean prompt
    length in tokens (with BOS)."""
    answers = greedy_texts(model, tokenizer, [e.prompt for e in examples], cache=cache,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    lengths = [len(tokenizer(e.prompt)["input_ids"]) for e in examples]
    ok = [is_correct(e, a) for e, a in zip(examples, answers, strict=True)]
    return ok, sum(lengths) / max(1, len(lengths))


@torch.no_grad()
def heldout_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], seq_len: int) -> dict[str, Any]:
    """Token-level perplexity of ``texts`` (joined with EOS) in non-overlapping windows of ``seq_len`` tokens,
    each scored in one forward pass without a cache (the model card's number).

    Returns ``{"perplexity", "tokens", "window"}``.
    """
    device = next(model.parameters()).device
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    nll, count = 0.0, 0
    for i in range(0, len(stream) - 1, seq_len):
        ids = torch.tensor([stream[i:i + seq_len + 1]], device=device)
        if ids.shape[1] < 2:
            break
        logits = model(input_ids=ids[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return {"perplexity": round(math.exp(nll / count), 3), "tokens": count, "window": seq_len}
