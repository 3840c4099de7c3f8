"""Retention policies: selection arithmetic, scores against hand computations, budgets held, batches, every
entry point (kvcache.generate, model.generate with greedy/sampling/beams), static layout."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kvcache
import kvcache.resources
from kvcache import KVCacheError, generate
from kvcache.cache import KVCache
from kvcache.hooks import DecodeHooks
from kvcache.layers.dense import DynamicLayer
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.policies import POLICIES
from kvcache.policies.keyformer import Keyformer, gumbel_scores, temperature
from kvcache.policies.layer import PolicyLayer
from kvcache.policies.runner import PolicyRunner
from kvcache.policies.select import select
from kvcache.spec import CacheSpec

warnings.filterwarnings("ignore", message=".*deprecated.*")

PROMPTS = ["Hello there, world, how are you today", "a b", "The quick brown fox jumps over it"]
NAMES = list(POLICIES)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return random_model("llama", seed=1)


def spec_of(name: str, **params: object) -> str:
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in params.items())


# ----- the shared selection ------------------------------------------------------------------------------
def test_select_keeps_window_then_top_scores_per_row_and_head_and_padding_last() -> None:
    # Row 0: 2 pad slots then 6 real tokens; row 1: 8 real tokens. Two KV heads with different scores.
    positions = torch.tensor([[-1, -1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]).repeat_interleave(2, 0)
    positions = positions.view(2, 2, 8)
    scores = torch.tensor([
        [[9., 9., 5., 1., 4., 0., 2., 3.], [9., 9., 0., 7., 1., 6., 2., 3.]],
        [[5., 1., 4., 0., 2., 3., 8., 6.], [0., 9., 1., 8., 2., 7., 3., 4.]],
    ])
    budget = torch.tensor([3, 4])  # row 0 keeps 3 real tokens, row 1 keeps 4
    recent = torch.tensor([1, 1])  # the newest real token of each row always stays
    idx, invalid = select(scores, positions, budget, recent)
    assert idx.shape == invalid.shape == (2, 2, 4)
    kept = [[sorted(idx[b, h][~invalid[b, h]].tolist()) for h in range(2)] for b in range(2)]
    # row 0 head 0: newest (slot 7) + top scores among real slots 2..6: 5 (slot 2), 4 (slot 4)
    assert kept[0][0] == [2, 4, 7]
    # row 0 head 1: newest (7) + 7 (slot 3), 6 (slot 5); the pads' 9s never count
    assert kept[0][1] == [3, 5, 7]
    # row 1 head 0: newest (7) + 8 (slot 6), 5 (slot 0), 4 (slot 2)
    assert kept[1][0] == [0, 2, 6, 7]
    assert kept[1][1] == [1, 3, 5, 7]
    # the rectangle is filled for row 0 with one invalid slot, never a pad kept as valid
    assert invalid[0].sum(-1).tolist() == [1, 1] and invalid[1].sum().item() == 0


def test_select_with_budget_over_the_real_tokens_keeps_them_all() -> None:
    positions = torch.tensor([[[-1, 0, 1, 2]]])
    idx, invalid = select(torch.zeros(1, 1, 4), positions, torch.tensor([5]), torch.tensor([0]))
    assert sorted(idx[0, 0][~invalid[0, 0]].tolist()) == [1, 2, 3]
    assert idx.shape[-1] == 4 and invalid[0, 0].sum() == 1  # the pad slot is kept only as invalid


# ----- policy scores against hand computations -----------------------------------------------------------
def test_keyformer_score_is_the_gumbel_softmax_summed_over_real_queries() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 3, 5, generator=g)
    noise = -torch.log(-torch.log(torch.rand(1, 2, 3, 5, generator=g)))
    tau = 1.5
    got = gumbel_scores(logits, noise, tau)
    for h in range(2):
        for q in range(3):
            row = [(logits[0, h, q, k] + noise[0, h, q, k]) / tau for k in range(5)]
            denom = sum(math.exp(float(x)) for x in row)
            for k in range(5):
                assert abs(got[0, h, q, k].item() - math.exp(float(row[k])) / denom) < 1e-6
    # a masked logit (dtype minimum) gets nothing
    logits[0, 0, 0, 0] = torch.finfo(torch.float32).min
    assert gumbel_scores(logits, noise, tau)[0, 0, 0, 0].item() == 0.0


def test_keyformer_temperature_schedule_and_window() -> None:
    assert temperature((1.0, 2.0), 0, 10) == 1.0
    assert temperature((1.0, 2.0), 5, 10) == 1.5
    assert temperature((1.0, 2.0), 10, 10) == 2.0
    assert temperature((1.0, 2.0), 7, None) == 1.0  # length unknown: the initial temperature
    policy = Keyformer(budget=0.5, window=0.3)
    assert policy.recent(torch.tensor([10, 7, 3])).tolist() == [3, 2, 0]
    assert policy.row_budget(11) == 6 and Keyformer(tokens=4).row_budget(100) == 4


def _runner_layer(name: str, keys: torch.Tensor, positions_valid: torch.Tensor | None = None,
                  **params: object) -> tuple[PolicyRunner, PolicyLayer]:
    policy = POLICIES[name].from_params(CacheSpec.parse(spec_of(name, **params)).policy.params)
    layer = PolicyLayer(DynamicLayer())
    runner = PolicyRunner(policy, [layer])
    layer.update(keys, keys.clone(), positions_valid)
    return runner, layer


def test_knorm_keydiff_streaming_scores_by_hand() -> None:
    keys = torch.tensor([[[[3., 0.], [1., 0.], [0., 2.], [2., 2.], [0.5, 0.]]]])  # (1, 1, 5, 2)
    runner, layer = _runner_layer("knorm", keys, tokens=2)
    norms = torch.tensor([[[3., 1., 2., math.sqrt(8), .5]]])
    assert torch.allclose(runner.policy.score(runner, layer), -norms)
    runner, layer = _runner_layer("keydiff", keys, tokens=2)
    unit = torch.nn.functional.normalize(keys[0, 0], dim=-1)
    anchor = torch.nn.functional.normalize(unit.mean(0), dim=0)
    assert torch.allclose(runner.policy.score(runner, layer)[0, 0], -(unit @ anchor), atol=1e-6)
    # streaming: the first real token is a sink (left padding is not), then newer is better
    valid = torch.tensor([[False, True, True, True, True]])
    runner, layer = _runner_layer("streaming", keys, valid, tokens=3, sinks=1)
    score = runner.policy.score(runner, layer)[0, 0]
    assert score[1] == float("inf") and score[4] > score[3] > score[2]
    runner.evict(layer)
    assert layer.held_positions()[0, 0].tolist() == [1, 3, 4]  # sink + the two newest


def test_h2o_tova_snapkv_accumulate_what_attention_gave() -> None:
    keys = torch.randn(1, 1, 4, 2)
    runner, layer = _runner_layer("h2o", keys, tokens=2)
    runner.observe(0, torch.tensor([[[1., 2., 3., 4.]], [[1., 0., 0., 0.]]]).view(1, 2, 4))  # 2 query heads
    runner.observe(0, torch.tensor([[0., 1., 0., 0.], [0., 0., 0., 1.]]).view(1, 2, 4))
    assert layer.scores.tolist() == [[[2., 3., 3., 5.]]]  # summed over the group and accumulated
    runner, layer = _runner_layer("tova", keys, tokens=2)
    runner.observe(0, torch.tensor([[0.1, 0.2, 0.3, 0.4]]).view(1, 1, 1, 4))
    runner.observe(0, torch.tensor([[0.4, 0.3, 0.2, 0.1]]).view(1, 1, 1, 4))
    assert torch.allclose(layer.scores, torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]))  # only the current query
    runner, layer = _runner_layer("snapkv", torch.randn(1, 1, 10, 2), tokens=2, observe=2)
    window = torch.zeros(1, 1, 2, 10)
    window[0, 0, 0, 0] = window[0, 0, 1, 9] = 1.0  # the two observed queries look at the ends
    runner.observe(0, window)
    # summed over the window, averaged over up to 7 neighbours (only the slots that exist count)
    expected = torch.tensor([1 / 4, 1 / 5, 1 / 6, 1 / 7, 0, 0, 1 / 7, 1 / 6, 1 / 5, 1 / 4])
    assert torch.allclose(layer.scores[0, 0], expected)


# ----- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_budget_covering_everything_reproduces_the_full_cache(llama, tokenizer, name: str) -> None:
    full = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    got = generate(llama, tokenizer, PROMPTS, cache=f"{name}:tokens=64", max_new_tokens=8, eos_token_id=[])
    assert got.token_ids == full.token_ids


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_physical_length_holds_the_budget_after_prefill_and_every_step(llama, tokenizer, name: str,
                                                                        every: int) -> None:
    seen: list[tuple[str, list[int], int]] = []

    def record(when: str):  # noqa: ANN202
        return lambda cache: seen.append((when, [s.physical_length for s in cache.stores], cache.nbytes()))

    spec = f"{name}:budget=0.5,every={every}"
    result = generate(llama, tokenizer, PROMPTS, cache=spec, max_new_tokens=10, eos_token_id=[],
                      hooks=DecodeHooks(after_prefill=record("prefill"), after_step=record("step")))
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    budget = max(math.ceil(0.5 * n) for n in lengths)
    assert seen[0][0] == "prefill" and all(n == budget for n in seen[0][1])
    steps = [s for s in seen if s[0] == "step"]
    assert len(steps) == 9
    full = generate(llama, tokenizer, PROMPTS, max_new_tokens=10, eos_token_id=[])
    for _, held, nbytes in steps:
        assert all(n <= budget + every - 1 for n in held), (name, every, held)
        assert nbytes < full.stats.cache_bytes  # memory is really freed, at every step
    assert max(n for _, held, _ in steps for n in held) == budget + every - 1
    assert result.stats.cache_bytes < full.stats.cache_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_left_padded_batch_equals_each_row_alone(tokenizer, arch: str) -> None:
    model = random_model(arch, seed=3)
    for name in (n for n in NAMES if n != "keyformer"):  # Keyformer's noise depends on the batch's shape
        spec = f"{name}:budget=0.5"
        batch = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=6, eos_token_id=[])
        for prompt, ids in zip(PROMPTS, batch.token_ids, strict=True):
            alone = generate(model, tokenizer, prompt, cache=spec, max_new_tokens=6, eos_token_id=[])
            assert alone.token_ids == [ids], (arch, name, prompt)


def test_keyformer_is_reproducible_with_a_seed_and_differs_across_seeds(llama, tokenizer) -> None:
    runs = [generate(llama, tokenizer, PROMPTS, cache="keyformer:tokens=3", max_new_tokens=12,
                     eos_token_id=[], seed=s).token_ids for s in (0, 0, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert any(r != runs[0] for r in runs[2:])  # the noise does steer the selection


def test_a_long_prompt_is_compressed_while_it_streams_in(llama, tokenizer) -> None:
    after_chunk: list[int] = []
    prompt = " ".join(["word"] * 300)
    result = generate(llama, tokenizer, prompt, cache="h2o:tokens=32", max_new_tokens=4, eos_token_id=[],
                      prefill_chunk_size=64,
                      hooks=DecodeHooks(after_prefill_chunk=lambda c: after_chunk.append(
                          c.physical_length())))
    assert len(after_chunk) >= 4 and max(after_chunk) <= 32
    full = generate(llama, tokenizer, prompt, max_new_tokens=4, eos_token_id=[], prefill_chunk_size=64)
    # never more than budget + one chunk (+ the dynamic layer's headroom) in memory, against the whole prompt
    assert result.stats.peak_cache_bytes < full.stats.peak_cache_bytes / 2.5


@pytest.mark.parametrize("name", ["h2o", "keydiff", "tova"])
def test_static_layout_gives_the_dynamic_tokens(llama, tokenizer, name: str) -> None:
    dynamic = generate(llama, tokenizer, PROMPTS, cache=f"{name}:budget=0.5", max_new_tokens=8,
                       eos_token_id=[])
    static = generate(llama, tokenizer, PROMPTS, cache=f"{name}:budget=0.5+static", max_new_tokens=8,
                      eos_token_id=[])
    assert static.token_ids == dynamic.token_ids


@pytest.mark.parametrize("name", ["h2o", "streaming", "keyformer"])
def test_model_generate_greedy_equals_kvcache_generate(llama, tokenizer, name: str) -> None:
    """model.generate evicts lazily at the next update, kvcache.generate at the driver's hooks: the same
    decisions on the same scores, so the same tokens."""
    spec = f"{name}:budget=0.5"
    ref = generate(llama, tokenizer, PROMPTS[0], cache=spec, max_new_tokens=8, eos_token_id=[], seed=0)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    cache = KVCache.from_spec(spec, llama.config)
    with torch.no_grad(), kvcache.enable(llama):
        out = llama.generate(ids, past_key_values=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ref.token_ids[0]
    assert cache.physical_length() <= math.ceil(0.5 * ids.shape[1]) + 1


def test_model_generate_sampling_and_beam_search(llama, tokenizer) -> None:
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for kwargs in ({"do_sample": True, "top_k": 5}, {"num_beams": 3, "do_sample": False}):
        cache = KVCache.from_spec("h2o:budget=0.5", llama.config)
        torch.manual_seed(0)
        with torch.no_grad(), kvcache.enable(llama):
            out = llama.generate(**ids, past_key_values=cache, max_new_tokens=6, min_new_tokens=6, **kwargs)
        assert out.shape == (3, ids["input_ids"].shape[1] + 6)
        rows = 3 * kwargs.get("num_beams", 1)
        assert cache.stores[0].batch_size == rows
        budget = math.ceil(0.5 * int(ids["attention_mask"].sum(-1).max()))
        assert all(s.physical_length <= budget + 1 for s in cache.stores)
        assert all(s.scores.shape[:2] == (rows, s.held_positions().shape[1]) for s in cache.stores)


@pytest.mark.parametrize("name", ["h2o", "streaming"])
def test_model_generate_without_kvcache_attention_is_a_clear_error(llama, tokenizer, name: str) -> None:
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    cache = KVCache.from_spec(f"{name}:budget=0.5", llama.config)
    with torch.no_grad(), pytest.raises(KVCacheError, match=r"kvcache\.enable\(model\)"):
        llama.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_the_prompt_is_never_held_whole_in_every_layer(tokenizer, name: str) -> None:
    """The prompt selection runs layer by layer inside the prefill's last forward: the peak is the compressed
    layers plus one layer's prompt, not the whole prompt in every layer."""
    model = random_model("llama", seed=1, num_layers=4)
    prompt = " ".join(["word"] * 120)  # 600 tokens, one prefill forward
    full = generate(model, tokenizer, prompt, max_new_tokens=2, eos_token_id=[], prefill_chunk_size=1024)
    got = generate(model, tokenizer, prompt, cache=f"{name}:budget=0.25", max_new_tokens=2, eos_token_id=[],
                   prefill_chunk_size=1024)
    # 4 layers: 3 compressed to a quarter (plus headroom) and one whole
    assert got.stats.peak_cache_bytes < 0.55 * full.stats.peak_cache_bytes


def test_a_huge_generation_with_a_policy_names_the_mask_not_a_policy(llama, tokenizer) -> None:
    # the cache is bounded by the policy already; the refusal must not suggest adding one
    with pytest.raises(kvcache.resources.CacheMemoryError, match="attention mask spans every token") as err:
        generate(llama, tokenizer, "hi", cache="h2o:budget=0.5", max_new_tokens=10**11)
    assert "bound the cache with a retention policy" not in str(err.value)
    with pytest.raises(kvcache.resources.CacheMemoryError, match="bound the cache with a retention policy"):
        generate(llama, tokenizer, "hi", max_new_tokens=10**11)
