"""Log-likelihood of continuations through a cache built from a spec (what evaluation harnesses score).

The context is prefilled exactly as :func:`kvcache.generate` prefills a prompt (left-padded batch, chunks,
the retention policy compressing at the end of the prefill); then the continuation is fed one token per step
through that (compressed) cache, the policy evicting between steps as it does while generating. Each token is
scored from the logits of the step before it, so a continuation's score is what greedy generation would have
seen had it produced those tokens, and ``is_greedy`` says whether it would have. With the full cache the
scores equal one forward pass over ``context + continuation`` without a cache (up to float rounding).

The loop is the decode driver itself (:func:`kvcache.decoding.decode`) with the token choice replaced by the
continuation's next token, so generation and scoring can never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvcache import validate
from kvcache.errors import CacheCapacityError
from kvcache.generation import _generate_ids
from kvcache.prompts import special_tokens
from kvcache.spec import CacheSpec
from kvcache.stopping import StopChecker

__all__ = ["ContinuationScore", "score_continuations"]


@dataclass(frozen=True)
class ContinuationScore:
    """The score of one continuation given its context.

    Attributes
    ----------
    logprob:
        Sum of the natural-log probabilities of the continuation's tokens.
    is_greedy:
        Whether every continuation token was the argmax of its step (greedy decoding would produce it).
    token_logprobs:
        The per-token log probabilities, in order.
    """

    logprob: float
    is_greedy: bool
    token_logprobs: tuple[float, ...]


class _ForcedTokens:
    """Stands in for the sampler of the decode driver: at step ``i`` it "chooses" the continuation's ``i``-th
    token and records its log probability and whether it was the argmax.

    Parameters
    ----------
    tokens:
        ``(B, N)`` continuation ids, right-padded (the padding is fed but never scored).
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.step = 0
        self.logprobs: list[torch.Tensor] = []  # N entries of (B,)
        self.greedy: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        token = self.tokens[:, self.step].to(logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.logprobs.append(logp.gather(1, token[:, None])[:, 0])
        self.greedy.append(logits.argmax(dim=-1) == token)
        self.step += 1
        return token


def score_continuations(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    cache: str | CacheSpec = "dynamic",
    prefill_chunk_size: int = 512,
) -> list[ContinuationScore]:
    """Score each continuation given its context, as one left-padded batch through a cache from ``cache``.

    Parameters
    ----------
    model:
        A Hugging Face causal LM.
    tokenizer:
        Its tokenizer (used only for the pad token and by the decode driver's bookkeeping).
    contexts:
        ``B`` token-id lists, each at least one token (special tokens included as the model expects them,
        e.g. a leading BOS).
    continuations:
        ``B`` token-id lists to score, each at least one token.
    cache:
        Cache spec, e.g. ``"dynamic"`` or ``"keyformer:budget=0.5"``: its policy compresses the context, and
        keeps its budget while the continuation is fed.
    prefill_chunk_size:
        Context tokens per prefill forward.

    Returns
    -------
    list[ContinuationScore]
        One per row, in order.

    Raises
    ------
    ValueError
        Mismatched or empty inputs.
    CacheCapacityError
        A fixed-capacity layout cannot hold the context and the continuation.
    """
    validate.check_model(model, tokenizer)
    if len(contexts) != len(continuations) or not contexts:
        raise ValueError(f"give one continuation per context (and at least one pair), got {len(contexts)} "
                         f"contexts and {len(continuations)} continuations")
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(f"pair {i} has an empty context or continuation; each needs at least one token "
                             "(start an empty context with the BOS token)")
    validate.check_int("prefill_chunk_size", prefill_chunk_size, minimum=1)
    spec = CacheSpec.parse(cache)
    _, pad_id = special_tokens([], tokenizer, getattr(model, "generation_config", None), model.config)

    batch, width, steps = len(contexts), max(map(len, contexts)), max(map(len, continuations))
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    forced = torch.full((batch, steps), pad_id, dtype=torch.long)
    for row, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        input_ids[row, width - len(ctx):] = torch.tensor(list(ctx), dtype=torch.long)
        mask[row, width - len(ctx):] = 1
        forced[row, :len(cont)] = torch.tensor(list(cont), dtype=torch.long)
    vocab = model.get_input_embeddings().num_embeddings
    largest = max(int(input_ids.max()), int(forced.max()))
    if largest >= vocab:
        raise ValueError(f"token id {largest} is outside the model's vocabulary of {vocab}; use the "
                         "model's own tokenizer")

    chooser = _ForcedTokens(forced)
    # Never stop on a token: every continuation token is fed, whatever it is.
    _generate_ids(model, input_ids, mask, spec=spec, max_new_tokens=steps, sampler=chooser,  # type: ignore[arg-type]
                  checker=StopChecker(tokenizer, []), pad_id=pad_id, seed=None,
                  prefill_chunk_size=prefill_chunk_size, hooks=None, progress=False)
    if chooser.step != steps:
        raise CacheCapacityError(
            f"the cache '{spec}' filled up after {chooser.step} of {steps} continuation tokens; raise "
            "static:capacity (it must hold the context and the continuation) or use a dynamic layout")
    logprobs = torch.stack(chooser.logprobs, dim=1).cpu()  # (B, N)
    greedy = torch.stack(chooser.greedy, dim=1).cpu()
    out = []
    for row, cont in enumerate(continuations):
        n = len(cont)
        token_lp = tuple(float(x) for x in logprobs[row, :n])
        out.append(ContinuationScore(sum(token_lp), bool(greedy[row, :n].all()), token_lp))
    return out
