"""Scores and summaries: answer correctness, ROUGE-L, exact-prefix agreement, perplexity, spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from kvcache.bench.tasks import answer_matches


def answer_correct(answer: str, generated: str) -> bool:
    """True when ``generated`` starts (after spaces) with exactly the number in ``answer`` (``" 48213"``)."""
    return answer_matches(answer, generated)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure of ``candidate`` against ``reference`` (the ``rouge-score`` package, no stemming).

    Raises
    ------
    ImportError
        If ``rouge-score`` is not installed (``pip install 'kvcache[bench]'``).
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError("the consistency task needs rouge-score: pip install 'kvcache[bench]'") from err
    if not reference.split() and not candidate.split():
        return 1.0  # two empty continuations (both stopped at once) agree; rouge-score would say 0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(scorer.score(reference, candidate)["rougeL"].fmeasure)


def prefix_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Fraction of ``reference`` tokens that ``candidate`` reproduces before their first difference.

    1.0 when the candidate starts with the whole reference; 0.0 when the first token differs (or the
    reference is empty and the candidate is not).
    """
    if not reference:
        return 1.0 if not candidate else 0.0
    n = 0
    for a, b in zip(reference, candidate, strict=False):
        if a != b:
            break
        n += 1
    return n / len(reference)


def perplexity(nll_sum: float, tokens: int) -> float:
    """``exp(nll_sum / tokens)``; ``nan`` when no token was scored."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, standard deviation and count of repeated measurements (``None`` when empty)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"median": None, "min": None, "max": None, "stdev": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
