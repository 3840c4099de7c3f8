"""Tests that catch the ONNX promises breaking, each against something that shares no code with the path
under test: the injected graph's ``present`` values against the PyTorch model's own cache, generation
against transformers' ``model.generate``, file writes failing midway, external weights never read, and
output paths that must never replace an input.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from kvcache.cli import app
from kvcache.errors import KVCacheError
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.onnx import export as export_module
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import inject_file
from kvcache.onnx.runtime import OnnxGenerator
from kvcache.onnx.session import DecoderSession

TINY = {"num_layers": 2, "hidden": 32, "num_heads": 4}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory):
    """``(model, directory)``: a tiny model exported without cache and injected (``model_kvcache.onnx``)."""
    model = random_model(request.param, seed=3, **TINY)
    out = tmp_path_factory.mktemp(request.param) / "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(model, out, tokenizer=tiny_tokenizer())
    inject_file(out)
    return model, out


def test_present_values_are_the_pytorch_cache(exported):
    """Each ``present.{i}.key`` holds the keys and each ``.value`` the values the model itself caches (a
    swap of the two, or of layers, keeps every shape and is caught only by comparing values)."""
    model, out = exported
    session = DecoderSession(out / "model_kvcache.onnx")
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True).past_key_values
    heads, dim = ref.layers[0].keys.shape[1], ref.layers[0].keys.shape[3]
    layers = TINY["num_layers"]
    empty = [(torch.empty(1, heads, 0, dim), torch.empty(1, heads, 0, dim)) for _ in range(layers)]
    # the prompt in two steps, so the second step's present = past fed back + new keys/values
    first = session.run(ids[:, :4], torch.ones(1, 4, dtype=torch.int64), torch.arange(4)[None], empty)
    past = [(k.clone(), v.clone()) for k, v in first.presents]
    second = session.run(ids[:, 4:], torch.ones(1, 6, dtype=torch.int64), torch.arange(4, 6)[None], past)
    for i, (key, value) in enumerate(second.presents):
        torch.testing.assert_close(key, ref.layers[i].keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(value, ref.layers[i].values, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(second.presents[0][0], second.presents[0][1])  # keys and values do differ


def test_greedy_tokens_equal_transformers_generate(exported):
    """An oracle that shares nothing with OnnxGenerator (no left_pad, Rows or StopChecker): transformers'
    own greedy ``model.generate`` over the same left-padded batch."""
    model, out = exported
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    prompts, new = ["Hello there, how are", "ab"], 10
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model.generation_config.eos_token_id = None  # run every row to `new` tokens on both sides
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        hf = model.generate(**batch, max_new_tokens=new, do_sample=False)
    want = hf[:, batch["input_ids"].shape[1]:].tolist()
    ours = OnnxGenerator(out).generate(prompts, max_new_tokens=new, eos_token_id=[])
    assert ours.token_ids == want


# ----- writes that fail midway leave nothing ------------------------------------------------------------
def _fail_after_writing(path: str, *args, **kwargs) -> None:
    Path(path).write_bytes(b"half a graph")
    raise OSError(errno.ENOSPC, "No space left on device", path)


def test_failed_inject_write_leaves_nothing(exported, monkeypatch, tmp_path):
    _, out = exported
    work = tmp_path / "w"
    shutil.copytree(out, work)
    (work / "model_kvcache.onnx").unlink()
    before = _tree(work)
    monkeypatch.setattr(onnx, "save_model", lambda proto, path, *a, **k: _fail_after_writing(str(path)))
    with pytest.raises(OSError, match="No space left"):
        inject_file(work)
    assert _tree(work) == before  # no output, no temporary file


def test_failed_export_leaves_nothing(monkeypatch, tmp_path):
    model = random_model("llama", seed=3, **TINY)
    (tmp_path / "keep.txt").write_text("unrelated")
    before = _tree(tmp_path)

    def broken_finalize(tmp_file, model, tokenizer, tmp):
        _fail_after_writing(str(tmp / "config.json"))

    monkeypatch.setattr(export_module, "_finalize", broken_finalize)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, tmp_path / "out")
    assert _tree(tmp_path) == before


def test_forced_re_export_replaces_the_directory_as_a_whole(exported, tmp_path):
    """A re-export of another model with --force leaves no injected graph of the first one behind."""
    _, out = exported
    work = tmp_path / "w"
    shutil.copytree(out, work)
    other = tmp_path / "hf"
    random_model("opt", seed=4, **TINY).save_pretrained(other)
    tiny_tokenizer().save_pretrained(str(other))
    runner = CliRunner()
    refused = runner.invoke(app, ["onnx", "export", str(other), "--out", str(work)])
    assert refused.exit_code == 2 and "already holds files" in refused.stderr
    done = runner.invoke(app, ["onnx", "export", str(other), "--out", str(work), "--force"])
    assert done.exit_code == 0, done.stderr
    assert not (work / "model_kvcache.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "w"]  # no temporary directory left
    stale_run = runner.invoke(app, ["onnx", "generate", str(work), "hi"])
    assert stale_run.exit_code == 2 and "no KV cache" in stale_run.stderr


def test_inject_out_the_same_directory_keeps_the_input(exported, tmp_path):
    _, out = exported
    work = tmp_path / "w"
    shutil.copytree(out, work)
    original = (work / "model.onnx").read_bytes()
    result = CliRunner().invoke(app, ["onnx", "inject", str(work), "--out", str(work)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(work / "model_kvcache.onnx")
    assert (work / "model.onnx").read_bytes() == original


def test_external_weights_are_never_read(monkeypatch, tmp_path):
    """The injector reads the graph only: a large model's weights file is neither loaded nor changed."""
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(random_model("llama", seed=3, **TINY), tmp_path / "m")
    data = tmp_path / "m" / export_module.DATA_FILE
    assert data.is_file()
    before = hashlib.sha256(data.read_bytes()).hexdigest()

    def no_reading(*args, **kwargs):
        raise AssertionError("external weights were read")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_reading)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", no_reading)
    with pytest.raises(AssertionError, match="were read"):  # the patch does catch a reading load
        onnx.load(str(tmp_path / "m" / "model.onnx"))
    out = inject_file(tmp_path / "m")
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    monkeypatch.undo()
    assert OnnxGenerator(out).decoder.signature.num_layers == TINY["num_layers"]


def test_injected_graph_refuses_a_changed_source(exported, tmp_path):
    _, out = exported
    work = tmp_path / "w"
    shutil.copytree(out, work)
    model = onnx.load(str(work / "model.onnx"))
    model.doc_string = "changed"  # any change to the source graph's bytes
    onnx.save_model(model, str(work / "model.onnx"))
    with pytest.raises(KVCacheError, match="injected from another graph"):
        OnnxGenerator(work)
