"""OnnxGenerator: generation on ONNX Runtime with the cache on the host, against the PyTorch path.

The graphs are exported without a cache and then injected (the main use); one test runs a natively
exported with-past graph, which follows the same contract.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from kvcache.cli import app
from kvcache.errors import CacheCapacityError, KVCacheError, UnsupportedSpecError
from kvcache.generation import generate
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.onnx import names
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import inject_file
from kvcache.onnx.runtime import OnnxGenerator
from kvcache.onnx.session import DecoderSession

PROMPTS = ["Hello world, how are", "ab"]  # different lengths: the second row is left-padded


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _injected(model, tokenizer, out):
    """Export ``model`` without a cache into ``out`` and inject one (``out/model_kvcache.onnx``)."""
    export_model(model, out, tokenizer=tokenizer)
    inject_file(out)
    return model, out


@pytest.fixture(scope="module")
def llama(tokenizer, tmp_path_factory):
    """A tiny GQA llama (4 query heads, 2 KV heads) and its directory with the injected graph."""
    model = random_model("llama", seed=1, num_layers=2, hidden=64, num_heads=4, num_kv_heads=2)
    return _injected(model, tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bloom(tokenizer, tmp_path_factory):
    """ALiBi, no position_ids input: positions must come from the mask alone."""
    return _injected(random_model("bloom", seed=2), tokenizer, tmp_path_factory.mktemp("bloom"))


@pytest.mark.parametrize("spec", ["dynamic", "static", "static:capacity=64"])
def test_greedy_batch_matches_pytorch(llama, tokenizer, spec):
    model, graph_dir = llama
    ours = OnnxGenerator(graph_dir, cache=spec).generate(PROMPTS, max_new_tokens=12, eos_token_id=[])
    ref = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=12, eos_token_id=[])
    assert ours.token_ids == ref.token_ids
    assert ours.texts == ref.texts
    assert ours.finish_reasons == ref.finish_reasons == ["length", "length"]
    assert ours.cache == ref.cache
    assert ours.stats.new_tokens == 24 and ours.stats.decode_steps == 11
    assert ours.stats.prompt_tokens == ref.stats.prompt_tokens


def test_native_with_past_export_matches_pytorch(llama, tokenizer, tmp_path):
    model = llama[0]
    export_model(model, tmp_path, tokenizer=tokenizer, with_cache=True)
    ours = OnnxGenerator(tmp_path / "model.onnx").generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    ref = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    assert ours.token_ids == ref.token_ids


def test_alibi_model_without_position_ids(bloom, tokenizer):
    model, graph_dir = bloom
    gen = OnnxGenerator(graph_dir)
    assert not gen.decoder.signature.has_position_ids
    ours = gen.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    ref = generate(model, tokenizer, PROMPTS, max_new_tokens=10, eos_token_id=[])
    assert ours.token_ids == ref.token_ids


@pytest.mark.parametrize("arch", ["gpt_neox", "opt", "mpt", "qwen2"])
def test_more_architectures_match_pytorch(arch, tokenizer, tmp_path):
    """Rotary (NeoX), learned positions with an offset (OPT), ALiBi (MPT), GQA with biases (Qwen2)."""
    model = random_model(arch, seed=6)
    ref = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    _injected(model, tokenizer, tmp_path)
    ours = OnnxGenerator(tmp_path, tokenizer=tokenizer).generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    assert ours.token_ids == ref.token_ids


def test_left_padded_row_equals_the_row_alone(llama):
    gen = OnnxGenerator(llama[1])
    batch = gen.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    alone = gen.generate(PROMPTS[1], max_new_tokens=10, eos_token_id=[])
    assert batch.token_ids[1] == alone.token_ids[0]


def test_chunked_prefill_gives_the_same_tokens(llama):
    gen = OnnxGenerator(llama[1])
    whole = gen.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    chunked = gen.generate(PROMPTS, max_new_tokens=8, eos_token_id=[], prefill_chunk_size=3)
    assert chunked.token_ids == whole.token_ids


def test_static_capacity_ends_generation(llama, tokenizer):
    model, graph_dir = llama
    prompt_len = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    spec = f"static:capacity={prompt_len + 4}"
    ours = OnnxGenerator(graph_dir, cache=spec).generate(PROMPTS, max_new_tokens=20, eos_token_id=[])
    # the prefill's token needs no slot; each later token needs the previous one stored: 4 slots, 5 tokens
    assert ours.finish_reasons == ["capacity", "capacity"]
    assert [len(t) for t in ours.token_ids] == [5, 5]
    ref = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=20, eos_token_id=[])
    assert ours.token_ids == ref.token_ids and ours.finish_reasons == ref.finish_reasons


def test_retention_policies_need_a_graph_injected_for_them(llama):
    # Per-head slot masks and attention logits (tests/test_onnx_policies.py): refused, not silently run.
    with pytest.raises(UnsupportedSpecError, match="--policies"):
        OnnxGenerator(llama[1], cache="h2o:budget=0.5")


def test_prompt_over_static_capacity_is_a_clear_error(llama):
    gen = OnnxGenerator(llama[1], cache="static:capacity=4")
    with pytest.raises(CacheCapacityError, match="static:capacity"):
        gen.generate(PROMPTS, max_new_tokens=4)


def test_static_cache_holds_its_preallocated_bytes(llama):
    result = OnnxGenerator(llama[1], cache="static:capacity=64").generate(PROMPTS, max_new_tokens=4)
    # 2 layers x batch 2 x 2 KV heads (GQA kept) x 64 slots x ((K + V) x head_dim 16 x 4 bytes + an int32
    # position)
    assert result.stats.cache_bytes == result.stats.peak_cache_bytes == 2 * 2 * 2 * 64 * (2 * 16 * 4 + 4)


def test_eos_and_stop_strings(llama):
    gen = OnnxGenerator(llama[1])
    free = gen.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=[])
    first, third = free.token_ids[0][0], free.token_ids[0][2]
    eos = gen.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=first)
    assert eos.finish_reasons == ["eos"] and eos.token_ids == [[first]]
    stop_text = free.texts[0][1:3]
    if third != first and stop_text:  # the stop string must first appear at tokens 2-3
        stopped = gen.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=[], stop=stop_text)
        assert stopped.finish_reasons == ["stop"]
        assert stop_text not in stopped.texts[0]


def test_sampling_is_reproducible_with_a_seed(llama):
    gen = OnnxGenerator(llama[1])
    kwargs = dict(max_new_tokens=10, eos_token_id=[], temperature=1.0, top_k=20, top_p=0.9)
    a = gen.generate(PROMPTS, seed=7, **kwargs)
    b = gen.generate(PROMPTS, seed=7, **kwargs)
    greedy = gen.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids  # temperature 1 over a random model is far from argmax


def test_decoder_session_packs_cache_views_correctly(llama):
    """Non-contiguous cache views (slices of a longer buffer, as growable layers hand them out) are packed
    into reused buffers; results equal session.run on dense copies, across growing and shrinking lengths."""
    graph = llama[1] / "model_kvcache.onnx"
    dec = DecoderSession(graph)
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    buffers = [(torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)) for _ in range(2)]
    for past_len in (4, 9, 3):
        ids = torch.randint(3, 100, (2, 3))
        mask = torch.ones(2, past_len + 3, dtype=torch.int64)
        mask[1, :2] = 0
        pos = torch.arange(past_len, past_len + 3).expand(2, 3)
        past = [(k[:, :, :past_len], v[:, :, :past_len]) for k, v in buffers]
        assert not past[0][0].is_contiguous()
        out = dec.run(ids, mask, pos, past)
        feeds = {names.INPUT_IDS: ids.numpy(), names.ATTENTION_MASK: mask.numpy(),
                 names.POSITION_IDS: pos.contiguous().numpy()}
        for i, (k, v) in enumerate(past):
            feeds[names.past_key(i)] = k.contiguous().numpy()
            feeds[names.past_value(i)] = v.contiguous().numpy()
        want = sess.run(None, feeds)
        np.testing.assert_array_equal(out.logits.numpy(), want[0])
        np.testing.assert_array_equal(out.presents[1][1].numpy(), want[4])
        assert out.presents[0][0].shape == (2, 2, past_len + 3, 16)  # GQA: 2 KV heads, not 4
        assert out.attn_scores is None


def test_attention_statistics_reach_the_step_output(llama, tokenizer, tmp_path):
    """A graph injected with attention statistics: generation is unchanged and each step hands back the
    per-query-head attention mass over the cache slots (the input of host-side retention policies)."""
    model, graph_dir = llama
    stats_graph = inject_file(graph_dir / "model.onnx", tmp_path / "model_kvcache.onnx", attention_stats=True)
    gen = OnnxGenerator(tmp_path)
    assert gen.decoder.signature.has_attn_scores
    assert gen.generate(PROMPTS, max_new_tokens=6, eos_token_id=[]).token_ids == \
        OnnxGenerator(graph_dir).generate(PROMPTS, max_new_tokens=6, eos_token_id=[]).token_ids
    dec = DecoderSession(stats_graph)
    torch.manual_seed(1)
    past = [(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)) for _ in range(2)]
    out = dec.run(torch.randint(3, 100, (1, 3)), torch.ones(1, 8, dtype=torch.int64),
                  torch.arange(5, 8)[None], past)
    assert out.attn_scores is not None and len(out.attn_scores) == 2
    scores = out.attn_scores[0]
    assert scores.shape == (1, 4, 8)  # query heads, past + current slots
    # three query rows, each a softmax over the keys: the mass sums to 3 per head
    torch.testing.assert_close(scores.sum(-1), torch.full((1, 4), 3.0))


def test_errors_name_the_problem(llama, tmp_path, tokenizer):
    with pytest.raises(KVCacheError, match="does not exist"):
        OnnxGenerator(tmp_path / "missing")
    shutil.copy(llama[1] / "model_kvcache.onnx", tmp_path / "model_kvcache.onnx")
    with pytest.raises(KVCacheError, match="config.json"):
        OnnxGenerator(tmp_path)
    with pytest.raises(KVCacheError, match="inject"):  # the original, no-cache graph
        OnnxGenerator(llama[1] / "model.onnx")
    gen = OnnxGenerator(llama[1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate("a", max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        gen.generate([])


def test_cli_generate_json_matches_kvcache_generate(llama, tokenizer):
    model, graph_dir = llama
    result = CliRunner().invoke(app, ["onnx", "generate", str(graph_dir), PROMPTS[0], "--cache", "static",
                                      "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    ref = generate(model, tokenizer, PROMPTS[0], cache="static", max_new_tokens=6)
    assert data["text"] == ref.texts[0]
    assert data["finish_reason"] == ref.finish_reasons[0] and data["cache"] == "static"
    assert data["stats"]["new_tokens"] == len(ref.token_ids[0])
    # the shape `kvcache generate --json` has
    assert set(data) == {"text", "stats", "finish_reason", "cache", "attempts"}


def test_cli_generate_text_and_errors(llama, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["onnx", "generate", str(llama[1]), "ab", "-n", "3"])
    assert ok.exit_code == 0, ok.output
    assert "finish=length" in ok.output
    bad = runner.invoke(app, ["onnx", "generate", str(tmp_path), "ab"])
    assert bad.exit_code == 2 and "model.onnx" in bad.output
    typo = runner.invoke(app, ["onnx", "generate", str(llama[1]), "ab", "--cache", "statik"])
    assert typo.exit_code == 2 and "statik" in typo.output


def test_cli_flow_export_inject_check_generate(tokenizer, tmp_path):
    """The documented flow, command by command: the ONNX text equals `kvcache generate`'s."""
    model = random_model("llama", seed=5)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    hf, out = str(tmp_path / "hf"), str(tmp_path / "onnx")
    runner = CliRunner()
    for args in (["onnx", "export", hf, "--out", out], ["onnx", "inject", out],
                 ["onnx", "check", f"{out}/model.onnx", out]):
        step = runner.invoke(app, args)
        assert step.exit_code == 0, (args, step.output)
    ours = runner.invoke(app, ["onnx", "generate", out, "Hello world", "-n", "12", "-c", "static", "--json"])
    ref = runner.invoke(app, ["generate", "Hello world", "--model", hf, "-n", "12", "-c", "static", "--json"])
    assert ours.exit_code == 0 and ref.exit_code == 0, (ours.output, ref.output)
    ours_json, ref_json = json.loads(ours.stdout), json.loads(ref.stdout)
    assert ours_json["text"] == ref_json["text"]
    assert ours_json["finish_reason"] == ref_json["finish_reason"]
    assert ours_json["stats"]["cache_bytes"] == ref_json["stats"]["cache_bytes"]  # same layers, same bytes


def test_default_model_onnx_text_equals_pytorch(tmp_path):
    """Acceptance: the bundled model, exported and injected, generates the text `kvcache generate` does."""
    from kvcache.models import load

    model, tok = load("default")
    prompts = ["Question: what is 2 + 3? Answer:", "Once upon a time"]
    refs = {spec: generate(model, tok, prompts, cache=spec, max_new_tokens=24)
            for spec in ("dynamic", "static")}
    export_model(model, tmp_path, tokenizer=tok)
    inject_file(tmp_path)
    for spec, ref in refs.items():
        ours = OnnxGenerator(tmp_path, cache=spec).generate(prompts, max_new_tokens=24)
        assert ours.texts == ref.texts and ours.finish_reasons == ref.finish_reasons
