"""What the text and markdown reports share: the headline and the rows of their tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from .words import duration, plural, when

MAX_SITES = 15
MAX_TIMEOUTS = 20
MAX_HOLDERS = 10


def _ms(value: float | None) -> str:
    return "-" if value is None else duration(value / 1000)


def _quartet(stats: dict[str, float | None]) -> str:
    return " / ".join(_ms(stats.get(k)) for k in ("p50", "p95", "p99", "max"))


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def _plain(text: str) -> str:
    return text


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
    procs = plural(s["processes"], "process", "processes")
    if states:
        procs += f" ({', '.join(states)})"
    lines = [
        f"{procs} · {plural(s['pools'], 'pool')} · {plural(s['checkouts'], 'checkout')} · "
        f"{plural(s['events'], 'event')}",
        f"recorded from {when(s['first_event_at'])} to {when(s['last_event_at'])}",
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
            f"warning: {plural(s['ignored_events'], 'event')} left out: a time out of range or "
            "not a number where one belongs (a damaged or edited store)"
        )
    dropped_notable = report.get("source", {}).get("notable_dropped")
    if dropped_notable:
        lines.append(
            f"warning: {plural(dropped_notable, 'notable record')} not kept (past the cap of "
            "100,000 per process): leaks, timeouts or long holds among them may be missing"
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
    """The first :data:`MAX_SITES` rows of the site table of the text and markdown
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
        for s, label in zip(sites[:MAX_SITES], labels, strict=False)
    ]
    return rows


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
