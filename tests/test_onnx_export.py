"""ONNX export: the no-cache graph matches PyTorch, the with-cache graph matches it step by step, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_fixtures
import pytest
import torch
from onnx_fixtures import make_batch, reference_logits, relative_error, session, stepwise_logits
from typer.testing import CliRunner

from kvcache.errors import KVCacheError
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.onnx import export as export_mod
from kvcache.onnx import names
from kvcache.onnx.export import export_model

onnx_exports = onnx_fixtures.onnx_exports  # the session fixture, under its name in this module


def _torch_logits(arch: str, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
    model = random_model(arch, **onnx_fixtures.TINY)
    kwargs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if pos is not None:
        kwargs["position_ids"] = torch.from_numpy(pos)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_no_cache_graph_matches_torch(onnx_exports, arch: str) -> None:
    d = onnx_exports.get(arch)
    model = onnx.load(str(d / "model.onnx"))
    onnx.checker.check_model(model)
    inputs = [i.name for i in model.graph.input]
    uses_pos = arch != "bloom"  # ALiBi models take no positions
    assert inputs == [names.INPUT_IDS, names.ATTENTION_MASK] + ([names.POSITION_IDS] if uses_pos else [])
    assert [o.name for o in model.graph.output] == [names.LOGITS]
    assert model.opset_import[0].version == 17
    assert (d / "config.json").is_file()
    ids, mask, pos = make_batch(2, 7)
    got = reference_logits(session(d / "model.onnx"), ids, mask, pos)
    want = _torch_logits(arch, ids, mask, pos if uses_pos else None)
    assert relative_error(got, want, mask) < 1e-4
    # dynamic batch and sequence: another shape runs too
    ids, mask, pos = make_batch(3, 4, pad=1)
    assert reference_logits(session(d / "model.onnx"), ids, mask, pos).shape == (3, 4, 128)


def test_with_cache_graph_matches_no_cache_step_by_step(onnx_exports) -> None:
    d = onnx_exports.get("llama", with_cache=True)
    model = onnx.load(str(d / "model.onnx"))
    inputs = {i.name: i for i in model.graph.input}
    for i in range(2):
        dims = inputs[names.past_key(i)].type.tensor_type.shape.dim
        assert dims[1].dim_value == 2 and dims[3].dim_value == 8  # GQA: num_kv_heads
    assert {names.present_key(1), names.present_value(1)} <= {o.name for o in model.graph.output}
    ids, mask, pos = make_batch(2, 8)
    want = reference_logits(session(onnx_exports.get("llama") / "model.onnx"), ids, mask, pos)
    got, last = stepwise_logits(session(d / "model.onnx"), ids, mask, pos, prefill=4)
    assert relative_error(got, want, mask) < 1e-4
    assert last[names.present_value(0)].shape == (2, 2, 8, 8)


def test_large_model_weights_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    out = export_model(random_model("gpt2", **onnx_fixtures.TINY), tmp_path / "big")
    assert (tmp_path / "big" / export_mod.DATA_FILE).is_file()
    model = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    ids, mask, pos = make_batch(1, 5)
    assert reference_logits(session(out), ids, mask, pos).shape == (1, 5, 128)
    # nothing temporary left behind
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.onnx", export_mod.DATA_FILE])


def test_bad_exporter_options(tmp_path: Path) -> None:
    model = random_model("gpt2", **onnx_fixtures.TINY)
    with pytest.raises(KVCacheError, match="unknown exporter"):
        export_model(model, tmp_path / "x", exporter="tracer")  # type: ignore[arg-type]
    with pytest.raises(KVCacheError, match="opset 18 to"):
        export_model(model, tmp_path / "x", exporter="dynamo", opset=17)
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_cli_export_then_inject(tmp_path: Path) -> None:
    from kvcache.cli import app

    src = tmp_path / "hf"
    random_model("opt", **onnx_fixtures.TINY).save_pretrained(src)
    tiny_tokenizer().save_pretrained(str(src))
    runner = CliRunner()
    res = runner.invoke(app, ["onnx", "export", str(src), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() and (tmp_path / "onnx" / "config.json").is_file()
    res = runner.invoke(app, ["onnx", "inject", str(tmp_path / "onnx"), "--attention-stats"])
    assert res.exit_code == 0, res.output
    injected = onnx.load(str(tmp_path / "onnx" / "model_kvcache.onnx"))
    assert names.attn_scores(1) in {o.name for o in injected.graph.output}
    res = runner.invoke(app, ["onnx", "inject", str(tmp_path / "hf")])  # no .onnx there
    assert res.exit_code == 2 and "error:" in res.output
    missing = str(tmp_path / "nowhere" / "x")
    res = runner.invoke(app, ["onnx", "export", missing, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2


def test_export_leaves_the_model_in_the_callers_mode(tmp_path: Path) -> None:
    # OPT has dropout: a model left in training mode after the export would generate random text
    model = random_model("opt", **onnx_fixtures.TINY)
    assert model.config.dropout > 0
    export_model(model.eval(), tmp_path / "eval")
    assert not any(m.training for m in model.modules())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    # a caller that trains gets its training mode back (the graph itself is still exported in eval mode)
    export_model(model.train(), tmp_path / "train")
    assert all(m.training for m in model.modules())
    got = reference_logits(session(tmp_path / "train" / "model.onnx"), *make_batch(1, 4))
    assert np.allclose(got, reference_logits(session(tmp_path / "eval" / "model.onnx"), *make_batch(1, 4)))
