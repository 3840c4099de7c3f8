"""The exported offline lm-eval tasks: written atomically and never over a file unless asked, loaded with no
network, and scored by ``simple_evaluate`` exactly as ``kvcache bench`` scores the same prompts (per prompt,
full cache and a retention policy)."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from kvcache.bench.lmeval_tasks import export_lmeval_tasks
from kvcache.bench.metrics import answer_correct
from kvcache.bench.prompts import PromptSettings, build_prompts
from kvcache.bench.runner import BenchConfig, run_bench
from kvcache.cli import app
from kvcache.errors import KVCacheError
from kvcache.models import load
from kvcache.spec import CacheSpec

SETTINGS = PromptSettings(passkey_contexts=(256,), passkey_n=10)
SPECS = ("full", "keyformer:budget=0.5")


@pytest.fixture(scope="module")
def tokenizer():
    return load("default")[1]


@pytest.fixture(scope="module")
def offline():
    """No network for lm-eval and datasets: offline flags set and every socket connection refused."""
    import datasets.config

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline evaluation")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


def test_export_writes_the_bench_prompts(tmp_path, tokenizer):
    files = export_lmeval_tasks(tmp_path / "t", tokenizer, tasks=["passkey", "needles"], contexts=[256], n=3)
    names = sorted(p.name for p in files)
    assert names == ["kvcache_needles.yaml", "kvcache_passkey.yaml", "kvcache_passkey_ll.yaml",
                     "needles.jsonl", "passkey.jsonl"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == names  # no temporary file left behind
    expected = build_prompts(tokenizer, PromptSettings(passkey_contexts=(256,), passkey_n=3,
                                                       needles_contexts=(256,), needles_n=3),
                             ["passkey", "needles"])
    for task in ("passkey", "needles"):
        rows = [json.loads(line) for line in (tmp_path / "t" / f"{task}.jsonl").read_text().splitlines()]
        assert [(r["prompt"], r["answer"], r["seed"]) for r in rows] == [
            (e["text"], e["answer"], e["seed"]) for e in expected.retrieval[task]]
    yaml_text = (tmp_path / "t" / "kvcache_passkey.yaml").read_text()
    assert json.dumps(str((tmp_path / "t" / "passkey.jsonl").resolve())) in yaml_text
    assert "!function kvcache.lmeval.process_results" in yaml_text


def test_export_refuses_to_overwrite_unless_asked(tmp_path, tokenizer):
    (tmp_path / "passkey.jsonl").write_text("mine\n")
    with pytest.raises(KVCacheError, match="already holds passkey.jsonl.*--force"):
        export_lmeval_tasks(tmp_path, tokenizer, tasks=["passkey"], contexts=[64], n=1)
    assert (tmp_path / "passkey.jsonl").read_text() == "mine\n"
    assert not (tmp_path / "kvcache_passkey.yaml").exists()  # refused before anything was written
    export_lmeval_tasks(tmp_path, tokenizer, tasks=["passkey"], contexts=[64], n=1, overwrite=True)
    assert json.loads((tmp_path / "passkey.jsonl").read_text())["context"] == 64
    with pytest.raises(KVCacheError, match="unknown lm-eval task.*kv"):
        export_lmeval_tasks(tmp_path / "x", tokenizer, tasks=["kv"])
    with pytest.raises(KVCacheError, match="is a file"):
        export_lmeval_tasks(tmp_path / "passkey.jsonl", tokenizer, tasks=["passkey"], contexts=[64], n=1)


def test_export_command(tmp_path):
    runner = CliRunner()
    args = ["export-lmeval", str(tmp_path / "t"), "--tasks", "passkey", "--contexts", "64", "--n", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "lm_eval --model kvcache" in result.stderr
    assert len((tmp_path / "t" / "passkey.jsonl").read_text().splitlines()) == 2
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_simple_evaluate_scores_like_kvcache_bench(tmp_path, tokenizer, offline):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import kvcache.lmeval  # noqa: F401  (registers --model kvcache, as in-process users do)

    # kvcache bench's task runner on 10 passkey prompts of 256 tokens, full cache and Keyformer at 50%
    run_bench(BenchConfig(out=tmp_path / "bench", specs=list(SPECS), tasks=["passkey"], settings=SETTINGS),
              progress=False)
    prompts = json.loads((tmp_path / "bench" / "prompts.json").read_text())["prompts"]["retrieval"]["passkey"]
    export_lmeval_tasks(tmp_path / "tasks", tokenizer, tasks=["passkey"], settings=SETTINGS)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    scores = set()
    for spec in SPECS:
        slug = spec.replace(":", "_")
        bench_row = json.loads((tmp_path / "bench" / "rows" / f"{slug}__passkey.json").read_text())
        generated = [per[0]["token_ids"] for per in bench_row["record"]["outputs"]]
        bench_ok = [answer_correct(p["answer"], tokenizer.decode(ids, skip_special_tokens=True))
                    for p, ids in zip(prompts, generated, strict=True)]

        out = lm_eval.simple_evaluate(model="kvcache", model_args={"pretrained": "default", "cache": spec},
                                      tasks=["kvcache_passkey", "kvcache_passkey_ll"], task_manager=manager,
                                      batch_size=1, log_samples=True, bootstrap_iters=0)
        samples = sorted(out["samples"]["kvcache_passkey"], key=lambda s: s["doc_id"])
        assert [s["doc"]["prompt"] for s in samples] == [p["text"] for p in prompts]
        assert [bool(s["acc"]) for s in samples] == bench_ok, spec
        assert out["results"]["kvcache_passkey"]["acc,none"] == pytest.approx(bench_row["row"]["score"])
        assert out["config"]["kvcache_cache"] == str(CacheSpec.parse(spec))

        # log-likelihood through the same (compressed) cache: the answer is "greedy" exactly when generation
        # produced its tokens
        ll = sorted(out["samples"]["kvcache_passkey_ll"], key=lambda s: s["doc_id"])
        for p, s, ids in zip(prompts, ll, generated, strict=True):
            answer_ids = tokenizer(p["text"] + p["answer"])["input_ids"][len(p["ids"]):]
            assert bool(s["acc"]) == (ids[:len(answer_ids)] == answer_ids), (spec, p["seed"])
        scores.add(tuple(bench_ok))
    assert len(scores) == 2  # the policy changed some answers: the evaluation measures it
