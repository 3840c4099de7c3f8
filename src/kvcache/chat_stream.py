"""A stop checker that also records the reply's tokens and streams its text as it grows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvcache.stopping import StopChecker, trim_at_stop

__all__ = ["TokenRecorder"]


class TokenRecorder(StopChecker):
    """:class:`~kvcache.stopping.StopChecker` that keeps the tokens checked so far and hands new text to
    ``on_text``.

    The decode driver asks the checker once per new token, so this is where a reply can be streamed without
    a second loop. Text that could still turn out to be the start of a stop string is held back until it
    cannot (or until :meth:`flush`), so a stop string is never shown; nor is a half-decoded character.

    Parameters
    ----------
    tokenizer, eos_token_ids, stop:
        As for :class:`~kvcache.stopping.StopChecker`.
    on_text:
        Called with each new piece of text; ``None``: record only.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int], stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None) -> None:
        super().__init__(tokenizer, eos_token_ids, stop)
        self.tokens: list[int] = []
        self.on_text = on_text
        self._shown = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def check(self, generated: list[int]) -> str | None:
        reason = super().check(generated)
        self.tokens = list(generated)
        if self.on_text is not None:
            if reason is None:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                safe = len(text) - self._hold
                if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                    safe = min(safe, len(text) - 1)
                self._emit(text, safe)
            else:
                self.flush(self.text(generated, reason))
        return reason

    def flush(self, text: str) -> None:
        """Show the rest of the final ``text`` (the reply, cut at a stop string)."""
        if self.on_text is not None:
            self._emit(trim_at_stop(text, self.stop), len(text))

    def _emit(self, text: str, upto: int) -> None:
        upto = min(upto, len(text))
        if upto > self._shown and self.on_text is not None:
            self.on_text(text[self._shown:upto])
            self._shown = upto
