"""Tables (JSON, CSV, Markdown) and the self-contained HTML report of a bench run."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from typing import Any

from kvcache.bench.outputs import ResultsDir
from kvcache.bench.plots import all_plots
from kvcache.bench.systems import SystemInfo

QUALITY = ("passkey", "needles", "kv", "ppl", "consistency", "conversation")
CSV_FIELDS = ("system", "peer", "family", "budget", "spec", "task", "available", "reason", "score_name",
              "score", "relative", "n", "prefix_agreement", "cache_bytes", "peak_cache_bytes",
              "peak_rss_bytes", "rss_delta_bytes", "prefill_tok_s", "decode_tok_s", "decode_ms_median",
              "decode_ms_min", "decode_ms_max", "wall_s")


def add_relative(rows: Sequence[dict[str, Any]]) -> None:
    """``relative`` = score / the ``full`` row's score of the same task (perplexity: lower is better)."""
    base = {r["task"]: r.get("score") for r in rows if r["system"] == "full" and r.get("available")}
    for r in rows:
        b = base.get(r["task"])
        r["relative"] = (r["score"] / b if r.get("available") and r.get("score") is not None and b
                         else None)


def _mib(n: Any) -> str:
    return "–" if n is None else f"{n / 2**20:.2f}"


def _num(x: Any, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    if not r.get("available"):
        return "unavailable"
    if r["score_name"] == "perplexity":
        return f"{r['score']:.1f}" + (f" ({r['relative']:.2f}x)" if r.get("relative") else "")
    s = f"{100 * r['score']:.0f}%" if r["score_name"] == "accuracy" else f"{r['score']:.3f}"
    if r.get("relative") is not None and r["system"] != "full":
        s += f" ({r['relative']:.2f})"
    return s


def markdown(meta: dict[str, Any], infos: Sequence[SystemInfo], rows: Sequence[dict[str, Any]]) -> str:
    """The headline table (one line per system), the speed table and the unavailable rows with reasons."""
    at = {(r["system"], r["task"]): r for r in rows}
    tasks = [t for t in QUALITY if t in meta["tasks"]]
    head = ["system", "kept"] + [("consistency ROUGE-L" if t == "consistency" else t) for t in tasks]
    if "consistency" in tasks:
        head.append("prefix agreement")
    head += ["cache MiB", "peak RSS MiB", "prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    reasons: list[str] = []
    for i in infos:
        mine = [r for r in rows if r["system"] == i.label]
        if mine and not any(r.get("available") for r in mine):
            reason = mine[0].get("reason") or "unknown"
            reasons.append(f"- **{i.label}**: {reason}")
            short = reason.split(";")[0].replace("|", "/")
            cells = [i.label, _num(i.budget, "{:.0%}"), f"unavailable: {short}"]
            lines.append("| " + " | ".join(cells + ["–"] * (len(head) - 3)) + " |")
            continue
        cells = [i.label, _num(i.budget, "{:.0%}")] + [_cell(at.get((i.label, t))) for t in tasks]
        if "consistency" in tasks:
            c = at.get((i.label, "consistency"))
            cells.append(_num(c.get("prefix_agreement") if c else None, "{:.2f}"))
        # memory and speed from the main retrieval task (long prompts), else the first generate task
        src = next((at[(i.label, t)] for t in ("passkey", "needles", "kv", "consistency", "speed")
                    if (i.label, t) in at and at[(i.label, t)].get("available")), None)
        cells += [_mib(src.get("peak_cache_bytes") if src else None),
                  _mib(src.get("peak_rss_bytes") if src else None),
                  _num(src.get("prefill_tok_s") if src else None, "{:,.0f}"),
                  _num(src.get("decode_tok_s") if src else None, "{:,.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
        for r in mine:
            if not r.get("available"):
                reasons.append(f"- **{i.label}** / {r['task']}: {r.get('reason')}")
    out = "\n".join(lines)
    speed = [r for r in rows if r["task"] == "speed" and r.get("available") and r.get("details")]
    if speed:
        ctxs = [p["context"] for p in speed[0]["details"]["by_context"]]
        sh = ["system"] + [f"ms/token @{c}" for c in ctxs] + [f"cache MiB @{c}" for c in ctxs]
        sl = ["| " + " | ".join(sh) + " |", "|---|" + "---:|" * (len(sh) - 1)]
        for r in speed:
            pts = r["details"]["by_context"]
            ms = [f"{p['decode_ms_per_token']['median']:.2f} ({p['decode_ms_per_token']['min']:.2f}-"
                  f"{p['decode_ms_per_token']['max']:.2f})" for p in pts]
            mib = [_mib(p["peak_cache_bytes"]) for p in pts]
            sl.append("| " + " | ".join([r["system"], *ms, *mib]) + " |")
        out += ("\n\nDecode time per token against context (median over repeats, min-max), and the cache's "
                "peak size:\n\n" + "\n".join(sl))
    conv = [r for r in rows if r["task"] == "conversation" and r.get("available") and r.get("details")]
    if conv:
        ch = ["system", "accuracy, cache carried", "accuracy, history re-read",
              "tokens read (carried / re-read)", "tokens held / seen", "last turn s (carried / re-read)"]
        cl = ["| " + " | ".join(ch) + " |", "|---|" + "---:|" * (len(ch) - 1)]
        for r in conv:
            d = r["details"]
            cl.append("| " + " | ".join([
                r["system"], _num(r.get("score"), "{:.0%}"), _num(d.get("reread_accuracy"), "{:.0%}"),
                f"{d['tokens_read']:,} / {d['reread_tokens']:,}",
                f"{d['tokens_held']:,} / {d['tokens_seen']:,}",
                f"{d['last_turn_s']:.3f} / {d['reread_last_turn_s']:.3f}"]) + " |")
        out += ("\n\nConversation (pass key in the first turn, filler turns, question last): the cache "
                "carried across turns against re-reading the whole history into a fresh cache of the same "
                "spec; the full row re-reading is the full-cache reference:\n\n" + "\n".join(cl))
    if reasons:
        out += "\n\nUnavailable:\n\n" + "\n".join(reasons)
    return out + "\n"


def headline(rows: Sequence[dict[str, Any]], budgets: Sequence[float]) -> str:
    """One line per policy, press or full-size cache; each cell lists its values at ``budgets`` (kept
    fractions, e.g. 50 / 25 / 10%): accuracy, ROUGE-L against full, peak cache MiB on the passkey prompts
    and decode tokens/s (the speed task's, all contexts; else the passkey answers')."""
    groups: dict[str, dict[float | None, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        shared = r.get("budget") not in (None, 1.0) or r["peer"] == "kvpress"
        name = f"{r['peer']} {r['family']}" if shared else r["system"]
        groups.setdefault(name, {}).setdefault(r.get("budget"), {})[r["task"]] = r
    pct = " / ".join(f"{100 * b:g}%" for b in budgets)
    head = ["system", f"kept ({pct})", "passkey %", "multi-needle %", "consistency ROUGE-L", "cache MiB",
            "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def fmt(r: dict[str, Any] | None, key: str) -> str:
        if r is None or not r.get("available"):
            return "n/a"
        v = r.get(key)
        if v is None:
            return "–"
        if key == "score" and r["score_name"] == "accuracy":
            return f"{100 * v:.0f}"
        if key == "peak_cache_bytes":
            return f"{v / 2**20:.2f}"
        return f"{v:,.0f}" if key == "decode_tok_s" else f"{v:.2f}"

    for name, by_budget in groups.items():
        keys = [b for b in budgets if b in by_budget] if set(by_budget) - {1.0, None} else list(by_budget)
        if not keys:
            continue
        kept = " / ".join("100%" if k == 1.0 else "?" if k is None else f"{100 * k:g}%" for k in keys)
        cells = [name, kept]
        any_ok = any(r.get("available") for k in keys for r in by_budget[k].values())
        if not any_ok:
            reason = next(iter(by_budget[keys[0]].values())).get("reason") or ""
            lines.append("| " + " | ".join(cells + [f"unavailable: {reason.split(';')[0]}"] + ["–"] * 4)
                         + " |")
            continue
        for task, key in (("passkey", "score"), ("needles", "score"), ("consistency", "score"),
                          ("passkey", "peak_cache_bytes"), ("speed", "decode_tok_s")):
            if task == "speed" and not any("speed" in by_budget[k] for k in keys):
                task = "passkey"  # no speed task in this run: the answers' decode steps
            cells.append(" / ".join(fmt(by_budget[k].get(task), key) for k in keys))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _flat(r: dict[str, Any]) -> dict[str, Any]:
    d = {k: r.get(k) for k in CSV_FIELDS}
    ms = r.get("decode_ms_per_token") or {}
    d.update(decode_ms_median=ms.get("median"), decode_ms_min=ms.get("min"), decode_ms_max=ms.get("max"))
    return d


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(_flat(r))
    return buf.getvalue()


def _md_table_html(md: str) -> str:
    """The Markdown tables as HTML (a tiny converter for the pipe tables this module writes)."""
    parts: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            heads = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            parts.append("<div class='wrap'><table><thead><tr>" + heads + "</tr></thead><tbody>" + "".join(
                             "<tr>" + "".join(_td(c) for c in row) + "</tr>"
                             for row in body) + "</tbody></table></div>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("- "):
            parts.append(f"<p class='note'>{html.escape(line[2:]).replace('**', '')}</p>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(parts)


def _td(cell: str) -> str:
    cls = " class='reason'" if cell.startswith("unavailable") else ""
    return f"<td{cls}>{html.escape(cell)}</td>"


def html_report(meta: dict[str, Any], md: str, plots: dict[str, bytes]) -> str:
    """One self-contained HTML page: settings, tables, plots embedded as base64 PNGs."""
    imgs = "\n".join(f"<figure><img alt='{html.escape(n)}' src='data:image/png;base64,"
                     f"{base64.b64encode(b).decode()}'><figcaption>{html.escape(n)}</figcaption></figure>"
                     for n, b in plots.items())
    m = meta["machine"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvcache bench</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; font-size: 12.5px; margin: 12px 0; }} .wrap {{ overflow-x: auto; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }}
td.reason {{ white-space: normal; max-width: 28em; text-align: left; color: #8a4b00; }}
th:first-child, td:first-child {{ text-align: left; }}
thead th {{ background: #f0f0f0; }} tbody tr:nth-child(even) {{ background: #fafafa; }}
figure {{ margin: 16px 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-size: 12px; color: #666; }} .note {{ font-size: 12px; color: #555; margin: 2px 0; }}
code {{ background: #f4f4f4; padding: 1px 4px; }}
</style></head><body>
<h1>kvcache bench</h1>
<p>Model <code>{html.escape(str(meta['model']))}</code>; tasks {html.escape(', '.join(meta['tasks']))};
{meta['threads']} thread(s); {html.escape(m['cpu'])}, Python {m['python']}, torch {m['torch']},
transformers {m['transformers']}; finished {meta['finished']}{' (--quick)' if meta['quick'] else ''}.</p>
<p>Command: <code>{html.escape(meta.get('command') or '')}</code></p>
<p>Scores in parentheses are relative to the full cache (perplexity: ratio, lower is better).</p>
{_md_table_html(md)}
<h2>Plots</h2>
{imgs}
</body></html>
"""


def write_reports(out: ResultsDir, meta: dict[str, Any], infos: Sequence[SystemInfo],
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write results.json, results.csv, results.md, headline.md, plots/*.png and report.html; return the
    results."""
    add_relative(rows)
    results = {"meta": meta, "rows": rows}
    out.write_json("results.json", results)
    out.write_text("results.csv", csv_text(rows))
    md = markdown(meta, infos, rows)
    out.write_text("results.md", md)
    top = headline(rows, meta["budgets"])
    out.write_text("headline.md", top)
    plots = all_plots(rows)
    for name, data in plots.items():
        out.write_bytes(f"plots/{name}", data)
    out.write_text("report.html", html_report(meta, top + "\nEvery row, every task:\n\n" + md, plots))
    return results


__all__ = ["csv_text", "html_report", "markdown", "write_reports"]
