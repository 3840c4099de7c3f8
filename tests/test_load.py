"""kvcache.models.load: the bundled default, local directories, hub ids offline, and clear errors."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from kvcache import KVCacheError
from kvcache.models import load
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer

load_module = importlib.import_module("kvcache.models.load")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    random_model("llama", seed=5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_local_directory_loads_model_and_tokenizer(model_dir):
    model, tokenizer = load(model_dir)
    reference = random_model("llama", seed=5)
    assert not model.training
    ids = torch.tensor([tokenizer("hello")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "hello"


def test_dtype_by_name_and_device(model_dir):
    model, _ = load(str(model_dir), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load(str(model_dir), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(KVCacheError, match="unknown dtype 'float8'"):
        load(model_dir, dtype="float8")


def test_default_uses_bundled_directory(model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(load_module, "DEFAULT_MODEL_DIR", model_dir)
    model, tokenizer = load("default")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token == "</s>"
    monkeypatch.setattr(load_module, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(KVCacheError, match="bundled default model is not installed.*--model"):
        load()


def test_real_bundled_default_loads_or_says_it_is_missing():
    if (load_module.DEFAULT_MODEL_DIR / "config.json").is_file():
        model, tokenizer = load("default")
        assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    else:
        with pytest.raises(KVCacheError, match="not installed"):
            load("default")


def test_missing_and_invalid_paths(tmp_path):
    with pytest.raises(KVCacheError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(KVCacheError, match="does not exist"):
        load("./no/such/dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(KVCacheError, match="not a model directory"):
        load(tmp_path / "file.txt")
    with pytest.raises(KVCacheError, match="not a model directory"):
        load(tmp_path)


def test_hub_id_offline_not_cached_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVCacheError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        load("kvcache-tests/no-such-model-anywhere")


def test_bad_device_fails_before_loading(model_dir):
    with pytest.raises(KVCacheError, match="unknown device 'gpu0'"):
        load(model_dir, device="gpu0")
    if torch.cuda.is_available():
        model, _ = load(model_dir, device="cuda")
        assert next(model.parameters()).device.type == "cuda"
    else:
        with pytest.raises(KVCacheError, match="no CUDA"):
            load(model_dir, device="cuda")


def test_tiny_tokenizer_round_trips_text_beside_a_qwen2_config(tmp_path):
    # AutoTokenizer maps a qwen2 directory to Qwen2Tokenizer unless the saved class is honoured; that
    # byte-level pipeline loses the spaces of the character-level vocabulary
    random_model("qwen2", seed=1).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "Hello, world!  two spaces\tand a tab\n"
    want = tiny_tokenizer()(text)["input_ids"]
    _, loaded = load(tmp_path)
    for tokenizer in (loaded, load_module.load_tokenizer(tmp_path)):
        ids = tokenizer(text)["input_ids"]
        assert ids == want
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
