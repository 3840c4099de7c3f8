"""The recipe sweep runner: its sweep file parses into valid training recipes, bad files fail clearly, and
the summary table reflects what the runs' JSON files say."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from script_modules import SCRIPTS, import_script

sdm = import_script("sweep_default_model")
tdm = import_script("train_default_model")

SWEEP_FILE = SCRIPTS / "default_model_sweep.toml"


def _recipe(cmd: list[str]) -> tdm.Preset:
    """The recipe a sweep's train command would run (parsed by the training script's own parser)."""
    ap = tdm.build_parser()
    return tdm.recipe(ap.parse_args(cmd[2:]), ap)


def test_shipped_sweep_file_parses_into_valid_recipes(tmp_path: Path) -> None:
    sweep = sdm.parse_sweep(SWEEP_FILE.read_text(), str(SWEEP_FILE))
    assert {"curriculum", "seeds", "rope"} == {v.round for v in sweep.variants.values()}
    for v in sweep.variants.values():
        cmd = sdm.train_command(sweep, v, tmp_path)
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / v.name)
        assert cmd[cmd.index("--precision") + 1] == "fp32"
        p = _recipe(cmd)
        assert p.budget_s == 1e9  # the planned steps end a sweep run, whatever the machine's speed
    # the variant the preset was built from is the `cpu` preset, step for step
    t1 = _recipe(sdm.train_command(sweep, sweep.variants["T1"], tmp_path))
    assert t1 == replace(tdm.PRESETS["cpu"], budget_s=1e9)
    # a variant's override wins over the sweep's defaults (they come later on the command line)
    v8 = _recipe(sdm.train_command(sweep, sweep.variants["V8"], tmp_path))
    assert v8.prose_fraction == 0.2 and v8.rope_theta == 10000.0


@pytest.mark.parametrize("text, message", [
    ("[variants.A]\nset = 'steps=3'\n", "must be a list"),
    ("[variants.A]\nset = ['steps']\n", "is not FIELD=VALUE"),
    ("[variants.A]\nsteps = 3\n", "unknown key"),
    ("[defaults]\nthreads = 2\n[variants.A]\n", "unknown \\[defaults\\] key"),
    ("[variant.A]\n", "unknown table"),
    ("[defaults]\npreset = 'cpu'\n", "no \\[variants.NAME\\]"),
    ("[variants.'a/b']\n", "names a directory"),
    ("[variants.A\n", "not valid TOML"),
])
def test_bad_sweep_files_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sdm.parse_sweep(text, "s.toml")


def _fake_run(d: Path, seed: int, steps: int, ppl: float, passkey: dict[int, float], depth0: float) -> None:
    d.mkdir(parents=True)
    ev = {"heldout": {"perplexity": ppl},
          "passkey": [{"context": c, "accuracy": a, "by_depth": {"0": depth0} if c == 1024 else {}}
                      for c, a in passkey.items()],
          "multi_needle": [{"context": 1024, "accuracy": 0.25}]}
    (d / "eval.json").write_text(json.dumps(ev))
    (d / "train_log.json").write_text(json.dumps({"seed": seed, "steps": steps}))


def test_summary_table_reports_each_runs_numbers(tmp_path: Path) -> None:
    sweep = sdm.parse_sweep("[variants.A]\nset = ['steps=10', 'lr=1e-3']\n[variants.B]\nseed = 3\n")
    _fake_run(tmp_path / "A", 0, 10, 123.456, {256: 1.0, 1024: 0.87}, 0.4)
    _fake_run(tmp_path / "B", 3, 20, 99.0, {256: 0.5, 1024: 0.96}, 0.9)
    assert sdm.summary_row("C", tmp_path / "C") is None  # not run yet
    rows = [sdm.summary_row(n, tmp_path / n) for n in ("A", "B")]
    lines = sdm.table(sweep, rows).splitlines()
    assert lines[0].split(" | ")[4:6] == ["passkey@256", "passkey@1024"]
    assert lines[2] == "| A | 0 | 10 | 123.5 | 100% | 87% | 40% | 25% | `lr=1e-3` |"
    assert lines[3] == "| B | 3 | 20 | 99.0 | 50% | 96% | 90% | 25% | - |"


def test_main_refuses_unknown_variants_and_rounds(tmp_path: Path, capsys) -> None:
    for flags, message in ((["--only", "nope"], "no such variant"), (["--round", "nope"], "rounds: ")):
        with pytest.raises(SystemExit):
            sdm.main([str(SWEEP_FILE), "--out", str(tmp_path), "--summary-only", *flags])
        assert message in capsys.readouterr().err
