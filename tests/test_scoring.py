"""kvcache.scoring: continuation log-likelihoods through a cache, and its refusals."""

from __future__ import annotations

import pytest

from kvcache import CacheCapacityError
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.scoring import score_continuations


@pytest.fixture(scope="module")
def setup():
    return random_model("gpt2", seed=4), tiny_tokenizer()


def test_static_layout_scores_like_dynamic_and_refuses_when_full(setup):
    model, tok = setup
    ctx, cont = [tok("Hello world")["input_ids"]], [tok(" again", add_special_tokens=False)["input_ids"]]
    dynamic = score_continuations(model, tok, ctx, cont)[0]
    static = score_continuations(model, tok, ctx, cont, cache="static:capacity=32")[0]
    assert static.token_logprobs == pytest.approx(dynamic.token_logprobs, abs=1e-5)
    assert len(dynamic.token_logprobs) == len(cont[0]) and dynamic.logprob == pytest.approx(
        sum(dynamic.token_logprobs))
    # 12 context tokens fit in 14 slots, the 6-token continuation does not
    with pytest.raises(CacheCapacityError, match="static:capacity"):
        score_continuations(model, tok, ctx, cont, cache="static:capacity=14")


def test_bad_inputs(setup):
    model, tok = setup
    with pytest.raises(ValueError, match="one continuation per context"):
        score_continuations(model, tok, [[1, 5]], [])
    with pytest.raises(ValueError, match="empty context or continuation"):
        score_continuations(model, tok, [[1, 5]], [[]])
    with pytest.raises(ValueError, match="vocabulary"):
        score_continuations(model, tok, [[1, 5]], [[10_000]])
