"""Quantized caches on the bundled default model: greedy agreement with the dense cache, passkey, bytes.

Every spec runs the same prompts in the same job as the dense baseline (``full``):

- **agreement**: ``--prompts`` windows of exactly ``--prompt-tokens`` tokens of the held-out corpus
  (documents, then prose, evenly spaced starts), continued greedily for ``--new-tokens`` tokens with
  end-of-sequence ignored (every row is that long, no padding anywhere). A row is *identical* when all its
  tokens equal the dense cache's; *prefix* is the fraction of the dense tokens reproduced before the first
  difference. A policy row is also compared with the same policy at full precision (what quantization alone
  changes).
- **passkey**: ``--prompts`` fresh passkey prompts at ``--context`` tokens (:mod:`kvcache.bench.prompts`,
  evaluation seeds, held-out prose filler), answered greedily in 8 tokens.
- **bytes**: what the cache holds at the end of a generation, relative to the dense cache: summed over the
  agreement batches (prompt + new tokens) and for the first passkey prompt.

transformers' own ``QuantizedCache`` (quanto backend, same group and residual length) and its
``DynamicCache`` run the same token ids through ``model.generate``; the ``DynamicCache`` row is the
floating-point floor of the agreement (same math, different kernels).

    python benchmarks/quantized_quality.py --threads 1 --json results/quantized_quality.json
    python benchmarks/quantized_quality.py --prompts 4 --new-tokens 16 --context 256   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from kvcache.bench.accuracy import retrieval_accuracy
from kvcache.bench.loop import cache_bytes
from kvcache.bench.metrics import prefix_agreement
from kvcache.bench.prompts import ANSWER_TOKENS, default_eval_dir, prose_filler, retrieval_examples
from kvcache.bench.tasks import TaskExample, is_correct
from kvcache.files import write_text_atomic
from kvcache.generation import generate, generate_ids
from kvcache.models import load
from kvcache.models.corpus import load_eval_split
from kvcache.spec import CacheSpec

POLICIES = ("keydiff:budget=0.5", "diffsnap:budget=0.5")
SPECS: tuple[str, ...] = ("full", "int8", "int4", "int2",
                          *(f"{p}{q}" for p in POLICIES for q in ("", "+int8", "+int4", "+int2")))
#: transformers peers: label -> QuantizedCache bits (None: DynamicCache)
HF_ROWS: dict[str, int | None] = {"hf DynamicCache": None, "hf QuantizedCache quanto int4": 4,
                                  "hf QuantizedCache quanto int2": 2}
#: the kvcache defaults (quantized:bits=4,group=64,residual=128), given to quanto too
GROUP, RESIDUAL = 64, 128


def agreement_prompts(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` token ids (BOS + held-out text) at evenly spaced starts of the
    held-out documents and prose, read as one stream (paragraph breaks between documents)."""
    stream: list[int] = []
    for split in ("documents", "prose"):
        for doc in load_eval_split(default_eval_dir() / f"{split}.jsonl"):
            stream += tokenizer("\n\n" + doc.text, add_special_tokens=False)["input_ids"]
    span = length - 1
    if len(stream) < span:
        raise ValueError(f"the held-out corpus has {len(stream)} tokens, fewer than --prompt-tokens={length}")
    stride = (len(stream) - span) // max(1, n - 1)
    return [[tokenizer.bos_token_id] + stream[i * stride:i * stride + span] for i in range(n)]


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class KVCacheRow:
    """A kvcache spec through :func:`kvcache.generate_ids` / :func:`kvcache.generate`."""

    def __init__(self, spec: str, model: Any, tokenizer: Any) -> None:
        self.label, self.spec, self.model, self.tokenizer = spec, CacheSpec.parse(spec), model, tokenizer

    def continue_ids(self, ids: torch.Tensor, new_tokens: int) -> tuple[list[list[int]], int]:
        r = generate_ids(self.model, self.tokenizer, ids, cache=self.spec, max_new_tokens=new_tokens,
                         eos_token_id=[])
        return [list(t) for t in r.token_ids], r.stats.cache_bytes

    def passkey(self, examples: Sequence[TaskExample], batch_size: int) -> tuple[list[bool], int]:
        ok, _ = retrieval_accuracy(self.model, self.tokenizer, examples, cache=str(self.spec),
                                   batch_size=batch_size, max_new_tokens=ANSWER_TOKENS)
        one = generate(self.model, self.tokenizer, examples[0].prompt, cache=self.spec,
                       max_new_tokens=ANSWER_TOKENS, eos_token_id=[], progress=False)
        return ok, one.stats.cache_bytes


