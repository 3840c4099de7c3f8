"""benchmarks/quantized_quality.py: a tiny run on the bundled model end to end, and its comparisons."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quantized_quality.py"


def _script() -> ModuleType:
    if "quantized_quality" in sys.modules:
        return sys.modules["quantized_quality"]
    spec = importlib.util.spec_from_file_location("quantized_quality", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quantized_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qq() -> ModuleType:
    return _script()


def test_tiny_run_writes_json_and_table(qq: ModuleType, tmp_path: Path) -> None:
    """Two prompts, a few tokens: the dense row agrees with itself, a residual window longer than the whole
    sequence reproduces the dense tokens exactly, quantizing stores fewer bytes, a policy+quantized row is
    compared with the policy alone, and the transformers rows are measured (or carry their error)."""
    long_window = "quantized:bits=4,group=64,residual=512"
    out = tmp_path / "q.json"
    md = tmp_path / "q.md"
    report = qq.main(["--prompts", "2", "--prompt-tokens", "200", "--new-tokens", "8", "--context", "256",
                      "--specs", "full", long_window, "int4", "keydiff:budget=0.5", "keydiff:budget=0.5+int4",
                      "--hf", "hf DynamicCache", "hf QuantizedCache quanto int4",
                      "--batch-size", "2", "--threads", "1", "--json", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["full", long_window, "int4", "keydiff:budget=0.5", "keydiff:budget=0.5+int4",
                          "hf DynamicCache", "hf QuantizedCache quanto int4"]
    assert all("error" not in rows[k] for k in list(rows)[:5])
    assert all(len(t) == 8 for r in rows.values() if "error" not in r for t in r["tokens"])
    assert rows["full"]["identical_vs_full"] == 1.0 and rows["full"]["prefix_vs_full"] == 1.0
    assert rows[long_window]["tokens"] == rows["full"]["tokens"]
    assert rows["int4"]["passkey_cache_bytes"] < rows["full"]["passkey_cache_bytes"]
    assert "identical_vs_baseline" in rows["keydiff:budget=0.5+int4"]
    assert "identical_vs_baseline" not in rows["int4"]
    quanto = rows["hf QuantizedCache quanto int4"]
    assert "error" in quanto or "identical_vs_baseline" in quanto
    table = md.read_text()
    assert table.count("\n| ") == len(rows) and "passkey @256" in table


def test_agreement_prompts_are_exact_windows(qq: ModuleType) -> None:
    from kvcache.models import load

    _, tokenizer = load("default")
    prompts = qq.agreement_prompts(tokenizer, 5, 300)
    assert [len(p) for p in prompts] == [300] * 5
    assert all(p[0] == tokenizer.bos_token_id for p in prompts)
    assert len({tuple(p) for p in prompts}) == 5
    with pytest.raises(ValueError, match="--prompt-tokens"):
        qq.agreement_prompts(tokenizer, 2, 10**7)


def test_compare_scores_agreement_and_bytes(qq: ModuleType) -> None:
    def row(label: str, tokens: list[list[int]], nbytes: int) -> dict:
        return {"label": label, "peer": "hf" if label.startswith("hf ") else "kvcache", "tokens": tokens,
                "agreement_cache_bytes": nbytes, "passkey_cache_bytes": nbytes // 2, "passkey": 0.5}

    rows = [row("full", [[1, 2, 3, 4], [5, 6, 7, 8]], 1000),
            row("keydiff:budget=0.5", [[1, 2, 9, 9], [5, 6, 7, 8]], 500),
            row("keydiff:budget=0.5+int4", [[1, 2, 9, 0], [0, 6, 7, 8]], 250),
            {"label": "hf QuantizedCache quanto int2", "peer": "hf", "error": "ValueError: boom"}]
    qq.compare(rows, dense_agreement=1000, dense_passkey=250)
    mixed = rows[2]
    assert mixed["identical_vs_full"] == 0.0
    assert mixed["prefix_vs_full"] == pytest.approx((2 / 4 + 0) / 2)
    assert mixed["identical_vs_baseline"] == 0.0
    assert mixed["prefix_vs_baseline"] == pytest.approx((3 / 4 + 0) / 2)
    assert mixed["first_divergence_vs_baseline"] == [3, 0]
    assert rows[1]["first_divergence_vs_full"] == [2, None]
    assert mixed["agreement_bytes_vs_dense"] == 0.25 and mixed["passkey_bytes_vs_dense"] == 0.5
    assert "identical_vs_full" not in rows[3]
    report = {"rows": rows, "context": 64, "prompt_tokens": 4, "new_tokens": 4, "prompts": 2, "group": 64,
              "residual": 128}
    assert "error: ValueError: boom" in qq.table(report)
