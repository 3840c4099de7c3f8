"""The ``kvcache`` model of the LM Evaluation Harness: every request runs through a kvcache cache.

- ``generate_until`` calls :func:`kvcache.generate` (left-padded batches, stop strings, ``max_gen_toks``);
- ``loglikelihood`` prefills the context through a cache built from the spec (a retention policy compresses
  it) and scores the continuation against that cache (:func:`kvcache.scoring.score_continuations`);
- ``loglikelihood_rolling`` scores the text in lm-eval's rolling windows of the model's context.

The class is registered under the name ``kvcache`` when this module is imported (see :mod:`kvcache.lmeval`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kvcache.bench.tasks import answer_matches
from kvcache.errors import KVCacheError
from kvcache.spec import CacheSpec

__all__ = ["KVCacheLM", "process_results"]

log = logging.getLogger(__name__)

#: generation keyword arguments lm-eval tasks pass, and what they become in kvcache.generate
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")
#: max_gen_toks when a task does not say (lm-eval's Hugging Face backend uses the same)
DEFAULT_MAX_GEN_TOKS = 256


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, bool]:
    """lm-eval metric of the exported retrieval tasks: ``acc`` is :func:`kvcache.bench.tasks.answer_matches`,
    the check ``kvcache bench`` scores with (the generation starts with exactly the expected number)."""
    return {"acc": answer_matches(doc["answer"], results[0])}


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVCacheError(f"batch_size must be a whole number >= 1 for the kvcache model, got {value!r} "
                           "('auto' is not supported: pick a size)")
    return value


def _available(device: str | None) -> str | None:
    """``device``, or the CPU when it names an accelerator this machine lacks: lm-eval's command line asks
    for ``cuda:0`` unless told otherwise, and its Hugging Face backend falls back the same way."""
    import torch

    if device is None:
        return None
    kind = str(device).split(":")[0]
    missing = (kind == "cuda" and not torch.cuda.is_available()) or (
        kind == "mps" and not torch.backends.mps.is_available())
    if missing:
        log.warning("device %s is not available here; running the kvcache model on the CPU", device)
        return "cpu"
    return device


@register_model("kvcache")
class KVCacheLM(TemplateLM):
    """An lm-eval model whose every forward runs through a kvcache cache built from ``cache``.

    Parameters
    ----------
    pretrained:
        ``"default"`` (the bundled model), a local model directory, or an already-loaded causal LM (then
        give ``tokenizer`` too). Nothing is downloaded unless a Hub id is given and the hub is reachable.
    cache:
        Cache spec, e.g. ``"full"``, ``"int4"``, ``"keyformer:budget=0.5"``. On lm-eval's command line a spec
        with commas must be quoted inside the argument: ``cache="keyformer:budget=0.5,window=0.3"``.
    tokenizer:
        The tokenizer of an already-loaded ``pretrained`` model.
    batch_size:
        Requests per left-padded batch (lm-eval's ``--batch_size``).
    device, dtype:
        Where and in which precision to load ``pretrained`` (ignored for a loaded model).
    max_length:
        Longest sequence (context + continuation) a request may have; default the model's
        ``max_position_embeddings``. Longer requests are refused before anything runs.
    prefill_chunk_size:
        Context tokens per prefill forward.
    rolling_context:
        Tokens of context each ``loglikelihood_rolling`` window after the first is conditioned on (lm-eval's
        ``context_len``; 1 as in its Hugging Face backend). A retention policy's fractional budget is a
        fraction of that context, so to measure a policy on perplexity raise it (e.g. half of max_length).
    max_batch_size:
        Accepted for lm-eval's command line; unused (batches are ``batch_size``).
    """

    def __init__(
        self,
        pretrained: str | Any = "default",
        cache: str = "dynamic",
        tokenizer: Any = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        prefill_chunk_size: int = 512,
        rolling_context: int = 1,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            raise KVCacheError(
                f"unknown model argument(s) for --model kvcache: {names}. Arguments: pretrained, cache, "
                "batch_size, device, dtype, max_length, prefill_chunk_size, rolling_context. A cache spec "
                "with commas must be quoted on lm_eval's command line: "
                "cache=\"keyformer:budget=0.5,window=0.3\"")
        self.spec = CacheSpec.parse(str(cache))
        self.spec.require_available()
        self.batch_size = _batch_size(batch_size)
        if isinstance(pretrained, str):
            from kvcache.models import load

            self.model, self.tokenizer = load(pretrained, device=_available(device), dtype=dtype)
            self.model_name = pretrained
        else:
            if tokenizer is None:
                raise KVCacheError("a loaded model needs its tokenizer: KVCacheLM(model, tokenizer=...)")
            self.model, self.tokenizer = pretrained, tokenizer
            self.model_name = type(pretrained).__name__
        param = next(self.model.parameters())
        self._device = param.device
        self.max_length = int(max_length or getattr(self.model.config, "max_position_embeddings", 2048))
        if not 1 <= rolling_context <= self.max_length:
            raise KVCacheError(f"rolling_context must be in [1, max_length={self.max_length}], got "
                               f"{rolling_context}")
        self.prefill_chunk_size = int(prefill_chunk_size)
        self.rolling_context = int(rolling_context)

    # ----- tokens -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; special tokens (the BOS) as the tokenizer adds them unless told not to."""
        flag = True if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=flag)["input_ids"])

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def get_model_info(self) -> dict[str, Any]:
        """Written into lm-eval's results (``config``)."""
        return {"kvcache_model": self.model_name, "kvcache_cache": str(self.spec),
                "kvcache_batch_size": self.batch_size}

    # ----- log-likelihood -----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        for i, (ctx, cont) in enumerate(pairs):
            # the last continuation token is scored but never fed
            if len(ctx) + len(cont) - 1 > self.max_length:
                raise KVCacheError(
                    f"loglikelihood request {i} needs {len(ctx) + len(cont) - 1} positions but the model "
                    f"holds max_length={self.max_length}; drop the long documents (--limit, a shorter "
                    "task) or pass max_length= if the model supports more")
        scores = self._score(pairs)
        out = []
        for (args, _, _), (logprob, greedy) in zip(requests, scores, strict=True):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, (logprob, greedy))
            out.append((logprob, greedy))
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score (context, continuation) pairs in batches of similar length; results in input order."""
        from kvcache.scoring import score_continuations

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            batch = score_continuations(self.model, self.tokenizer, [pairs[i][0] for i in idx],
                                        [pairs[i][1] for i in idx], cache=self.spec,
                                        prefill_chunk_size=self.prefill_chunk_size)
            for i, s in zip(idx, batch, strict=True):
                results[i] = (s.logprob, s.is_greedy)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's rolling windows of ``max_length`` tokens."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for pair in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                  max_seq_len=self.max_length,
                                                  context_len=self.rolling_context):
                ctx, cont = make_disjoint_window(pair)
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations by :func:`kvcache.generate`, cut at the ``until`` strings."""
        from kvcache.generation import generate

        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            settings = self._generation_settings(gen_kwargs)
            n = len(self.tok_encode(context))
            if n + settings["max_new_tokens"] - 1 > self.max_length:
                raise KVCacheError(
                    f"generate_until request {i} has a {n}-token context and max_gen_toks="
                    f"{settings['max_new_tokens']}, more than max_length={self.max_length}; drop the long "
                    "documents (--limit, a shorter task) or lower max_gen_toks")
            prepared.append((context, settings, n))
        # one batch holds requests with the same settings; longest first, so padding stays small
        groups: dict[str, list[int]] = {}
        for i, (_, settings, _) in enumerate(prepared):
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            members.sort(key=lambda i: -prepared[i][2])
            settings = prepared[members[0]][1]
            for lo in range(0, len(members), self.batch_size):
                idx = members[lo:lo + self.batch_size]
                result = generate(self.model, self.tokenizer, [prepared[i][0] for i in idx], cache=self.spec,
                                  prefill_chunk_size=self.prefill_chunk_size, progress=False, **settings)
                for i, text in zip(idx, result.texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @staticmethod
    def _generation_settings(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lm-eval's generation keyword arguments as :func:`kvcache.generate` arguments."""
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise KVCacheError(f"generation argument(s) {', '.join(unknown)} are not supported by the "
                               f"kvcache model; it takes: {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        stop = [until] if isinstance(until, str) else [s for s in until if s]
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        return {"max_new_tokens": int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
                "stop": stop or None, "temperature": temperature,
                "top_p": gen_kwargs.get("top_p") if sample else None,
                "top_k": gen_kwargs.get("top_k") if sample else None}
