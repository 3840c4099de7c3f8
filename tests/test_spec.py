"""The cache spec grammar (kvcache.spec) and `kvcache info`.

The grammar expected here is written out independently of the registry in kvcache.support (``GRAMMAR``
below, from ARCHITECTURE.md) so a wrong default or a missing parameter in the registry fails a test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import kvcache.spec as spec_module
from kvcache import CacheSpec, SpecError, UnsupportedSpecError
from kvcache.cli import app
from kvcache.spec import REGISTRY, SpecPart, describe_kinds
from kvcache.support import reference_markdown

# name -> (kind, {param: default}) as documented in ARCHITECTURE.md
GRAMMAR: dict[str, tuple[str, dict[str, object]]] = {
    "dynamic": ("layout", {}),
    "static": ("layout", {"capacity": None}),
    "quantized": ("precision", {"bits": 4, "group": 64, "residual": 128}),
    "offload": ("placement", {}),
    "full": ("policy", {}),
    "keyformer": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1, "window": 0.3,
                             "tau": (1.0, 2.0)}),
    "h2o": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1, "window": 0.1}),
    "streaming": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1, "sinks": 4}),
    "snapkv": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1, "observe": 32,
                          "remember": 0}),
    "tova": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1}),
    "knorm": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1}),
    "keydiff": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1}),
    "diffsnap": ("policy", {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1, "observe": 16,
                            "remember": 0}),
}
BUILT = {"dynamic", "static", "quantized", "full", "keyformer", "h2o", "streaming", "snapkv", "tova", "knorm",
         "keydiff", "diffsnap", "offload"}
TESTED_ARCHS = ["llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "gpt_neox"]
ALL_WORDS = set(GRAMMAR) | {"int2", "int4", "int8", "offloaded", "offloaded_static"}


def test_registry_matches_documented_grammar() -> None:
    assert {n: (i.kind, {p.name: p.default for p in i.params}) for n, i in REGISTRY.items()} == GRAMMAR
    assert {n for n, i in REGISTRY.items() if i.available} == BUILT


# ----- documented examples and aliases ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("dynamic", "dynamic"),
        ("full", "dynamic"),
        ("dynamic+full", "dynamic"),
        ("static", "static"),
        ("static:capacity=4096", "static:capacity=4096"),
        ("keyformer:budget=0.5", "keyformer:budget=0.5"),
        ("keyformer:budget=0.5,window=0.3,tau=1.0-2.0", "keyformer:budget=0.5"),
        ("keyformer:tau=1.5", "keyformer:budget=0.5,tau=1.5-1.5"),
        ("h2o:budget=0.5,window=0.1", "h2o:budget=0.5"),
        ("h2o:budget=0.25+int4", "h2o:budget=0.25+int4"),
        ("streaming:budget=0.5,sinks=4", "streaming:budget=0.5"),
        ("snapkv:budget=0.5,observe=32", "snapkv:budget=0.5"),
        ("tova:budget=0.5", "tova:budget=0.5"),
        ("knorm:budget=0.5", "knorm:budget=0.5"),
        ("knorm:tokens=256", "knorm:tokens=256"),
        ("int4+offload", "int4+offload"),
        ("quantized:bits=4,group=64,residual=128", "int4"),
        ("quantized:bits=2,group=32", "int2:group=32"),
        ("int8:residual=0", "int8:residual=0"),
        (
            "offload+int4+static:capacity=64+h2o:budget=0.25",
            "h2o:budget=0.25+static:capacity=64+int4+offload",
        ),
    ],
)
def test_documented_examples(text: str, canonical: str) -> None:
    spec = CacheSpec.parse(text)
    assert str(spec) == canonical
    assert CacheSpec.parse(canonical) == spec


def test_example_values() -> None:
    s = CacheSpec.parse("h2o:budget=0.25+int4")
    assert (s.layout.name, s.policy.name, s.placement) == ("dynamic", "h2o", None)
    assert dict(s.policy.params) == {"budget": 0.25, "tokens": None, "min_tokens": None, "every": 1,
                                     "window": 0.1}
    assert dict(s.precision.params) == {"bits": 4, "group": 64, "residual": 128}
    k = CacheSpec.parse("keyformer:budget=0.5").policy
    assert dict(k.params) == {"budget": 0.5, "tokens": None, "min_tokens": None, "every": 1, "window": 0.3,
                              "tau": (1.0, 2.0)}
    assert dict(CacheSpec.parse("static:capacity=4096").layout.params) == {"capacity": 4096}
    assert CacheSpec.parse("static").layout.params["capacity"] is None
    # an absolute cap replaces the default fraction
    capped = CacheSpec.parse("h2o:tokens=100").policy.params
    assert dict(capped) == {"budget": None, "tokens": 100, "min_tokens": None, "every": 1, "window": 0.1}
    # exponents are fine in values, even inside a tau range
    assert CacheSpec.parse("keyformer:tau=1e-3-2").policy.params["tau"] == (0.001, 2.0)
    assert CacheSpec.parse("knorm:budget=5e-1").policy.params["budget"] == 0.5


@pytest.mark.parametrize(
    ("alias", "same_as"),
    [
        ("dynamic", "dynamic+full"),
        ("static", "static"),
        ("offloaded", "dynamic+offload"),
        ("offloaded_static", "static+offload"),
        ("offloaded_static:capacity=64", "static:capacity=64+offload"),
        ("quantized", "int4"),
        ("int2", "quantized:bits=2"),
        ("int4", "quantized:bits=4"),
        ("int8", "quantized:bits=8"),
    ],
)
def test_aliases(alias: str, same_as: str) -> None:
    assert CacheSpec.parse(alias) == CacheSpec.parse(same_as)


def test_whitespace_case_and_order_do_not_matter() -> None:
    ref = CacheSpec.parse("h2o:budget=0.25,window=0.2+int4:group=32")
    assert CacheSpec.parse("  INT4 : Group = 32 \t+\n H2o:WINDOW=0.2 , budget = .25 ") == ref
    assert CacheSpec.parse(ref) is ref


def test_default_spec_and_value_semantics() -> None:
    assert CacheSpec().is_default and CacheSpec.parse("dynamic").is_default
    assert not CacheSpec.parse("int4").is_default and not CacheSpec.parse("h2o").is_default
    assert str(CacheSpec()) == "dynamic"
    specs = {CacheSpec.parse("h2o:budget=0.5"), CacheSpec.parse("h2o"), CacheSpec.parse("h2o:budget=0.25")}
    assert len(specs) == 2  # hashable, equal by value
    with pytest.raises(TypeError):
        CacheSpec.parse("int4").precision.params["bits"] = 8  # type: ignore[index]
    with pytest.raises(TypeError, match="string or a CacheSpec"):
        CacheSpec.parse(4)  # type: ignore[arg-type]


def test_direct_construction_validates_and_fills_defaults() -> None:
    part = SpecPart("policy", "h2o", {"budget": 1})
    assert dict(part.params) == {"budget": 1.0, "tokens": None, "min_tokens": None, "every": 1, "window": 0.1}
    assert CacheSpec(policy=part) == CacheSpec.parse("h2o:budget=1")
    # numbers of other types (numpy, lists from JSON) are normalised so equality and hashing work
    static8 = SpecPart("layout", "static", {"capacity": np.int64(8)})
    assert static8 == CacheSpec.parse("static:capacity=8").layout and type(static8.params["capacity"]) is int
    assert SpecPart("policy", "keyformer", {"tau": [1, 3]}).params["tau"] == (1.0, 3.0)
    with pytest.raises(ValueError, match="capacity must be a whole number >= 1, got 8.0"):
        SpecPart("layout", "static", {"capacity": 8.0})
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\]"):
        SpecPart("policy", "h2o", {"budget": 2.0})
    with pytest.raises(ValueError, match="'h2o' is a policy, not a layout"):
        SpecPart("layout", "h2o")
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        SpecPart("layout", "static", {"bogus": 1})
    with pytest.raises(ValueError, match="must be a SpecPart of kind 'layout'"):
        CacheSpec(layout=SpecPart("policy", "h2o"))


def test_availability(monkeypatch) -> None:
    for text in ("dynamic", "static:capacity=8", "full", "static+full", "int4", "keyformer:budget=0.5+int2"):
        CacheSpec.parse(text).require_available()
    # a kind that parses but is not built is refused by name, with what is available
    monkeypatch.setitem(spec_module.REGISTRY, "quantized",
                        dataclasses.replace(spec_module.REGISTRY["quantized"], available=False))
    spec = CacheSpec.parse("int4")
    assert spec.unavailable() == ["quantized"]
    with pytest.raises(UnsupportedSpecError) as exc:
        spec.require_available()
    msg = "'quantized' is not available yet in this version; available: dynamic, static, offload, full"
    assert msg in str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert CacheSpec.parse("h2o+int4+offload").unavailable() == ["quantized"]


# ----- error messages -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("keyfromer:budget=0.5", ["'keyfromer'", "did you mean 'keyformer'", "policies: full, keyformer"]),
        ("h2o:windw=0.1", ["'windw'", "did you mean 'window'",
                           "valid keys: budget, tokens, min_tokens, every, window"]),
        ("int4+int8", ["two precisions", "'int4'", "'int8'"]),
        ("h2o+keyformer", ["two policies", "'keyformer'"]),
        ("offloaded_static+offload", ["two placements", "'offload'"]),
        ("static+offloaded_static", ["two layouts", "'offloaded_static'"]),
        ("h2o:budget=1.5", ["'h2o:budget=1.5'", "budget must be a fraction in (0, 1]"]),
        ("h2o:budget=0", ["budget must be a fraction in (0, 1]"]),
        ("h2o:budget=-0.5", ["budget must be a fraction in (0, 1]"]),
        ("h2o:budget=nan", ["budget must be a fraction in (0, 1]", "'nan'"]),
        ("h2o:budget=half", ["budget must be a number", "'half'"]),
        ("h2o:budget=0.5,tokens=10", ["either budget", "or tokens", "not both"]),
        ("h2o:tokens=0", ["tokens must be a whole number >= 1"]),
        ("h2o:tokens=2.5", ["tokens must be a whole number"]),
        ("h2o:window=1", ["window must be a fraction in [0, 1)"]),
        ("quantized:bits=3", ["bits must be 2, 4 or 8, got 3"]),
        ("quantized:group=48", ["group must be a power of two"]),
        ("quantized:residual=-1", ["residual must be a whole number"]),
        ("int4:bits=8", ["'int4' already sets bits=4"]),
        ("static:capacity=0", ["capacity must be a whole number >= 1"]),
        ("snapkv:observe=0", ["observe must be a whole number >= 1"]),
        ("streaming:tokens=4,sinks=4", ["sinks=4 leaves no room", "tokens=4"]),
        ("keyformer:tau=0-1", ["tau must be numbers > 0"]),
        ("keyformer:tau=1-2-3", ["tau must be a number or a range START-END"]),
        ("full:budget=0.5", ["'full' takes no parameters"]),
        ("offload:device=cpu", ["'offload' takes no parameters"]),
        ("h2o:budget", ["malformed parameter 'budget'", "KEY=VALUE"]),
        ("h2o:=0.5", ["malformed parameter '=0.5'"]),
        ("h2o:budget=", ["malformed parameter 'budget='"]),
        ("h2o:budget=0.5,", ["empty parameter"]),
        ("h2o:budget=0.5,budget=0.4", ["key 'budget' given twice"]),
        ("h2o:", ["nothing after ':'"]),
        ("int4++h2o", ["empty part"]),
        ("+int4", ["empty part"]),
        ("", ["empty cache spec", "'dynamic'"]),
        ("h2o!", ["malformed name 'h2o!'"]),
        ("h2o budget=0.5", ["malformed name", "parameters follow the name after ':'"]),
    ],
)
def test_error_messages(text: str, needles: list[str]) -> None:
    with pytest.raises(SpecError) as exc:
        CacheSpec.parse(text)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


# ----- property tests -------------------------------------------------------------------------------------
_unit = st.floats(0, 1, exclude_min=True)  # (0, 1]
_VALUES = {
    "capacity": st.integers(1, 1 << 20),
    "bits": st.sampled_from([2, 4, 8]),
    "group": st.integers(0, 12).map(lambda k: 1 << k),
    "residual": st.integers(0, 4096),
    "budget": _unit,
    "tokens": st.integers(1, 1 << 20),
    "min_tokens": st.integers(1, 1 << 20),
    "window": st.floats(0, 1, exclude_max=True),
    "tau": st.tuples(st.floats(1e-6, 100), st.floats(1e-6, 100)),
    "sinks": st.integers(0, 64),
    "observe": st.integers(1, 1024),
    "remember": st.sampled_from([0, 1]),
    "every": st.integers(1, 64),
}


def _ws() -> st.SearchStrategy[str]:
    return st.sampled_from(["", "", " ", "  ", "\t"])


@st.composite
def _typed_part(draw: st.DrawFn, kind: str) -> tuple[SpecPart, str]:
    """A valid part of ``kind`` and a text for it written independently of the library's printer."""
    name = draw(st.sampled_from(sorted(n for n, (k, _) in GRAMMAR.items() if k == kind)))
    keys = [k for k in GRAMMAR[name][1] if k != "tokens"]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    if "budget" in chosen and draw(st.booleans()):
        chosen[chosen.index("budget")] = "tokens"
        chosen = [k for k in chosen if k != "min_tokens"]  # a floor under a fraction only
    params = {k: draw(_VALUES[k]) for k in chosen}
    if name == "streaming" and "tokens" in params:
        params["tokens"] = max(params["tokens"], params.get("sinks", 4) + 1)
    shown = dict(params)
    written = name
    if name == "quantized" and "bits" in shown and draw(st.booleans()):
        written = f"int{shown.pop('bits')}"  # the shorthand form
    elif name == "dynamic" and draw(st.booleans()):
        written = "DYNAMIC"
    items = []
    for k, v in shown.items():
        if k == "tau":
            text = repr(v[0]) if v[0] == v[1] and draw(st.booleans()) else f"{v[0]!r}-{v[1]!r}"
        else:
            text = repr(v)
        key = k.upper() if draw(st.booleans()) else k
        items.append(f"{draw(_ws())}{key}{draw(_ws())}={draw(_ws())}{text}")
    text = written + (":" + ",".join(items) if items else "")
    return SpecPart(kind, name, params), f"{draw(_ws())}{text}{draw(_ws())}"


