"""The ONNX Runtime path as bench rows: ``ort:SPEC`` runs the model exported, KV-cache-injected and driven
by :class:`kvcache.onnx.OnnxGenerator` with kvcache's host-side cache built from ``SPEC``: the ``--fused``
graph (ONNX Runtime's fused attention, the cache written in place) for a spec without a retention policy, the
``--policies`` graph for one with a policy."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvcache.bench.systems import SystemInfo

PREFIX = "ort:"
_EXPORTS: dict[tuple[str, bool], Path] = {}  # (model name, policies) -> injected graph, once per process


def _injected_graph(model_name: str, policies: bool = False) -> Path:
    """Export ``model_name`` without a cache, inject a KV cache (``--policies`` for a spec with a retention
    policy, else ``--fused``), return the graph (a temporary folder)."""
    key = (model_name, policies)
    if key not in _EXPORTS:
        from kvcache.onnx.export import export
        from kvcache.onnx.inject import inject_file

        tmp = Path(tempfile.mkdtemp(prefix="kvcache-bench-onnx-"))
        atexit.register(shutil.rmtree, tmp, True)
        graph = export(model_name, tmp / "model")
        _EXPORTS[key] = inject_file(graph, policies=policies, fused=not policies)
    return _EXPORTS[key]


class OrtSystem:
    """``ort:SPEC``: generation on ONNX Runtime (one thread) with a kvcache cache built from ``SPEC``."""

    def __init__(self, label: str, model_name: str, tokenizer: Any, threads: int = 1) -> None:
        from kvcache.errors import KVCacheError
        from kvcache.spec import CacheSpec

        spec = CacheSpec.parse(label[len(PREFIX):])
        reason = None
        try:
            spec.require_available()
            import onnxruntime  # noqa: F401
        except KVCacheError as err:
            reason = str(err)
        except ImportError:
            reason = "the ONNX Runtime rows need the onnx extra: pip install 'kvcache[onnx]'"
        policy = spec.policy
        budget = 1.0 if policy is None or policy.name == "full" else policy.params.get("budget")
        self.info = SystemInfo(label, "ort", "onnxruntime", budget if isinstance(budget, float) else None,
                               str(spec), reason)
        self.spec, self.model_name, self.tokenizer, self.threads = spec, model_name, tokenizer, threads
        self._generator: Any = None

    def _gen(self) -> Any:
        if self._generator is None:
            from kvcache.onnx.runtime import OnnxGenerator

            policies = self.spec.policy is not None and self.spec.policy.name != "full"
            self._generator = OnnxGenerator(_injected_graph(self.model_name, policies), cache=self.spec,
                                            threads=self.threads, tokenizer=self.tokenizer)
        return self._generator

    def generate(self, prompt: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        r = self._gen().generate([prompt["text"]], max_new_tokens=job["max_new_tokens"],
                                 eos_token_id=[] if job.get("ignore_eos") else None)
        s = r.stats
        return {"token_ids": list(r.token_ids[0]), "prompt_tokens": s.prompt_tokens,
                "prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds, "decode_steps": s.decode_steps,
                "cache_bytes": s.cache_bytes, "peak_cache_bytes": s.peak_cache_bytes}

    def stream(self, window: list[int], prefix: int) -> dict[str, Any]:
        raise NotImplementedError("streaming perplexity is not wired for the ONNX Runtime rows yet "
                                  "(OnnxGenerator.step scoring)")
