"""Bad input on the command line: one line, the right exit code, and every file left as it was.

Each row of :data:`CASES` is ``(id, arguments, exit code, fragment)``: the command must exit with that code,
print ``fragment`` (case-insensitive) on stderr, print no traceback, and leave every file of the workspace
(inputs, unrelated files, earlier outputs) byte for byte unchanged with nothing added. ``{ws}`` in an
argument is the workspace folder (see ``bad_input_workspace``). The commands run in-process (typer's
``CliRunner``): the error boundary is the same as for the console script.
"""

from __future__ import annotations

import bad_input_workspace
import pytest
from typer.testing import CliRunner

from kvcache.cli import app
from kvcache.cli_errors import MAX_MESSAGE

LONG_PROMPT = "tok " * 80  # > 64 tokens: the workspace models' context
HUGE_SPEC = "dynamic+" + "h2o:budget=0.5," * 3600  # 54 KB

G = ["generate", "hi", "-n", "2", "-m"]  # kvcache generate with a model option to follow
OG = ["onnx", "generate"]
EXPORT = ["onnx", "export"]

CASES: list[tuple[str, list[str], int, str]] = [
    # ----- kvcache generate: the model --------------------------------------------------------------
    ("encoder model", [*G, "{ws}/bert"], 2, "is an encoder model, not a decoder"),
    ("encoder-decoder", [*G, "{ws}/t5"], 2, "encoder-decoder model"),
    ("no config", [*G, "{ws}/noconfig"], 2, "not a model directory"),
    ("config not json", [*G, "{ws}/badconfig"], 2, "cannot read the config"),
    ("unknown model type", [*G, "{ws}/unknowntype"], 2, "cannot read the config"),
    ("random safetensors", [*G, "{ws}/corrupt_st"], 2, "corrupt or truncated"),
    ("truncated safetensors", [*G, "{ws}/truncated_st"], 2, "corrupt or truncated"),
    ("missing path", [*G, "{ws}/does/not/exist"], 2, "does not exist"),
    ("file as model", [*G, "{ws}/notes.txt"], 2, "not a model directory"),
    ("empty model name", [*G, ""], 2, "model name is empty"),
    ("bad device", [*G, "{ws}/llama", "--device", "bogus"], 2, "unknown device"),
    ("bad dtype", [*G, "{ws}/llama", "--dtype", "int8"], 2, "unknown dtype"),
    # ----- kvcache generate: sizes, sampling, prompt -------------------------------------------------
    ("huge static capacity", [*G, "{ws}/llama", "-c", "static:capacity=1000000000"], 2, "static:capacity=N"),
    ("huge max-new-tokens", ["generate", "hi", "-m", "{ws}/llama", "-n", "1000000000000"], 2,
     "--max-new-tokens"),
    ("zero new tokens", ["generate", "hi", "-m", "{ws}/llama", "-n", "0"], 2, "--max-new-tokens"),
    ("fractional new tokens", ["generate", "hi", "-m", "{ws}/llama", "-n", "2.5"], 2, "valid integer"),
    ("word as new tokens", ["generate", "hi", "-m", "{ws}/llama", "-n", "ten"], 2, "valid integer"),
    ("negative temperature", [*G, "{ws}/llama", "-t", "-1"], 2, "--temperature"),
    ("infinite temperature", [*G, "{ws}/llama", "-t", "inf"], 2, "finite"),
    ("nan temperature", [*G, "{ws}/llama", "-t", "nan"], 2, "--temperature"),
    ("top-k zero", [*G, "{ws}/llama", "-t", "1", "--top-k", "0"], 2, "--top-k"),
    ("top-p zero", [*G, "{ws}/llama", "-t", "1", "--top-p", "0"], 2, "top_p"),
    ("top-p above one", [*G, "{ws}/llama", "-t", "1", "--top-p", "1.5"], 2, "top_p"),
    ("seed overflow", [*G, "{ws}/llama", "--seed", "99999999999999999999999"], 2, "--seed"),
    ("seed underflow", [*G, "{ws}/llama", "--seed", "-99999999999999999999999"], 2, "--seed"),
    ("unknown spec", [*G, "{ws}/llama", "-c", "bogus"], 2, "bogus"),
    ("budget out of range", [*G, "{ws}/llama", "-c", "h2o:budget=2"], 2, "budget"),
    ("zero capacity", [*G, "{ws}/llama", "-c", "static:capacity=0"], 2, "capacity"),
    ("negative capacity", [*G, "{ws}/llama", "-c", "static:capacity=-5"], 2, "capacity"),
    ("unknown precision", [*G, "{ws}/llama", "-c", "int3"], 2, "int3"),
    ("54 KB spec", [*G, "{ws}/llama", "-c", HUGE_SPEC], 2, "error:"),
    ("prompt not utf-8", ["generate", "hi\udcff", "-m", "{ws}/llama"], 2, "not valid UTF-8"),
    ("prompt over the context", ["generate", LONG_PROMPT, "-m", "{ws}/llama", "-n", "2"], 2, "context is 64"),
    ("prompt over a static capacity", [*G, "{ws}/llama", "-c", "static:capacity=2"], 2,
     "raise static:capacity"),
    ("unknown option", [*G, "{ws}/llama", "--frobnicate"], 2, "no such option"),
    ("missing prompt", ["generate"], 2, "missing argument"),
    # ----- kvcache info ------------------------------------------------------------------------------
    ("info extra argument", ["info", "extra"], 2, "unexpected extra argument"),
    ("info unknown option", ["info", "--yaml"], 2, "no such option"),
    ("unknown command", ["frobnicate"], 2, "no such command"),
    # ----- kvcache onnx export -----------------------------------------------------------------------
    ("export into a non-empty directory", [*EXPORT, "{ws}/llama", "--out", "{ws}/exp"], 2,
     "already holds files"),
    ("export onto a file", [*EXPORT, "{ws}/llama", "--out", "{ws}/notes.txt"], 2, "is a file"),
    ("export under a file", [*EXPORT, "{ws}/llama", "--out", "{ws}/afile/sub"], 2, "cannot create"),
    ("export over its own model", [*EXPORT, "{ws}/llama", "--out", "{ws}/llama", "--force"], 2,
     "holds the model being exported"),
    ("export over a folder holding the model", [*EXPORT, "{ws}/llama", "--out", "{ws}", "--force"], 2,
     "holds the model being exported"),
    ("opset too low", [*EXPORT, "{ws}/llama", "--out", "{ws}/new", "--opset", "5"], 2, "opset 14 to 20"),
    ("opset too high", [*EXPORT, "{ws}/llama", "--out", "{ws}/new", "--opset", "99"], 2, "opset 14 to 20"),
    ("dynamo opset too low", [*EXPORT, "{ws}/llama", "--out", "{ws}/new", "--exporter", "dynamo", "--opset",
                              "17"], 2, "opset 18 to"),
    ("unknown exporter", [*EXPORT, "{ws}/llama", "--out", "{ws}/new", "--exporter", "foo"], 2,
     "unknown exporter"),
    ("export an encoder", [*EXPORT, "{ws}/bert", "--out", "{ws}/new"], 2, "encoder model"),
    ("export without config", [*EXPORT, "{ws}/noconfig", "--out", "{ws}/new"], 2, "no config.json"),
    ("export corrupt weights", [*EXPORT, "{ws}/corrupt_st", "--out", "{ws}/new"], 2, "corrupt or truncated"),
    ("export a missing model", [*EXPORT, "{ws}/does/not/exist", "--out", "{ws}/new"], 2, "does not exist"),
    ("export without --out", [*EXPORT, "{ws}/llama"], 2, "missing option"),
    ("export into /proc", [*EXPORT, "{ws}/llama", "--out", "/proc/kvcache-test-out"], 2, "cannot create"),
    # ----- kvcache onnx inject -----------------------------------------------------------------------
    ("inject onto its input", ["onnx", "inject", "{ws}/exp/model.onnx", "--out", "{ws}/exp/model.onnx"], 2,
     "is the input graph"),
    ("inject onto an unrelated file", ["onnx", "inject", "{ws}/exp", "--out", "{ws}/notes.txt"], 2,
     "is not a graph"),
    ("inject onto a config", ["onnx", "inject", "{ws}/exp", "--out", "{ws}/exp/config.json"], 2,
     "is not a graph"),
    ("inject an injected graph", ["onnx", "inject", "{ws}/exp/model_kvcache.onnx"], 2,
     "already has a KV cache"),
    ("inject random bytes", ["onnx", "inject", "{ws}/noise"], 2, "not a readable ONNX model"),
    ("inject an encoder", ["onnx", "inject", "{ws}/bertonnx"], 2, "encoder model"),
    ("inject with another model's config", ["onnx", "inject", "{ws}/mismatch/model.onnx", "--out",
                                            "{ws}/mismatch/x.onnx"], 2, "config says 3"),
    ("inject a folder without graph", ["onnx", "inject", "{ws}/noconfig"], 2, "exactly one .onnx"),
    ("inject a Hugging Face folder", ["onnx", "inject", "{ws}/llama"], 2, "exactly one .onnx"),
    ("inject a missing path", ["onnx", "inject", "{ws}/does/not/exist"], 2, "does not exist"),
    ("inject under a file", ["onnx", "inject", "{ws}/exp", "--out", "{ws}/afile/sub.onnx"], 2, "afile"),
    ("inject without config", ["onnx", "inject", "{ws}/noconf/model_kvcache.onnx", "--out",
                               "{ws}/noconf/x.onnx"], 2, "no config.json"),
    # ----- kvcache onnx check ------------------------------------------------------------------------
    ("check a stale injected graph", ["onnx", "check", "{ws}/stale/model.onnx", "{ws}/stale"], 2,
     "injected from another graph"),
    ("check against another original", ["onnx", "check", "{ws}/gpt2exp/model.onnx", "{ws}/exp"], 2,
     "injected from another graph"),
    ("check with another model's config", ["onnx", "check", "{ws}/mismatch/model.onnx", "{ws}/mismatch"], 2,
     "does not match the config"),
    ("check batch zero", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/exp", "--batch", "0"], 2, "--batch"),
    ("check tolerance zero", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/exp", "--tol", "0"], 2, "tol"),
    ("check tolerance nan", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/exp", "--tol", "nan"], 2, "tol"),
    ("check prefill zero", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/exp", "--prefill", "0"], 2,
     "--prefill"),
    ("check negative steps", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/exp", "--steps", "-1"], 2,
     "--steps"),
    ("check a random original", ["onnx", "check", "{ws}/noise/model.onnx", "{ws}/exp"], 2,
     "injected from another graph"),
    ("check a folder without graph", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/noconfig"], 2,
     "holds none of"),
    ("check with originals swapped", ["onnx", "check", "{ws}/exp/model_kvcache.onnx", "{ws}/exp"], 2,
     "already takes a KV cache"),
    ("check a no-cache graph", ["onnx", "check", "{ws}/exp/model.onnx", "{ws}/exp/model.onnx"], 2,
     "no KV cache"),
    # ----- kvcache onnx generate ---------------------------------------------------------------------
    ("generate with a stale graph", [*OG, "{ws}/stale", "hi"], 2, "injected from another graph"),
    ("generate with another config", [*OG, "{ws}/mismatch", "hi"], 2, "does not match the config"),
    ("negative threads", [*OG, "{ws}/exp", "hi", "--threads", "-3"], 2, "--threads"),
    ("zero threads", [*OG, "{ws}/exp", "hi", "--threads", "0"], 2, "--threads"),
    ("onnx infinite temperature", [*OG, "{ws}/exp", "hi", "-t", "inf"], 2, "finite"),
    ("onnx huge max-new-tokens", [*OG, "{ws}/exp", "hi", "-n", "1000000000000"], 2, "--max-new-tokens"),
    ("onnx huge static capacity", [*OG, "{ws}/exp", "hi", "-c", "static:capacity=1000000000"], 2,
     "static:capacity=N"),
    ("onnx unknown spec", [*OG, "{ws}/exp", "hi", "-c", "bogus"], 2, "bogus"),
    ("onnx random graph", [*OG, "{ws}/noise/model.onnx", "hi"], 2, "not a readable ONNX model"),
    ("onnx no-cache graph", [*OG, "{ws}/exp/model.onnx", "hi"], 2, "no KV cache"),
    ("onnx missing path", [*OG, "{ws}/does/not/exist", "hi"], 2, "does not exist"),
    ("onnx prompt not utf-8", [*OG, "{ws}/exp", "hi\udcff"], 2, "not valid UTF-8"),
    ("onnx prompt over the context", [*OG, "{ws}/exp", LONG_PROMPT, "-n", "2"], 2, "context is 64"),
    ("onnx seed overflow", [*OG, "{ws}/exp", "hi", "--seed", str(2**70)], 2, "--seed"),
    ("onnx top-p above one", [*OG, "{ws}/exp", "hi", "-t", "1", "--top-p", "2"], 2, "top_p"),
    ("onnx graph without config", [*OG, "{ws}/noconf", "hi"], 2, "no config.json"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bad_input_workspace.build(tmp_path_factory.mktemp("bad-input"))


def test_the_table_is_large_and_unique():
    assert len(CASES) >= 80
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("args", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(workspace, args, code, fragment):
    before = bad_input_workspace.fingerprint(workspace)
    result = CliRunner().invoke(app, [a.replace("{ws}", str(workspace)) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    # click's usage errors come in a box that wraps lines: compare without the box and line breaks
    said = " ".join(result.stderr.replace("│", " ").split()).lower()
    assert fragment.lower() in said, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # our errors are one line, and never echo kilobytes back (click's usage errors have their own box)
    assert len(errors) <= 1 and all(len(line) < MAX_MESSAGE + 120 for line in errors)
    assert bad_input_workspace.fingerprint(workspace) == before
