"""The one prefill + decode driver of both runtimes (PyTorch and ONNX Runtime), with its hooks.

A runtime supplies only a step function, ``step(input_ids, positions, valid) -> logits``: run the model on
``(B, S)`` new tokens at their ``(B, S)`` logical positions (``valid`` is False for left padding) against the
cache, and return the ``(B, V)`` logits of the last position. Everything else lives here: chunked prefill,
the decode loop, positions per row, sampling, stopping, capacity, timing and memory statistics, and the
hooks where retention policies act (:class:`DecodeHooks`): after each prefill chunk, at the end of the
prefill and after each decode step — never inside a forward.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from kvcache.cache import KVCache
from kvcache.errors import CacheCapacityError
from kvcache.hooks import DecodeHooks
from kvcache.result import GenerationResult, GenerationStats
from kvcache.sampling import Sampler
from kvcache.spec import CacheSpec
from kvcache.stopping import StopChecker

__all__ = ["PROGRESS_MIN_TOKENS", "DecodeHooks", "Rows", "StepFunction", "check_prompt_fits", "decode"]

#: generations of at least this many new tokens show a progress bar (when stderr is a terminal)
PROGRESS_MIN_TOKENS = 64


class StepFunction(Protocol):
    """One forward of a runtime against its cache."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` token ids, ``(B, S)`` int64 logical positions, ``(B, S)`` bool validity -> the
        ``(B, V)`` logits of the last position."""


def check_prompt_fits(cache: KVCache, spec: CacheSpec, prompt_len: int) -> None:
    """Refuse a (left-padded) prompt of ``prompt_len`` tokens that a fixed-capacity layer cannot hold.

    Raises
    ------
    CacheCapacityError
        Naming the capacity and the fix.
    """
    free = cache.free_slots()
    if free is not None and prompt_len > free:
        raise CacheCapacityError(
            f"the prompt needs {prompt_len} cache slots (longest prompt, left padding included) but the "
            f"cache '{spec}' holds {free}; raise static:capacity or shorten the prompt"
        )


def decode(
    step: StepFunction,
    cache: KVCache,
    input_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    generator: torch.Generator | None,
    checker: StopChecker,
    pad_id: int,
    prefill_chunk_size: int,
    spec: CacheSpec,
    hooks: DecodeHooks | None = None,
    progress: bool | None = None,
    start: torch.Tensor | None = None,
) -> GenerationResult:
    """Prefill the prompts in chunks, then decode one token per step until every row stops.

    Parameters
    ----------
    step:
        The runtime's forward (see :class:`StepFunction`).
    cache:
        The runtime's cache (empty, or holding the tokens ``start`` counts); the driver announces each
        forward's tokens to it.
    input_ids, prompt_mask:
        ``(B, T)`` left-padded prompts and their mask (1 real, 0 padding), on the device the step expects.
    max_new_tokens:
        Upper bound on new tokens per row.
    sampler, generator:
        Next-token choice and its random generator.
    checker:
        Decides when a row ends (eos, stop strings).
    pad_id:
        Token fed to finished rows so the batch stays rectangular.
    prefill_chunk_size:
        Prompt tokens per prefill forward.
    spec:
        The cache spec (reported in the result).
    hooks:
        Where a retention policy acts.
    progress:
        Show a progress bar on stderr; ``None`` shows it for long generations when stderr is a terminal.
    start:
        ``(B,)`` real tokens each row has already fed into ``cache`` (a conversation continued from an
        earlier call): positions continue from them. ``None``: an empty cache.

    Returns
    -------
    GenerationResult
    """
    hooks = hooks or DecodeHooks()
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    valid_prompt = prompt_mask.bool()
    check_prompt_fits(cache, spec, prompt_len)
    row_seen = (torch.zeros(batch, dtype=torch.long, device=device) if start is None  # real tokens per row:
                else start.to(device=device, dtype=torch.long).clone())  # the next position
    peak = 0  # the most the cache held, measured after each forward (before a hook may evict)

    def forward(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        nonlocal row_seen, peak
        if valid is step_valid:  # a decode step: one real token per row, at the row's next position
            positions = row_seen[:, None]
            row_seen = row_seen + 1
        else:
            positions = (row_seen[:, None] + valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
            row_seen = row_seen + valid.sum(-1)
        # Announce padding only when there is some: an all-real step costs nothing extra.
        cache.begin_forward(None if tokens.shape[1] == 1 or bool(valid.all()) else valid)
        try:
            logits = step(tokens, positions, valid)
        except BaseException:
            cache.end_forward(check=False)
            raise
        cache.end_forward()
        peak = max(peak, cache.nbytes())
        return logits

    step_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
    rows = Rows(batch, checker)
    with _progress_bar(progress, max_new_tokens) as advance:
        start = time.perf_counter()
        logits = None
        for lo in range(0, prompt_len, prefill_chunk_size):
            hi = min(lo + prefill_chunk_size, prompt_len)
            logits = forward(input_ids[:, lo:hi], valid_prompt[:, lo:hi])
            if hooks.after_prefill_chunk is not None and hi < prompt_len:
                hooks.after_prefill_chunk(cache)
        assert logits is not None  # prompt_len >= 1: left_pad rejects empty prompts
        if hooks.after_prefill is not None:
            hooks.after_prefill(cache)
        next_tokens = sampler(logits, generator)
        # The one host sync per step: stopping (eos, stop strings, all rows done) needs the token values.
        rows.record(next_tokens.tolist())
        prefill_end = time.perf_counter()
        advance()

        alive = rows.alive(device)
        all_alive = bool(alive.all())
        steps = 0
        while steps + 1 < max_new_tokens and rows.running():
            free = cache.free_slots()
            if free is not None and free < 1:
                rows.finish_all("capacity")
                break
            # Finished rows keep feeding the pad token so the batch stays rectangular.
            step_input = (next_tokens if all_alive else torch.where(alive, next_tokens, pad_id))[:, None]
            try:
                logits = forward(step_input, step_valid)
            except CacheCapacityError:
                # A layout whose capacity is not visible up front refused the write; nothing was written.
                rows.finish_all("capacity")
                break
            steps += 1
            if hooks.after_step is not None:
                hooks.after_step(cache)
            next_tokens = sampler(logits, generator)
            done = rows.record(next_tokens.tolist())
            if done:
                alive[done] = False
                all_alive = False
            advance()
        rows.finish_all("length")
        end = time.perf_counter()
    return rows.result(spec=spec, prompt_mask=prompt_mask, times=(start, prefill_end, end),
                       decode_steps=steps, cache_bytes=cache.nbytes(), peak_cache_bytes=peak,
                       notes=cache.notes())


class Rows:
    """The new tokens and finish reason of every row of a batch, as a decode loop advances.

    Parameters
    ----------
    batch:
        Number of rows ``B``.
    checker:
        Decides when a row ends (eos id, stop string) and cuts its text.
    """

    def __init__(self, batch: int, checker: StopChecker) -> None:
        self.checker = checker
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.finish: list[str | None] = [None] * batch

    def record(self, tokens: list[int]) -> list[int]:
        """Append this step's token (one per row) to every live row; return the rows it finished."""
        done = []
        for row, token in enumerate(tokens):
            if self.finish[row] is None:
                self.generated[row].append(token)
                reason = self.checker.check(self.generated[row])
                if reason is not None:
                    self.finish[row] = reason
                    done.append(row)
        return done

    def running(self) -> bool:
        """Whether any row is still generating."""
        return any(f is None for f in self.finish)

    def alive(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B,)`` bool: the rows still generating."""
        return torch.tensor([f is None for f in self.finish], device=device)

    def finish_all(self, reason: str) -> None:
        """End every live row with ``reason``."""
        for row, f in enumerate(self.finish):
            if f is None:
                self.finish[row] = reason

    def result(self, *, spec: CacheSpec, prompt_mask: torch.Tensor, times: tuple[float, float, float],
               decode_steps: int, cache_bytes: int, peak_cache_bytes: int,
               notes: list[str] | None = None) -> GenerationResult:
        """The :class:`GenerationResult` of the finished loop.

        Parameters
        ----------
        spec:
            The cache spec used.
        prompt_mask:
            ``(B, T)`` attention mask of the prompts (counts the real prompt tokens).
        times:
            ``perf_counter`` values at the start, at the end of the prefill and at the end.
        decode_steps, cache_bytes, peak_cache_bytes:
            Decode steps run, cache size at the end, largest cache size seen.
        notes:
            The cache's remarks on how it ran (:meth:`KVCache.notes`).
        """
        reasons = [f or "length" for f in self.finish]
        batch = len(self.generated)
        prompt_tokens = int(prompt_mask.sum())
        new_tokens = sum(len(g) for g in self.generated)
        decode_tokens = new_tokens - batch  # the first token of each row comes from the prefill
        start, prefill_end, end = times
        prefill_s, decode_s = prefill_end - start, end - prefill_end
        stats = GenerationStats(
            batch_size=batch,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            prefill_tokens_per_s=prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 and decode_tokens > 0 else 0.0,
            decode_steps=decode_steps,
            cache_bytes=cache_bytes,
            peak_cache_bytes=peak_cache_bytes,
            notes=list(notes or []),
        )
        texts = [self.checker.text(g, r) for g, r in zip(self.generated, reasons, strict=True)]
        return GenerationResult(texts=texts, token_ids=self.generated, finish_reasons=reasons, stats=stats,
                                cache=str(spec))


@contextlib.contextmanager
def _progress_bar(enabled: bool | None, total: int) -> Iterator[Any]:
    """Yield a function that advances a rich progress bar on stderr by one token (a no-op when off)."""
    if enabled is None:
        enabled = total >= PROGRESS_MIN_TOKENS and sys.stderr.isatty()
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("generating", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("generating", total=total)
        yield lambda: bar.advance(task)
