"""A plain greedy loop and a streaming scorer over any ``transformers`` cache, for the peer rows.

kvcache's own rows go through :func:`kvcache.generate`; transformers' caches and kvpress's presses (in a side
environment, see ``kvpress_runner.py``) go through this loop, so every peer decodes the same token ids the
same way: one prefill forward over the whole prompt (kvpress compresses there), then one token per step with
explicit positions (a compressed cache is shorter than the tokens seen, so positions cannot come from its
length). This file imports only ``torch`` and the standard library: the side environment loads it by path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

Scope = Callable[[], contextlib.AbstractContextManager[Any]]


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of the tensors an object holds (its attributes, lists, dicts), each tensor counted once.

    A quantized tensor wrapper (quanto's ``QTensor``: ``_data``, ``_scale``, ``_shift``) counts its parts.
    """
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        parts = [getattr(obj, n) for n in ("_data", "_scale", "_shift") if isinstance(getattr(obj, n, None),
                                                                                     torch.Tensor)]
        if parts:
            return sum(tensor_bytes(p, seen) for p in parts)
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


def cache_bytes(cache: Any) -> int:
    """Bytes held by a ``transformers`` cache's layers (``cache.layers``), or by the whole object."""
    layers = getattr(cache, "layers", None)
    return tensor_bytes(list(layers) if layers is not None else cache)


@functools.cache
def _cache_kwarg(model_type: type) -> str:
    """``cache`` on transformers releases that renamed ``past_key_values`` (and warn about the old name)."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _forward(model: Any, ids: torch.Tensor, cache: Any, start: int, explicit_cache_position: bool) -> Any:
    n = ids.shape[1]
    positions = torch.arange(start, start + n, device=ids.device)[None]
    kwargs: dict[str, Any] = {"input_ids": ids, _cache_kwarg(type(model)): cache, "position_ids": positions,
                              "use_cache": True}
    if explicit_cache_position:
        kwargs["cache_position"] = positions[0]
    return model(**kwargs)


@torch.inference_mode()
def greedy(model: Any, prompt_ids: Sequence[int], cache: Any, max_new_tokens: int, eos_ids: Sequence[int],
           *, scope: Scope = contextlib.nullcontext, explicit_cache_position: bool = True) -> dict[str, Any]:
    """Greedy decoding of one prompt through ``cache``; returns the contract's generation record.

    Parameters
    ----------
    prompt_ids:
        The prompt's token ids (with BOS), prefilled in one forward pass.
    scope:
        Entered around the whole loop (e.g. a kvpress press: it compresses in the prefill forward, a
        decoding press also in the steps).
    explicit_cache_position:
        Pass ``cache_position`` (the logical positions); kvpress expects it to be derived from the cache.

    Returns
    -------
    dict
        ``token_ids`` (new tokens), ``prompt_tokens``, ``prefill_s``, ``decode_s``, ``decode_steps``,
        ``cache_bytes`` (at the end), ``peak_cache_bytes``.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    eos = set(eos_ids)
    with scope():
        t0 = time.perf_counter()
        out = _forward(model, ids, cache, 0, explicit_cache_position)
        token = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        tokens = [token]
        peak = cache_bytes(cache)
        steps = 0
        while len(tokens) < max_new_tokens and token not in eos:
            step = torch.tensor([[token]], device=device)
            out = _forward(model, step, cache, len(prompt_ids) + steps, explicit_cache_position)
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            steps += 1
            peak = max(peak, cache_bytes(cache))
        t2 = time.perf_counter()
    return {"token_ids": tokens, "prompt_tokens": len(prompt_ids), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_steps": steps, "cache_bytes": cache_bytes(cache), "peak_cache_bytes": peak}


@torch.inference_mode()
def stream_nll(model: Any, window: Sequence[int], prefix: int, cache: Any, *,
               scope: Scope = contextlib.nullcontext, explicit_cache_position: bool = True) -> dict[str, Any]:
    """Negative log-likelihood of ``window[prefix:]`` with the cache active while streaming.

    The first ``prefix`` tokens are prefilled in one forward pass; every later token is then fed one at a
    time through the cache, and each next token is scored from the logits of the step before it (as
    StreamingLLM measures perplexity). Returns ``nll`` (natural log, summed), ``tokens`` scored,
    ``seconds``, ``cache_bytes`` at the end.
    """
    if not 1 <= prefix < len(window):
        raise ValueError(f"prefix must be in [1, {len(window) - 1}] for a window of {len(window)} tokens, "
                         f"got {prefix}")
    device = next(model.parameters()).device
    ids = torch.tensor([list(window)], device=device)
    nll = 0.0
    with scope():
        t0 = time.perf_counter()
        logits = _forward(model, ids[:, :prefix], cache, 0, explicit_cache_position).logits[0, -1]
        for t in range(prefix, len(window)):
            nll += float(torch.nn.functional.cross_entropy(logits.float()[None], ids[0, t:t + 1]))
            if t + 1 < len(window):
                logits = _forward(model, ids[:, t:t + 1], cache, t, explicit_cache_position).logits[0, -1]
        seconds = time.perf_counter() - t0
    return {"nll": nll, "tokens": len(window) - prefix, "seconds": seconds, "cache_bytes": cache_bytes(cache)}
