"""Synthetic long-context tasks: determinism, lengths, depths, answers and filler spans."""

from __future__ import annotations

import re

import pytest

from kvcache.bench.tasks import (
    DOORS,
    EVAL_SEED_BASE,
    REPEAT_SENTENCES,
    TASK_KINDS,
    Filler,
    is_correct,
    kv_retrieval,
    make_task,
    multi_needle,
    passkey,
)

SENTENCES = [f"Sentence number {w} talks about {w} things in a rather long and winding way." for w in (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty").split()]


def count_words(texts: list[str]) -> list[int]:
    """A deterministic stand-in tokenizer: one token per whitespace-separated word or digit."""
    return [len(re.findall(r"\d|[^\s\d]+", t)) for t in texts]


@pytest.fixture(scope="module")
def filler() -> Filler:
    return Filler(SENTENCES, count_words)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_same_seed_same_example_other_seed_other_example(filler: Filler, kind: str) -> None:
    a = make_task(kind, filler, 300, seed=EVAL_SEED_BASE + 7)
    b = make_task(kind, filler, 300, seed=EVAL_SEED_BASE + 7)
    c = make_task(kind, filler, 300, seed=EVAL_SEED_BASE + 8)
    assert a == b
    assert (a.prompt, a.answer) != (c.prompt, c.answer)


@pytest.mark.parametrize("kind", TASK_KINDS)
@pytest.mark.parametrize("context", [128, 512, 2048])
def test_prompt_length_close_to_target_and_never_over(filler: Filler, kind: str, context: int) -> None:
    if kind == "multi_needle" and context < 256:  # four needles alone take ~130 tokens
        with pytest.raises(ValueError, match="too short"):
            multi_needle(filler, context, num_needles=4, seed=0)
        return
    for seed in range(5):
        ex = make_task(kind, filler, context, seed=seed)
        n = count_words([ex.prompt])[0] + 1  # + BOS
        assert n <= context + 1, (kind, context, n)
        # within one filler sentence (or one key-value line) of the target
        assert n >= context - 20, (kind, context, n)


def test_passkey_answer_in_prompt_at_requested_depth(filler: Filler) -> None:
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = passkey(filler, 1024, depth=depth, seed=3)
        key = ex.answer.strip()
        assert ex.answer == " " + key and len(key) == 5 and key.isdigit()
        assert ex.prompt.count(key) == 2  # "The pass key is K. Remember it. K is the pass key."
        assert ex.prompt.endswith("The pass key is")
        body = ex.prompt.split("I will quiz you about the important information there.")[1]
        position = body.index(f"The pass key is {key}") / len(body)
        assert abs(position - depth) < 0.1, (depth, position)


def test_passkey_rejects_bad_depth(filler: Filler) -> None:
    with pytest.raises(ValueError, match="depth"):
        passkey(filler, 256, depth=1.5, seed=0)


def test_multi_needle_asks_for_one_of_several_keys(filler: Filler) -> None:
    ex = multi_needle(filler, 1024, num_needles=4, seed=11, depth=0.5)
    door = ex.meta["door"]
    assert door in DOORS and ex.meta["num_needles"] == 4
    needles = re.findall(r"The pass key for the (\w+) door is (\d+)\.", ex.prompt)
    assert len(needles) == 4 and len({d for d, _ in needles}) == 4
    assert dict(needles)[door] == ex.answer.strip()
    assert ex.prompt.endswith(f"The pass key for the {door} door is")
    with pytest.raises(ValueError, match="num_needles"):
        multi_needle(filler, 512, num_needles=0, seed=0)


def test_kv_retrieval_value_belongs_to_the_queried_key(filler: Filler) -> None:
    ex = kv_retrieval(filler, 512, seed=5)
    pairs = re.findall(r"\nkey (\w+): (\d+)", ex.prompt)
    assert len(pairs) == ex.meta["num_pairs"] > 10
    assert len({k for k, _ in pairs}) == len(pairs)  # keys are unique
    name = re.search(r"What is the value of key (\w+)\?", ex.prompt).group(1)
    assert dict(pairs)[name] == ex.answer.strip()
    first = kv_retrieval(filler, 512, seed=5, depth=0.0)
    assert re.search(r"\nkey (\w+): ", first.prompt).group(1) in first.prompt.split("\n")[-1]


@pytest.mark.parametrize("kind", ["passkey", "multi_needle"])
def test_filler_spans_cover_filler_and_nothing_else(filler: Filler, kind: str) -> None:
    ex = make_task(kind, filler, 600, seed=21, depth=0.5)
    assert ex.filler_spans
    covered = "".join(ex.prompt[a:b] for a, b in ex.filler_spans)
    assert ex.answer.strip() not in covered  # needles are task text
    assert "pass key" not in covered
    outside = list(ex.prompt)
    for a, b in ex.filler_spans:
        assert ex.prompt[a] == " "  # a span starts at the space before its sentence
        outside[a:b] = [""] * (b - a)
    assert not any(s in "".join(outside) for s in SENTENCES)


def test_repeat_filler_is_the_classic_haystack() -> None:
    rep = Filler.repeat(count_words)
    ex = passkey(rep, 400, depth=0.5, seed=1)
    assert all(s in ex.prompt for s in REPEAT_SENTENCES)


def test_is_correct_needs_the_exact_number(filler: Filler) -> None:
    ex = passkey(filler, 256, depth=0.5, seed=2)
    key = ex.answer.strip()
    assert is_correct(ex, ex.answer)
    assert is_correct(ex, f" {key}. Remember it.")
    assert not is_correct(ex, f" {key[:-1]}")
    assert not is_correct(ex, f" {key}0")
    assert not is_correct(ex, " The pass key is " + key)


def test_unknown_kind_is_a_value_error(filler: Filler) -> None:
    with pytest.raises(ValueError, match="passkey"):
        make_task("nope", filler, 256, seed=0)


def test_filler_needs_sentences() -> None:
    with pytest.raises(ValueError, match="sentence"):
        Filler([], count_words)
