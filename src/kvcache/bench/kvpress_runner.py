"""Run NVIDIA kvpress's presses on the bench's jobs, in kvpress's own environment (a subprocess).

    PYTHON_OF_THE_SIDE_ENV src/kvcache/bench/kvpress_runner.py JOBS.json OUT_DIR

kvpress 0.5.5 pins ``transformers < 5.3``, which kvcache's range excludes, so the bench cannot import it;
``scripts/peer-env.sh kvpress`` makes a side environment and the bench starts this script there. It imports
only the standard library, torch, transformers and kvpress (plus dependency-free files of the package,
loaded by path: three beside it and the atomic writer ``../files.py``), reads the same token ids as every
other system, and writes one record per (press, task) in the contract of ``contract.py``:
``OUT_DIR/<file>.json``, written atomically, skipped when present (so an interrupted run resumes). On
stdout: ``tick`` after each prompt, ``done<TAB>label<TAB>task`` after each record, for the bench's progress
bars.

The press is entered around a plain greedy loop on the bench's token ids (``loop.py``): kvpress's own
pipeline appends a newline after the question, which changes the prompt format the bundled model was trained
on (it scores 0% with that newline even uncompressed). The whole prompt goes through the press in one
prefill forward; decoding then reads the compressed cache with explicit positions, as kvpress's pipeline
does. JOBS.json::

    {"model": DIR, "threads": 1, "jobs": {task: job, ...},
     "systems": [{"label": "kvpress SnapKV 50%", "press": "SnapKV", "ratio": 0.5, "file": "..."}, ...],
     "todo": [[label, task], ...]}
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def _by_path(name: str, path: Path) -> ModuleType:
    """Import the dependency-free file ``path`` as module ``name`` (kvcache itself is not importable here)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} for {__file__}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sibling(name: str) -> ModuleType:
    return _by_path(f"kvcache_bench_{name}", HERE / f"{name}.py")


#: press name -> kvpress class; "Decoding" is the decoding-time press (KeyDiff scores, re-compressed to the
#: same ratio of the tokens seen after every decode step)
PRESSES = ("StreamingLLM", "SnapKV", "TOVA", "Knorm", "ObservedAttention", "ExpectedAttention", "KeyDiff",
           "Decoding")
#: presses that read the attention weights, which only eager attention returns
NEEDS_EAGER = frozenset({"ObservedAttention"})


def make_press(name: str, ratio: float) -> Any:
    """The kvpress press ``name`` removing the fraction ``ratio`` of the tokens."""
    import kvpress

    simple = {"StreamingLLM": "StreamingLLMPress", "SnapKV": "SnapKVPress", "TOVA": "TOVAPress",
              "Knorm": "KnormPress", "ObservedAttention": "ObservedAttentionPress",
              "ExpectedAttention": "ExpectedAttentionPress", "KeyDiff": "KeyDiffPress"}
    if name in simple:
        return getattr(kvpress, simple[name])(compression_ratio=ratio)
    if name == "Decoding":
        return kvpress.CompressionRatioDecodingPress(base_press=kvpress.KeyDiffPress(),
                                                     target_compression_ratio=ratio, compression_interval=1)
    raise ValueError(f"unknown press {name!r}; choose from: {', '.join(PRESSES)}")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("kvpress", "transformers", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    contract, loop, memory = _sibling("contract"), _sibling("loop"), _sibling("memory")
    files = _by_path("kvcache_files", HERE.parent / "files.py")  # the package's atomic writer
    vers = versions()
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # stdout/stderr carry the progress protocol, not load bars
    torch.set_num_threads(int(spec.get("threads") or 1))
    systems = {s["label"]: s for s in spec["systems"]}
    models: dict[str, Any] = {}

    def model_for(attn: str) -> Any:
        if attn not in models:
            from transformers import AutoModelForCausalLM

            models[attn] = AutoModelForCausalLM.from_pretrained(
                spec["model"], dtype=torch.float32, attn_implementation=attn).eval()
            with torch.inference_mode():  # untimed warm-up: a process's first forwards pay one-off costs
                models[attn](input_ids=torch.ones(1, 8, dtype=torch.long))
        return models[attn]

    for label, task in spec["todo"]:
        system, job = systems[label], spec["jobs"][task]
        path = out_dir / f"{system['file']}__{task}.json"
        if path.exists():
            print(f"done\t{label}\t{task}", flush=True)
            continue
        try:
            press = make_press(system["press"], system["ratio"])
            model = model_for("eager" if system["press"] in NEEDS_EAGER else "sdpa")
        except Exception as err:  # an import or construction failure is this row's reason, not a crash
            files.write_text_atomic(path, json.dumps(
                contract.unavailable(label, task, f"{type(err).__name__}: {err}", vers)))
            print(f"done\t{label}\t{task}", flush=True)
            continue
        eos = model.generation_config.eos_token_id
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list | tuple) else [eos])

        def scope(press: Any = press, model: Any = model) -> Any:
            return press(model)

        def generate(prompt: dict[str, Any], job: dict[str, Any], model: Any = model, scope: Any = scope,
                     eos_ids: list[int] = eos_ids) -> dict:
            from transformers import DynamicCache

            return loop.greedy(model, prompt["ids"], DynamicCache(), job["max_new_tokens"],
                               [] if job.get("ignore_eos") else eos_ids, scope=scope,
                               explicit_cache_position=False)

        def stream(window: list[int], prefix: int, model: Any = model, scope: Any = scope) -> dict:
            from transformers import DynamicCache

            return loop.stream_nll(model, window, prefix, DynamicCache(), scope=scope,
                                   explicit_cache_position=False)

        try:
            record = contract.run_job(job, label, generate, stream, memory.PeakRSS, vers,
                                      advance=lambda: print("tick", flush=True))
        except Exception as err:  # a press that fails on this model is reported, the others still run
            record = contract.unavailable(label, task, f"{type(err).__name__}: {err}", vers)
        files.write_text_atomic(path, json.dumps(record))
        print(f"done\t{label}\t{task}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
