"""When a policy evicts, and the observer that feeds it attention statistics.

A :class:`PolicyRunner` sits on a :class:`~kvcache.cache.KVCache` as its observer and owns the policy's
schedule. Eviction happens only between forwards, never inside an attention call:

* with kvcache's decode driver (``kvcache.generate``, ``OnnxGenerator``), at its hooks: after each prefill
  chunk (when the policy may compress a prompt while it streams in), at the end of the prefill (the prompt
  selection) and after each decode step (every ``every`` steps);
* with ``model.generate(past_key_values=cache)``, which has no hooks, at the start of the next ``update``
  of each layer — the same decisions on the same scores, one forward later.

Either way a row holds at most its budget after the prompt, and at most ``budget + every - 1`` slots after
each decode step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvcache.hooks import DecodeHooks
from kvcache.observe import StatsRequest
from kvcache.policies.base import Policy
from kvcache.policies.layer import PolicyLayer
from kvcache.policies.select import select

if TYPE_CHECKING:
    from kvcache.cache import KVCache

__all__ = ["PolicyRunner"]


class PolicyRunner:
    """Runs one policy over the layers of one cache (an :class:`~kvcache.observe.AttentionObserver`).

    Parameters
    ----------
    policy:
        The policy.
    layers:
        The cache's stores, each a :class:`PolicyLayer`.

    Attributes
    ----------
    phase:
        ``"prefill"`` or ``"decode"``.
    decode_step:
        Decode forwards run so far (0 during the prompt): Keyformer's temperature schedule reads it.
    max_new_tokens:
        Length of the generation, when known (from :meth:`start`).
    generator:
        Random source of stochastic scores (Keyformer's Gumbel noise), seeded by :meth:`start`.
    """

    def __init__(self, policy: Policy, layers: list[PolicyLayer]) -> None:
        self.policy = policy
        self.layers = layers
        for layer in layers:
            layer.runner = self
        self.phase = "prefill"
        self.decode_step = 0
        self.max_new_tokens: int | None = None
        self.prompt_lengths: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self._seed = 0
        self._driven = False  # a decode driver calls the hooks (else: model.generate, phases inferred)
        self._prefill_chunks: int | None = None  # forwards of a driven prefill, when known
        self._chunk = -1  # the driven prefill forward running now
        self._layer_index = {id(layer): i for i, layer in enumerate(layers)}

    # ----- set-up by a driver ----------------------------------------------------------------------------
    def start(self, prompt_lengths: torch.Tensor | None = None, max_new_tokens: int | None = None,
              seed: int | None = None, prefill_chunks: int | None = None) -> None:
        """A new generation: ``(B,)`` real prompt tokens per row (budgets known before the prompt streams in),
        its length (Keyformer's temperature schedule), the seed of stochastic scores, and how many forwards
        the prefill takes (so the prompt selection can run layer by layer inside the last one).

        On a cache that already holds tokens (a conversation's next turn), ``prompt_lengths`` counts every
        token seen so far plus the new ones: each layer's budget is fixed again from it and the prompt
        selection runs again at the end of this prefill."""
        for layer in self.layers:
            layer.budget = None
            layer.pruned = False
        self.phase = "prefill"
        self.decode_step = 0
        self._prefill_chunks = prefill_chunks
        self._chunk = -1
        self.prompt_lengths = None if prompt_lengths is None else prompt_lengths.to(torch.long)
        self.max_new_tokens = max_new_tokens
        self._seed = 0 if seed is None else seed
        self.generator = None
        self._driven = True

    def hooks(self) -> DecodeHooks:
        """The decode driver's hooks for this policy."""
        return DecodeHooks(after_prefill_chunk=self._after_chunk, after_prefill=self._after_prefill,
                           after_step=self._after_step)

    @property
    def last_prefill_chunk(self) -> bool:
        """The forward running now is the prefill's last (the end of the prompt); True when the driver did
        not say how many forwards the prefill takes."""
        return self._prefill_chunks is None or self._chunk >= self._prefill_chunks - 1

    def random(self, device: torch.device) -> torch.Generator:
        """The seeded random generator on ``device`` (same seed, same draws, same tokens)."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self._seed)
        return self.generator

    # ----- the observer protocol -------------------------------------------------------------------------
    def request(self, layer_idx: int) -> StatsRequest | None:
        return self.policy.request(self, layer_idx)

    def observe(self, layer_idx: int, stats: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        b, h = stats.shape[:2]
        h_kv = layer.held_positions().shape[1]
        # GQA: each KV head's score is the sum over its group of query heads (j * n_rep + r -> j).
        grouped = stats.reshape(b, h_kv, h // h_kv, *stats.shape[2:]).sum(dim=2)
        self.policy.accumulate(self, layer, grouped)

    # ----- eviction --------------------------------------------------------------------------------------
    def budget(self, layer: PolicyLayer) -> torch.Tensor:
        """``(B,)`` tokens each row keeps: fixed the first time it is asked, from the prompt lengths the
        driver gave or, without one, from the real tokens the layer holds then (the whole prompt)."""
        if layer.budget is None:
            lengths = self.prompt_lengths
            if lengths is None or lengths.shape[0] != layer.batch_size:
                lengths = (layer.held_positions()[:, 0] >= 0).sum(-1)
            budget = [self.policy.row_budget(int(n)) for n in lengths.tolist()]
            layer.budget = torch.tensor(budget, dtype=torch.long, device=layer.device)
        return layer.budget

    def evict(self, layer: PolicyLayer) -> None:
        """Bring ``layer`` down to its rows' budgets (nothing to do when every row is within it)."""
        budget = self.budget(layer)
        positions = layer.held_positions()
        real = (positions[:, 0] >= 0).sum(-1)
        if not bool((real > budget).any()) and positions.shape[-1] <= int(budget.max()):
            return
        scores = self.policy.score(self, layer)
        indices, invalid = select(scores, positions, budget, self.policy.recent(budget))
        layer.keep(indices, invalid)

    def _evict_due(self, layer: PolicyLayer) -> bool:
        """Decode time: a row of the layer holds ``every`` real tokens past its budget (counted in tokens,
        not slots: padding and the empty slots a quantized store pads its regions with do not count)."""
        real = (layer.held_positions() >= 0).sum(-1).amax(-1)  # (B,) most tokens any head of a row holds
        return bool((real >= self.budget(layer) + self.policy.every).any())

    def _after_chunk(self, cache: KVCache) -> None:
        if "prefill" in self.policy.phases and self.policy.streams:
            for layer in self.layers:
                self.evict(layer)

    def _after_prefill(self, cache: KVCache) -> None:
        for layer in self.layers:
            if "prefill" in self.policy.phases:
                self.evict(layer)
            layer.pruned = True
        self.phase = "decode"

    def _after_step(self, cache: KVCache) -> None:
        if "decode" in self.policy.phases:
            for layer in self.layers:
                if self._evict_due(layer):
                    self.evict(layer)

    def before_forward(self, new_tokens: int) -> None:
        """A forward of ``new_tokens`` tokens is about to run (transformers sizes its masks now): without a
        driver, infer the phase and catch up on the evictions the driver's hooks would have done, so every
        mask of this forward is built for what the layers will hold."""
        self._infer_phase(new_tokens)
        if self.phase == "decode":
            for layer in self.layers:
                self._catch_up(layer)

    def before_update(self, layer: PolicyLayer, new_tokens: int) -> None:
        """Called by each layer before it stores new tokens: counts decode steps and, for forwards that did
        not announce themselves through :meth:`before_forward`, catches up on evictions.

        During a driven prefill, the previous layer's attention is done for this forward: when the policy
        selects now (after every chunk for policies that stream, after the last chunk for the others), that
        layer is brought to its budget here, so the prompt is never held whole in every layer at once (the
        peak is the compressed layers plus one layer's prompt)."""
        index = self._layer_index.get(id(layer), 0)
        if self._driven and self.phase == "prefill":
            self._chunk += index == 0
            last = self._prefill_chunks is not None and self._chunk == self._prefill_chunks - 1
            if index > 0 and "prefill" in self.policy.phases and (self.policy.streams or last):
                self.evict(self.layers[index - 1])
            return
        if index == 0:
            self._infer_phase(new_tokens)
            if self.phase == "decode" and layer.physical_length:
                self.decode_step += 1
        if self.phase == "decode":
            self._catch_up(layer)

    def before_release(self, layer: PolicyLayer) -> None:
        """Called by each layer when its attention is done for the forward, before its store may compact
        or quantize what it holds: the last layer of a driven prefill is brought to its budget here (the
        others were, at the next layer's update), so a quantized store quantizes only what is kept."""
        index = self._layer_index.get(id(layer), 0)
        if not (self._driven and self.phase == "prefill" and index == len(self.layers) - 1):
            return
        last = self._prefill_chunks is not None and self._chunk == self._prefill_chunks - 1
        if "prefill" in self.policy.phases and (self.policy.streams or last) and layer.physical_length:
            self.evict(layer)

    def _infer_phase(self, new_tokens: int) -> None:
        if self._driven:
            return  # the driver's hooks say when the prompt is in
        if not self.layers[0].physical_length:
            self.phase, self.decode_step = "prefill", 0
        elif new_tokens == 1:
            self.phase = "decode"

    def _catch_up(self, layer: PolicyLayer) -> None:
        if not layer.physical_length:
            return
        if not layer.pruned:
            layer.pruned = True
            if "prefill" in self.policy.phases:
                self.evict(layer)
        elif "decode" in self.policy.phases and self._evict_due(layer):
            self.evict(layer)
