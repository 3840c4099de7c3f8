"""KV-cache injection: step-by-step logits of injected graphs equal the no-cache graph's, bad input fails.

The whole matrix runs by default, without skips: the legacy exporter for all 13 architectures (eager, and
SDPA where available) exported live; for the dynamo exporter (15-40 s per tiny model) the ``DYNAMO_LIVE``
variants (llama, bloom, and llama at opset 23) are exported live, so compatibility with the installed torch
exporter is still exercised, and the other 19 variants are injected from pre-exported graphs in
``tests/fixtures/onnx/``, whose sha256 sums are checked against ``MANIFEST.json``.

Plain exports (from ``(input_ids, attention_mask)`` only, so the graph computes its own positions and the
injector's position rewrite gives it a ``position_ids`` input) run over the same matrix: the legacy ones
live, the dynamo ones and the legacy ones made with transformers 4.46 from fixtures.

Regenerate the fixtures after changing the tiny model settings, the matrix or the exporter code with::

    python scripts/make_onnx_fixtures.py            # ~6-10 min of CPU; then commit tests/fixtures/onnx/

``KVCACHE_ONNX_FULL=1`` additionally re-exports every fixture variant live with the installed exporter and
checks that export as well (about 6 more minutes); it never skips anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_fixtures
import pytest
import torch
from onnx_fixtures import (
    DYNAMO_FIXTURES,
    DYNAMO_LIVE,
    FIXTURE_ROOT,
    FIXTURE_VARIANTS,
    MATRIX,
    PLAIN_FIXTURES,
    PLAIN_MATRIX,
    REGENERATE,
    check_injected,
    fixture_name,
    make_batch,
    reference_logits,
    relative_error,
    session,
    stepwise_logits,
)

from kvcache.errors import KVCacheError
from kvcache.models.random import ARCHITECTURES, random_model
from kvcache.onnx import names
from kvcache.onnx.check import check_graph
from kvcache.onnx.inject import KVCacheInjector, inject_file

onnx_exports = onnx_fixtures.onnx_exports  # the session fixture, under its name in this module
ALSO_LIVE = os.environ.get("KVCACHE_ONNX_FULL") == "1"


def _check_equivalence(exports, arch: str, attn: str, exporter: str, opset: int | None = None) -> None:
    check_injected(exports.get(arch, attn, exporter, opset) / "model.onnx",
                  exports.injected(arch, attn, exporter, opset), arch, f"{arch}/{attn}/{exporter}")


@pytest.mark.parametrize(("arch", "attn"), MATRIX, ids=[f"{a}-{m}" for a, m in MATRIX])
def test_legacy_injection_matches_full_sequence(onnx_exports, arch: str, attn: str) -> None:
    _check_equivalence(onnx_exports, arch, attn, "legacy")


@pytest.mark.parametrize(("arch", "attn"), DYNAMO_LIVE, ids=[f"{a}-{m}" for a, m in DYNAMO_LIVE])
def test_dynamo_injection_matches_full_sequence(onnx_exports, arch: str, attn: str) -> None:
    _check_equivalence(onnx_exports, arch, attn, "dynamo")


def test_dynamo_fixtures_match_manifest() -> None:
    """Every fixture variant is there, byte for byte as exported: a stale or corrupted file fails here."""
    problems = onnx_fixtures.manifest_problems()
    assert not problems, f"ONNX fixtures out of date ({'; '.join(problems)}); regenerate: {REGENERATE}"
    manifest = onnx_fixtures.read_manifest()
    for arch, attn, exporter, plain, release in FIXTURE_VARIANTS:
        entry = manifest["variants"][fixture_name(arch, attn, exporter, plain, release)]
        made = (entry["arch"], entry["attn"], entry["exporter"], entry.get("plain", False),
                entry.get("release", "current"), entry["model"])
        assert made == (arch, attn, exporter, plain, release, onnx_fixtures.FIXTURE_MODEL), \
            f"fixture made with other settings than the tests use; regenerate: {REGENERATE}"
        if release == "transformers4":
            assert entry["transformers"].startswith("4.4") and entry["relative_error_vs_torch"] < 1e-4
    total = sum(p.stat().st_size for p in FIXTURE_ROOT.rglob("*") if p.is_file())
    assert total < 9e6, f"tests/fixtures/onnx/ holds {total / 1e6:.1f} MB; keep the fixture models tiny"
    from script_modules import import_script

    assert import_script("export_plain").MODEL == onnx_fixtures.FIXTURE_MODEL


def test_stale_or_corrupted_fixtures_are_reported(tmp_path: Path) -> None:
    """The manifest check (and ``make_onnx_fixtures.py --check``) names each changed, missing, extra file."""
    import importlib.util

    root = tmp_path / "onnx"
    shutil.copytree(FIXTURE_ROOT, root)
    first, second = (fixture_name(a, m) for a, m in DYNAMO_FIXTURES[:2])
    with open(root / first / "model.onnx", "r+b") as f:  # one flipped byte
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    (root / second / "config.json").unlink()
    (root / second / "model_kvcache.onnx").write_bytes(b"left behind")
    problems = onnx_fixtures.manifest_problems(root)
    assert problems == [f"{first}/model.onnx does not match its sha256 in the manifest",
                        f"{second}/config.json is missing",
                        f"{second}/model_kvcache.onnx is not in the manifest"]
    spec = importlib.util.spec_from_file_location(
        "make_onnx_fixtures", Path(__file__).resolve().parent.parent / "scripts" / "make_onnx_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check", "--out", str(root)]) == 1
    assert script.main(["--check"]) == 0  # the committed fixtures
    shutil.rmtree(root / first)
    assert f"{first}/model.onnx is missing" in onnx_fixtures.manifest_problems(root)


@pytest.mark.parametrize(("arch", "attn"), DYNAMO_FIXTURES, ids=[f"{a}-{m}" for a, m in DYNAMO_FIXTURES])
def test_dynamo_fixture_injection_matches_full_sequence(onnx_exports, tmp_path: Path, arch: str,
                                                        attn: str) -> None:
    """Pre-exported dynamo graphs (see the module docstring) are injected like live exports."""
    name = fixture_name(arch, attn)
    original = FIXTURE_ROOT / name / "model.onnx"
    assert original.is_file(), f"missing fixture {original}; regenerate: {REGENERATE}"
    model = onnx.load(str(original))
    assert model.opset_import[0].version >= 18  # a dynamo export, not a legacy one under another name
    # the fixture still is the model the tests describe (weights, config): otherwise it is stale
    ids, mask, pos = make_batch(2, 7)
    kwargs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if names.POSITION_IDS in {i.name for i in model.graph.input}:
        kwargs["position_ids"] = torch.from_numpy(pos)
    with torch.no_grad():
        want = onnx_fixtures.fixture_model(arch, attn)(**kwargs).logits.numpy()
    err = relative_error(reference_logits(session(original), ids, mask, pos), want, mask)
    assert err < 1e-4, f"{name} no longer matches fixture_model({arch!r}); regenerate: {REGENERATE}"
    injected = inject_file(original, tmp_path / "model_kvcache.onnx")
    assert sorted(p.name for p in original.parent.iterdir()) == ["config.json", "model.onnx"]  # untouched
    check_injected(original, injected, arch, f"{name} (fixture)")
    if ALSO_LIVE:
        _check_equivalence(onnx_exports, arch, attn, "dynamo")


@pytest.mark.parametrize(("arch", "attn"), PLAIN_MATRIX, ids=[f"{a}-{m}" for a, m in PLAIN_MATRIX])
def test_plain_legacy_injection_matches_full_sequence(onnx_exports, arch: str, attn: str) -> None:
    """Graphs exported from (input_ids, attention_mask) only compute their own positions: the position
    rewrite turns them into a position_ids input."""
    d = onnx_exports.get_plain(arch, attn)
    check_injected(d / "model.onnx", inject_file(d, d / "model_kvcache.onnx"), arch, f"{arch}/{attn}/plain",
                  plain=True)


@pytest.mark.parametrize("variant", PLAIN_FIXTURES, ids=[fixture_name(*v) for v in PLAIN_FIXTURES])
def test_plain_fixture_injection_matches_full_sequence(tmp_path: Path,
                                                      variant: onnx_fixtures.Variant) -> None:
    """Plain exports by the dynamo exporter, and by the legacy exporter under transformers 4.4x."""
    arch, attn, _, _, release = variant
    name = fixture_name(*variant)
    original = FIXTURE_ROOT / name / "model.onnx"
    assert original.is_file(), f"missing fixture {original}; regenerate: {REGENERATE}"
    if release == "current":  # still the model the tests describe (the old release's is checked when made)
        ids, mask, pos = make_batch(2, 7)
        with torch.no_grad():
            want = onnx_fixtures.fixture_model(arch, attn)(input_ids=torch.from_numpy(ids),
                                                           attention_mask=torch.from_numpy(mask)).logits
        err = relative_error(reference_logits(session(original), ids, mask, pos), want.numpy(), mask)
        assert err < 1e-4, f"{name} no longer matches fixture_model({arch!r}); regenerate: {REGENERATE}"
    injected = inject_file(original, tmp_path / "model_kvcache.onnx")
    check_injected(original, injected, arch, f"{name} (fixture)", plain=True)


def test_plain_graph_takes_logical_positions(onnx_exports) -> None:
    """The injected plain graph uses the positions it is given, per row: with left padding and Hugging
    Face's positions (cumsum of the mask) it equals the PyTorch model given those positions (GPT-2's
    learned absolute positions, where the plain graph's own arange would differ)."""
    d = onnx_exports.get_plain("gpt2", "eager")
    inj = session(inject_file(d, d / "model_kvcache.onnx"))
    shape = [(dim.dim_param or dim.dim_value) for dim in
             next(i for i in onnx.load(str(d / "model_kvcache.onnx")).graph.input
                  if i.name == names.POSITION_IDS).type.tensor_type.shape.dim]
    assert shape == [names.BATCH_DIM, names.SEQUENCE_DIM]
    ids, mask, pos = make_batch(2, 9, seed=5)
    got, _ = stepwise_logits(inj, ids, mask, pos, prefill=4)
    model = onnx_fixtures.fixture_model("gpt2", "eager")
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos)).logits.numpy()
        plain = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert relative_error(got, want, mask) < 1e-4
    assert relative_error(plain, want, mask) > 1e-3  # the arange positions would not do in the padded row
    # what the graph computed is recorded, so `kvcache onnx check` can feed the same (slot) positions
    meta = {p.key: p.value for p in onnx.load(str(d / "model_kvcache.onnx")).metadata_props}
    assert meta[names.META_POSITIONS] == "arange"
    assert check_graph(d / "model.onnx", d / "model_kvcache.onnx", batch=3).ok


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
    with pytest.raises(KVCacheError, match="is the input graph"):
        inject_file(work / "model.onnx", work / "model.onnx")
    # --out naming the input's own directory writes <stem>_kvcache.onnx there (an earlier output is replaced)
    assert inject_file(work / "model.onnx", work) == out
    again = inject_file(work / "model.onnx", work / "model.onnx", force=True)
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
    inject_file(work / "model.onnx", work / "model.onnx", force=True)
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


