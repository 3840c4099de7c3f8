"""Synthetic long-context tasks: passkey retrieval, key-value retrieval and multi-needle retrieval.

Each generator returns a :class:`TaskExample`: a prompt whose correct continuation is ``answer`` (a space and
a number), built to a target context length in tokens. Everything is a pure function of ``seed``, so the
same call gives the same example on every machine; training uses seeds from :data:`TRAIN_SEED_BASE` upward,
evaluation from :data:`EVAL_SEED_BASE` upward, so evaluation prompts are never training examples.

Lengths are counted with the caller's tokenizer through a :class:`Filler` (sentences with their token
counts), so a prompt of ``context_tokens=1024`` is within a few tokens of 1024 tokens for that tokenizer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: seeds below this are training examples; evaluation uses seeds from EVAL_SEED_BASE upward
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000_000

TASK_KINDS: tuple[str, ...] = ("passkey", "kv", "multi_needle")

#: the haystack of the original passkey test (Mohtashami & Jaggi, 2023), for a prose-free filler
REPEAT_SENTENCES: tuple[str, ...] = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

KV_INTRO = "Here is a list of keys and their values. Remember them."
KV_LINE = "\nkey {name}: {value}"
KV_QUESTION = "\nWhat is the value of key {name}? The value of key {name} is"

NEEDLE_INTRO = ("Several pass keys are hidden inside a lot of irrelevant text, one for each door. "
                "Find them and memorize them.")
NEEDLE = "The pass key for the {door} door is {key}. Remember it. {key} is the pass key for the {door} door."
NEEDLE_QUESTION = "\nWhat is the pass key for the {door} door? The pass key for the {door} door is"
DOORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "silver",
                          "golden", "brown", "gray")

_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
_NUMBER = re.compile(r"\s*(\d+)")


@dataclass(frozen=True)
class TaskExample:
    """One synthetic retrieval example.

    Attributes
    ----------
    kind:
        ``"passkey"``, ``"kv"`` or ``"multi_needle"``.
    prompt:
        The text to continue (no special tokens).
    answer:
        The correct continuation: a space and the number, e.g. ``" 48213"``.
    context_tokens:
        The target prompt length in tokens the example was built for.
    depth:
        Where the needle sits in the filler, 0 (start) to 1 (end); ``None`` for key-value retrieval.
    seed:
        The seed that produced it.
    filler_spans:
        ``(start, end)`` character spans of the prompt that are filler (each with its leading space), so a
        trainer can leave them out of the loss; everything else is task text.
    """

    kind: str
    prompt: str
    answer: str
    context_tokens: int
    depth: float | None
    seed: int
    meta: dict[str, object] = field(default_factory=dict)
    filler_spans: tuple[tuple[int, int], ...] = ()


class Filler:
    """Haystack sentences, in reading order, with their token counts.

    Parameters
    ----------
    sentences:
        The sentences; a filler run takes consecutive sentences from a random start (wrapping around),
        so it reads as coherent prose.
    count_tokens:
        Counts the tokens of a list of texts (e.g. ``lambda xs: [len(e.ids) for e in tok.encode_batch(xs)]``,
        without special tokens). Used once here for the sentences, then for the few template pieces.
    """

    def __init__(self, sentences: Sequence[str], count_tokens: Callable[[list[str]], list[int]]) -> None:
        if not sentences:
            raise ValueError("Filler needs at least one sentence")
        self.sentences = list(sentences)
        self._count_many = count_tokens
        # a sentence is joined with a leading space, which is how it is counted
        self.lengths = count_tokens([" " + s for s in self.sentences])
        self._memo: dict[str, int] = {}

    @classmethod
    def repeat(cls, count_tokens: Callable[[list[str]], list[int]]) -> Filler:
        """The original passkey haystack (five fixed sentences repeated)."""
        return cls(REPEAT_SENTENCES, count_tokens)

    def count(self, text: str) -> int:
        """Token count of a template piece (memoised: the pieces repeat with different numbers)."""
        shape = re.sub(r"\d", "0", text)  # digits are single tokens, so the count depends on the shape only
        if shape not in self._memo:
            self._memo[shape] = self._count_many([shape])[0]
        return self._memo[shape]

    def take(self, rng: random.Random, n_tokens: int) -> tuple[list[str], int]:
        """Consecutive sentences from a random start, at most ``n_tokens`` tokens: (sentences, tokens)."""
        out: list[str] = []
        i = rng.randrange(len(self.sentences))
        total = 0
        for _ in range(n_tokens + len(self.sentences)):  # bounded even if a sentence counts 0 tokens
            n = self.lengths[i]
            if total + n > n_tokens:
                break
            out.append(self.sentences[i])
            total += n
            i = (i + 1) % len(self.sentences)
        return out, total


def _key(rng: random.Random) -> str:
    return str(rng.randrange(10_000, 100_000))


def _assemble(parts: Sequence[tuple[str, bool]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Join ``(text, is_filler)`` parts with spaces; return the text and the filler spans.

    A filler span starts at the space before its sentence, so every token of the sentence (byte-level
    tokens carry their leading space) falls inside it.
    """
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, (text, is_filler) in enumerate(parts):
        sep = " " if i else ""
        if is_filler:
            if spans and spans[-1][1] == pos:  # merge adjacent filler sentences
                spans[-1] = (spans[-1][0], pos + len(sep) + len(text))
            else:
                spans.append((pos, pos + len(sep) + len(text)))
        out.append(sep + text)
        pos += len(sep) + len(text)
    return "".join(out), tuple(spans)


