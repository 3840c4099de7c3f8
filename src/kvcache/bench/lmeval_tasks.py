"""The bench's retrieval prompts as offline LM Evaluation Harness tasks: JSONL data + task YAML.

lm-eval's own benchmarks download their data from the Hugging Face Hub; these tasks read local JSONL
(``dataset_path: json``), so ``lm_eval --model kvcache`` runs with no network. The prompts are exactly the
ones ``kvcache bench`` scores (:func:`kvcache.bench.prompts.build_prompts`, same seeds and sizes), and the
metric is the bench's own check (:func:`kvcache.bench.tasks.answer_matches` through
:func:`kvcache.lmeval.process_results`), so the two report the same accuracy on the same prompts.

Written per task ``T`` (``passkey``, ``needles``): ``T.jsonl`` (one example a line: ``prompt``, ``answer``,
``context``, ``depth``, ``seed``) and ``kvcache_T.yaml`` (greedy generation of 8 tokens, ``acc``), plus
``kvcache_passkey_ll.yaml`` (the same passkey data scored by log-likelihood: ``acc`` is whether the answer is
the greedy continuation). The YAML names its JSONL by absolute path: export again after moving the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvcache.bench.prompts import ANSWER_TOKENS, PromptSettings, build_prompts
from kvcache.errors import KVCacheError
from kvcache.files import write_text_atomic

__all__ = ["LMEVAL_TASKS", "export_lmeval_tasks"]

#: bench retrieval tasks exported (bench name -> lm-eval task name)
LMEVAL_TASKS: dict[str, str] = {"passkey": "kvcache_passkey", "needles": "kvcache_needles"}


def _generate_yaml(name: str, data: Path) -> str:
    return f"""# Written by `kvcache export-lmeval`: the prompts of `kvcache bench`, scored as it scores them.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
generation_kwargs:
  until: []
  max_gen_toks: {ANSWER_TOKENS}
  do_sample: false
process_results: !function kvcache.lmeval.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _loglikelihood_yaml(name: str, data: Path) -> str:
    return f"""# Written by `kvcache export-lmeval`: the passkey prompts scored by log-likelihood
# (acc: the answer is the greedy continuation; perplexity: of the answer's tokens).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: loglikelihood
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def export_lmeval_tasks(
    out: str | os.PathLike[str],
    tokenizer: Any,
    *,
    tasks: Sequence[str] = ("passkey", "needles"),
    settings: PromptSettings | None = None,
    contexts: Sequence[int] | None = None,
    n: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the bench's retrieval prompts and their lm-eval task files into ``out``.

    Parameters
    ----------
    out:
        Folder (created if missing).
    tokenizer:
        The evaluated model's tokenizer: prompts are built to their context length in its tokens, as the bench
        builds them.
    tasks:
        Of :data:`LMEVAL_TASKS` (``passkey``, ``needles``).
    settings:
        The bench's prompt sizes (default :class:`PromptSettings`: what ``kvcache bench`` runs;
        ``PromptSettings.quick()`` for ``--quick``).
    contexts, n:
        Override the context lengths (tokens) and the examples per context of every exported task.
    overwrite:
        Replace files already there; without it an existing file is refused before anything is written.

    Returns
    -------
    list[Path]
        The files written.

    Raises
    ------
    KVCacheError
        Unknown task, bad sizes, ``out`` is a file, or a file exists and ``overwrite`` is false.
    """
    bad = [t for t in tasks if t not in LMEVAL_TASKS]
    if bad or not tasks:
        raise KVCacheError(f"unknown lm-eval task(s) {', '.join(bad) or '(none given)'}; choose from: "
                           f"{', '.join(LMEVAL_TASKS)}")
    settings = settings or PromptSettings()
    for task in tasks:
        if contexts is not None:
            if not contexts or any(c < 16 for c in contexts):
                raise KVCacheError(f"contexts must be token counts >= 16, got {list(contexts)}")
            settings = replace(settings, **{f"{task}_contexts": tuple(contexts)})
        if n is not None:
            if n < 1:
                raise KVCacheError(f"n (examples per context) must be >= 1, got {n}")
            settings = replace(settings, **{f"{task}_n": n})
    root = Path(out).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise KVCacheError(f"{root} is a file; give a folder for the task files (it is created if missing)")
    files: dict[Path, str] = {}
    prompts = build_prompts(tokenizer, settings, list(tasks))
    for task in tasks:
        data = root / f"{task}.jsonl"
        lines = [json.dumps({"prompt": e["text"], "answer": e["answer"], "context": e["context"],
                             "depth": e["depth"], "seed": e["seed"]}) for e in prompts.retrieval[task]]
        files[data] = "\n".join(lines) + "\n"
        files[root / f"{LMEVAL_TASKS[task]}.yaml"] = _generate_yaml(LMEVAL_TASKS[task], data)
        if task == "passkey":
            files[root / "kvcache_passkey_ll.yaml"] = _loglikelihood_yaml("kvcache_passkey_ll", data)
    existing = [p.name for p in files if p.exists()]
    if existing and not overwrite:
        raise KVCacheError(f"{root} already holds {', '.join(existing)}; give another folder, or overwrite "
                           "them with --force (overwrite=True)")
    root.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        write_text_atomic(path, text)
    return list(files)
