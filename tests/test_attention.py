"""The kvcache attention function and kvcache.enable()."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager
from transformers.utils import logging as hf_logging

import kvcache
import kvcache.attention
from kvcache import generation
from kvcache.attention import ATTENTION_NAME, _softmax_attention, kvcache_attention
from kvcache.cache import KVCache
from kvcache.errors import KVCacheError
from kvcache.layers.dense import DynamicLayer
from kvcache.models.random import random_model
from kvcache.observe import StatsRequest

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*deprecated.*")


class FakeAttention(torch.nn.Module):
    def __init__(self, groups: int, head_dim: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.head_dim = head_dim
        self.layer_idx = 3
        self.eval()


def qkv(b: int = 2, h: int = 6, h_kv: int = 2, t_q: int = 3, t_kv: int = 7, d: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, t_q, h, d, generator=g).transpose(1, 2)  # non-contiguous, as models produce it
    k = torch.randn(b, h_kv, t_kv, d, generator=g)
    v = torch.randn(b, h_kv, t_kv, d, generator=g)
    allowed = torch.ones(t_q, t_kv).tril(diagonal=t_kv - t_q).bool()
    allowed = allowed[None, None].expand(b, 1, -1, -1).clone()
    allowed[0, :, :, 0] = False  # a padded slot in the first sequence
    additive = torch.zeros(b, 1, t_q, t_kv).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return q, k, v, allowed, additive


def test_sdpa_mode_equals_transformers_sdpa_and_math_equals_eager() -> None:
    """No statistics requested: transformers' SDPA attention, unchanged. Statistics requested: the eager math,
    which must equal eager attention with repeat_kv (GQA folded without repeating K/V)."""
    q, k, v, allowed, additive = qkv()
    module = FakeAttention(groups=3, head_dim=8)
    ref_out, ref_w = llama_eager(module, q, k, v, additive, scaling=0.3)
    sdpa_out, sdpa_w = sdpa_attention_forward(module, q, k, v, allowed, scaling=0.3)
    out, w = kvcache_attention(module, q, k, v, allowed, scaling=0.3)
    assert w is None and torch.equal(out, sdpa_out)
    assert torch.allclose(out, ref_out, atol=1e-5)
    out_e, w_e, logits = _softmax_attention(module, q, k, v, additive, 0.3, 0.0, None)
    assert out_e.shape == ref_out.shape == (2, 3, 6, 8)
    assert torch.allclose(out_e, ref_out, atol=1e-6) and torch.allclose(w_e, ref_w, atol=1e-6)
    assert torch.allclose(logits.softmax(-1), w_e, atol=1e-6)
    # a boolean mask (True = attend) gives the same result as the additive one
    out_b, w_b, _ = _softmax_attention(module, q, k, v, allowed, 0.3, 0.0, None)
    assert torch.allclose(out_b, ref_out, atol=1e-6) and torch.allclose(w_b, ref_w, atol=1e-6)
    # no mask with several queries: plain causality, aligned to the last key (as transformers leaves it out)
    q3, k3, v3 = q[:, :, :3], k[:, :, :3], v[:, :, :3]
    causal = torch.ones(3, 3).tril().bool()
    out_n, _, _ = _softmax_attention(module, q3, k3, v3, None, 0.3, 0.0, None)
    additive3 = torch.zeros(1, 1, 3, 3).masked_fill(~causal, -1e30)
    ref_n, _ = llama_eager(module, q3, k3, v3, additive3, scaling=0.3)
    assert torch.allclose(out_n, ref_n, atol=1e-6)


def test_softcap_and_default_scaling_equal_gemma2_eager() -> None:
    q, k, v, _, additive = qkv(h=4, h_kv=4)
    module = FakeAttention(groups=1, head_dim=8)
    ref_out, ref_w = gemma2_eager(module, q, k, v, additive, softcap=2.0)
    out, w = kvcache_attention(module, q, k, v, additive, softcap=2.0)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)
    plain, plain_w = kvcache_attention(module, q, k, v, additive)
    assert plain_w is None  # no cap, no statistics: SDPA mode
    assert not torch.allclose(plain, out, atol=1e-3)  # the cap did change something


def test_rejects_what_it_does_not_implement() -> None:
    q, k, v, _, additive = qkv()
    with pytest.raises(KVCacheError, match="sinks"):
        kvcache_attention(FakeAttention(3, 8), q, k, v, additive, s_aux=torch.zeros(6))
    with pytest.raises(KVCacheError, match="multiple"):
        kvcache_attention(FakeAttention(3, 8), q, k[:, :1].expand(-1, 4, -1, -1), v, additive)


class RecordingCache(KVCache):
    """Notes, per update, whether the model handed the cache its attention keyword arguments."""

    def update(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.handed.append(isinstance(kwargs.get("kwargs"), dict))
        return super().update(*args, **kwargs)


class Recorder:
    """An observer asking every layer for the same statistics."""

    def __init__(self, request: StatsRequest | None) -> None:
        self.req = request
        self.seen: list[tuple[int, torch.Tensor]] = []

    def request(self, layer_idx: int) -> StatsRequest | None:
        return self.req

    def observe(self, layer_idx: int, stats: torch.Tensor) -> None:
        self.seen.append((layer_idx, stats))


@pytest.mark.parametrize("route", ["forward", "cache"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_observer_gets_the_weights_the_model_used(arch: str, route: str) -> None:
    """The extension point for policies: one call per layer, same weights as eager's attentions.

    "forward": the arguments kvcache.generate builds (the cache as a forward argument), which reach the
    attention function on every transformers release. "cache": the cache alone, which reaches it exactly when
    the model hands its attention kwargs to ``Cache.update`` (transformers >= 5.24); otherwise the cache
    refuses to go on unobserved.
    """
    model = random_model(arch, attn_implementation="eager")
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = RecordingCache.from_spec("dynamic", model.config)
    cache.handed = []
    cache.observer = Recorder(StatsRequest("weights", "all"))
    positions = torch.arange(7).expand(2, -1)

    def extra(lo: int, hi: int) -> dict:
        if route == "cache":
            return {"past_key_values": cache, "use_cache": True}
        kwargs = generation._ForwardKwargs(model)(cache, positions[:, lo:hi], lo, hi)
        kwargs.pop("logits_to_keep", None)  # all positions' logits, to compare with the reference
        return kwargs

    with torch.no_grad():
        ref = model(ids, output_attentions=True, use_cache=False)
        with kvcache.enable(model):
            if route == "cache" and not compat_hands_kwargs(model):
                with pytest.raises(KVCacheError, match="did not run through the kvcache attention"):
                    model(ids, **extra(0, 6))
                return
            out = model(ids, **extra(0, 6))
            out2 = model(ids[:, :1], **extra(6, 7))
    seen = cache.observer.seen
    assert len(cache.handed) == 4 and len(set(cache.handed)) == 1
    assert [layer for layer, _ in seen] == [0, 1, 0, 1]  # once per layer, also when both routes carry it
    for (layer, weights), ref_w in zip(seen[:2], ref.attentions, strict=True):
        assert weights.shape == (2, 4, 6, 6)
        assert torch.allclose(weights, ref_w, atol=1e-6), layer
    assert seen[2][1].shape == (2, 4, 1, 7)  # decode step: one query over 6 cached + 1 new slot
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert out2.logits.shape == (2, 1, 128)


def compat_hands_kwargs(model) -> bool:  # type: ignore[no-untyped-def]
    """Whether this model hands its attention keyword arguments to Cache.update (transformers >= 5.24)."""
    cache = RecordingCache.from_spec("dynamic", model.config)
    cache.handed = []
    with torch.no_grad():
        model(torch.ones(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    return cache.handed[0]


@pytest.mark.parametrize(
    ("request_", "shape"),
    [(StatsRequest("logits", "all"), (2, 4, 6, 6)), (StatsRequest("weights", "last", last=2), (2, 4, 2, 6)),
     (StatsRequest("weights", "sum"), (2, 4, 6))],
)
def test_observer_gets_exactly_what_it_requests(request_: StatsRequest, shape: tuple[int, ...]) -> None:
    """Logits or weights; all rows, the last rows, or the sum over the real (non-padding) query rows."""
    model = random_model("llama", attn_implementation="eager")
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # row 1 is left padded by two tokens
    cache = KVCache.from_spec("dynamic", model.config)
    cache.observer = Recorder(request_)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True, use_cache=False)
        with kvcache.enable(model):
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, kvcache=cache)
    seen = cache.observer.seen
    assert [layer for layer, _ in seen] == [0, 1]
    for (_, stats), ref_w in zip(seen, ref.attentions, strict=True):
        assert stats.shape == shape
        if request_.values == "logits":
            assert torch.allclose(stats.softmax(-1), ref_w, atol=1e-6)
        elif request_.rows == "last":
            assert torch.allclose(stats, ref_w[:, :, -2:], atol=1e-6)
        else:
            real = ref_w.clone()
            real[1, :, :2] = 0  # the padding queries of row 1 are left out of the sum
            assert torch.allclose(stats, real.sum(2), atol=1e-6)
            assert torch.allclose(stats[1, :, :2], torch.zeros(4, 2))  # and padding keys get nothing


def test_observer_as_forward_argument_for_models_that_do_not_hand_kwargs_to_the_cache() -> None:
    model = random_model("gpt_neox", attn_implementation="eager")
    ids = torch.randint(3, 120, (1, 5), generator=torch.Generator().manual_seed(2))
    cache = KVCache.from_spec("dynamic", model.config)
    cache.observer = Recorder(StatsRequest("weights", "all"))
    with torch.no_grad():
        ref = model(ids, output_attentions=True, use_cache=False)  # eager's weights, the reference
        with kvcache.enable(model):
            model(ids, past_key_values=cache, kvcache=cache)
    seen = cache.observer.seen
    assert [layer for layer, _ in seen] == [0, 1]
    for (_, weights), ref_w in zip(seen, ref.attentions, strict=True):
        assert torch.allclose(weights, ref_w, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_an_observer_nobody_serves_is_an_error_on_the_first_forward(arch: str) -> None:
    """Statistics requested but the attention never reports them: a clear error during the first forward, on
    GPT-NeoX under model.generate (the cache does not reach its attention) and on any model not switched."""
    model = random_model(arch, attn_implementation="eager")
    ids = torch.randint(3, 120, (1, 5), generator=torch.Generator().manual_seed(2))
    cache = KVCache.from_spec("dynamic", model.config)
    cache.observer = Recorder(StatsRequest("weights", "sum"))
    with torch.no_grad(), pytest.raises(KVCacheError, match="layer 0's attention did not run through"):
        if arch == "gpt_neox":
            with kvcache.enable(model):
                model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
        else:
            model(ids, past_key_values=cache, use_cache=True)  # eager, not switched
    assert cache.observer.seen == []
    # an observer that requests nothing needs nothing
    quiet = KVCache.from_spec("dynamic", model.config)
    quiet.observer = Recorder(None)
    with torch.no_grad():
        model(ids, past_key_values=quiet, use_cache=True)


def test_a_module_without_layer_idx_is_refused() -> None:
    q, k, v, allowed, _ = qkv()
    module = FakeAttention(groups=3, head_dim=8)
    del module.layer_idx
    cache = KVCache([DynamicLayer()], "dynamic")
    with pytest.raises(KVCacheError, match="layer_idx"):
        kvcache_attention(module, q, k, v, allowed, kvcache=cache)


def test_enable_switches_and_restores() -> None:
    model = random_model("llama", attn_implementation="sdpa")
    with kvcache.enable(model) as handle:
        assert model.config._attn_implementation == ATTENTION_NAME
        assert model.model.config._attn_implementation == ATTENTION_NAME
        assert handle.active
    assert model.config._attn_implementation == "sdpa" and not handle.active
    handle.disable()  # idempotent
    assert model.config._attn_implementation == "sdpa"
    # restored on an exception too, and nested handles unwind in order
    with pytest.raises(RuntimeError), kvcache.enable(model):
        inner = kvcache.enable(model)
        inner.disable()
        assert model.config._attn_implementation == ATTENTION_NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["gpt_neo", "bloom"])
def test_enable_refuses_models_without_attention_interface(arch: str) -> None:
    model = random_model(arch, attn_implementation="eager")
    with pytest.raises(KVCacheError, match="AttentionInterface"):
        kvcache.enable(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(KVCacheError, match="PreTrainedModel"):
        kvcache.enable(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_nothing_registered_at_import() -> None:
    # Forget any registration earlier tests made, then execute the module's import-time code again.
    AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)
    AttentionMaskInterface._global_mapping.pop(ATTENTION_NAME, None)
    importlib.reload(kvcache.attention)
    assert ATTENTION_NAME not in AttentionInterface._global_mapping
    assert ATTENTION_NAME not in AttentionMaskInterface._global_mapping
    model = random_model("gpt2")
    with kvcache.enable(model):
        assert ATTENTION_NAME in AttentionInterface._global_mapping
        assert ATTENTION_NAME in AttentionMaskInterface._global_mapping
