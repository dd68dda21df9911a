"""The SQLite store: schema, opening for writing, and validated opening for reading."""

from __future__ import annotations

import os
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._clock import REAL
from ._record import EVENT_COLUMNS as EVENT_COLUMNS  # the order the writer inserts them
from .exceptions import (
    ForeignStoreError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreVersionError,
)

SCHEMA_VERSION = 2
"""The store schema this poolscope writes; a reader refuses anything newer.

1: the first release (events, processes, pools, stacks). 2 adds the rollups, pool_rollups,
notable and retention tables (a writer adds them to a version 1 store in place, and marks
it 2); a version 1 store still reads."""

APPLICATION = "poolscope"

DEFAULT_STORE = "poolscope.db"

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
    created_at    REAL NOT NULL,
    pre_ping      INTEGER                 -- 1/0; NULL in rows older poolscopes wrote
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
                                          -- invalidate: 1 disconnect, 0 other error
);
CREATE INDEX IF NOT EXISTS events_by_checkout
    ON events (process_id, pool_id, checkout_id) WHERE checkout_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS rollups (          -- schema 2: per call site and period
    period_s      INTEGER NOT NULL,       -- 60 (minute) or 3600 (hour, for older data)
    start_at      REAL NOT NULL,          -- period start, a multiple of period_s
    process_id    INTEGER NOT NULL,
    pool_id       INTEGER NOT NULL,
    stack_id      INTEGER NOT NULL,       -- the checkout's stack (0 where none)
    checkouts     INTEGER NOT NULL,       -- checkouts that started in the period
    returns       INTEGER NOT NULL,       -- checkins + gc_checkins (by return time)
    gc_returned   INTEGER NOT NULL,
    timeouts      INTEGER NOT NULL,
    leaks         INTEGER NOT NULL,       -- leak_* events (any class) in the period
    hold_sum_s    REAL NOT NULL,          -- hold: by return time
    hold_max_s    REAL,
    hold_hist     BLOB,                   -- instrument._histogram BLOB
    wait_sum_s    REAL NOT NULL,          -- wait: by checkout time
    wait_max_s    REAL,
    wait_hist     BLOB,
    connect_sum_s REAL NOT NULL,
    connects      INTEGER NOT NULL,
    PRIMARY KEY (period_s, start_at, process_id, pool_id, stack_id)
);
CREATE TABLE IF NOT EXISTS pool_rollups (     -- schema 2: per pool, process and period
    period_s      INTEGER NOT NULL,
    start_at      REAL NOT NULL,
    process_id    INTEGER NOT NULL,
    pool_id       INTEGER NOT NULL,
    events        INTEGER NOT NULL,
    peak_in_use   INTEGER,
    peak_overflow INTEGER,
    peak_waiters  INTEGER,
    peak_demand   INTEGER,                -- in_use + waiters
    in_use_s      REAL,                   -- integral of in_use over the period covered
    invalidations INTEGER NOT NULL,
    disconnects   INTEGER NOT NULL,
    PRIMARY KEY (period_s, start_at, process_id, pool_id)
);
CREATE TABLE IF NOT EXISTS notable (          -- schema 2: checkouts whose raw rows are kept
    process_id    INTEGER NOT NULL,
    pool_id       INTEGER NOT NULL,
    checkout_id   INTEGER NOT NULL,
    reason        TEXT NOT NULL,          -- 'leak', 'long_hold', 'timeout_holder'
    PRIMARY KEY (process_id, pool_id, checkout_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retention (        -- schema 2: per process, where pruning stands
    process_id      INTEGER PRIMARY KEY,
    raw_since       REAL NOT NULL,        -- raw events of this process at or after: complete
    keep_raw_s      REAL,                 -- the retention asked for (NULL: none)
    effective_keep_s REAL,                -- the retention applied (shorter near the size cap)
    pruned          INTEGER NOT NULL DEFAULT 0,   -- raw events deleted once rolled up
    notable         INTEGER NOT NULL DEFAULT 0,   -- checkouts marked notable
    notable_dropped INTEGER NOT NULL DEFAULT 0,   -- notable rows not kept: past the cap
    raw_skipped     INTEGER NOT NULL DEFAULT 0    -- events rolled up, not stored raw (size cap)
);
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

# -- diagnoses (issue 18): one row per diagnosed checkout; kept like the notable rows ----
# A long hold (past leak_after), a leak or a pool timeout's holder gets one row, written
# when the watchdog flags it (complete = 0: the breakdown so far) and again at its return
# (complete = 1). The server_* columns are the first sample of pg_stat_activity, kept.
DIAGNOSES_SCHEMA = """
CREATE TABLE IF NOT EXISTS diagnoses (
    process_id    INTEGER NOT NULL,
    pool_id       INTEGER NOT NULL,
    checkout_id   INTEGER NOT NULL,
    at            REAL NOT NULL,          -- when the breakdown below was taken
    hold_s        REAL,                   -- held until then
    complete      INTEGER NOT NULL,       -- 1: the breakdown covers the whole hold
    statements    INTEGER,                -- NULL: no breakdown (diagnose="server")
    sql_s         REAL,
    idle_in_transaction_s REAL,
    idle_s        REAL,
    server_at     REAL,                   -- NULL: no server view (not PostgreSQL, or failed)
    server_pid    INTEGER,
    server_state  TEXT,                   -- pg_stat_activity.state
    xact_start    REAL,
    state_change  REAL,
    wait_event_type TEXT,
    wait_event    TEXT,
    query         TEXT,                   -- literals masked; never a parameter
    blocked_by    TEXT,                   -- JSON list of {pid, site, checkout_id}
    PRIMARY KEY (process_id, pool_id, checkout_id)
);
"""

DIAGNOSIS_COLUMNS = (
    "checkout_id", "at", "hold_s", "complete", "statements", "sql_s",
    "idle_in_transaction_s", "idle_s", "server_at", "server_pid", "server_state",
    "xact_start", "state_change", "wait_event_type", "wait_event", "query", "blocked_by",
)  # fmt: skip
"""The columns after ``process_id, pool_id`` that the writer upserts."""

_BREAKDOWN = ("at", "hold_s", "complete", "statements", "sql_s", "idle_in_transaction_s", "idle_s")
UPSERT_DIAGNOSIS = (
    f"INSERT INTO diagnoses (process_id, pool_id, {', '.join(DIAGNOSIS_COLUMNS)}) "
    f"VALUES (?, ?, {', '.join('?' * len(DIAGNOSIS_COLUMNS))}) "
    "ON CONFLICT (process_id, pool_id, checkout_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN excluded.complete >= diagnoses.complete THEN excluded.{c} "
        f"ELSE diagnoses.{c} END"
        for c in _BREAKDOWN
    )
    + ", "
    + ", ".join(
        f"{c} = CASE WHEN diagnoses.server_at IS NULL THEN excluded.{c} ELSE diagnoses.{c} END"
        for c in DIAGNOSIS_COLUMNS[8:]
    )
)
"""A diagnosis: the breakdown replaced unless the row's is complete and the new one is
not; the server's view kept from the first sample that had one."""
# -- end of diagnoses --------------------------------------------------------------------

WRITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
)


