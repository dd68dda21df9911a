"""The post-mortem report: one store read into text, markdown, JSON or a self-contained HTML page.

Every format is rendered from the same JSON report that
:func:`instrument.analysis.build_report` builds (schema ``poolscope.report/1``), so they
never disagree::

    from instrument.report import make_report
    text, report = make_report("poolscope.db", fmt="text")
"""

from __future__ import annotations

import html
import json
import os
import sqlite3
import textwrap
from collections import Counter
from collections.abc import Callable
from typing import Any

import pandas as pd

from . import analysis
from ._store import read_error, resolve_store_path

__all__ = [
    "FORMATS",
    "duration",
    "make_report",
    "render",
    "render_html",
    "render_json",
    "render_markdown",
    "render_text",
]

FORMATS = ("text", "markdown", "json", "html")
"""The formats :func:`render` writes."""

_MAX_SITES = 15
_MAX_TIMEOUTS = 20
_MAX_HOLDERS = 10
_WIDTH = 100


def make_report(
    store: str | os.PathLike[str] | None,
    filters: analysis.Filters | None = None,
    fmt: str = "text",
) -> tuple[str, dict[str, Any]]:
    """Open ``store``, build its report and render it; return ``(rendered text, report)``.

    :param store: the store path. May be ``None`` for ``$POOLSCOPE_STORE``, else
        ``./poolscope.db``.
    :param filters: what part of the store to report. May be ``None`` for everything.
    :param fmt: one of :data:`FORMATS`.
    :raises StoreError: the store cannot be read (missing, not SQLite, foreign, newer, damaged).
    :raises ValueError: ``fmt`` is unknown, or ``filters`` names a pool the store lacks.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    filters = filters or analysis.Filters()
    conn = analysis.open_store(store)
    try:
        if filters.pools is not None:
            known = set(analysis.pools(conn)["name"])  # as reported: orders, orders#2, ...
            unknown = [name for name in filters.pools if name not in known]
            if unknown:
                choices = ", ".join(sorted(known)) or "none recorded"
                raise ValueError(f"no pool named {unknown[0]!r} in the store (pools: {choices})")
        report = analysis.build_report(conn, filters, with_utilization=fmt == "html")
        report["store"] = str(resolve_store_path(store))  # as the user named it
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:
        raise read_error(resolve_store_path(store), exc) from None
    finally:
        conn.close()
    return render(report, fmt), report


def render(report: dict[str, Any], fmt: str = "text") -> str:
    """Render a report dict (from :func:`instrument.analysis.build_report`) as ``fmt``."""
    renderers: dict[str, Callable[[dict[str, Any]], str]] = {
        "text": render_text,
        "markdown": render_markdown,
        "json": render_json,
        "html": render_html,
    }
    try:
        return renderers[fmt](report)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def render_json(report: dict[str, Any]) -> str:
    """The report as indented JSON (schema ``poolscope.report/1``), ending with a newline."""
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


# ---- escaping ------------------------------------------------------------------------------

# Names, paths and sites come from the application (a thread may name itself anything):
# each renderer escapes every string of the report once, before it lays anything out.
_VISIBLE = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{ord(c): f"\\{n}" for c, n in (("\t", "t"), ("\n", "n"), ("\r", "r"))},
    # Bidirectional overrides and line separators: they reorder or break a terminal line.
    **{c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                   *range(0x2066, 0x206A))},
    **{c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)},  # lone surrogates cannot be written
}  # fmt: skip
"""Characters a value may not carry onto a terminal, and how they are written instead."""

_MARKDOWN = {
    **{c: v.replace("\\", "\\\\") for c, v in _VISIBLE.items()},
    **{ord(c): "\\" + c for c in "\\`*_[]<>|~#&"},
}
"""Also backslash-escaped in markdown: what starts code, emphasis, links, raw HTML, table
cells, headings and entities."""


def _visible(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``), for a terminal."""
    return text if text.isprintable() else text.translate(_VISIBLE)


