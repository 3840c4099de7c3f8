"""The cache spec string: one grammar for the CLI, the API and the benchmarks.

Grammar (see ``docs/spec.md``)::

    SPEC := PART ("+" PART)*                      at most one part of each kind
    PART := NAME [":" KEY "=" VALUE ("," KEY "=" VALUE)*]

Kinds: a *layout* (``dynamic`` default, ``static``), a *precision* (``quantized`` / ``int2`` ``int4``
``int8``), a *placement* (``offload``) and a retention *policy* (``full`` default, ``keyformer``, ``h2o``,
``streaming``, ``snapkv``, ``tova``, ``knorm``). Names and keys are case-insensitive and whitespace around
tokens is ignored. Hugging Face ``cache_implementation`` names are accepted as aliases.

``str(CacheSpec.parse(s))`` is canonical: parts in the order policy, layout, precision, placement (what
is kept, then how it is stored: ``h2o:budget=0.25+static:capacity=4096+int4+offload``); the
default layout (``dynamic``) and policy (``full``) are left out unless the whole spec is the default;
parameters at their default are left out, except a policy's budget, which is always shown because it is
the number people compare.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from kvcache.errors import KVCacheError, UnsupportedSpecError
from kvcache.support import (
    ALIASES,
    KINDS,
    REGISTRY,
    SHORTHANDS,
    KindInfo,
    ParamInfo,
    describe_kinds,
    format_value,
)

__all__ = [
    "ALIASES",
    "KINDS",
    "REGISTRY",
    "CacheSpec",
    "SpecError",
    "SpecPart",
    "describe_kinds",
]

_PLURAL = {"layout": "layouts", "precision": "precisions", "placement": "placements", "policy": "policies"}
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_INT_RE = re.compile(r"[0-9]+")
# No leading sign (every float parameter is positive) and no "+" in exponents ("+" separates parts).
_FLOAT_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e-?[0-9]+)?")


class SpecError(KVCacheError):
    """A cache spec string that does not follow the grammar or has an invalid value.

    Attributes
    ----------
    part:
        The offending part of the spec as the user wrote it (stripped), or the whole spec.
    """

    def __init__(self, message: str, part: str) -> None:
        super().__init__(message)
        self.part = part


class _Params(Mapping[str, Any]):
    """Read-only, hashable parameter mapping (so specs can be dict keys and set members)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    def __repr__(self) -> str:
        return repr(self._data)


def _parse_float(text: str) -> float | None:
    return float(text) if _FLOAT_RE.fullmatch(text) else None


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_value(param: ParamInfo, text: str) -> Any:
    """Convert ``text`` to the parameter's type, or raise ValueError saying what is expected."""
    t = text.strip().lower()
    if param.type == "int":
        if not _INT_RE.fullmatch(t):
            raise ValueError(f"{param.name} must be a whole number ({param.constraint}), got {text!r}")
        return int(t)
    if param.type == "float":
        v = _parse_float(t)
        if v is None:
            what = param.constraint if _looks_numeric(t) else f"a number ({param.constraint})"
            raise ValueError(f"{param.name} must be {what}, got {text!r}")
        return v
    # Float range "a-b", or a single number meaning a constant (a == b). Exponents such as "1e-5" also
    # contain "-", so try every split and keep the one where both sides are numbers.
    single = _parse_float(t)
    if single is not None:
        return (single, single)
    for m in re.finditer("-", t):
        lo, hi = _parse_float(t[: m.start()]), _parse_float(t[m.end() :])
        if lo is not None and hi is not None:
            return (lo, hi)
    raise ValueError(f"{param.name} must be a number or a range START-END ({param.constraint}), got {text!r}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(param: ParamInfo, value: Any) -> None:
    """Check a typed value against the parameter's type and constraint (raises ValueError)."""
    if param.type == "int":
        ok_type = isinstance(value, Integral) and not isinstance(value, bool)
    elif param.type == "float":
        ok_type = _is_finite_number(value)
    else:
        ok_type = isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_finite_number, value))
    if not ok_type or not param.check(value):
        shown = format_value(param, value) if ok_type else repr(value)
        raise ValueError(f"{param.name} must be {param.constraint}, got {shown}")


def _normalize(param: ParamInfo, value: Any) -> Any:
    if param.type == "float":
        return float(value)
    if param.type == "range":
        return (float(value[0]), float(value[1]))
    return int(value)  # numpy integers become plain ints so equality and hashing behave