class HFRow:
    """transformers' ``DynamicCache`` or ``QuantizedCache`` (quanto) through ``model.generate``."""

    def __init__(self, label: str, bits: int | None, model: Any, tokenizer: Any) -> None:
        self.label, self.bits, self.model, self.tokenizer = label, bits, model, tokenizer

    def _cache(self) -> Any:
        if self.bits is None:
            return transformers.DynamicCache(config=self.model.config)
        return transformers.QuantizedCache(backend="quanto", config=self.model.config, nbits=self.bits,
                                           q_group_size=GROUP, residual_length=RESIDUAL)

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                  eos: bool) -> tuple[list[list[int]], int]:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens, config.do_sample = new_tokens, False
        if not eos:
            config.eos_token_id = []  # None would fall back to the model's end-of-sequence token
        cache = self._cache()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                      generation_config=config)
        return out[:, ids.shape[1]:].tolist(), cache_bytes(cache)

    def continue_ids(self, ids: torch.Tensor, new_tokens: int) -> tuple[list[list[int]], int]:
        return self._generate(ids, torch.ones_like(ids), new_tokens, eos=False)

    def passkey(self, examples: Sequence[TaskExample], batch_size: int) -> tuple[list[bool], int]:
        pad = self.model.generation_config.pad_token_id
        ok: list[bool] = []
        for batch in _batches(examples, batch_size):
            ids, mask = _left_padded([self.tokenizer(e.prompt)["input_ids"] for e in batch], pad)
            tokens, _ = self._generate(ids, mask, ANSWER_TOKENS, eos=True)
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            ok += [is_correct(e, t) for e, t in zip(batch, texts, strict=True)]
        ids, mask = _left_padded([self.tokenizer(examples[0].prompt)["input_ids"]], pad)
        # bytes of one prompt alone, as the kvcache rows
        first_bytes = self._generate(ids, mask, ANSWER_TOKENS, eos=False)[1]
        return ok, first_bytes


def measure(row: KVCacheRow | HFRow, prompts: list[list[int]], examples: list[TaskExample], new_tokens: int,
            batch_size: int) -> dict[str, Any]:
    """One row's raw results (tokens per agreement prompt, passkey answers, bytes), or the error it raised."""
    start = time.perf_counter()
    out: dict[str, Any] = {"label": row.label, "peer": "hf" if isinstance(row, HFRow) else "kvcache"}
    try:
        tokens: list[list[int]] = []
        agree_bytes = 0
        for batch in _batches(prompts, batch_size):
            t, nbytes = row.continue_ids(torch.tensor(batch), new_tokens)
            tokens += t
            agree_bytes += nbytes
        ok, passkey_bytes = row.passkey(examples, batch_size)
    except Exception as err:  # a peer that crashes is a finding: record it, keep measuring the others
        out["error"] = f"{type(err).__name__}: {err}"
        return out
    out.update(tokens=tokens, agreement_cache_bytes=agree_bytes, passkey_ok=ok, passkey=sum(ok) / len(ok),
               passkey_cache_bytes=passkey_bytes, seconds=time.perf_counter() - start)
    return out


def _baseline(label: str) -> str | None:
    """The row a row's quantization is judged against, when it is not ``full``: a policy+quantized spec's
    policy at full precision (``keydiff:budget=0.5+int4`` -> ``keydiff:budget=0.5``), transformers'
    ``DynamicCache`` for its ``QuantizedCache``."""
    if label.startswith("hf QuantizedCache"):
        return "hf DynamicCache"
    if label.startswith("hf "):
        return None
    spec = CacheSpec.parse(label)
    if spec.precision is None or spec.policy is None or spec.policy.name == "full":
        return None
    return str(spec.policy)


