"""The report for a terminal."""

from __future__ import annotations

import textwrap
from typing import Any

from ._common import (
    MAX_HOLDERS,
    MAX_SITES,
    MAX_TIMEOUTS,
    _headline,
    _leak_rows,
    _plain,
    _pool_rows,
    _site_rows,
)
from ._escape import escaped, visible
from .words import LEAK_MEANING, diagnosis, duration, plural, when

_WIDTH = 100


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
    report = escaped(report, visible)
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
                f"    {LEAK_MEANING[leak['class']]} · pool {leak['pool']} · "
                f"{'thread' if len(leak['threads']) == 1 else 'threads'} "
                f"{', '.join(leak['threads'])}"
            )
            if leak.get("diagnosis"):
                lines.append(f"    why: {diagnosis(leak['diagnosis'])}")
            lines += [f"      {frame}" for frame in leak["stack"]]
    lines.append("")

    lines.append("TIMEOUTS")
    if not report["timeouts"]:
        lines.append("  none")
    for t in report["timeouts"][:MAX_TIMEOUTS]:
        who = f"thread {t['thread']}" + (f", task {t['task']}" if t["task"] else "")
        lines.append(
            f"  {when(t['at'])}  pool {t['pool']}: gave up after {duration(t['waited_s'])}, "
            f"{plural(t['waiters'] or 1, 'caller')} waiting"
        )
        lines.append(f"    caller: {t['site']} ({who})")
        holders = t["holders"]
        if holders:
            lines.append(f"    held by {plural(len(holders), 'checkout')} at that moment:")
            for h in holders[:MAX_HOLDERS]:
                task = f", task {h['task']}" if h["task"] else ""
                lines.append(
                    f"      {duration(h['held_s']):>9}  {h['site']}  (thread {h['thread']}{task})"
                )
                if h.get("diagnosis"):
                    lines.append(f"                 why: {diagnosis(h['diagnosis'])}")
            if len(holders) > MAX_HOLDERS:
                lines.append(f"      … and {len(holders) - MAX_HOLDERS} more")
        else:
            lines.append("    no recorded checkout held the pool (checked out before attach?)")
    if len(report["timeouts"]) > MAX_TIMEOUTS:
        lines.append(f"  … and {len(report['timeouts']) - MAX_TIMEOUTS} more timeouts")
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
        if len(report["sites"]) > MAX_SITES:
            lines.append(f"  … and {len(report['sites']) - MAX_SITES} more sites")
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
