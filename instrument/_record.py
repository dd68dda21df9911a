"""The record contract: what the hot path queues, and what it keeps per open checkout.

One definition, read by the listeners (``_hooks``), the writer (``_writer``), the store's
INSERT (``_store``), the pytest plugin and, through ``_record.h``, the C helpers: each
C module's ``layout()`` must equal :data:`LAYOUT`, or it is not used (see ``_native``).
"""

from __future__ import annotations

from typing import Any

EVENT_COLUMNS = (
    "at",
    "process_id",
    "pool_id",
    "kind",
    "connection_id",
    "checkout_id",
    "thread",
    "task",
    "in_use",
    "idle",
    "overflow",
    "waiters",
    "stack_id",
    "wait_s",
    "connect_s",
    "hold_s",
    "count",
)
"""Columns of ``events`` in the order the writer inserts them."""

RECORD_FIELDS = tuple(
    {"pool_id": "pool", "stack_id": "stack"}.get(column, column)
    for column in EVENT_COLUMNS
    if column != "process_id"
)
"""One event as the hot path queues it: the events row without ``process_id`` (a literal
in the INSERT), with this process's own pool key and stack id in ``pool`` and ``stack``
(mapped to the store's ids by the writer)."""

(
    AT,
    POOL,
    KIND,
    CONNECTION_ID,
    CHECKOUT_ID,
    THREAD,
    TASK,
    IN_USE,
    IDLE,
    OVERFLOW,
    WAITERS,
    STACK,
    WAIT_S,
    CONNECT_S,
    HOLD_S,
    COUNT,
) = range(len(RECORD_FIELDS))

RECORD_WIDTH = len(RECORD_FIELDS)
"""Values per record: listeners ``extend`` the flat queue by exactly this many."""

MAX_QUEUE = 200_000
"""Records held in memory before new ones are dropped (and counted)."""

MAX_QUEUE_VALUES = MAX_QUEUE * RECORD_WIDTH

NULL = ""
"""Stands for NULL in a record the hot path queues.

The sqlite3 module binds a str, int or float directly, but looks ``None`` up in its
adapter registry first; with half a record's values absent, that lookup cost about
as much as the rest of the insert. So the listeners queue ``NULL`` rather than ``None``.
A list queue's INSERT turns it back with ``NULLIF(?, '')`` in every column that may be
absent; an ``Events`` queue holds it as NULL from the start, and its INSERT binds ``?``.
"""

NULLABLE = (CONNECTION_ID, CHECKOUT_ID, THREAD, TASK, WAIT_S, CONNECT_S, HOLD_S, COUNT)
"""The record's fields that may be NULL."""

NO_SIZE = 1 << 62
"""A pool's size where it has none: so that ``in_use > size`` is simply false."""

ENTRY_FIELDS = ("checkout_id", "at", "thread", "stack", "proxy", "task")
"""An open checkout, as the listeners keep it by connection record (a tuple, cheaper to
build than an object): its id, when it was checked out, the thread and the stack id that
took it, a weak reference to the connection proxy handed out, and the asyncio task."""

CO_ID, CO_AT, CO_THREAD, CO_STACK, CO_PROXY, CO_TASK = range(len(ENTRY_FIELDS))

ENTRY_WIDTH = len(ENTRY_FIELDS)


def returned_by_gc(entry: tuple[Any, ...]) -> bool:
    """Whether the checkout ``entry``, being returned now, was returned by the garbage
    collector: its proxy was already gone at checkin, so no code closed it (a leak)."""
    return entry[CO_PROXY]() is None


LAYOUT: dict[str, Any] = {
    "width": RECORD_WIDTH,
    "fields": dict(zip(RECORD_FIELDS, range(RECORD_WIDTH), strict=True)),
    "no_size": NO_SIZE,
    "entry_width": ENTRY_WIDTH,
    "entry": dict(zip(ENTRY_FIELDS, range(ENTRY_WIDTH), strict=True)),
}
"""What the C helpers' ``layout()`` must return, exactly: a helper compiled against
another contract is left off rather than trusted to write rows."""
