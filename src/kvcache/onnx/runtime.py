"""Text generation on ONNX Runtime with the KV cache managed on the host by kvcache's own layers.

The graph (injected, or exported natively with past/present) computes one step; everything around it lives
here: chunked prefill then single-token decode, left-padded batches, sampling and stopping (the helpers of
the PyTorch path), and the cache — a :class:`kvcache.cache.KVCache` built from the same spec string as on
PyTorch, whose layers receive each step's new keys/values (``present[..., -S:, :]``) through ``update`` and
give the next step its past. So a static layout, its capacity limit and later retention policies behave
the same on both runtimes.

Retention policies run here too, with the very ``policies/`` code of the PyTorch path, on a graph injected
with ``--policies`` (:mod:`kvcache.onnx.policy_feed`): the host gives the graph one slot mask per layer
(slots differ per layer and KV head after eviction) and serves the policy's statistics from the graph's
attention logits, at the same points of the decode loop as on PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from kvcache.cache import KVCache, model_cache_shape
from kvcache.decoding import StepFunction, decode
from kvcache.errors import KVCacheError, UnsupportedSpecError
from kvcache.hooks import DecodeHooks, chain
from kvcache.layers.dense import DynamicLayer, StaticLayer
from kvcache.models.load import load_tokenizer
from kvcache.onnx.inject import sliding_windows
from kvcache.onnx.mask_track import MaskTracker
from kvcache.onnx.policy_feed import observe_layer, slot_masks, wants_logits
from kvcache.onnx.provenance import check_config_matches
from kvcache.onnx.session import DecoderSession, StepOutput, resolve_graph
from kvcache.prompts import check_arguments, left_pad, special_tokens, stop_strings
from kvcache.resources import check_fits
from kvcache.result import GenerationResult
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
        Cache spec (``"dynamic"``, ``"static:capacity=512"``, ``"keyformer:budget=0.5"``, ...), see
        :mod:`kvcache.spec`. A retention policy needs a graph injected with ``--policies``.
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
        if self.spec.policy.name != "full" and self.decoder.signature.fused:
            raise UnsupportedSpecError(
                f"the retention policy {self.spec.policy.name} cannot run on {graph}: it was injected with "
                "--fused, whose attention op takes no per-head slot masks and gives no attention scores; "
                "inject the exported graph with `kvcache onnx inject MODEL --policies` for policies (the "
                "fused graph serves caches without one: dynamic, static, int8/int4/int2)")
        if self.spec.policy.name != "full" and not self.decoder.signature.has_slot_masks:
            raise UnsupportedSpecError(
                f"the retention policy {self.spec.policy.name} needs a graph that takes per-layer slot masks "
                f"(tokens kept differ per KV head after eviction) and returns its attention logits, which "
                f"{graph.name} does not; inject it with `kvcache onnx inject MODEL --policies`"
            )
        self.graph_path = graph
        num_layers, self._kv_heads, _ = model_cache_shape(config)
        self._windows = sliding_windows(config, num_layers)
        self._empties: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._masks = MaskTracker()  # the decode loop's attention mask on a fused graph, kept across steps
        # the decode loop's single-token logits on a fused graph: one buffer per batch size, bound once and
        # reused (the loop samples from them before the next forward): per batch size, (B, 1, V) and a (B, V)
        # view of it
        self._logits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

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
        past = self._empties.get(batch)
        if past is None:  # empty tensors: one list per batch size serves every step
            sig = self.decoder.signature
            _, kv_heads, head_dims = model_cache_shape(self.config)
            past = []
            for i in range(sig.num_layers):
                empty = torch.empty(batch, sig.num_kv_heads or kv_heads[i], 0, sig.head_dim or head_dims[i],
                                    dtype=sig.dtype)
                past.append((empty, empty))
            self._empties[batch] = past
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
            attention statistics: per layer ``(B, H_q, T_phys + S)``. A graph injected with ``--policies``
            attends through slot masks built from the cache's slot positions (``past_mask`` then only sizes
            the 2-D mask), and the cache's policy receives its statistics from the graph's attention logits
            (it evicts at the decode driver's hooks, as on PyTorch).
        """
        batch, seq = input_ids.shape
        stores = cache.stores
        for store in stores:
            # The previous forward is done in every layer: a quantized store quantizes what left its window
            # now, so the past the graph reads is the layout its new tokens are appended to.
            store.release()
        if self._in_place(cache):
            return self._step_in_place(cache, input_ids, past_mask, current_mask, position_ids)
        stored = [store.keys_values() for store in stores]
        past = self._empty_past(batch) if stored[0] is None else stored
        if past[0][0].shape[2] != past_mask.shape[1]:
            raise KVCacheError(f"past_mask covers {past_mask.shape[1]} slots but the cache holds "
                               f"{past[0][0].shape[2]}; pass one column per held slot")
        masks, want = None, False
        held = [k.shape[2] for k, _ in past]
        if self.decoder.signature.has_slot_masks:
            masks = slot_masks(cache, current_mask.bool(), self._windows, self._kv_heads)
            want = wants_logits(cache)
            if len(set(held)) > 1:
                # Layers hold different slot counts (a quantized store pads its regions per layer): the graph
                # takes one past length, so shorter layers get empty slots that their masks hide.
                past, masks = _pad_layers(past, masks, max(held), seq)
                past_mask = torch.ones(batch, max(held), dtype=torch.long)
        out = self.decoder.run(input_ids, torch.cat([past_mask, current_mask], dim=1), position_ids, past,
                               slot_masks=masks, logits_of_attention=want)
        valid = None if bool(current_mask.all()) else current_mask.bool()
        for i, (k, v) in enumerate(out.presents):
            store = stores[i]
            if type(store) is DynamicLayer and cache.observer is None and not store.slots_remapped:
                # the present is past ++ new, contiguous: the store keeps it, and hands it back whole as the
                # next past (no copy of the new tokens in, none of the cache out)
                store.adopt(k, v, valid)
                continue
            cache.update(k[:, :, -seq:, :], v[:, :, -seq:, :], i)
            if out.attn_logits is not None:
                logits = out.attn_logits[i]
                if logits.shape[-1] != held[i] + seq:  # leave out the empty slots added above
                    logits = torch.cat([logits[..., :held[i]], logits[..., -seq:]], dim=-1)
                observe_layer(cache, i, logits, seq)
            cache.attention_reported(i)  # the graph attended with the slot mask passed above
        return out

    def _in_place(self, cache: KVCache) -> bool:
        """A ``--fused`` graph and plain dense stores: the graph writes the new tokens into the stores'
        buffers itself (:meth:`DecoderSession.run_in_place`)."""
        return self.decoder.signature.fused and cache.observer is None and all(
            type(store) in (DynamicLayer, StaticLayer) and not store.slots_remapped for store in cache.stores)

    def _step_in_place(self, cache: KVCache, input_ids: torch.Tensor, past_mask: torch.Tensor,
                       current_mask: torch.Tensor, position_ids: torch.Tensor) -> StepOutput:
        """:meth:`step` for :meth:`_in_place` caches: no key or value is copied on the host."""
        held = cache.stores[0].physical_length
        if past_mask.shape[1] != held:
            raise KVCacheError(f"past_mask covers {past_mask.shape[1]} slots but the cache holds {held}; "
                               "pass one column per held slot")
        mask = torch.cat([past_mask, current_mask], dim=1)
        logits = self._write_in_place(cache, input_ids, mask, position_ids, current_mask)
        return StepOutput(logits=logits, presents=[], attn_scores=None)

    def _write_in_place(self, cache: KVCache, input_ids: torch.Tensor, mask: torch.Tensor | np.ndarray,
                        position_ids: torch.Tensor, current: torch.Tensor,
                        logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Run the fused graph on the stores' own buffers (``mask``: ``(B, T)`` over held and new slots,
        ``current``: ``(B, S)`` validity of the new tokens) and record the new slots; returns the logits."""
        batch, seq = input_ids.shape
        stores = cache.stores
        likes = self._empty_past(batch)
        buffers = [store.open_slots(seq, k, v) for store, (k, v) in zip(stores, likes, strict=True)]
        valid = None if current.numpy().all() else current.bool()
        logits = self.decoder.run_in_place(input_ids, mask, position_ids, buffers, logits_out)
        for store in stores:
            store.commit_slots(seq, valid)
        return logits

    def _decode_in_place(self, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor,
                         valid: torch.Tensor) -> torch.Tensor:
        """The decode loop's step on an :meth:`_in_place` cache: the mask kept across steps, a decode step's
        logits written into one reused buffer; returns the ``(B, V)`` logits of the last tokens."""
        batch, seq = input_ids.shape
        held = cache.stores[0].physical_length
        mask = self._masks.mask(cache, held, valid, lambda: _past_mask(cache, batch))
        vocab = self.decoder.signature.vocab_size
        if vocab is not None and seq == 1:  # decode steps: one small buffer, bound once, and its (B, V) view
            out = self._logits.get(batch)
            if out is None:
                buffer = torch.empty((batch, 1, vocab), dtype=self.decoder.logits_dtype)
                out = self._logits[batch] = (buffer, buffer.view(batch, vocab))
            self._write_in_place(cache, input_ids, mask, positions, valid, out[0])
            self._masks.advance(held + 1)
            return out[1]
        logits = self._write_in_place(cache, input_ids, mask, positions, valid)
        self._masks.advance(held + seq)
        return logits[:, -1, :]

    def _step_function(self, cache: KVCache) -> StepFunction:
        """The step function of :func:`kvcache.decoding.decode`: slot validity read off the cache."""

        slotted = self.decoder.signature.has_slot_masks

        def run(input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            if self._in_place(cache):  # plain dense stores: nothing to release after the step
                return self._decode_in_place(cache, input_ids, positions, valid)
            batch = input_ids.shape[0]
            # a graph with slot masks reads only the current columns of the 2-D mask
            past_mask = (torch.ones(batch, cache.stores[0].physical_length, dtype=torch.long) if slotted
                         else _past_mask(cache, batch))
            return self.step(cache, input_ids, past_mask, valid.long(), positions).logits[:, -1, :]

        return run

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
        hooks: DecodeHooks | None = None,
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
        eos, pad_id = special_tokens(eos_token_id, self.tokenizer, self.generation_config, self.config)
        checker = StopChecker(self.tokenizer, eos, stop_strings(stop))
        vocab = self.decoder.signature.vocab_size or getattr(self.config, "vocab_size", None)
        input_ids, prompt_mask = left_pad(self.tokenizer, texts, vocab, owner="graph")
        batch, prompt_len = input_ids.shape
        check_fits(self.config, self.spec, batch=batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                   device="cpu", dtype=self.decoder.signature.dtype)
        limit = self.decoder.signature.rotary_positions
        if limit is not None and prompt_len + max_new_tokens > limit:
            fix = (f"lower --max-new-tokens to {limit - prompt_len}" if prompt_len < limit
                   else "shorten the prompt")
            raise KVCacheError(
                f"this graph's attention op rotates positions below {limit} only (its rotary tables cover "
                f"the model's context), but {prompt_len} prompt + {max_new_tokens} new tokens go past it; "
                f"{fix}, or inject without --fused")
        cache = KVCache.from_spec(self.spec, self.config, batch_size=batch,
                                  max_cache_len=prompt_len + max_new_tokens, device="cpu",
                                  dtype=self.decoder.signature.dtype)
        if cache.policy is not None:
            cache.policy.start(prompt_lengths=prompt_mask.sum(-1), max_new_tokens=max_new_tokens, seed=seed,
                               prefill_chunks=-(-prompt_len // prefill_chunk_size))
            hooks = chain(cache.policy.hooks(), hooks)
        return decode(self._step_function(cache), cache, input_ids, prompt_mask,
                      max_new_tokens=max_new_tokens, sampler=sampler,
                      generator=make_generator(seed, torch.device("cpu")), checker=checker, pad_id=pad_id,
                      prefill_chunk_size=prefill_chunk_size, spec=self.spec, hooks=hooks)

    @property
    def generation_config(self) -> GenerationConfig | None:
        """``generation_config.json`` beside the graph, when there is one (as for the PyTorch model)."""
        if not (self._directory / "generation_config.json").is_file():
            return None
        return GenerationConfig.from_pretrained(self._directory)


def _pad_layers(past: list[tuple[torch.Tensor, torch.Tensor]], masks: list[torch.Tensor], length: int,
                seq: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Every layer's past padded to ``length`` slots (zeros) and its ``(B, H_kv, S, T + S)`` slot mask
    padded with hidden columns to match, before the new tokens' columns."""
    padded, padded_masks = [], []
    for (k, v), mask in zip(past, masks, strict=True):
        extra = length - k.shape[2]
        if extra:
            k = torch.cat([k, k.new_zeros((*k.shape[:2], extra, k.shape[3]))], dim=2)
            v = torch.cat([v, v.new_zeros((*v.shape[:2], extra, v.shape[3]))], dim=2)
            hidden = mask.new_zeros((*mask.shape[:3], extra))
            mask = torch.cat([mask[..., : mask.shape[-1] - seq], hidden, mask[..., -seq:]], dim=-1)
        padded.append((k, v))
        padded_masks.append(mask)
    return padded, padded_masks


