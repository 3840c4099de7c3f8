"""The job/record contract between the bench and every system it measures (in-process or a subprocess).

A **job** is one task's inputs as token ids (JSON)::

    {"task": "passkey", "mode": "generate", "prompts": [{"text": ..., "ids": [...]}, ...],
     "max_new_tokens": 8, "repeats": 1, "ignore_eos": false}
    {"task": "ppl", "mode": "stream", "windows": [[...], ...], "prefix": 256}

A **record** is what one system returns for one job (JSON), scored later by the bench::

    {"contract": 1, "system": "kvpress SnapKV 50%", "task": "passkey", "available": true, "reason": null,
     "outputs": [[{"token_ids", "prompt_tokens", "prefill_s", "decode_s", "decode_steps", "cache_bytes",
                   "peak_cache_bytes"}, ... one per repeat], ... one per prompt],       # generate
     "outputs": [[{"nll", "tokens", "seconds", "cache_bytes"}], ...],                     # stream
     "rss_before_bytes": int, "peak_rss_bytes": int, "wall_s": float, "versions": {...}}

An unavailable system returns ``available: false`` with the ``reason`` and no outputs. This file uses only
the standard library: a peer's side environment loads it by path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

CONTRACT_VERSION = 1

GENERATE_FIELDS = ("token_ids", "prompt_tokens", "prefill_s", "decode_s", "decode_steps", "cache_bytes",
                   "peak_cache_bytes")
STREAM_FIELDS = ("nll", "tokens", "seconds", "cache_bytes")


def unavailable(system: str, task: str, reason: str,
                versions: dict[str, str] | None = None) -> dict[str, Any]:
    """The record of a system that cannot run (the reason is shown in every table)."""
    return {"contract": CONTRACT_VERSION, "system": system, "task": task, "available": False,
            "reason": reason, "outputs": [], "versions": versions or {}}


def run_job(job: dict[str, Any], system: str, generate: Callable[[dict[str, Any], dict[str, Any]], dict],
            stream: Callable[[list[int], int], dict], meter: Callable[[], Any],
            versions: dict[str, str] | None = None,
            advance: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``job`` on one system and return its record.

    Parameters
    ----------
    generate:
        ``generate(prompt, job) -> generation record`` for one prompt (``{"text", "ids"}``).
    stream:
        ``stream(window, prefix) -> stream record``.
    meter:
        A context-manager factory with ``before`` and ``peak`` (bytes) after exit, e.g. ``PeakRSS``.
    advance:
        Called after each prompt or window (a progress bar).
    """
    outputs: list[list[dict[str, Any]]] = []
    t0 = time.perf_counter()
    with meter() as m:
        if job["mode"] == "generate":
            for prompt in job["prompts"]:
                outputs.append([generate(prompt, job) for _ in range(job.get("repeats", 1))])
                if advance:
                    advance()
        elif job["mode"] == "stream":
            for window in job["windows"]:
                outputs.append([stream(window, job["prefix"])])
                if advance:
                    advance()
        else:
            raise ValueError(f"unknown job mode {job['mode']!r}; expected 'generate' or 'stream'")
    return {"contract": CONTRACT_VERSION, "system": system, "task": job["task"], "available": True,
            "reason": None, "outputs": outputs, "rss_before_bytes": m.before, "peak_rss_bytes": m.peak,
            "wall_s": time.perf_counter() - t0, "versions": versions or {}}


def check_record(record: Any, job: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first way ``record`` breaks the contract for ``job``."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("contract", "system", "task", "available", "outputs"):
        if key not in record:
            raise ValueError(f"record lacks {key!r}")
    if record["contract"] != CONTRACT_VERSION:
        raise ValueError(f"record contract {record['contract']!r}, expected {CONTRACT_VERSION}")
    if record["task"] != job["task"]:
        raise ValueError(f"record is for task {record['task']!r}, the job was {job['task']!r}")
    if not record["available"]:
        if not record.get("reason"):
            raise ValueError("an unavailable record must say why (reason)")
        return
    items = job["prompts"] if job["mode"] == "generate" else job["windows"]
    if len(record["outputs"]) != len(items):
        raise ValueError(f"record has {len(record['outputs'])} outputs for {len(items)} inputs")
    fields = GENERATE_FIELDS if job["mode"] == "generate" else STREAM_FIELDS
    repeats = job.get("repeats", 1) if job["mode"] == "generate" else 1
    for i, per_input in enumerate(record["outputs"]):
        if not isinstance(per_input, list) or len(per_input) != repeats:
            raise ValueError(f"output {i} must be a list of {repeats} repeat(s)")
        for out in per_input:
            missing = [f for f in fields if f not in out]
            if missing:
                raise ValueError(f"output {i} lacks {', '.join(missing)}")
    for key in ("peak_rss_bytes", "rss_before_bytes", "wall_s"):
        if not isinstance(record.get(key), int | float):
            raise ValueError(f"record lacks a number {key!r}")
