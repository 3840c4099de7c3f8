"""A conversation that keeps its cache across turns: each turn feeds only its new tokens.

:class:`Chat` holds a model, its tokenizer and one cache built from a spec. ``send(text)`` formats the user
message (the tokenizer's chat template, else a plain ``User:``/``Assistant:`` format), feeds those tokens —
and the last token of the previous reply, which generation samples but never feeds — through the model on
top of what the cache holds, and decodes the reply with kvcache's one decode driver. Logical positions
continue from the tokens seen; a retention policy selects again at each turn's prefill, its budget taken
from the whole conversation so far (a fraction of every token seen, or its ``tokens=N`` cap), and keeps
evicting while the reply is decoded.

``fork()`` copies a conversation (a long system prompt or document read once, answered many ways);
``save(path)`` / :meth:`Chat.load` write it to a safetensors file and resume it, in this process or another
(:mod:`kvcache.persist`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvcache import persist, validate
from kvcache.attention import enable
from kvcache.cache import KVCache
from kvcache.chat_format import TurnFormat, turn_format
from kvcache.chat_stream import TokenRecorder
from kvcache.decoding import decode
from kvcache.errors import KVCacheError
from kvcache.generation import TorchStep
from kvcache.prompts import special_tokens, stop_strings
from kvcache.result import GenerationResult
from kvcache.sampling import Sampler, make_generator
from kvcache.spec import CacheSpec, SpecError

__all__ = ["Chat", "TurnStats"]


@dataclass(frozen=True)
class TurnStats:
    """What one turn cost and what the cache holds after it.

    Attributes
    ----------
    role:
        ``"system"`` (a system prompt read without a reply) or ``"user"``.
    tokens_read:
        Tokens this turn fed through the model: its new text, the previous reply's last token and every
        reply token but the last (each token of the conversation is read once).
    new_tokens:
        Reply tokens generated.
    tokens_seen:
        Tokens the cache has seen in the whole conversation (logical length).
    tokens_held:
        Slots the cache holds after the turn (the largest over layers; below ``tokens_seen`` under a policy).
    cache_bytes:
        Bytes of K/V memory the cache holds after the turn.
    prefill_seconds, decode_seconds:
        Time spent reading the turn and generating the reply.
    """

    role: str
    tokens_read: int
    new_tokens: int
    tokens_seen: int
    tokens_held: int
    cache_bytes: int
    prefill_seconds: float
    decode_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


class Chat:
    """A conversation with a model whose cache is carried from turn to turn.

    Parameters
    ----------
    model, tokenizer:
        A Hugging Face causal LM and its tokenizer.
    cache:
        Cache spec (``"dynamic"``, ``"static:capacity=4096"``, ``"h2o:budget=0.5"``, ...). A static layout
        needs a capacity for the whole conversation (``capacity=N`` or ``max_cache_len``).
    system:
        A system prompt (or document) read at once, before the first message (and again after :meth:`reset`).
    max_new_tokens:
        Default upper bound on the tokens of a reply.
    max_cache_len:
        Capacity of a ``static`` layout given without ``capacity=N``.
    temperature, top_k, top_p, seed:
        Sampling (greedy by default); turn ``k`` samples with ``seed + k``.
    stop:
        Stop strings that end a reply; ``None`` takes the format's (the plain format stops where the model
        writes the next ``User:`` turn), ``[]`` none.
    eos_token_id:
        End-of-sequence id(s); ``None`` takes the model's generation config, else the tokenizer's.
    prefill_chunk_size:
        Tokens per prefill forward.

    Attributes
    ----------
    cache:
        The :class:`~kvcache.cache.KVCache` carried across turns.
    messages:
        ``[{"role": ..., "content": ...}]``: the system prompt, user messages and replies so far.
    stats:
        One :class:`TurnStats` per turn (and one for the system prompt).
    """

    def __init__(self, model: Any, tokenizer: Any, cache: str | CacheSpec = "dynamic", *,
                 system: str | None = None, max_new_tokens: int = 128, max_cache_len: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 eos_token_id: int | Sequence[int] | None = None, prefill_chunk_size: int = 512) -> None:
        validate.check_model(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.spec = CacheSpec.parse(cache)
        self.format: TurnFormat = turn_format(tokenizer)
        self.max_new_tokens = validate.check_int("max_new_tokens", max_new_tokens, minimum=1)
        self.prefill_chunk_size = validate.check_int("prefill_chunk_size", prefill_chunk_size, minimum=1)
        self.max_cache_len = max_cache_len
        self.sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = validate.check_seed(seed)
        self.stop = tuple(self.format.stop if stop is None else stop_strings(stop))
        generation_config = getattr(model, "generation_config", None)
        self._eos, self._pad = special_tokens(eos_token_id, tokenizer, generation_config, model.config)
        self.system = system
        self.cache = self._new_cache()
        self.messages: list[dict[str, str]] = []
        self.stats: list[TurnStats] = []
        self._ids: list[int] = []  # every token of the conversation: fed, then at most one not yet fed
        if system:
            self._read_system(system)

    # ----- the conversation --------------------------------------------------------------------------
    def send(self, text: str, *, max_new_tokens: int | None = None,
             on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, read it on top of the cache, and return the reply.

        Parameters
        ----------
        text:
            The user's message.
        max_new_tokens:
            Upper bound on the reply's tokens (default: the chat's).
        on_text:
            Called with each new piece of the reply's text as it is generated (streaming).

        Raises
        ------
        CacheCapacityError
            A fixed-capacity cache cannot hold the new turn (nothing is changed).
        """
        if not isinstance(text, str):
            raise ValueError(f"a message must be a string, got {type(text).__name__}")
        limit = self.max_new_tokens if max_new_tokens is None else validate.check_int(
            "max_new_tokens", max_new_tokens, minimum=1)
        new_ids = self._encode(self.format.user(self.messages, text))
        result, recorder = self._run(new_ids, limit, on_text, role="user")
        reply = result.texts[0]
        recorder.flush(reply)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def fork(self) -> Chat:
        """An independent copy: the same history and cache contents; turns sent to one leave the other as
        it was (a shared prefix is computed once)."""
        other = Chat.__new__(Chat)
        other.__dict__.update(self.__dict__)
        other.cache = self._new_cache()
        with torch.inference_mode():
            persist.restore_cache(other.cache, persist.cache_state(self.cache))
        other.messages = [dict(m) for m in self.messages]
        other.stats = list(self.stats)
        other._ids = list(self._ids)
        return other

    def reset(self) -> None:
        """Forget the conversation (the system prompt, if any, is read again)."""
        self.cache.reset()
        self.messages, self.stats, self._ids = [], [], []
        if self.system:
            self._read_system(self.system)

    @property
    def token_ids(self) -> list[int]:
        """Every token of the conversation in order, as the model read them (the last reply's last token
        is read with the next turn)."""
        return list(self._ids)

    @property
    def tokens_read(self) -> int:
        """Tokens fed through the model over the whole conversation."""
        return sum(s.tokens_read for s in self.stats)

    # ----- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the conversation (cache, history, settings, model fingerprint) to a safetensors file,
        atomically; an existing file is replaced only with ``overwrite=True``.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False.
        KVCacheError
            The cache's layout does not support saving.
        """
        state = persist.cache_state(self.cache)
        chat = {"messages": self.messages, "ids": self._ids, "stats": [s.to_dict() for s in self.stats],
                "system": self.system, "max_new_tokens": self.max_new_tokens,
                "max_cache_len": self.max_cache_len, "stop": list(self.stop), "eos": self._eos,
                "prefill_chunk_size": self.prefill_chunk_size, "format": self.format.name}
        metadata = {"spec": str(self.spec), "model": persist.dumps(persist.model_fingerprint(self.model,
                                                                                             self.tokenizer)),
                    "chat": persist.dumps(chat)}
        return persist.write_file(path, state, metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any, tokenizer: Any, *,
             cache: str | CacheSpec | None = None, **settings: Any) -> Chat:
        """Resume a conversation :meth:`save` wrote, with the model and tokenizer that wrote it.

        Parameters
        ----------
        cache:
            ``None`` takes the file's spec; a spec given must be the file's.
        settings:
            Sampling settings (``temperature``, ``top_k``, ``top_p``, ``seed``) and ``max_new_tokens``;
            the rest come from the file.

        Raises
        ------
        KVCacheError
            The file is missing, truncated, not a kvcache file, written by another model (or dtype,
            tokenizer), or holds another spec than ``cache``.
        """
        tensors, metadata = persist.read_file(path)
        persist.check_fingerprint(persist.loads(metadata, "model", path),
                                  persist.model_fingerprint(model, tokenizer), path)
        try:
            spec = CacheSpec.parse(metadata.get("spec", ""))
        except SpecError as err:
            raise KVCacheError(f"{path} names an invalid cache spec: {err}") from err
        if cache is not None and str(CacheSpec.parse(cache)) != str(spec):
            raise KVCacheError(
                f"{path} holds a '{spec}' cache, not '{CacheSpec.parse(cache)}'; load it without a spec "
                f"(or with cache='{spec}')"
            )
        state = persist.loads(metadata, "chat", path)
        try:
            chat = cls(model, tokenizer, spec, max_new_tokens=settings.pop("max_new_tokens",
                                                                           state["max_new_tokens"]),
                       max_cache_len=state["max_cache_len"], stop=state["stop"], eos_token_id=state["eos"],
                       prefill_chunk_size=state["prefill_chunk_size"], **settings)
            chat.system = state["system"]
            chat.messages = [{"role": str(m["role"]), "content": str(m["content"])}
                             for m in state["messages"]]
            chat.stats = [TurnStats(**s) for s in state["stats"]]
            chat._ids = [int(t) for t in state["ids"]]
        except (KeyError, TypeError) as err:
            raise KVCacheError(
                f"{path} has a malformed conversation entry ({err}); the file is damaged") from err
        with torch.inference_mode():
            persist.restore_cache(chat.cache, tensors)
        seen = chat.cache.get_seq_length()
        if not 0 <= len(chat._ids) - seen <= 1:
            raise KVCacheError(
                f"{path} is inconsistent: its cache has seen {seen} tokens but its history holds "
                f"{len(chat._ids)}; the file is damaged"
            )
        return chat

    # ----- internals ---------------------------------------------------------------------------------
    def _new_cache(self) -> KVCache:
        param = next(self.model.parameters())
        return KVCache.from_spec(self.spec, self.model.config, batch_size=1, max_cache_len=self.max_cache_len,
                                 device=param.device, dtype=param.dtype)

    def _encode(self, text: str) -> list[int]:
        special = self.format.special_first and not self._ids
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _read_system(self, text: str) -> None:
        result, _ = self._run(self._encode(self.format.system(text)), 1, None, role="system", reply=False)
        self.messages.append({"role": "system", "content": text})

    def _run(self, new_ids: list[int], max_new_tokens: int, on_text: Callable[[str], None] | None, *,
             role: str, reply: bool = True) -> tuple[GenerationResult, TokenRecorder]:
        """Feed the unread tokens and ``new_ids`` on top of the cache, then decode (``reply=False``: read
        only, the sampled token is dropped)."""
        cache, device = self.cache, next(self.model.parameters()).device
        seen = cache.get_seq_length()
        feed = self._ids[seen:] + new_ids
        if not feed:
            raise ValueError("nothing to read: the message formats to no tokens")
        recorder = TokenRecorder(self.tokenizer, self._eos, self.stop, on_text)
        step = TorchStep(self.model, cache, 1, max_columns=seen + len(feed) + max_new_tokens, start=seen)
        hooks, attention = None, contextlib.nullcontext()
        turn_seed = None if self.seed is None else self.seed + len(self.stats)
        if cache.policy is not None:
            cache.policy.start(prompt_lengths=torch.tensor([seen + len(feed)]), max_new_tokens=max_new_tokens,
                               seed=turn_seed, prefill_chunks=-(-len(feed) // self.prefill_chunk_size))
            hooks, attention = cache.policy.hooks(), enable(self.model)
        try:
            with torch.inference_mode(), attention:
                result = decode(step, cache, torch.tensor([feed], device=device),
                                torch.ones(1, len(feed), dtype=torch.long, device=device),
                                max_new_tokens=max_new_tokens, sampler=self.sampler,
                                generator=make_generator(turn_seed, device), checker=recorder,
                                pad_id=self._pad,
                                prefill_chunk_size=self.prefill_chunk_size, spec=self.spec, hooks=hooks,
                                progress=False, start=torch.tensor([seen]))
        except BaseException:
            self._recover(seen, feed, recorder.tokens)
            raise
        generated = result.token_ids[0] if reply else []
        self._ids = self._ids[:seen] + feed + generated
        stats = result.stats
        self.stats.append(TurnStats(
            role=role, tokens_read=len(feed) + stats.decode_steps, new_tokens=len(generated),
            tokens_seen=cache.get_seq_length(), tokens_held=max(s.physical_length for s in cache.stores),
            cache_bytes=cache.nbytes(), prefill_seconds=stats.prefill_seconds,
            decode_seconds=stats.decode_seconds))
        return result, recorder

    def _recover(self, seen: int, feed: list[int], generated: list[int]) -> None:
        """After an interrupted turn, keep the history in line with what the cache read; a forward cut
        between layers leaves layers that disagree, and the conversation is then started afresh."""
        counts = {s.seen for s in self.cache.stores}
        now = self.cache.get_seq_length()
        if len(counts) != 1 or now < seen:
            self.cache.reset()
            self.messages, self._ids = [], []
            return
        if now == seen:
            return  # nothing was read (a refused turn): the history stands as it was
        self._ids = self._ids[:seen] + (feed + generated)[: now - seen]