def passkey(filler: Filler, context_tokens: int, *, depth: float, seed: int) -> TaskExample:
    """A passkey hidden at ``depth`` in ``context_tokens`` tokens of filler; the answer is the key."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = _key(rng)
    needle = PASSKEY_NEEDLE.format(key=key)
    fixed = filler.count(PASSKEY_INTRO) + filler.count(" " + needle) + filler.count(PASSKEY_QUESTION)
    budget = max(0, context_tokens - fixed - 1)  # -1: the BOS token the tokenizer adds
    before, used = filler.take(rng, round(budget * depth))
    after, _ = filler.take(rng, budget - used)
    prompt, spans = _assemble([(PASSKEY_INTRO, False), *((s, True) for s in before), (needle, False),
                               *((s, True) for s in after)])
    return TaskExample("passkey", prompt + PASSKEY_QUESTION, " " + key, context_tokens, depth, seed,
                       filler_spans=spans)


def multi_needle(filler: Filler, context_tokens: int, *, num_needles: int = 3, seed: int,
                 depth: float | None = None) -> TaskExample:
    """``num_needles`` labelled pass keys spread over the filler; the question asks for one of them.

    ``depth`` places the queried needle (others go at random depths); ``None`` draws it at random.
    """
    if not 1 <= num_needles <= len(DOORS):
        raise ValueError(f"num_needles must be in [1, {len(DOORS)}], got {num_needles}")
    rng = random.Random(seed)
    doors = rng.sample(DOORS, num_needles)
    keys = [_key(rng) for _ in doors]
    target = rng.randrange(num_needles)
    depths = [rng.random() for _ in doors]
    if depth is not None:
        depths[target] = depth
    needles = [NEEDLE.format(door=d, key=k) for d, k in zip(doors, keys, strict=False)]
    question = NEEDLE_QUESTION.format(door=doors[target])
    fixed = filler.count(NEEDLE_INTRO) + sum(filler.count(" " + n) for n in needles) + filler.count(question)
    if fixed + 1 > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too short for {num_needles} needles (they need "
                         f"{fixed + 1} tokens); use a longer context or fewer needles")
    budget = context_tokens - fixed - 1
    sentences, _ = filler.take(rng, budget)
    body = [(s, True) for s in sentences]
    # insert needles at sentence boundaries, deepest first so earlier indices stay valid
    for d, n in sorted(zip(depths, needles, strict=True), reverse=True):
        body.insert(round(d * len(sentences)), (n, False))
    prompt, spans = _assemble([(NEEDLE_INTRO, False), *body])
    return TaskExample("multi_needle", prompt + question, " " + keys[target], context_tokens, depths[target],
                       seed, {"num_needles": num_needles, "door": doors[target]}, spans)


def kv_retrieval(filler: Filler, context_tokens: int, *, seed: int,
                 depth: float | None = None) -> TaskExample:
    """A list of ``key NAME: VALUE`` lines filling ``context_tokens``; the question asks for one value.

    ``filler`` is only used to count tokens. ``depth`` picks the queried line's position (``None``: random).
    """
    rng = random.Random(seed)
    line_tokens = filler.count(KV_LINE.format(name="bakemo", value="00000"))
    fixed = filler.count(KV_INTRO) + filler.count(KV_QUESTION.format(name="bakemo"))
    n_pairs = max(2, (context_tokens - fixed - 1) // max(1, line_tokens))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_pairs:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(3))
        if name not in seen:
            seen.add(name)
            names.append(name)
    values = [_key(rng) for _ in names]
    target = rng.randrange(n_pairs) if depth is None else min(n_pairs - 1, round(depth * (n_pairs - 1)))
    prompt = KV_INTRO + "".join(KV_LINE.format(name=n, value=v) for n, v in zip(names, values, strict=False))
    prompt += KV_QUESTION.format(name=names[target])
    return TaskExample("kv", prompt, " " + values[target], context_tokens,
                       target / max(1, n_pairs - 1), seed, {"num_pairs": n_pairs})


def make_task(kind: str, filler: Filler, context_tokens: int, *, seed: int,
              depth: float | None = None) -> TaskExample:
    """Build one example of ``kind`` (one of :data:`TASK_KINDS`)."""
    if kind == "passkey":
        return passkey(filler, context_tokens, depth=random.Random(seed).random() if depth is None else depth,
                       seed=seed)
    if kind == "kv":
        return kv_retrieval(filler, context_tokens, seed=seed, depth=depth)
    if kind == "multi_needle":
        return multi_needle(filler, context_tokens, num_needles=2 + seed % 3, seed=seed, depth=depth)
    raise ValueError(f"unknown task kind {kind!r}; choose one of: {', '.join(TASK_KINDS)}")


def answer_matches(answer: str, generated: str) -> bool:
    """True when ``generated`` starts (after spaces) with exactly the number in ``answer`` (``" 48213"``):
    ``" 482130"`` and ``" 4821"`` are wrong."""
    match = _NUMBER.match(generated)
    return match is not None and match.group(1) == answer.strip()


def is_correct(example: TaskExample, generated: str) -> bool:
    """True when the generated continuation starts with exactly the expected number."""
    return answer_matches(example.answer, generated)