def valid_text(text: str) -> str:
    """``text`` as valid UTF-8 text, as SQLite's TEXT must be.

    A lone surrogate cannot be encoded: a file name's undecodable byte (which Python holds
    as one, ``surrogateescape``) is written as ``\\xff``, any other as ``\\ud800``. Only
    names that need it pay for more than the check.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


DEFAULT_PG_SCHEMA = "poolscope"
"""The PostgreSQL schema a store URL records into unless its ``?schema=`` names another."""

POSTGRES_SCHEMES = ("postgresql+psycopg", "postgresql", "postgres")
"""URL schemes that name a PostgreSQL store (written through psycopg 3)."""

_DB_SCHEMES = frozenset(
    {"sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql", "redshift",
     "cockroachdb", "snowflake", "duckdb", "clickhouse", "mongodb", "redis", "db2", "sybase",
     "firebird", "teradata", "trino", "presto", "bigquery", "databricks", "hana", "ibm_db_sa"}
)  # fmt: skip
"""Schemes that make ``scheme:...`` a database URL, not a file name, even without ``//``."""

_URL_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(//)?")
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class PostgresStore:
    """A PostgreSQL store: the server's URL and the schema poolscope's tables live in.

    ``str()`` gives the URL with its password (and secret query values) as ``***``: that
    is all that ever reaches a log line, an error or the store.
    """

    conninfo: str = field(repr=False)
    """The URL as libpq takes it (``postgresql://...``), password included: never shown."""
    schema: str
    """The schema holding the tables (``poolscope`` unless the URL's ``?schema=`` says)."""
    display: str
    """The URL as given, secrets masked."""
    url: str = field(repr=False, default="")
    """The URL as given, password included: never shown."""

    @property
    def name(self) -> str:
        return self.display

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"PostgresStore({self.display!r})"


def parse_store(store: str | os.PathLike[str]) -> Path | PostgresStore:
    """Tell what ``store`` names: a SQLite file (a path) or a PostgreSQL store (a URL).

    :raises ValueError: ``store`` looks like a URL (``scheme://``, or ``scheme:`` with a
        database's scheme) but not one of PostgreSQL's, or a PostgreSQL URL with a bad
        ``?schema=``.
    """
    text = os.fspath(store)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    match = _URL_LIKE.match(text)
    if match is None:
        return Path(text).expanduser()
    scheme = match.group(1).lower()
    if scheme in POSTGRES_SCHEMES and match.group(2):
        return _postgres_store(text)
    if not match.group(2) and scheme.split("+")[0] not in _DB_SCHEMES:
        return Path(text).expanduser()  # "C:\\stores\\a.db", "notes:1.db": a file name
    from ._secrets import masked_argv

    shown = masked_argv([text])[0]
    if scheme.startswith(("postgresql+", "postgres+")):
        raise ValueError(
            f"poolscope writes to PostgreSQL through psycopg 3, not {scheme.split('+')[1]}: "
            f"give the store as a postgresql+psycopg:// URL, not {shown}"
        )
    raise ValueError(
        f"store {shown} is neither a file path (a SQLite store) nor a postgresql+psycopg:// "
        "URL (a PostgreSQL store); poolscope records into no other database"
    )


def _postgres_store(url: str) -> PostgresStore:
    from ._secrets import masked_argv

    shown = masked_argv([url])[0]
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_PG_SCHEMA
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(
            f"?schema={schema!r} in store {shown} is not a plain PostgreSQL name (letters, "
            "digits and _, not starting with a digit, at most 63)"
        )
    rest = [(k, v) for k, v in query if k != "schema"]
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    return PostgresStore(conninfo=conninfo, schema=schema.lower(), display=shown, url=url)


def resolve_store_path(store: str | os.PathLike[str] | None) -> Path | PostgresStore:
    """Return the store: ``store``, else ``$POOLSCOPE_STORE``, else ``./poolscope.db``; a
    path for a SQLite file, a :class:`PostgresStore` for a PostgreSQL URL.

    :raises ValueError: a URL of another database (see :func:`parse_store`).
    """
    if store is None:
        store = os.environ.get("POOLSCOPE_STORE") or DEFAULT_STORE
    if isinstance(store, PostgresStore | Path):
        return store
    return parse_store(store)


WRITE_BUSY_TIMEOUT_MS = 5000
"""How long the writer's connections wait for a lock another process holds on the store."""


def connect_for_writing(
    path: Path, busy_timeout_ms: int = WRITE_BUSY_TIMEOUT_MS
) -> sqlite3.Connection:
    """Open (creating if needed) the store at ``path`` with the current schema.

    Raises ``sqlite3.Error`` or ``OSError``; the writer catches and counts them.
    """
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        _refuse_foreign(conn, path)
        for pragma in WRITE_PRAGMAS:
            _execute_when_free(conn, pragma, busy_timeout_ms)
        conn.execute("BEGIN IMMEDIATE")
        for statement in _split(SCHEMA):
            conn.execute(statement)
        for statement in _split(DIAGNOSES_SCHEMA):  # diagnoses (issue 18)
            conn.execute(statement)
        _add_columns(conn)
        if conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is None:
            # A new store (or one without events yet): index its rare rows as it grows. An
            # older store is not indexed here: that would read all its events under the
            # write lock; readers find its rare rows by a scan instead.
            conn.execute(RARE_EVENTS_INDEX)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT INTO meta VALUES ('application', ?)", (APPLICATION,))
        elif int(row[0]) > SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            raise StoreVersionError(_newer_message(path, int(row[0])))
        elif int(row[0]) < SCHEMA_VERSION:
            # A first-release store: the tables above were just added; it is now version 2.
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
        # Which store this is, wherever its file is copied: push maps its rows by it.
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (str(uuid.uuid4()),))
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