@st.composite
def _spec(draw: st.DrawFn) -> tuple[CacheSpec, dict[str, str]]:
    """A valid spec and, per kind written, the text of its part (at least one part is written)."""
    parts: dict[str, SpecPart] = {}
    texts: dict[str, str] = {}
    for kind in ("layout", "precision", "placement", "policy"):
        if draw(st.booleans()):
            parts[kind], texts[kind] = draw(_typed_part(kind))
    capacity = parts["layout"].params.get("capacity") if "layout" in parts else None
    tokens = parts["policy"].params.get("tokens") if "policy" in parts else None
    floor = parts["policy"].params.get("min_tokens") if "policy" in parts else None
    assume(capacity is None or tokens is None or tokens <= capacity)  # the combination rule, tested apart
    assume(capacity is None or floor is None or floor <= capacity)
    if not texts:
        texts["layout"] = "dynamic"
    return CacheSpec(**parts), texts


def _shuffled(draw: st.DrawFn, texts: dict[str, str]) -> list[str]:
    return draw(st.permutations(list(texts.values())))


@settings(max_examples=200, deadline=None)
@given(_spec(), st.data())
def test_round_trip(case: tuple[CacheSpec, dict[str, str]], data: st.DataObject) -> None:
    expected, texts = case
    parsed = CacheSpec.parse("+".join(_shuffled(data.draw, texts)))
    assert parsed == expected
    canonical = str(parsed)
    assert CacheSpec.parse(canonical) == parsed
    assert str(CacheSpec.parse(canonical)) == canonical  # a fixed point
    assert " " not in canonical and canonical == canonical.lower()


