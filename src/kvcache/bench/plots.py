"""The bench's PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

#: tasks drawn in the score-vs-budget plot, with their axis labels
QUALITY_TASKS = {"passkey": "passkey accuracy", "needles": "multi-needle accuracy",
                 "kv": "key-value accuracy",
                 "consistency": "ROUGE-L vs full", "ppl": "perplexity (lower is better)"}


_MARKERS = "osD^vP*Xh<>p"


def _style(i: int) -> dict[str, Any]:
    """A distinct colour and marker for the i-th line (tab20 colours; markers change every 20 lines)."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](i % 20), "marker": _MARKERS[(i // 20 + i) % len(_MARKERS)]}


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_vs_budget(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """One panel per quality task: score against the kept fraction, one line per policy or press."""
    tasks = [t for t in QUALITY_TASKS if any(r["task"] == t and r.get("available") for r in rows)]
    if not tasks:
        return None
    plt = _plt()
    ncols = min(2, len(tasks))
    nrows = (len(tasks) + ncols - 1) // ncols
    fig, grid = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(tasks):]:
        ax.set_visible(False)
    names = sorted({r["system"] if r.get("budget") == 1.0 and r["peer"] != "kvpress"
                    else f"{r['peer']} {r['family']}" for r in rows})
    styles = {n: _style(i) for i, n in enumerate(names)}
    for ax, task in zip(axes[0], tasks, strict=False):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if (r["task"] != task or not r.get("available") or r.get("score") is None
                    or r.get("budget") is None):
                continue
            single = r["budget"] == 1.0 and r["peer"] != "kvpress"
            name = r["system"] if single else f"{r['peer']} {r['family']}"
            lines.setdefault(name, []).append((100 * r["budget"], r["score"]))
        for name, pts in sorted(lines.items()):
            pts.sort()
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "-" if len(pts) > 1 else "", label=name, markersize=6, linewidth=1.4,
                    **styles[name])
        ax.set_xlabel("cache kept (% of the prompt)")
        ax.set_ylabel(QUALITY_TASKS[task])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        if task != "ppl":
            ax.set_ylim(-0.03, 1.03)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True):
            if lbl not in labels:
                handles.append(h)
                labels.append(lbl)
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8,
               title="policy / press / cache")
    return _figure_png(fig)


def _speed_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed rows to draw: every non-kvpress row, and kvpress at its largest budget (else unreadable)."""
    speed = [r for r in rows if r["task"] == "speed" and r.get("available") and r.get("details")]
    kvp = [r["budget"] for r in speed if r["peer"] == "kvpress"]
    top = max(kvp) if kvp else None
    return [r for r in speed if r["peer"] != "kvpress" or r["budget"] == top]


def by_context(rows: Sequence[dict[str, Any]], what: str) -> bytes | None:
    """``what``: ``"cache_bytes"`` (MiB against context) or ``"decode_ms_per_token"`` (median, min-max)."""
    speed = _speed_rows(rows)
    if not speed:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for i, r in enumerate(speed):
        pts = r["details"]["by_context"]
        xs = [p["context"] for p in pts]
        if what == "cache_bytes":
            ax.plot(xs, [p["peak_cache_bytes"] / 2**20 for p in pts], "-", label=r["system"], markersize=5,
                    **_style(i))
        else:
            med = [p["decode_ms_per_token"]["median"] for p in pts]
            lo = [m - p["decode_ms_per_token"]["min"] for m, p in zip(med, pts, strict=True)]
            hi = [p["decode_ms_per_token"]["max"] - m for m, p in zip(med, pts, strict=True)]
            st = _style(i)
            ax.errorbar(xs, med, yerr=[lo, hi], fmt="-", label=r["system"], markersize=5, capsize=3,
                        color=st["color"], marker=st["marker"])
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("peak cache MiB" if what == "cache_bytes" else "decode ms / token (median, min-max)")
    ax.set_xticks(sorted({p["context"] for r in speed for p in r["details"]["by_context"]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _figure_png(fig)


def all_plots(rows: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """File name -> PNG bytes, for the plots the rows can fill."""
    out = {"score_vs_budget.png": score_vs_budget(rows),
           "cache_bytes_vs_context.png": by_context(rows, "cache_bytes"),
           "decode_ms_vs_context.png": by_context(rows, "decode_ms_per_token")}
    return {k: v for k, v in out.items() if v is not None}
