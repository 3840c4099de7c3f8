"""Retention policies on ONNX Runtime: the same ``policies/`` code as PyTorch, fed by the injected graph.

A graph injected with ``--policies`` takes one slot mask per layer (built by the host from every slot's
logical position) and returns its attention logits; ``OnnxGenerator`` runs the spec's policy on them at the
decode driver's hooks. Acceptance: greedy tokens equal the PyTorch path's on the bundled model, and the cache
holds the same (budgeted) bytes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx_fixtures import TINY, onnx_exports  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from kvcache.cli import app
from kvcache.errors import UnsupportedSpecError
from kvcache.generation import generate
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.onnx import names
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import inject_file
from kvcache.onnx.runtime import OnnxGenerator
from kvcache.onnx.session import DecoderSession

#: a passkey-like prompt long enough for a 50% budget to drop tokens, and a short left-padded second row
PROMPTS = [
    "The secret code is 4821. Remember it. The weather today is sunny and warm, and the children play "
    "outside in the park near the river. What is the secret code? The secret code is",
    "Once upon a time there was",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled model, its tokenizer, and a directory holding its graph injected with ``--policies``."""
    from kvcache.models import load

    model, tok = load("default")
    out = tmp_path_factory.mktemp("default_onnx")
    export_model(model, out, tokenizer=tok)
    inject_file(out, policies=True)
    return model, tok, out


@pytest.fixture(scope="module")
def dense_tokens(bundled):
    model, tok, _ = bundled
    return {b: generate(model, tok, PROMPTS[:b], cache="dynamic", max_new_tokens=NEW_TOKENS).token_ids
            for b in (1, 2)}


POLICY_SPECS = ["keyformer:budget=0.5", "h2o:budget=0.5", "snapkv:budget=0.5", "streaming:budget=0.5"]
#: the other policies, at batch 2 only (the suite stays fast)
MORE_SPECS = ["tova:budget=0.5", "knorm:budget=0.5", "keydiff:budget=0.5", "diffsnap:budget=0.5"]


@pytest.mark.parametrize(("spec", "batch"), [(s, b) for s in POLICY_SPECS for b in (1, 2)]
                         + [(s, 2) for s in MORE_SPECS])
def test_bundled_model_policy_tokens_equal_pytorch(bundled, dense_tokens, spec, batch):
    """Acceptance: the same spec on both runtimes gives the same greedy tokens and the same cache bytes."""
    model, tok, graph_dir = bundled
    prompts = PROMPTS[:batch]
    ref = generate(model, tok, prompts, cache=spec, max_new_tokens=NEW_TOKENS, seed=0)
    ours = OnnxGenerator(graph_dir, cache=spec).generate(prompts, max_new_tokens=NEW_TOKENS, seed=0)
    assert ours.token_ids == ref.token_ids
    assert ours.token_ids != dense_tokens[batch]  # the budget did drop tokens that mattered
    # the cache holds the budget: the bytes PyTorch's cache holds, well under the dense cache's
    assert ours.stats.cache_bytes == ref.stats.cache_bytes
    assert ours.stats.peak_cache_bytes == ref.stats.peak_cache_bytes


@pytest.mark.parametrize("spec", ["keyformer:budget=0.5,every=4", "snapkv:budget=0.5+static",
                                  "h2o:tokens=12"])
def test_chunked_prefill_and_layouts_equal_pytorch(bundled, spec):
    """Evictions between prefill chunks (policies that stream), every-N decode evictions, a static layout."""
    model, tok, graph_dir = bundled
    ref = generate(model, tok, PROMPTS, cache=spec, max_new_tokens=12, seed=3, prefill_chunk_size=16)
    ours = OnnxGenerator(graph_dir, cache=spec).generate(PROMPTS, max_new_tokens=12, seed=3,
                                                         prefill_chunk_size=16)
    assert ours.token_ids == ref.token_ids
    assert ours.stats.cache_bytes == ref.stats.cache_bytes