def _md(text: str) -> str:
    """``text`` as literal markdown: controls visible, markup characters backslash-escaped."""
    return text.translate(_MARKDOWN)


def _escaped(value: Any, escape: Callable[[str], str]) -> Any:
    """A copy of the report ``value`` with ``escape`` applied to every string in it."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: _escaped(v, escape) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v, escape) for v in value]
    return value


# ---- shared formatting ---------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """Write a duration the way people read it: ``85 µs``, ``40.1 ms``, ``1.25 s``, ``3m 05s``."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def _ms(value: float | None) -> str:
    return "-" if value is None else duration(value / 1000)


def _when(iso: str | None) -> str:
    """``2026-11-27T13:09:17.346Z`` → ``2026-11-27 13:09:17.346Z``."""
    return "-" if not iso else iso.replace("T", " ")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _quartet(stats: dict[str, float | None]) -> str:
    return " / ".join(_ms(stats.get(k)) for k in ("p50", "p95", "p99", "max"))


def _headline(report: dict[str, Any]) -> list[str]:
    s = report["summary"]
    states = []
    if s["running_processes"]:
        states.append(f"{s['running_processes']} running")
    if s["crashed_processes"]:
        states.append(f"{s['crashed_processes']} crashed")
    if s["terminated_processes"]:
        states.append(f"{s['terminated_processes']} terminated")
    exited = (
        s["processes"] - s["running_processes"] - s["crashed_processes"] - s["terminated_processes"]
    )
    if exited:
        states.append(f"{exited} exited")
    procs = _plural(s["processes"], "process", "processes")
    if states:
        procs += f" ({', '.join(states)})"
    lines = [
        f"{procs} · {_plural(s['pools'], 'pool')} · {_plural(s['checkouts'], 'checkout')} · "
        f"{_plural(s['events'], 'event')}",
        f"recorded from {_when(s['first_event_at'])} to {_when(s['last_event_at'])}",
        f"leaks: {s['confirmed_leaks']} confirmed, {s['suspected_leaks']} suspected, "
        f"{s['unknown_leaks']} unknown (open at a crash)",
        f"timeouts: {s['timeouts']} · p95 wait: {duration(s['wait_p95_s'])} · peak in use: "
        f"{s['peak_in_use']}" + (f" of {s['capacity']}" if s["capacity"] is not None else ""),
    ]
    if s["dropped"]:
        lines.append(
            f"warning: the recorder dropped {s['dropped']} records (its queue was full or the "
            "store could not be written); counts may be low"
        )
    if s.get("ignored_events"):
        lines.append(
            f"warning: {_plural(s['ignored_events'], 'event')} left out: a time out of range or "
            "not a number where one belongs (a damaged or edited store)"
        )
    f = report["filters"]
    active = [
        f"{k}={v if not isinstance(v, list) else ','.join(map(str, v))}"
        for k, v in f.items()
        if v is not None
    ]
    if active:
        lines.append("filters: " + " ".join(active))
    return lines


_CLASS_MEANING = {
    "never_returned": "still checked out when its process exited",
    "gc_reclaimed": "returned by the garbage collector, never closed by code",
    "open_at_crash": "still checked out when its process died",
    "held_too_long": "held past leak_after, returned later",
    "open_now": "held past leak_after, still open in a live process",
}


def _plain(text: str) -> str:
    return text


def _leak_rows(leaks: list[dict[str, Any]], code: Callable[[str], str]) -> list[list[str]]:
    """The leak table of the text and markdown reports (header first); ``code`` marks
    the pool and site up as code."""
    rows = [["class", "certainty", "count", "max held", "pool", "site"]]
    rows += [
        [
            leak["class"],
            leak["certainty"],
            str(leak["count"]),
            duration(leak["max_held_s"]),
            code(leak["pool"]),
            code(leak["site"]),
        ]
        for leak in leaks
    ]
    return rows


