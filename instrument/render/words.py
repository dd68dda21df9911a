"""How poolscope writes durations, times and leak classes, for every report format and the
dashboard alike: one wording of each, defined here only."""

from __future__ import annotations

import math
from datetime import datetime, timezone

__all__ = ["LEAK_MEANING", "duration", "plural", "when"]

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
