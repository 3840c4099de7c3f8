"""Per-token decode time of kvcache's caches against transformers' caches and a no-cache recompute.

One random Llama-shaped model of realistic proportions (8 layers, hidden 512, 8 query heads, 2 KV heads,
vocab 8192; nothing is downloaded). For each context length, the prompt is run once and its keys/values
are copied into every cache, so all caches start from the same state; then each cache decodes ``--steps``
tokens greedily, ``--repeats`` times, round-robin across caches (so background load hits all of them
alike), and the median time per token is reported. The recompute baseline runs the whole sequence without a
cache for every new token.

    python benchmarks/decode_speed.py                      # full run (~2-4 min on 2 CPU cores)
    python benchmarks/decode_speed.py --quick              # smoke run (seconds)
    python benchmarks/decode_speed.py --json results.json  # also write the numbers

Goals: kvcache dynamic within 1.05x of ``DynamicCache``; cached decode at least 10x faster than recompute
at context 2048; kvcache's attention function in SDPA mode (the model switched by ``kvcache.enable``, no
statistics requested) within 1.05x of transformers' SDPA attention on the same cache.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache, StaticCache

import kvcache
from kvcache.cache import KVCache
from kvcache.files import write_text_atomic
from kvcache.models.random import random_model

#: the model shape of the full run (and of --quick)
FULL_MODEL = dict(num_layers=8, hidden=512, num_heads=8, num_kv_heads=2, vocab_size=8192,
                  intermediate_size=1408)
QUICK_MODEL = dict(num_layers=2, hidden=128, num_heads=4, num_kv_heads=2, vocab_size=1024,
                   intermediate_size=352)

BASELINE = "hf DynamicCache"
#: kvcache's dynamic cache with the model switched to kvcache's attention function (SDPA mode: no statistics
#: requested, no eviction), against the same cache under transformers' SDPA attention
KVCACHE_ATTENTION = "kvcache dynamic + kvcache attention"
CACHED = ("kvcache dynamic", KVCACHE_ATTENTION, "kvcache static", "hf DynamicCache", "hf StaticCache")
RECOMPUTE = "recompute (no cache)"
#: tokens appended when timing ``cache.update`` alone (cheap, so many: less noise)
UPDATE_STEPS = 64


def _sync(device: torch.device) -> None:
    # Kernel launches are asynchronous on accelerators: wait for them before reading the clock.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_cache(name: str, model: Any, capacity: int, device: torch.device, dtype: torch.dtype) -> Cache:
    config = model.config
    if name in ("kvcache dynamic", KVCACHE_ATTENTION):
        return KVCache.from_spec("dynamic", config, device=device, dtype=dtype)
    if name == "kvcache static":
        return KVCache.from_spec(f"static:capacity={capacity}", config, device=device, dtype=dtype)
    if name == "hf DynamicCache":
        return DynamicCache(config=config)
    if name == "hf StaticCache":
        return StaticCache(config=config, max_cache_len=capacity)
    raise ValueError(f"unknown cache {name!r}")


def _cache_kwarg(model: Any) -> str:
    """``cache`` on recent transformers 5.x, ``past_key_values`` on earlier ones."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model: Any, prompt: torch.Tensor, chunk: int) -> tuple[DynamicCache, torch.Tensor]:
    """Run the prompt once; return its cache and the first generated token ``(1, 1)``."""
    cache = DynamicCache(config=model.config)
    name = _cache_kwarg(model)
    logits = torch.empty(0)
    for lo in range(0, prompt.shape[1], chunk):
        step = prompt[:, lo : lo + chunk]
        logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **{name: cache}).logits
    return cache, logits[:, -1:].argmax(-1)


def _copy_into(source: DynamicCache, target: Cache) -> None:
    """Give ``target`` the prompt's keys/values through its own ``update`` (same path as a prefill)."""
    for idx, layer in enumerate(source.layers):
        target.update(layer.keys.clone(), layer.values.clone(), idx)