def _pool_rows(
    pools: list[dict[str, Any]], code: Callable[[str], str], quartet_head: list[str]
) -> list[list[str]]:
    """The pool table of the text and markdown reports (header first); ``code`` marks
    the pool name up as code."""
    rows = [["pool", "class", "size", "overflow", "peak", "checkouts", "timeouts",
             *quartet_head]]  # fmt: skip
    rows += [
        [
            code(p["name"]),
            p["pool_class"],
            _opt(p["pool_size"]),
            _opt(p["max_overflow"]),
            str(p["peak_in_use"]),
            str(p["checkouts"]),
            str(p["timeouts"]),
            _quartet(p["wait_ms"]),
            _quartet(p["hold_ms"]),
        ]
        for p in pools
    ]
    return rows


def _site_rows(sites: list[dict[str, Any]], code: Callable[[str], str]) -> list[list[str]]:
    """The first :data:`_MAX_SITES` rows of the site table of the text and markdown
    reports (header first); ``code`` marks the pool and site up as code."""
    rows = [["share", "checkouts", "held total", "p95 hold", "max hold", "pool", "site"]]
    labels = _site_labels(sites)
    rows += [
        [
            f"{s['pool_time_share'] * 100:.1f}%",
            str(s["checkouts"]),
            duration(s["total_hold_s"]),
            _ms(s["hold_ms"]["p95"]),
            _ms(s["hold_ms"]["max"]),
            code(s["pool"]),
            code(label),
        ]
        for s, label in zip(sites[:_MAX_SITES], labels, strict=False)
    ]
    return rows


# ---- text --------------------------------------------------------------------------------------


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Lay ``rows`` (the first is the header) out in aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal: summary, leak sites with their stacks, timeouts with their
    holders, per-pool percentiles, the busiest call sites and sizing advice.

    Control characters in names, paths and sites are written as escapes (``\\x1b``): the
    only line breaks are the layout's."""
    report = _escaped(report, _visible)
    lines = [f"poolscope report: {report['store']}", *_headline(report), ""]

    lines.append("LEAKS")
    if not report["leaks"]:
        lines.append("  none found")
    else:
        lines += _table(_leak_rows(report["leaks"], _plain), right={2, 3})
        for leak in report["leaks"]:
            lines.append("")
            lines.append(f"  {leak['class']} × {leak['count']} at {leak['site']}")
            lines.append(
                f"    {_CLASS_MEANING[leak['class']]} · pool {leak['pool']} · "
                f"{'thread' if len(leak['threads']) == 1 else 'threads'} "
                f"{', '.join(leak['threads'])}"
            )
            lines += [f"      {frame}" for frame in leak["stack"]]
    lines.append("")

    lines.append("TIMEOUTS")
    if not report["timeouts"]:
        lines.append("  none")
    for t in report["timeouts"][:_MAX_TIMEOUTS]:
        who = f"thread {t['thread']}" + (f", task {t['task']}" if t["task"] else "")
        lines.append(
            f"  {_when(t['at'])}  pool {t['pool']}: gave up after {duration(t['waited_s'])}, "
            f"{_plural(t['waiters'] or 1, 'caller')} waiting"
        )
        lines.append(f"    caller: {t['site']} ({who})")
        holders = t["holders"]
        if holders:
            lines.append(f"    held by {_plural(len(holders), 'checkout')} at that moment:")
            for h in holders[:_MAX_HOLDERS]:
                task = f", task {h['task']}" if h["task"] else ""
                lines.append(
                    f"      {duration(h['held_s']):>9}  {h['site']}  (thread {h['thread']}{task})"
                )
            if len(holders) > _MAX_HOLDERS:
                lines.append(f"      … and {len(holders) - _MAX_HOLDERS} more")
        else:
            lines.append("    no recorded checkout held the pool (checked out before attach?)")
    if len(report["timeouts"]) > _MAX_TIMEOUTS:
        lines.append(f"  … and {len(report['timeouts']) - _MAX_TIMEOUTS} more timeouts")
    lines.append("")

    lines.append("POOLS (wait and hold: p50 / p95 / p99 / max)")
    if not report["pools"]:
        lines.append("  none recorded")
    else:
        rows = _pool_rows(report["pools"], _plain, ["wait", "hold"])
        lines += _table(rows, right={2, 3, 4, 5, 6})
    lines.append("")

    lines.append("SITES (by share of pool time held)")
    if not report["sites"]:
        lines.append("  none")
    else:
        lines += _table(_site_rows(report["sites"], _plain), right={0, 1, 2, 3, 4})
        if len(report["sites"]) > _MAX_SITES:
            lines.append(f"  … and {len(report['sites']) - _MAX_SITES} more sites")
    lines.append("")

    lines.append("SIZING")
    sized = [p["sizing"] for p in report["pools"] if p.get("sizing")]
    if not sized:
        lines.append("  no pool activity to size")
    for advice in sized:
        # A site's path may hold hyphens (pytest-of-me/...): wrap only at spaces.
        lines += textwrap.wrap(
            advice["advice"], _WIDTH, initial_indent="  ", subsequent_indent="    ",
            break_on_hyphens=False, break_long_words=False,
        )  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _site_labels(sites: list[dict[str, Any]]) -> list[str]:
    """Each site's label: the site, followed by its caller when another stack of the same
    pool shares it. Counted once for all sites, so a report of many sites stays linear."""
    twins = Counter((s["site"], s["pool"]) for s in sites)
    return [
        f"{s['site']} ← {s['stack'][1]}"
        if twins[s["site"], s["pool"]] > 1 and len(s["stack"]) > 1
        else s["site"]
        for s in sites
    ]


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


