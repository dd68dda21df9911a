"""``poolscope push``: copy a SQLite store into a PostgreSQL store, idempotently.

Each SQLite store has an identity (``meta.store_id``, a uuid made when missing). The
PostgreSQL store remembers, per identity, the source ids of the processes and pools it
copied (``origin``, ``origin_id``) and the last event id (``pushes``): pushing again, or
pushing the same store grown since, copies only what is new, and updates the processes'
heartbeat and end. Stacks are shared by fingerprint; rollups, notable checkouts, retention
rows and diagnoses are upserted by their keys. One push is one transaction, under
an advisory lock per source store: an interrupted push leaves nothing half done.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _pg_store, _store
from ._clock import REAL
from ._pg_store import COPIED_TABLES
from ._store import PostgresStore
from .exceptions import StoreUnreachableError

EVENTS_PER_CHUNK = 50_000


@dataclass(frozen=True)
class PushResult:
    """What one push copied."""

    store_id: str
    processes: int
    pools: int
    stacks: int
    events: int


def store_identity(path: Path) -> str:
    """The SQLite store's ``meta.store_id``, made (and written) when it has none.

    :raises StoreError: not a readable poolscope store.
    """
    conn = _store.open_for_reading(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    finally:
        conn.close()
    if row is not None:
        return str(row[0])
    writer = sqlite3.connect(str(path), timeout=5, isolation_level=None)
    try:
        writer.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (str(uuid.uuid4()),))
        return str(writer.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0])
    except sqlite3.Error as exc:
        raise _store.read_error(path, exc) from None
    finally:
        writer.close()


def push(
    source: Path,
    target: PostgresStore,
    progress: Callable[[int, int], None] | None = None,
) -> PushResult:
    """Copy what ``source`` (a SQLite store) holds that ``target`` lacks into ``target``.

    :param progress: called as ``progress(events_done, events_to_copy)`` after each chunk.
        May be ``None``.
    :raises StoreError: ``source`` is not a readable store, or ``target`` cannot be reached.
    """
    origin = store_identity(source)
    src = _store.open_for_reading(source)
    pg = _pg_store.psycopg()
    try:
        with _pg_store.connect(target) as conn:
            try:
                _pg_store.ensure_schema(conn, target)
                with conn.transaction():
                    return _push(src, conn, target, origin, progress)
            except pg.Error as exc:
                raise StoreUnreachableError(
                    f"cannot push into the PostgreSQL store {target} "
                    f"({_pg_store.safe_error(exc, target)})"
                ) from None
    finally:
        src.close()


def _push(
    src: sqlite3.Connection,
    conn: Any,
    target: PostgresStore,
    origin: str,
    progress: Callable[[int, int], None] | None,
) -> PushResult:
    s = f'"{target.schema}"'
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext(%s))", (_pg_store.lock_key(target, origin),)
    )
    row = conn.execute(f"SELECT last_event_id FROM {s}.pushes WHERE origin = %s", (origin,))
    found = row.fetchone()
    last = int(found[0]) if found is not None else 0

    # Processes: new ones inserted, known ones brought up to date (heartbeat, end).
    columns = COPIED_TABLES["processes"]
    processes: dict[int, int] = {}
    new_processes = 0
    for values in src.execute(f"SELECT {', '.join(columns)} FROM processes ORDER BY id"):
        record = dict(zip(columns, values, strict=True))
        source_id = record.pop("id")
        parent = record["parent_id"]
        record["parent_id"] = processes.get(parent) if parent is not None else None
        names = list(record)
        got = conn.execute(
            f"INSERT INTO {s}.processes ({', '.join(names)}, origin, origin_id) "
            f"VALUES ({', '.join(['%s'] * len(names))}, %s, %s) "
            "ON CONFLICT (origin, origin_id) DO UPDATE SET heartbeat_at = "
            "GREATEST(processes.heartbeat_at, EXCLUDED.heartbeat_at), "
            "ended_at = COALESCE(EXCLUDED.ended_at, processes.ended_at), "
            "end_reason = COALESCE(EXCLUDED.end_reason, processes.end_reason) "
            "RETURNING id, (xmax = 0)",
            (*record.values(), origin, source_id),
        ).fetchone()
        processes[source_id] = got[0]
        new_processes += bool(got[1])

    # Pools: never change once written.
    columns = COPIED_TABLES["pools"]
    pools: dict[int, int] = {0: 0}  # a drop count written before any pool row
    new_pools = 0
    have_pre_ping = _store.has_column(src, "pools", "pre_ping")
    select = [c if c != "pre_ping" or have_pre_ping else "NULL" for c in columns]
    for values in src.execute(f"SELECT {', '.join(select)} FROM pools ORDER BY id"):
        record = dict(zip(columns, values, strict=True))
        source_id = record.pop("id")
        record["process_id"] = processes.get(record["process_id"], 0)
        names = list(record)
        got = conn.execute(
            f"INSERT INTO {s}.pools ({', '.join(names)}, origin, origin_id) "
            f"VALUES ({', '.join(['%s'] * len(names))}, %s, %s) "
            "ON CONFLICT (origin, origin_id) DO NOTHING RETURNING id",
            (*record.values(), origin, source_id),
        ).fetchone()
        if got is None:
            got = conn.execute(
                f"SELECT id FROM {s}.pools WHERE origin = %s AND origin_id = %s",
                (origin, source_id),
            ).fetchone()
        else:
            new_pools += 1
        pools[source_id] = got[0]

    # Stacks: shared by fingerprint with every other process and store; inserted in
    # fingerprint order, as the writers do, so that concurrent inserts never deadlock.
    stacks: dict[int, int] = {}
    new_stacks = 0
    for source_id, fingerprint, site, frames in src.execute(
        "SELECT id, fingerprint, site, frames FROM stacks ORDER BY fingerprint"
    ):
        got = conn.execute(
            f"INSERT INTO {s}.stacks (fingerprint, site, frames) VALUES (%s, %s, %s) "
            "ON CONFLICT (fingerprint) DO NOTHING RETURNING id",
            (fingerprint, site, frames),
        ).fetchone()
        if got is None:
            got = conn.execute(
                f"SELECT id FROM {s}.stacks WHERE fingerprint = %s", (fingerprint,)
            ).fetchone()
        else:
            new_stacks += 1
        stacks[source_id] = got[0]

    # Events: those after the last one pushed from this store, in id order.
    total = src.execute("SELECT COUNT(*) FROM events WHERE id > ?", (last,)).fetchone()[0]
    columns = [c for c in COPIED_TABLES["events"] if c != "id"]
    process_at = columns.index("process_id")
    pool_at = columns.index("pool_id")
    stack_at = columns.index("stack_id")
    done = 0
    newest = last
    with conn.cursor() as cur:
        while True:
            rows = src.execute(
                f"SELECT id, {', '.join(columns)} FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (newest, EVENTS_PER_CHUNK),
            ).fetchall()
            if not rows:
                break
            with cur.copy(f"COPY {s}.events ({', '.join(columns)}) FROM STDIN") as copy:
                for event in rows:
                    values = list(event[1:])
                    values[process_at] = processes.get(values[process_at], 0)
                    values[pool_at] = pools.get(values[pool_at], 0)
                    stack = values[stack_at]
                    values[stack_at] = stacks.get(stack) if stack is not None else None
                    copy.write_row(values)
            newest = rows[-1][0]
            done += len(rows)
            if progress is not None:
                progress(done, total)
    _push_rollups(src, conn, s, processes, pools, stacks)
    conn.execute(
        f"INSERT INTO {s}.pushes (origin, last_event_id, pushed_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (origin) DO UPDATE SET last_event_id = EXCLUDED.last_event_id, "
        "pushed_at = EXCLUDED.pushed_at",
        (origin, newest, REAL.wall()),
    )
    return PushResult(origin, new_processes, new_pools, new_stacks, done)


_KEYS = {
    "rollups": ("period_s", "start_at", "process_id", "pool_id", "stack_id"),
    "pool_rollups": ("period_s", "start_at", "process_id", "pool_id"),
    "notable": ("process_id", "pool_id", "checkout_id"),
    "retention": ("process_id",),
    "diagnoses": ("process_id", "pool_id", "checkout_id"),
}
"""The primary key of each table of schema 2 (and ``diagnoses``) that push copies."""


def _push_rollups(
    src: sqlite3.Connection,
    conn: Any,
    s: str,
    processes: dict[int, int],
    pools: dict[int, int],
    stacks: dict[int, int],
) -> None:
    """Copy the source's rollups, notable checkouts, retention rows, diagnoses and
    ``raw_since`` (schema 2; nothing for a first-release store, no diagnoses for a store
    without the table). A source process's rows are its own, so each row replaces the one
    pushed before: pushing again changes nothing, and a diagnosis completed since (its
    checkout returned) is brought up to date."""
    tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    ids = {"process_id": processes, "pool_id": pools, "stack_id": stacks}
    for table, key in _KEYS.items():
        if table not in tables:
            continue
        columns = COPIED_TABLES[table]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in key)
        action = f"DO UPDATE SET {sets}" if sets and table != "notable" else "DO NOTHING"
        rows = []
        for values in src.execute(f"SELECT {', '.join(columns)} FROM {table}"):
            row = list(values)
            for i, column in enumerate(columns):
                if column in ids and row[i]:  # 0: no pool or stack
                    row[i] = ids[column].get(row[i], 0)
            rows.append(row)
        if rows:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {s}.{table} ({', '.join(columns)}) "
                    f"VALUES ({', '.join(['%s'] * len(columns))}) "
                    f"ON CONFLICT ({', '.join(key)}) {action}",
                    rows,
                )
    if "meta" in tables:
        row = src.execute("SELECT value FROM meta WHERE key = 'raw_since'").fetchone()
        if row is not None:
            conn.execute(
                f"INSERT INTO {s}.meta (key, value) VALUES ('raw_since', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = CASE WHEN "
                "CAST(meta.value AS DOUBLE PRECISION) < CAST(EXCLUDED.value AS DOUBLE PRECISION) "
                "THEN EXCLUDED.value ELSE meta.value END",
                (str(row[0]),),
            )
