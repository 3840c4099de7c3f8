"""The command line's error boundary: every failure becomes one line on stderr and an exit code.

=====  ===================================================================================================
code   meaning
=====  ===================================================================================================
0      success
1      a runtime failure: out of memory, a full disk, ``kvcache onnx check`` finding a mismatch, a bug
2      bad input: an option, a path, a file that is not what it should be (also click's usage errors)
130    interrupted (Ctrl-C)
=====  ===================================================================================================

``kvcache --debug CMD ...`` (or ``KVCACHE_DEBUG=1``) prints the traceback before the line. Only ``typer``
and ``click`` are imported at module level; the libraries whose errors are recognised (torch, safetensors,
onnx, ONNX Runtime) are looked up by their exception's module, so the CLI's fast paths stay light.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

#: longest error line printed; the rest is cut (``--debug`` shows the whole exception)
MAX_MESSAGE = 400
#: exit codes (see the module docstring)
EXIT_RUNTIME, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130

#: OSError numbers that describe the user's paths (bad input) rather than the machine (runtime)
_PATH_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EISDIR,
                          errno.ENOTDIR, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY,
                          errno.EXDEV, errno.EINVAL})
#: ONNX Runtime exception names that mean the graph or its inputs are wrong
_ORT_BAD_INPUT = frozenset({"InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile",
                            "NotImplemented"})

F = TypeVar("F", bound=Callable[..., Any])


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` with its whitespace collapsed to single spaces, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit]}... ({len(flat) - limit} more characters; --debug shows all)"


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def classify(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that reached the CLI."""
    from kvcache.errors import KVCacheError

    module = type(exc).__module__ or ""
    name = type(exc).__name__
    text = str(exc) or name
    if isinstance(exc, KVCacheError):
        return EXIT_BAD_INPUT, text
    if _is_out_of_memory(exc):
        return EXIT_RUNTIME, (f"out of memory: {text}; use a smaller model, fewer new tokens, a smaller or "
                              "quantized cache (int4), or a retention policy (h2o:budget=0.25)")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        reason = exc.strerror or text
        if exc.errno in _PATH_ERRNOS:
            return EXIT_BAD_INPUT, f"{where}{reason}; check the path and its permissions"
        return EXIT_RUNTIME, f"{where}{reason}"
    if module.startswith("safetensors") or name == "SafetensorError":
        return EXIT_BAD_INPUT, f"a weights file is corrupt or truncated ({text}); save or download it again"
    if module.startswith("google.protobuf") or name == "DecodeError":
        return EXIT_BAD_INPUT, f"not a readable ONNX/protobuf file ({text})"
    if module.startswith("onnxruntime"):
        code = EXIT_BAD_INPUT if name in _ORT_BAD_INPUT else EXIT_RUNTIME
        return code, f"ONNX Runtime: {text}"
    if module.startswith("onnx") and name == "ValidationError":
        return EXIT_BAD_INPUT, f"invalid ONNX graph: {text}"
    if isinstance(exc, (ValueError, UnicodeError)):
        return EXIT_BAD_INPUT, text
    return EXIT_RUNTIME, (f"internal error ({name}: {text}); this is a bug in kvcache or a library it "
                          "uses: rerun with --debug and report the traceback")


def debug_enabled() -> bool:
    """``--debug`` given to the root command, or ``KVCACHE_DEBUG`` set to a true value."""
    if os.environ.get("KVCACHE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    ctx = _current_context()
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def _current_context() -> Any:
    """The running command's click context, from the click typer uses (recent typers vendor their own)."""
    click_core = typer.Context.__mro__[1].__module__  # "click.core" or "typer._click.core"
    package = click_core.rsplit(".", 1)[0]
    try:
        return importlib.import_module(f"{package}.globals").get_current_context(silent=True)
    except (ImportError, AttributeError):
        return None


def guarded(command: F) -> F:
    """Wrap a CLI command in the error boundary: exceptions become one line and an exit code.

    ``typer.Exit``/``click`` exceptions pass through (they already are exits); everything else is
    classified by :func:`classify`.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # the boundary: every other failure is reported, none escapes as a traceback
            if hasattr(exc, "exit_code") and hasattr(exc, "show"):
                raise  # a click usage error (typer.BadParameter, ...): click prints it the usual way
            code, message = classify(exc)
            if debug_enabled():
                traceback.print_exc()
            typer.echo(f"error: {one_line(message)}", err=True)
            raise typer.Exit(code) from exc

    return wrapper  # type: ignore[return-value]
