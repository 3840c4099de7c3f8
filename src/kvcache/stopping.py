"""When a sequence stops: end-of-sequence tokens and stop strings.

Stop strings are matched on *decoded text*, not on token ids, because one string can be tokenized many
ways (and split across tokens). Only a tail of the generated tokens is decoded at each step, so the check
costs the same at token 10 and at token 10,000.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class StopChecker:
    """Decides, per row and per step, whether a sequence has finished.

    Parameters
    ----------
    tokenizer:
        Used to decode generated tokens for stop strings.
    eos_token_ids:
        Token ids that end a sequence (the token itself is kept in ``token_ids`` but not in the text).
    stop:
        Stop strings; generation of a row ends as soon as its decoded text contains one.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int], stop: Sequence[str] = ()) -> None:
        stops = tuple(stop)
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stop = stops
        # A stop string of L characters spans at most L tokens that each decode to >= 1 character; the
        # margin covers tokens that decode to nothing (special tokens) or to partial UTF-8 sequences.
        self._window = 2 * max((len(s) for s in stops), default=0) + 4

    def check(self, generated: list[int]) -> str | None:
        """Why the row whose new tokens are ``generated`` stops now: ``"eos"``, ``"stop"`` or ``None``."""
        if generated[-1] in self.eos_token_ids:
            return "eos"
        if self.stop:
            tail = self.tokenizer.decode(generated[-self._window :], skip_special_tokens=True)
            if any(s in tail for s in self.stop):
                return "stop"
        return None

    def text(self, generated: list[int], finish_reason: str) -> str:
        """The decoded text of ``generated``, cut before the first stop string when it stopped on one."""
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if finish_reason == "stop":
            text = trim_at_stop(text, self.stop)
        return text


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` before the earliest occurrence of any string in ``stop`` (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
