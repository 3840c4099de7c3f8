"""What this build of kvcache supports: every cache-spec name with its parameters, and the architectures.

This is the single source of truth for ``kvcache.spec`` (validation, defaults), ``kvcache info`` and
``docs/spec.md`` (a test checks the docs against :func:`describe_kinds`). A later release that builds a
layout or policy flips its ``available`` flag here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvcache.params import ParamInfo, format_value
from kvcache.policies import POLICIES

KINDS: tuple[str, ...] = ("layout", "precision", "placement", "policy")

#: Architectures whose PyTorch generation is tested against a no-cache recompute (tiny random models).
#: Any Hugging Face decoder whose attention goes through transformers' attention interface should work.
TESTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "gpt_neox")
ARCHITECTURE_NOTE = (
    "PyTorch generation: any Hugging Face decoder whose attention goes through transformers' "
    "attention interface; tested on the architectures listed."
)


@dataclass(frozen=True)
class KindInfo:
    """A spec name: its kind, parameters, a one-line description and whether it is built yet."""

    name: str
    kind: str
    description: str
    params: tuple[ParamInfo, ...] = ()
    available: bool = False
    #: cross-parameter check on the filled-in parameters; raises ValueError
    validate: Callable[[dict[str, Any]], None] | None = None


def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


_KIND_LIST: tuple[KindInfo, ...] = (
    KindInfo("dynamic", "layout", "growable full-precision store (the default)", available=True),
    KindInfo(
        "static",
        "layout",
        "preallocated fixed-capacity store, torch.compile-friendly",
        (
            ParamInfo(
                "capacity",
                "int",
                None,
                "a whole number >= 1",
                lambda v: v >= 1,
                "slots per layer; unset = max_cache_len given when the cache is built",
            ),
        ),
        available=True,
    ),
    KindInfo(
        "quantized",
        "precision",
        "group quantization of keys (per channel) and values (per token)",
        (
            ParamInfo("bits", "int", 4, "2, 4 or 8", lambda v: v in (2, 4, 8), "bits per stored value"),
            ParamInfo(
                "group",
                "int",
                64,
                "a power of two >= 1",
                _power_of_two,
                "values sharing one scale and zero point",
            ),
            ParamInfo(
                "residual",
                "int",
                128,
                "a whole number >= 0",
                lambda v: v >= 0,
                "most recent tokens kept in full precision before quantization",
            ),
        ),
        available=True,
    ),
    KindInfo("offload", "placement",
             "keep K/V in host memory, prefetch the next layer ahead of use (CPU: a pass-through)",
             available=True),
    KindInfo("full", "policy", "keep every token (the default)", available=True),
    # Each policy declares its own parameters (kvcache/policies/); the registry reads them from there.
    *(KindInfo(cls.name, "policy", cls.description, cls.params, available=True, validate=cls.validate)
      for cls in POLICIES.values()),
)

REGISTRY: Mapping[str, KindInfo] = {k.name: k for k in _KIND_LIST}

#: Shorthand name -> (canonical name, parameters it fixes).
SHORTHANDS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "int2": ("quantized", {"bits": 2}),
    "int4": ("quantized", {"bits": 4}),
    "int8": ("quantized", {"bits": 8}),
}

#: Hugging Face ``cache_implementation`` names -> (canonical name, extra canonical parts it implies).
#: ``dynamic``, ``static`` and ``quantized`` are canonical names already. Parameters written after an alias
#: go to the first part (``offloaded_static:capacity=4096``).
ALIASES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "offloaded": ("offload", ()),
    "offloaded_static": ("static", ("offload",)),
}


def describe_kinds() -> list[dict[str, Any]]:
    """Everything ``kvcache info`` shows, JSON-ready: one dict per name, in registry order.

    Returns
    -------
    list of dict
        Keys: ``name``, ``kind``, ``description``, ``available`` (bool), ``params`` (list of dicts with
        ``name``, ``type``, ``default`` (JSON value, ``None`` when unset), ``default_text``, ``constraint``,
        ``description``) and ``aliases`` (other names that select it).
    """
    aliases: dict[str, list[str]] = {}
    for short, (canonical, _) in SHORTHANDS.items():
        aliases.setdefault(canonical, []).append(short)
    for alias, (canonical, _) in ALIASES.items():
        aliases.setdefault(canonical, []).append(alias)
    out = []
    for info in _KIND_LIST:
        params = [
            {
                "name": p.name,
                "type": p.type,
                "default": list(p.default) if isinstance(p.default, tuple) else p.default,
                "default_text": "unset" if p.default is None else format_value(p, p.default),
                "constraint": p.constraint,
                "description": p.description,
            }
            for p in info.params
        ]
        out.append(
            {
                "name": info.name,
                "kind": info.kind,
                "description": info.description,
                "available": info.available,
                "params": params,
                "aliases": aliases.get(info.name, []),
            }
        )
    return out


def _expansion(canonical: str, extra: tuple[str, ...]) -> str:
    return "+".join((canonical, *extra))


def info_dict() -> dict[str, Any]:
    """What ``kvcache info --json`` prints: spec names and parameters, aliases and supported architectures."""
    return {
        "spec_grammar": 'SPEC := PART ("+" PART)*, at most one part of each kind; '
        'PART := NAME [":" KEY "=" VALUE ("," KEY "=" VALUE)*]',
        "kinds": describe_kinds(),
        "shorthands": {
            short: f"{canonical}:" + ",".join(f"{k}={v}" for k, v in fixed.items())
            for short, (canonical, fixed) in SHORTHANDS.items()
        },
        "aliases": {a: _expansion(c, extra) for a, (c, extra) in ALIASES.items()},
        "architectures": {"pytorch": {"tested": list(TESTED_ARCHITECTURES), "note": ARCHITECTURE_NOTE}},
    }


def print_info(console: Any | None = None) -> None:
    """Print :func:`info_dict` as rich tables: one per kind, then aliases and architectures."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    data = info_dict()
    for kind in KINDS:
        table = Table(title=f"{kind}s" if kind != "policy" else "policies", title_justify="left")
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("parameters (default)")
        table.add_column("description")
        table.add_column("available", no_wrap=True)
        for k in data["kinds"]:
            if k["kind"] != kind:
                continue
            # Ranges are left to --json and docs/spec.md so the table fits a terminal.
            params = "\n".join(f"{p['name']}={p['default_text']}" for p in k["params"])
            table.add_row(k["name"], params or "-", k["description"], "yes" if k["available"] else "not yet")
        console.print(table)
    aliases = ", ".join(f"{a} = {e}" for a, e in {**data["shorthands"], **data["aliases"]}.items())
    console.print(f"[bold]shorthands and aliases:[/bold] {aliases}")
    arch = data["architectures"]["pytorch"]
    console.print(f"[bold]architectures:[/bold] {arch['note']}")
    console.print(f"  tested: {', '.join(arch['tested'])}")