def _past_mask(cache: KVCache, batch: int) -> torch.Tensor:
    """``(B, T_phys)`` int64 validity of the held slots, as the graph's 2-D attention mask takes it.

    The graph takes one mask for all heads and layers, so it serves caches whose slots hold the same tokens
    in every head and layer (everything but per-head eviction, which the host cannot express to the graph).
    """
    stores = cache.stores
    first = stores[0].positions
    if first is None:
        return torch.zeros(batch, 0, dtype=torch.long)
    held = stores[0].physical_length
    pos = first[:, :, :held]
    # Until a keep() re-selects slots, every layer and head holds the tokens of the same columns (padding
    # marked alike): layer 0's first head speaks for all, with no per-step comparison.
    if any(store.slots_remapped for store in stores):
        for store in stores:
            other = store.positions
            if other is None or other.shape[-1] < held or not torch.equal(other[:, :, :held], pos):
                raise KVCacheError(
                    "the cache holds different tokens per layer or per KV head, which an ONNX graph's 2-D "
                    "attention mask cannot express; run this spec on PyTorch"
                )
        if bool((pos != pos[:, :1]).any()):
            raise KVCacheError(
                "the cache holds different tokens per KV head, which an ONNX graph's 2-D attention mask "
                "cannot express; run this spec on PyTorch"
            )
    return (pos[:, 0] >= 0).long()
