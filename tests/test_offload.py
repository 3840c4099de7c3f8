"""``offload``: exact against the resident cache, the prefetch/release protocol, pass-through on the CPU.

No accelerator here: the transfer protocol is checked with a recording mover (host "copies" are clones, so a
stale or missing copy would change the tokens), and the real pass-through path through every entry point.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvcache.generation as generation_module
from kvcache import generate
from kvcache.cache import KVCache
from kvcache.cli import app
from kvcache.layers.base import LayerCapabilities, MemoryUse
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.layers.offloaded import PASS_THROUGH_NOTE, OffloadedLayer, Transfer, host_shape
from kvcache.layers.registry import LayerShape, build_store
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.spec import CacheSpec

PROMPTS = ["Hello there, world", "a", "The quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=1, num_layers=4)


class RecordingMover:
    """A mover for one layer that logs every call; its "device copies" are fresh clones."""

    def __init__(self, log: list[tuple[str, int]], layer: int) -> None:
        self.log, self.layer, self.device = log, layer, torch.device("cpu")

    def fetch(self, tensors):
        self.log.append(("fetch", self.layer))
        return Transfer(tuple(t.clone() for t in tensors), event=self.layer)

    def wait(self, transfer):
        self.log.append(("wait", self.layer))
        return transfer.tensors

    def settle(self, transfer):
        self.log.append(("settle", self.layer))

    def to_device(self, tensor):
        self.log.append(("to_device", self.layer))
        return tensor.clone()

    def to_host(self, tensor):
        self.log.append(("to_host", self.layer))
        return tensor.clone()


class LoggedLayer(OffloadedLayer):
    def __init__(self, inner, log, layer):
        super().__init__(inner, mover=RecordingMover(log, layer))
        self.log, self.layer = log, layer

    def release(self):
        self.log.append(("release", self.layer))
        super().release()


class Rewriting(DynamicLayer):
    """A store that does not promise to append in order (like a quantized one): copied whole each turn."""

    capabilities = LayerCapabilities(appends_in_order=False)


def recording_factory(log, inner=DynamicLayer):
    """A KVCache.from_spec replacement: every layer offloaded with a recording mover."""
    original = KVCache.from_spec

    def build(spec, config, **kwargs):
        cache = original(spec, config, **kwargs)
        for i, adapter in enumerate(cache.layers):
            store = adapter.store
            target = store.inner if hasattr(store, "runner") else store  # under a policy wrapper
            host = target.inner if isinstance(target, OffloadedLayer) else target
            if inner is not DynamicLayer and isinstance(host, DynamicLayer):
                host = inner()
            layer = LoggedLayer(host, log, i)
            if target is store:
                adapter.store = cache.stores[i] = layer
            else:
                store.inner = layer
        return cache

    return build


@pytest.mark.parametrize("spec, resident", [
    ("offload", "dynamic"), ("offloaded_static", "static"), ("h2o:budget=0.5+offload", "h2o:budget=0.5"),
])
def test_protocol_tokens_equal_resident(model, tokenizer, monkeypatch, spec, resident):
    want = generate(model, tokenizer, PROMPTS, cache=resident, max_new_tokens=10, eos_token_id=[],
                    prefill_chunk_size=4)
    log: list[tuple[str, int]] = []
    monkeypatch.setattr(generation_module.KVCache, "from_spec", staticmethod(recording_factory(log)))
    got = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=10, eos_token_id=[],
                   prefill_chunk_size=4)
    assert got.token_ids == want.token_ids
    assert got.cache == str(CacheSpec.parse(spec))
    n = model.config.num_hidden_layers
    fetched = [layer for what, layer in log if what == "fetch"]
    assert set(fetched) == set(range(n))  # every layer is prefetched (decode steps)
    for k, (what, layer) in enumerate(log):
        if what == "wait":
            assert ("fetch", layer) in log[:k]
        if what == "fetch" and layer > 0:
            # layer i + 1 is fetched inside layer i's update, before layer i's attention runs: right after
            # layer i's new tokens reached the host
            before = [e for e in log[:k] if e[0] in ("to_host", "fetch")]
            assert before[-1] == ("to_host", layer - 1), log[max(0, k - 6):k + 1]
    # the copies of at most two layers exist at once: count live copies along the log
    live: set[int] = set()
    most = 0
    for what, layer in log:
        if what in ("fetch", "to_host"):
            live.add(layer)
        elif what == "release":
            live.discard(layer)
        most = max(most, len(live))
    assert most <= 2 and n > 2
    assert not got.stats.notes  # a mover is active: not a pass-through


def test_store_that_rewrites_slots_is_copied_whole_and_stays_exact(model, tokenizer, monkeypatch):
    want = generate(model, tokenizer, PROMPTS, max_new_tokens=8, eos_token_id=[])
    log: list[tuple[str, int]] = []
    monkeypatch.setattr(generation_module.KVCache, "from_spec",
                        staticmethod(recording_factory(log, inner=Rewriting)))
    got = generate(model, tokenizer, PROMPTS, cache="offload", max_new_tokens=8, eos_token_id=[])
    assert got.token_ids == want.token_ids
    # keys, values and positions come to the device whole at every turn of every layer
    turns = sum(1 for what, _ in log if what == "to_host") // 2
    assert sum(1 for what, _ in log if what == "to_device") == 3 * turns


def test_device_copies_are_dropped_and_memory_is_host():
    log: list[tuple[str, int]] = []
    layer = OffloadedLayer(StaticLayer(8, 1, 2, 4), mover=RecordingMover(log, 0))
    k = torch.randn(1, 2, 3, 4)
    keys, _ = layer.update(k, k + 1)
    assert keys.shape == (1, 2, 8, 4) and torch.equal(keys[:, :, :3], k)
    assert torch.equal(keys[:, :, 3:], torch.zeros(1, 2, 5, 4))  # unfilled slots: zeros, masked
    inner = layer.inner.memory().total
    assert layer.memory().host == inner and layer.memory().device > 0  # during the turn
    layer.release()
    assert layer.memory() == MemoryUse(device=0, host=inner)
    layer.prefetch()
    assert ("fetch", 0) in log
    order = layer.keep(torch.tensor([[[2, 0], [1, 2]]]))  # drops the pending copy first
    assert ("settle", 0) in log and layer.memory().device == 0
    assert order.shape == (1, 2, 2) and layer.physical_length == 2
    kv = layer.keys_values()
    assert torch.equal(kv[0][0, 0], k[0, 0, [0, 2]])


def test_pass_through_on_cpu_says_so_once_and_reports_host_bytes(model, tokenizer):
    want = generate(model, tokenizer, PROMPTS, max_new_tokens=6, eos_token_id=[])
    got = generate(model, tokenizer, PROMPTS, cache="offload", max_new_tokens=6, eos_token_id=[])
    assert got.token_ids == want.token_ids
    assert got.stats.notes == [PASS_THROUGH_NOTE]
    assert PASS_THROUGH_NOTE in got.stats.summary()
    cache = KVCache.from_spec("static+offload", model.config, max_cache_len=16)
    use = cache.memory()
    resident = KVCache.from_spec("static", model.config, max_cache_len=16)
    assert use.device == 0 and use.host == resident.nbytes()


def test_built_for_an_accelerator_the_inner_store_is_on_the_host():
    store = build_store(CacheSpec.parse("static:capacity=4+offload"),
                        LayerShape(2, 8, device="meta", dtype=torch.float16))
    assert isinstance(store, OffloadedLayer) and store.device == torch.device("meta")
    assert store.inner.device == torch.device("cpu")
    # on an accelerator the host buffers are page-locked (not allocatable without one: checked on the shape)
    assert host_shape(LayerShape(2, 8, device="cuda:0")) == LayerShape(2, 8, device=torch.device("cpu"),
                                                                       pin_memory=True)
    assert not host_shape(LayerShape(2, 8, device="cpu")).pin_memory


def test_model_generate_beam_search_with_offload(model, tokenizer):
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    out = {}
    for spec in ("dynamic", "offload", "offloaded_static"):
        cache = KVCache.from_spec(spec, model.config, batch_size=3, max_cache_len=ids.shape[1] + 8)
        out[spec] = model.generate(ids, past_key_values=cache, max_new_tokens=8, num_beams=3, do_sample=False,
                                   eos_token_id=None, pad_token_id=0).tolist()
    assert out["offload"] == out["dynamic"] == out["offloaded_static"]


def test_cli_offload_json_reports_the_note(tmp_path, tokenizer):
    path = tmp_path / "m"
    random_model("gpt2", seed=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    runner = CliRunner()
    plain = runner.invoke(app, ["generate", "Once upon", "--model", str(path), "-n", "8", "--json"])
    off = runner.invoke(app, ["generate", "Once upon", "--model", str(path), "-n", "8", "--json",
                              "--cache", "h2o:budget=0.5+offload"])
    pol = runner.invoke(app, ["generate", "Once upon", "--model", str(path), "-n", "8", "--json",
                              "--cache", "h2o:budget=0.5"])
    assert plain.exit_code == off.exit_code == pol.exit_code == 0, off.stderr
    got, want = json.loads(off.stdout), json.loads(pol.stdout)
    assert got["text"] == want["text"] and got["cache"] == "h2o:budget=0.5+offload"
    assert got["stats"]["notes"] == [PASS_THROUGH_NOTE] and json.loads(plain.stdout)["stats"]["notes"] == []
