"""The bundled default model: corpus splits, the training/evaluation pipeline (smoke preset), and the shipped
weights (load offline, deterministic greedy generation, a ~512-token passkey prompt answered correctly)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from script_modules import import_script

from kvcache.bench.tasks import EVAL_SEED_BASE, Filler, is_correct, passkey
from kvcache.models import DEFAULT_MODEL_DIR, load
from kvcache.models.corpus import (
    Document,
    build_corpus,
    load_eval_split,
    prose_paragraphs,
    split_of,
    split_sentences,
)

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = DEFAULT_MODEL_DIR / "eval"
WEIGHTS = DEFAULT_MODEL_DIR / "model.safetensors"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="trained weights not in the checkout yet")


# ---------------------------------------------------------------------------------------- corpus


def test_prose_paragraphs_drop_code_doctests_and_grammar() -> None:
    raw = (
        "The :func:`len` function returns the number of items in a container, as an integer.\n\n"
        "   for x in range(3):\n       print(x)\n\n"
        ">>> len([1, 2, 3])\n3\n\n"
        "expr ::= term | expr '+' term\n\n"
        "Short."
    )
    assert prose_paragraphs(raw) == [
        "The len function returns the number of items in a container, as an integer."]


def test_split_sentences() -> None:
    assert split_sentences("One thing is true. Another one (too) is. Done!") == [
        "One thing is true.", "Another one (too) is.", "Done!"]


def test_split_is_a_stable_function_of_the_key() -> None:
    keys = [f"doc:module{i}.function" for i in range(4000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    share = {s: splits.count(s) / len(keys) for s in ("train", "heldout_prose", "heldout_docs")}
    assert 0.85 < share["train"] < 0.92 and 0.02 < share["heldout_prose"] < 0.04


def test_build_corpus_splits_are_disjoint_and_exclusions_hold() -> None:
    corpus = build_corpus(max_files=40)
    train_keys = {d.key for d in corpus.train}
    held = corpus.heldout_prose + corpus.heldout_docs
    assert corpus.train and corpus.heldout_prose
    assert not train_keys & {d.key for d in held}
    assert len({d.text for d in corpus.train}) == len(corpus.train)  # duplicates dropped
    banned = corpus.train[:5]
    again = build_corpus(max_files=40, exclude=banned)
    assert not {d.key for d in banned} & {d.key for d in again.train}
    assert len(again.train) == len(corpus.train) - 5


def test_shipped_eval_splits_are_small_loadable_and_never_train() -> None:
    prose = load_eval_split(EVAL_DIR / "prose.jsonl")
    docs = load_eval_split(EVAL_DIR / "documents.jsonl")
    assert sum(p.stat().st_size for p in EVAL_DIR.iterdir()) < 2_000_000
    assert len(prose) >= 100 and len(docs) >= 10
    assert all(split_of(d.key) == "heldout_prose" for d in prose)
    assert all(split_of(d.key) == "heldout_docs" and len(d.text) >= 800 for d in docs)
    assert all(isinstance(d, Document) and d.text for d in prose + docs)


def test_missing_eval_split_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="write-eval-splits"):
        load_eval_split(tmp_path / "prose.jsonl")


# ---------------------------------------------------------------------------------------- pipeline


def test_smoke_preset_trains_saves_and_evaluates(tmp_path: Path) -> None:
    """The whole recipe end to end on the smoke preset: the output loads offline as float32."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "m"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--preset", "smoke",
                    "--out", str(out)], check=True, env=env, capture_output=True, timeout=240)
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == log["planned_steps"] and log["param_count"] > 0
    assert log["precision"] == "fp32"  # the default on a CPU
    assert log["history"][-1]["loss"] < log["history"][0]["loss"]  # it learns something
    subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_default_model.py"), str(out),
                    "--prompts", "3", "--contexts", "256"],
                   check=True, env=env, capture_output=True, timeout=240)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["passkey"][0]["n"] == 3 and ev["heldout"]["perplexity"] > 1
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{log['param_count']:,} parameters" in card and str(ev["heldout"]["perplexity"]) in card
    model, tok = load(str(out))
    assert model.dtype == torch.float32
    assert tok("hi")["input_ids"][0] == tok.bos_token_id == 1


def test_card_reproduce_command_gives_the_recorded_recipe() -> None:
    """The card's train command, parsed by the training script, is exactly the recipe in train_log.json,
    even where the shipped run used overrides of its preset."""
    eval_default_model = import_script("eval_default_model")
    train_default_model = import_script("train_default_model")
    train = json.loads((DEFAULT_MODEL_DIR / "train_log.json").read_text())
    command = eval_default_model._train_command(train)
    assert command in (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    ap = train_default_model.build_parser()
    args = ap.parse_args(shlex.split(command)[3:])
    recorded = {k: eval_default_model._as_tuples(v) for k, v in train["recipe"].items()}
    assert asdict(train_default_model.recipe(args, ap)) == recorded


# ---------------------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def default_model():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield load("default")
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@needs_weights
def test_default_model_loads_offline_as_float32_llama(default_model) -> None:
    model, tok = default_model
    cfg = model.config
    assert cfg.model_type == "llama" and model.dtype == torch.float32
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.max_position_embeddings >= 2048
    assert 4000 <= len(tok) <= 8192
    assert WEIGHTS.stat().st_size <= 30_000_000
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")


@needs_weights
def test_greedy_generation_is_deterministic(default_model) -> None:
    model, tok = default_model
    enc = tok(["When an exception is raised,"], return_tensors="pt")
    runs = [model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    text = tok.decode(runs[0][0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 3  # real words, not an empty or single-token loop


@needs_weights
@pytest.mark.parametrize("context", [512, 1024])
def test_passkey_is_answered_at_512_and_1024_tokens(default_model, context: int) -> None:
    """Keys at the start, middle and end of held-out prose (fresh evaluation seeds), greedy, full cache."""
    model, tok = default_model
    prose = load_eval_split(EVAL_DIR / "prose.jsonl")
    sentences = [s for d in prose for p in prose_paragraphs(d.text) for s in split_sentences(p)]
    filler = Filler(sentences, lambda xs: [len(i) for i in tok(xs, add_special_tokens=False)["input_ids"]])
    correct = 0
    for i, depth in enumerate((0.0, 0.5, 1.0)):
        ex = passkey(filler, context, depth=depth, seed=EVAL_SEED_BASE + 777 + i)
        enc = tok(ex.prompt, return_tensors="pt")
        assert 0.9 * context <= enc["input_ids"].shape[1] <= context
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        correct += is_correct(ex, tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert correct == 3
