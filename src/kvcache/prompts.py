"""Preparing a batch of prompts for either runtime: argument checks, left padding, special tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvcache import validate

__all__ = ["check_arguments", "eos_ids", "left_pad", "special_tokens", "stop_strings"]


def check_arguments(prompts: str | Sequence[str], max_new_tokens: int, prefill_chunk_size: int) -> list[str]:
    """Validate the common arguments of ``generate``; return the prompts as a list."""
    return validate.generate_arguments(prompts, max_new_tokens, prefill_chunk_size)


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """``stop`` as a list: one string, several, or none."""
    return [stop] if isinstance(stop, str) else list(stop or ())


def eos_ids(candidates: Any) -> list[int]:
    """End-of-sequence ids as a list, from ``None``, one id or several."""
    if candidates is None:
        return []
    return [int(candidates)] if isinstance(candidates, int) else [int(c) for c in candidates]


def special_tokens(eos_token_id: int | Sequence[int] | None, tokenizer: Any,
                   *configs: Any) -> tuple[list[int], int]:
    """End-of-sequence ids and the pad id fed to finished rows, the same way for both runtimes.

    Parameters
    ----------
    eos_token_id:
        The caller's choice: one id, several, ``[]`` (never stop on a token) or ``None`` (look it up).
    tokenizer:
        The model's tokenizer (its ``eos_token_id``/``pad_token_id`` are the last resort / first choice).
    configs:
        Generation config and model config (either may be ``None``), asked in that order.

    Returns
    -------
    eos:
        The argument, else the first config that names one, else the tokenizer's.
    pad:
        The tokenizer's pad token, else the configs', else the smallest eos id, else 0. A finished row keeps
        feeding it so the batch stays rectangular; what it is never changes another row's tokens.
    """
    candidates: Any = eos_token_id
    for source in configs:
        if candidates is None:
            candidates = getattr(source, "eos_token_id", None)
    if candidates is None:
        candidates = getattr(tokenizer, "eos_token_id", None)
    eos = eos_ids(candidates)
    for source in (tokenizer, *configs):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool):
            return eos, pad
    return eos, min(eos) if eos else 0


def left_pad(tokenizer: Any, prompts: list[str], vocab_size: int | None,
             owner: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and left-pad on the CPU.

    Parameters
    ----------
    tokenizer:
        Called on the prompts with special tokens.
    prompts:
        ``B`` prompts, each giving at least one token.
    vocab_size:
        The model's vocabulary size (``None`` skips the id check).
    owner:
        What has the vocabulary, for the error message (``"model"`` or ``"graph"``).

    Returns
    -------
    ``(B, T)`` int64 input ids and ``(B, T)`` int64 attention mask (zeros over the left padding).
    """
    encoded = [list(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization; give at least one token of text")
    largest = max(max(ids) for ids in encoded)
    if vocab_size is not None and largest >= vocab_size:
        raise ValueError(
            f"the tokenizer produced token id {largest} but the {owner}'s vocabulary has {vocab_size} "
            "entries; use the tokenizer that belongs to this model"
        )
    width = max(len(ids) for ids in encoded)
    # Pad ids under a zero mask never influence real tokens; 0 is a valid embedding row for any model.
    input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask
