"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Everything stays on the logits' device; nothing here synchronises with the host, so the decode loop can
sample without a device round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache import validate

#: logits dtypes numpy can read without a copy
_NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


@dataclass(frozen=True)
class Sampler:
    """Next-token selection settings.

    Parameters
    ----------
    temperature:
        0 for greedy decoding (argmax; ``top_k``/``top_p`` are then ignored), otherwise the softmax
        temperature (> 0).
    top_k:
        Keep only the ``top_k`` most likely tokens before sampling (``None``: all).
    top_p:
        Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``, in (0, 1]
        (``None`` or 1: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        # KVCacheError is a ValueError: NaN, infinities, bools and strings are refused with the range
        validate.check_real("temperature (0 = greedy)", self.temperature, minimum=0.0)
        if self.top_k is not None:
            validate.check_int("top_k (None for no limit)", self.top_k, minimum=1)
        if self.top_p is not None:
            validate.check_real("top_p (None for no limit)", self.top_p, minimum=0.0, maximum=1.0,
                                exclusive_minimum=True)

    @property
    def greedy(self) -> bool:
        """Whether selection is deterministic argmax."""
        return self.temperature == 0.0

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pick one token per row.

        Parameters
        ----------
        logits:
            ``(B, V)`` next-token logits.
        generator:
            Random generator on ``logits.device`` for reproducible sampling (``None``: torch's global RNG).

        Returns
        -------
        torch.Tensor
            ``(B,)`` int64 token ids, on ``logits.device``.
        """
        if self.greedy:
            if logits.device.type == "cpu" and logits.dtype in _NUMPY_FLOATS:
                # numpy's argmax on host logits: a fifth of torch's dispatch cost, which a decode step on a
                # small model pays every token (same rule: the first maximum, NaN counting as one)
                return torch.from_numpy(logits.numpy().argmax(axis=-1))
            return logits.argmax(dim=-1)
        # Sample in float32: half-precision softmax over large vocabularies loses the tail. The best logit
        # is subtracted first so a tiny temperature cannot overflow to inf - inf = nan: the best token stays
        # at 0 (0 / t is 0, and 0 * inf from a temperature below float32's range is mapped back to 0).
        scores = logits.float()
        scores = (scores - scores.amax(dim=-1, keepdim=True)) / self.temperature
        scores = scores.nan_to_num(nan=0.0, neginf=float("-inf"))
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            scores = _top_p_filter(scores, self.top_p)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the nucleus of mass ``top_p``; ``scores`` is ``(B, V)``."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    # A token is dropped when the mass *before* it already reaches top_p, so the most likely token always
    # stays and the kept set is the smallest one whose mass reaches top_p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    # cumsum's rounding can leave a mass before the first token of ~1e-8, more than a tiny top_p: the most
    # likely token is kept explicitly, or nothing would be left to sample.
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (``None`` when no seed is given)."""
    if validate.check_seed(seed) is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
