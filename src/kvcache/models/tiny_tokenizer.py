"""A character-level tokenizer built offline, for tests and examples with random models.

Nothing is downloaded or trained: the vocabulary is fixed (four special tokens, then printable ASCII plus
newline and tab, one token per character), so ids are stable across machines. Its ids fit the default
``vocab_size=128`` of :func:`kvcache.models.random.random_model`, and its special-token ids match the ids
that :func:`~kvcache.models.random.random_config` sets (pad 0, bos 1, eos 2).

Saved with ``save_pretrained``, its ``tokenizer_config.json`` names ``PreTrainedTokenizerFast``: the class
transformers would write (``TokenizersBackend``) lets ``AutoTokenizer`` pick the model type's own tokenizer
for some architectures (qwen2 gives ``Qwen2Tokenizer``, which rebuilds a byte-level pipeline and drops the
spaces). :func:`kvcache.models.load.load_tokenizer` honours that name.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from kvcache.files import atomic_write

#: special tokens, in id order: pad=0, bos=1, eos=2, unk=3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")

#: every character the tokenizer knows, after the special tokens
CHARACTERS: str = string.printable[:95] + "\n\t"

#: the class written into ``tokenizer_config.json``: "load tokenizer.json as it is"
SAVED_TOKENIZER_CLASS: str = "PreTrainedTokenizerFast"

#: number of ids the tokenizer uses (a model for it needs ``vocab_size >= TINY_VOCAB_SIZE``)
TINY_VOCAB_SIZE: int = len(SPECIAL_TOKENS) + len(CHARACTERS)


class TinyTokenizer(PreTrainedTokenizerFast):
    """A fast tokenizer whose saved config names :data:`SAVED_TOKENIZER_CLASS`, not its own class."""

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        """Save as :class:`PreTrainedTokenizerFast` does, then name the generic class in the config."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = Path(save_directory) / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = SAVED_TOKENIZER_CLASS
        with atomic_write(config_file) as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                           encoding="utf-8")
        return files


def tiny_tokenizer(*, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    Parameters
    ----------
    add_bos:
        Prepend ``<s>`` to every encoded text (as Llama-style tokenizers do).

    Returns
    -------
    PreTrainedTokenizerFast
        A fast tokenizer (:class:`TinyTokenizer`) with pad/bos/eos/unk set; ``save_pretrained`` writes a
        directory that :func:`kvcache.models.load.load_tokenizer` (and ``PreTrainedTokenizerFast``) load back
        as it was. Unknown characters map to ``<unk>``.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character: split on every character and keep each piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Characters are glued back together without the spaces WordLevel would put between tokens.
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return TinyTokenizer(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
