"""The CLI's error boundary (exit codes, one line, --debug) and edge inputs that are valid after all."""

from __future__ import annotations

import errno

import pytest
import torch
from typer.testing import CliRunner

from kvcache import generate, support
from kvcache.cli import app
from kvcache.cli_errors import MAX_MESSAGE, classify, one_line
from kvcache.errors import KVCacheError
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.sampling import Sampler

runner = CliRunner()


def _boom(exc: BaseException):
    def raiser(*args, **kwargs):
        raise exc
    return raiser


def test_debug_flag_and_environment_show_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    plain = runner.invoke(app, ["generate", "hi", "-m", missing])
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    for args, env in ((["--debug", "generate", "hi", "-m", missing], {}),
                      (["generate", "hi", "-m", missing], {"KVCACHE_DEBUG": "1"})):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: model path")


@pytest.mark.parametrize(("exc", "code", "fragment"), [
    (RuntimeError("boom"), 1, "internal error (RuntimeError: boom)"),
    (MemoryError(), 1, "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), 1, "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/x"), 1, "/x: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/y"), 2, "/y: Permission denied"),
    (KVCacheError("bad spec"), 2, "bad spec"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "invalid start byte"),
])
def test_failures_map_to_exit_codes(monkeypatch, exc, code, fragment):
    monkeypatch.setattr(support, "print_info", _boom(exc))
    result = runner.invoke(app, ["info"])
    assert result.exit_code == code
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_interrupt_exits_130(monkeypatch):
    monkeypatch.setattr(support, "print_info", _boom(KeyboardInterrupt()))
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 130 and "interrupted" in result.stderr


def test_library_errors_are_recognised_by_module():
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument
    from safetensors import SafetensorError

    assert classify(SafetensorError("header too large"))[0] == 2
    assert classify(InvalidArgument("wrong rank"))[0] == 2
    assert classify(Fail("kernel failed"))[0] == 1


def test_long_messages_are_cut():
    text = "x " * 10_000
    line = one_line(text)
    assert len(line) < MAX_MESSAGE + 80 and "more characters; --debug shows all" in line
    assert one_line("a\n  b\tc") == "a b c"


def test_tiny_temperature_is_greedy_not_nan():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[0, :2] = 3.0  # a tie: either tied token, never nan
    for temperature in (1e-45, 1e-300, 5e-324):
        picked = Sampler(temperature=temperature)(logits, torch.Generator().manual_seed(0))
        assert picked[1:].tolist() == logits[1:].argmax(-1).tolist()
        assert picked[0].item() in (0, 1)


def test_tiny_temperature_generates_the_greedy_text():
    model, tokenizer = random_model("llama", seed=5, num_layers=2, hidden=32, num_heads=4), tiny_tokenizer()
    greedy = generate(model, tokenizer, "Once upon", max_new_tokens=6)
    tiny = generate(model, tokenizer, "Once upon", max_new_tokens=6, temperature=1e-45, seed=1)
    assert tiny.token_ids == greedy.token_ids


def test_running_past_the_context_warns():
    model = random_model("llama", seed=5, num_layers=2, hidden=32, num_heads=4, max_positions=16)
    with pytest.warns(UserWarning, match="exceeds the model's context of 16 tokens"):
        generate(model, tiny_tokenizer(), "Once upon", max_new_tokens=12, eos_token_id=[])
