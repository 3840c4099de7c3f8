"""Text generation with a kvcache cache on PyTorch: the model's step function and the public ``generate``.

The loop itself (chunked prefill, decoding, stopping, statistics) is :func:`kvcache.decoding.decode`, shared
with the ONNX Runtime path; this module builds the cache from a spec and supplies the PyTorch forward. It is
written out (rather than calling ``model.generate``) so that it controls what ``generate`` cannot: the cache
is built from a spec string, a fixed-capacity cache ends generation cleanly with
``finish_reason="capacity"``, retention policies act between forwards, and each call reports prefill/decode
speed and cache memory.

Positions come from the attention mask (per row, padding excluded), so left-padded rows get the same
positions as when run alone; the 2-D mask given to the model spans every logical column seen so far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from kvcache import compat, validate
from kvcache.attention import enable
from kvcache.cache import CACHE_KWARG, KVCache
from kvcache.decoding import PROGRESS_MIN_TOKENS, decode
from kvcache.estimate import CacheEstimate, estimate_cache, parse_size
from kvcache.fallback import run_chain
from kvcache.hooks import DecodeHooks, chain
from kvcache.prompts import check_arguments, left_pad, special_tokens, stop_strings
from kvcache.resources import check_fits
from kvcache.result import GenerationResult, GenerationStats
from kvcache.sampling import Sampler, make_generator
from kvcache.spec import CacheSpec
from kvcache.stopping import StopChecker

__all__ = ["PROGRESS_MIN_TOKENS", "GenerationResult", "GenerationStats", "TorchStep", "generate",
           "generate_ids"]


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
    hooks: DecodeHooks | None = None,
    fallback: Sequence[str | CacheSpec] | None = None,
    max_cache_memory: int | str | None = None,
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
    hooks:
        Called between forwards (after each prefill chunk, at the end of the prefill, after each decode
        step) with the cache: where retention policies act.
    fallback:
        Cache specs to try in order when the previous one runs out of memory (``torch.OutOfMemoryError``, a
        ``RuntimeError`` saying out of memory, ``MemoryError``, or a cache predicted larger than the free
        memory): the failed attempt's memory is freed first. See :mod:`kvcache.fallback`.
    max_cache_memory:
        Largest cache allowed on the compute device, in bytes or as text (``"512MiB"``, ``"2GiB"``,
        ``"1.5GB"``): specs of ``cache`` + ``fallback`` predicted over it
        (:func:`kvcache.estimate.estimate_cache`) are skipped before anything is allocated.

    Returns
    -------
    GenerationResult
        ``cache`` names the spec that ran, ``attempts`` the ones before it and why they did not.

    Raises
    ------
    CacheCapacityError
        When a fixed-capacity cache cannot hold even the (left-padded) prompt.
    CacheMemoryError
        When ``max_cache_memory`` is given and no spec of the chain is predicted to fit.
    ValueError
        For invalid arguments (empty prompt list, ``max_new_tokens < 1``, bad sampling settings, ...).
    """
    validate.check_model(model, tokenizer)
    prompt_list = check_arguments(prompts, max_new_tokens, prefill_chunk_size)
    chain = [CacheSpec.parse(s) for s in (cache, *(fallback or ()))]
    for spec in chain:
        spec.require_available()
    limit = None if max_cache_memory is None else parse_size(max_cache_memory)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    eos, pad_id = special_tokens(eos_token_id, tokenizer, getattr(model, "generation_config", None),
                                 model.config)
    checker = StopChecker(tokenizer, eos, stop_strings(stop))

    input_ids, attention_mask = left_pad(tokenizer, prompt_list, model.get_input_embeddings().num_embeddings)

    def run(spec: CacheSpec) -> GenerationResult:
        return _generate_ids(model, input_ids, attention_mask, spec=spec, max_new_tokens=max_new_tokens,
                             sampler=sampler, checker=checker, pad_id=pad_id, seed=seed,
                             prefill_chunk_size=prefill_chunk_size, hooks=hooks, progress=progress)

    if len(chain) == 1 and limit is None:
        return run(chain[0])
    param = next(model.parameters())
    batch, prompt_len = input_ids.shape

    def estimate(spec: CacheSpec) -> CacheEstimate:
        return estimate_cache(model.config, spec, batch=batch, prompt_len=prompt_len,
                              max_new_tokens=max_new_tokens, dtype=param.dtype)

    return run_chain(chain, run, estimate=estimate, limit=limit, device=param.device)