def _canonical(label: str) -> str:
    return label if label.startswith("hf ") or not label else str(CacheSpec.parse(label))


def compare(rows: list[dict[str, Any]], dense_agreement: int, dense_passkey: int) -> None:
    """Agreement against ``full`` (and against the row's own baseline, :func:`_baseline`) and bytes against
    the dense bytes of the tokens held (``dense_agreement``/``dense_passkey``), in place."""
    by_label = {r["label"]: r for r in rows}
    canonical = {_canonical(label): r for label, r in by_label.items()}
    full = by_label["full"]
    for r in rows:
        if "error" in r:
            continue
        refs = {"full": full}
        base = canonical.get(_canonical(_baseline(r["label"]) or ""))
        if base is not None and "error" not in base:
            refs["baseline"] = base
        for name, ref in refs.items():
            pairs = list(zip(ref["tokens"], r["tokens"], strict=True))
            r[f"identical_vs_{name}"] = sum(a == b for a, b in pairs) / len(pairs)
            r[f"prefix_vs_{name}"] = sum(prefix_agreement(a, b) for a, b in pairs) / len(pairs)
            r[f"first_divergence_vs_{name}"] = [_first_difference(a, b) for a, b in pairs]
        r["agreement_bytes_vs_dense"] = r["agreement_cache_bytes"] / dense_agreement
        r["passkey_bytes_vs_dense"] = r["passkey_cache_bytes"] / dense_passkey


@torch.inference_mode()
def dense_margins(model: Any, prompts: list[list[int]], tokens: list[list[int]],
                  batch_size: int) -> list[list[float]]:
    """Top-1 minus top-2 logit of every greedy step along the dense path (teacher-forced, one forward per
    batch): where it is tiny, any perturbation of the cache may flip the greedy token."""
    out: list[list[float]] = []
    for i in range(0, len(prompts), batch_size):
        seq = torch.tensor([p + t for p, t in zip(prompts[i:i + batch_size], tokens[i:i + batch_size],
                                                  strict=True)])
        n = len(tokens[i])
        logits = model(input_ids=seq).logits[:, seq.shape[1] - n - 1:-1].float()
        top = logits.topk(2, dim=-1).values
        out += (top[..., 0] - top[..., 1]).tolist()
    return out


