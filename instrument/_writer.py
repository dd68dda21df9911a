"""The background writer: one daemon thread per process and store, batching records into SQLite."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import platform
import re
import socket
import sqlite3
import sys
import threading
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _store
from ._clock import REAL
from ._stacks import StackTable

if TYPE_CHECKING:
    from ._hooks import Monitor

logger = logging.getLogger("instrument")

Record = tuple[Any, ...]
"""One event as the hot path builds it: ``(at, pool_key, kind, connection_id,
checkout_id, thread, task, in_use, idle, overflow, waiters, stack_local_id,
wait_s, connect_s, hold_s, count)``."""

RECORD_WIDTH = 16
"""Values per record: listeners ``extend`` the flat queue by exactly this many."""

MAX_QUEUE = 200_000
"""Records held in memory before new ones are dropped (and counted)."""

MAX_QUEUE_VALUES = MAX_QUEUE * RECORD_WIDTH

SCHEDULE_DELAY_SECONDS = 0.5
"""How long the writer sleeps between batches, unless the queue holds a full batch.

Every time the writer takes the GIL back it waits for it (up to Python's 5 ms switch
interval), and the application wakes it at each of its own releases meanwhile: so the
fewer batches, the less the application pays. 0.5 s rather than 0.2 s measured about
three points of a fast SQLite loop; it is also the watchdog's resolution and what a
hard crash can lose."""

BATCH_THRESHOLD_VALUES = 50_000 * RECORD_WIDTH
"""Queued values past which the writer starts the next batch without sleeping."""

SPARE_CAPACITY_RECORDS = 65_536
"""The most records whose buffer is kept from one batch to be the queue's next (16 MB)."""

HEARTBEAT_SECONDS = 2.0
RETRY_OPEN_SECONDS = 5.0

ROWS_PER_STATEMENT = 200
"""Rows per multi-row INSERT: fewer statements means fewer GIL hand-offs with the app."""

NULL = ""
"""Stands for NULL in a record the hot path queues.

The sqlite3 module binds a str, int or float directly, but looks ``None`` up in its
adapter registry first; with half a record's values absent, that lookup cost about
as much as the rest of the insert. So the listeners queue ``NULL`` rather than ``None``.
A list queue's INSERT turns it back with ``NULLIF(?, '')`` in every column that may be
absent; an ``Events`` queue holds it as NULL from the start, and its INSERT binds ``?``.
"""

# A record is the events row without process_id (a literal in the statement); its
# pool key and stack id are this process's own numbers, mapped to the store's ids
# column-wise (map over a slice) rather than row by row. A queued list holds NULL as
# "" (see NULL), which the statement turns back; an Events holds it as NULL already.
_NULLABLE = "NULLIF(?, '')"


def _row(nullable: str) -> str:
    """One row of the events INSERT, with ``nullable`` for each column that may be NULL."""
    return (
        "(?, {pid}, ?, ?, "  # at, process_id, pool_id, kind
        + ", ".join([nullable] * 4)  # connection_id, checkout_id, thread, task
        + ", ?, ?, ?, ?, ?, "  # in_use, idle, overflow, waiters, stack_id
        + ", ".join([nullable] * 4)  # wait_s, connect_s, hold_s, count
        + ")"
    )


_ROW_FROM_LIST = _row(_NULLABLE)
_ROW_FROM_EVENTS = _row("?")
_INSERT_PREFIX = f"INSERT INTO events ({', '.join(_store.EVENT_COLUMNS)}) VALUES "
_POOL_AT = 1
_STACK_AT = 11


def _load_sqlite_rows() -> Any:
    """The C inserter, if built and able to reach the sqlite3 module's own SQLite; else None."""
    try:
        import _sqlite3

        from . import _sqlite_rows
    except ImportError:
        return None
    major, minor, patch = sqlite3.sqlite_version_info
    try:
        found = _sqlite_rows.load(_sqlite3.__file__, major * 1_000_000 + minor * 1000 + patch)
    except (AttributeError, TypeError):  # a built-in module has no file to look in
        return None
    return _sqlite_rows if found else None


sqlite_rows = _load_sqlite_rows()
"""The C inserter (``_sqlite_rows.c``), or ``None`` where it is not built or cannot find
SQLite. Where it is, the queue is its ``Events``: records held as C values, which the
writer binds and steps with the GIL released, and frees without it. Where it is not, the
queue is a flat list, bound through ``executemany``, which holds the GIL for every value."""


