"""KVCache as a transformers Cache: exactness against recompute, batching, beams, sampling, manual loops."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

import kvcache
from kvcache import compat
from kvcache.cache import KVCache, model_cache_shape
from kvcache.errors import KVCacheError, UnsupportedSpecError
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.layers.quantized import QuantizedLayer
from kvcache.models.random import ARCHITECTURES, random_config, random_model

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*deprecated.*")

EXACT_ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "gpt_neox")
SPECS = ("dynamic", "static:capacity=24")
PROMPT, NEW = 7, 6


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], torch.nn.Module]:
    return {}


def get_model(cache: dict, arch: str, impl: str) -> torch.nn.Module:
    if (arch, impl) not in cache:
        cache[(arch, impl)] = random_model(arch, attn_implementation=impl, seed=1)
    return cache[(arch, impl)]


def prompt(length: int = PROMPT, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, length), generator=g)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", EXACT_ARCHS)
def test_greedy_matches_recompute(models, arch: str, impl: str) -> None:
    model = get_model(models, arch, impl)
    ids = prompt()
    with torch.no_grad():
        for spec in SPECS:
            for use_kvcache_attention in (False, True):
                cache = KVCache.from_spec(spec, model.config)
                handle = kvcache.enable(model) if use_kvcache_attention else None
                try:
                    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache,
                                         output_logits=True, return_dict_in_generate=True)
                finally:
                    if handle is not None:
                        handle.disable()
                seq = out.sequences
                # no-cache recompute of the whole sequence: logits for every generated position at once
                ref = model(seq, use_cache=False).logits[:, PROMPT - 1 : -1]
                got = torch.stack(out.logits, 1)
                label = f"{arch}/{impl}/{spec}/enable={use_kvcache_attention}"
                assert torch.equal(seq[:, PROMPT:], ref.argmax(-1)), label
                assert (got - ref).abs().max().item() < 1e-5, label
                assert cache.get_seq_length() == cache.physical_length() == PROMPT + NEW - 1, label


@pytest.mark.parametrize("spec", SPECS)
def test_sliding_window_layers_match_recompute(spec: str) -> None:
    """Sliding-window layers keep every token; the mask applies the window (prompt + new > window)."""
    model = random_model("mistral", attn_implementation="sdpa", sliding_window=4, seed=2)
    ids = prompt(9, seed=7)
    with torch.no_grad(), kvcache.enable(model):
        cache = KVCache.from_spec(spec, model.config)
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache,
                             output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model(out.sequences, use_cache=False).logits[:, 8:-1]
        no_window = random_model("mistral", attn_implementation="sdpa", sliding_window=None, seed=2)
        full = no_window(out.sequences, use_cache=False).logits[:, 8:-1]
    assert torch.equal(out.sequences[:, 9:], ref.argmax(-1))
    assert (torch.stack(out.logits, 1) - ref).abs().max().item() < 1e-5
    assert (full - ref).abs().max().item() > 1e-3  # the window does matter at this length


def test_batch_select_indices_and_repeat(models) -> None:
    model = get_model(models, "llama", "eager")
    ids = prompt(5, seed=8, batch=2)
    cache = KVCache.from_spec("dynamic", model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        assert cache.batch_size == 4
        cache.batch_select_indices(torch.tensor([False, False, True, False]))
        got = model(ids[1:, -1:] * 0 + 5, past_key_values=cache, use_cache=True).logits
        ref = model(torch.cat([ids[1:], ids.new_full((1, 1), 5)], 1), use_cache=False).logits[:, -1:]
    assert cache.batch_size == 1
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_matches_single_prompts(models, arch: str, spec: str) -> None:
    model = get_model(models, arch, "eager")
    lengths = (5, 9, 3)
    prompts = [prompt(n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        cache = KVCache.from_spec(spec, model.config, batch_size=3)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             past_key_values=cache, output_logits=True, return_dict_in_generate=True)
        batched_logits = torch.stack(out.logits, 1)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
            assert torch.equal(out.sequences[i, width:], single.sequences[0, len(p) :]), i
            assert (batched_logits[i] - torch.stack(single.logits, 1)[0]).abs().max().item() < 1e-5, i


@pytest.mark.parametrize("spec", SPECS)
def test_beam_search_matches_transformers_dynamic_cache(models, spec: str) -> None:
    model = get_model(models, "llama", "eager")
    ids = prompt(6, seed=3, batch=2)
    kwargs = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=3, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
        # static buffers are sized for batch 2 and re-allocated for the 2 x 3 beams on the first update
        cache = KVCache.from_spec(spec, model.config, batch_size=2)
        ours = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.allclose(ours.sequences_scores, ref.sequences_scores, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_sampling_matches_transformers_dynamic_cache(models, spec: str) -> None:
    model = get_model(models, "qwen2", "sdpa")
    ids = prompt(5, seed=4, batch=2)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    with torch.no_grad():
        torch.manual_seed(123)
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
        torch.manual_seed(123)
        cache = KVCache.from_spec(spec, model.config, batch_size=2)
        ours = model.generate(ids, past_key_values=cache, **kwargs)
    assert ours.shape == (2, 5 + NEW)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("spec", SPECS)
def test_manual_loop_with_cache_position(models, spec: str) -> None:
    """The hand-written loop of the HF cache notebook: cache_position + growing attention mask."""
    model = get_model(models, "llama", "sdpa")
    ids = prompt(6, seed=5)
    cache = KVCache.from_spec(spec, model.config)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cache_position = torch.arange(ids.shape[1])
    generated = ids
    with torch.no_grad():
        for _ in range(NEW):
            out = model(**inputs, cache_position=cache_position, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1:].argmax(-1)
            ref = model(generated, use_cache=False).logits[:, -1]
            assert (out.logits[:, -1] - ref).abs().max().item() < 1e-5
            generated = torch.cat([generated, next_ids], dim=-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=-1)
            inputs = {"input_ids": next_ids, "attention_mask": mask}
            cache_position = cache_position[-1:] + 1
    assert cache.get_seq_length() == 6 + NEW - 1


@pytest.mark.parametrize("spec", SPECS)
def test_positions_follow_logical_length_after_eviction(models, spec: str) -> None:
    """After keep(), positions (RoPE) continue from tokens *seen*, the mask covers slots *held*.

    Reference: the full sequence without a cache, where the last token's row of a 4D mask hides the evicted
    tokens. If the cache used its physical length for positions, RoPE would rotate the new token wrongly.
    """
    model = get_model(models, "llama", "eager")
    ids = prompt(11, seed=6)
    past, last = ids[:, :10], ids[:, 10:]
    keep = torch.tensor([0, 2, 3, 6, 8, 9])
    cache = KVCache.from_spec(spec, model.config)
    with torch.no_grad():
        model(past, past_key_values=cache, use_cache=True)
        for store in cache.stores:
            h = store.keys_values()[0].shape[1]
            store.keep(keep.expand(1, h, -1))
        assert cache.get_seq_length() == 10 and cache.physical_length() == 6
        assert cache.layers[0].get_mask_sizes(1) == ((24 if "static" in spec else 7), 4)
        with kvcache.enable(model):  # also runs the kvcache attention over a shrunk, offset cache
            got = model(last, past_key_values=cache, use_cache=True).logits[:, -1]
        allowed = torch.ones(11, 11).tril().bool()
        allowed[10, :10] = False
        allowed[10, keep] = True
        mask4d = torch.zeros(1, 1, 11, 11).masked_fill(~allowed, torch.finfo(torch.float32).min)
        ref = model(ids, attention_mask=mask4d, use_cache=False).logits[:, -1]
        unmasked = model(ids, use_cache=False).logits[:, -1]
    assert cache.get_seq_length() == 11 and cache.physical_length() == 7
    assert (got - ref).abs().max().item() < 1e-5
    assert (got - unmasked).abs().max().item() > 1e-3  # eviction did change the result


def test_from_spec_shapes_and_layouts() -> None:
    gqa = random_config("llama", num_layers=3, num_heads=4, num_kv_heads=2, hidden=64)
    assert model_cache_shape(gqa) == (3, [2, 2, 2], [16, 16, 16])
    assert model_cache_shape(random_config("gpt2", num_layers=2, num_heads=4)) == (2, [4, 4], [16, 16])
    cache = KVCache.from_spec("dynamic", gqa)
    assert len(cache.layers) == 3 and all(isinstance(s, DynamicLayer) for s in cache.stores)
    assert cache.nbytes() == 0 and not cache.is_compileable
    static = KVCache.from_spec("static", gqa, batch_size=2, max_cache_len=40, dtype=torch.float16)
    assert all(isinstance(s, StaticLayer) and s.capacity == 40 for s in static.stores)
    assert static.is_compileable and static.get_max_length() == 40
    # layers x B*H*T x ((k, v) x D x fp16 bytes + one int32 position)
    assert static.nbytes() == 3 * (2 * 2 * 40) * (2 * 16 * 2 + 4)
    explicit = KVCache.from_spec("static:capacity=8", gqa, max_cache_len=40)
    assert explicit.stores[0].capacity == 8  # the spec's capacity wins
    assert str(static.spec) == "static"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_cache_shape_is_what_the_model_stores(arch: str) -> None:
    """Layer count, KV heads and head dim as the model's own cache receives them, on every release (kvcache
    reads them through transformers' helpers where they exist, else from the config as older models do)."""
    model = random_model(arch, num_layers=3, num_heads=4, hidden=64)
    hf_cache = DynamicCache()
    with torch.no_grad():
        model(prompt(3), past_key_values=hf_cache, use_cache=True)
    stored = [layer.keys.shape for layer in hf_cache.layers]
    n, heads, dims = model_cache_shape(model.config)
    assert (n, heads, dims) == (len(stored), [s[1] for s in stored], [s[3] for s in stored])