def _reject(parts: list[str], bad: int) -> SpecError:
    """Parse ``parts`` joined with '+', expect a SpecError that names part ``bad``, return it."""
    with pytest.raises(SpecError) as exc:
        CacheSpec.parse("+".join(parts))
    assert exc.value.part == parts[bad].strip()
    assert repr(parts[bad].strip()) in str(exc.value)  # quoted as the message quotes it
    return exc.value


@st.composite
def _with_bad_part(draw: st.DrawFn, bad: st.SearchStrategy[str]) -> tuple[list[str], int]:
    """Valid parts of distinct kinds with one malformed part inserted at a random position."""
    texts = _shuffled(draw, draw(_spec())[1])
    i = draw(st.integers(0, len(texts)))
    return [*texts[:i], draw(bad), *texts[i:]], i


_unknown_name = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(lambda s: s not in ALL_WORDS)


@settings(max_examples=80, deadline=None)
@given(_with_bad_part(_unknown_name))
def test_unknown_names_rejected(case: tuple[list[str], int]) -> None:
    parts, bad = case
    err = _reject(parts, bad)
    assert "unknown name" in str(err) and "keyformer" in str(err)  # lists the valid choices


@st.composite
def _bad_key(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(GRAMMAR)))
    keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
    key = draw(keys.filter(lambda k: k not in GRAMMAR[name][1]))
    return f"{name}:{key}=1"