# ---- markdown ------------------------------------------------------------------------------


def _md_code(text: str) -> str:
    # Not a backtick code span: markdown escapes are literal there, so a value could
    # not be both escaped and shown as it is.
    return f"<code>{text}</code>"


def _md_table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:  # type: ignore[assignment]
    head = "| " + " | ".join(rows[0]) + " |"
    rule = "|" + "|".join(" ---: " if i in right else " --- " for i in range(len(rows[0]))) + "|"
    body = ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return [head, rule, *body]


def _md_stack(stack: list[str]) -> list[str]:
    """A stack as a list of frames, innermost first."""
    return [f"- {_md_code(frame)}" for frame in stack]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as GitHub-flavoured markdown, for an issue, a wiki page or a CI summary.

    Every string of the report is escaped (:func:`_md`) before it is laid out, so a name
    or a path can neither break a line or a table row nor start markup."""
    report = _escaped(report, _md)
    meaning = {_md(k): v for k, v in _CLASS_MEANING.items()}
    out = [f"# poolscope report: {_md_code(report['store'])}", ""]
    out += [f"- {line}" for line in _headline(report)]
    out += ["", "## Leaks", ""]
    if not report["leaks"]:
        out.append("None found.")
    else:
        out += _md_table(_leak_rows(report["leaks"], _md_code), right={2, 3})
        for leak in report["leaks"]:
            out += [
                "",
                f"### {_md_code(leak['class'])} × {leak['count']} at {_md_code(leak['site'])}",
                "",
                f"{meaning[leak['class']].capitalize()}. Pool {_md_code(leak['pool'])}, "
                f"threads {', '.join(_md_code(t) for t in leak['threads'])}, "
                f"held up to {duration(leak['max_held_s'])}.",
                "",
                *_md_stack(leak["stack"]),
            ]
    out += ["", "## Timeouts", ""]
    if not report["timeouts"]:
        out.append("None.")
    for t in report["timeouts"][:_MAX_TIMEOUTS]:
        out.append(
            f"- **{_when(t['at'])}**, pool {_md_code(t['pool'])}: {_md_code(t['site'])} "
            f"(thread {_md_code(t['thread'])}) gave up after {duration(t['waited_s'])}; held by:"
        )
        for h in t["holders"][:_MAX_HOLDERS]:
            out.append(
                f"  - {duration(h['held_s'])} {_md_code(h['site'])} "
                f"(thread {_md_code(h['thread'])})"
            )
        if not t["holders"]:
            out.append("  - no recorded checkout")
    if len(report["timeouts"]) > _MAX_TIMEOUTS:
        out.append(f"- … and {len(report['timeouts']) - _MAX_TIMEOUTS} more")
    out += ["", "## Pools", ""]
    if report["pools"]:
        rows = _pool_rows(
            report["pools"], _md_code, ["wait p50/p95/p99/max", "hold p50/p95/p99/max"]
        )
        out += _md_table(rows, right={2, 3, 4, 5, 6})
    else:
        out.append("None recorded.")
    out += ["", "## Sites", ""]
    if report["sites"]:
        out += _md_table(_site_rows(report["sites"], _md_code), right={0, 1, 2, 3, 4})
    else:
        out.append("None.")
    out += ["", "## Sizing", ""]
    advice = [p["sizing"]["advice"] for p in report["pools"] if p.get("sizing")]
    out += [f"- {a}" for a in advice] or ["No pool activity to size."]
    return "\n".join(out).rstrip() + "\n"


# ---- html --------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;
padding:0 1rem;color:#1d2733;background:#fff}
h1{font-size:1.5rem;margin-bottom:.25rem}h2{margin-top:2rem;border-bottom:1px solid #dde3ea;
padding-bottom:.25rem}code,pre{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f5f7fa;padding:.6rem .8rem;border-radius:6px;overflow-x:auto;margin:.3rem 0}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #eef1f5;vertical-align:top}th{background:#f5f7fa;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#5b6775}
.cards{display:flex;flex-wrap:wrap;gap:.75rem;margin:1rem 0}.card{border:1px solid #dde3ea;
border-radius:8px;padding:.6rem .9rem;min-width:8rem}.card b{display:block;font-size:1.4rem}
.confirmed{color:#b42318}.suspected{color:#b54708}.unknown{color:#475467}
.bar{background:#e4e9f0;border-radius:3px;height:.6rem;width:8rem;display:inline-block}
.bar i{display:block;height:100%;background:#2e6fd8;border-radius:3px}details{margin:.2rem 0}
.warn{background:#fff4e5;border:1px solid #f5c07a;border-radius:6px;padding:.5rem .8rem}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _html_table(head: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    th = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                 for i, h in enumerate(head))  # fmt: skip
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )  # fmt: skip
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _utilization_svg(series: dict[str, Any], timeouts: list[dict[str, Any]]) -> str:
    """An inline SVG chart of one pool: in use (blue), waiting (orange), capacity (dashed)
    and timeouts (red ticks)."""
    width, height, pad = 1000, 160, 34
    offsets = series["at_offsets_s"] or [0.0]
    span = max(offsets[-1] + series["interval_s"], 1e-9)
    top = max([*series["in_use"], *(a + b for a, b in zip(series["in_use"], series["waiters"],
              strict=True)), series["capacity"] or 0, 1])  # fmt: skip

    def x(offset: float) -> float:
        return pad + (width - 2 * pad) * offset / span

    def y(value: float) -> float:
        return height - pad + (2 * pad - height) * value / top

    def line(values: list[int], color: str) -> str:
        points = []
        for offset, value in zip(offsets, values, strict=True):
            points.append(f"{x(offset):.1f},{y(value):.1f}")
            points.append(f"{x(offset + series['interval_s']):.1f},{y(value):.1f}")
        return (f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                f'points="{" ".join(points)}"/>')  # fmt: skip

    stacked = [a + b for a, b in zip(series["in_use"], series["waiters"], strict=True)]
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="100%" '
        f'role="img" aria-label="connections in use over time, pool {_e(series["pool"])}">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#98a2b3"/>',
    ]
    if series["capacity"]:
        cy = y(series["capacity"])
        parts.append(f'<line x1="{pad}" y1="{cy:.1f}" x2="{width - pad}" y2="{cy:.1f}" '
                     'stroke="#b42318" stroke-dasharray="6 4"/>')  # fmt: skip
        label = f"capacity {series['capacity']}"
        parts.append(f'<text x="{width - pad}" y="{cy - 4:.1f}" text-anchor="end" '
                     f'font-size="11" fill="#b42318">{label}</text>')  # fmt: skip
    parts += [line(stacked, "#e07b00"), line(series["in_use"], "#2e6fd8")]
    start = series["start_at"]
    start_unix = analysis.parse_time(start) if start else 0.0
    for t in timeouts:
        if t["pool"] != series["pool"] or not t["at"]:
            continue
        tx = x(analysis.parse_time(t["at"]) - start_unix)
        parts.append(f'<line x1="{tx:.1f}" y1="{pad / 2}" x2="{tx:.1f}" y2="{height - pad}" '
                     'stroke="#d92d20" stroke-width="1"/>')  # fmt: skip
    parts.append(f'<text x="{pad}" y="{height - 8}" font-size="11" fill="#5b6775">'
                 f"{_e(_when(start))}</text>")  # fmt: skip
    parts.append(f'<text x="{width - pad}" y="{height - 8}" font-size="11" fill="#5b6775" '
                 f'text-anchor="end">+{_e(duration(span))}</text>')  # fmt: skip
    parts.append(f'<text x="{pad}" y="14" font-size="12" fill="#1d2733">'
                 f"{_e(series['pool'])}: in use (blue), in use + waiting (orange), "
                 "timeouts (red)</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _stack_html(stack: list[str]) -> str:
    return f"<pre>{_e(chr(10).join(stack))}</pre>"


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, no scripts, no external
    assets) to attach to an incident ticket."""
    s = report["summary"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>poolscope report: {_e(report['store'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>poolscope report</h1>",
        f'<p class="muted"><code>{_e(report["store"])}</code> · generated '
        f"{_e(_when(report['generated_at']))} by poolscope {_e(report['poolscope'])}</p>",
        f"<p>{'<br>'.join(_e(line) for line in _headline(report)[:1])}</p>",
        '<div class="cards">',
    ]
    cards = [
        ("confirmed leaks", s["confirmed_leaks"], "confirmed"),
        ("suspected leaks", s["suspected_leaks"], "suspected"),
        ("unknown (crash)", s["unknown_leaks"], "unknown"),
        ("timeouts", s["timeouts"], ""),
        ("p95 wait", duration(s["wait_p95_s"]), ""),
        ("peak in use", f"{s['peak_in_use']}" + (f" / {s['capacity']}" if s["capacity"] else ""),
         ""),
    ]  # fmt: skip
    parts += [
        f'<div class="card"><b class="{cls}">{_e(v)}</b>{_e(label)}</div>'
        for label, v, cls in cards
    ]
    parts.append("</div>")
    if s["dropped"]:
        parts.append(
            f'<p class="warn">The recorder dropped {s["dropped"]} records; counts may be low.</p>'
        )
    if s.get("ignored_events"):
        parts.append(
            f'<p class="warn">{_e(_plural(s["ignored_events"], "event"))} left out: a time out '
            "of range or not a number where one belongs (a damaged or edited store).</p>"
        )

    charts = [_utilization_svg(series, report["timeouts"]) for series in
              report.get("utilization", [])]  # fmt: skip
    if charts:
        parts.append("<h2>Connections in use</h2>")
        parts += charts

    parts.append("<h2>Leaks</h2>")
    if not report["leaks"]:
        parts.append("<p>None found.</p>")
    else:
        rows = []
        for leak in report["leaks"]:
            rows.append(
                [
                    f"<code>{_e(leak['class'])}</code>",
                    f'<span class="{_e(leak["certainty"])}">{_e(leak["certainty"])}</span>',
                    _e(leak["count"]),
                    _e(duration(leak["max_held_s"])),
                    _e(leak["pool"]),
                    f"<details><summary><code>{_e(leak['site'])}</code> "
                    f'<span class="muted">threads {_e(", ".join(leak["threads"]))}</span>'
                    f"</summary>{_stack_html(leak['stack'])}</details>",
                ]
            )
        parts.append(
            _html_table(
                ["class", "certainty", "count", "max held", "pool", "site and stack"], rows, {2, 3}
            )  # fmt: skip
        )

    parts.append("<h2>Timeouts</h2>")
    if not report["timeouts"]:
        parts.append("<p>None.</p>")
    else:
        rows = []
        for t in report["timeouts"]:
            holders = "".join(
                f"<li>{_e(duration(h['held_s']))} <code>{_e(h['site'])}</code> "
                f'<span class="muted">thread {_e(h["thread"])}</span></li>'
                for h in t["holders"]
            )
            rows.append(
                [
                    _e(_when(t["at"])),
                    _e(t["pool"]),
                    f"<code>{_e(t['site'])}</code><br>"
                    f'<span class="muted">thread {_e(t["thread"])}</span>',
                    _e(duration(t["waited_s"])),
                    f"<ul>{holders}</ul>" if holders else '<span class="muted">none</span>',
                ]
            )
        parts.append(_html_table(["at (UTC)", "pool", "caller", "waited", "held by"], rows, {3}))

    parts.append("<h2>Pools</h2>")
    if report["pools"]:
        rows = [
            [
                f"<b>{_e(p['name'])}</b><br><span class='muted'>{_e(p['url'])}</span>",
                _e(p["pool_class"]),
                _e(_opt(p["pool_size"])),
                _e(_opt(p["max_overflow"])),
                _e(p["peak_in_use"]),
                _e(p["checkouts"]),
                _e(p["timeouts"]),
                _e(_quartet(p["wait_ms"])),
                _e(_quartet(p["hold_ms"])),
            ]  # fmt: skip
            for p in report["pools"]
        ]
        parts.append(
            _html_table(
                [
                    "pool",
                    "class",
                    "size",
                    "overflow",
                    "peak",
                    "checkouts",
                    "timeouts",
                    "wait p50/p95/p99/max",
                    "hold p50/p95/p99/max",
                ],
                rows,
                {2, 3, 4, 5, 6},
            )  # fmt: skip
        )
    else:
        parts.append("<p>None recorded.</p>")

    parts.append("<h2>Sites</h2>")
    if report["sites"]:
        rows = []
        for site, label in zip(report["sites"], _site_labels(report["sites"]), strict=True):
            share = site["pool_time_share"]
            rows.append(
                [
                    f'<span class="bar"><i style="width:{share * 100:.1f}%"></i></span> '
                    f"{share * 100:.1f}%",
                    _e(site["checkouts"]),
                    _e(duration(site["total_hold_s"])),
                    _e(_ms(site["hold_ms"]["p95"])),
                    _e(_ms(site["hold_ms"]["max"])),
                    _e(site["pool"]),
                    f"<details><summary><code>{_e(label)}</code>"
                    "</summary>"
                    f"{_stack_html(site['stack'])}</details>",
                ]
            )
        parts.append(
            _html_table(
                [
                    "share of pool time",
                    "checkouts",
                    "held total",
                    "p95 hold",
                    "max hold",
                    "pool",
                    "site",
                ],
                rows,
                {1, 2, 3, 4},
            )  # fmt: skip
        )
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Sizing</h2>")
    advice = [p["sizing"]["advice"] for p in report["pools"] if p.get("sizing")]
    parts += [f"<p>{_e(a)}</p>" for a in advice] or ["<p>No pool activity to size.</p>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