def test_from_spec_errors() -> None:
    config = random_config("llama")
    with pytest.raises(KVCacheError, match="capacity=N"):
        KVCache.from_spec("static", config)
    assert isinstance(KVCache.from_spec("int4", config).stores[0], QuantizedLayer)
    with pytest.raises(UnsupportedSpecError, match="available: .*dynamic"):
        registry = dict(kvcache.spec.REGISTRY)
        try:  # a kind that parses but is not built in this version
            kvcache.spec.REGISTRY["quantized"] = dataclasses.replace(registry["quantized"], available=False)
            KVCache.from_spec("int4", config)
        finally:
            kvcache.spec.REGISTRY.update(registry)
    with pytest.raises(ValueError):
        KVCache.from_spec("dynamc", config)


def test_static_overflow_from_generate_names_the_fix(models) -> None:
    model = get_model(models, "llama", "eager")
    cache = KVCache.from_spec("static:capacity=9", model.config)
    with torch.no_grad(), pytest.raises(kvcache.CacheCapacityError, match="capacity is 9"):
        model.generate(prompt(), max_new_tokens=8, do_sample=False, past_key_values=cache)


def test_nbytes_tracks_growth_and_reset(models) -> None:
    model = get_model(models, "llama", "eager")
    cache = KVCache.from_spec("dynamic", model.config)
    with torch.no_grad():
        model(prompt(), past_key_values=cache, use_cache=True)
    held = sum(s.keys_values()[0].nbytes + s.keys_values()[1].nbytes for s in cache.stores)
    assert cache.nbytes() >= held > 0
    assert cache.nbytes() == sum(s.nbytes() for s in cache.stores)
    cache.reset()
    assert cache.nbytes() == 0 and cache.get_seq_length() == 0


def test_crop_follows_transformers_convention(models) -> None:
    model = get_model(models, "llama", "eager")
    cache = KVCache.from_spec("dynamic", model.config)
    ids = prompt(8)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        cache.crop(-3)
        assert cache.get_seq_length() == 5
        got = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
        ref = model(ids, use_cache=False).logits[:, 5:]
    assert (got - ref).abs().max().item() < 1e-5
    # crop(n > 0): transformers < 5.20 keeps the first n tokens, later releases refuse; as DynamicCache does.
    hf_cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=hf_cache, use_cache=True)
    if compat.crop_keeps_length():
        hf_cache.crop(2)
        cache.crop(2)
        assert cache.get_seq_length() == hf_cache.get_seq_length() == 2 and cache.physical_length() == 2
    else:
        with pytest.raises(ValueError, match="negative"):
            hf_cache.crop(2)
        with pytest.raises(KVCacheError, match="negative"):
            cache.crop(2)
