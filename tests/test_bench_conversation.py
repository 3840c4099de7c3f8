"""The bench conversation task: deterministic, carried == re-read with a full cache, and a bench row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache.bench.conversation import conversation_examples, converse
from kvcache.bench.prompts import PromptSettings, prose_filler
from kvcache.bench.runner import BenchConfig, run_bench
from kvcache.models.corpus import load_eval_split
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer

JOB = {"task": "conversation", "max_new_tokens": 6, "filler_new_tokens": 4, "max_cache_len": 2048}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    from kvcache.bench.prompts import default_eval_dir

    filler = prose_filler(load_eval_split(default_eval_dir() / "prose.jsonl"), tokenizer)
    return conversation_examples(filler, 2, 4, 40, seed=7)


def test_examples_are_deterministic_with_the_key_first_and_the_question_last(tokenizer, examples):
    from kvcache.bench.prompts import default_eval_dir

    filler = prose_filler(load_eval_split(default_eval_dir() / "prose.jsonl"), tokenizer)
    assert conversation_examples(filler, 2, 4, 40, seed=7) == examples
    for ex in examples:
        assert len(ex["turns"]) == 4 and ex["answer"].strip() in ex["turns"][0]
        assert ex["turns"][-1].startswith("What is the pass key?")
        assert all(ex["answer"].strip() not in t for t in ex["turns"][1:])


def test_full_cache_carried_equals_rereading_and_reads_less(tokenizer, examples):
    model = random_model("llama", seed=1, vocab_size=TINY_VOCAB_SIZE)
    out = converse(model, tokenizer, "full", examples[0], JOB, [2])
    assert out["token_ids"] == out["reread_token_ids"]
    assert out["tokens_read"] < out["reread_tokens"] and out["tokens_held"] == out["tokens_seen"]
    policy = converse(model, tokenizer, "h2o:budget=0.5", examples[0], JOB, [2])
    assert policy["tokens_held"] < policy["tokens_seen"] == out["tokens_seen"]


def test_bench_row(tmp_path: Path):
    model_dir = tmp_path / "tiny"
    random_model("llama", seed=2, num_layers=2, hidden=32, num_heads=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    settings = PromptSettings(conversation_n=2, conversation_turns=3, conversation_turn_tokens=32)
    out = tmp_path / "res"
    run_bench(BenchConfig(out=out, model=str(model_dir), specs=["full", "h2o:budget=0.5"],
                          tasks=["conversation"], peers=["hf"], budgets=[0.5], settings=settings),
              progress=False)
    rows = {r["system"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    full = rows["full"]
    assert full["available"] and full["score"] == full["details"]["reread_accuracy"]
    assert full["details"]["tokens_read"] < full["details"]["reread_tokens"]
    assert rows["h2o:budget=0.5"]["details"]["tokens_held"] < rows["h2o:budget=0.5"]["details"]["tokens_seen"]
    assert not rows["hf DynamicCache"]["available"] and "kvcache.Chat" in rows["hf DynamicCache"]["reason"]
    assert "accuracy, cache carried" in (out / "results.md").read_text()