def _time_decode(model: Any, cache: Cache, token: torch.Tensor, steps: int,
                 device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds per token over ``steps`` greedy decode steps; returns the last token to continue from."""
    name = _cache_kwarg(model)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache}).logits
        token = logits[:, -1:].argmax(-1)
    _sync(device)
    return (time.perf_counter() - start) / steps, token


def _attention(model: Any, name: str) -> contextlib.AbstractContextManager[Any]:
    """The model switched to kvcache's attention function for its row, as it is for every other row."""
    return kvcache.enable(model) if name == KVCACHE_ATTENTION else contextlib.nullcontext()


def _time_updates(cache: Cache, num_layers: int, steps: int, device: torch.device) -> float:
    """Seconds per token spent in ``cache.update`` alone (all layers), without the model around it.

    Appends ``steps`` random tokens: run it last on a cache, its contents are garbage afterwards.
    """
    k, v = cache.layers[0].keys, cache.layers[0].values
    new_k = torch.randn_like(k[:, :, :1])
    new_v = torch.randn_like(v[:, :, :1])
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        for idx in range(num_layers):
            cache.update(new_k, new_v, idx)
    _sync(device)
    return (time.perf_counter() - start) / steps


def _time_recompute(model: Any, prompt: torch.Tensor, steps: int, device: torch.device) -> list[float]:
    """Seconds per token when every new token re-runs the whole sequence without a cache."""
    ids = prompt
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - start)
        ids = torch.cat([ids, token], dim=1)
    return times


