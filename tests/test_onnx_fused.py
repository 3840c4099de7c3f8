"""``kvcache onnx inject --fused``: ONNX Runtime's fused attention, rotary and in-place cache, against the
original graph and the PyTorch path.

Every architecture of the injection matrix either injects fused and gives the original graph's logits step
by step (batch 1 and 2, left padding), or is refused with a message naming the architecture, the layer and
the way out (ALiBi models: their bias is not the fused op's). On the host, a fused graph writes the new
keys/values into the dense stores' own buffers; the tokens equal PyTorch's for every cache layout.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_fixtures
import pytest
import torch
from onnx_fixtures import (
    DYNAMO_FIXTURES,
    FIXTURE_ROOT,
    MATRIX,
    PLAIN_FIXTURES,
    TINY,
    check_injected,
    fixture_name,
    make_batch,
    reference_logits,
    relative_error,
    session,
    stepwise_logits,
)
from typer.testing import CliRunner

from kvcache.cache import KVCache
from kvcache.cli import app
from kvcache.errors import CacheCapacityError, KVCacheError, UnsupportedSpecError
from kvcache.generation import generate
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.onnx import names
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import KVCacheInjector, inject_file
from kvcache.onnx.runtime import OnnxGenerator

onnx_exports = onnx_fixtures.onnx_exports

#: ALiBi models: a bias on the scores that the fused op does not take
REFUSED = {"bloom", "mpt"}
#: architectures whose rotary embedding is Llama's rotate_half over the whole head
ROTATE_HALF = {"llama", "mistral", "qwen2", "gemma"}
#: architectures with RMS norms (fused, the residual add folded into all but the first)
RMS_NORM = {"llama", "mistral", "qwen2", "gemma", "phi3"}
PROMPTS = ["Hello world, how are", "ab"]  # different lengths: the second row is left-padded


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize(("arch", "attn"), MATRIX, ids=[f"{a}-{m}" for a, m in MATRIX])
def test_fused_injection_matches_full_sequence(onnx_exports, arch: str, attn: str) -> None:
    if arch in REFUSED:
        with pytest.raises(KVCacheError, match=rf"{arch}: layer 0: cannot fuse the attention .*--fused"):
            onnx_exports.injected(arch, attn, fused=True)
        return
    fused = onnx_exports.injected(arch, attn, fused=True)
    check_injected(onnx_exports.get(arch, attn) / "model.onnx", fused, arch, f"{arch}/{attn}/fused")
    ops = _ops(fused)
    assert ops["GroupQueryAttention"] == TINY["num_layers"] and ops["Softmax"] == 0
    assert ops["RotaryEmbedding"] == (2 * TINY["num_layers"] if arch in ROTATE_HALF else 0)
    rms = arch in RMS_NORM
    assert (ops["SimplifiedLayerNormalization"], ops["SkipSimplifiedLayerNormalization"]) == \
        ((1, 2 * TINY["num_layers"]) if rms else (0, 0))
    meta = {p.key: p.value for p in onnx.load(str(fused), load_external_data=False).metadata_props}
    assert meta[names.META_FUSED] == "1"
    # the folded shape arithmetic and the fused attention leave far fewer nodes than the plain injection
    assert sum(ops.values()) < 0.8 * sum(_ops(onnx_exports.injected(arch, attn)).values())


@pytest.mark.parametrize(("arch", "attn"), [v for v in DYNAMO_FIXTURES if v[0] in ("qwen2", "gpt2", "phi3")])
def test_fused_injection_of_dynamo_fixtures(tmp_path, arch: str, attn: str) -> None:
    """Graphs of the other exporter (pre-exported fixtures): the same patterns fuse."""
    src = FIXTURE_ROOT / fixture_name(arch, attn)
    out = inject_file(src / "model.onnx", tmp_path / "model_kvcache.onnx", fused=True)
    check_injected(src / "model.onnx", out, arch, f"{arch}/{attn}/dynamo/fused")


OLD_PLAIN = [v for v in PLAIN_FIXTURES if v[4] != "current"]


@pytest.mark.parametrize("variant", OLD_PLAIN, ids=[fixture_name(*v) for v in OLD_PLAIN])
def test_fused_injection_of_old_plain_exports(tmp_path, variant) -> None:
    """Graphs exported plain (no position_ids) with transformers 4.46: positions are rewritten before the
    shape arithmetic is folded (GPT-J's sin/cos table, tiled to position_ids' batch, must not be folded
    at batch 1). The old eager attention adds terms the fused op makes redundant (GPT-2's additive padding
    mask read off attention_mask, GPT-NeoX's baddbmm zeros): recognised, it fuses. OPT's (batch * heads)
    3-D attention is refused, as ALiBi is; its SDPA export fuses."""
    arch, attn, name = variant[0], variant[1], fixture_name(*variant)
    src = FIXTURE_ROOT / name / "model.onnx"
    if arch in REFUSED or (arch == "opt" and attn == "eager"):
        with pytest.raises(KVCacheError, match=rf"{arch}: layer 0: cannot fuse the attention"):
            inject_file(src, tmp_path / "model_kvcache.onnx", fused=True)
        assert not (tmp_path / "model_kvcache.onnx").exists()
        return
    check_injected(src, inject_file(src, tmp_path / "model_kvcache.onnx", fused=True), arch,
                   f"{name}/fused", plain=True)


@pytest.mark.parametrize("arch", ["mistral", "gpt_neo"])
def test_fused_sliding_windows(tmp_path, arch: str) -> None:
    """Windows shorter than the sequence become the op's local window, per layer (GPT-Neo: local layers)."""
    extra = {"mistral": {"sliding_window": 4},
             "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4}}[arch]
    export_model(random_model(arch, **TINY, **extra), tmp_path)
    ids, mask, pos = make_batch(2, 10)
    want = reference_logits(session(tmp_path / "model.onnx"), ids, mask, pos)
    got, _ = stepwise_logits(session(inject_file(tmp_path, fused=True)), ids, mask, pos, prefill=3)
    assert relative_error(got, want, mask) < 1e-4


def test_fused_excludes_policies_and_statistics(onnx_exports) -> None:
    d = onnx_exports.get("llama")
    for kwargs in ({"policies": True}, {"attention_stats": True}):
        with pytest.raises(KVCacheError, match="--fused cannot be combined"):
            KVCacheInjector(d, fused=True, **kwargs)
    result = CliRunner().invoke(app, ["onnx", "inject", str(d), "--fused", "--policies", "--out",
                                      str(d / "never.onnx")])
    assert result.exit_code != 0 and "--fused cannot be combined" in result.output
    assert not (d / "never.onnx").exists()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer, tmp_path_factory):
    """A tiny GQA llama, its plain injected graph (``model_kvcache.onnx``) and its fused one (``fused/``)."""
    model = random_model("llama", seed=1, num_layers=2, hidden=64, num_heads=4, num_kv_heads=2)
    out = tmp_path_factory.mktemp("llama")
    export_model(model, out, tokenizer=tokenizer)
    inject_file(out)
    result = CliRunner().invoke(app, ["onnx", "inject", str(out), "--fused", "--out", f"{out / 'fused'}/"])
    assert result.exit_code == 0, result.output
    # a new --out written as a folder is made one, with the config and tokenizer beside the graph
    made = {p.name for p in (out / "fused").iterdir()}
    assert {"model_kvcache.onnx", "config.json", "tokenizer.json"} <= made
    return model, out, out / "fused"


@pytest.mark.parametrize("spec", ["dynamic", "static", "static:capacity=64", "int4", "int8+static"])
def test_fused_graph_generates_pytorch_tokens(llama, tokenizer, spec: str) -> None:
    model, _, fused = llama
    gen = OnnxGenerator(fused, cache=spec)
    assert gen.decoder.signature.fused
    ours = gen.generate(PROMPTS, max_new_tokens=12, eos_token_id=[])
    ref = generate(model, tokenizer, PROMPTS, cache=spec, max_new_tokens=12, eos_token_id=[])
    assert ours.token_ids == ref.token_ids
    assert ours.cache == ref.cache
    # dense stores are written by the graph in place (one IO binding); quantized ones take the presents
    assert (gen.decoder._binding is not None) == (spec.split(":")[0] in ("dynamic", "static"))


@pytest.mark.parametrize("spec", ["dynamic", "int4"])
def test_chunked_prefill_of_a_batch_runs_rows_apart(llama, tokenizer, spec: str) -> None:
    """The fused op refuses a multi-token step with a past for a whole batch; rows then run alone, on the
    in-place buffers (dynamic) or through the presents (int4)."""
    gen = OnnxGenerator(llama[2], cache=spec)
    chunked = gen.generate(PROMPTS, max_new_tokens=8, eos_token_id=[], prefill_chunk_size=3)
    ref = generate(llama[0], tokenizer, PROMPTS, cache=spec, max_new_tokens=8, eos_token_id=[],
                   prefill_chunk_size=3)
    assert chunked.token_ids == ref.token_ids


def test_in_place_cache_equals_the_presents(llama) -> None:
    """After steps of the fused graph, the host store holds (in its own buffer, never replaced while it has
    room) the keys/values the plain injected graph returns as presents."""
    _, plain_dir, fused_dir = llama
    ids = torch.tensor([[5, 9, 3, 7, 11, 4], [0, 0, 8, 6, 2, 10]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches, buffers = [], []
    for directory in (plain_dir, fused_dir):
        gen = OnnxGenerator(directory)
        cache = KVCache.from_spec("dynamic", gen.config, batch_size=2, device="cpu")
        gen.step(cache, ids[:, :4], mask[:, :0], mask[:, :4], pos[:, :4])
        buffers.append(cache.stores[1].keys_values()[0].data_ptr())
        for t in (4, 5):
            gen.step(cache, ids[:, t : t + 1], mask[:, :t], mask[:, t : t + 1], pos[:, t : t + 1])
        buffers.append(cache.stores[1].keys_values()[0].data_ptr())
        caches.append(cache)
    # the plain graph's presents are new tensors every step; the fused graph wrote into the store's buffer
    assert buffers[0] != buffers[1] and buffers[2] == buffers[3]
    for layer in range(2):
        real = caches[0].stores[layer].positions >= 0  # padding slots are never attended: their values differ
        assert torch.equal(caches[1].stores[layer].positions, caches[0].stores[layer].positions)
        for got, want in zip(caches[1].stores[layer].keys_values(), caches[0].stores[layer].keys_values(),
                             strict=True):
            assert got.shape == want.shape == (2, 2, 6, 16)
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_policies_need_the_unfused_graph(llama) -> None:
    with pytest.raises(UnsupportedSpecError, match="injected with --fused.*--policies"):
        OnnxGenerator(llama[2], cache="keyformer:budget=0.5")


def test_run_in_place_needs_a_fused_graph(llama) -> None:
    gen = OnnxGenerator(llama[1])
    with pytest.raises(KVCacheError, match="--fused"):
        gen.decoder.run_in_place(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                                 torch.zeros(1, 1, dtype=torch.long), [])


def test_dense_stores_open_and_commit_slots() -> None:
    like = torch.empty(2, 3, 0, 4)
    dyn = DynamicLayer(min_growth=4)
    k, v = dyn.open_slots(5, like, like)
    assert k.shape == (2, 3, 9, 4) and dyn.physical_length == 0
    k[:, :, :5] = 1.0
    dyn.commit_slots(5, torch.tensor([[True] * 5, [False, False, True, True, True]]))
    assert dyn.physical_length == 5 and dyn.seen == 5
    assert dyn.positions[1, 0].tolist() == [-1, -1, 2, 3, 4]
    dyn.commit_slots(1)
    assert dyn.positions[0, 2].tolist() == [0, 1, 2, 3, 4, 5]
    grown, _ = dyn.open_slots(10, like, like)  # past its capacity: a larger buffer, the held slots copied
    assert grown.shape[2] >= 16 and torch.equal(grown[:, :, :5], torch.ones(2, 3, 5, 4))
    with pytest.raises(KVCacheError, match="open_slots"):
        DynamicLayer().commit_slots(1)

    static = StaticLayer(capacity=6, batch_size=2, num_kv_heads=3, head_dim=4)
    buf, _ = static.open_slots(4, like, like)
    assert buf.shape == (2, 3, 6, 4)
    static.commit_slots(4)
    static.commit_slots(1)
    assert static.physical_length == 5 and static.positions[0, 0, :6].tolist() == [0, 1, 2, 3, 4, -1]
    with pytest.raises(CacheCapacityError, match="capacity is 6"):
        static.open_slots(2, like, like)


def test_float16_graph_fuses(tmp_path) -> None:
    """A half-precision export fuses too (the op, the rotary and the norm take float16; the padding bias is
    built in the graph's dtype) and gives the original's logits within half-precision error."""
    from kvcache.onnx.check import check_graph

    export_model(random_model("llama", **TINY, num_kv_heads=2).half(), tmp_path)
    fused = inject_file(tmp_path, tmp_path / "fused.onnx", fused=True)
    assert _ops(fused)["GroupQueryAttention"] == TINY["num_layers"]
    report = check_graph(tmp_path / "model.onnx", fused, batch=2, prefill=5, steps=4, tol=1e-2)
    assert report.ok, report.format()


def _gqa_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("arch", sorted(ROTATE_HALF))
def test_attention_op_rotates_and_reads_packed_projections(tmp_path, arch: str) -> None:
    """Heads of 16: the op rotates Q and K itself from constant tables of the model's context, looked up by
    position_ids, and reads one packed QKV projection; no rotary node is left. Step logits equal the
    original's at batch 3 with left padding (the runtime runs a padded batch's first step row by row, the
    first token alone) and with a sliding window (Mistral)."""
    from kvcache.onnx.check import check_graph

    extra = {"mistral": {"sliding_window": 4}}.get(arch, {})
    export_model(random_model(arch, num_layers=2, hidden=64, num_heads=4, num_kv_heads=2, max_positions=96,
                              **extra), tmp_path)
    fused = inject_file(tmp_path, tmp_path / "fused.onnx", fused=True)
    assert _ops(fused)["RotaryEmbedding"] == 0
    for node in _gqa_nodes(fused):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1 and list(node.input[1:3]) == ["", ""]
        assert node.input[9] == names.POSITION_IDS
    meta = {p.key: p.value for p in onnx.load(str(fused), load_external_data=False).metadata_props}
    assert meta[names.META_ROTARY_POSITIONS] == "96"
    report = check_graph(tmp_path / "model.onnx", fused, batch=3, prefill=6, steps=5)
    assert report.ok, report.format()


def test_padded_first_step_needs_the_split(tmp_path) -> None:
    """What the runtime's split is for: fed whole, a left-padded first step of a graph whose attention op
    rotates Q and K is rotated from row 0's first position in every row, so the padded row's cached keys
    differ from the plain injection's; split (DecoderSession), they are the same."""
    from kvcache.onnx.session import DecoderSession

    export_model(random_model("llama", num_layers=1, hidden=64, num_heads=4, num_kv_heads=2), tmp_path)
    fused = DecoderSession(inject_file(tmp_path, tmp_path / "fused.onnx", fused=True))
    plain = DecoderSession(inject_file(tmp_path, tmp_path / "plain.onnx"))
    assert fused.signature.rotary_positions == 2048 and plain.signature.rotary_positions is None
    ids = torch.tensor([[5, 9, 3, 7], [0, 0, 8, 6]])
    mask = (ids != 0).long()
    pos = torch.tensor([[0, 1, 2, 3], [1, 1, 0, 1]])
    empty = torch.zeros(2, 2, 0, 16)
    want = plain.run(ids, mask, pos, [(empty, empty)]).presents[0][0]
    got = fused.run(ids, mask, pos, [(empty, empty)]).presents[0][0]
    real = mask.bool()
    torch.testing.assert_close(got[:, :, 2:][real[:, None, 2:].expand(-1, 2, -1)],
                               want[:, :, 2:][real[:, None, 2:].expand(-1, 2, -1)], rtol=1e-5, atol=1e-5)
    whole = fused.session.run([names.present_key(0)], {
        names.INPUT_IDS: ids.numpy(), names.ATTENTION_MASK: mask.numpy(), names.POSITION_IDS: pos.numpy(),
        names.past_key(0): empty.numpy(), names.past_value(0): empty.numpy()})[0]
    assert not np.allclose(whole[1, :, 2:], want[1, :, 2:].numpy(), atol=1e-3)


def test_generation_past_the_rotary_tables_is_refused(llama) -> None:
    gen = OnnxGenerator(llama[2])
    limit = gen.decoder.signature.rotary_positions
    assert limit == llama[0].config.max_position_embeddings
    refused = rf"below {limit} only.*--max-new-tokens to \d+.*without --fused"
    with pytest.raises(KVCacheError, match=refused), pytest.warns(UserWarning, match="exceeds the model's"):
        gen.generate("ab", max_new_tokens=limit)
