"""The systems a bench run measures in this process: kvcache cache specs and transformers' own caches.

Each system answers the two primitives of the job contract (:mod:`kvcache.bench.contract`): greedy
generation of one prompt and the streaming score of one window. A system that cannot run here carries the
reason (``reason``), and the bench reports it as an unavailable row instead of hiding or crashing.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from kvcache.bench.loop import greedy, stream_nll


@dataclass(frozen=True)
class SystemInfo:
    """What a row is.

    Attributes
    ----------
    label:
        Row name, unique in a run: the spec as the user wrote it (``"keyformer:budget=0.5"``),
        ``"hf DynamicCache"``, ``"kvpress SnapKV 50%"``.
    peer:
        ``"kvcache"``, ``"hf"`` or ``"kvpress"``.
    family:
        Policy or press name, one line per family in the score-vs-budget plot.
    budget:
        Fraction of the prompt's tokens kept (1.0: all; ``None`` for an absolute token budget).
    spec:
        Canonical kvcache spec of a kvcache row.
    reason:
        Why the system cannot run here (``None`` when it can).
    """

    label: str
    peer: str
    family: str
    budget: float | None
    spec: str | None = None
    reason: str | None = None


def _eos(job: dict[str, Any], tokenizer: Any, model: Any) -> list[int]:
    if job.get("ignore_eos"):
        return []
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return list(eos) if isinstance(eos, list | tuple) else [eos]


class KVCacheSystem:
    """A kvcache cache spec, run through :func:`kvcache.generate` (generation) and a
    :class:`kvcache.KVCache` built from the spec (streaming)."""

    def __init__(self, label: str, model: Any, tokenizer: Any) -> None:
        from kvcache.errors import KVCacheError
        from kvcache.spec import CacheSpec

        spec = CacheSpec.parse(label)  # a typo is the user's error: it raises here, before anything runs
        policy = spec.policy
        budget: float | None = 1.0
        if policy is not None and policy.name != "full":
            b = policy.params.get("budget")
            budget = float(b) if isinstance(b, int | float) else None
        reason = None
        try:
            spec.require_available()
        except KVCacheError as err:
            reason = str(err)
        family = policy.name if policy is not None else "full"
        if family == "full" and spec.precision is not None:
            family = str(spec.precision)
        self.info = SystemInfo(label, "kvcache", family, budget, str(spec), reason)
        self.spec, self.model, self.tokenizer = spec, model, tokenizer

    def generate(self, prompt: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        from kvcache.generation import generate

        r = generate(self.model, self.tokenizer, [prompt["text"]], cache=self.spec,
                     max_new_tokens=job["max_new_tokens"], eos_token_id=_eos(job, self.tokenizer, self.model),
                     progress=False)
        s = r.stats
        return {"token_ids": list(r.token_ids[0]), "prompt_tokens": s.prompt_tokens,
                "prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds, "decode_steps": s.decode_steps,
                "cache_bytes": s.cache_bytes, "peak_cache_bytes": s.peak_cache_bytes}

    def converse(self, conversation: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        """One conversation turn by turn with the cache carried, and its history re-read
        (:func:`kvcache.bench.conversation.converse`)."""
        from kvcache.bench.conversation import converse

        return converse(self.model, self.tokenizer, self.spec, conversation, job,
                        _eos(job, self.tokenizer, self.model))

    def stream(self, window: list[int], prefix: int) -> dict[str, Any]:
        import kvcache
        from kvcache.cache import KVCache

        param = next(self.model.parameters())
        cache = KVCache.from_spec(self.spec, self.model.config, batch_size=1, max_cache_len=len(window),
                                  device=param.device, dtype=param.dtype)
        # A retention policy evicts between the streamed forwards and needs kvcache's attention function.
        scope = (lambda: kvcache.enable(self.model)) if cache.policy is not None else contextlib.nullcontext
        out = stream_nll(self.model, window, prefix, cache, scope=scope)
        out["cache_bytes"] = cache.nbytes()
        return out


#: transformers cache peers: label -> (cache class name, QuantizedCache backend or None)
HF_CACHES: dict[str, tuple[str, str | None]] = {
    "hf DynamicCache": ("DynamicCache", None),
    "hf StaticCache": ("StaticCache", None),
    "hf QuantizedCache quanto int4": ("QuantizedCache", "quanto"),
    "hf QuantizedCache HQQ int4": ("QuantizedCache", "hqq"),
}

#: the module each QuantizedCache backend needs, and how to install it
_BACKEND_MODULES = {"quanto": ("optimum.quanto", "pip install 'kvcache[peers]' (optimum-quanto)"),
                    "hqq": ("hqq", "pip install hqq")}


def _missing_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


class HFCacheSystem:
    """One of transformers' own caches, driven by :func:`kvcache.bench.loop.greedy`."""

    def __init__(self, label: str, model: Any, tokenizer: Any) -> None:
        if label not in HF_CACHES:
            raise ValueError(f"unknown transformers cache peer {label!r}; "
                             f"choose from: {', '.join(HF_CACHES)}")
        cls_name, backend = HF_CACHES[label]
        reason = None
        if backend is not None:
            module, fix = _BACKEND_MODULES[backend]
            if _missing_module(module):
                reason = f"QuantizedCache backend {backend!r} needs the module {module!r}: {fix}"
        self.info = SystemInfo(label, "hf", cls_name if backend is None else f"{cls_name} {backend}", 1.0,
                               None, reason)
        self.cls_name, self.backend, self.model, self.tokenizer = cls_name, backend, model, tokenizer

    def _cache(self, capacity: int) -> Any:
        import transformers

        cls = getattr(transformers, self.cls_name)
        if self.cls_name == "DynamicCache":
            return cls(config=self.model.config)
        if self.cls_name == "StaticCache":
            return cls(config=self.model.config, max_cache_len=capacity)
        return cls(backend=self.backend, config=self.model.config, nbits=4)

    def generate(self, prompt: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        cache = self._cache(len(prompt["ids"]) + job["max_new_tokens"])
        return greedy(self.model, prompt["ids"], cache, job["max_new_tokens"],
                      _eos(job, self.tokenizer, self.model))

    def stream(self, window: list[int], prefix: int) -> dict[str, Any]:
        return stream_nll(self.model, window, prefix, self._cache(len(window)))

