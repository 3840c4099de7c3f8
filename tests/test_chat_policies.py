"""Policies across the turns of a conversation: the budget is a fraction of everything seen, held at every
turn (not re-applied to what the last turn kept); the ``min_tokens`` floor defers the first evictions;
SnapKV's ``remember=1`` keeps earlier turns' votes."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache import Chat
from kvcache.generation import generate_ids
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer
from kvcache.resources import estimate_bytes
from kvcache.spec import CacheSpec, SpecError

MESSAGES = ["Hello there", "What is the capital of France?", "and of Italy", "thanks, bye", "one more"]
NEW = 6


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=3, vocab_size=TINY_VOCAB_SIZE)


def turn_prompt(stat) -> int:
    """Tokens the cache had seen once the turn's prefill was in (the reply's last token is never fed)."""
    return stat.tokens_seen - (stat.new_tokens - 1)


@pytest.mark.parametrize("spec", ["h2o:budget=0.5", "knorm:budget=0.3", "snapkv:budget=0.5,observe=4"])
def test_each_turn_holds_the_fraction_of_the_whole_conversation(model, tokenizer, spec):
    fraction = CacheSpec.parse(spec).policy.params["budget"]
    chat = Chat(model, tokenizer, spec, max_new_tokens=NEW, stop=[])
    for text in MESSAGES:
        chat.send(text)
        stat = chat.stats[-1]
        # Exactly the fraction of every token seen by the turn's prefill: a turn's selection does not halve
        # again what the previous turn kept (held would shrink towards fraction**k of the history).
        assert stat.tokens_held == math.ceil(fraction * turn_prompt(stat) - 1e-9), stat
        for store in chat.cache.stores:
            pos = store.positions[0, :, : store.physical_length]
            assert bool((pos >= 0).all()) and int(pos.max()) < stat.tokens_seen
            if not spec.startswith("knorm"):  # a recent window: the newest token is held, positions continue
                assert int(pos.max()) == stat.tokens_seen - 1


@pytest.mark.parametrize("floor", [40, 70])
def test_min_tokens_holds_every_token_until_the_conversation_passes_it(model, tokenizer, floor):
    spec = f"h2o:budget=0.5,min_tokens={floor}"
    chat = Chat(model, tokenizer, spec, max_new_tokens=NEW, stop=[])
    evicted = False
    for text in MESSAGES:
        chat.send(text)
        stat = chat.stats[-1]
        budget = max(floor, math.ceil(0.5 * turn_prompt(stat) - 1e-9))
        assert stat.tokens_held == min(stat.tokens_seen, budget), stat
        if stat.tokens_seen <= floor:
            for store in chat.cache.stores:  # nothing evicted yet: every position, in order
                held = store.positions[0, :, : store.physical_length]
                assert torch.equal(held, torch.arange(stat.tokens_seen).expand_as(held))
        evicted |= stat.tokens_held < stat.tokens_seen
    assert evicted, "the conversation should pass the floor (lengthen MESSAGES)"


def test_min_tokens_keeps_a_short_prompt_whole_and_leaves_a_long_one_to_the_fraction(model, tokenizer):
    short = torch.randint(3, TINY_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    floored = generate_ids(model, tokenizer, short, cache="h2o:budget=0.25,min_tokens=20", max_new_tokens=8)
    full = generate_ids(model, tokenizer, short, cache="full", max_new_tokens=8)
    assert floored.token_ids == full.token_ids  # 12 + 8 tokens never pass the floor: nothing is evicted
    long = torch.randint(3, TINY_VOCAB_SIZE, (2, 100), generator=torch.Generator().manual_seed(1))
    floored = generate_ids(model, tokenizer, long, cache="h2o:budget=0.25,min_tokens=20", max_new_tokens=8)
    plain = generate_ids(model, tokenizer, long, cache="h2o:budget=0.25", max_new_tokens=8)
    assert floored.token_ids == plain.token_ids  # a quarter of 100 is above the floor: the same selection


def test_min_tokens_spec_rules():
    spec = CacheSpec.parse("keydiff:min_tokens=128")
    assert str(spec) == "keydiff:budget=0.5,min_tokens=128"
    assert str(CacheSpec.parse(str(spec))) == str(spec)
    with pytest.raises(SpecError, match="min_tokens is a floor under a fractional budget"):
        CacheSpec.parse("h2o:tokens=64,min_tokens=32")
    with pytest.raises(SpecError, match="static:capacity=64 can hold"):
        CacheSpec.parse("h2o:min_tokens=128+static:capacity=64")
    with pytest.raises(SpecError, match="min_tokens must be a whole number >= 1"):
        CacheSpec.parse("h2o:min_tokens=0")


def test_memory_estimate_counts_the_floor(model):
    def estimate(spec: str) -> int:
        return estimate_bytes(model.config, CacheSpec.parse(spec), batch=1, prompt_len=10, max_new_tokens=100,
                              dtype=torch.float32)[0]

    assert estimate("h2o:budget=0.5") < estimate("h2o:budget=0.5,min_tokens=50") < estimate("full")


def held_scores(chat: Chat) -> list[dict[tuple[int, int], float]]:
    """Per layer: ``(KV head, position) -> running score`` of every held slot."""
    out = []
    for store in chat.cache.stores:
        pos = store.positions[0, :, : store.physical_length]
        out.append({(h, int(p)): float(store.scores[0, h, i]) for h in range(pos.shape[0])
                    for i, p in enumerate(pos[h].tolist())})
    return out


@pytest.mark.parametrize("name", ["snapkv", "diffsnap"])
def test_remember_keeps_the_largest_vote_of_any_turn(model, tokenizer, name):
    drops = {}
    for remember in (0, 1):
        chat = Chat(model, tokenizer, f"{name}:budget=0.6,observe=4,remember={remember}", max_new_tokens=NEW,
                    stop=[])
        chat.send(MESSAGES[1])
        before = held_scores(chat)
        chat.send(MESSAGES[2])
        after = held_scores(chat)
        kept = [(b[k], a[k]) for b, a in zip(before, after, strict=True) for k in b if k in a]
        assert kept, "some slots should survive the second turn"
        drops[remember] = sum(new < old - 1e-6 for old, new in kept)
    assert drops[1] == 0  # a vote, once given, stays
    assert drops[0] > 0  # (the latest window alone votes: earlier votes are replaced)


def test_remember_scores_one_prompt_as_snapkv_whatever_its_chunks(model, tokenizer):
    ids = torch.randint(3, TINY_VOCAB_SIZE, (1, 40), generator=torch.Generator().manual_seed(2)).tolist()[0]
    held = {}
    for remember in (0, 1):
        for chunk in (8, 512):
            chat = Chat(model, tokenizer, f"snapkv:budget=0.5,observe=4,remember={remember}",
                        max_new_tokens=1, stop=[], prefill_chunk_size=chunk)
            chat._run(ids, 1, None, role="user")
            held[remember, chunk] = [s.positions[..., : s.physical_length].sort(-1).values
                                     for s in chat.cache.stores]
    for key in held:  # the selection is made on the last chunk's window, as SnapKV's
        assert all(torch.equal(a, b) for a, b in zip(held[0, 512], held[key], strict=True)), key
