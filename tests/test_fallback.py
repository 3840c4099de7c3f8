"""Out-of-memory fallback chain and ``max_cache_memory``: fault injection, freeing, choosing up front."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import kvcache.generation as generation_module
from kvcache import generate
from kvcache.cache import KVCache
from kvcache.errors import KVCacheError
from kvcache.estimate import estimate_cache, parse_size
from kvcache.fallback import is_out_of_memory
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.resources import CacheMemoryError

PROMPTS = ["Hello there, world", "The quick brown fox"]
NEW = 8


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=3)


@pytest.fixture
def caches(monkeypatch):
    """Weak references to every KVCache built, in order."""
    refs: list[weakref.ref] = []
    original = KVCache.from_spec

    def build(spec, config, **kwargs):
        cache = original(spec, config, **kwargs)
        refs.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(generation_module.KVCache, "from_spec", staticmethod(build))
    return refs


def fail_dynamic_after(monkeypatch, calls: int, error: BaseException) -> None:
    """Every DynamicLayer update after the first ``calls`` ones raises ``error`` (a full allocator)."""
    count = {"n": 0}
    update = DynamicLayer.update

    def failing(self, key, value, valid=None):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return update(self, key, value, valid)

    monkeypatch.setattr(DynamicLayer, "update", failing)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    MemoryError(),
])
def test_out_of_memory_falls_back_frees_the_failed_cache_and_equals_a_direct_run(
        model, tokenizer, monkeypatch, caches, error):
    direct = generate(model, tokenizer, PROMPTS, cache="static+offload", max_new_tokens=NEW, eos_token_id=[])
    caches.clear()
    # fails mid-generation: the prompt is in and a few decode steps ran
    fail_dynamic_after(monkeypatch, model.config.num_hidden_layers * 3, error)
    got = generate(model, tokenizer, PROMPTS, cache="h2o:budget=0.5", fallback=["dynamic", "static+offload"],
                   max_new_tokens=NEW, eos_token_id=[])
    assert got.cache == "static+offload"
    assert [a["spec"] for a in got.attempts] == ["h2o:budget=0.5", "dynamic"]
    assert all(type(error).__name__ in a["reason"] for a in got.attempts)
    assert got.token_ids == direct.token_ids and got.texts == direct.texts
    assert got.finish_reasons == ["length", "length"] and all(len(t) == NEW for t in got.token_ids)
    gc.collect()
    assert len(caches) == 3
    assert caches[0]() is None and caches[1]() is None  # the failed attempts' caches were freed


def test_other_errors_are_not_retried(model, tokenizer, monkeypatch, caches):
    fail_dynamic_after(monkeypatch, 0, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        generate(model, tokenizer, PROMPTS, fallback=["static"], max_new_tokens=NEW)
    assert len(caches) == 1


def test_the_last_spec_running_out_raises_with_the_earlier_attempts(model, tokenizer, monkeypatch):
    fail_dynamic_after(monkeypatch, 0, torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError) as err:
        generate(model, tokenizer, PROMPTS, fallback=["h2o:budget=0.5+offload"], max_new_tokens=NEW)
    assert "earlier cache specs: dynamic (OutOfMemoryError: out of memory)" in "\n".join(err.value.__notes__)


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("HIP out of memory"))
    assert is_out_of_memory(CacheMemoryError("needs 9 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def hand_bytes(model, tokens: int, batch: int) -> int:
    """Dense cache bytes by hand: K and V (float32) plus an int32 position per slot and head."""
    c = model.config
    per_slot = c.num_key_value_heads * (2 * (c.hidden_size // c.num_attention_heads) * 4 + 4)
    return c.num_hidden_layers * batch * tokens * per_slot


def test_max_cache_memory_picks_the_first_spec_that_fits(model, tokenizer, caches):
    prompt_len = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    full = hand_bytes(model, prompt_len + NEW, 2)
    bounded = hand_bytes(model, prompt_len, 2)  # h2o at 25%: at most the prompt is held
    assert bounded < full
    got = generate(model, tokenizer, PROMPTS, cache="dynamic", fallback=["static", "h2o:budget=0.25"],
                   max_cache_memory=(full + bounded) // 2, max_new_tokens=NEW, eos_token_id=[])
    assert got.cache == "h2o:budget=0.25"
    assert [(a["spec"], a["predicted_bytes"]) for a in got.attempts] == [("dynamic", full), ("static", full)]
    assert "over max_cache_memory" in got.attempts[0]["reason"]
    assert len(caches) == 1  # nothing was built for the skipped specs
    # exactly the dense size fits
    assert generate(model, tokenizer, PROMPTS, fallback=["h2o:budget=0.25"], max_cache_memory=full,
                    max_new_tokens=NEW).cache == "dynamic"
    with pytest.raises(CacheMemoryError, match="no cache spec fits max_cache_memory"):
        generate(model, tokenizer, PROMPTS, fallback=["static"], max_cache_memory="1KiB", max_new_tokens=NEW)


@pytest.mark.parametrize("spec", ["static", "static:capacity=40", "h2o:budget=0.5+static", "dynamic",
                                  "h2o:budget=0.5", "static+offload"])
def test_prediction_equals_measured_memory(model, tokenizer, spec):
    prompt_len = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    est = estimate_cache(model.config, spec, batch=2, prompt_len=prompt_len, max_new_tokens=NEW)
    got = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=NEW, eos_token_id=[])
    predicted, peak = est.memory.total, got.stats.peak_cache_bytes
    if spec.startswith(("static", "h2o:budget=0.5+static")):
        assert peak == got.stats.cache_bytes == predicted  # preallocated: exact
        assert est.memory.host == (predicted if "offload" in spec else 0)
    else:
        # growable: the prediction counts the slots held at most; the buffer adds growth headroom
        # (DynamicLayer: min_growth = 128 slots on a fresh buffer)
        assert predicted == hand_bytes(model, est.tokens, 2)
        assert peak <= predicted + hand_bytes(model, 128, 2)
        if spec == "dynamic":
            assert peak >= predicted - hand_bytes(model, 1, 2)  # every token fed (all but the last) is held


def test_parse_size():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == parse_size(4096) == 4096
    assert parse_size(" 2 gib ") == 2 * 2**30
    for bad in ("two GiB", "2 parsecs", "-1GiB", "", "1e9"):
        with pytest.raises(KVCacheError, match="memory size"):
            parse_size(bad)


def test_static_layer_fault_injection_also_falls_back(model, tokenizer, monkeypatch):
    update = StaticLayer.update

    def failing(self, key, value, valid=None):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(StaticLayer, "update", failing)
    got = generate(model, tokenizer, PROMPTS, cache="static", fallback=["dynamic"], max_new_tokens=NEW)
    monkeypatch.setattr(StaticLayer, "update", update)
    assert got.cache == "dynamic" and got.attempts[0]["spec"] == "static"


# ----- the command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cli_fallback_and_max_cache_memory(model, tokenizer, model_dir, monkeypatch):
    import json

    from typer.testing import CliRunner

    from kvcache.cli import app

    runner = CliRunner()
    base = ["generate", "Once upon", "--model", model_dir, "-n", str(NEW), "--json"]
    direct = generate(model, tokenizer, "Once upon", cache="static+offload", max_new_tokens=NEW)
    fail_dynamic_after(monkeypatch, 0, torch.OutOfMemoryError("CUDA out of memory"))
    out = runner.invoke(app, [*base, "--cache", "h2o:budget=0.5", "--fallback", "static+offload"])
    assert out.exit_code == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["cache"] == "static+offload" and got["text"] == direct.texts[0]
    assert got["attempts"][0]["spec"] == "h2o:budget=0.5" and "out of memory" in got["attempts"][0]["reason"]
    plain = runner.invoke(app, base[:-1] + ["--fallback", "static"])
    assert plain.exit_code == 0 and "ran after: dynamic: OutOfMemoryError" in plain.stderr
    monkeypatch.undo()
    # the limit skips the full-length spec (prompt + NEW tokens) for the policy-bounded one
    prompt_len = len(tokenizer("Once upon")["input_ids"])
    limit = (hand_bytes(model, prompt_len + NEW, 1) + hand_bytes(model, prompt_len, 1)) // 2
    out = runner.invoke(app, [*base, "--fallback", "h2o:budget=0.25", "--max-cache-memory", str(limit)])
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["cache"] == "h2o:budget=0.25"
    bad = runner.invoke(app, [*base, "--max-cache-memory", "lots"])
    assert bad.exit_code == 2 and "memory size" in bad.stderr


def test_cli_info_estimate_uses_the_one_estimator(model, model_dir):
    import json

    from typer.testing import CliRunner

    from kvcache.cli import app

    out = CliRunner().invoke(app, ["info", "--estimate", "--json", "--model", model_dir, "--prompt-tokens",
                                   "100", "--new-tokens", "28", "-c", "dynamic", "-c", "static+offload"])
    assert out.exit_code == 0, out.stderr
    rows = json.loads(out.stdout)["estimates"]
    assert [r["spec"] for r in rows] == ["dynamic", "static+offload"]
    assert rows[0]["total_bytes"] == rows[1]["host_bytes"] == hand_bytes(model, 128, 1)
    assert rows[0]["host_bytes"] == rows[1]["device_bytes"] == 0
    table = CliRunner().invoke(app, ["info", "--estimate", "--model", model_dir, "--prompt-tokens", "100"])
    assert table.exit_code == 0 and "static" in table.stdout and "h2o:budget=0.25" in table.stdout


def test_max_cache_memory_reaches_a_quantized_spec_and_the_fault_chain_runs_it(model, tokenizer, monkeypatch):
    """The documented chain dynamic -> int4: a budget between the two sizes picks int4 before allocating; an
    out-of-memory in the dense attempt falls back to it and equals a direct int4 run."""
    spec = "int4:group=4,residual=4"
    prompt_len = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    full = hand_bytes(model, prompt_len + NEW, 2)
    quant = estimate_cache(model.config, spec, batch=2, prompt_len=prompt_len,
                           max_new_tokens=NEW).memory.total
    assert quant < full
    got = generate(model, tokenizer, PROMPTS, fallback=[spec], max_cache_memory=(full + quant) // 2,
                   max_new_tokens=NEW, eos_token_id=[])
    direct = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=NEW, eos_token_id=[])
    assert got.cache == spec and got.token_ids == direct.token_ids
    fail_dynamic_after(monkeypatch, 1, torch.OutOfMemoryError("out of memory"))
    again = generate(model, tokenizer, PROMPTS, fallback=[spec], max_new_tokens=NEW, eos_token_id=[])
    assert again.cache == spec and again.token_ids == direct.token_ids
