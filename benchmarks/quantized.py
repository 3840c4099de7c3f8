"""Decode speed and memory of quantized KV caches: kvcache int8/int4/int2 against the dense cache and against
transformers' ``QuantizedCache`` with the same bits, all in one run.

The model is the one of ``benchmarks/decode_speed.py`` (random Llama: 8 layers, hidden 512, 8 query heads,
2 KV heads, head dim 64; nothing downloaded). For each context (default 1024 and 4096 tokens) a random
prompt is prefilled into each cache through the model itself (chunks of 512, so every cache quantizes the
way it does in use), then the caches take turns, round-robin with a rotating order, decoding ``--steps``
greedy tokens each, ``--repeats`` times; the table gives the median time per token, its ratio to kvcache's
dense cache and to transformers' quantized cache with the same bits, and the cache's bytes (``nbytes()``
for kvcache; for transformers, the bytes of its quantized tensors and residual lists).

Every kvcache row uses group 64 and a residual window of 128 tokens (the defaults); the transformers rows
are built with the same group size and residual length (``q_group_size=64, residual_length=128``), backend
``quanto`` (2 and 4 bits; ``hqq`` too when installed).

    python benchmarks/quantized.py --threads 1 --json results/quantized.json
    python benchmarks/quantized.py --quick

Goals (issue 11): kvcache faster than transformers' quantized cache at every setting (>= 1.5x); int4 within
1.3x of the dense cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, QuantizedCache

from kvcache.cache import KVCache
from kvcache.files import write_text_atomic
from kvcache.models.random import random_model

FULL_MODEL = dict(num_layers=8, hidden=512, num_heads=8, num_kv_heads=2, vocab_size=8192,
                  intermediate_size=1408)
QUICK_MODEL = dict(num_layers=2, hidden=128, num_heads=4, num_kv_heads=2, vocab_size=1024,
                   intermediate_size=352)
DENSE = "kvcache dynamic"


def _configs(quick: bool) -> dict[str, tuple[str, Any]]:
    """Row name -> (family, how to build it)."""
    rows: dict[str, tuple[str, Any]] = {DENSE: ("kvcache", "dynamic")}
    for bits in (8, 4, 2):
        rows[f"kvcache int{bits}"] = ("kvcache", f"int{bits}")
    backends = ["quanto"] + (["hqq"] if importlib.util.find_spec("hqq") else [])
    for backend in backends:
        for bits in (4, 2):
            rows[f"hf QuantizedCache {backend} int{bits}"] = ("hf", (backend, bits))
    if quick:
        rows = {k: v for k, v in rows.items() if "int2" not in k or k.startswith("kvcache")}
    return rows


def _new_cache(family: str, how: Any, model: Any) -> Cache:
    if family == "kvcache":
        return KVCache.from_spec(how, model.config)
    backend, bits = how
    return QuantizedCache(backend, model.config, nbits=bits, q_group_size=64, residual_length=128)


def _cache_kwarg(model: Any) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model: Any, cache: Cache, prompt: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    name = _cache_kwarg(model)
    logits = torch.empty(0)
    for lo in range(0, prompt.shape[1], chunk):
        logits = model(input_ids=prompt[:, lo:lo + chunk], use_cache=True, logits_to_keep=1,
                       **{name: cache}).logits
    return logits[:, -1:].argmax(-1)


def _decode(model: Any, cache: Cache, token: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    name = _cache_kwarg(model)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps, token


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a quantized tensor subclass (quanto), the bytes of its parts (the subclass
    itself reports the logical, dequantized size)."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.nbytes


def _nbytes(cache: Cache) -> int:
    if isinstance(cache, KVCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            for t in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(t, torch.Tensor):
                    total += _tensor_bytes(t)
    return total


def run(contexts: list[int], steps: int, repeats: int, model_kwargs: dict[str, int],
        quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    longest = max(contexts) + (repeats + 2) * steps + 64
    model = random_model("llama", attn_implementation="sdpa", max_positions=longest, **model_kwargs)
    configs = _configs(quick)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for context in contexts:
            prompt = torch.randint(4, model.config.vocab_size, (1, context))
            caches: dict[str, Cache] = {}
            tokens: dict[str, torch.Tensor] = {}
            failed: dict[str, str] = {}
            for name, (family, how) in configs.items():
                try:
                    caches[name] = _new_cache(family, how, model)
                    tokens[name] = _prefill(model, caches[name], prompt)
                    _, tokens[name] = _decode(model, caches[name], tokens[name], 1)  # untimed warm-up step
                except Exception as exc:  # noqa: BLE001 - a peer that fails is a finding, reported as such
                    failed[name] = f"{type(exc).__name__}: {exc}"[:300]
                    caches.pop(name, None)
            per_token: dict[str, list[float]] = {name: [] for name in caches}
            names = list(caches)
            for repeat in range(repeats):
                shift = repeat % len(names)
                for name in names[shift:] + names[:shift]:
                    seconds, tokens[name] = _decode(model, caches[name], tokens[name], steps)
                    per_token[name].append(seconds)
            dense_ms = statistics.median(per_token[DENSE]) * 1e3
            dense_bytes = _nbytes(caches[DENSE])
            for name in configs:
                if name in failed:
                    rows.append({"context": context, "cache": name, "error": failed[name]})
                    continue
                ms = statistics.median(per_token[name]) * 1e3
                bits = name.rsplit("int", 1)[-1] if "int" in name else None
                hf = next((statistics.median(per_token[n]) * 1e3 for n in per_token
                           if n.startswith("hf ") and n.endswith(f"int{bits}") and "quanto" in n), None)
                rows.append({"context": context, "cache": name, "ms_per_token": ms,
                             "ratio_to_dense": ms / dense_ms,
                             "speedup_over_hf_quanto": hf / ms if hf and name.startswith("kvcache") else None,
                             "cache_bytes": _nbytes(caches[name]),
                             "bytes_vs_dense": _nbytes(caches[name]) / dense_bytes,
                             "samples_ms": [t * 1e3 for t in per_token[name]]})
            print(f"context {context}: done", flush=True)
            del caches
    return {"model": {"arch": "llama", **model_kwargs, "attn_implementation": "sdpa", "dtype": "float32"},
            "contexts": contexts, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = ["| context | cache | ms/token | vs dense | speed-up vs hf quanto, same bits | bytes vs dense |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['cache']} | failed: {r['error']} | | | |")
            continue
        speed = f"{r['speedup_over_hf_quanto']:.2f}x" if r["speedup_over_hf_quanto"] else "-"
        lines.append(f"| {r['context']} | {r['cache']} | {r['ms_per_token']:.2f} | "
                     f"{r['ratio_to_dense']:.2f} | {speed} | {r['bytes_vs_dense']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model, short contexts (smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        result = run([256], 2, 2, QUICK_MODEL, quick=True)
    else:
        result = run(args.contexts, args.steps, args.repeats, FULL_MODEL, quick=False)
    print(table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
