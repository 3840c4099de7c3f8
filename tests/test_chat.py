"""kvcache.Chat: turns read once and equal to one generate over the history, policies across turns, forks,
streaming and the turn formats."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache import Chat
from kvcache.generation import generate_ids
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer

MESSAGES = ["Hello there", "What is the capital of France?", "and of Italy", "thanks, bye"]
NEW = 6


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return random_model(request.param, seed=3, vocab_size=TINY_VOCAB_SIZE)


class FedCounter:
    """Counts the tokens every forward of ``model`` is fed."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.tokens += kwargs["input_ids"].shape[1]

    def close(self):
        self.handle.remove()


def run_chat(chat: Chat, messages=MESSAGES) -> list[list[int]]:
    """Send every message; return each reply's token ids."""
    replies = []
    for text in messages:
        chat.send(text)
        n = chat.stats[-1].new_tokens
        replies.append(chat.token_ids[len(chat.token_ids) - n:])
    return replies


@pytest.mark.parametrize("spec", ["dynamic", "static:capacity=512"])
def test_turns_equal_one_generate_over_the_history_reading_each_token_once(model, tokenizer, spec):
    chat = Chat(model, tokenizer, spec, max_new_tokens=NEW, stop=[])
    counter = FedCounter(model)
    try:
        replies = run_chat(chat)
    finally:
        counter.close()
    ids = chat.token_ids
    # Every token of the conversation is fed exactly once, except the last reply's last token (never fed).
    assert counter.tokens == len(ids) - 1 == chat.tokens_read
    assert chat.cache.get_seq_length() == len(ids) - 1
    end = 0
    for k, reply in enumerate(replies):
        end = sum(s.tokens_read for s in chat.stats[: k + 1]) + 1  # tokens up to and including reply k
        history = ids[: end - len(reply)]
        ref = generate_ids(model, tokenizer, torch.tensor([history]), cache="dynamic", max_new_tokens=NEW)
        assert ref.token_ids[0] == reply, f"turn {k}"
    # Each turn after the first reads only its own text plus the previous reply's last token.
    for k in range(1, len(MESSAGES)):
        text = f"\nUser: {MESSAGES[k]}\nAssistant:"
        assert chat.stats[k].tokens_read == 1 + len(text) + chat.stats[k].new_tokens - 1


def test_static_refuses_a_turn_past_its_capacity_and_keeps_the_conversation(model, tokenizer):
    chat = Chat(model, tokenizer, "static:capacity=40", max_new_tokens=4, stop=[])
    chat.send("hi")
    ids, seen = chat.token_ids, chat.cache.get_seq_length()
    with pytest.raises(Exception, match="capacity"):
        chat.send("x" * 60)
    assert chat.token_ids == ids and chat.cache.get_seq_length() == seen


@pytest.mark.parametrize("spec", ["h2o:budget=0.5", "keyformer:tokens=24", "streaming:budget=0.3"])
def test_policy_keeps_evicting_across_turns_within_its_budget(model, tokenizer, spec):
    chat = Chat(model, tokenizer, spec, max_new_tokens=NEW, stop=[])
    run_chat(chat)
    for stat in chat.stats:
        budget = 24 if "tokens" in spec else None
        if budget is None:
            fraction = 0.5 if "0.5" in spec else 0.3
            # The budget is a fraction of the conversation so far (the tokens seen at the turn's prefill).
            prompt = stat.tokens_seen - (stat.new_tokens - 1)
            budget = math.ceil(fraction * prompt - 1e-9)
        assert stat.tokens_held <= budget + 1, stat
        assert stat.tokens_held < stat.tokens_seen
    # Logical positions continue across turns: the newest slot held is the last token seen.
    for store in chat.cache.stores:
        pos = store.positions[..., : store.physical_length]
        assert int(pos.max()) == chat.cache.get_seq_length() - 1
        assert store.seen == chat.cache.get_seq_length()


def test_fork_branches_are_independent_and_share_the_prefix(model, tokenizer):
    base = Chat(model, tokenizer, "h2o:budget=0.5", system="You answer in one word. " * 3, max_new_tokens=NEW,
                stop=[])
    prefix_read = base.tokens_read
    before = (base.token_ids, base.cache.get_seq_length(), [s.positions.clone() for s in base.cache.stores])
    a, b = base.fork(), base.fork()
    reply_a = a.send("left?")
    reply_b = b.send("right?")
    # The base is untouched by its forks.
    assert base.token_ids == before[0] and base.cache.get_seq_length() == before[1]
    assert all(torch.equal(s.positions, p) for s, p in zip(base.cache.stores, before[2], strict=True))
    # A branch answers as a conversation that read the prefix itself; the prefix was read once.
    fresh = Chat(model, tokenizer, "h2o:budget=0.5", system="You answer in one word. " * 3,
                 max_new_tokens=NEW, stop=[])
    assert fresh.send("right?") == reply_b
    assert base.send("left?") == reply_a
    assert b.tokens_read - prefix_read == b.stats[-1].tokens_read
    assert a.token_ids != b.token_ids


def test_streamed_text_is_the_reply_without_the_stop_string(tokenizer):
    model = random_model("llama", seed=5, vocab_size=TINY_VOCAB_SIZE)
    chat = Chat(model, tokenizer, max_new_tokens=12, stop=[])
    first = chat.send("abc")
    stop = first[3:5]  # a string the model writes: it must end the reply and never be shown
    chat = Chat(model, tokenizer, max_new_tokens=12, stop=[stop])
    pieces: list[str] = []
    reply = chat.send("abc", on_text=pieces.append)
    assert "".join(pieces) == reply == first[: first.index(stop)]


def test_chat_template_is_used_when_the_tokenizer_has_one(model):
    tok = tiny_tokenizer(add_bos=False)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = Chat(model, tok, system="sys", max_new_tokens=3, stop=[])
    chat.send("hi")
    chat.send("yo")
    ids = chat.token_ids
    text = tok.decode(ids)
    assert text.startswith("<system>sys\n<user>hi\n<assistant>")
    reply1 = chat.messages[2]["content"]
    # The second turn reads the template's text for the new message after the first reply.
    assert f"<assistant>{reply1}" in text and text.index("<user>yo\n<assistant>") > text.index(reply1)


def test_reset_starts_over_with_the_system_prompt(model, tokenizer):
    chat = Chat(model, tokenizer, system="Be brief.", max_new_tokens=NEW, stop=[])
    first = chat.send("hello")
    chat.send("more")
    chat.reset()
    assert [m["role"] for m in chat.messages] == ["system"]
    assert chat.send("hello") == first