@settings(max_examples=80, deadline=None)
@given(_with_bad_part(_bad_key()))
def test_unknown_keys_rejected(case: tuple[list[str], int]) -> None:
    parts, bad = case
    err = _reject(parts, bad)
    assert "unknown key" in str(err) or "takes no parameters" in str(err)


_not_power_of_two = st.integers(0, 5000).filter(lambda v: v & (v - 1) != 0 or v == 0)
_OUT_OF_RANGE = {
    "capacity": st.sampled_from(["0", "-1", "2.5", "x", "1e3"]),
    "bits": st.integers(0, 64).filter(lambda b: b not in (2, 4, 8)).map(str),
    "group": _not_power_of_two.map(str),
    "residual": st.sampled_from(["-1", "0.5", "many"]),
    "budget": st.one_of(
        st.floats(1, 1e6, exclude_min=True).map(repr),
        st.sampled_from(["0", "0.0", "-0.25", "nan", "inf", "1e9", "fifty"]),
    ),
    "tokens": st.sampled_from(["0", "-5", "1.5", "all"]),
    "min_tokens": st.sampled_from(["0", "-5", "1.5", "some"]),
    "window": st.one_of(st.floats(1, 1e6).map(repr), st.sampled_from(["-0.1", "nan"])),
    "tau": st.sampled_from(["0", "0-1", "1-0", "-1", "1-2-3", "a-b", "1--2", "inf-2"]),
    "sinks": st.sampled_from(["-1", "1.5", "four"]),
    "observe": st.sampled_from(["0", "-2", "3.5"]),
    "remember": st.sampled_from(["2", "-1", "0.5", "yes"]),
    "every": st.sampled_from(["0", "-3", "2.5", "often"]),
}


