"""The SQLite store: schema, opening for writing, and validated opening for reading."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .exceptions import (
    ForeignStoreError,
    StoreCorruptError,
    StoreNotFoundError,
    StoreVersionError,
)

SCHEMA_VERSION = 1
"""The store schema this poolscope writes; a reader refuses anything newer."""

APPLICATION = "poolscope"

DEFAULT_STORE = "poolscope.db"

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS processes (
    id            INTEGER PRIMARY KEY,
    pid           INTEGER NOT NULL,
    parent_id     INTEGER REFERENCES processes(id),
    host          TEXT NOT NULL,
    argv          TEXT NOT NULL,          -- JSON list
    python        TEXT NOT NULL,
    sqlalchemy    TEXT NOT NULL,
    poolscope     TEXT NOT NULL,
    started_at    REAL NOT NULL,          -- unix seconds
    heartbeat_at  REAL NOT NULL,
    ended_at      REAL,                   -- NULL: alive, or died without a clean exit
    end_reason    TEXT                    -- 'exit' for a clean interpreter exit
);
CREATE TABLE IF NOT EXISTS pools (
    id            INTEGER PRIMARY KEY,
    process_id    INTEGER NOT NULL REFERENCES processes(id),
    name          TEXT NOT NULL,
    url           TEXT NOT NULL,          -- password masked as ***
    dialect       TEXT,
    pool_class    TEXT NOT NULL,
    pool_size     INTEGER,                -- NULL where the pool class has no size
    max_overflow  INTEGER,
    timeout_s     REAL,
    recycle_s     REAL,
    leak_after_s  REAL NOT NULL,
    created_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stacks (
    id            INTEGER PRIMARY KEY,
    fingerprint   TEXT NOT NULL UNIQUE,   -- stable across processes and runs
    site          TEXT NOT NULL,          -- 'app/orders.py:42 in place_order'
    frames        TEXT NOT NULL           -- JSON list, innermost first
);
CREATE TABLE IF NOT EXISTS events (
    id            INTEGER PRIMARY KEY,
    at            REAL NOT NULL,          -- unix seconds
    process_id    INTEGER NOT NULL,
    pool_id       INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    connection_id INTEGER,                -- per-process counter of DBAPI connections
    checkout_id   INTEGER,                -- per-process counter linking checkout and return
    thread        TEXT,
    task          TEXT,                   -- asyncio task name, where there is one
    in_use        INTEGER,                -- pool counts right after the event
    idle          INTEGER,
    overflow      INTEGER,                -- in use beyond pool_size
    waiters       INTEGER,
    stack_id      INTEGER,                -- the checkout's stack
    wait_s        REAL,                   -- checkout, timeout: time waiting for the pool
    connect_s     REAL,                   -- checkout, connect: time opening a DBAPI connection
    hold_s        REAL,                   -- checkin, gc_checkin, leak_*: time held
    count         INTEGER                 -- dropped: records lost; timeout: waiters
);
CREATE INDEX IF NOT EXISTS events_by_checkout
    ON events (process_id, pool_id, checkout_id) WHERE checkout_id IS NOT NULL;
CREATE VIEW IF NOT EXISTS checkouts AS
SELECT o.process_id, o.pool_id, o.checkout_id, o.connection_id,
       o.at AS checked_out_at, o.thread, o.task, o.stack_id, o.wait_s, o.connect_s,
       o.in_use AS in_use_at_checkout,
       r.at AS returned_at, r.kind AS returned_by, r.hold_s
FROM events AS o
LEFT JOIN events AS r
  ON r.process_id = o.process_id AND r.pool_id = o.pool_id
 AND r.checkout_id = o.checkout_id AND r.kind IN ('checkin', 'gc_checkin', 'detach')
WHERE o.kind = 'checkout';
"""

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
)


def resolve_store_path(store: str | os.PathLike[str] | None) -> Path:
    """Return the store path: ``store``, else ``$POOLSCOPE_STORE``, else ``./poolscope.db``."""
    if store is None:
        store = os.environ.get("POOLSCOPE_STORE") or DEFAULT_STORE
    return Path(store).expanduser()


def connect_for_writing(path: Path, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open (creating if needed) the store at ``path`` with the current schema.

    Raises ``sqlite3.Error`` or ``OSError``; the writer catches and counts them.
    """
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        conn.execute("BEGIN IMMEDIATE")
        for statement in _split(SCHEMA):
            conn.execute(statement)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT INTO meta VALUES ('application', ?)", (APPLICATION,))
        elif int(row[0]) > SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            raise StoreVersionError(_newer_message(path, int(row[0])))
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _split(script: str) -> list[str]:
    """Split the schema into statements (``executescript`` would commit our transaction)."""
    statements, current = [], []
    for line in script.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current))
            current = []
    return [s for s in statements if s.strip()]


def _newer_message(path: Path, version: int) -> str:
    return (
        f"{path} was written by a newer poolscope (store schema {version}, this one reads "
        f"up to {SCHEMA_VERSION}); upgrade poolscope to read it"
    )


def open_for_reading(store: str | os.PathLike[str] | None) -> sqlite3.Connection:
    """Open an existing store read-only, checking that it is a poolscope store we can read.

    :param store: path to the store. May be ``None`` for ``$POOLSCOPE_STORE`` or ``./poolscope.db``.
    :raises StoreNotFoundError: no file at that path.
    :raises StoreCorruptError: not a SQLite file, or a damaged one.
    :raises ForeignStoreError: a SQLite file without poolscope's tables (including an empty file).
    :raises StoreVersionError: written by a newer poolscope.
    """
    path = resolve_store_path(store)
    if not path.exists():
        raise StoreNotFoundError(
            f"no store at {path} (attach poolscope to an engine to create one)"
        )
    if path.is_dir():
        raise StoreCorruptError(f"{path} is a directory, not a poolscope store")
    if path.stat().st_size == 0:
        raise ForeignStoreError(f"{path} is empty, not a poolscope store")
    try:
        with open(path, "rb") as fh:
            header = fh.read(16)
    except OSError as exc:
        raise StoreCorruptError(f"cannot read {path}: {exc.strerror}") from None
    if header != b"SQLite format 3\x00":
        raise StoreCorruptError(f"{path} is not a SQLite file, so not a poolscope store")
    # Read-only, but not immutable: a live process may still be writing through the WAL.
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptError(f"{path} is a damaged SQLite file ({exc})") from None
    missing = {"meta", "processes", "pools", "stacks", "events"} - tables
    if missing:
        conn.close()
        raise ForeignStoreError(
            f"{path} is a SQLite database of another application "
            f"(no {', '.join(sorted(missing))} table), not a poolscope store"
        )
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreCorruptError(f"{path} is a damaged SQLite file ({exc})") from None
    if row is None or not str(row[0]).isdigit():
        conn.close()
        raise ForeignStoreError(f"{path} has no poolscope schema version, not a poolscope store")
    if int(row[0]) > SCHEMA_VERSION:
        conn.close()
        raise StoreVersionError(_newer_message(path, int(row[0])))
    return conn