class _FlushMarker:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Writer:
    """Owns the queue, the stack table and the SQLite connection for one store in one process.

    Listeners ``extend`` the flat ``queue`` by one record (``emit`` does the same, for
    rarer events), behind a length check; the writer thread wakes every
    ``SCHEDULE_DELAY_SECONDS`` (at once past a batch), drains the queue, and writes
    everything in one transaction. It never raises: a store it cannot open or
    write is reported once through ``logging`` and its records are counted as dropped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Flat: each record is RECORD_WIDTH consecutive values, in an Events of the C
        # inserter or a list. extend() and the writer's take (Events.take, or a
        # slice-then-delete of the list) are each atomic under the GIL, and need no lock.
        self._rows = sqlite_rows  # fixed for this writer: the queue's kind depends on it
        self.queue: Any = [] if self._rows is None else self._rows.Events(RECORD_WIDTH)
        # An empty Events whose buffers become the queue's at the next take.
        self._spare: Any = None if self._rows is None else self._rows.Events(RECORD_WIDTH)
        self.drops: list[int] = []
        self._markers: list[_FlushMarker] = []
        self._insert_one = ""
        self._insert_many = ""
        # The C inserter, once the store's connection is known to be the one it reaches.
        self._rows_in_c: Any = None
        self.stacks = StackTable()
        self.monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()
        # Pool rows to write, by pool key; kept after a monitor is gone, since its
        # queued events still need their pool row.
        self.pools: dict[int, dict[str, Any]] = {}
        self.process_id: int | None = None
        self.parent_process_id: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._pool_ids: dict[int, int] = {}
        self._stack_ids: dict[int, int] = {}
        self._failed_at: float | None = None
        self._reported_failure = False
        self._pending_drops = 0
        self._last_heartbeat = 0.0
        self._wake = threading.Event()
        # Held by the writer thread while it works in SQLite, and by fork() (see
        # _before_fork): a child must not inherit a SQLite mutex held mid-write.
        self._io_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped_total = 0

    # -- producer side ----------------------------------------------------------------

    def emit(self, record: Record) -> None:
        """Queue one record; drop and count it when the queue is full (never blocks)."""
        if len(self.queue) < MAX_QUEUE_VALUES:
            self.queue.extend(record)
        else:
            self.drops.append(1)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name=f"poolscope-writer:{self.path.name}", daemon=True
            )
            self._thread.start()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every record queued before this call is written (or dropped)."""
        if self._thread is None or not self._thread.is_alive():
            self._drain()
            return True
        marker = _FlushMarker()
        self._markers.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def shutdown(self, timeout: float = 10.0, reason: str | None = None) -> None:
        """Stop the thread after draining everything; idempotent and bounded by ``timeout``."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._drain()
            if reason is not None:
                self._record_end(reason)
            self._close()

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            # A backlog past the batch threshold is written at once; otherwise the
            # writer sleeps, so that it wakes (and takes the GIL) a few times a second.
            if len(self.queue) < BATCH_THRESHOLD_VALUES:
                self._wake.wait(SCHEDULE_DELAY_SECONDS)
            self._wake.clear()
            with self._io_lock:
                try:
                    # The watchdog first: what it flags as of now goes out with this
                    # batch, so a flush() also writes the flags due when it was called.
                    self._watch()
                    self._drain()
                except Exception:  # never let the thread die; the app must not notice
                    logger.exception("poolscope writer failed; continuing")

    def _drain(self) -> None:
        markers = self._markers[:]
        if markers:
            del self._markers[: len(markers)]
        queue = self.queue  # taken after the markers: all they wait for is in it
        n = len(queue)
        n -= n % RECORD_WIDTH
        if not n and not self.drops and not markers and not self._due_heartbeat():
            return
        if self._rows is not None:
            flat = queue.take(self._spare)
        else:
            flat = queue[:n]
            del queue[:n]
        ndrops = len(self.drops)
        if ndrops:
            del self.drops[:ndrops]
        try:
            self._write(flat, ndrops)
        finally:
            for marker in markers:
                marker.done.set()
            if self._rows is not None:
                # Its buffers kept for the queue's next batch.
                flat.clear(SPARE_CAPACITY_RECORDS)
                self._spare = flat

    def _write(self, flat: Any, ndrops: int) -> None:
        nrecords = len(flat) // RECORD_WIDTH
        conn = self._connection()
        if conn is None:
            self._pending_drops += nrecords + ndrops
            self.dropped_total += nrecords + ndrops
            return
        self.dropped_total += ndrops
        dropped = self._pending_drops + ndrops
        pid = self.process_id
        try:
            now = REAL.wall()
            if dropped or not self._write_in_one_call(conn, flat, now):
                conn.execute("BEGIN IMMEDIATE")
                self._write_stacks(conn)
                self._write_pools(conn)
                if not self._insert_in_c(conn, flat):
                    self._insert_in_python(conn, flat)
                if dropped:
                    conn.execute(
                        "INSERT INTO events (at, process_id, pool_id, kind, count) "
                        "VALUES (?, ?, ?, 'dropped', ?)",
                        (now, pid, next(iter(self._pool_ids.values()), 0), dropped),
                    )
                conn.execute(self._heartbeat(now))
                conn.execute("COMMIT")
            self._last_heartbeat = now
            self._pending_drops = 0
            self.written += nrecords
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._pending_drops += nrecords
            self.dropped_total += nrecords
            self._report_failure(exc)

    def _write_in_one_call(self, conn: sqlite3.Connection, flat: Any, now: float) -> bool:
        """The common batch (no new stack or pool to write first) as one transaction in C:
        BEGIN, the rows, the heartbeat and COMMIT with the GIL released once. False, having
        written nothing, where it cannot.

        Each release of the GIL costs the writer a wait to take it back, during which the
        application wakes it at every release of its own: one release instead of four
        statements' worth measured about two and a half points of a fast SQLite loop.
        """
        if not self._rows_in_c or self.stacks.pending or self.pools.keys() - self._pool_ids:
            return False
        return self._insert_in_c(conn, flat, "BEGIN IMMEDIATE", self._heartbeat(now) + "; COMMIT")

    def _heartbeat(self, now: float) -> str:
        """The statement that marks this process alive at ``now`` (numbers only, inlined)."""
        return (
            f"UPDATE processes SET heartbeat_at = {float(now)!r} "
            f"WHERE id = {int(self.process_id)}"  # type: ignore[arg-type]
        )

    def _insert_in_c(
        self, conn: sqlite3.Connection, flat: Any, before: str = "", after: str = ""
    ) -> bool:
        """Run ``before``, insert the records and run ``after``, with the GIL released;
        False (nothing run) where the C inserter is not in use."""
        if not self._rows_in_c or not (flat or before or after):
            return False
        remap = {_POOL_AT: self._pool_ids, _STACK_AT: self._stack_ids}
        return bool(
            self._rows_in_c.insert(
                conn,
                flat,
                self._insert_many,
                ROWS_PER_STATEMENT,
                self._insert_one,
                remap,
                before,
                after,
            )
        )

    def _insert_in_python(self, conn: sqlite3.Connection, flat: Any) -> None:
        if not isinstance(flat, list):  # an Events the C inserter may not write here
            flat = flat.tolist()
        flat[_POOL_AT::RECORD_WIDTH] = map(self._pool_ids.get, flat[_POOL_AT::RECORD_WIDTH])
        flat[_STACK_AT::RECORD_WIDTH] = map(self._stack_ids.get, flat[_STACK_AT::RECORD_WIDTH])
        width = RECORD_WIDTH * ROWS_PER_STATEMENT
        whole = len(flat) - len(flat) % width
        if whole:
            conn.executemany(
                self._insert_many, (flat[i : i + width] for i in range(0, whole, width))
            )
        if whole < len(flat):
            conn.executemany(
                self._insert_one,
                (flat[i : i + RECORD_WIDTH] for i in range(whole, len(flat), RECORD_WIDTH)),
            )

    def _due_heartbeat(self) -> bool:
        return self._conn is not None and REAL.wall() - self._last_heartbeat > HEARTBEAT_SECONDS

    def _write_stacks(self, conn: sqlite3.Connection) -> None:
        table = self.stacks
        pending = table.pending
        while pending:
            local = pending.popleft()
            resolved = table.resolve(local)
            conn.execute(
                "INSERT OR IGNORE INTO stacks (fingerprint, site, frames) VALUES (?, ?, ?)",
                (resolved.fingerprint, resolved.site, json.dumps(resolved.frames)),
            )
            row = conn.execute(
                "SELECT id FROM stacks WHERE fingerprint = ?", (resolved.fingerprint,)
            ).fetchone()
            self._stack_ids[local] = row[0]

    def _write_pools(self, conn: sqlite3.Connection) -> None:
        for pool_key, info in list(self.pools.items()):
            if pool_key in self._pool_ids:
                continue
            cur = conn.execute(
                "INSERT INTO pools (process_id, name, url, dialect, pool_class, pool_size, "
                "max_overflow, timeout_s, recycle_s, leak_after_s, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.process_id,
                    info["name"],
                    info["url"],
                    info["dialect"],
                    info["pool_class"],
                    info["pool_size"],
                    info["max_overflow"],
                    info["timeout_s"],
                    info["recycle_s"],
                    info["leak_after_s"],
                    info["created_at"],
                ),
            )
            self._pool_ids[pool_key] = cur.lastrowid  # type: ignore[assignment]

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        now = REAL.wall()
        if self._failed_at is not None and now - self._failed_at < RETRY_OPEN_SECONDS:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _store.connect_for_writing(self.path)
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(
                "INSERT INTO processes (pid, parent_id, host, argv, python, sqlalchemy, "
                "poolscope, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    os.getpid(),
                    self.parent_process_id,
                    socket.gethostname(),
                    json.dumps(masked_argv(sys.argv)),
                    platform.python_version(),
                    _sqlalchemy_version(),
                    _poolscope_version(),
                    _process_start,
                    now,
                ),
            )
            conn.execute("COMMIT")
        except Exception as exc:  # OSError, sqlite3.Error, StoreVersionError
            self._failed_at = now
            self._report_failure(exc)
            return None
        self.process_id = cur.lastrowid
        template = _ROW_FROM_LIST if self._rows is None else _ROW_FROM_EVENTS
        row = template.format(pid=int(cur.lastrowid))  # type: ignore[arg-type]
        self._insert_one = _INSERT_PREFIX + row
        self._insert_many = _INSERT_PREFIX + ", ".join([row] * ROWS_PER_STATEMENT)
        self._conn = conn
        self._rows_in_c = _checked_sqlite_rows(self._rows, conn, self.path)
        self._failed_at = None
        self._last_heartbeat = now
        return conn

    def _report_failure(self, exc: BaseException) -> None:
        if not self._reported_failure:
            self._reported_failure = True
            logger.error(
                "poolscope cannot write to its store %s (%s); events are dropped and "
                "counted until it can. The application is not affected.",
                self.path,
                exc,
            )

    def _watch(self) -> None:
        for monitor in list(self.monitors):
            monitor.watch(REAL.wall())

    def _record_end(self, reason: str) -> None:
        conn = self._conn
        if conn is None or self.process_id is None:
            return
        try:
            now = REAL.wall()
            conn.execute(
                "UPDATE processes SET ended_at = ?, end_reason = ?, heartbeat_at = ? WHERE id = ?",
                (now, reason, now, self.process_id),
            )
        except sqlite3.Error as exc:
            self._report_failure(exc)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def reinit_after_fork(self) -> None:
        """Forget the parent's thread, queue, connection and process row; start afresh."""
        self.parent_process_id = self.process_id
        self.process_id = None
        # Cleared in place: the listeners hold these very objects.
        self.queue.clear()
        self.drops.clear()
        if self._rows is not None:  # a batch the fork copied mid-write is not ours either
            self._spare = self._rows.Events(RECORD_WIDTH)
        self._markers = []
        self._conn = None  # the parent's handle is not ours to use or close
        self._pool_ids = {}
        self._stack_ids = {}
        # Every stack this process knows needs its store id again (same fingerprint).
        self.stacks.pending = deque(sorted(set(self.stacks.frames) | set(self.stacks._resolved)))
        self._wake = threading.Event()
        self._io_lock = threading.Lock()
        self._thread = None
        self._stopping = False
        self._failed_at = None
        self._pending_drops = 0
        self.written = 0
        self.dropped_total = 0


