"""Text generation with a kvcache cache: tokenization with left padding, chunked prefill, the decode loop.

The loop is written out (rather than calling ``model.generate``) so that it controls what ``generate``
cannot: the cache is built from a spec string, a fixed-capacity cache ends generation cleanly with
``finish_reason="capacity"``, and each call reports prefill/decode speed and cache memory.

Positions come from the attention mask (``cumsum - 1``), so left-padded rows get the same positions as when
run alone; the mask always spans past + current tokens.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kvcache import compat, validate
from kvcache.cache import OBSERVER_KWARG, KVCache
from kvcache.decoding import (
    GenerationResult,
    GenerationStats,
    Rows,
    cache_capacity,
    check_arguments,
    eos_ids,
    left_pad,
    stop_strings,
)
from kvcache.errors import CacheCapacityError
from kvcache.resources import check_fits
from kvcache.sampling import Sampler, make_generator
from kvcache.spec import CacheSpec
from kvcache.stopping import StopChecker

# GenerationResult/GenerationStats live in kvcache.decoding (shared with the ONNX runtime), public here too
__all__ = ["PROGRESS_MIN_TOKENS", "GenerationResult", "GenerationStats", "generate"]

#: generations of at least this many new tokens show a progress bar (when stderr is a terminal)
PROGRESS_MIN_TOKENS = 64


def generate(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str],
    *,
    cache: str | CacheSpec = "dynamic",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    prefill_chunk_size: int = 512,
    progress: bool | None = None,
) -> GenerationResult:
    """Generate a continuation for each prompt with a cache built from ``cache``.

    Parameters
    ----------
    model:
        A Hugging Face causal LM (``AutoModelForCausalLM``); its device and dtype are used for the cache.
    tokenizer:
        The model's tokenizer. It is not modified: padding (on the left) is done here, with the pad token
        of the tokenizer, else of the model's generation config, else the end-of-sequence token.
    prompts:
        One prompt or a list; a list is run as one left-padded batch of ``B`` rows.
    cache:
        Cache spec (see :class:`kvcache.spec.CacheSpec`), e.g. ``"dynamic"``, ``"static"`` (sized to the
        longest prompt + ``max_new_tokens``) or ``"static:capacity=256"``.
    max_new_tokens:
        Upper bound on new tokens per row (``finish_reason="length"`` when reached).
    temperature, top_k, top_p:
        Sampling settings; ``temperature=0`` is greedy (see :class:`kvcache.sampling.Sampler`).
    seed:
        Seed for sampling; the same seed gives the same tokens. ``None`` uses torch's global RNG.
    stop:
        Stop strings: a row ends when its text contains one, and its text is cut before it.
    eos_token_id:
        End-of-sequence id(s); ``None`` takes the model's generation config, else the tokenizer's. Pass
        ``[]`` to never stop on a token.
    prefill_chunk_size:
        The prompt is run through the model in chunks of at most this many tokens (bounds the memory of
        the attention scores for long prompts).
    progress:
        Show a progress bar on stderr; ``None`` shows it for long generations when stderr is a terminal.

    Returns
    -------
    GenerationResult

    Raises
    ------
    CacheCapacityError
        When a fixed-capacity cache cannot hold even the (left-padded) prompt.
    ValueError
        For invalid arguments (empty prompt list, ``max_new_tokens < 1``, bad sampling settings, ...).
    """
    validate.check_model(model, tokenizer)
    prompt_list = check_arguments(prompts, max_new_tokens, prefill_chunk_size)
    spec = CacheSpec.parse(cache)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    checker = StopChecker(tokenizer, _eos_ids(eos_token_id, model, tokenizer), stop_strings(stop))

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    input_ids, attention_mask = left_pad(tokenizer, prompt_list, model.get_input_embeddings().num_embeddings)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_len = input_ids.shape
    forward_kwargs = _ForwardKwargs(model)

    check_fits(model.config, spec, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
               device=device, dtype=dtype)
    kv = KVCache.from_spec(spec, model.config, batch_size=batch, max_cache_len=prompt_len + max_new_tokens,
                           device=device, dtype=dtype)
    capacity = cache_capacity(kv, spec, prompt_len)

    generator = make_generator(seed, device)
    # The mask of every step is a prefix of this one: prompt mask, then ones for generated tokens.
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
    if capacity is not None:
        # A preallocated cache shows attention all its slots; the mask spans them all (unwritten slots are
        # zeros or causally masked), since some models (BLOOM's ALiBi) size their bias from the mask.
        spare = max(0, capacity - full_mask.shape[1])
        full_mask = torch.nn.functional.pad(full_mask, (0, spare))[:, :capacity]

    def mask_until(end: int) -> torch.Tensor:
        return full_mask if capacity is not None else full_mask[:, :end]

    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    rows = Rows(batch, checker)
    pad_id = _pad_id(model, tokenizer, checker.eos_token_ids)

    with torch.inference_mode(), _progress_bar(progress, max_new_tokens) as advance:
        start = time.perf_counter()
        logits = None
        for lo in range(0, prompt_len, prefill_chunk_size):
            hi = min(lo + prefill_chunk_size, prompt_len)
            out = model(input_ids=input_ids[:, lo:hi], attention_mask=mask_until(hi),
                        **forward_kwargs(kv, positions[:, lo:hi], lo, hi))
            logits = out.logits
        assert logits is not None  # prompt_len >= 1: left_pad rejects empty prompts
        next_tokens = sampler(logits[:, -1, :], generator)
        # The one host sync per step: stopping (eos, stop strings, all rows done) needs the token values.
        rows.record(next_tokens.tolist())
        peak = kv.nbytes()
        prefill_end = time.perf_counter()
        advance()

        alive = rows.alive(device)
        position = positions[:, -1:] + 1
        steps = 0
        while steps + 1 < max_new_tokens and rows.running():
            if capacity is not None and kv.physical_length() >= capacity:
                rows.finish_all("capacity")
                break
            # Finished rows keep feeding the pad token so the batch stays rectangular.
            step_input = torch.where(alive, next_tokens, pad_id)[:, None]
            seen = prompt_len + steps
            try:
                out = model(input_ids=step_input, attention_mask=mask_until(seen + 1),
                            **forward_kwargs(kv, position, seen, seen + 1))
            except CacheCapacityError:
                # A layout whose capacity is not visible up front refused the write; nothing was written.
                rows.finish_all("capacity")
                break
            steps += 1
            position = position + 1
            next_tokens = sampler(out.logits[:, -1, :], generator)
            done = rows.record(next_tokens.tolist())
            if done:
                alive[done] = False
            peak = max(peak, kv.nbytes())
            advance()
        rows.finish_all("length")
        end = time.perf_counter()

    return rows.result(spec=spec, prompt_mask=attention_mask, times=(start, prefill_end, end),
                       decode_steps=steps, cache_bytes=kv.nbytes(), peak_cache_bytes=peak)


class _ForwardKwargs:
    """The keyword arguments of one forward call, in the names this model's ``forward`` accepts.

    They differ across transformers 5.x releases and architectures (see ``kvcache.compat.forward_arguments``),
    so they are looked up once.
    """

    def __init__(self, model: Any) -> None:
        self.names = compat.forward_arguments(model)
        # Only the last position's logits are needed: skips the vocabulary projection of the prompt.
        self.fixed: dict[str, Any] = {"use_cache": True}
        if self.names.logits_to_keep:
            self.fixed["logits_to_keep"] = 1

    def __call__(self, cache: KVCache, position_ids: torch.Tensor, start: int, end: int) -> dict[str, Any]:
        """Arguments for the tokens ``start:end`` (logical indices) at ``(B, end - start)`` positions."""
        kwargs = {self.names.cache: cache, **self.fixed}
        if self.names.position_ids:
            kwargs["position_ids"] = position_ids
        if self.names.cache_position:
            kwargs["cache_position"] = torch.arange(start, end, device=position_ids.device)
        if cache.observer is not None and self.names.extra:
            # The forward arguments reach the attention function on every transformers release and for every
            # architecture; the route through Cache.update exists only where models hand it their kwargs.
            kwargs[OBSERVER_KWARG] = cache.observer
        return kwargs


def _eos_ids(eos_token_id: int | Sequence[int] | None, model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the argument, else the generation config's, else the tokenizer's."""
    candidates: Any = eos_token_id
    if candidates is None:
        config = getattr(model, "generation_config", None)
        candidates = getattr(config, "eos_token_id", None)
    if candidates is None:
        candidates = getattr(tokenizer, "eos_token_id", None)
    return eos_ids(candidates)


def _pad_id(model: Any, tokenizer: Any, eos_ids: frozenset[int]) -> int:
    """The token fed to finished rows: pad token of the tokenizer or generation config, else an eos id."""
    for candidate in (getattr(tokenizer, "pad_token_id", None),
                      getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return min(eos_ids) if eos_ids else 0


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
