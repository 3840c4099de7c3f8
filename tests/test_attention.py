"""The kvcache attention function and kvcache.enable()."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager
from transformers.utils import logging as hf_logging

import kvcache
import kvcache.attention
from kvcache import generation
from kvcache.attention import ATTENTION_NAME, kvcache_attention
from kvcache.cache import KVCache
from kvcache.errors import KVCacheError
from kvcache.models.random import random_model

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


def test_gqa_math_equals_eager_with_repeat_kv() -> None:
    q, k, v, allowed, additive = qkv()
    module = FakeAttention(groups=3, head_dim=8)
    ref_out, ref_w = llama_eager(module, q, k, v, additive, scaling=0.3)
    out, w = kvcache_attention(module, q, k, v, additive, scaling=0.3)
    assert out.shape == ref_out.shape == (2, 3, 6, 8)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)
    # a boolean mask (True = attend) gives the same result as the additive one
    out_b, w_b = kvcache_attention(module, q, k, v, allowed, scaling=0.3)
    assert torch.allclose(out_b, ref_out, atol=1e-6) and torch.allclose(w_b, ref_w, atol=1e-6)


def test_softcap_and_default_scaling_equal_gemma2_eager() -> None:
    q, k, v, _, additive = qkv(h=4, h_kv=4)
    module = FakeAttention(groups=1, head_dim=8)
    ref_out, ref_w = gemma2_eager(module, q, k, v, additive, softcap=2.0)
    out, w = kvcache_attention(module, q, k, v, additive, softcap=2.0)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)
    plain, _ = kvcache_attention(module, q, k, v, additive)
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


@pytest.mark.parametrize("route", ["forward", "cache"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_observer_gets_the_weights_the_model_used(arch: str, route: str) -> None:
    """The extension point for policies: one call per layer, same weights as eager's attentions.

    "forward": the arguments kvcache.generate builds (the cache's observer as a forward argument), which reach
    the attention function on every transformers release. "cache": ``cache.observer`` alone, which reaches
    it exactly when the model hands its attention kwargs to ``Cache.update`` (transformers >= 5.24).
    """
    model = random_model(arch, attn_implementation="eager")
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    cache = RecordingCache.from_spec("dynamic", model.config)
    cache.handed = []
    cache.observer = lambda layer, logits, weights: seen.append((layer, logits, weights))
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
            out = model(ids, **extra(0, 6))
            out2 = model(ids[:, :1], **extra(6, 7))
    assert len(cache.handed) == 4 and len(set(cache.handed)) == 1
    if route == "cache" and not cache.handed[0]:
        assert seen == []  # documented: pass the observer to forward on these releases
        return
    assert [layer for layer, _, _ in seen] == [0, 1, 0, 1]  # once per layer, also when both routes carry it
    for (layer, logits, weights), ref_w in zip(seen[:2], ref.attentions, strict=True):
        assert weights.shape == logits.shape == (2, 4, 6, 6)
        assert torch.allclose(weights, ref_w, atol=1e-6), layer
        assert torch.allclose(logits.softmax(-1), weights, atol=1e-6)
    assert seen[2][2].shape == (2, 4, 1, 7)  # decode step: one query over 6 cached + 1 new slot
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert out2.logits.shape == (2, 1, 128)


def test_observer_as_forward_argument_for_models_that_do_not_hand_kwargs_to_the_cache() -> None:
    model = random_model("gpt_neox", attn_implementation="eager")
    ids = torch.randint(3, 120, (1, 5), generator=torch.Generator().manual_seed(2))
    seen: list[tuple[int, torch.Tensor]] = []
    cache = KVCache.from_spec("dynamic", model.config)
    with torch.no_grad():
        ref = model(ids, output_attentions=True, use_cache=False)  # eager's weights, the reference
        with kvcache.enable(model):
            model(ids, past_key_values=cache, kvcache_observer=lambda i, logits, w: seen.append((i, w)))
    assert [layer for layer, _ in seen] == [0, 1]
    for (_, weights), ref_w in zip(seen, ref.attentions, strict=True):
        assert torch.allclose(weights, ref_w, atol=1e-6)


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