@dataclass(frozen=True)
class SpecPart:
    """One part of a cache spec.

    Attributes
    ----------
    kind:
        ``"layout"``, ``"precision"``, ``"placement"`` or ``"policy"``.
    name:
        Canonical name (``dynamic static quantized offload full keyformer h2o streaming snapkv tova knorm``).
    params:
        Read-only mapping with EVERY parameter of the kind, defaults filled in, e.g.
        ``{"bits": 4, "group": 64, "residual": 128}``. Policies hold ``budget`` (fraction of the prompt)
        and ``tokens`` (absolute cap); exactly one of the two is not None. Keyformer's ``tau`` is a
        ``(tau_init, tau_end)`` tuple.

    Constructing a ``SpecPart`` directly validates it and fills defaults, like parsing does.
    """

    kind: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        info = REGISTRY.get(self.name)
        if info is None:
            raise SpecError(
                f"unknown cache part name {self.name!r}; valid names: {', '.join(REGISTRY)}", self.name
            )
        if info.kind != self.kind:
            raise SpecError(f"{self.name!r} is a {info.kind}, not a {self.kind}", self.name)
        try:
            filled = _fill_params(info, dict(self.params))
        except ValueError as exc:
            raise SpecError(f"invalid {self.name!r}: {exc}", self.name) from None
        object.__setattr__(self, "params", _Params(filled))

    def __str__(self) -> str:
        info = REGISTRY[self.name]
        name = self.name
        shown: list[str] = []
        if self.name == "quantized":
            name = f"int{self.params['bits']}"  # the shorthand already carries bits
        for p in info.params:
            value = self.params[p.name]
            if value is None or p.name == "bits":
                continue
            if value != p.default or (info.kind == "policy" and p.name in ("budget", "tokens")):
                shown.append(f"{p.name}={format_value(p, value)}")
        return f"{name}:{','.join(shown)}" if shown else name


def _fill_params(info: KindInfo, given: dict[str, Any]) -> dict[str, Any]:
    """Validate ``given`` against ``info`` and return every parameter with defaults filled in."""
    known = {p.name: p for p in info.params}
    for key in given:
        if key not in known:
            raise ValueError(_unknown_key_message(key, info))
    out: dict[str, Any] = {}
    for name, p in known.items():
        if name in given and given[name] is not None:
            _check_value(p, given[name])
            out[name] = _normalize(p, given[name])
        else:
            out[name] = p.default
    if info.kind == "policy" and "budget" in known:
        if given.get("budget") is not None and given.get("tokens") is not None:
            raise ValueError("give either budget (fraction of the prompt) or tokens (absolute cap), not both")
        if given.get("tokens") is not None:
            out["budget"] = None  # an absolute cap replaces the default fraction
            if given.get("min_tokens") is not None:
                raise ValueError("min_tokens is a floor under a fractional budget; with tokens=N (an "
                                 "absolute cap) leave it out")
    if info.validate is not None:
        info.validate(out)
    return out


def _unknown_key_message(key: str, info: KindInfo) -> str:
    valid = [p.name for p in info.params]
    if not valid:
        return f"{info.name!r} takes no parameters, got {key!r}; write just {info.name!r}"
    return f"unknown key {key!r} for {info.name!r}{_did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _valid_names_text() -> str:
    groups = [f"{_PLURAL[kind]}: {_names_of(kind)}" for kind in KINDS]
    groups.append(f"shorthands: {', '.join(SHORTHANDS)}")
    groups.append(f"aliases: {', '.join(ALIASES)}")
    return "; ".join(groups)


def _parse_part(raw: str) -> list[SpecPart]:
    """Parse one ``NAME[:K=V,...]`` part; aliases may expand to two parts (``offloaded_static``)."""
    part = raw.strip()
    if not part:
        raise ValueError("empty part (two '+' in a row, or a '+' at the start or end)")
    name_text, colon, rest = part.partition(":")
    name = name_text.strip().lower()
    if not _NAME_RE.fullmatch(name):
        hint = "; parameters follow the name after ':', as in h2o:budget=0.5" if "=" in name else ""
        raise ValueError(f"malformed name {name_text.strip()!r}: names are letters, digits and '_'{hint}")
    if colon and not rest.strip():
        raise ValueError(f"nothing after ':' in {part!r}; write {name!r} or {name}:KEY=VALUE")
    given: dict[str, str] = {}
    for item in rest.split(",") if colon else []:
        if not item.strip():
            raise ValueError("empty parameter (a stray ','); write KEY=VALUE pairs separated by ','")
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"malformed parameter {item.strip()!r}: expected KEY=VALUE, e.g. budget=0.5")
        key = key.lower()
        if not _NAME_RE.fullmatch(key):
            raise ValueError(f"malformed key {key!r}: keys are letters, digits and '_'")
        if key in given:
            raise ValueError(f"key {key!r} given twice")
        given[key] = value

    extra: list[SpecPart] = []
    preset: dict[str, Any] = {}
    if name in ALIASES:
        canonical, extra_names = ALIASES[name]
        extra = [SpecPart(REGISTRY[n].kind, n) for n in extra_names]
        name = canonical
    elif name in SHORTHANDS:
        canonical, preset = SHORTHANDS[name]
        if set(given) & set(preset):
            dup = sorted(set(given) & set(preset))[0]
            raise ValueError(
                f"{name!r} already sets {dup}={preset[dup]}; write quantized:{dup}=... or another shorthand"
            )
        name = canonical
    info = REGISTRY.get(name)
    if info is None:
        everything = [*REGISTRY, *SHORTHANDS, *ALIASES]
        raise ValueError(
            f"unknown name {name!r}{_did_you_mean(name, everything)}; valid: {_valid_names_text()}"
        )
    typed: dict[str, Any] = dict(preset)
    known = {p.name: p for p in info.params}
    for key, value in given.items():
        if key not in known:
            raise ValueError(_unknown_key_message(key, info))
        typed[key] = _parse_value(known[key], value)
    return [SpecPart(info.kind, name, _fill_params(info, typed)), *extra]


