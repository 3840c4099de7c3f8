"""The benchmark's inputs, built fresh and deterministically from the shipped held-out data.

Retrieval prompts come from :mod:`kvcache.bench.tasks` with seeds from :data:`EVAL_SEED_BASE` upward (never a
training seed) and filler sentences from the held-out prose split; perplexity windows are the held-out prose
itself; continuation prefixes are the held-out documents. Everything is tokenized once here, so every system
(kvcache's caches, transformers' caches, a peer in a side environment) sees exactly the same token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache.bench.tasks import EVAL_SEED_BASE, Filler, TaskExample, make_task
from kvcache.models.corpus import Document, load_eval_split, prose_paragraphs, split_sentences

#: passkey depths, cycled over the prompts of one context (the needle at the start, ..., at the end)
DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def example_seed(kind: str, context_index: int, i: int) -> int:
    """The evaluation seed of the ``i``-th example of ``kind`` at the ``context_index``-th context.

    The same layout as the model card's evaluation, so the card and the bench score the same prompts.
    """
    return EVAL_SEED_BASE + context_index * 100_000 + i + 10_000 * len(kind)


def default_eval_dir() -> Path:
    """Where the bundled model's held-out splits ship (``prose.jsonl``, ``documents.jsonl``)."""
    from kvcache.models import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR / "eval"


def prose_filler(prose: Sequence[Document], tokenizer: Any) -> Filler:
    """A :class:`Filler` of the held-out prose sentences, counted with ``tokenizer`` (no special tokens)."""
    sentences = [s for d in prose for p in prose_paragraphs(d.text) for s in split_sentences(p)]

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return Filler(sentences, count)


def retrieval_examples(kind: str, filler: Filler, contexts: Sequence[int], n: int) -> list[TaskExample]:
    """``n`` fresh examples of ``kind`` per context, context after context; the depth of the needle (or of the
    queried key-value line) cycles through :data:`DEPTHS`."""
    out: list[TaskExample] = []
    for ci, ctx in enumerate(contexts):
        for i in range(n):
            depth = DEPTHS[i % len(DEPTHS)]
            out.append(make_task(kind, filler, ctx, depth=depth, seed=example_seed(kind, ci, i)))
    return out


@dataclass
class BenchPrompts:
    """Everything a benchmark run feeds the systems, as token ids (JSON-ready through :meth:`to_json`).

    Attributes
    ----------
    retrieval:
        Task name (``passkey``, ``needles``, ``kv``) -> examples with their prompt and its token ids
        (``{"text", "ids", "answer", "context", "depth", "seed"}``).
    ppl:
        Token windows of held-out prose; the first ``ppl_prefix`` tokens of each are prefilled, every later
        token is fed one at a time through the cache and scored.
    consistency:
        Prompts (``{"text", "ids"}``: held-out document beginnings) continued greedily for
        ``consistency_new_tokens``.
    speed:
        Prompts (``{"text", "ids"}``) at each context length of the speed sweep.
    """

    retrieval: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ppl: list[list[int]] = field(default_factory=list)
    ppl_prefix: int = 0
    consistency: list[dict[str, Any]] = field(default_factory=list)
    consistency_new_tokens: int = 0
    speed: list[dict[str, Any]] = field(default_factory=list)
    speed_new_tokens: int = 0
    conversation: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"retrieval": self.retrieval, "ppl": self.ppl, "ppl_prefix": self.ppl_prefix,
                "consistency": self.consistency, "consistency_new_tokens": self.consistency_new_tokens,
                "speed": self.speed, "speed_new_tokens": self.speed_new_tokens,
                "conversation": self.conversation}


@dataclass(frozen=True)
class PromptSettings:
    """Sizes of a run's inputs (see :class:`BenchPrompts`); ``quick`` picks the smoke-run sizes."""

    passkey_contexts: tuple[int, ...] = (1024,)
    passkey_n: int = 100
    needles_contexts: tuple[int, ...] = (1024,)
    needles_n: int = 50
    kv_contexts: tuple[int, ...] = (512,)
    kv_n: int = 50
    ppl_windows: int = 4
    ppl_window: int = 512
    ppl_prefix: int = 256
    consistency_docs: int = 12
    consistency_prefix: int = 384
    consistency_new_tokens: int = 64
    speed_contexts: tuple[int, ...] = (256, 512, 1024, 2048)
    speed_new_tokens: int = 32
    conversation_n: int = 20
    conversation_turns: int = 6
    conversation_turn_tokens: int = 96
    conversation_reply_tokens: int = 8

    @classmethod
    def quick(cls) -> PromptSettings:
        return cls(passkey_contexts=(512,), passkey_n=10, needles_contexts=(512,), needles_n=10,
                   kv_contexts=(256,), kv_n=5, ppl_windows=2, ppl_window=256, ppl_prefix=128,
                   consistency_docs=3, consistency_prefix=192, consistency_new_tokens=24,
                   speed_contexts=(256, 512), speed_new_tokens=8, conversation_n=4, conversation_turns=4,
                   conversation_turn_tokens=64)


#: bench task name -> tasks.py kind
RETRIEVAL_KINDS: dict[str, str] = {"passkey": "passkey", "needles": "multi_needle", "kv": "kv"}


