"""Checks of user input that run before anything heavy: argument types and ranges, the model, the prompts.

Every check raises a :class:`~kvcache.errors.KVCacheError` (a ``ValueError``) whose message names the
argument, what was given and what is accepted, so the API and the CLI report bad input the same way. The
checks are plain functions called at the top of the public entry points; they hold no state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from kvcache.errors import KVCacheError

#: config fields (after the config's own ``attribute_map``) a decoder needs for kvcache to size its cache
REQUIRED_CONFIG_FIELDS: tuple[str, ...] = ("num_hidden_layers", "num_attention_heads", "hidden_size")

#: the largest seed torch accepts (``torch.Generator.manual_seed`` takes a 64-bit value)
SEED_RANGE: tuple[int, int] = (-(2**63), 2**64 - 1)


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message never echoes a huge argument back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` when it is a whole number within ``[minimum, maximum]``.

    ``bool`` and floats (even ``3.0``) are refused: a float count is almost always a units mistake.

    Raises
    ------
    KVCacheError
        Naming ``name``, the value given and the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise KVCacheError(f"{name} must be an integer, got {_shown(value)} ({type(value).__name__})")
    number = int(value)
    low = "" if minimum is None else f">= {minimum}"
    high = "" if maximum is None else f"<= {maximum}"
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        accepted = " and ".join(x for x in (low, high) if x)
        raise KVCacheError(f"{name} must be an integer {accepted}, got {number}")
    return number


def check_real(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
               exclusive_minimum: bool = False) -> float:
    """``value`` as a finite ``float`` within the given bounds (NaN and infinities are refused).

    Raises
    ------
    KVCacheError
        Naming ``name``, the value given and the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise KVCacheError(f"{name} must be a number, got {_shown(value)} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise KVCacheError(f"{name} must be a finite number, got {number}")
    too_low = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    if too_low or (maximum is not None and number > maximum):
        low = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum:g}"
        high = "" if maximum is None else f"<= {maximum:g}"
        raise KVCacheError(f"{name} must be {' and '.join(x for x in (low, high) if x)}, got {number:g}")
    return number


def check_seed(seed: Any) -> int | None:
    """``seed`` when ``None`` or an integer torch can seed a generator with."""
    if seed is None:
        return None
    return check_int("seed", seed, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])


def check_text(name: str, text: str) -> str:
    """``text`` when it can be encoded as UTF-8 (a tokenizer cannot take lone surrogates).

    Bytes that are not UTF-8 on a command line reach Python as lone surrogates (``surrogateescape``).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KVCacheError(
            f"{name} is not valid UTF-8 text (character {exc.start} is {text[exc.start]!r}, a byte that is "
            "not UTF-8); pass the text in UTF-8 (e.g. convert it with iconv)") from None
    return text


def check_prompts(prompts: Any) -> list[str]:
    """The prompts as a non-empty list of UTF-8-encodable strings.

    Raises
    ------
    KVCacheError
        For another type, an empty list, or text that is not valid Unicode.
    """
    if isinstance(prompts, str):
        prompt_list = [prompts]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        prompt_list = list(prompts)
    else:
        raise KVCacheError(f"prompts must be a string or a non-empty list of strings, got "
                           f"{type(prompts).__name__}" + (" (decode bytes to str first)"
                                                          if isinstance(prompts, (bytes, bytearray)) else ""))
    if not prompt_list:
        raise KVCacheError("prompts is an empty list; give at least one prompt")
    for i, prompt in enumerate(prompt_list):
        if not isinstance(prompt, str):
            raise KVCacheError(f"prompt {i} must be a string, got {_shown(prompt)} ({type(prompt).__name__})")
        check_text(f"prompt {i}" if len(prompt_list) > 1 else "the prompt", prompt)
    return prompt_list


def generate_arguments(prompts: Any, max_new_tokens: Any, prefill_chunk_size: Any) -> list[str]:
    """Check the arguments every ``generate`` takes; return the prompts as a list."""
    prompt_list = check_prompts(prompts)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("prefill_chunk_size", prefill_chunk_size, minimum=1)
    return prompt_list


def check_config(config: Any, what: str = "the model's config") -> None:
    """A ``PretrainedConfig`` of a decoder with the fields kvcache sizes its cache from.

    Raises
    ------
    KVCacheError
        For something that is not a config, a config lacking layer/head/hidden sizes, or a model that is
        not a decoder (see :func:`check_decoder`).
    """
    from transformers import PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        raise KVCacheError(f"{what} must be a transformers PretrainedConfig (model.config), got "
                           f"{type(config).__name__}")
    text = config.get_text_config(decoder=True)
    missing = [f for f in REQUIRED_CONFIG_FIELDS if getattr(text, f, None) is None]
    if missing:
        raise KVCacheError(f"{what} ({type(config).__name__}) lacks {', '.join(missing)}; pass the config "
                           "of a decoder model (AutoConfig.from_pretrained of its directory)")
    check_decoder(config)


def is_decoder(config: Any) -> bool:
    """Whether ``config`` describes a decoder-only model that generates text left to right.

    Encoder-decoder models (T5, BART) and encoders (BERT, RoBERTa, ...: the model types with a masked-LM
    head) are not, unless the config itself declares ``is_decoder``.
    """
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_decoder(config: Any) -> None:
    """Refuse models that are not decoders (see :func:`is_decoder`): their "generation" would be garbage."""
    if not is_decoder(config):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder"
        raise KVCacheError(
            f"{getattr(config, 'model_type', type(config).__name__)} is {kind} model, not a decoder: kvcache "
            "generates with decoder-only (causal) language models such as Llama, Qwen2 or GPT-2")


def check_model(model: Any, tokenizer: Any) -> None:
    """``model`` is a loaded decoder LM (a ``torch.nn.Module`` with a config) and ``tokenizer`` callable."""
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise KVCacheError(f"model must be a transformers causal LM (from kvcache.models.load or "
                           f"AutoModelForCausalLM), got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise KVCacheError("model has no parameters; pass a loaded causal LM")
    check_config(model.config)
    if not callable(tokenizer):
        raise KVCacheError(f"tokenizer must be the model's tokenizer (AutoTokenizer), got "
                           f"{type(tokenizer).__name__}")


def check_device(device: Any) -> None:
    """A device torch can parse and that this machine has (``None`` is the default, CPU)."""
    import torch

    if device is None:
        return
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise KVCacheError(f"unknown device {_shown(device)}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KVCacheError(f"device {device!r} asked for, but this torch build or machine has no CUDA; use "
                           "'cpu' or install a CUDA build of torch")


def check_cache_arguments(config: Any, batch_size: Any, max_cache_len: Any, device: Any) -> None:
    """The arguments of ``KVCache.from_spec`` other than the spec."""
    check_config(config)
    check_int("batch_size", batch_size, minimum=1)
    if max_cache_len is not None:
        check_int("max_cache_len", max_cache_len, minimum=1)
    check_device(device)
