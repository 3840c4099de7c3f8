"""Tiny randomly initialised decoders of many architectures, for tests and benchmarks.

Nothing is downloaded: each model is built from a config with a fixed seed, so the same call gives the
same weights on every machine.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import models as hf_models

#: architecture name -> (config class path, keyword names for layers/hidden/heads/kv-heads/ffn/positions)
ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "phi3",
    "gemma",
    "gpt2",
    "gpt_neox",
    "gptj",
    "codegen",
    "gpt_neo",
    "opt",
    "bloom",
    "mpt",
)

#: architectures whose attention uses grouped-query attention when asked for ``num_kv_heads < num_heads``
GQA_ARCHITECTURES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma"})


def random_config(
    arch: str,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 128,
    max_positions: int = 2048,
    **overrides: Any,
) -> PretrainedConfig:
    """Build a small config of architecture ``arch`` (one of :data:`ARCHITECTURES`).

    ``num_kv_heads`` applies to GQA-capable architectures only (default: ``num_heads // 2`` there, so
    tests exercise GQA by default). ``overrides`` are set on the config verbatim.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    kv = num_kv_heads if num_kv_heads is not None else max(1, num_heads // 2)
    ffn = hidden * 2
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch in ("llama", "mistral", "qwen2", "phi3", "gemma"):
        kwargs: dict[str, Any] = dict(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=kv,
            max_position_embeddings=max_positions,
        )
        if arch == "gemma":
            kwargs["head_dim"] = hidden // num_heads
        if arch in ("mistral", "qwen2"):
            kwargs["sliding_window"] = None
        if arch == "qwen2":
            kwargs["use_sliding_window"] = False
        cls = {
            "llama": hf_models.llama.LlamaConfig,
            "mistral": hf_models.mistral.MistralConfig,
            "qwen2": hf_models.qwen2.Qwen2Config,
            "phi3": hf_models.phi3.Phi3Config,
            "gemma": hf_models.gemma.GemmaConfig,
        }[arch]
    elif arch == "gpt2":
        cls = hf_models.gpt2.GPT2Config
        kwargs = dict(n_embd=hidden, n_layer=num_layers, n_head=num_heads, n_positions=max_positions)
    elif arch == "gpt_neox":
        cls = hf_models.gpt_neox.GPTNeoXConfig
        kwargs = dict(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_positions,
        )
    elif arch == "gptj":
        cls = hf_models.gptj.GPTJConfig
        kwargs = dict(n_embd=hidden, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
                      rotary_dim=hidden // num_heads // 2)
    elif arch == "codegen":
        cls = hf_models.codegen.CodeGenConfig
        kwargs = dict(n_embd=hidden, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
                      n_ctx=max_positions, rotary_dim=hidden // num_heads // 2)
    elif arch == "gpt_neo":
        cls = hf_models.gpt_neo.GPTNeoConfig
        kwargs = dict(
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            max_position_embeddings=max_positions,
            attention_types=[[["global"], num_layers]],
        )
    elif arch == "opt":
        cls = hf_models.opt.OPTConfig
        kwargs = dict(
            hidden_size=hidden,
            ffn_dim=ffn,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            word_embed_proj_dim=hidden,
            max_position_embeddings=max_positions,
        )
    elif arch == "bloom":
        cls = hf_models.bloom.BloomConfig
        kwargs = dict(hidden_size=hidden, n_layer=num_layers, n_head=num_heads)
    else:  # mpt
        cls = hf_models.mpt.MptConfig
        kwargs = dict(d_model=hidden, n_layers=num_layers, n_heads=num_heads, max_seq_len=max_positions,
                      expansion_ratio=2)
    kwargs.update(common)
    kwargs.update(overrides)
    return cls(**kwargs)


def random_model(
    arch: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    **config_kwargs: Any,
) -> torch.nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` of architecture ``arch`` in eval mode.

    Parameters
    ----------
    arch:
        One of :data:`ARCHITECTURES`.
    seed:
        Seed for the weights; the same seed gives the same model.
    attn_implementation:
        ``"eager"`` or ``"sdpa"`` (where the architecture supports it).
    config_kwargs:
        Forwarded to :func:`random_config`.
    """
    config = random_config(arch, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=dtype)
    return model.eval()