_DEFAULT_LAYOUT = SpecPart("layout", "dynamic")
_DEFAULT_POLICY = SpecPart("policy", "full")


@dataclass(frozen=True)
class CacheSpec:
    """A parsed, validated cache configuration: layout × precision × placement × retention policy.

    Build one with :meth:`parse`; ``CacheSpec()`` is the default (dynamic layout, full retention).
    Specs are immutable, hashable and compare by value; ``str()`` gives the canonical text.
    """

    layout: SpecPart = _DEFAULT_LAYOUT
    precision: SpecPart | None = None
    placement: SpecPart | None = None
    policy: SpecPart = _DEFAULT_POLICY

    def __post_init__(self) -> None:
        for kind in KINDS:
            part = getattr(self, kind)
            if part is None and kind in ("layout", "policy"):
                raise SpecError(f"a cache spec always has a {kind}", kind)
            if part is not None and (not isinstance(part, SpecPart) or part.kind != kind):
                raise SpecError(f"CacheSpec.{kind} must be a SpecPart of kind {kind!r}, got {part!r}", kind)
        _check_combination(self)

    @classmethod
    def parse(cls, text: str | CacheSpec) -> CacheSpec:
        """Parse a spec string such as ``"h2o:budget=0.25+int4"``; a ``CacheSpec`` is returned as is.

        Raises
        ------
        SpecError
            (a ``ValueError``) naming the offending part and the valid choices.
        """
        if isinstance(text, CacheSpec):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a cache spec is a string or a CacheSpec, got {type(text).__name__}")
        if not text.strip():
            raise SpecError("empty cache spec; use 'dynamic' for the default cache", text)
        found: dict[str, tuple[str, SpecPart]] = {}
        for raw in text.split("+"):
            try:
                parts = _parse_part(raw)
            except ValueError as exc:
                raise SpecError(
                    f"invalid cache spec {text!r}, part {raw.strip()!r}: {exc}", raw.strip()
                ) from None
            for part in parts:
                if part.kind in found:
                    first, plural = found[part.kind][0], _PLURAL[part.kind]
                    raise SpecError(
                        f"invalid cache spec {text!r}: two {plural}, {first!r} and {raw.strip()!r}; "
                        f"a spec has at most one {part.kind} ({_names_of(part.kind)})",
                        raw.strip(),
                    )
                found[part.kind] = (raw.strip(), part)
        return cls(**{kind: part for kind, (_, part) in found.items()})

    @property
    def parts(self) -> tuple[SpecPart, ...]:
        """The parts present, in canonical order (policy, layout, precision, placement)."""
        return tuple(p for p in (self.policy, self.layout, self.precision, self.placement) if p is not None)

    @property
    def is_default(self) -> bool:
        """True for the plain dynamic, full-precision, on-device, keep-everything cache."""
        return self == CacheSpec()

    def unavailable(self) -> list[str]:
        """Names of the parts that parse but are not built in this version (empty when all are)."""
        return [p.name for p in self.parts if not REGISTRY[p.name].available]

    def require_available(self) -> None:
        """Raise :class:`UnsupportedSpecError` if a part is not built in this version."""
        missing = self.unavailable()
        if missing:
            built = ", ".join(n for n, i in REGISTRY.items() if i.available)
            verb = "is" if len(missing) == 1 else "are"
            raise UnsupportedSpecError(
                f"cache spec {str(self)!r}: {', '.join(repr(m) for m in missing)} {verb} "
                f"not available yet in this version; available: {built}"
            )

    def __str__(self) -> str:
        shown = [p for p in self.parts if p != _DEFAULT_LAYOUT and p != _DEFAULT_POLICY]
        return "+".join(str(p) for p in shown) if shown else str(_DEFAULT_LAYOUT)


def _check_combination(spec: CacheSpec) -> None:
    """Cross-part rules: what each part's parameters mean for the others (see docs/spec.md, "Budgets")."""
    capacity = spec.layout.params.get("capacity")
    for name in ("tokens", "min_tokens"):
        tokens = spec.policy.params.get(name)
        if capacity is not None and tokens is not None and tokens > capacity:
            raise SpecError(
                f"{spec.policy.name}:{name}={tokens} keeps more tokens than static:capacity={capacity} can "
                f"hold; use capacity >= {tokens} or a smaller {name}",
                str(spec.policy),
            )


def _names_of(kind: str) -> str:
    return ", ".join(n for n, i in REGISTRY.items() if i.kind == kind)