def near_ties(rows: list[dict[str, Any]], margins: list[list[float]]) -> None:
    """For every row, the dense path's margin at the step where the row first leaves it (``None`` where it
    never does), in place; and for the dense row, each prompt's smallest margin."""
    for r in rows:
        if "first_divergence_vs_full" in r:
            r["dense_margin_at_divergence"] = [None if d is None else m[d]
                                               for d, m in zip(r["first_divergence_vs_full"], margins,
                                                               strict=True)]
        if r["label"] == "full":
            r["dense_min_margin"] = [min(m) for m in margins]
            flat = sorted(x for m in margins for x in m)
            r["dense_median_margin"] = flat[len(flat) // 2]


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def run(n: int, prompt_tokens: int, new_tokens: int, context: int, specs: Sequence[str], hf: Sequence[str],
        batch_size: int) -> dict[str, Any]:
    if "full" not in specs:
        specs = ["full", *specs]
    model, tokenizer = load("default")
    prompts = agreement_prompts(tokenizer, n, prompt_tokens)
    filler = prose_filler(load_eval_split(default_eval_dir() / "prose.jsonl"), tokenizer)
    examples = retrieval_examples("passkey", filler, [context], n)
    systems: list[KVCacheRow | HFRow] = [KVCacheRow(s, model, tokenizer) for s in specs]
    systems += [HFRow(label, HF_ROWS[label], model, tokenizer) for label in hf]
    rows = []
    for system in systems:
        rows.append(measure(system, prompts, examples, new_tokens, batch_size))
        r = rows[-1]
        print(f"{r['label']}: " + (r["error"] if "error" in r else
                                   f"passkey {r['passkey']:.0%}, {r['seconds']:.0f} s"), flush=True)
    # dense bytes of the tokens held at the end: every token but the last generated one, K and V, every layer
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
    per_token *= next(model.parameters()).element_size()
    first_len = len(tokenizer(examples[0].prompt)["input_ids"])
    compare(rows, per_token * n * (prompt_tokens + new_tokens - 1),
            per_token * (first_len + ANSWER_TOKENS - 1))
    full = next(r for r in rows if r["label"] == "full")
    near_ties(rows, dense_margins(model, prompts, full["tokens"], batch_size))
    return {"prompts": n, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "context": context,
            "group": GROUP, "residual": RESIDUAL, "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "rows": rows}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per cache, agreement with the dense cache, passkey accuracy, bytes."""
    ctx, total = report["context"], report["prompt_tokens"] + report["new_tokens"]
    lines = [f"| cache | identical vs full | prefix vs full | identical vs own baseline | passkey @{ctx} | "
             f"bytes / dense @{total} | bytes / dense @{ctx} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:160]} | | | | | |")
            continue
        lines.append(f"| {r['label']} | {_pct(r['identical_vs_full'])} | {r['prefix_vs_full']:.3f} | "
                     f"{_pct(r.get('identical_vs_baseline'))} | {_pct(r['passkey'])} | "
                     f"{r['agreement_bytes_vs_dense']:.2f}x | {r['passkey_bytes_vs_dense']:.2f}x |")
    at = {r["label"]: r for r in report["rows"]}
    notes = []
    if "error" not in at.get("int8", {"error": 1}):
        v = at["int8"]["identical_vs_full"]
        verdict = "met" if v >= 0.95 else "not met"
        notes.append(f"int8 identical greedy output: {_pct(v)} (goal >= 95%: {verdict})")
        at_div = [m for m in at["int8"].get("dense_margin_at_divergence", []) if m is not None]
        if at_div and "dense_median_margin" in at["full"]:
            notes.append(f"int8 leaves the dense path where the dense top-2 logit margin is "
                         f"{min(at_div):.4f}-{max(at_div):.4f} (median over all dense steps: "
                         f"{at['full']['dense_median_margin']:.2f}); "
                         f"{sum(m < 0.05 for m in at['full']['dense_min_margin'])} of {report['prompts']} "
                         "dense paths have a step with a margin below 0.05")
    if "error" not in at.get("int4", {"error": 1}):
        d = 100 * (at["int4"]["passkey"] - at["full"]["passkey"])
        verdict = "met" if abs(d) <= 2 else "not met"
        notes.append(f"int4 passkey - dense: {d:+.0f} points (goal within 2: {verdict})")
    lines += ["", f"agreement: {report['prompts']} held-out prompts of {report['prompt_tokens']} tokens, "
              f"{report['new_tokens']} greedy tokens; passkey: {report['prompts']} prompts at {ctx} tokens; "
              f"group {report['group']}, residual {report['residual']}. Own baseline: the policy alone at "
              "full precision for a policy+quantized row, transformers' DynamicCache for its QuantizedCache. "
              "Bytes: what the cache holds at the end over the dense bytes of the tokens it has seen.",
              *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100, help="prompts per task (default 100)")
    parser.add_argument("--prompt-tokens", type=int, default=384,
                        help="agreement prompt length (default 384)")
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy tokens compared (default 256)")
    parser.add_argument("--context", type=int, default=1024, help="passkey prompt length (default 1024)")
    parser.add_argument("--specs", nargs="+", default=list(SPECS),
                        help="kvcache specs ('full' is always run)")
    parser.add_argument("--hf", nargs="*", default=list(HF_ROWS), choices=list(HF_ROWS),
                        help="transformers rows (none: leave them out)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("prompts", "prompt_tokens", "new_tokens", "context", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.specs:
        CacheSpec.parse(spec)  # a typo fails here, before the model loads
    report = run(args.prompts, args.prompt_tokens, args.new_tokens, args.context, args.specs, args.hf,
                 args.batch_size)
    text = table(report)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(report) + "\n")
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return report


if __name__ == "__main__":
    main()