def run(contexts: list[int], steps: int, repeats: int, recompute_steps: int, model_kwargs: dict[str, int],
        device: torch.device, dtype: torch.dtype, attn: str,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every cache at every context; returns a JSON-serialisable dict (see module docstring)."""
    torch.manual_seed(0)
    longest = max(contexts) + (repeats + 1) * steps + UPDATE_STEPS + 1
    model = random_model("llama", attn_implementation=attn, dtype=dtype, max_positions=longest + 63,
                         **model_kwargs).to(device)
    layers = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for context in contexts:
            prompt = torch.randint(0, vocab, (1, context), device=device)
            source, first = _prefill(model, prompt, chunk=512)
            capacity = context + (repeats + 1) * steps + UPDATE_STEPS + 1
            caches = {name: _new_cache(name, model, capacity, device, dtype) for name in CACHED}
            tokens = {}
            for name, cache in caches.items():
                _copy_into(source, cache)
                # One untimed step each: first-call allocations and lazy initialisation stay out of timing.
                with _attention(model, name):
                    _, tokens[name] = _time_decode(model, cache, first, 1, device)
            per_token: dict[str, list[float]] = {name: [] for name in CACHED}
            for repeat in range(repeats):
                # Rotate who goes first, so no cache always runs right after the same neighbour.
                shift = repeat % len(CACHED)
                for name in CACHED[shift:] + CACHED[:shift]:
                    with _attention(model, name):
                        seconds, tokens[name] = _time_decode(model, caches[name], tokens[name], steps, device)
                    per_token[name].append(seconds)
            # All caches saw the same prompt and greedy path: their tokens must agree (a correctness check).
            agree = len({int(t) for t in tokens.values()}) == 1
            per_token[RECOMPUTE] = _time_recompute(model, prompt, recompute_steps, device)
            # The cache's own share of a step, to explain the differences between the rows above.
            update_ms = {name: 1e3 * _time_updates(cache, layers, UPDATE_STEPS, device)
                         for name, cache in caches.items()}
            base = statistics.median(per_token[BASELINE])
            for name, times in per_token.items():
                ms = statistics.median(times) * 1e3
                rows.append({"context": context, "cache": name, "ms_per_token": ms,
                             "ratio_to_dynamiccache": ms / (base * 1e3),
                             "samples_ms": [t * 1e3 for t in times],
                             "tokens_agree": agree if name != RECOMPUTE else None,
                             "update_ms_per_token": update_ms.get(name)})
            log(f"context {context}: done" + ("" if agree else " (WARNING: caches disagree on tokens)"))
            del caches, source
    return {
        "model": {"arch": "llama", **model_kwargs, "attn_implementation": attn, "dtype": str(dtype)},
        "contexts": contexts, "steps": steps, "repeats": repeats, "recompute_steps": recompute_steps,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "results": rows, "goals": _goals(rows, max(contexts)),
    }


def _goals(rows: list[dict[str, Any]], longest: int) -> dict[str, Any]:
    at = {(r["context"], r["cache"]): r["ms_per_token"] for r in rows}
    worst = max(r["ratio_to_dynamiccache"] for r in rows if r["cache"] == "kvcache dynamic")
    speedup = at[(longest, RECOMPUTE)] / at[(longest, "kvcache dynamic")]
    attention = max(at[(c, KVCACHE_ATTENTION)] / at[(c, "kvcache dynamic")] for c, name in at
                    if name == KVCACHE_ATTENTION)
    return {"kvcache_dynamic_worst_ratio": worst, "kvcache_dynamic_within_1_05": worst <= 1.05,
            f"recompute_over_kvcache_dynamic_at_{longest}": speedup, "cached_10x_faster": speedup >= 10,
            "kvcache_attention_over_sdpa_worst_ratio": attention,
            "kvcache_attention_within_1_05": attention <= 1.05}


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: ms/token and ratio to DynamicCache, one row per cache, one column pair per context."""
    contexts = report["contexts"]
    at = {(r["context"], r["cache"]): r for r in report["results"]}
    head = "| cache | " + " | ".join(f"ms/token @{c} | x DynamicCache @{c}" for c in contexts) + " |"
    rule = "|---|" + "---:|---:|" * len(contexts)
    lines = [head, rule]
    for name in (*CACHED, RECOMPUTE):
        cells = []
        for c in contexts:
            r = at[(c, name)]
            cells += [f"{r['ms_per_token']:.2f}", f"{r['ratio_to_dynamiccache']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    g = report["goals"]
    longest = max(contexts)
    lines += ["", "cache.update alone, all layers, ms per token: " + "; ".join(
        f"@{c}: " + ", ".join(f"{name} {at[(c, name)]['update_ms_per_token']:.2f}" for name in CACHED)
        for c in contexts), ""]
    lines.append(f"kvcache dynamic / DynamicCache, worst context: {g['kvcache_dynamic_worst_ratio']:.3f} "
                 f"(goal <= 1.05: {'met' if g['kvcache_dynamic_within_1_05'] else 'MISSED'}); "
                 f"recompute / kvcache dynamic at {longest}: "
                 f"{g[f'recompute_over_kvcache_dynamic_at_{longest}']:.1f}x "
                 f"(goal >= 10x: {'met' if g['cached_10x_faster'] else 'MISSED'}); "
                 f"kvcache attention (SDPA mode) / transformers SDPA, same cache, worst context: "
                 f"{g['kvcache_attention_over_sdpa_worst_ratio']:.3f} "
                 f"(goal <= 1.05: {'met' if g['kvcache_attention_within_1_05'] else 'MISSED'})")
    return "\n".join(lines)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Atomic: a crash mid-write never leaves a truncated results file behind.
    write_text_atomic(path, json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default: 128 512 2048")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per timed repeat (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cache (default 20)")
    parser.add_argument("--recompute-steps", type=int, default=None, help="no-cache steps timed (default 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny model, short contexts: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "recompute_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    report = run(
        contexts=args.contexts or ([32, 128] if quick else [128, 512, 2048]),
        steps=args.steps or (4 if quick else 8),
        repeats=args.repeats or (2 if quick else 20),
        recompute_steps=args.recompute_steps or (1 if quick else 3),
        model_kwargs=QUICK_MODEL if quick else FULL_MODEL,
        device=torch.device(args.device),
        dtype=getattr(torch, args.dtype),
        attn=args.attn,
    )
    report["quick"] = quick
    print(format_table(report))
    if quick:
        print("(--quick: a smoke run of a tiny model; its numbers say nothing about the goals)")
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
