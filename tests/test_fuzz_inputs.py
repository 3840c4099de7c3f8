"""Fuzzing of what users type: spec strings and ``kvcache generate`` options.

Whatever the text, the spec parser either returns a spec whose canonical text parses back to it, or raises
a ``ValueError``; and the command either succeeds or exits with code 2 and one ``error:`` line or a usage
message, never a traceback.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvcache.cli import app
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.spec import CacheSpec

#: pieces of the spec grammar, so fuzzed strings get past the first character often
WORDS = ["dynamic", "static", "quantized", "offload", "int2", "int4", "int8", "full", "keyformer", "h2o",
         "streaming", "snapkv", "tova", "knorm", "keydiff", "capacity", "budget", "window", "tau", "bits",
         "group", "residual", "sinks", "observe", "tokens", "offloaded", "offloaded_static"]
PUNCT = [":", "=", ",", "+", "-", ".", " ", "0", "1", "0.5", "1e9", "-3", "nan", "inf", "1e-45", "2", "64"]
spec_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(WORDS + PUNCT), max_size=12).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(spec_text)
def test_spec_parser_accepts_or_refuses_cleanly(text):
    try:
        spec = CacheSpec.parse(text)
    except ValueError:
        return
    assert CacheSpec.parse(str(spec)) == spec
    assert str(CacheSpec.parse(str(spec))) == str(spec)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-model")
    model = random_model("llama", seed=6, num_layers=1, hidden=32, num_heads=4, max_positions=64)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(str(path))
    return str(path)


junk = st.sampled_from(["", "x", "1.5", "-1", "nan", "inf", "-inf", "1e400", "0x10", "١", "+", "None"])
new_tokens = st.one_of(st.integers(1, 3).map(str), st.integers(max_value=0).map(str),
                       st.integers(min_value=10**15).map(str), junk)
real = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(0, 2).map(str), junk)
integer = st.one_of(st.integers().map(str), st.integers(-2, 50).map(str), junk)
options = st.fixed_dictionaries({}, optional={
    "--max-new-tokens": new_tokens, "--temperature": real, "--top-k": integer, "--top-p": real,
    "--seed": integer, "--cache": spec_text, "--dtype": st.sampled_from(["float32", "bf16", "int8", "x"]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options, st.text(st.characters(exclude_categories=()), max_size=12))
def test_generate_options_never_crash(model_dir, opts, prompt):
    args = ["generate", prompt, "-m", model_dir, "--max-new-tokens", opts.pop("--max-new-tokens", "2")]
    for flag, value in opts.items():
        args += [flag, value]
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (args, result.stderr)
    if result.exit_code == 2:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert last.startswith("error: ") or "╰" in last or "Usage" in result.stderr, result.stderr
