"""Helpers for testing code that uses a pool: capture the pool events it causes.

::

    from instrument.testing import capture_events

    with capture_events(engine) as events:
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
    assert [e["kind"] for e in events] == ["connect", "checkout", "checkin"]

The events are the rows poolscope would write to its store, as dicts, in the
order they happened. Our own test suite uses this helper too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import Monitor, attach, monitor_of
from ._store import EVENT_COLUMNS as _EVENT_COLUMNS
from ._store import open_for_reading as _open_for_reading

__all__ = ["EVENT_FIELDS", "capture_events"]

_ROW_COLUMNS = tuple(
    c for c in _EVENT_COLUMNS if c not in ("at", "kind", "process_id", "pool_id", "stack_id")
)
"""The ``events`` columns a captured event keeps as they are, in the store's order."""

EVENT_FIELDS = ("at", "kind", "pool", *_ROW_COLUMNS, "site", "stack")
"""Keys of every captured event dict.

``pool`` is the pool's name, ``site`` the application line that caused the
event (``None`` for events without a stack, such as ``connect``), ``stack`` its
frames innermost first (an empty list without a stack); the other keys are the
columns of the store's ``events`` table.
"""

_SELECT = f"""
SELECT e.at, e.kind, p.name, {", ".join(f"e.{c}" for c in _ROW_COLUMNS)}, s.site, s.frames
FROM events AS e
JOIN pools AS p ON p.id = e.pool_id
LEFT JOIN stacks AS s ON s.id = e.stack_id
WHERE e.process_id = ? AND e.pool_id = ? AND e.id > ?
ORDER BY e.id
"""


@contextmanager
def capture_events(
    engine: Any, *, leak_after: float | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Record the pool events of ``engine`` inside the block; fill the yielded list on exit.

    An engine that is not attached yet is attached to a temporary store for the
    block and detached afterwards. An engine that is already attached keeps its
    monitor and store; only the events recorded during the block are returned.
    The list stays empty inside the block: it is filled after everything has been
    written, when the block ends (also when it raises).

    Caveat: events the writer could not store (an unwritable store of an engine
    attached earlier, or a full queue) are missing; a ``dropped`` event counts them.

    :param engine: an ``Engine``, an ``AsyncEngine`` or a bare ``Pool``.
    :param leak_after: seconds a checkout may be held before a ``leak_suspected``
        event. May be ``None`` for the default. Ignored for an engine attached earlier.
    """
    events: list[dict[str, Any]] = []
    existing = monitor_of(engine)
    if existing is not None:
        existing.flush()
        start = _last_event_id(existing.store)
        try:
            yield events
        finally:
            existing.flush()
            events.extend(_read(existing, start))
        return

    directory = Path(tempfile.mkdtemp(prefix="poolscope-capture-"))
    kwargs = {} if leak_after is None else {"leak_after": leak_after}
    try:
        monitor = attach(engine, store=directory / "capture.db", **kwargs)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        yield events
    finally:
        try:
            monitor.flush()
            events.extend(_read(monitor, 0))
        finally:
            monitor.close()
            shutil.rmtree(directory, ignore_errors=True)


def _last_event_id(store: Path) -> int:
    try:
        conn = _open_for_reading(store)
    except Exception:  # nothing written yet (or unwritable): every later event is new
        return 0
    try:
        return conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    finally:
        conn.close()


def _read(monitor: Monitor, after_id: int) -> list[dict[str, Any]]:
    ids = monitor.store_ids
    if ids is None:
        return []
    conn = _open_for_reading(monitor.store)
    try:
        rows = conn.execute(_SELECT, (*ids, after_id)).fetchall()
    finally:
        conn.close()
    events = []
    for row in rows:
        event = dict(zip(EVENT_FIELDS, row, strict=True))
        event["stack"] = json.loads(event["stack"]) if event["stack"] else []
        events.append(event)
    return events