def _checked_sqlite_rows(rows: Any, conn: sqlite3.Connection, path: Path) -> Any:
    """The C inserter ``rows``, if the SQLite handle it reads from ``conn`` is this store's."""
    if rows is None:
        return None
    try:
        reached = rows.filename(conn)
    except Exception:
        return None
    return rows if reached and os.path.realpath(reached) == os.path.realpath(path) else None


_process_start = REAL.wall()
_writers: dict[str, Writer] = {}
_registry_lock = threading.Lock()


def get_writer(path: Path) -> Writer:
    """Return this process's writer for ``path``, creating and starting it once."""
    key = os.path.abspath(path)
    with _registry_lock:
        writer = _writers.get(key)
        if writer is None:
            writer = _writers[key] = Writer(Path(key))
            _hook_multiprocessing_exit()
        writer.start()
        return writer


_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][\w+.-]*://[^/:@\s]*:)[^\s/]*(?=@)")
SECRET_WORDS = ("password", "passwd", "secret", "token")
"""A name holding one of these words holds a secret (argv here; URL query keys too)."""

_SECRET = "|".join(SECRET_WORDS)
_SECRET_VALUE = re.compile(rf"(?i)(?P<head>[\w-]*(?:{_SECRET})[\w-]*=)[^&\s]*")
_SECRET_FLAG = re.compile(rf"(?i)--?[\w-]*(?:{_SECRET})[\w-]*")


