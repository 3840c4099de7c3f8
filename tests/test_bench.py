"""kvcache bench: metrics on known inputs, streaming scores, the peer JSON contract, resume, a smoke run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvcache.bench import runner as bench_runner
from kvcache.bench.contract import check_record, run_job, unavailable
from kvcache.bench.loop import greedy, stream_nll
from kvcache.bench.memory import PeakRSS
from kvcache.bench.metrics import answer_correct, perplexity, prefix_agreement, rouge_l, spread
from kvcache.bench.outputs import ResultsDir
from kvcache.bench.prompts import PromptSettings
from kvcache.bench.runner import BenchConfig, parse_list, run_bench
from kvcache.bench.systems import KVCacheSystem
from kvcache.errors import KVCacheError
from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer

RUNNER = Path(__file__).resolve().parents[1] / "src" / "kvcache" / "bench" / "kvpress_runner.py"

# ------------------------------------------------------------------------------------------ metrics


def test_answer_right_and_wrong() -> None:
    assert answer_correct(" 48213", " 48213. Remember")
    assert answer_correct(" 48213", "48213")
    assert not answer_correct(" 48213", " 48214")
    assert not answer_correct(" 48213", " 482130")  # a longer number is wrong
    assert not answer_correct(" 48213", " 4821")
    assert not answer_correct(" 48213", " the key is 48213")


def test_rouge_l_known_value() -> None:
    # LCS of 5 words: precision 5/5, recall 5/6, F = 2PR/(P+R) = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0


def test_prefix_agreement_and_spread() -> None:
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_agreement([1, 2], [1, 2, 3]) == 1.0
    assert prefix_agreement([1, 2], [7]) == 0.0
    s = spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert spread([])["median"] is None


def _uniform_model() -> torch.nn.Module:
    """A tiny Llama whose logits are all zero: every next token has probability 1/vocab."""
    model = random_model("llama", seed=0, num_layers=2, hidden=32, num_heads=4, vocab_size=128)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_streaming_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    model = _uniform_model()
    window = list(range(5, 45))
    out = stream_nll(model, window, 8, DynamicCache())
    assert out["tokens"] == 32
    assert perplexity(out["nll"], out["tokens"]) == pytest.approx(128, rel=1e-5)


def test_streaming_nll_through_a_kvcache_spec_equals_one_full_forward() -> None:
    """Feeding tokens one at a time through the cache scores them exactly as one forward pass does."""
    model = random_model("llama", seed=3, num_layers=2, hidden=32, num_heads=4, vocab_size=128)
    window = [1] + [(7 * i) % 120 + 4 for i in range(47)]
    ids = torch.tensor([window])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    want = torch.nn.functional.cross_entropy(logits[15:-1], ids[0, 16:], reduction="sum").item()
    for spec in ("full", "static"):
        got = KVCacheSystem(spec, model, tiny_tokenizer()).stream(window, 16)
        assert got["tokens"] == len(window) - 16
        assert got["nll"] == pytest.approx(want, rel=1e-4), spec
        assert got["cache_bytes"] > 0


def test_greedy_loop_matches_kvcache_generate() -> None:
    from kvcache import generate

    model, tok = random_model("llama", seed=4, num_layers=2, hidden=32, num_heads=4), tiny_tokenizer()
    text = "The pass key is 12345."
    want = generate(model, tok, [text], max_new_tokens=6, eos_token_id=[]).token_ids[0]
    got = greedy(model, tok(text)["input_ids"], DynamicCache(), 6, [])
    assert got["token_ids"] == list(want)
    assert got["decode_steps"] == 5 and got["cache_bytes"] > 0


# ------------------------------------------------------------------------------------------ contract


JOB = {"task": "passkey", "mode": "generate", "max_new_tokens": 2, "repeats": 2,
       "prompts": [{"text": "a", "ids": [1, 5]}, {"text": "b", "ids": [1, 6]}]}


def _fake_generate(prompt: dict, job: dict) -> dict:
    return {"token_ids": [7], "prompt_tokens": len(prompt["ids"]), "prefill_s": 0.1, "decode_s": 0.0,
            "decode_steps": 0, "cache_bytes": 10, "peak_cache_bytes": 10}


def test_contract_records_check_and_reject() -> None:
    record = run_job(JOB, "fake", _fake_generate, lambda w, p: {}, PeakRSS)
    check_record(json.loads(json.dumps(record)), JOB)
    assert len(record["outputs"]) == 2 and len(record["outputs"][0]) == 2
    check_record(unavailable("fake", "passkey", "not installed"), JOB)
    with pytest.raises(ValueError, match="must say why"):
        check_record({**unavailable("fake", "passkey", "x"), "reason": ""}, JOB)
    with pytest.raises(ValueError, match="2 inputs"):
        check_record({**record, "outputs": record["outputs"][:1]}, JOB)
    broken = json.loads(json.dumps(record))
    del broken["outputs"][1][0]["cache_bytes"]
    with pytest.raises(ValueError, match="lacks cache_bytes"):
        check_record(broken, JOB)
    with pytest.raises(ValueError, match="task"):
        check_record({**record, "task": "ppl"}, JOB)


FAKE_KVPRESS = '''
import contextlib
from dataclasses import dataclass

@dataclass
class _Press:
    compression_ratio: float = 0.0
    @contextlib.contextmanager
    def __call__(self, model):
        yield

KnormPress = StreamingLLMPress = _Press

class KeyDiffPress(_Press):
    def __init__(self, compression_ratio=0.0):
        raise RuntimeError("this press fails on purpose")
'''


def test_kvpress_runner_writes_contract_records(tmp_path: Path) -> None:
    """The side-environment runner, with a stand-in kvpress package: one record per (press, task) in the
    contract, a failing press reported with its reason, and a finished record never redone."""
    (tmp_path / "fake" / "kvpress").mkdir(parents=True)
    (tmp_path / "fake" / "kvpress" / "__init__.py").write_text(textwrap.dedent(FAKE_KVPRESS))
    (tmp_path / "fake" / "kvcache").mkdir()  # as in kvpress's environment, where kvcache is not installed
    (tmp_path / "fake" / "kvcache" / "__init__.py").write_text("raise ImportError('kvcache is not here')\n")
    model_dir = tmp_path / "m"
    random_model("llama", seed=1, num_layers=2, hidden=32, num_heads=4).save_pretrained(model_dir)
    stream_job = {"task": "ppl", "mode": "stream", "windows": [list(range(1, 30))], "prefix": 10}
    jobs = {"passkey": {**JOB, "repeats": 1}, "ppl": stream_job}
    spec = {"model": str(model_dir), "threads": 1, "jobs": jobs,
            "systems": [{"label": "kvpress Knorm 50%", "press": "Knorm", "ratio": 0.5, "file": "knorm"},
                        {"label": "kvpress KeyDiff 50%", "press": "KeyDiff", "ratio": 0.5,
                         "file": "keydiff"}],
            "todo": [["kvpress Knorm 50%", "passkey"], ["kvpress Knorm 50%", "ppl"],
                     ["kvpress KeyDiff 50%", "passkey"]]}
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    cmd = [sys.executable, str(RUNNER), str(tmp_path / "jobs.json"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done\t") == 3 and "tick" in proc.stdout
    knorm = json.loads((tmp_path / "out" / "knorm__passkey.json").read_text())
    check_record(knorm, jobs["passkey"])
    assert knorm["available"] and knorm["versions"]["transformers"]
    check_record(json.loads((tmp_path / "out" / "knorm__ppl.json").read_text()), stream_job)
    failed = json.loads((tmp_path / "out" / "keydiff__passkey.json").read_text())
    assert not failed["available"] and "fails on purpose" in failed["reason"]
    before = (tmp_path / "out" / "knorm__passkey.json").stat().st_mtime_ns
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert (tmp_path / "out" / "knorm__passkey.json").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------ runs

TINY = PromptSettings(passkey_contexts=(160,), passkey_n=2, needles_contexts=(600,), needles_n=2,
                      kv_contexts=(160,), kv_n=2, ppl_windows=2, ppl_window=48, ppl_prefix=24,
                      consistency_docs=2, consistency_prefix=48, consistency_new_tokens=6,
                      speed_contexts=(64, 128), speed_new_tokens=3)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    random_model("llama", seed=2, num_layers=2, hidden=32, num_heads=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _config(model_dir: Path, out: Path, **kw: object) -> BenchConfig:
    base = dict(out=out, model=str(model_dir),
                specs=["full", "static", "keyformer:budget=0.5", "int4", "ort:dynamic"],
                tasks=["passkey", "needles", "ppl", "consistency", "speed"], peers=["hf", "kvpress"],
                budgets=[0.5], quick=True, speed_repeats=2, settings=TINY,
                kvpress_python=out.parent / "no-such-python")
    base.update(kw)
    return BenchConfig(**base)  # type: ignore[arg-type]


def test_smoke_run_writes_every_output_well_formed(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    results = run_bench(_config(tiny_model_dir, out), progress=False)
    data = json.loads((out / "results.json").read_text())
    assert data["rows"] == json.loads(json.dumps(results["rows"]))
    labels = {r["system"] for r in data["rows"]}
    assert {"full", "static", "keyformer:budget=0.5", "int4", "hf DynamicCache",
            "kvpress SnapKV 50%"} <= labels
    by = {(r["system"], r["task"]): r for r in data["rows"]}
    assert by[("full", "consistency")]["score"] == 1.0 and by[("full", "passkey")]["relative"] in (1.0, None)
    assert by[("static", "ppl")]["score"] == pytest.approx(by[("full", "ppl")]["score"], rel=1e-4)
    assert by[("full", "speed")]["details"]["by_context"][0]["decode_ms_per_token"]["n"] == 2
    assert by[("full", "passkey")]["cache_bytes"] > 0 and by[("full", "passkey")]["peak_rss_bytes"] > 0
    # a policy row holds less memory than the full cache; not-yet-built specs and missing peers are rows
    # with their reason, never hidden
    assert by[("keyformer:budget=0.5", "passkey")]["available"]
    assert by[("keyformer:budget=0.5", "passkey")]["cache_bytes"] < by[("full", "passkey")]["cache_bytes"]
    assert by[("int4", "passkey")]["available"]
    assert by[("int4", "passkey")]["cache_bytes"] < by[("full", "passkey")]["cache_bytes"]
    assert "peer-env.sh kvpress" in by[("kvpress SnapKV 50%", "ppl")]["reason"]
    # the ONNX Runtime row generates what the PyTorch full cache generates; it has no streaming scorer yet
    ort_rows = json.loads((out / "rows" / "ort_dynamic__consistency.json").read_text())
    assert ort_rows["row"]["available"] and ort_rows["row"]["details"]["exact"] == TINY.consistency_docs
    assert "not wired" in by[("ort:dynamic", "ppl")]["reason"]
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(data["rows"]) and csv_lines[0].startswith("system,peer,family")
    top = (out / "headline.md").read_text()
    assert "| kvpress SnapKV | 50% |" in top and "| full | 100% |" in top
    md = (out / "results.md").read_text()
    assert md.startswith("| system |") and "unavailable: " in md  # the kvpress rows, with their reason
    for name in ("score_vs_budget", "cache_bytes_vs_context", "decode_ms_vs_context"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and page.count("<table>") >= 3
    assert "src='http" not in page
    assert len(list((out / "rows").glob("*.json"))) == len(data["rows"])


def test_resume_after_interruption_redoes_only_unfinished_rows(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "res"
    cfg = _config(tiny_model_dir, out, specs=["full", "static"], peers=[], tasks=["passkey", "ppl"])
    calls: list[str] = []
    real = bench_runner.run_job

    def interrupted(job: dict, system: str, *a: object, **kw: object) -> dict:
        calls.append(f"{system}/{job['task']}")
        if system == "static" and job["task"] == "ppl":
            raise KeyboardInterrupt
        return real(job, system, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bench_runner, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, progress=False)
    assert sorted(p.name for p in (out / "rows").glob("*.json")) == [
        "full__passkey.json", "full__ppl.json", "static__passkey.json"]
    assert not (out / "results.json").exists()
    calls.clear()
    monkeypatch.setattr(bench_runner, "run_job", lambda job, system, *a, **kw: (
        calls.append(f"{system}/{job['task']}"), real(job, system, *a, **kw))[1])
    run_bench(cfg, progress=False)
    assert calls == ["static/ppl"]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 4
    # other settings in the same folder would mix runs: refused
    with pytest.raises(KVCacheError, match="other settings"):
        run_bench(_config(tiny_model_dir, out, specs=["full"], peers=[], tasks=["passkey"]), progress=False)


def test_out_that_is_a_file_and_foreign_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(KVCacheError, match="is a file"):
        ResultsDir(tmp_path / "f", "fp")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.md").write_text("my notes")
    d = ResultsDir(tmp_path / "d", "fp")
    with pytest.raises(KVCacheError, match="refusing to overwrite"):
        d.write_text("results.md", "table")
    assert (tmp_path / "d" / "results.md").read_text() == "my notes"
    d.write_text("results.csv", "a")
    d.write_text("results.csv", "b")  # its own file: rewritten
    assert ResultsDir(tmp_path / "d", "fp").read_json("results.csv") is None  # not JSON, but owned


def test_spec_list_keeps_parameter_commas_and_bad_options_fail_early() -> None:
    assert parse_list("full, keyformer:budget=0.5,window=0.3,h2o:budget=0.5,int4") == [
        "full", "keyformer:budget=0.5,window=0.3", "h2o:budget=0.5", "int4"]
    with pytest.raises(ValueError, match="unknown task"):
        BenchConfig(out=Path("x"), tasks=["passkey", "nope"]).check()
    with pytest.raises(ValueError, match="unknown peer"):
        BenchConfig(out=Path("x"), peers=["vllm"]).check()
    with pytest.raises(ValueError):
        BenchConfig(out=Path("x"), specs=["keyformr:budget=0.5"]).check()
    assert not math.isnan(perplexity(1.0, 1))


def test_cli_refuses_an_out_that_is_a_file_and_a_bad_spec(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kvcache.cli import app

    (tmp_path / "f.txt").write_text("mine")
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "f.txt"), "--no-progress"])
    assert result.exit_code == 2 and "is a file" in result.output
    assert (tmp_path / "f.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "o"), "--specs", "full,keyformr"])
    assert result.exit_code == 2 and "keyformr" in result.output
