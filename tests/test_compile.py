"""A static KVCache under torch.compile: one graph for every decode step, no changing Python ints in it."""

from __future__ import annotations

import warnings

import torch
from transformers.utils import logging as hf_logging

from kvcache.cache import KVCache
from kvcache.models.random import random_model

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*deprecated.*")


def test_compiled_static_decode_is_one_graph_without_symbolic_ints() -> None:
    model = random_model("llama", attn_implementation="sdpa", num_layers=1)
    graphs: list[list[str]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        # Inputs that are Python ints become SymInts: they change every step and defeat CUDA graphs.
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([type(n.meta.get("example_value")).__name__ for n in inputs])
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=recording_backend, fullgraph=True)
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = KVCache.from_spec("static:capacity=16", model.config, batch_size=2)
    ref_cache = KVCache.from_spec("dynamic", model.config)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        model(ids, past_key_values=ref_cache, use_cache=True)
        for i in range(4):
            got = step(input_ids=tok, past_key_values=cache, use_cache=True).logits
            ref = model(input_ids=tok, past_key_values=ref_cache, use_cache=True).logits
            assert (got - ref).abs().max().item() < 1e-5, i
            tok = got[:, -1:].argmax(-1)
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert "SymInt" not in graphs[0]
    # the host-side counts catch up with the compiled steps when asked
    assert cache.get_seq_length() == 10 and cache.physical_length() == 10
    held_k, _ = cache.stores[0].keys_values()
    ref_k, _ = ref_cache.stores[0].keys_values()
    assert torch.allclose(held_k, ref_k, atol=1e-6)
