"""Bad input through the Python API: a ``ValueError`` (``KVCacheError``) naming the problem, files unchanged.

Each row of :data:`CASES` is ``(id, call, fragment)``: ``call(ctx)`` must raise a ``ValueError`` whose
message holds ``fragment``, and leave every file of the workspace byte for byte as it was. ``ctx`` holds
the workspace path and the models loaded from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bad_input_workspace
import pytest
from transformers import PretrainedConfig

from kvcache import KVCache, generate
from kvcache.models import load
from kvcache.onnx.check import check_graph
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import inject_file
from kvcache.onnx.runtime import OnnxGenerator
from kvcache.resources import CacheMemoryError


@dataclass
class Ctx:
    ws: Path
    model: Any
    tokenizer: Any


def gen(**kwargs: Any):
    """A call of ``generate`` on the workspace Llama with ``kwargs`` changed."""
    def call(c: Ctx) -> Any:
        args = {"model": c.model, "tokenizer": c.tokenizer, "prompts": "hi", "max_new_tokens": 2, **kwargs}
        return generate(args.pop("model"), args.pop("tokenizer"), args.pop("prompts"), **args)
    return call


CASES: list[tuple[str, Any, str]] = [
    ("max_new_tokens float", gen(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    ("max_new_tokens bool", gen(max_new_tokens=True), "max_new_tokens must be an integer"),
    ("max_new_tokens str", gen(max_new_tokens="3"), "max_new_tokens must be an integer"),
    ("max_new_tokens zero", gen(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens huge", gen(max_new_tokens=10**12), "lower max_new_tokens"),
    ("prefill chunk zero", gen(prefill_chunk_size=0), "prefill_chunk_size"),
    ("prefill chunk float", gen(prefill_chunk_size=0.5), "prefill_chunk_size"),
    ("temperature inf", gen(temperature=float("inf")), "finite"),
    ("temperature nan", gen(temperature=float("nan")), "finite"),
    ("temperature negative", gen(temperature=-1.0), "temperature"),
    ("temperature text", gen(temperature="hot"), "temperature"),
    ("top_k float", gen(temperature=1.0, top_k=2.5), "top_k"),
    ("top_k zero", gen(temperature=1.0, top_k=0), "top_k"),
    ("top_p zero", gen(temperature=1.0, top_p=0.0), "top_p"),
    ("top_p above one", gen(temperature=1.0, top_p=1.5), "top_p"),
    ("seed overflow", gen(seed=2**70), "seed"),
    ("seed text", gen(seed="a"), "seed"),
    ("prompt bytes", gen(prompts=b"hi"), "decode bytes"),
    ("no prompts", gen(prompts=[]), "empty list"),
    ("prompt not text", gen(prompts=[1]), "prompt 0 must be a string"),
    ("prompt not utf-8", gen(prompts="hi\udcff"), "not valid UTF-8"),
    ("prompt over the context", gen(prompts="tok " * 80), "context is 64"),
    ("huge static capacity", gen(cache="static:capacity=1000000000"), "static:capacity=N"),
    ("model None", gen(model=None), "model must be a transformers causal LM"),
    ("tokenizer None", gen(tokenizer=None), "tokenizer must be"),
    ("encoder model", lambda c: generate(_bert(c), c.tokenizer, "hi"), "encoder model"),
    ("load None", lambda c: load(None), "name_or_path must be"),
    ("load a number", lambda c: load(3), "name_or_path must be"),
    ("load empty name", lambda c: load(""), "empty"),
    ("load an encoder", lambda c: load(c.ws / "bert"), "encoder model"),
    ("load corrupt weights", lambda c: load(c.ws / "corrupt_st"), "corrupt or truncated"),
    ("load a bad dtype", lambda c: load(c.ws / "llama", dtype=3), "dtype must be"),
    ("cache on a bogus device", lambda c: KVCache.from_spec("static", c.model.config, device="bogus",
                                                             max_cache_len=8), "unknown device"),
    ("cache for an empty config", lambda c: KVCache.from_spec("dynamic", PretrainedConfig()), "lacks"),
    ("cache for no config", lambda c: KVCache.from_spec("dynamic", None), "PretrainedConfig"),
    ("cache batch zero", lambda c: KVCache.from_spec("dynamic", c.model.config, batch_size=0), "batch_size"),
    ("onnx generator on None", lambda c: OnnxGenerator(None), "must be a path"),
    ("onnx generator on a stale graph", lambda c: OnnxGenerator(c.ws / "stale"),
     "injected from another graph"),
    ("onnx generator negative threads", lambda c: OnnxGenerator(c.ws / "exp", threads=-3), "threads"),
    ("onnx generate float tokens", lambda c: OnnxGenerator(c.ws / "exp").generate("hi", max_new_tokens=2.5),
     "max_new_tokens must be an integer"),
    ("inject onto its input", lambda c: inject_file(c.ws / "exp" / "model.onnx", c.ws / "exp" / "model.onnx"),
     "is the input graph"),
    ("inject onto an unrelated file", lambda c: inject_file(c.ws / "exp", c.ws / "notes.txt"),
     "is not a graph"),
    ("export into a non-empty directory", lambda c: export_model(c.model, c.ws / "exp"),
     "already holds files"),
    ("export with a bad opset", lambda c: export_model(c.model, c.ws / "new", opset=5), "opset 14 to 20"),
    ("check a stale graph", lambda c: check_graph(c.ws / "stale" / "model.onnx", c.ws / "stale"),
     "injected from another graph"),
    ("check with another config", lambda c: check_graph(c.ws / "mismatch" / "model.onnx", c.ws / "mismatch"),
     "does not match the config"),
]


def _bert(c: Ctx) -> Any:
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(c.ws / "bert")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    ws = bad_input_workspace.build(tmp_path_factory.mktemp("bad-api"))
    model, tokenizer = load(ws / "llama")
    return Ctx(ws, model, tokenizer)


@pytest.mark.parametrize(("call", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(ctx, call, fragment):
    before = bad_input_workspace.fingerprint(ctx.ws)
    with pytest.raises(ValueError) as caught:
        call(ctx)
    assert fragment in str(caught.value)
    assert bad_input_workspace.fingerprint(ctx.ws) == before


def test_memory_error_is_a_kvcache_error(ctx):
    with pytest.raises(CacheMemoryError, match="free"):
        gen(cache="static:capacity=1000000000")(ctx)
