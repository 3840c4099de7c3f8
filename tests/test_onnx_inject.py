"""KV-cache injection: step-by-step logits of injected graphs equal the no-cache graph's, bad input fails.

The legacy-exporter matrix (all 13 architectures, eager and SDPA where available) and a dynamo subset run
by default (about 2-3 minutes on 2 cores). The dynamo exporter takes 20-40 s per tiny model, so the rest of
its matrix runs with ``KVCACHE_ONNX_FULL=1`` (about 6 more minutes); it is reported as skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_fixtures
import pytest
from onnx_fixtures import SDPA_ARCHS, make_batch, reference_logits, relative_error, session, stepwise_logits

from kvcache.errors import KVCacheError
from kvcache.models.random import ARCHITECTURES, GQA_ARCHITECTURES
from kvcache.onnx import names
from kvcache.onnx.inject import KVCacheInjector, inject_file

onnx_exports = onnx_fixtures.onnx_exports  # the session fixture, under its name in this module
FULL = os.environ.get("KVCACHE_ONNX_FULL") == "1"
LEGACY = [(a, "eager") for a in ARCHITECTURES] + [(a, "sdpa") for a in SDPA_ARCHS]
# default dynamo subset: RoPE + GQA (llama), ALiBi + sizes read from the mask (bloom); opset 23 below
DYNAMO_DEFAULT = [("llama", "eager"), ("bloom", "eager")]
DYNAMO_REST = [v for v in LEGACY if v not in DYNAMO_DEFAULT]


def _check_equivalence(exports, arch: str, attn: str, exporter: str, opset: int | None = None) -> None:
    ref = session(exports.get(arch, attn, exporter, opset) / "model.onnx")
    path = exports.injected(arch, attn, exporter, opset)
    onnx.checker.check_model(str(path))
    inj = session(path)
    kv_heads = 2 if arch in GQA_ARCHITECTURES else 4
    for batch in (1, 2):
        ids, mask, pos = make_batch(batch, 9, seed=batch)
        want = reference_logits(ref, ids, mask, pos)
        got, last = stepwise_logits(inj, ids, mask, pos, prefill=5)
        err = relative_error(got, want, mask)
        assert err < 1e-4, f"{arch}/{attn}/{exporter} batch {batch}: relative error {err:.2e}"
        assert last[names.present_key(1)].shape == (batch, kv_heads, 9, 8)
        assert last[names.present_value(0)].shape == (batch, kv_heads, 9, 8)


@pytest.mark.parametrize(("arch", "attn"), LEGACY, ids=[f"{a}-{m}" for a, m in LEGACY])
def test_legacy_injection_matches_full_sequence(onnx_exports, arch: str, attn: str) -> None:
    _check_equivalence(onnx_exports, arch, attn, "legacy")


@pytest.mark.parametrize(("arch", "attn"), DYNAMO_DEFAULT, ids=[f"{a}-{m}" for a, m in DYNAMO_DEFAULT])
def test_dynamo_injection_matches_full_sequence(onnx_exports, arch: str, attn: str) -> None:
    _check_equivalence(onnx_exports, arch, attn, "dynamo")


@pytest.mark.skipif(not FULL, reason="rest of the dynamo matrix (~6 min): set KVCACHE_ONNX_FULL=1")
@pytest.mark.parametrize(("arch", "attn"), DYNAMO_REST, ids=[f"{a}-{m}" for a, m in DYNAMO_REST])
def test_dynamo_injection_full_matrix(onnx_exports, arch: str, attn: str) -> None:
    _check_equivalence(onnx_exports, arch, attn, "dynamo")


def test_opset23_fused_attention_op(onnx_exports) -> None:
    """The dynamo exporter at opset 23 emits the fused Attention op (and RotaryEmbedding) for SDPA."""
    model = onnx.load(str(onnx_exports.get("llama", "sdpa", "dynamo", 23) / "model.onnx"))
    assert any(n.op_type == "Attention" for n in model.graph.node)
    _check_equivalence(onnx_exports, "llama", "sdpa", "dynamo", 23)
    # attention statistics come from the op's own softmax output: they match the unfused legacy graph's
    ids, mask, pos = make_batch(2, 8, seed=4)
    fused_path = onnx_exports.injected("llama", "sdpa", "dynamo", 23, attention_stats=True)
    plain_path = onnx_exports.injected("llama", "sdpa", "legacy", attention_stats=True)
    _, fused = stepwise_logits(session(fused_path), ids, mask, pos, prefill=6)
    _, plain = stepwise_logits(session(plain_path), ids, mask, pos, prefill=6)
    for layer in range(2):
        np.testing.assert_allclose(fused[names.attn_scores(layer)], plain[names.attn_scores(layer)],
                                   rtol=1e-4, atol=1e-6)


SLIDING = {
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},  # layer 1 only
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
}


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_sliding_window_layers(tmp_path: Path, arch: str) -> None:
    """Windows shorter than the sequence: the injected mask applies them per layer as the original does."""
    import torch

    from kvcache.models.random import random_model
    from kvcache.onnx.export import export_model

    model = random_model(arch, **onnx_fixtures.TINY, **SLIDING[arch])
    export_model(model, tmp_path)
    ids, mask, pos = make_batch(2, 10)
    want = reference_logits(session(tmp_path / "model.onnx"), ids, mask, pos)
    with torch.no_grad():
        plain = random_model(arch, **onnx_fixtures.TINY)(input_ids=torch.from_numpy(ids),
                                                          attention_mask=torch.from_numpy(mask),
                                                          position_ids=torch.from_numpy(pos)).logits.numpy()
    assert relative_error(plain, want, mask) > 1e-2  # the window does change the result
    got, _ = stepwise_logits(session(inject_file(tmp_path)), ids, mask, pos, prefill=3)
    assert relative_error(got, want, mask) < 1e-4


def test_gqa_cache_keeps_kv_heads_and_io_contract(onnx_exports) -> None:
    model = onnx.load(str(onnx_exports.injected("llama", "eager", "legacy")), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    for i in range(2):
        for name in (names.past_key(i), names.past_value(i)):
            dims = inputs[name].type.tensor_type.shape.dim
            assert [d.dim_param or d.dim_value for d in dims] == [names.BATCH_DIM, 2, names.PAST_DIM, 8]
        for name in (names.present_key(i), names.present_value(i)):
            dims = outputs[name].type.tensor_type.shape.dim
            assert [d.dim_param or d.dim_value for d in dims] == [names.BATCH_DIM, 2, names.TOTAL_DIM, 8]
    mask_dims = inputs[names.ATTENTION_MASK].type.tensor_type.shape.dim
    assert mask_dims[1].dim_param == names.TOTAL_DIM
    assert names.POSITION_IDS in inputs
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[names.META_NUM_KV_HEADS] == "2" and meta[names.META_INJECTED] == "1"
    # ALiBi models take no positions
    bloom = onnx.load(str(onnx_exports.injected("bloom", "eager", "legacy")), load_external_data=False)
    assert names.POSITION_IDS not in {i.name for i in bloom.graph.input}


def test_supported_models_lists_every_architecture() -> None:
    assert set(KVCacheInjector.supported_models) == set(ARCHITECTURES)


def test_python_api_keeps_weights_external_and_does_not_touch_input(onnx_exports, tmp_path: Path) -> None:
    src = onnx_exports.get("gpt2", "eager", "legacy")
    work = tmp_path / "m"
    shutil.copytree(src, work)
    # move weights to external data, as for a large model
    model = onnx.load(str(work / "model.onnx"))
    onnx.save_model(model, str(work / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    before = (work / "model.onnx").read_bytes()
    model = onnx.load(str(work / "model.onnx"), load_external_data=False)
    injected = KVCacheInjector(work).apply(model)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in injected.graph.initializer)
    out = inject_file(work, tmp_path / "elsewhere" / "model.onnx")
    assert (work / "model.onnx").read_bytes() == before  # input untouched
    assert (tmp_path / "elsewhere" / "config.json").is_file()
    ids, mask, pos = make_batch(2, 7)
    want = reference_logits(session(src / "model.onnx"), ids, mask, pos)
    got, _ = stepwise_logits(session(out), ids, mask, pos, prefill=3)
    assert relative_error(got, want, mask) < 1e-4


def test_default_output_name_and_atomic_overwrite(onnx_exports, tmp_path: Path) -> None:
    work = tmp_path / "m"
    shutil.copytree(onnx_exports.get("opt", "eager", "legacy"), work)
    out = inject_file(work / "model.onnx")
    assert out == work / "model_kvcache.onnx" and (work / "model.onnx").exists()
    # overwriting the input only when asked, and nothing temporary left behind
    again = inject_file(work / "model.onnx", work / "model.onnx")
    assert again == work / "model.onnx"
    assert any(i.name == names.past_key(0) for i in onnx.load(str(again)).graph.input)
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


# ----- bad input ----------------------------------------------------------------------------------------
def _no_new_files(directory: Path, before: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == before


def test_corrupt_file(onnx_exports, tmp_path: Path) -> None:
    shutil.copy(onnx_exports.get("gpt2") / "config.json", tmp_path / "config.json")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(KVCacheError, match="not a readable ONNX model"):
        inject_file(tmp_path / "model.onnx")
    _no_new_files(tmp_path, before)


def test_already_injected_graph(onnx_exports, tmp_path: Path) -> None:
    work = tmp_path / "m"
    shutil.copytree(onnx_exports.get("llama"), work)
    inject_file(work / "model.onnx", work / "model.onnx")
    before = {p.name for p in work.iterdir()}
    with pytest.raises(KVCacheError, match="already has a KV cache"):
        inject_file(work / "model.onnx")
    _no_new_files(work, before)


def test_native_with_past_graph_is_rejected(onnx_exports) -> None:
    model = onnx.load(str(onnx_exports.get("gpt2", with_cache=True) / "model.onnx"))
    with pytest.raises(KVCacheError, match="already has a KV cache"):
        KVCacheInjector(onnx_exports.get("gpt2", with_cache=True)).apply(model)


def test_non_decoder_graph(onnx_exports, tmp_path: Path) -> None:
    shutil.copy(onnx_exports.get("gpt2") / "config.json", tmp_path / "config.json")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "model.onnx"))
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(KVCacheError, match="not a decoder graph"):
        inject_file(tmp_path)
    _no_new_files(tmp_path, before)


def test_directory_without_config(onnx_exports, tmp_path: Path) -> None:
    shutil.copy(onnx_exports.get("gpt2") / "model.onnx", tmp_path / "model.onnx")
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(KVCacheError, match="no config.json"):
        inject_file(tmp_path)
    _no_new_files(tmp_path, before)


def test_graph_without_positions_is_rejected_for_rope_models(onnx_exports) -> None:
    d = onnx_exports.get("llama")
    model = onnx.load(str(d / "model.onnx"))
    model.graph.input.remove(next(i for i in model.graph.input if i.name == names.POSITION_IDS))
    with pytest.raises(KVCacheError, match="no position_ids input"):
        KVCacheInjector(d).apply(model)


def test_missing_pattern_names_architecture_and_layer(onnx_exports) -> None:
    d = onnx_exports.get("llama")
    model = onnx.load(str(d / "model.onnx"))
    # a config that disagrees with the graph on the head size: the key tensor is not found
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(d))
    config.head_dim = 4
    with pytest.raises(KVCacheError, match=r"llama: layer 0: key of MatMul .*no tensor of shape"):
        KVCacheInjector(config).apply(model)
    config = AutoConfig.from_pretrained(str(d))
    config.num_hidden_layers = 3
    with pytest.raises(KVCacheError, match="found 2 attention layers .* config says 3"):
        KVCacheInjector(config).apply(onnx.load(str(d / "model.onnx")))


def test_attention_stats_equal_torch_attention(onnx_exports) -> None:
    import torch

    from kvcache.models.random import random_model

    path = onnx_exports.injected("llama", "eager", "legacy", attention_stats=True)
    sess = session(path)
    ids, mask, pos = make_batch(2, 8, seed=3)
    _, last = stepwise_logits(sess, ids, mask, pos, prefill=8)  # one prefill step: all queries
    model = random_model("llama", attn_implementation="eager", **onnx_fixtures.TINY)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), output_attentions=True)
    for layer, att in enumerate(out.attentions):  # [batch, heads, q, k]
        real_rows = torch.from_numpy(mask).bool()[:, None, :, None]
        want = (att * real_rows).sum(dim=2).numpy()
        got = last[names.attn_scores(layer)]
        assert got.shape == (2, 4, 8)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # decode steps: one query row, probabilities over past + current sum to 1 per head
    _, last = stepwise_logits(sess, ids, mask, pos, prefill=5)
    np.testing.assert_allclose(last[names.attn_scores(0)].sum(-1), 1.0, rtol=1e-5)
    assert last[names.attn_scores(0)][1, :, :3].max() < 1e-6  # left padding gets no attention
