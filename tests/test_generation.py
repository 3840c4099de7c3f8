"""kvcache.generate: cached decoding equals a no-cache recompute; padding, stopping, capacity, sampling."""

from __future__ import annotations

import pytest
import torch

import kvcache.generation as generation_module
from kvcache import CacheCapacityError, generate
from kvcache.cache import KVCache
from kvcache.layers.dense import DynamicLayer
from kvcache.models.random import ARCHITECTURES, random_model
from kvcache.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer
from kvcache.sampling import Sampler, _top_p_filter
from kvcache.stopping import StopChecker, trim_at_stop

PROMPTS = ["Hello there, world", "a", "The quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return random_model(request.param, seed=1)


def recompute_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Reference: argmax loop that re-runs the whole sequence without any cache at every step."""
    ids = list(tokenizer(prompt)["input_ids"])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_batch_equals_recompute(model, tokenizer, cache):
    # Three prompts of different lengths in one left-padded batch, prefill in chunks of 4.
    result = generate(model, tokenizer, PROMPTS, cache=cache, max_new_tokens=8, eos_token_id=[],
                      prefill_chunk_size=4)
    assert result.finish_reasons == ["length"] * 3
    assert result.cache == cache
    for prompt, ids, text in zip(PROMPTS, result.token_ids, result.texts, strict=True):
        assert ids == recompute_greedy(model, tokenizer, prompt, 8)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ("llama", "gpt2")])
def test_every_architecture_matches_recompute(tokenizer, arch):
    # BLOOM/MPT take no position_ids (ALiBi from the mask), OPT offsets learned positions, GPT-J/CodeGen
    # rotate part of the head: all must decode a left-padded batch like a full recompute.
    model = random_model(arch, seed=1)
    for cache in ("dynamic", "static"):
        result = generate(model, tokenizer, PROMPTS, cache=cache, max_new_tokens=4, eos_token_id=[])
        for prompt, ids in zip(PROMPTS, result.token_ids, strict=True):
            assert ids == recompute_greedy(model, tokenizer, prompt, 4), (arch, cache, prompt)


def test_batch_equals_each_prompt_alone(model, tokenizer):
    batch = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    for prompt, ids in zip(PROMPTS, batch.token_ids, strict=True):
        alone = generate(model, tokenizer, prompt, max_new_tokens=8, eos_token_id=[])
        assert alone.token_ids == [ids]


def test_sdpa_and_chunk_size_do_not_change_tokens(tokenizer):
    eager = random_model("llama", seed=3)
    sdpa = random_model("llama", seed=3, attn_implementation="sdpa")
    ref = generate(eager, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[], prefill_chunk_size=1)
    for m, chunk in ((eager, 512), (sdpa, 3), (sdpa, 512)):
        got = generate(m, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[], prefill_chunk_size=chunk)
        assert got.token_ids == ref.token_ids


def test_stop_string_trims_text_and_ends_row(model, tokenizer):
    # A vocabulary the size of the tokenizer's, so (nearly) every new token is a character of text: random
    # weights differ across transformers releases, and ids past the tokenizer decode to nothing.
    model = random_model(model.config.model_type, seed=1, vocab_size=TINY_VOCAB_SIZE)
    full = generate(model, tokenizer, PROMPTS[0], max_new_tokens=16, eos_token_id=[])
    assert len(full.texts[0]) >= 7
    text = full.texts[0]
    stop = text[5:7]
    cut = text.find(stop)
    got = generate(model, tokenizer, PROMPTS[0], max_new_tokens=16, eos_token_id=[], stop=[stop, "\x00never"])
    assert got.finish_reasons == ["stop"]
    assert got.texts == [text[:cut]]
    # The row ends at the token that completed the stop string: a prefix of the unstopped run.
    n = len(got.token_ids[0])
    assert got.token_ids[0] == full.token_ids[0][:n]
    assert stop in tokenizer.decode(got.token_ids[0]) and stop not in tokenizer.decode(got.token_ids[0][:-1])


def test_eos_ends_each_row_at_its_first_eos(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_token_id=[])
    eos = full.token_ids[0][3]
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_token_id=eos)
    for row, ids in enumerate(full.token_ids):
        if eos in ids:
            # The other rows keep decoding correctly while finished rows are fed padding.
            assert got.token_ids[row] == ids[: ids.index(eos) + 1]
            assert got.finish_reasons[row] == "eos"
        else:
            assert got.token_ids[row] == ids
            assert got.finish_reasons[row] == "length"
    assert got.finish_reasons[0] == "eos"


def test_eos_defaults_to_generation_config(tokenizer):
    model = random_model("llama", seed=1)
    full = generate(model, tokenizer, PROMPTS[2], max_new_tokens=10, eos_token_id=[])
    eos = full.token_ids[0][4]
    model.generation_config.eos_token_id = [eos]
    got = generate(model, tokenizer, PROMPTS[2], max_new_tokens=10)
    assert got.finish_reasons == ["eos"]
    assert got.token_ids[0] == full.token_ids[0][: full.token_ids[0].index(eos) + 1]


def test_static_capacity_stops_cleanly(model, tokenizer):
    prompt_len = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    capacity = prompt_len + 4
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_token_id=[])
    got = generate(model, tokenizer, PROMPTS, cache=f"static:capacity={capacity}", max_new_tokens=12,
                   eos_token_id=[])
    assert got.finish_reasons == ["capacity"] * 3
    # The prompt fills prompt_len slots; each of the 4 free slots takes one decode step; the prefill
    # itself yields one token: 5 tokens, identical to the unbounded run.
    assert got.token_ids == [ids[:5] for ids in full.token_ids]
    # max_new_tokens reached exactly as the cache fills: "length", not "capacity".
    exact = generate(model, tokenizer, PROMPTS, cache=f"static:capacity={capacity}", max_new_tokens=5,
                     eos_token_id=[])
    assert exact.finish_reasons == ["length"] * 3


def test_prompt_over_capacity_is_a_clear_error(model, tokenizer):
    with pytest.raises(CacheCapacityError, match="static:capacity"):
        generate(model, tokenizer, PROMPTS[0], cache="static:capacity=4", max_new_tokens=2)


def test_sampling_is_reproducible_with_a_seed(model, tokenizer):
    kwargs = dict(max_new_tokens=8, temperature=1.5, eos_token_id=[])
    a = generate(model, tokenizer, PROMPTS, seed=7, **kwargs)
    b = generate(model, tokenizer, PROMPTS, seed=7, **kwargs)
    c = generate(model, tokenizer, PROMPTS, seed=8, **kwargs)
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids


def test_top_k_1_and_tiny_top_p_equal_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    top_k = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[], temperature=2.0, top_k=1,
                     seed=0)
    top_p = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[], temperature=2.0,
                     top_p=1e-6, seed=0)
    assert top_k.token_ids == greedy.token_ids
    assert top_p.token_ids == greedy.token_ids


def test_stats_count_tokens_and_cache_memory(model, tokenizer):
    result = generate(model, tokenizer, PROMPTS, cache="static", max_new_tokens=6, eos_token_id=[])
    stats = result.stats
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert stats.batch_size == 3
    assert stats.prompt_tokens == sum(lengths)
    assert stats.new_tokens == 18
    assert stats.decode_steps == 5
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    # static sized to longest prompt + new tokens: K and V (float32) and one int32 position per slot and
    # head, every layer
    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = layers * 3 * kv_heads * (max(lengths) + 6) * (2 * head_dim * 4 + 4)
    assert stats.cache_bytes == expected == stats.peak_cache_bytes
    assert set(stats.to_dict()) >= {"prompt_tokens", "new_tokens", "prefill_tokens_per_s",
                                    "decode_tokens_per_s", "cache_bytes", "peak_cache_bytes"}


def test_tokenizer_without_pad_token_is_not_modified(model):
    tok = tiny_tokenizer()
    tok.pad_token = None
    ref = generate(model, tiny_tokenizer(), PROMPTS, max_new_tokens=4, eos_token_id=[])
    got = generate(model, tok, PROMPTS, max_new_tokens=4, eos_token_id=[])
    assert got.token_ids == ref.token_ids
    assert tok.pad_token is None and tok.padding_side == tiny_tokenizer().padding_side


def test_progress_bar_does_not_change_output(model, tokenizer):
    a = generate(model, tokenizer, PROMPTS[1], max_new_tokens=5, eos_token_id=[], progress=True)
    b = generate(model, tokenizer, PROMPTS[1], max_new_tokens=5, eos_token_id=[], progress=False)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0, temperature=1.0), "top_k"),
        (dict(top_p=1.5, temperature=1.0), "top_p"),
        (dict(prefill_chunk_size=0), "prefill_chunk_size"),
        (dict(cache="stattic"), "stattic"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_arguments_raise_value_error(model, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, "hi", **kwargs)


def test_empty_prompt_list_and_vocab_mismatch(tokenizer):
    small = random_model("llama", vocab_size=32)
    with pytest.raises(ValueError, match="prompts"):
        generate(small, tokenizer, [])
    with pytest.raises(ValueError, match="vocabulary"):
        generate(small, tokenizer, "xyz")


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    kept = torch.isfinite(_top_p_filter(probs.log(), 0.6))
    assert kept.tolist() == [[False, True, True, False]]
    assert torch.isfinite(_top_p_filter(probs.log(), 0.5)).tolist() == [[False, True, False, False]]
    assert Sampler().greedy and not Sampler(temperature=0.5).greedy


def test_stop_checker_and_trim(tokenizer):
    checker = StopChecker(tokenizer, eos_token_ids=[2], stop=["END"])
    ids = tokenizer("xxEN", add_special_tokens=False)["input_ids"]
    assert checker.check(ids) is None
    ids += tokenizer("D!", add_special_tokens=False)["input_ids"][:1]
    assert checker.check(ids) == "stop"
    assert checker.text(ids, "stop") == "xx"
    assert checker.check([5, 2]) == "eos"
    assert trim_at_stop("abcENDdefEND", ["def", "END"]) == "abc"
    assert trim_at_stop("abc", ["x"]) == "abc"


def test_capacity_error_from_a_growable_layout_ends_cleanly(model, tokenizer, monkeypatch):
    # A layout whose limit is not visible up front (max_capacity None) refuses a write from `update`:
    # generation must end with "capacity" and keep the tokens produced so far.
    class LimitedLayer(DynamicLayer):
        def update(self, key, value, valid=None):
            if self.physical_length + key.shape[2] > 24:
                raise CacheCapacityError("limited layer is full")
            return super().update(key, value, valid)

    def limited(spec, config, **kwargs):
        return KVCache([LimitedLayer() for _ in range(config.num_hidden_layers)], spec)

    full = generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_token_id=[])
    monkeypatch.setattr(generation_module.KVCache, "from_spec", staticmethod(limited))
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, eos_token_id=[])
    prompt_len = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert got.finish_reasons == ["capacity"] * 3
    assert got.token_ids == [ids[: 24 - prompt_len + 1] for ids in full.token_ids]


def test_generate_ids_equals_generate_on_the_same_tokens(model, tokenizer):
    from kvcache.generation import generate_ids
    from kvcache.prompts import left_pad

    ids, mask = left_pad(tokenizer, PROMPTS, None)
    for cache in ("dynamic", "h2o:budget=0.5"):
        ref = generate(model, tokenizer, PROMPTS, cache=cache, max_new_tokens=6, eos_token_id=[])
        got = generate_ids(model, tokenizer, ids, mask, cache=cache, max_new_tokens=6, eos_token_id=[])
        assert got.token_ids == ref.token_ids and got.texts == ref.texts
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        generate_ids(model, tokenizer, ids[0], max_new_tokens=2)


def test_a_tiny_top_p_samples_the_most_likely_token():
    # found by fuzzing: cumsum rounding made the mass before the top token exceed top_p=2.7e-70
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    got = Sampler(temperature=1.0, top_p=2.689275455775686e-70)(logits)
    assert torch.equal(got, logits.argmax(-1))
