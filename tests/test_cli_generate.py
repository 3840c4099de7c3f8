"""`kvcache generate`: text to stdout and stats to stderr, --json, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcache import generate
from kvcache.cli import app
from kvcache.models import load
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    random_model("gpt2", seed=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def expected(model_dir):
    model, tokenizer = load(model_dir)
    return generate(model, tokenizer, "Once upon", max_new_tokens=12)


def test_text_to_stdout_stats_to_stderr(model_dir, expected):
    result = runner.invoke(app, ["generate", "Once upon", "--model", model_dir, "-n", "12"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected.texts[0] + "\n"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"finish={expected.finish_reasons[0]}" in lines[0] and "tok/s" in lines[0]


def test_json_output(model_dir, expected):
    result = runner.invoke(app, ["generate", "Once upon", "-m", model_dir, "-n", "12", "--cache", "static",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["text"] == expected.texts[0]  # static gives the same greedy tokens as dynamic
    assert payload["cache"] == "static"
    assert payload["finish_reason"] == expected.finish_reasons[0]
    assert payload["stats"]["new_tokens"] == len(expected.token_ids[0])
    assert payload["stats"]["cache_bytes"] > 0


def test_sampling_options_and_stop(model_dir):
    args = ["generate", "Once upon", "-m", model_dir, "-n", "12", "--temperature", "1.0", "--top-k", "20",
            "--top-p", "0.9", "--json"]
    first = json.loads(runner.invoke(app, [*args, "--seed", "3"]).stdout)
    again = json.loads(runner.invoke(app, [*args, "--seed", "3"]).stdout)
    assert first == {**again, "stats": first["stats"]}  # same text; timings differ
    text = first["text"]
    stop = text[4:6]
    stopped = runner.invoke(app, [*args, "--seed", "3", "--stop", stop, "--stop", "\x01"])
    payload = json.loads(stopped.stdout)
    assert payload["finish_reason"] == "stop"
    assert payload["text"] == text[: text.find(stop)]


def test_capacity_finish_reason(model_dir):
    result = runner.invoke(app, ["generate", "Once upon", "-m", model_dir, "-n", "20", "-c",
                                 "static:capacity=14", "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["finish_reason"] == "capacity"
    assert payload["stats"]["new_tokens"] == 14 - 10 + 1  # "<s>Once upon" is 10 tokens


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-c", "stattic"], "stattic"),
        (["-c", "h2o:budget=0.5+quantized:bits=3"], "bits must be 2, 4 or 8"),
        (["-m", "/no/such/model/dir"], "does not exist"),
        (["-c", "static:capacity=3"], "cache slots"),
        (["--top-p", "1.5"], "top_p"),
    ],
)
def test_user_errors_exit_2_with_one_line(model_dir, args, needle):
    result = runner.invoke(app, ["generate", "Once upon", "-m", model_dir, *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_option_validation_exits_2(model_dir):
    result = runner.invoke(app, ["generate", "hi", "-m", model_dir, "--max-new-tokens", "0"])
    assert result.exit_code == 2
