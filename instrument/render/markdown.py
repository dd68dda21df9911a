"""The report as GitHub-flavoured markdown, for an issue, a wiki page or a CI summary."""

from __future__ import annotations

from typing import Any

from ._common import MAX_HOLDERS, MAX_TIMEOUTS, _headline, _leak_rows, _pool_rows, _site_rows
from ._escape import escaped, md
from .words import LEAK_MEANING, diagnosis, duration, when


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

    Every string of the report is escaped (:func:`md`) before it is laid out, so a name
    or a path can neither break a line or a table row nor start markup."""
    report = escaped(report, md)
    meaning = {md(k): v for k, v in LEAK_MEANING.items()}
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
                *([f"Why: {diagnosis(leak['diagnosis'])}.", ""] if leak.get("diagnosis") else []),
                *_md_stack(leak["stack"]),
            ]
    out += ["", "## Timeouts", ""]
    if not report["timeouts"]:
        out.append("None.")
    for t in report["timeouts"][:MAX_TIMEOUTS]:
        out.append(
            f"- **{when(t['at'])}**, pool {_md_code(t['pool'])}: {_md_code(t['site'])} "
            f"(thread {_md_code(t['thread'])}) gave up after {duration(t['waited_s'])}; held by:"
        )
        for h in t["holders"][:MAX_HOLDERS]:
            out.append(
                f"  - {duration(h['held_s'])} {_md_code(h['site'])} "
                f"(thread {_md_code(h['thread'])})"
                + (f": {diagnosis(h['diagnosis'])}" if h.get("diagnosis") else "")
            )
        if not t["holders"]:
            out.append("  - no recorded checkout")
    if len(report["timeouts"]) > MAX_TIMEOUTS:
        out.append(f"- … and {len(report['timeouts']) - MAX_TIMEOUTS} more")
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
