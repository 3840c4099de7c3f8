"""A character-level tokenizer built offline, for tests and examples with random models.

Nothing is downloaded or trained: the vocabulary is fixed (four special tokens, then printable ASCII plus
newline and tab, one token per character), so ids are stable across machines. Its ids fit the default
``vocab_size=128`` of :func:`kvcache.models.random.random_model`, and its special-token ids match the ids
that :func:`~kvcache.models.random.random_config` sets (pad 0, bos 1, eos 2).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

#: special tokens, in id order: pad=0, bos=1, eos=2, unk=3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")

#: every character the tokenizer knows, after the special tokens
CHARACTERS: str = string.printable[:95] + "\n\t"

#: number of ids the tokenizer uses (a model for it needs ``vocab_size >= TINY_VOCAB_SIZE``)
TINY_VOCAB_SIZE: int = len(SPECIAL_TOKENS) + len(CHARACTERS)


def tiny_tokenizer(*, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    Parameters
    ----------
    add_bos:
        Prepend ``<s>`` to every encoded text (as Llama-style tokenizers do).

    Returns
    -------
    PreTrainedTokenizerFast
        A fast tokenizer with pad/bos/eos/unk set; ``save_pretrained`` writes a directory that
        ``AutoTokenizer.from_pretrained`` loads back. Unknown characters map to ``<unk>``.
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
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
