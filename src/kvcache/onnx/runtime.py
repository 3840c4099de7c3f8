"""Text generation on ONNX Runtime with the KV cache managed on the host by kvcache's own layers.

The graph (injected, or exported natively with past/present) computes one step; everything around it lives
here: chunked prefill then single-token decode, left-padded batches, sampling and stopping (the helpers of
the PyTorch path), and the cache — a :class:`kvcache.cache.KVCache` built from the same spec string as on
PyTorch, whose layers receive each step's new keys/values (``present[..., -S:, :]``) through ``update`` and
give the next step its past. So a static layout, its capacity limit and later retention policies behave
the same on both runtimes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from transformers import AutoConfig, PretrainedConfig

from kvcache.cache import KVCache, model_cache_shape

# the PyTorch loop's bookkeeping, shared so both runtimes validate, stop and report identically
from kvcache.decoding import (
    GenerationResult,
    Rows,
    cache_capacity,
    check_arguments,
    eos_ids,
    left_pad,
    stop_strings,
)
from kvcache.errors import KVCacheError
from kvcache.models.load import load_tokenizer
from kvcache.onnx.provenance import check_config_matches
from kvcache.onnx.session import DecoderSession, StepOutput, resolve_graph
from kvcache.resources import check_fits
from kvcache.sampling import Sampler, make_generator
from kvcache.spec import CacheSpec
from kvcache.stopping import StopChecker


class OnnxGenerator:
    """Generate text with a with-past decoder graph on ONNX Runtime.

    Parameters
    ----------
    model:
        A directory holding the graph, ``config.json`` and the tokenizer files (as ``kvcache onnx export``
        writes it), or the ``.onnx`` file itself (config and tokenizer are read from its directory).
    cache:
        Cache spec (``"dynamic"``, ``"static:capacity=512"``, ...), see :mod:`kvcache.spec`.
    providers:
        ORT execution providers (default: CPU).
    threads:
        Intra-op threads for ORT (default: ORT's choice).
    tokenizer, config:
        Use these instead of the ones saved beside the graph.
    """

    def __init__(
        self,
        model: str | Path,
        cache: str | CacheSpec = "dynamic",
        providers: list[str] | None = None,
        *,
        threads: int | None = None,
        session_options: ort.SessionOptions | None = None,
        tokenizer: Any = None,
        config: PretrainedConfig | None = None,
    ) -> None:
        graph, directory = resolve_graph(model)
        if config is None:
            if not (directory / "config.json").is_file():
                raise KVCacheError(f"{directory} has no config.json; export with `kvcache onnx export` "
                                   "(it copies the config beside the graph) or pass config=")
            config = AutoConfig.from_pretrained(directory)
        self.config = config
        self._tokenizer = tokenizer
        self._directory = directory
        self.spec = CacheSpec.parse(cache)
        self.spec.require_available()
        self.decoder = DecoderSession(graph, providers=providers, threads=threads,
                                      session_options=session_options)
        check_config_matches(self.decoder.signature, config, graph)
        self.graph_path = graph

    @property
    def tokenizer(self) -> Any:
        """The tokenizer given, else the one saved beside the graph (loaded on first use: :meth:`step`
        works on token ids and needs none)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self._directory)
            except (OSError, ValueError) as exc:
                raise KVCacheError(f"no usable tokenizer in {self._directory} ({exc}); export with a "
                                   "tokenizer or pass tokenizer= to OnnxGenerator") from exc
        return self._tokenizer

    # ----- one step ---------------------------------------------------------------------------------
    def _empty_past(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, H_kv, 0, D)`` keys/values per layer for the first step; geometry from the graph or config."""
        sig = self.decoder.signature
        _, kv_heads, head_dims = model_cache_shape(self.config)
        past = []
        for i in range(sig.num_layers):
            empty = torch.empty(batch, sig.num_kv_heads or kv_heads[i], 0, sig.head_dim or head_dims[i],
                                dtype=sig.dtype)
            past.append((empty, empty))
        return past

    def step(self, cache: KVCache, input_ids: torch.Tensor, past_mask: torch.Tensor,
             current_mask: torch.Tensor, position_ids: torch.Tensor) -> StepOutput:
        """Run the graph on the current tokens against the host cache and store their keys/values.

        Parameters
        ----------
        cache:
            The host cache; its layers receive the new ``(B, H_kv, S, D)`` keys/values.
        input_ids:
            ``(B, S)`` current tokens.
        past_mask:
            ``(B, T_phys)`` int64 validity of the cached slots (1 real token, 0 padding).
        current_mask:
            ``(B, S)`` int64 validity of the current tokens.
        position_ids:
            ``(B, S)`` logical positions of the current tokens.

        Returns
        -------
        StepOutput
            ``logits`` ``(B, S, V)``, the presents, and ``attn_scores`` when the graph was injected with
            attention statistics: per layer ``(B, H_q, T_phys + S)``, the scores a host-side retention
            policy selects tokens by (then calling ``keep`` on the stores, and dropping the same slots from
            the slot mask it passes here next).
        """
        batch, seq = input_ids.shape
        stores = cache.stores
        stored = [store.keys_values() for store in stores]
        past = self._empty_past(batch) if stored[0] is None else stored
        if past[0][0].shape[2] != past_mask.shape[1]:
            raise KVCacheError(f"past_mask covers {past_mask.shape[1]} slots but the cache holds "
                               f"{past[0][0].shape[2]}; pass one column per held slot")
        out = self.decoder.run(input_ids, torch.cat([past_mask, current_mask], dim=1), position_ids, past)
        for store, (k, v) in zip(stores, out.presents, strict=True):
            store.update(k[:, :, -seq:, :], v[:, :, -seq:, :])
        return out

    # ----- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | list[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        eos_token_id: int | list[int] | None = None,
        prefill_chunk_size: int = 512,
    ) -> GenerationResult:
        """Generate a continuation of each prompt.

        Prompts of different lengths are left-padded into one batch. The prompt runs in chunks of
        ``prefill_chunk_size`` tokens, then one token per step. Parameters and result are those of
        :func:`kvcache.generation.generate`.

        Raises
        ------
        CacheCapacityError
            When a static layout cannot hold the prompt.
        """
        texts = check_arguments(prompts, max_new_tokens, prefill_chunk_size)
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
        checker = StopChecker(self.tokenizer, self._eos_ids(eos_token_id), stop_strings(stop))
        vocab = self.decoder.signature.vocab_size or getattr(self.config, "vocab_size", None)
        input_ids, prompt_mask = left_pad(self.tokenizer, texts, vocab, owner="graph")
        batch, prompt_len = input_ids.shape

        spec = self.spec
        check_fits(self.config, spec, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                   device="cpu", dtype=self.decoder.signature.dtype)
        cache = KVCache.from_spec(spec, self.config, batch_size=batch,
                                  max_cache_len=prompt_len + max_new_tokens, device="cpu",
                                  dtype=self.decoder.signature.dtype)
        capacity = cache_capacity(cache, spec, prompt_len)
        # Slot validity for every slot the run can fill: the prompt's mask, then one column per new token.
        # Slots are filled in order (no retention policy evicts yet), so slot i holds token i.
        slot_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
        seen = torch.zeros(batch, dtype=torch.int64)  # real tokens seen per row: the logical length

        def run(tokens: torch.Tensor, start: int) -> torch.Tensor:
            """Feed ``tokens`` into slots ``start:start+S``; return the last position's ``(B, V)`` logits."""
            mask = slot_mask[:, start : start + tokens.shape[1]]
            positions = (seen[:, None] + mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            seen.add_(mask.sum(-1))
            return self.step(cache, tokens, slot_mask[:, :start], mask, positions).logits[:, -1, :]

        generator = make_generator(seed, torch.device("cpu"))
        rows = Rows(batch, checker)
        pad_id = self._pad_id()
        start = time.perf_counter()
        for lo in range(0, prompt_len, prefill_chunk_size):
            last = run(input_ids[:, lo : lo + prefill_chunk_size], lo)
        next_tokens = sampler(last, generator)
        rows.record(next_tokens.tolist())
        peak = cache.nbytes()
        prefill_end = time.perf_counter()

        alive = rows.alive()
        steps = 0
        while steps + 1 < max_new_tokens and rows.running():
            if capacity is not None and cache.physical_length() >= capacity:
                rows.finish_all("capacity")
                break
            # Finished rows keep feeding the pad token so the batch stays rectangular.
            step_input = torch.where(alive, next_tokens, pad_id)[:, None]
            next_tokens = sampler(run(step_input, prompt_len + steps), generator)
            steps += 1
            done = rows.record(next_tokens.tolist())
            if done:
                alive[done] = False
            peak = max(peak, cache.nbytes())
        rows.finish_all("length")
        end = time.perf_counter()
        return rows.result(spec=spec, prompt_mask=prompt_mask, times=(start, prefill_end, end),
                           decode_steps=steps, cache_bytes=cache.nbytes(), peak_cache_bytes=peak)

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        """End-of-sequence ids: the argument, else the config's, else the tokenizer's (as on PyTorch)."""
        candidates: Any = eos_token_id
        if candidates is None:
            candidates = getattr(self.config, "eos_token_id", None)
        if candidates is None:
            candidates = getattr(self.tokenizer, "eos_token_id", None)
        return eos_ids(candidates)

    def _pad_id(self) -> int:
        """The token fed to finished rows: the tokenizer's or config's pad token, else 0."""
        for candidate in (getattr(self.tokenizer, "pad_token_id", None),
                          getattr(self.config, "pad_token_id", None)):
            if isinstance(candidate, int):
                return candidate
        return 0
