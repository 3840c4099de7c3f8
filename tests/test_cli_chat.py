"""`kvcache chat`: driven from stdin by a script, and typed at a terminal (pexpect); /save, --resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from kvcache import Chat
from kvcache.models import load
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import TINY_VOCAB_SIZE, tiny_tokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "TERM": "dumb",
       "OMP_NUM_THREADS": "1", "KVCACHE_DEBUG": ""}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    random_model("llama", seed=2, vocab_size=TINY_VOCAB_SIZE).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def expected(model_dir):
    """The replies of the same conversation through the library."""
    model, tokenizer = load(model_dir)
    chat = Chat(model, tokenizer, max_new_tokens=8)
    return [chat.send("hello"), chat.send("second turn"), chat.send("third")]


def run_cli(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvcache.cli", "chat", *args], input=stdin, text=True,
                          capture_output=True, env=ENV, timeout=240)


def test_stdin_script_save_and_resume(model_dir, expected, tmp_path):
    saved = tmp_path / "conv.safetensors"
    out = run_cli(["-m", model_dir, "-n", "8"], f"hello\n\nsecond turn\n/save {saved}\n/stats\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "\n".join(lines).startswith(f"{expected[0]}\n{expected[1]}\nsaved ")
    assert "tokens read" in out.stdout and "total tokens read: " in out.stdout
    assert saved.is_file()
    resumed = run_cli(["-m", model_dir, "-n", "8", "--resume", str(saved)], "third\n/quit\nnot sent\n")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == expected[2] + "\n"


def test_stdin_errors_exit_2_with_one_line(model_dir, tmp_path):
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    out = run_cli(["-m", model_dir, "-n", "4"], f"/save {existing}\n")
    assert out.returncode == 2
    assert "exists; use /save!" in out.stderr and existing.read_bytes() == b"keep me"
    bad = run_cli(["-m", model_dir, "--resume", str(existing)], "hi\n")
    assert bad.returncode == 2 and "not a readable safetensors file" in bad.stderr
    spec = run_cli(["-m", model_dir, "--cache", "h2o:budget=2"], "hi\n")
    assert spec.returncode == 2 and "budget" in spec.stderr


def test_typed_at_a_terminal(model_dir, expected, tmp_path):
    saved = tmp_path / "typed.safetensors"
    child = pexpect.spawn(sys.executable, ["-m", "kvcache.cli", "chat", "-m", model_dir, "-n", "8"], env=ENV,
                          encoding="utf-8", timeout=240, dimensions=(40, 200))
    try:
        child.expect_exact("/help for commands")
        child.expect_exact("you>")
        child.sendline("hello")
        child.expect_exact("model>")
        child.expect_exact(expected[0].replace("\n", "\r\n"))
        child.expect_exact("you>")
        child.sendline("/stats")
        child.expect("total tokens read: \\d+")
        child.expect_exact("you>")
        child.sendline("/bogus")
        child.expect_exact("unknown command /bogus")  # shown; the conversation goes on
        child.expect_exact("you>")
        child.sendline("second turn")
        child.expect_exact(expected[1].replace("\n", "\r\n"))
        child.expect_exact("you>")
        child.sendline(f"/save {saved}")
        child.expect_exact("saved ")
        child.expect_exact("you>")
        child.sendline("/reset")
        child.expect_exact("conversation reset")
        child.expect_exact("you>")
        child.sendline("hello")
        child.expect_exact(expected[0].replace("\n", "\r\n"))  # a fresh conversation answers as the first
        child.expect_exact("you>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    model, tokenizer = load(model_dir)
    assert Chat.load(saved, model, tokenizer).send("third") == expected[2]