def masked_argv(argv: list[str]) -> list[str]:
    """Return ``argv`` with secrets as ``***``: URL passwords (``postgresql://u:***@h/db``),
    ``name=value`` pairs whose name says password, secret or token, and the argument
    after a flag such as ``--password``. A command line often carries the database URL."""
    masked: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            masked.append("***")
            hide_next = False
            continue
        arg = _URL_PASSWORD.sub(r"\g<head>***", arg)
        arg = _SECRET_VALUE.sub(r"\g<head>***", arg)
        hide_next = _SECRET_FLAG.fullmatch(arg) is not None
        masked.append(arg)
    return masked


def _sqlalchemy_version() -> str:
    import sqlalchemy

    return sqlalchemy.__version__


def _poolscope_version() -> str:
    from . import __version__

    return __version__


def _at_exit() -> None:
    # Collect first so that a connection dropped without close is recorded as
    # gc_checkin, not as never returned.
    with contextlib.suppress(Exception):
        gc.collect()
    try:
        shutdown_all(timeout=10.0, reason="exit")
    except Exception:  # pragma: no cover
        logger.exception("poolscope could not finish writing its store")


_multiprocessing_hooked = False


def _hook_multiprocessing_exit(_: object = None) -> None:
    """In a multiprocessing child, run ``_at_exit`` from multiprocessing's exit hooks.

    Such a child leaves through ``os._exit()``, which skips ``atexit``: without this
    its last records are lost and it looks as if it had crashed.
    """
    global _multiprocessing_hooked
    process = sys.modules.get("multiprocessing.process")
    util = sys.modules.get("multiprocessing.util")
    if _multiprocessing_hooked or process is None or util is None:
        return
    if process.parent_process() is not None:  # None in the main process
        _multiprocessing_hooked = True
        util.Finalize(None, _at_exit, exitpriority=-100)


