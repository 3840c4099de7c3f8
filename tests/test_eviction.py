"""Evicting a token is exactly masking it: per sequence, per KV head, with padding, GQA and sliding windows.

A run whose cache layers ``keep()`` arbitrary per-sequence, per-head subsets of their slots (padding kept or
not, some kept slots declared invalid) must give the logits of a dense, cache-free recompute of the whole
sequence whose attention masks exactly those tokens, per layer and per KV head, from the moment they were
dropped. The reference attention below shares nothing with kvcache's masks: the test keeps its own record of
which column every slot holds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.gemma2 import Gemma2Config
from transformers.models.qwen2 import Qwen2Config
from transformers.utils import logging as hf_logging

import kvcache
from kvcache.cache import KVCache
from kvcache.generation import TorchStep
from kvcache.models.random import random_model

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*deprecated.*")

REFERENCE = "eviction_reference"
VOCAB = 128


def tiny(arch: str) -> torch.nn.Module:
    """Tiny random decoders: Llama and Qwen2 with GQA, Gemma-2 (sliding + full layers, softcap), NeoX."""
    torch.manual_seed(0)
    if arch == "llama":
        return random_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, hidden=32, vocab_size=VOCAB)
    if arch == "gpt_neox":
        return random_model("gpt_neox", num_layers=2, num_heads=4, hidden=32, vocab_size=VOCAB)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    if arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    else:  # gemma2: layer 0 slides over 5 tokens, layer 1 attends to everything; logits soft-capped
        config = Gemma2Config(**common, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                              attn_logit_softcapping=3.0, query_pre_attn_scalar=8)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def window_of(model: torch.nn.Module, layer: int) -> int | None:
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        return config.sliding_window
    return None


class Timeline:
    """The test's own record of which column each slot holds, and when each column became invisible."""

    def __init__(self, layers: int, batch: int, heads: int, total: int, mask: torch.Tensor) -> None:
        self.total = total
        # slot -> column per (layer, row, head); grows as tokens arrive (dynamic) or by writing (static)
        self.columns = [torch.empty(batch, heads, 0, dtype=torch.long) for _ in range(layers)]
        # visible[l][b, h, q, k]: query column q may attend key column k
        causal = torch.ones(total, total).tril().bool()
        real = mask.bool()[:, None, None, :]
        self.visible = [(causal & real).expand(batch, heads, -1, -1).clone() for _ in range(layers)]

    def append(self, start: int, count: int) -> None:
        for i, cols in enumerate(self.columns):
            b, h, _ = cols.shape
            new = torch.arange(start, start + count).expand(b, h, -1)
            self.columns[i] = torch.cat([cols, new], dim=-1)

    def keep(self, layer: int, indices: torch.Tensor, invalid: torch.Tensor, after: int,
             order: torch.Tensor) -> None:
        """Slots ``indices`` stay (``invalid`` ones masked from now on) and are laid out as the store says
        (``order``: new slot j holds old slot order[j]); queries after column ``after`` no longer see what was
        dropped or declared invalid."""
        cols = self.columns[layer]
        dropped = torch.ones_like(cols, dtype=torch.bool).scatter(2, indices, False)
        b, h, _ = cols.shape
        for row in range(b):
            for head in range(h):
                gone = torch.cat([cols[row, head][dropped[row, head]],
                                  cols[row, head][indices[row, head][invalid[row, head]]]])
                self.visible[layer][row, head, after + 1 :, gone] = False
        assert torch.equal(order.sort(-1).values, indices.sort(-1).values)  # the same slots, laid out anew
        self.columns[layer] = cols.gather(2, order)


def reference_attention(visible: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    """Eager softmax attention over the whole sequence with the test's per-layer, per-head visibility."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):  # type: ignore[no-untyped-def]
        b, h, t, d = query.shape
        h_kv = key.shape[1]
        rep = h // h_kv
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        logits = query @ k.transpose(-1, -2) * (scaling if scaling is not None else d**-0.5)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = visible[module.layer_idx].repeat_interleave(rep, dim=1)[:, :, :t, :t]
        window = kwargs.get("sliding_window")
        if window is not None:
            q = torch.arange(t)[:, None]
            allowed = allowed & (torch.arange(t)[None, :] > q - window)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        weights = logits.softmax(-1)
        return (weights @ v).transpose(1, 2).contiguous(), weights

    return attend


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def run_with_evictions(model: torch.nn.Module, spec: str, ids: torch.Tensor, mask: torch.Tensor, prompt: int,
                       schedule: dict[int, int], seed: int) -> tuple[torch.Tensor, Timeline]:
    """Prefill ``prompt`` tokens, then feed the rest one by one; after the prefill (key ``-1``) and after the
    decode steps named in ``schedule``, every layer keeps that many random slots per (row, head), some of them
    declared invalid. Returns the logits of every fed column after the prompt's last one."""
    g = torch.Generator().manual_seed(seed)
    batch, total = ids.shape
    cache = KVCache.from_spec(spec, model.config, batch_size=batch, max_cache_len=total)
    layers = len(cache.stores)
    heads = cache.stores[0].positions.shape[1] if "static" in spec else None
    step = TorchStep(model, cache, batch, max_columns=total)
    positions = positions_of(mask)
    timeline: Timeline | None = None
    logits = []

    def feed(lo: int, hi: int) -> torch.Tensor:
        valid = mask[:, lo:hi].bool()
        cache.begin_forward(valid)
        out = step(ids[:, lo:hi], positions[:, lo:hi], valid)
        cache.end_forward()
        return out

    def evict(n_keep: int, after: int) -> None:
        for layer, store in enumerate(cache.stores):
            held = store.physical_length
            heads = store.positions.shape[1]
            picks = torch.stack([torch.stack([torch.randperm(held, generator=g)[:n_keep]
                                              for _ in range(heads)]) for _ in range(batch)])
            # Random tokens, named by their column's rank (not by slot: layouts may differ between stores)
            idx = timeline.columns[layer].argsort(-1).gather(2, picks)
            invalid = torch.rand(idx.shape, generator=g) < 0.15
            order = store.keep(idx, invalid)
            timeline.keep(layer, idx, invalid, after, order)

    with torch.no_grad(), kvcache.enable(model):
        logits.append(feed(0, prompt))
        h_kv = heads or cache.stores[0].positions.shape[1]
        timeline = Timeline(layers, batch, h_kv, total, mask)
        timeline.append(0, prompt)
        if -1 in schedule:
            evict(schedule[-1], prompt - 1)
        for col in range(prompt, total):
            logits.append(feed(col, col + 1))
            timeline.append(col, 1)
            if col - prompt in schedule:
                evict(schedule[col - prompt], col)
    return torch.stack(logits, 1), timeline


def reference_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, timeline: Timeline,
                     prompt: int) -> torch.Tensor:
    AttentionInterface.register(REFERENCE, reference_attention(timeline.visible))
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return out.logits[:, prompt - 1 :]