def test_cache_holds_the_budget(bundled):
    """After the run every layer holds the budget (+ the newest token), per row and per KV head."""
    _, _, graph_dir = bundled
    gen = OnnxGenerator(graph_dir, cache="h2o:budget=0.5")
    held = {}

    def after_step(cache):
        held["slots"] = [s.physical_length for s in cache.stores]
        held["real"] = [(s.positions[..., : s.physical_length] >= 0).sum(-1) for s in cache.stores]

    from kvcache.hooks import DecodeHooks

    result = gen.generate(PROMPTS, max_new_tokens=8, hooks=DecodeHooks(after_step=after_step))
    prompt_tokens = [len(gen.tokenizer(p)["input_ids"]) for p in PROMPTS]
    budgets = [-(-n // 2) for n in prompt_tokens]  # budget=0.5 of each row's prompt, rounded up
    for slots, real in zip(held["slots"], held["real"], strict=True):
        assert slots == max(budgets)
        assert real.tolist() == [[b] * real.shape[1] for b in budgets]
    assert result.stats.cache_bytes > 0


def test_cli_generate_with_a_policy_matches_kvcache_generate(bundled):
    model, tok, graph_dir = bundled
    runner = CliRunner()
    ours = runner.invoke(app, ["onnx", "generate", str(graph_dir), PROMPTS[0], "--cache",
                               "keyformer:budget=0.5", "-n", "12", "--seed", "0", "--json"])
    assert ours.exit_code == 0, ours.output
    ref = generate(model, tok, PROMPTS[0], cache="keyformer:budget=0.5", max_new_tokens=12, seed=0)
    data = json.loads(ours.stdout)
    assert data["text"] == ref.texts[0] and data["cache"] == "keyformer:budget=0.5"
    assert data["stats"]["cache_bytes"] == ref.stats.cache_bytes


def test_graph_without_slot_masks_refuses_a_policy_naming_the_fix(tmp_path):
    model = random_model("llama", seed=1, num_layers=2, hidden=64, num_heads=4, num_kv_heads=2)
    export_model(model, tmp_path, tokenizer=tiny_tokenizer())
    inject_file(tmp_path, attention_stats=True)
    with pytest.raises(UnsupportedSpecError, match="--policies"):
        OnnxGenerator(tmp_path, cache="h2o:budget=0.5")
    OnnxGenerator(tmp_path, cache="dynamic")  # no policy: the plain graph serves


def _logits_of(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def test_slot_masks_and_logits_outputs(tmp_path):
    """The graph attends exactly what each layer's per-KV-head slot mask allows, and returns the masked
    logits: masking a slot in one KV head changes only that head's query group."""
    model = random_model("llama", seed=1, num_layers=2, hidden=64, num_heads=4, num_kv_heads=2)
    export_model(model, tmp_path, tokenizer=tiny_tokenizer())
    path = inject_file(tmp_path, policies=True)
    graph = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in graph.graph.input}
    outputs = {o.name for o in graph.graph.output}
    assert {names.slot_mask(0), names.slot_mask(1)} <= inputs
    assert {names.attn_logits(0), names.attn_logits(1)} <= outputs
    dec = DecoderSession(path)
    assert dec.signature.has_slot_masks
    torch.manual_seed(0)
    past = [(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)) for _ in range(2)]
    ids, pos = torch.randint(3, 100, (1, 1)), torch.tensor([[5]])
    full = [torch.ones(1, 2, 1, 6, dtype=torch.bool) for _ in range(2)]
    base = dec.run(ids, torch.ones(1, 6, dtype=torch.long), pos, past, slot_masks=full,
                   logits_of_attention=True)
    assert base.attn_logits is not None and base.attn_logits[0].shape == (1, 4, 1, 6)
    masked = [m.clone() for m in full]
    masked[1][0, 1, 0, 2] = False  # the last layer, KV head 1, slot 2
    out = dec.run(ids, torch.ones(1, 6, dtype=torch.long), pos, past, slot_masks=masked,
                  logits_of_attention=True)
    low = torch.finfo(torch.float32).min
    got = out.attn_logits[1][0, :, 0, 2]
    # query heads 2 and 3 belong to KV head 1: their logit of slot 2 is masked, heads 0 and 1 unchanged
    assert bool((got[2:] <= low / 2).all())
    np.testing.assert_allclose(got[:2].numpy(), base.attn_logits[1][0, :2, 0, 2].numpy(), rtol=1e-6)
    assert not torch.allclose(out.logits, base.logits)
    torch.testing.assert_close(out.attn_logits[0], base.attn_logits[0])  # layer 0 attended as before


def test_fused_attention_op_serves_policies(onnx_exports):  # noqa: F811
    """The opset-23 fused Attention op: the slot mask enters its mask input and its logits come from
    qk_matmul_output_mode=2; the tokens equal the unfused graph's with the same policy."""
    tok = tiny_tokenizer()
    fused = onnx_exports.injected("llama", "sdpa", "dynamo", 23, policies=True)
    plain = onnx_exports.injected("llama", "sdpa", "legacy", policies=True)
    model = random_model("llama", attn_implementation="sdpa", **TINY)
    prompts = ["Hello world, how are you today", "ab"]
    ref = generate(model, tok, prompts, cache="h2o:budget=0.5", max_new_tokens=8, eos_token_id=[])
    for path in (fused, plain):
        ours = OnnxGenerator(path, cache="h2o:budget=0.5", tokenizer=tok).generate(
            prompts, max_new_tokens=8, eos_token_id=[])
        assert ours.token_ids == ref.token_ids


def test_check_runs_a_graph_injected_for_policies(onnx_exports):  # noqa: F811
    """`kvcache onnx check` feeds the slot masks of an un-evicted cache: step logits match the original."""
    from kvcache.onnx.check import check_graph

    path = onnx_exports.injected("mistral", "eager", "legacy", policies=True)
    report = check_graph(path.parent / "model.onnx", path, batch=2, prefill=5, steps=3)
    assert report.ok, report.format()


@pytest.mark.parametrize("spec", ["int4:group=8,residual=8", "int2:group=4,residual=4",
                                  "keyformer:budget=0.5+int4:group=8,residual=8",
                                  "h2o:budget=0.5+int8:group=8,residual=8"])
def test_bundled_model_quantized_tokens_equal_pytorch(bundled, spec):
    """The quantized stores are the same host tensors on both runtimes: same tokens, same bytes, with and
    without a policy, on a left-padded batch (padding dropped as tokens leave the window)."""
    model, tok, graph_dir = bundled
    ref = generate(model, tok, PROMPTS, cache=spec, max_new_tokens=NEW_TOKENS, seed=0)
    ours = OnnxGenerator(graph_dir, cache=spec).generate(PROMPTS, max_new_tokens=NEW_TOKENS, seed=0)
    assert ours.token_ids == ref.token_ids
    assert ours.stats.cache_bytes == ref.stats.cache_bytes
