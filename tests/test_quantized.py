"""Quantized caches on models: exact where it can be (a window as long as the sequence), batch rows equal to
the rows alone, beam search, every entry point (kvcache.generate, model.generate, the CLI), compositions with
policies and the static layout, memory with a policy."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import kvcache
from kvcache import generate
from kvcache.cache import KVCache
from kvcache.layers.quantized import QuantizedLayer
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer

warnings.filterwarnings("ignore", message=".*deprecated.*")

PROMPTS = ["Hello there, world, how are you today my friend", "a b", "The quick brown fox jumps over it"]
#: small groups and window, so that short test sequences are quantized for real
SMALL = "group=4,residual=4"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return random_model("llama", seed=1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox"])
def test_a_window_as_long_as_the_sequence_gives_the_dense_tokens(tokenizer, arch: str) -> None:
    model = random_model(arch, seed=2)
    dense = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    for bits in (2, 4, 8):
        quant = generate(model, tokenizer, PROMPTS, cache=f"int{bits}:residual=64", max_new_tokens=8,
                         eos_token_id=[])
        assert quant.token_ids == dense.token_ids, (arch, bits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_left_padded_batch_equals_each_row_alone(tokenizer, arch: str) -> None:
    model = random_model(arch, seed=3)
    for spec in (f"int2:{SMALL}", f"int4:{SMALL}", f"h2o:budget=0.5+int4:{SMALL}"):
        batch = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=10, eos_token_id=[])
        for prompt, ids in zip(PROMPTS, batch.token_ids, strict=True):
            alone = generate(model, tokenizer, prompt, cache=spec, max_new_tokens=10, eos_token_id=[])
            assert alone.token_ids == [ids], (arch, spec, prompt)


def test_quantization_changes_the_computation_and_int8_stays_close(llama, tokenizer) -> None:
    """Not a disguised dense cache: attention reads the dequantized values (logits move), int8 barely."""
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    logits = {}
    for spec in ("dynamic", f"int2:{SMALL}", f"int8:{SMALL}"):
        cache = KVCache.from_spec(spec, llama.config)
        with torch.no_grad():
            llama(ids[:, :-1], past_key_values=cache)
            for store in cache.stores:
                store.release()
            logits[spec] = llama(ids[:, -1:], past_key_values=cache).logits
        if spec != "dynamic":
            assert cache.stores[0].quantized_length > 0
    err2 = (logits[f"int2:{SMALL}"] - logits["dynamic"]).abs().max()
    err8 = (logits[f"int8:{SMALL}"] - logits["dynamic"]).abs().max()
    assert err2 > 1e-4 and err8 < err2 / 10


def test_model_generate_greedy_sampling_and_beam_search(llama, tokenizer) -> None:
    spec = f"int4:{SMALL}"
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    ref = generate(llama, tokenizer, PROMPTS[0], cache=spec, max_new_tokens=8, eos_token_id=[])
    cache = KVCache.from_spec(spec, llama.config)
    with torch.no_grad():  # no padding: transformers' own attention and masks work on it
        out = llama.generate(ids, past_key_values=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ref.token_ids[0]
    assert isinstance(cache.stores[0], QuantizedLayer) and cache.stores[0].quantized_length > 0
    # beam search on a padded batch: each row's beams equal that row's beam search alone
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    beams = {"num_beams": 3, "do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6}
    with torch.no_grad(), kvcache.enable(llama):
        both = llama.generate(**batch, past_key_values=KVCache.from_spec(spec, llama.config), **beams)
        for row, prompt in enumerate(PROMPTS[:2]):
            one = tokenizer(prompt, return_tensors="pt")
            alone = llama.generate(**one, past_key_values=KVCache.from_spec(spec, llama.config), **beams)
            assert both[row, -6:].tolist() == alone[0, -6:].tolist()
        torch.manual_seed(0)
        sampled = llama.generate(**batch, past_key_values=KVCache.from_spec(spec, llama.config),
                                 do_sample=True, top_k=5, max_new_tokens=6, min_new_tokens=6)
    assert sampled.shape == (2, batch["input_ids"].shape[1] + 6)


@pytest.mark.parametrize("spec", ["keyformer:budget=0.5+int4", "h2o:budget=0.25+int4", "int8+static",
                                  "snapkv:budget=0.5+int2+static", "streaming:budget=0.5+int8",
                                  "h2o:budget=0.25+int4+offload"])
def test_compositions_run_end_to_end(llama, tokenizer, spec: str) -> None:
    for bits in ("int2", "int4", "int8"):
        spec = spec.replace(bits, f"{bits}:{SMALL}")
    result = generate(llama, tokenizer, PROMPTS, cache=spec, max_new_tokens=12, eos_token_id=[])
    assert all(len(ids) == 12 for ids in result.token_ids)
    full = generate(llama, tokenizer, PROMPTS, max_new_tokens=12, eos_token_id=[])
    assert result.stats.cache_bytes < full.stats.cache_bytes


def test_a_policy_halves_the_quantized_cache(llama, tokenizer) -> None:
    prompt = " ".join(["word", "other", "thing"] * 100)  # 1700 tokens
    quant = generate(llama, tokenizer, prompt, cache="int4", max_new_tokens=4, eos_token_id=[])
    half = generate(llama, tokenizer, prompt, cache="h2o:budget=0.5+int4", max_new_tokens=4, eos_token_id=[])
    ratio = half.stats.cache_bytes / quant.stats.cache_bytes
    assert 0.4 < ratio < 0.65, ratio


def test_the_cli_runs_a_quantized_spec() -> None:
    from typer.testing import CliRunner

    from kvcache.cli import app

    spec = "h2o:budget=0.5+int4:group=8,residual=8"
    args = ["generate", "The list type is a mutable sequence", "--cache", spec, "-n", "24", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["cache"] == spec and payload["stats"]["new_tokens"] == 24


def test_a_policy_selects_the_prompt_before_it_is_quantized_in_every_layer(llama, tokenizer) -> None:
    """Each layer is brought to its budget while its prompt is still full precision (the last one too,
    when its attention is done), so the kept tokens are those of the same policy on a dense cache."""
    from kvcache.hooks import DecodeHooks

    held: dict[str, list[torch.Tensor]] = {}
    for spec in ("keydiff:budget=0.5", f"keydiff:budget=0.5+int2:{SMALL}"):
        def snap(cache, spec=spec):
            held[spec] = [s.positions[:, :, :s.physical_length].clone() for s in cache.stores]
        generate(llama, tokenizer, PROMPTS, cache=spec, max_new_tokens=2, eos_token_id=[],
                 hooks=DecodeHooks(after_prefill=snap))
    for dense, quant in zip(*held.values(), strict=True):
        for b in range(dense.shape[0]):
            for h in range(dense.shape[1]):
                d, q = dense[b, h], quant[b, h]
                assert torch.equal(d[d >= 0].sort().values, q[q >= 0].sort().values)