_forking: list[Writer] = []


def _before_fork() -> None:
    """Quiesce every writer before ``fork()`` copies the process.

    A writer that has not written its process row yet writes it now, so that the
    child can name its parent; then its I/O lock is taken, so that no SQLite call
    is half-done in the copy. Both waits are bounded: fork is never held up long.
    """
    current = threading.current_thread()
    for writer in list(_writers.values()):
        thread = writer._thread
        if thread is current:
            continue
        if writer.process_id is None and thread is not None and thread.is_alive():
            writer.flush(timeout=1.0)
        if writer._io_lock.acquire(timeout=2.0):
            _forking.append(writer)


def _after_fork_in_parent() -> None:
    while _forking:
        _forking.pop()._io_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock, _process_start, _multiprocessing_hooked
    _forking.clear()  # the child's writers get fresh locks below
    _registry_lock = threading.Lock()
    _process_start = REAL.wall()
    for writer in _writers.values():
        writer.reinit_after_fork()
        for monitor in list(writer.monitors):
            monitor.reinit_after_fork()
        writer.start()
    _multiprocessing_hooked = False
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        # If this is a multiprocessing child, its exit hooks are reset after this
        # runs, and its after-fork callbacks run after that reset.
        util.register_after_fork(_at_exit, _hook_multiprocessing_exit)


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def shutdown_all(timeout: float = 10.0, reason: str | None = None) -> None:
    """Drain and stop every writer of this process and forget them (tests, and exit)."""
    with _registry_lock:
        writers = list(_writers.values())
        _writers.clear()
    for writer in writers:
        writer.shutdown(timeout=timeout, reason=reason)
