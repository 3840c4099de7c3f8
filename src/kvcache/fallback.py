"""Generation that survives running out of memory: a chain of cache specs tried in order.

``kvcache.generate(..., cache="dynamic", fallback=["int4", "int4+offload"])`` runs the first spec; on an
out-of-memory error it frees what the failed attempt held (its cache, the tensors its frames referenced, the
accelerator's cached blocks) and runs the next. With ``max_cache_memory`` the specs whose predicted cache
(:func:`kvcache.estimate.estimate_cache`) exceeds the limit are skipped before anything is allocated. The
result says which spec succeeded (``GenerationResult.cache``) and why each earlier one did not
(``GenerationResult.attempts``).
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvcache.estimate import CacheEstimate
from kvcache.resources import CacheMemoryError, human_bytes
from kvcache.result import GenerationResult
from kvcache.spec import CacheSpec

__all__ = ["Attempt", "free_memory", "is_out_of_memory", "run_chain"]

#: longest error text kept per failed attempt
_REASON_CHARS = 300


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means memory ran out: ``torch.OutOfMemoryError``, ``MemoryError``, a ``RuntimeError``
    whose message says so (allocators of every backend), or kvcache's up-front :class:`CacheMemoryError`."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError, CacheMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    """Return what a failed attempt held: collect garbage, then the accelerator's cached blocks."""
    gc.collect()
    if torch.accelerator.is_available():
        torch.accelerator.empty_cache()


@dataclass(frozen=True)
class Attempt:
    """A spec of the chain that did not produce the result, and why."""

    spec: str
    reason: str
    predicted_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "reason": self.reason, "predicted_bytes": self.predicted_bytes}


def _forget(exc: BaseException) -> str:
    """The one-line reason of a failed attempt; the frames of its traceback let go of their tensors."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:_REASON_CHARS]
    traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    return text


def run_chain(chain: Sequence[CacheSpec], run: Callable[[CacheSpec], GenerationResult], *,
              estimate: Callable[[CacheSpec], CacheEstimate] | None = None, limit: int | None = None,
              device: torch.device | str | None = None) -> GenerationResult:
    """Run ``run(spec)`` for the specs of ``chain`` in order until one does not run out of memory.

    Parameters
    ----------
    chain:
        The cache specs, first choice first.
    run:
        One generation with a spec (builds its own cache).
    estimate, limit, device:
        With ``limit`` (bytes), a spec whose ``estimate(spec).device_bytes(device)`` exceeds it is skipped.

    Returns
    -------
    GenerationResult
        Of the first spec that ran, with ``attempts`` listing the specs before it and why they did not.

    Raises
    ------
    CacheMemoryError
        ``limit`` is given and no spec is predicted to fit (nothing was allocated).
    BaseException
        The last spec's out-of-memory error (with a note naming the earlier attempts), or any other error
        as it is: only running out of memory moves on to the next spec.
    """
    attempts: list[Attempt] = []
    predicted: dict[int, int] = {}
    if limit is not None and estimate is not None:
        predicted = {i: estimate(spec).device_bytes(device) for i, spec in enumerate(chain)}
    fits = [limit is None or i not in predicted or predicted[i] <= limit for i in range(len(chain))]
    if not any(fits):
        listing = "; ".join(f"{spec}: {human_bytes(predicted[i])}" for i, spec in enumerate(chain))
        raise CacheMemoryError(
            f"no cache spec fits max_cache_memory={human_bytes(limit or 0)} (predicted: {listing}); raise "
            "the limit, generate fewer tokens, or add a smaller spec to the fallback chain (a retention "
            "policy such as h2o:budget=0.25)")
    last = max(i for i, ok in enumerate(fits) if ok)
    for i, spec in enumerate(chain):
        if not fits[i]:
            over = f"predicted {human_bytes(predicted[i])}, over max_cache_memory={human_bytes(limit or 0)}"
            attempts.append(Attempt(str(spec), over, predicted[i]))
            continue
        try:
            result = run(spec)
        except BaseException as exc:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
            if not is_out_of_memory(exc) or i == last:
                if attempts:
                    earlier = "; ".join(f"{a.spec} ({a.reason})" for a in attempts)
                    exc.add_note(f"earlier cache specs: {earlier}")
                raise
            attempts.append(Attempt(str(spec), _forget(exc), predicted.get(i)))
            del exc
            free_memory()
            continue
        result.attempts = [a.to_dict() for a in attempts]
        return result
    raise AssertionError("unreachable: the last runnable spec returns or raises")  # pragma: no cover
