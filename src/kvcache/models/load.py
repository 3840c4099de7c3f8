"""Loading a model and its tokenizer by name: the bundled default, a local directory, or a hub id."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from kvcache import validate
from kvcache.errors import KVCacheError

#: where the bundled default model lives (config.json, model.safetensors or shards + index, tokenizer.json)
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "default"

# "name" or "owner/name" as the Hugging Face Hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def load(
    name_or_path: str | os.PathLike[str] = "default",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Parameters
    ----------
    name_or_path:
        ``"default"`` for the model bundled with kvcache; a local directory holding a Hugging Face
        checkpoint (``config.json``, weights, tokenizer files); or a Hugging Face Hub id such as
        ``"Qwen/Qwen2-0.5B"`` (downloaded by ``transformers`` on first use, needs network then).
    device:
        Where to put the model (default: CPU).
    dtype:
        ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"float16"``); default: the
        checkpoint's own dtype.

    Returns
    -------
    model, tokenizer
        ``AutoModelForCausalLM`` and ``AutoTokenizer`` instances.

    Raises
    ------
    KVCacheError
        The default model is not installed, the path does not exist or is not a checkpoint, or a hub
        model is not in the local cache while offline. The message says how to fix it.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise KVCacheError(f"name_or_path must be 'default', a model directory or a Hugging Face Hub id, got "
                           f"{type(name_or_path).__name__}")
    torch_dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    text = os.fspath(name_or_path)
    if not isinstance(text, str) or not text.strip():
        raise KVCacheError("the model name is empty; give 'default', a model directory or a Hub id")
    if text == "default":
        path = _default_dir()
        return _from_pretrained(str(path), device, torch_dtype, local=True)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise KVCacheError(
                f"{text!r} is not a model directory (no config.json in it); pass a directory saved with "
                "model.save_pretrained() and tokenizer.save_pretrained(), or a Hugging Face Hub id"
            )
        return _from_pretrained(str(path), device, torch_dtype, local=True)
    if not _HUB_ID.fullmatch(text) or text.startswith((".", "~")):
        raise KVCacheError(
            f"model path {text!r} does not exist; pass an existing directory, a Hugging Face Hub id "
            "such as 'owner/name', or 'default' for the bundled model"
        )
    return _from_pretrained(text, device, torch_dtype, local=False)


def _default_dir() -> Path:
    """The bundled model directory, or a clear error when it is not installed."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise KVCacheError(
            f"the bundled default model is not installed (no config.json in {DEFAULT_MODEL_DIR}); "
            "pass --model with a local model directory or a Hugging Face Hub id instead"
        )
    return DEFAULT_MODEL_DIR


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    """Parse and check the device up front: a bad one fails before the (slow) model load."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise KVCacheError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KVCacheError(f"device {device!r} asked for, but this torch build or machine has no CUDA; "
                           "use --device cpu or install a CUDA build of torch")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise KVCacheError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return resolved


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise KVCacheError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}")
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise KVCacheError(f"unknown dtype {dtype!r}; choose one of: float32, bfloat16, float16")
    return _DTYPES[key]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves: a fast offline probe (the hub client retries for ~25 s)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _from_pretrained(source: str, device: torch.device | None, dtype: torch.dtype | None,
                     *, local: bool) -> tuple[Any, Any]:
    if local:
        _check_local_config(source)
        try:
            model, tokenizer = _auto_load(source, dtype, local_files_only=True)
        except OSError as err:
            raise KVCacheError(f"could not load the model in {source!r}: {_first_line(err)}") from err
        except SafetensorError as err:
            raise KVCacheError(f"the weights in {source!r} are corrupt or truncated ({_first_line(err)}); "
                               "save or download the model again") from err
    else:
        try:
            # The local Hugging Face cache first: no network needed for a model used before.
            model, tokenizer = _auto_load(source, dtype, local_files_only=True)
        except OSError as cached_err:
            if _offline() or not _hub_reachable():
                why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub cannot be reached"
                fix = "unset HF_HUB_OFFLINE and download it once" if _offline() else "download it once"
                raise KVCacheError(
                    f"model {source!r} is not in the local Hugging Face cache and {why}; {fix} with "
                    "network access, or pass a local model directory"
                ) from cached_err
            try:
                model, tokenizer = _auto_load(source, dtype, local_files_only=False)
            except OSError as err:
                raise KVCacheError(
                    f"could not download model {source!r} from the Hugging Face Hub: {_first_line(err)}; "
                    "check the id (and access token for gated models), or pass a local model directory"
                ) from err
    validate.check_decoder(model.config)  # hub models too (local ones were checked before loading)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def _check_local_config(source: str) -> None:
    """Read a local ``config.json`` first: a broken one, or a model that is not a decoder, is refused before
    any weight is read (an encoder such as BERT would otherwise load with a warning and generate garbage)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KVCacheError(f"cannot read the config of {source!r}: {_first_line(err)}") from err
    validate.check_decoder(config)


def _auto_load(source: str, dtype: torch.dtype | None, *, local_files_only: bool) -> tuple[Any, Any]:
    # Imported here so that `import kvcache` stays light for the CLI's fast paths.
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(source, local_files_only=local_files_only)
    extra: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_files_only, **extra)
    return model, tokenizer


def load_tokenizer(source: str | os.PathLike[str], *, local_files_only: bool = True) -> Any:
    """Load the tokenizer of a model directory or hub id.

    ``AutoTokenizer`` replaces a saved ``tokenizer_class`` of ``PreTrainedTokenizerFast`` by the model
    type's own class for some architectures (qwen2 gets ``Qwen2Tokenizer``, which rebuilds its own
    byte-level pipeline around the vocabulary). A local directory that names ``PreTrainedTokenizerFast``
    and has a ``tokenizer.json`` is therefore loaded with that class, exactly as saved.

    Parameters
    ----------
    source:
        Local directory or Hugging Face Hub id.
    local_files_only:
        Passed on to ``from_pretrained``.

    Returns
    -------
    The tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(source)
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file() and (directory / "tokenizer.json").is_file():
        try:
            declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            declared = None  # AutoTokenizer below reports a broken config in its own words
        if declared == "PreTrainedTokenizerFast":
            return PreTrainedTokenizerFast.from_pretrained(str(source), local_files_only=local_files_only)
    return AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    # transformers' unknown-model-type error lists every config class (kilobytes) on its first line
    return line if len(line) <= 300 else line[:300] + "..."