def test_graph_without_position_pattern_is_rejected(onnx_exports) -> None:
    """A plain graph whose positions come from somewhere the rewrite does not recognise is refused with the
    architecture, the layer and what was missing, never injected with positions restarting at 0."""
    d = onnx_exports.get_plain("llama", "eager")
    model = onnx.load(str(d / "model.onnx"))
    # the RoPE frequencies get float positions counted from the token values instead: a computation the
    # rewrite does not recognise (the graph's own integer positions are left unused)
    rope = next(n for n in model.graph.node if n.op_type == "Cast"
                and n.input[0].endswith("Unsqueeze_output_0")
                and any(c.op_type in ("Mul", "MatMul") for c in model.graph.node if n.output[0] in c.input))
    make = onnx.helper.make_node
    axis1, axis2, one = (onnx.numpy_helper.from_array(np.array(v, np.int64 if k < 2 else np.float32), n)
                         for k, (v, n) in enumerate([(1, "t_axis1"), ([2], "t_axis2"), (1.0, "t_one")]))
    model.graph.initializer.extend([axis1, axis2, one])
    nodes = [make("Cast", [names.INPUT_IDS], ["t_ids"], to=onnx.TensorProto.FLOAT),
             make("Div", ["t_ids", "t_ids"], ["t_ones"]),
             make("CumSum", ["t_ones", "t_axis1"], ["t_count"]),
             make("Sub", ["t_count", "t_one"], ["t_pos"]),
             make("Unsqueeze", ["t_pos", "t_axis2"], ["t_pos3"])]
    for node in model.graph.node:
        node.input[:] = ["t_pos3" if i == rope.output[0] else i for i in node.input]
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)
    onnx.checker.check_model(model)
    with pytest.raises(KVCacheError, match=r"llama: layer 0: .*no sub-graph computing token positions"):
        KVCacheInjector(d).apply(model)
    # a graph that still has a position_ids input is left as it is: no rewrite
    with_pos = onnx.load(str(onnx_exports.get("llama") / "model.onnx"))
    injected = KVCacheInjector(onnx_exports.get("llama")).apply(with_pos)
    assert sum(i.name == names.POSITION_IDS for i in injected.graph.input) == 1


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