def reference_markdown() -> str:
    """The generated reference section of ``docs/spec.md`` (a test keeps the two identical)."""
    lines: list[str] = []
    for kind in KINDS:
        lines += [f"### {'policies' if kind == 'policy' else kind + 's'}", ""]
        lines += ["| name | available | description | parameter | default | allowed | meaning |"]
        lines += ["|---" * 7 + "|"]
        for info in _KIND_LIST:
            if info.kind != kind:
                continue
            head = f"| `{info.name}` | {'yes' if info.available else 'not yet'} | {info.description} "
            if not info.params:
                lines.append(head + "| — | | | |")
            for i, p in enumerate(info.params):
                default = "unset" if p.default is None else f"`{format_value(p, p.default)}`"
                row = f"| `{p.name}` | {default} | {p.constraint} | {p.description} |"
                lines.append((head if i == 0 else "| | | ") + row)
        lines.append("")
    lines += ["### shorthands and aliases", "", "| name | same as |", "|---|---|"]
    for short, (canonical, fixed) in SHORTHANDS.items():
        lines.append(f"| `{short}` | `{canonical}:" + ",".join(f"{k}={v}" for k, v in fixed.items()) + "` |")
    for alias, (canonical, extra) in ALIASES.items():
        lines.append(f"| `{alias}` | `{_expansion(canonical, extra)}` |")
    return "\n".join(lines) + "\n"