def generate_ids(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cache: str | CacheSpec = "dynamic",
    max_new_tokens: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    prefill_chunk_size: int = 512,
    hooks: DecodeHooks | None = None,
) -> GenerationResult:
    """Greedy :func:`generate` from token ids already prepared (benchmarks: exact prompt lengths).

    Parameters
    ----------
    input_ids:
        ``(B, T)`` prompt ids, left-padded.
    attention_mask:
        ``(B, T)`` 1 for real tokens, 0 for the left padding (``None``: all real).
    tokenizer:
        Decodes the result's texts.
    """
    validate.check_model(model, tokenizer)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (B, T) with T >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    validate.check_int("max_new_tokens", max_new_tokens, minimum=1)
    validate.check_int("prefill_chunk_size", prefill_chunk_size, minimum=1)
    eos, pad_id = special_tokens(eos_token_id, tokenizer, getattr(model, "generation_config", None),
                                 model.config)
    return _generate_ids(model, input_ids, attention_mask.to(torch.long), spec=CacheSpec.parse(cache),
                         max_new_tokens=max_new_tokens, sampler=Sampler(),
                         checker=StopChecker(tokenizer, eos),
                         pad_id=pad_id, seed=seed, prefill_chunk_size=prefill_chunk_size, hooks=hooks,
                         progress=False)


def _generate_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, spec: CacheSpec,
                  max_new_tokens: int, sampler: Sampler, checker: StopChecker, pad_id: int, seed: int | None,
                  prefill_chunk_size: int, hooks: DecodeHooks | None,
                  progress: bool | None) -> GenerationResult:
    """Build the cache for ``spec`` and run the decode driver over the model's step function."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_len = input_ids.shape
    check_fits(model.config, spec, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
               device=device, dtype=dtype)
    kv = KVCache.from_spec(spec, model.config, batch_size=batch, max_cache_len=prompt_len + max_new_tokens,
                           device=device, dtype=dtype)
    step = TorchStep(model, kv, batch, max_columns=prompt_len + max_new_tokens)
    attention: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if kv.policy is not None:
        # A policy reads attention statistics and/or leaves per-head selections that only the kvcache
        # attention function can mask: switch the model to it for this call.
        kv.policy.start(prompt_lengths=attention_mask.sum(-1), max_new_tokens=max_new_tokens, seed=seed,
                        prefill_chunks=-(-prompt_len // prefill_chunk_size))
        hooks = chain(kv.policy.hooks(), hooks)
        attention = enable(model)
    elif spec.precision is not None and not bool(attention_mask.all()):
        # A quantized store drops left padding as it quantizes (each row's groups hold its own tokens), so
        # slots stop matching columns: masks must come from the slots' positions.
        attention = enable(model)
    with torch.inference_mode(), attention:
        return decode(step, kv, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampler=sampler,
                      generator=make_generator(seed, device), checker=checker, pad_id=pad_id,
                      prefill_chunk_size=prefill_chunk_size, spec=spec, hooks=hooks, progress=progress)


class TorchStep:
    """The PyTorch runtime's step function for :func:`kvcache.decoding.decode`.

    Keeps the 2-D attention mask transformers' mask builders read: one column per logical token seen
    (padding 0), never cut at a static layout's capacity (after eviction the newest tokens lie past it), and
    at least as wide as a preallocated buffer (some models size position biases from it).

    Parameters
    ----------
    model:
        The causal LM.
    cache:
        Its cache.
    batch:
        Rows per forward.
    max_columns:
        Logical tokens the run may feed (prompt + new tokens, plus ``start``): the mask is allocated once.
    start:
        Logical columns the cache already holds (a conversation continued from an earlier call; no padding).
    """

    def __init__(self, model: Any, cache: KVCache, batch: int, max_columns: int, start: int = 0) -> None:
        self.model = model
        self.cache = cache
        self.kwargs = _ForwardKwargs(model)
        device = next(model.parameters()).device
        capacity = max((c for c in (s.max_capacity for s in cache.stores) if c is not None), default=0)
        self.mask = torch.ones(batch, max(max_columns, capacity), dtype=torch.long, device=device)
        self.seen = start  # logical columns fed so far
        self.capacity = capacity

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run ``(B, S)`` tokens; return the ``(B, V)`` logits of the last position."""
        lo, hi = self.seen, self.seen + input_ids.shape[1]
        self.mask[:, lo:hi] = valid
        out = self.model(input_ids=input_ids, attention_mask=self.mask[:, : max(hi, self.capacity)],
                         **self.kwargs(self.cache, positions, lo, hi))
        self.seen = hi
        return out.logits[:, -1, :]


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
        if self.names.extra:
            # The forward arguments reach the attention function on every transformers release and for every
            # architecture; the route through Cache.update exists only where models hand it their kwargs.
            kwargs[CACHE_KWARG] = cache
        return kwargs
