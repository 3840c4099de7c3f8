"""Chat.save / Chat.load: save -> load -> continue equals continuing in memory; bad files refused clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from kvcache import Chat, KVCacheError
from kvcache.cache import KVCache
from kvcache.layers.base import LayerWrapper
from kvcache.layers.dense import DynamicLayer
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer
from kvcache.persist import cache_state

SPECS = ["dynamic", "static:capacity=256", "h2o:budget=0.5", "keyformer:budget=0.5+static:capacity=256",
         "streaming:tokens=20", "int4:group=4,residual=4", "h2o:budget=0.5+int2:group=4,residual=4",
         "int8:group=4,residual=4+static:capacity=256"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=4, vocab_size=TINY_VOCAB_SIZE)


def chat(model, tokenizer, spec="dynamic"):
    c = Chat(model, tokenizer, spec, system="A short system prompt.", max_new_tokens=6, stop=[], seed=0)
    c.send("first question")
    c.send("second one")
    return c


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_continue_equals_continuing_in_memory(model, tokenizer, tmp_path, spec):
    original = chat(model, tokenizer, spec)
    path = original.save(tmp_path / "chat.safetensors")
    resumed = Chat.load(path, model, tokenizer)
    assert resumed.token_ids == original.token_ids and resumed.messages == original.messages
    assert str(resumed.spec) == str(original.spec) and resumed.stats == original.stats
    for a, b in zip(original.cache.stores, resumed.cache.stores, strict=True):
        assert a.seen == b.seen and a.physical_length == b.physical_length
        assert torch.equal(a.keys_values()[0], b.keys_values()[0])
        assert torch.equal(a.positions[..., : a.physical_length], b.positions[..., : b.physical_length])
        if hasattr(a, "scores"):
            assert torch.equal(a.scores, b.scores) and torch.equal(a.budget, b.budget)
    for text in ("third", "and a fourth"):
        assert resumed.send(text) == original.send(text)
    assert resumed.token_ids == original.token_ids


def test_existing_file_is_not_overwritten_unless_asked(model, tokenizer, tmp_path):
    path = tmp_path / "chat.safetensors"
    path.write_bytes(b"precious")
    c = chat(model, tokenizer)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        c.save(path)
    assert path.read_bytes() == b"precious"
    c.save(path, overwrite=True)
    assert Chat.load(path, model, tokenizer).token_ids == c.token_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.safetensors"]  # no temporary file left


@pytest.fixture(scope="module")
def saved(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "chat.safetensors"
    chat(model, tokenizer).save(path)
    return path


def test_truncated_file_refused(model, tokenizer, saved, tmp_path):
    data = saved.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(KVCacheError, match="truncated, damaged or not a saved kvcache cache"):
        Chat.load(bad, model, tokenizer)


def test_not_a_safetensors_file_refused(model, tokenizer, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, I am not a cache\n" * 10)
    with pytest.raises(KVCacheError, match="not a readable safetensors file"):
        Chat.load(bad, model, tokenizer)
    with pytest.raises(KVCacheError, match="does not exist"):
        Chat.load(tmp_path / "missing.safetensors", model, tokenizer)


def test_other_safetensors_file_refused(model, tokenizer, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(KVCacheError, match="not a saved kvcache cache"):
        Chat.load(other, model, tokenizer)


def test_other_model_refused(tokenizer, saved):
    other = random_model("llama", seed=5, vocab_size=TINY_VOCAB_SIZE)  # same config, other weights
    with pytest.raises(KVCacheError, match="computed by another model.*weights"):
        Chat.load(saved, other, tokenizer)
    different = random_model("llama", seed=4, vocab_size=TINY_VOCAB_SIZE, num_layers=3)
    with pytest.raises(KVCacheError, match="cache_shape"):
        Chat.load(saved, different, tokenizer)


def test_other_dtype_refused(model, tokenizer, saved):
    half = random_model("llama", seed=4, vocab_size=TINY_VOCAB_SIZE, dtype=torch.bfloat16)
    with pytest.raises(KVCacheError, match="dtype: file 'float32', model 'bfloat16'"):
        Chat.load(saved, half, tokenizer)


def test_other_spec_refused(model, tokenizer, saved):
    with pytest.raises(KVCacheError, match="holds a 'dynamic' cache, not 'h2o"):
        Chat.load(saved, model, tokenizer, cache="h2o:budget=0.5")
    assert Chat.load(saved, model, tokenizer, cache="dynamic").token_ids


def test_tampered_metadata_refused(model, tokenizer, saved, tmp_path):
    """A file whose header says another spec than its tensors hold: the layer state does not fit."""
    data = saved.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["spec"] = "static:capacity=999"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(KVCacheError, match="no 'capacity' entry"):
        Chat.load(bad, model, tokenizer)


def test_a_store_without_the_state_api_is_refused(model, tokenizer, tmp_path):
    c = chat(model, tokenizer)
    c.cache = KVCache([LayerWrapper(DynamicLayer()) for _ in c.cache.stores])
    with pytest.raises(KVCacheError, match="LayerWrapper does not support saving"):
        cache_state(c.cache)
    with pytest.raises(KVCacheError, match="does not support saving"):
        c.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(KVCacheError, match="does not support saving"):
        c.fork()


def test_a_quantized_cache_is_saved_in_its_packed_form(model, tokenizer, tmp_path):
    dense = chat(model, tokenizer).save(tmp_path / "dense.safetensors")
    packed = chat(model, tokenizer, "int2:group=4,residual=4").save(tmp_path / "int2.safetensors")
    state = cache_state(Chat.load(packed, model, tokenizer).cache)
    assert any(t.dtype == torch.uint8 for t in state.values())
    assert packed.stat().st_size < 0.75 * dense.stat().st_size  # group=4: scales weigh a lot here
