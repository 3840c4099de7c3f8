"""`kvcache onnx check`: step-by-step logits of a with-past graph against the original no-cache graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from kvcache.cli import app
from kvcache.errors import KVCacheError
from kvcache.models.random import random_model
from kvcache.onnx import names
from kvcache.onnx.check import check_graph
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import inject_file


def scale_present_value(src: Path, dst: Path, factor: float) -> Path:
    """Copy ``src`` with ``present.0.value`` multiplied by ``factor``: a cache bug that only shows once the
    present is fed back as the next step's past (the prefill's own logits stay right)."""
    model = onnx.load(str(src))
    graph = model.graph
    target = names.present_value(0)
    inner = target + "_unscaled"
    for node in graph.node:
        node.output[:] = [inner if n == target else n for n in node.output]
        node.input[:] = [inner if n == target else n for n in node.input]
    graph.initializer.append(helper.make_tensor("break_scale", onnx.TensorProto.FLOAT, [], [factor]))
    graph.node.append(helper.make_node("Mul", [inner, "break_scale"], [target]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(original no-cache graph, injected graph, broken injected graph) of a tiny GQA llama."""
    root = tmp_path_factory.mktemp("check")
    model = random_model("llama", seed=3, num_heads=4, num_kv_heads=2)
    original = export_model(model, root / "plain")
    injected = inject_file(original)
    broken = scale_present_value(injected, root / "broken" / "model.onnx", 1.5)
    return original, injected, broken


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_other_architectures_and_native_export(arch, tmp_path):
    """Learned positions (GPT-2) and ALiBi without position_ids (BLOOM); injected and native graphs."""
    model = random_model(arch, seed=4)
    original = export_model(model, tmp_path / "plain")
    assert check_graph(original, inject_file(original)).ok
    assert check_graph(original, export_model(model, tmp_path / "native", with_cache=True)).ok


def test_correct_graph_passes_every_step(graphs):
    original, injected, _ = graphs
    report = check_graph(original, injected, batch=2, prefill=5, steps=4)
    assert report.ok
    assert [s.tokens for s in report.steps] == [5, 1, 1, 1, 1]
    assert all(s.max_rel < 1e-5 and not s.problem for s in report.steps)


def test_broken_cache_fails_after_the_prefill(graphs):
    original, _, broken = graphs
    report = check_graph(original, broken)
    assert not report.ok
    assert report.steps[0].max_rel < 1e-5  # the prefill does not read the past
    assert all(s.max_rel > 1e-3 for s in report.steps[1:])
    assert "MISMATCH" in report.format() and "FAIL" in report.format()


def test_single_row_and_longer_runs(graphs):
    original, injected, _ = graphs
    assert check_graph(original, injected, batch=1, prefill=1, steps=6).ok
    assert check_graph(original, injected, batch=3, prefill=7, steps=2, seed=5).ok


def test_bad_arguments_and_swapped_graphs(graphs, tmp_path):
    original, injected, _ = graphs
    with pytest.raises(KVCacheError, match="already takes a KV cache"):
        check_graph(injected, injected)
    with pytest.raises(KVCacheError, match="no KV cache"):
        check_graph(original, original)
    with pytest.raises(ValueError, match="prefill"):
        check_graph(original, injected, prefill=0)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a graph")
    with pytest.raises(KVCacheError, match="not a readable ONNX model"):
        check_graph(original, corrupt)


def test_cli_exit_codes(graphs):
    original, injected, broken = graphs
    runner = CliRunner()
    # a directory holding both graphs: the injected one is found
    ok = runner.invoke(app, ["onnx", "check", str(original), str(injected.parent)])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "max rel err" in ok.output
    bad = runner.invoke(app, ["onnx", "check", str(original.parent), str(broken), "--steps", "2"])
    assert bad.exit_code == 1
    assert "FAIL" in bad.output
    wrong = runner.invoke(app, ["onnx", "check", str(original), str(original)])
    assert wrong.exit_code == 2 and "no KV cache" in wrong.output
