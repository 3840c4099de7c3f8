"""One ``key=value`` parameter of a cache-spec part: its type, default, constraint and how it is printed.

Declared once, where the thing it configures is defined (a policy declares its own), and read by the spec
parser, ``kvcache info`` and the generated reference in docs/spec.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

__all__ = ["ParamInfo", "fmt_float", "format_value"]


@dataclass(frozen=True)
class ParamInfo:
    """One ``key=value`` parameter of a spec part.

    ``type`` is ``"int"``, ``"float"`` or ``"range"`` (two floats written ``START-END``). ``check`` tells
    whether a typed value is allowed; ``constraint`` says the same in words for error messages and docs.
    """

    name: str
    type: Literal["int", "float", "range"]
    default: Any
    constraint: str
    check: Callable[[Any], bool]
    description: str


def fmt_float(x: float) -> str:
    """Shortest round-tripping text of ``x``, never in exponent form ("1e-05" is ambiguous in ranges)."""
    text = repr(float(x))
    if "e" in text:  # repr's digits are the shortest that round-trip; only the notation changes
        text = format(Decimal(text), "f")
    return text if "." in text else text + ".0"


def format_value(param: ParamInfo, value: Any) -> str:
    """The canonical text of a parameter value (as it appears after ``key=``)."""
    if param.type == "int":
        return str(value)
    if param.type == "float":
        return fmt_float(value)
    return f"{fmt_float(value[0])}-{fmt_float(value[1])}"
