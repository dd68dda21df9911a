"""How poolscope writes durations, times and leak classes, for every report format and the
dashboard alike: one wording of each, defined here only."""

from __future__ import annotations

import math
from datetime import datetime, timezone

__all__ = ["DIAGNOSIS_MEANING", "LEAK_MEANING", "diagnosis", "duration", "plural", "when"]

LEAK_MEANING = {
    "never_returned": "still checked out when its process exited",
    "gc_reclaimed": "returned only by the garbage collector, never closed by code",
    "open_at_crash": "still checked out when its process died (no clean exit)",
    "held_too_long": "held past leak_after, returned later",
    "open_now": "held past leak_after and still open in a live process",
}
"""What each leak class means, in the order pages list them (the sentences of DESIGN.md)."""


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def duration(seconds: float | None, missing: str = "-") -> str:
    """Write a duration the way people read it: ``85 µs``, ``40.1 ms``, ``1.25 s``, ``3m 05s``,
    ``2h 30m``; ``missing`` for ``None`` or NaN."""
    if _missing(seconds):
        return missing
    seconds = float(seconds)  # type: ignore[arg-type]
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def when(at: str | float | None, missing: str = "-") -> str:
    """Write a time as UTC to the millisecond, ``2026-11-27 13:09:17.346Z``, from the report's
    ISO 8601 (``2026-11-27T13:09:17.346Z``) or from unix seconds; ``missing`` for none."""
    if isinstance(at, str):
        return at.replace("T", " ") if at else missing
    if _missing(at):
        return missing
    moment = datetime.fromtimestamp(float(at), tz=timezone.utc)  # type: ignore[arg-type]
    return moment.isoformat(sep=" ", timespec="milliseconds").replace("+00:00", "Z")


def plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 pool``, ``2 pools``; ``plural`` for a word that does not just take an ``s``."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"


DIAGNOSIS_MEANING = {
    "slow_sql": "running SQL",
    "idle_in_transaction": "idle in transaction",
    "idle": "idle, no transaction open",
    "lock_wait": "waiting on a lock",
}
"""What each diagnosis kind means, as the sentence after a hold's time."""


def _clock(at: str | None) -> str:
    """The time of day of an ISO 8601 time, to the tenth of a second: ``12:00:01.2``."""
    return at[11:21] if isinstance(at, str) and len(at) >= 21 else "?"


def diagnosis(d: dict | None) -> str:  # type: ignore[type-arg]
    """One line for a hold's diagnosis: ``held 3.02 s: 1 statement, 4 ms SQL, 3.01 s idle in
    transaction (server: idle in transaction since 12:00:01.2, last UPDATE orders SET ...)``;
    ``held 0.61 s when sampled: ...`` where the checkout never came back (what was seen when
    it was flagged); ``""`` for none."""
    if not d:
        return ""
    parts = []
    if d.get("statements") is not None:
        parts.append(plural(int(d["statements"]), "statement"))
        parts.append(f"{duration(d.get('sql_s'))} SQL")
        for key, words in (("idle_in_transaction_s", "idle in transaction"), ("idle_s", "idle")):
            if (d.get(key) or 0) >= 0.001:
                parts.append(f"{duration(d[key])} {words}")
    elif d.get("kind"):
        # The kind as the report has it, or escaped for markdown (idle\_in\_transaction).
        kind = str(d["kind"]).replace("\\", "")
        parts.append(DIAGNOSIS_MEANING.get(kind, kind))
    # A checkout never returned keeps what was seen when it was flagged: say so.
    when = "" if d.get("complete", True) else " when sampled"
    text = f"held {duration(d.get('held_s'))}{when}: {', '.join(parts) or 'no breakdown'}"
    server = d.get("server")
    if server:
        state = server.get("state") or "unknown"
        said = f"{state} since {_clock(server.get('state_change'))}"
        if server.get("wait_event_type") and state == "active":  # idle ones wait on the client
            said += f", waiting on {server['wait_event_type']}/{server.get('wait_event')}"
        if server.get("query"):
            said += f", {'running' if state == 'active' else 'last'} {server['query']}"
        text += f" (server: {said})"
    blockers = d.get("blocked_by") or []
    if blockers:
        named = [
            f"{b['site']} (pid {b['pid']})" if b.get("site") else f"pid {b['pid']} (not ours)"
            for b in blockers
        ]
        text += f"; blocked by {', '.join(named)}"
    return text