RARE_EVENTS_INDEX = (
    "CREATE INDEX IF NOT EXISTS events_rare ON events (id) WHERE kind IN ('timeout', 'dropped')"
)
"""The timeouts and ``dropped`` records, a few rows in millions, indexed so a reader finds
them without reading every event (:func:`has_rare_index`). Only those rows enter the
index: writing any other event costs the evaluation of its ``kind`` test."""


def has_rare_index(conn: sqlite3.Connection) -> bool:
    """Whether the store has :data:`RARE_EVENTS_INDEX` (a store created before it has not)."""
    sql = "SELECT 1 FROM main.sqlite_master WHERE type = 'index' AND name = 'events_rare'"
    return conn.execute(sql).fetchone() is not None


ADDED_COLUMNS = {"pools": (("pre_ping", "INTEGER"),)}
"""Columns added to schema 1 since its first release: a store made before gets them when
opened for writing; readers check that a column is there before they read it."""


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the :data:`ADDED_COLUMNS` a store lacks (in the caller's transaction)."""
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of the store open on ``conn`` (1 or 2)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else 1


def has_table(conn: sqlite3.Connection, table: str) -> bool:
    """Whether the store open on ``conn`` has ``table`` (a version 1 store has no rollups)."""
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return conn.execute(sql, (table,)).fetchone() is not None


def raw_since(conn: sqlite3.Connection) -> float | None:
    """From when the raw events of every process in the store are complete (meta
    ``raw_since``, unix seconds); ``None`` where no raw event was ever pruned or skipped."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'raw_since'").fetchone()
    return float(row[0]) if row is not None else None


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    """Whether ``table`` of the store open on ``conn`` has ``column`` (an added one may not)."""
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


def _execute_when_free(conn: sqlite3.Connection, sql: str, busy_timeout_ms: int) -> None:
    """Run ``sql``, retrying while SQLite says the database is locked.

    Switching a new file to WAL while another process does the same can fail at once
    with "database is locked", without waiting on the busy timeout (SQLite refuses to
    wait where waiting could deadlock): several processes starting on one new store
    would each lose their store. Runs on the writer thread, never the application's.
    """
    deadline = REAL.perf() + busy_timeout_ms / 1000
    while True:
        try:
            conn.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or REAL.perf() > deadline:
                raise
            time.sleep(0.01)


def _refuse_foreign(conn: sqlite3.Connection, path: Path) -> None:
    """Raise ``ForeignStoreError`` if ``path`` holds another application's database.

    Only reads: a store with no tables yet (a new file, or one another process is
    creating) or one whose ``meta`` says poolscope is ours; anything else is left as it
    is, journal mode included. A file that is not SQLite fails the read with
    ``sqlite3.DatabaseError``, before anything is written to it either.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
        if row is not None and row[0] == APPLICATION:
            return
    raise ForeignStoreError(
        f"{path} is a SQLite database of another application (tables "
        f"{', '.join(sorted(tables)[:5])}{', ...' if len(tables) > 5 else ''}), not a poolscope "
        "store; poolscope leaves it untouched and records nothing"
    )


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
    if isinstance(path, PostgresStore):
        from . import _pg_store

        return _pg_store.open_for_reading(path)
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
    uri = path.resolve().as_uri()
    try:
        try:
            conn, tables = _open_read_only(uri + "?mode=ro")
        except sqlite3.OperationalError as exc:
            if _error_name(exc) != "SQLITE_CANTOPEN":
                raise
            # A WAL store in a directory this user cannot write: SQLite cannot make the
            # -shm file a reader needs. Read as immutable, which needs none; what is only
            # in a -wal file left there (a writer killed mid-run) is not seen.
            conn, tables = _open_read_only(uri + "?immutable=1")
    except sqlite3.DatabaseError as exc:
        raise read_error(path, exc) from None
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
        raise read_error(path, exc) from None
    if row is None or not str(row[0]).isdigit():
        conn.close()
        raise ForeignStoreError(f"{path} has no poolscope schema version, not a poolscope store")
    if int(row[0]) > SCHEMA_VERSION:
        conn.close()
        raise StoreVersionError(_newer_message(path, int(row[0])))
    return conn


READ_BUSY_TIMEOUT_MS = 5000
"""How long a reader waits for a lock another process holds before calling the store locked."""


def _open_read_only(uri: str) -> tuple[sqlite3.Connection, set[str]]:
    """Open ``uri`` and read its table names (the first read: where a lock or damage shows)."""
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={int(READ_BUSY_TIMEOUT_MS)}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except BaseException:
        conn.close()
        raise
    return conn, tables


def _error_name(exc: Exception) -> str:
    """SQLite's name for the primary error code of ``exc`` (``SQLITE_BUSY``), where known."""
    name = getattr(exc, "sqlite_errorname", None)  # sqlite3 errors, Python 3.11+
    if isinstance(name, str):
        return "_".join(name.split("_")[:2])
    text = str(exc)  # older Pythons, and pandas' wrapping of a sqlite3 error
    if "database is locked" in text or "database table is locked" in text:
        return "SQLITE_BUSY"
    return "SQLITE_CANTOPEN" if "unable to open database file" in text else ""


def read_error(path: Path, exc: Exception) -> StoreError:
    """The error to raise for ``exc``, met reading the store at ``path``: locked, or damaged."""
    if _error_name(exc) in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return StoreLockedError(
            f"{path} is locked by {_lock_holder(path)}; try again when it lets go"
        )
    return StoreCorruptError(f"{path} is a damaged SQLite file ({exc})")


def _lock_holder(path: Path) -> str:
    """Who holds a lock on ``path``, as well as this system tells (Linux: ``/proc/locks``)."""
    try:
        st = os.stat(path)
        file_id = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
        with open("/proc/locks") as fh:
            pids = {int(line.split()[4]) for line in fh if file_id in line}
    except (OSError, ValueError, IndexError):
        pids = set()
    pids.discard(-1)  # an open-file-description lock names no process
    if not pids:
        return "another process"
    pid = min(pids)
    if pid == os.getpid():
        return f"this process (pid {pid})"
    try:
        with open(f"/proc/{pid}/comm") as fh:
            command = valid_text(fh.read().strip())
    except OSError:
        return f"another process (pid {pid})"
    return f"another process (pid {pid}, {command})"