@st.composite
def _bad_value(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(n for n, (_, p) in GRAMMAR.items() if p)))
    key = draw(st.sampled_from(sorted(GRAMMAR[name][1])))
    return f"{name}:{key}={draw(_OUT_OF_RANGE[key])}"


@settings(max_examples=80, deadline=None)
@given(_with_bad_part(_bad_value()))
def test_out_of_range_values_rejected(case: tuple[list[str], int]) -> None:
    parts, bad = case
    key = parts[bad].split(":")[1].split("=")[0]
    err = _reject(parts, bad)
    assert f"{key} must be" in str(err)


@settings(max_examples=80, deadline=None)
@given(_spec(), st.sampled_from(["layout", "precision", "placement", "policy"]), st.data())
def test_duplicate_kinds_rejected(
    case: tuple[CacheSpec, dict[str, str]], kind: str, data: st.DataObject
) -> None:
    _, texts = case
    if kind not in texts:
        texts[kind] = data.draw(_typed_part(kind))[1]
    # the second part of a kind is the one named, whatever the two parts are (even identical)
    parts = [*_shuffled(data.draw, texts), data.draw(_typed_part(kind))[1]]
    err = _reject(parts, len(parts) - 1)
    assert "two " in str(err) and "at most one" in str(err) and repr(texts[kind].strip()) in str(err)


_GARBAGE = st.sampled_from(list("$#!@%^&*()[]{}<>?/|~`;\"'") + ["é", "→"])


