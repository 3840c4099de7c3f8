"""How a conversation's turns become the text a model reads: its chat template, or a plain turn format.

A conversation feeds only what is new at each turn, so a format answers one question: given the messages so
far (``[{"role": ..., "content": ...}]``, replies included), what text does a new user message add (up to
the point where the assistant's reply starts)?
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLAIN_STOP", "PlainFormat", "TemplateFormat", "TurnFormat", "turn_format"]

#: the plain format's stop string: a reply ends where the model starts the next user turn on its own
PLAIN_STOP = "\nUser:"


class TurnFormat:
    """The plain turn format (models without a chat template)::

        {system}\\n\\n
        User: {message}\\nAssistant:{reply}
        \\nUser: {message}\\nAssistant:{reply}

    Attributes
    ----------
    stop:
        Stop strings that end a reply by default.
    special_first:
        Whether the tokenizer's special tokens (BOS) are added to the conversation's first text.
    """

    stop: tuple[str, ...] = (PLAIN_STOP,)
    special_first = True
    name = "plain"

    def system(self, text: str) -> str:
        """The text of a system message (the conversation's first)."""
        return f"{text}\n\n"

    def user(self, messages: list[dict[str, str]], text: str) -> str:
        """The text a user message adds after ``messages``."""
        lead = "\n" if any(m["role"] != "system" for m in messages) else ""
        return f"{lead}User: {text}\nAssistant:"


PlainFormat = TurnFormat


class TemplateFormat(TurnFormat):
    """The tokenizer's chat template: the new text is what rendering the conversation with the new message
    (and the generation prompt) adds to rendering it without.

    When the template renders earlier turns differently once a new one follows (some strip reasoning from
    past replies), the prefix check fails and the new message is rendered alone instead.
    """

    stop: tuple[str, ...] = ()
    special_first = False  # templates write BOS into the text themselves
    name = "template"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not messages:
            return ""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
        return str(text)

    def system(self, text: str) -> str:
        return self._render([{"role": "system", "content": text}], False)

    def user(self, messages: list[dict[str, str]], text: str) -> str:
        message = {"role": "user", "content": text}
        before = self._render(messages, False)
        after = self._render([*messages, message], True)
        if after.startswith(before):
            return after[len(before):]
        return self._render([message], True)


def turn_format(tokenizer: Any) -> TurnFormat:
    """The tokenizer's chat template when it has one, else the plain format."""
    if getattr(tokenizer, "chat_template", None):
        return TemplateFormat(tokenizer)
    return TurnFormat()