def build_prompts(tokenizer: Any, settings: PromptSettings, tasks: Sequence[str],
                  eval_dir: Path | None = None, max_positions: int | None = None) -> BenchPrompts:
    """Build (deterministically) the inputs of ``tasks`` for ``tokenizer``.

    Contexts above ``max_positions`` (the model's context length) are left out.
    """
    eval_dir = eval_dir or default_eval_dir()
    prose = load_eval_split(eval_dir / "prose.jsonl")
    out = BenchPrompts()

    def fits(contexts: Sequence[int]) -> list[int]:
        return [c for c in contexts if max_positions is None or c <= max_positions]

    needs_filler = any(t in RETRIEVAL_KINDS or t == "conversation" for t in tasks)
    filler = prose_filler(prose, tokenizer) if needs_filler else None
    for task, kind in RETRIEVAL_KINDS.items():
        if task not in tasks or filler is None:
            continue
        contexts = fits(getattr(settings, f"{task}_contexts"))
        examples = retrieval_examples(kind, filler, contexts, getattr(settings, f"{task}_n"))
        out.retrieval[task] = [
            {"text": e.prompt, "ids": tokenizer(e.prompt)["input_ids"], "answer": e.answer,
             "context": e.context_tokens, "depth": e.depth, "seed": e.seed} for e in examples]
    if "conversation" in tasks and filler is not None:
        from kvcache.bench.conversation import conversation_examples

        out.conversation = conversation_examples(filler, settings.conversation_n, settings.conversation_turns,
                                                 settings.conversation_turn_tokens,
                                                 example_seed("conversation", 0, 0))
    if "ppl" in tasks:
        stream: list[int] = []
        for d in prose:
            stream += tokenizer(d.text)["input_ids"] + [tokenizer.eos_token_id]
        w = settings.ppl_window
        out.ppl = [stream[i * w:(i + 1) * w] for i in range(min(settings.ppl_windows, len(stream) // w))]
        out.ppl_prefix = settings.ppl_prefix
    if "consistency" in tasks:
        docs = load_eval_split(eval_dir / "documents.jsonl")
        for d in docs[:settings.consistency_docs]:
            ids = tokenizer(d.text)["input_ids"][:settings.consistency_prefix]
            out.consistency.append(_text_prompt(tokenizer, tokenizer.decode(ids, skip_special_tokens=True)))
        out.consistency_new_tokens = settings.consistency_new_tokens
    if "speed" in tasks:
        if filler is None:
            filler = prose_filler(prose, tokenizer)
        for ci, ctx in enumerate(fits(settings.speed_contexts)):
            ex = make_task("passkey", filler, ctx - settings.speed_new_tokens, depth=0.5,
                           seed=example_seed("speed", ci, 0))
            out.speed.append(_text_prompt(tokenizer, ex.prompt))
        out.speed_new_tokens = settings.speed_new_tokens
    return out


def _text_prompt(tokenizer: Any, text: str) -> dict[str, Any]:
    """A prompt as text and the ids the tokenizer gives it (so a text-taking API sees the same ids)."""
    return {"text": text, "ids": tokenizer(text)["input_ids"]}


#: new tokens of each filler turn's reply in the conversation task
CONVERSATION_REPLY_TOKENS = 8

#: max new tokens of a retrieval answer (a 5-digit number is 5 tokens; EOS ends it earlier)
ANSWER_TOKENS = 8


def build_jobs(prompts: BenchPrompts, tasks: Sequence[str], speed_repeats: int) -> dict[str, dict[str, Any]]:
    """One job (see :mod:`kvcache.bench.contract`) per task of ``tasks``."""
    jobs: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task in RETRIEVAL_KINDS:
            jobs[task] = {"task": task, "mode": "generate", "max_new_tokens": ANSWER_TOKENS, "repeats": 1,
                          "ignore_eos": False,
                          "prompts": [{"text": e["text"], "ids": e["ids"]} for e in prompts.retrieval[task]]}
        elif task == "consistency":
            jobs[task] = {"task": task, "mode": "generate", "max_new_tokens": prompts.consistency_new_tokens,
                          "repeats": 1, "ignore_eos": False, "prompts": prompts.consistency}
        elif task == "speed":
            jobs[task] = {"task": task, "mode": "generate", "max_new_tokens": prompts.speed_new_tokens,
                          "repeats": speed_repeats, "ignore_eos": True, "prompts": prompts.speed}
        elif task == "conversation":
            jobs[task] = {"task": task, "mode": "conversation", "max_new_tokens": ANSWER_TOKENS,
                          "filler_new_tokens": CONVERSATION_REPLY_TOKENS, "max_cache_len": 8192,
                          "ignore_eos": False, "conversations": prompts.conversation}
        elif task == "ppl":
            jobs[task] = {"task": task, "mode": "stream", "windows": prompts.ppl,
                          "prefix": prompts.ppl_prefix}
        else:
            raise ValueError(f"unknown bench task {task!r}; choose from: {', '.join(TASKS)}")
    return jobs


#: every bench task, in report order
TASKS: tuple[str, ...] = ("passkey", "needles", "kv", "ppl", "consistency", "conversation", "speed")