@settings(max_examples=80, deadline=None)
@given(_with_bad_part(st.just("PLACEHOLDER")), st.data())
def test_garbage_characters_rejected(case: tuple[list[str], int], data: st.DataObject) -> None:
    parts, bad = case
    kind = data.draw(st.sampled_from(["layout", "precision", "placement", "policy"]))
    _, victim = data.draw(_typed_part(kind))
    victim = victim.strip()
    at = data.draw(st.integers(0, len(victim)))
    parts[bad] = victim[:at] + data.draw(_GARBAGE) + victim[at:]
    # the victim may duplicate a kind already present; put it first so its own error comes first
    parts.insert(0, parts.pop(bad))
    _reject(parts, 0)


@settings(max_examples=100, deadline=None)
@given(
    _with_bad_part(
        st.sampled_from(["", " ", "h2o:", "h2o:budget", "h2o:=0.5", "h2o:budget=", "h2o:budget=0.5,", ":x=1"])
    )
)
def test_malformed_structure_rejected(case: tuple[list[str], int]) -> None:
    parts, bad = case
    err = _reject(parts, bad)
    assert any(w in str(err) for w in ("empty", "malformed", "nothing after"))


# ----- kvcache info ----------------------------------------------------------------------------------------
def test_info_table() -> None:
    result = CliRunner().invoke(app, ["info"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    for word in [*GRAMMAR, "layouts", "precisions", "placements", "policies", *TESTED_ARCHS]:
        assert word in out
    for shown in ("budget=0.5", "window=0.3", "tau=1.0-2.0", "bits=4", "group=64", "residual=128", "sinks=4"):
        assert shown in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    assert "yes" in rows["dynamic"] and "yes" in rows["keyformer"] and "yes" in rows["quantized"]


def test_info_json() -> None:
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    kinds = {k["name"]: k for k in data["kinds"]}
    assert {n: k["kind"] for n, k in kinds.items()} == {n: k for n, (k, _) in GRAMMAR.items()}
    for name, (_, params) in GRAMMAR.items():
        got = {p["name"]: p["default"] for p in kinds[name]["params"]}
        assert got == {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        assert kinds[name]["available"] == (name in BUILT)
    assert data["architectures"]["pytorch"]["tested"] == TESTED_ARCHS
    assert data["aliases"] == {"offloaded": "offload", "offloaded_static": "static+offload"}
    assert data["shorthands"]["int2"] == "quantized:bits=2"
    assert describe_kinds() == data["kinds"]


# ----- docs/spec.md -----------------------------------------------------------------------------------------
DOC = Path(__file__).resolve().parents[1] / "docs" / "spec.md"
BEGIN, END = "<!-- BEGIN GENERATED REFERENCE -->\n", "<!-- END GENERATED REFERENCE -->"


def test_docs_reference_matches_registry() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    body, tail = rest.split(END)
    if os.environ.get("KVCACHE_UPDATE_DOCS") == "1":  # regenerate, atomically
        fd, tmp = tempfile.mkstemp(dir=DOC.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(head + BEGIN + reference_markdown() + END + tail)
        os.replace(tmp, DOC)
        body = reference_markdown()
    fix = "docs/spec.md is stale; regenerate: KVCACHE_UPDATE_DOCS=1 pytest tests/test_spec.py -k docs"
    assert body == reference_markdown(), fix


def test_docs_examples() -> None:
    section = DOC.read_text().split("## Examples")[1].split("\n## ")[0]
    rows = [re.findall(r"`([^`]*)`", line)[:2] for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    for spec, canonical in rows:
        assert str(CacheSpec.parse(spec)) == canonical, spec
    errors = DOC.read_text().split("## Errors")[1]
    with pytest.raises(SpecError) as exc:
        CacheSpec.parse("int4+int8")
    assert f"SpecError: {exc.value}" in errors


def test_a_static_capacity_must_hold_the_policy_tokens() -> None:
    with pytest.raises(SpecError, match=r"tokens=300 keeps more tokens than static:capacity=256"):
        CacheSpec.parse("h2o:tokens=300+static:capacity=256")
    assert str(CacheSpec.parse("static:capacity=256+h2o:tokens=256")) == "h2o:tokens=256+static:capacity=256"