def batch_inputs(total: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pads), total), generator=g)
    mask = torch.ones(len(pads), total, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


# prompt of 12 columns (row 0 left-padded by 3, row 1 by 1), 10 decode steps; the static capacity (12) is
# smaller than the 22 tokens seen, which only eviction makes possible
PROMPT, TOTAL, PADS = 12, 22, [3, 1, 0]
SCHEDULE = {-1: 7, 2: 8, 6: 9}


@pytest.mark.parametrize("spec", ["dynamic", "static:capacity=12"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt_neox"])
def test_evicting_is_masking(arch: str, spec: str) -> None:
    model = tiny(arch)
    ids, mask = batch_inputs(TOTAL, PADS, seed=1)
    got, timeline = run_with_evictions(model, spec, ids, mask, PROMPT, SCHEDULE, seed=2)
    ref = reference_logits(model, ids, mask, timeline, PROMPT)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5, arch
    # the evictions mattered: a plain recompute without them differs
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=False).logits
    assert (plain[:, PROMPT:] - ref[:, 1:]).abs().max().item() > 1e-3
    if window_of(model, 0) is not None:  # the window mattered too at this length
        assert TOTAL > window_of(model, 0)


def test_left_padding_then_sinks_and_recent_slots() -> None:
    """Regression: row 0 has 3 pad tokens and every row keeps slots [0, 1, 6..9] (what sinks + a recent window
    keep). With a mask indexed by token count, row 0's logits moved by 0.15."""
    model = tiny("llama")
    ids, mask = batch_inputs(11, [3, 0], seed=4)
    keep = torch.tensor([0, 1, 6, 7, 8, 9])
    cache = KVCache.from_spec("dynamic", model.config, batch_size=2)
    step = TorchStep(model, cache, 2, max_columns=11)
    positions = positions_of(mask)
    with torch.no_grad(), kvcache.enable(model):
        for lo, hi in ((0, 10), (10, 11)):
            if lo == 10:
                for store in cache.stores:
                    store.keep(keep.expand(2, store.positions.shape[1], -1))
            valid = mask[:, lo:hi].bool()
            cache.begin_forward(valid)
            got = step(ids[:, lo:hi], positions[:, lo:hi], valid)
            cache.end_forward()
    visible = torch.ones(11, 11).tril().bool() & mask.bool()[:, None, :]
    visible[:, 10, :10] = False
    visible[:, 10, keep] = True
    visible &= mask.bool()[:, None, :]  # row 0's kept slots 0 and 1 are padding: still invisible
    timeline = Timeline(2, 2, 2, 11, mask)
    timeline.visible = [visible[:, None].expand(2, 2, 11, 11).clone() for _ in range(2)]
    ref = reference_logits(model, ids, mask, timeline, 10)[:, -1]
    assert (got - ref).abs().max().item() <= 1e-5


def test_static_layout_with_eviction_equals_dynamic() -> None:
    """Regression: once the token count passes a static capacity, the newest slots must stay visible (the
    mask was cut at the capacity). Static and dynamic layouts keeping the same slots give the same logits."""
    model = tiny("qwen2")
    ids, mask = batch_inputs(TOTAL, [0, 2], seed=5)
    dynamic, _ = run_with_evictions(model, "dynamic", ids, mask, PROMPT, SCHEDULE, seed=6)
    static, _ = run_with_evictions(model, "static:capacity=12", ids, mask, PROMPT, SCHEDULE, seed=6)
    assert (dynamic - static).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec", ["dynamic", "static:capacity=16"])
def test_padding_is_read_off_the_mask_when_nobody_announces_it(spec: str) -> None:
    """``model.generate``/plain forwards announce nothing: the attention function marks the padding slots from
    transformers' own mask, so a later keep() can never turn padding into a visible token."""
    model = tiny("llama")
    ids, mask = batch_inputs(8, [3, 0], seed=7)
    cache = KVCache.from_spec(spec, model.config, batch_size=2)
    with torch.no_grad(), kvcache.enable(model):
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, kvcache=cache)
        model(ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
              past_key_values=cache, use_cache=True, kvcache=cache)
    expected = torch.arange(9).expand(2, -1).masked_fill(torch.cat([mask, torch.ones(2, 1)], 1) == 0, -1)
    for store in cache.stores:
        held = store.positions[:, :, : store.physical_length]
        assert torch.equal(held, expected[:, None, :].expand_as(held).to(held.dtype))
