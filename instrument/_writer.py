"""The background writer: one daemon thread per process and store, batching records into SQLite."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import logging
import os
import platform
import signal
import socket
import sqlite3
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _native, _store
from ._clock import REAL
from ._diagnose import diagnosis_row, settle_all
from ._record import (
    EVENT_COLUMNS,
    MAX_QUEUE_VALUES,
    NULLABLE,
    POOL,
    RECORD_WIDTH,
    STACK,
)
from ._record import NULL as NULL  # the benchmarks and tests read it here too
from ._retention import Keeper
from ._secrets import masked_argv
from ._stacks import StackTable

logger = logging.getLogger("poolscope")

Record = tuple[Any, ...]
"""One event as the hot path builds it: ``_record.RECORD_FIELDS``, in that order."""

SCHEDULE_DELAY_SECONDS = 0.5
"""How long the writer sleeps between batches, unless the queue holds a full batch.

Every time the writer takes the GIL back it waits for it (up to Python's 5 ms switch
interval), and the application wakes it at each of its own releases meanwhile: so the
fewer batches, the less the application pays. 0.5 s rather than 0.2 s measured about
three points of a fast SQLite loop; it is also the watchdog's resolution and what a
hard crash can lose."""

FIRST_BATCH_DELAY_SECONDS = 0.1
"""How long the writer sleeps between batches until it has written its first events.

An application often takes the connections it holds for good right at its start, and
those open checkouts are what a crash leaves most worth having: so they (and the process
row, written before the first sleep) are on disk a tenth of a second after they happen,
not a full schedule later. Once events are written, batches are ``SCHEDULE_DELAY_SECONDS``
apart."""

START_WAIT_SECONDS = 0.5
"""The longest ``attach()`` waits for a new writer to make the store, its schema and the
process's row.

The writer thread does it, in some thirty statements, each of which gives up the GIL and
waits to get it back from a busy application thread (up to the 5 ms switch interval, longer
on a loaded machine): 0.35 s was measured on two busy cores, so a process killed 0.4 s after
``attach()`` returned could leave a new store in WAL mode but without its schema. While
``attach()`` waits, the application's thread holds no GIL: the start takes its own few
milliseconds. A store that cannot be written, or is held locked by another process, is
waited for no longer than this; the writer goes on trying in the background, as always."""

TERMINATE_TIMEOUT_SECONDS = 5.0
"""The longest a SIGTERM handled by poolscope waits for the store before the process dies."""

BATCH_THRESHOLD_VALUES = 50_000 * RECORD_WIDTH
"""Queued values past which the writer starts the next batch without sleeping."""

SPARE_CAPACITY_RECORDS = 65_536
"""The most records whose buffer is kept from one batch to be the queue's next (16 MB)."""

HEARTBEAT_SECONDS = 2.0
RETRY_OPEN_SECONDS = 5.0

FORK_WAIT_SECONDS = _store.WRITE_BUSY_TIMEOUT_MS / 1000 + 1.0
"""The longest ``fork()`` waits for a writer to finish the transaction it is in.

The writer stops between transactions once a fork is asked for (pruning leaves the rest for
the next batch), so a fork normally waits for at most one batch's transaction; only a store
another process holds locked keeps one waiting longer, for its busy timeout at most. Past
this, the fork goes ahead and the child leaves the copies of the writer's handles alone."""

ROWS_PER_STATEMENT = 200
"""Rows per multi-row INSERT: fewer statements means fewer GIL hand-offs with the app."""

# A record is the events row without process_id (a literal in the statement); its
# pool key and stack id are this process's own numbers, mapped to the store's ids
# column-wise (map over a slice) rather than row by row. A queued list holds NULL as
# "" (see NULL), which the statement turns back; an Events holds it as NULL already.
_NULLABLE = "NULLIF(?, '')"


def _row(nullable: str) -> str:
    """One row of the events INSERT, with ``nullable`` for each column that may be NULL:
    the record's values in order, and this process's id (``{pid}``) after the first."""
    values = [nullable if k in NULLABLE else "?" for k in range(RECORD_WIDTH)]
    values.insert(EVENT_COLUMNS.index("process_id"), "{pid}")
    return f"({', '.join(values)})"


_ROW_FROM_LIST = _row(_NULLABLE)
_ROW_FROM_EVENTS = _row("?")
_INSERT_PREFIX = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES "

sqlite_rows = _native.load("_sqlite_rows")
"""The C inserter (``_sqlite_rows.c``), or ``None`` where it is off (see ``_native``).
Where it is, the queue is its ``Events``: records held as C values, which the writer binds
and steps with the GIL released, on a SQLite handle of the inserter's own, and frees
without it. Where it is not, the queue is a flat list, bound through ``executemany``,
which holds the GIL for every value."""

C_PRAGMAS = "; ".join(_store.WRITE_PRAGMAS)
"""Run on the C inserter's own handle as it opens: the sqlite3 connection's own."""


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
        # The C inserter's own SQLite handle on the store (a _sqlite_rows.Store), opened
        # with the connection and checked to name the same file; None where it cannot be.
        self._c_store: Any = None
        self.stacks = StackTable()
        # Who asked to be called before each batch and in a forked child (see on_tick), held
        # weakly: owner -> (every_batch, after_fork) as plain functions of the owner.
        self.ticking: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        # Who reads every batch as it is taken, before it is written (see _consume).
        self.consumers: list[Callable[[Any], None]] = []
        self._reported_consumer = False
        # Records at the queue's head the consumers have read already, the queue left as
        # it was (see consume_queued): the batch that takes them hands over only the rest.
        self._fed = 0
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
        # (st_dev, st_ino) of the store file the connection was opened on: checked once a
        # batch, so that a store deleted or replaced meanwhile is noticed and made again.
        self._identity: tuple[int, int] | None = None
        self._reported_replaced = False
        self._pending_drops = 0
        self._last_heartbeat = 0.0
        self._wake = threading.Event()
        # Held by the writer thread while it works in SQLite, and by fork() (see
        # _before_fork): a child must not inherit a SQLite mutex held mid-write.
        self._io_lock = threading.Lock()
        # Set by _before_fork while it waits for _io_lock: the writer then stops between
        # transactions (pruning included) and does not take the lock again until
        # _fork_done is set, after the fork (a Lock is not fair: a writer with a backlog
        # would otherwise take it back at once, again and again).
        self._fork_pending = False
        self._fork_done = threading.Event()
        self._fork_done.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Set once the thread has tried to open the store and write the process row.
        self._started = threading.Event()
        self.written = 0
        self.dropped_total = 0
        # Diagnoses of long holds and timeout holders (see _diagnose), written with the
        # next batch; appended by the diagnose thread and the listeners.
        self.diagnoses: list[tuple[Any, ...]] = []
        # Diagnoses taken for a batch that could not be written (store away, failed
        # transaction): dropped and counted, as its records are.
        self.diagnoses_dropped = 0
        # Rollups, notable checkouts and retention of what this writer writes (_after_batch).
        self.keeper = Keeper()

    def on_tick(self, every_batch: Callable[[float], None], after_fork: Callable[[], None]) -> None:
        """Call ``every_batch(now)`` in the writer thread before each batch (what it emits
        goes out with that batch), and ``after_fork()`` in a forked child before the writer
        restarts, for as long as their object lives.

        :param every_batch: a bound method; its object is held weakly, as is
            ``after_fork``'s (the same object).
        """
        owner = every_batch.__self__  # type: ignore[attr-defined]
        self.ticking[owner] = (every_batch.__func__, after_fork.__func__)  # type: ignore[attr-defined]

    def pool_id(self, pool_key: int) -> int | None:
        """The store's id of the pool row written for ``pool_key``; ``None`` until written."""
        return self._pool_ids.get(pool_key)

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
        # The store, its schema and the process row first, so that this startup work
        # never delays the first batch (a process killed early still has its row).
        with self._io_lock:
            try:
                self._connection()
            except Exception:  # never let the thread die; the app must not notice
                logger.exception("poolscope writer failed; continuing")
        self._started.set()
        while not self._stopping:
            if self._fork_pending:  # a fork waits for _io_lock: let it have it first
                self._fork_done.wait(FORK_WAIT_SECONDS)
            # A backlog past the batch threshold is written at once; otherwise the
            # writer sleeps, so that it wakes (and takes the GIL) a few times a second,
            # and more often until the first events are on disk.
            if len(self.queue) < BATCH_THRESHOLD_VALUES:
                self._wake.wait(
                    SCHEDULE_DELAY_SECONDS if self.written else FIRST_BATCH_DELAY_SECONDS
                )
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
        if (
            not n
            and not self.drops
            and not markers
            and not self.diagnoses
            and not self._due_heartbeat()
        ):
            return
        if self._rows is not None:
            flat = queue.take(self._spare)
        else:
            flat = queue[:n]
            del queue[:n]
        fed, self._fed = self._fed, 0
        ndrops = len(self.drops)
        if ndrops:
            del self.drops[:ndrops]
        try:
            self._consume(flat, fed)
            self._write(flat, ndrops)
        finally:
            for marker in markers:
                marker.done.set()
            if self._rows is not None:
                # Its buffers kept for the queue's next batch.
                flat.clear(SPARE_CAPACITY_RECORDS)
                self._spare = flat

    def _consume(self, flat: Any, skip: int = 0) -> None:
        """Hand the batch ``flat`` (a flat list, or an ``Events``) to each of ``consumers``,
        in the writer thread, before it is written: so they see every record the queue
        took, whether or not the store can be written. A consumer must not change it. One
        that raises is logged once; the batch is written all the same. The first ``skip``
        records, which they read while queued (see consume_queued), are left out.
        """
        if skip and self.consumers:
            flat = _records_from(flat, skip)
            if not flat:
                return
        for consumer in self.consumers:
            try:
                consumer(flat)
            except Exception:  # the store is written all the same
                if not self._reported_consumer:
                    self._reported_consumer = True
                    logger.exception("poolscope: a record consumer failed; continuing")

    def consume_queued(self) -> None:
        """Hand the records queued since the consumers last read to them, leaving the queue
        as it is: while a store that is away keeps its records queued, the consumers (the
        OpenTelemetry metrics) still read each record once, as it comes. Writer thread."""
        if not self.consumers:
            return
        fed = self._fed
        tail = _records_from(self.queue, fed)
        del tail[len(tail) - len(tail) % RECORD_WIDTH :]  # a list queue's whole records
        if tail:
            self._fed = fed + len(tail) // RECORD_WIDTH
            self._consume(tail)

    def _write(self, flat: Any, ndrops: int) -> None:
        nrecords = len(flat) // RECORD_WIDTH
        conn = self._connection()
        if conn is not None and not self._same_store():
            conn = self._connection()
        if conn is None:
            self._pending_drops += nrecords + ndrops
            self.dropped_total += nrecords + ndrops
            self.diagnoses_dropped += len(self._take_diagnoses())
            return
        self.dropped_total += ndrops
        dropped = self._pending_drops + ndrops
        pid = self.process_id
        # The stack and pool rows this batch writes: marked as written only once it commits.
        new_stacks: list[int] = []
        new_pools: list[int] = []
        # One transaction per batch, on one connection: the C inserter's own handle where
        # it is open, else the sqlite3 connection.
        store = self._c_store
        run = store.run if store is not None else functools.partial(_run, conn)
        # At the store's size cap the records are rolled up but not stored raw.
        raw = self.keeper.store_raw
        diagnoses = self._take_diagnoses()
        try:
            now = REAL.wall()
            if dropped or diagnoses or not raw or not self._write_in_one_call(flat, now):
                run("BEGIN IMMEDIATE", ())
                self._write_stacks(run, new_stacks)
                self._write_pools(run, new_pools)
                if raw and store is not None:
                    self._insert_in_c(store, flat)
                elif raw:
                    self._insert_in_python(conn, flat)
                if diagnoses:
                    self._write_diagnoses(run, diagnoses)
                if dropped:
                    run(
                        "INSERT INTO events (at, process_id, pool_id, kind, count) "
                        "VALUES (?, ?, ?, 'dropped', ?)",
                        (now, pid, next(iter(self._pool_ids.values()), 0), dropped),
                    )
                run(self._heartbeat(now), ())
                run("COMMIT", ())
            self._last_heartbeat = now
            self._pending_drops = 0
            self.written += nrecords
        except Exception as exc:  # sqlite3.Error, OSError, or anything else: never left open
            with contextlib.suppress(Exception):
                run("ROLLBACK", ())
            self._unwrite(new_stacks, new_pools)
            self._pending_drops += nrecords
            self.dropped_total += nrecords
            self.diagnoses_dropped += len(diagnoses)
            self._report_failure(exc)
            return
        self._after_batch(conn, flat, now, raw)

    def _after_batch(self, conn: sqlite3.Connection, flat: Any, now: float, raw: bool) -> None:
        """What is fed by the records just written: rollups, notable checkouts, retention
        (``_retention.Keeper``; never raises). ``raw``: whether they were stored raw."""
        if isinstance(flat, list) and raw:  # _insert_in_python mapped its ids in place
            pools, stacks = None, None
        else:
            pools, stacks = self._pool_ids, self._stack_ids
        leak_after = {
            self._pool_ids[key]: info["leak_after_s"]
            # A copy (see _write_pools): attach() adds pools from other threads.
            for key, info in self.pools.copy().items()
            if key in self._pool_ids
        }
        self.keeper.after_batch(
            conn, flat, pools, stacks, leak_after, now, raw, stop=self._fork_wanted
        )

    def _fork_wanted(self) -> bool:
        """Whether a fork waits for this writer: its keeper then stops between steps."""
        return self._fork_pending

    def _take_diagnoses(self) -> list[tuple[Any, ...]]:
        """The diagnoses queued so far (see ``_diagnose``), taken off the list."""
        n = len(self.diagnoses)
        taken = self.diagnoses[:n]
        del self.diagnoses[:n]
        return taken

    def _write_diagnoses(self, run: _Run, diagnoses: list[tuple[Any, ...]]) -> None:
        """Upsert one ``diagnoses`` row per queued diagnosis whose pool row is written."""
        for item in diagnoses:
            pool_id = self._pool_ids.get(item[0])
            if pool_id is not None:
                run(_store.UPSERT_DIAGNOSIS, (self.process_id, pool_id, *diagnosis_row(item)))

    def _unwrite(self, stacks: list[int], pools: list[int]) -> None:
        """Mark the stack and pool rows of a batch rolled back as not written: they go out
        again with the next batch, ahead of the events that refer to them."""
        for local in stacks:
            self._stack_ids.pop(local, None)
        self.stacks.pending.extendleft(reversed(stacks))
        for pool_key in pools:
            self._pool_ids.pop(pool_key, None)

    def _same_store(self) -> bool:
        """Whether the store file is still the one the connection was opened on (a stat).

        Where it was deleted or replaced, say so once, drop the connection and forget which
        process, pool and stack rows were written: the next connection writes them again
        into the store found (or made) at the path.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            pass
        except OSError:  # cannot tell: carry on with the connection
            return True
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return True
        if not self._reported_replaced:
            self._reported_replaced = True
            logger.error(
                "poolscope's store %s was deleted or replaced while recording; what was "
                "written to it before is gone. Recording goes on in a store made afresh there.",
                self.path,
            )
        if self._conn is not None:
            # SQLite neither checkpoints nor removes the -wal of a file moved or deleted
            # under it, and the next connection at the path would replay that -wal's pages
            # into whatever file is there now: empty it (into the old file) first.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._close()
        self._forget_written_rows()
        self.process_id = None
        return False

    def _forget_written_rows(self) -> None:
        """Forget which pool and stack rows the store has: all are written again."""
        self._pool_ids = {}
        self._stack_ids = {}
        self.stacks.pend_all()

    def _write_in_one_call(self, flat: Any, now: float) -> bool:
        """The common batch (no new stack or pool to write first) as one transaction in C, on
        the C inserter's own handle: BEGIN, the rows, the heartbeat and COMMIT with the GIL
        released once (rolled back there on a failure). False, having written nothing, where
        it cannot (see ``_write``).

        Each release of the GIL costs the writer a wait to take it back, during which the
        application wakes it at every release of its own: one release instead of four
        statements' worth measured about two and a half points of a fast SQLite loop.
        """
        store = self._c_store
        if store is None or self.stacks.pending or self.pools.keys() - self._pool_ids:
            return False
        return self._insert_in_c(store, flat, "BEGIN IMMEDIATE", self._heartbeat(now) + "; COMMIT")

    def _insert_in_c(self, store: Any, flat: Any, before: str = "", after: str = "") -> bool:
        """Run ``before``, insert the records and run ``after`` on the C inserter's handle
        ``store``, with the GIL released once."""
        remap = {POOL: self._pool_ids, STACK: self._stack_ids}
        return bool(
            self._rows.insert(
                store, flat, self._insert_many, ROWS_PER_STATEMENT, self._insert_one, remap,
                before, after,
            )
        )  # fmt: skip

    def _heartbeat(self, now: float) -> str:
        """The statement that marks this process alive at ``now`` (numbers only, inlined)."""
        return (
            f"UPDATE processes SET heartbeat_at = {float(now)!r} "
            f"WHERE id = {int(self.process_id)}"  # type: ignore[arg-type]
        )

    def _insert_in_python(self, conn: sqlite3.Connection, flat: Any) -> None:
        if not isinstance(flat, list):  # an Events: its values as Python objects
            flat = flat.tolist()
        flat[POOL::RECORD_WIDTH] = map(self._pool_ids.get, flat[POOL::RECORD_WIDTH])
        flat[STACK::RECORD_WIDTH] = map(self._stack_ids.get, flat[STACK::RECORD_WIDTH])
        conn.execute("SAVEPOINT records")
        try:
            self._executemany(conn, flat)
        except UnicodeEncodeError:
            # A thread or task name holding a lone surrogate, which SQLite's text cannot
            # hold: the records again, every str made valid (the C queue does so as it takes
            # them). Checked only on failure, so the common batch pays nothing for it.
            conn.execute("ROLLBACK TO records")
            valid = _store.valid_text
            self._executemany(conn, [valid(v) if type(v) is str else v for v in flat])
        conn.execute("RELEASE records")

    def _executemany(self, conn: sqlite3.Connection, flat: list[Any]) -> None:
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

    def _write_stacks(self, run: _Run, written: list[int]) -> None:
        table = self.stacks
        pending = table.pending
        while pending:
            local = pending.popleft()
            written.append(local)
            resolved = table.resolve(local)
            run(
                "INSERT OR IGNORE INTO stacks (fingerprint, site, frames) VALUES (?, ?, ?)",
                (resolved.fingerprint, resolved.site, json.dumps(resolved.frames)),
            )
            self._stack_ids[local] = run(
                "SELECT id FROM stacks WHERE fingerprint = ?", (resolved.fingerprint,)
            )

    def _write_pools(self, run: _Run, written: list[int]) -> None:
        # A copy made at once: attach() adds pools from the application's threads, and
        # list(self.pools.items()) could be cut short by a garbage collection whose
        # callbacks (a dropped engine's) run Python, and so let those threads in: the dict
        # then "changed size during iteration" and the batch was dropped.
        for pool_key, info in self.pools.copy().items():
            if pool_key in self._pool_ids:
                continue
            # A name or URL may hold a lone surrogate (from a file name), which SQLite's
            # text cannot: written with the bytes it stands for escaped.
            info = {k: _store.valid_text(v) if isinstance(v, str) else v for k, v in info.items()}
            self._pool_ids[pool_key] = run(
                f"INSERT INTO pools ({', '.join(POOL_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(POOL_COLUMNS))})",
                pool_row(self.process_id, info),
            )
            written.append(pool_key)

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        now = REAL.wall()
        if self._failed_at is not None and now - self._failed_at < RETRY_OPEN_SECONDS:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _store.connect_for_writing(self.path)
        except Exception as exc:  # OSError, sqlite3.Error, StoreError
            self._failed_at = now
            self._report_failure(exc)
            return None
        try:
            st = os.stat(self.path)
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
            self.keeper.start(conn, int(cur.lastrowid), now)  # type: ignore[arg-type]
            conn.execute("COMMIT")
        except Exception as exc:  # OSError, sqlite3.Error
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._failed_at = now
            self._report_failure(exc)
            return None
        self._identity = (st.st_dev, st.st_ino)
        self.process_id = cur.lastrowid
        template = _ROW_FROM_LIST if self._rows is None else _ROW_FROM_EVENTS
        row = template.format(pid=int(cur.lastrowid))  # type: ignore[arg-type]
        self._insert_one = _INSERT_PREFIX + row
        self._insert_many = _INSERT_PREFIX + ", ".join([row] * ROWS_PER_STATEMENT)
        self._conn = conn
        self._c_store = _open_c_store(self._rows, self.path)
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
        """Call each live owner's ``every_batch``, holding one owner at a time: a list of
        them all would keep every dropped engine's monitor (and so its engine and pool)
        alive for as long as the calls take, GIL waits included."""
        for ref in self.ticking.keyrefs():
            owner = ref()
            entry = self.ticking.get(owner) if owner is not None else None
            if entry is not None:
                entry[0](owner, REAL.wall())
            del owner, entry

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
        if self._c_store is not None:
            with contextlib.suppress(sqlite3.Error):
                self._c_store.close()
            self._c_store = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def reinit_after_fork(self, quiet: bool = True) -> None:
        """Forget the parent's thread, queue, connection and process row; start afresh.

        :param quiet: whether the fork held this writer's I/O lock, so that no SQLite call
            of the parent's writer was under way in the copy. Then the copies of its handles
            are closed: SQLite keeps one record per process of the locks each open handle
            holds on a file, and a new handle on the same file shares it, so a copy left open
            would make this process's own handle take no real lock (a parent closing its
            last handle would then checkpoint and delete the WAL under this one). Where
            not, they are left alone (closing one would wait forever for the mutex of the
            call the copy was in), held for the life of the process.
        """
        self.parent_process_id = self.process_id
        self.process_id = None
        # Cleared in place: the listeners hold these very objects.
        self.queue.clear()
        self._fed = 0
        self.drops.clear()
        self.diagnoses.clear()  # the parent's, of the parent's checkouts
        if self._rows is not None:  # a batch the fork copied mid-write is not ours either
            self._spare = self._rows.Events(RECORD_WIDTH)
        self._markers = []
        conn, c_store = self._conn, self._c_store
        self._conn = self._c_store = None
        if quiet:
            for handle in (c_store, conn):
                if handle is not None:
                    with contextlib.suppress(Exception):
                        handle.close()
        else:
            if c_store is not None:
                c_store.forget()
            if conn is not None:
                _inherited.append(conn)
        # Every pool and stack this process knows needs its store id again.
        self._forget_written_rows()
        self._wake = threading.Event()
        self._io_lock = threading.Lock()
        self._fork_pending = False
        self._fork_done = threading.Event()
        self._fork_done.set()
        self._thread = None
        self._started = threading.Event()
        self._stopping = False
        self._failed_at = None
        self._pending_drops = 0
        self.written = 0
        self.dropped_total = 0


_Run = Callable[[str, Sequence[Any]], Any]
"""Run one statement with its parameters: the first column of its first row, if it returns
rows, else the last inserted rowid (``_sqlite_rows.Store.run``, or ``_run``)."""


POOL_COLUMNS = (
    "process_id", "name", "url", "dialect", "pool_class", "pool_size", "max_overflow",
    "timeout_s", "recycle_s", "leak_after_s", "created_at", "pre_ping",
)  # fmt: skip
"""The ``pools`` columns a writer fills, in :func:`pool_row`'s order."""


def pool_row(process_id: int | None, info: dict[str, Any]) -> tuple[Any, ...]:
    """The ``pools`` row (:data:`POOL_COLUMNS`) of the pool described by ``info``."""
    pre_ping = info.get("pre_ping")
    return (
        process_id,
        *(info[c] for c in POOL_COLUMNS[1:-1]),
        None if pre_ping is None else int(pre_ping),
    )


def _records_from(flat: Any, start: int) -> list[Any]:
    """The values of the records of ``flat`` (a flat list, or an ``Events``) from the
    index ``start`` on, as a flat list."""
    return flat[start * RECORD_WIDTH :] if isinstance(flat, list) else flat.tolist(start)


def _run(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    """``_sqlite_rows.Store.run`` for a sqlite3 connection."""
    cur = conn.execute(sql, params)
    row = cur.fetchone()
    return row[0] if row is not None else cur.lastrowid


def _open_c_store(rows: Any, path: Path) -> Any:
    """A SQLite handle of the C inserter ``rows``'s own on the store at ``path`` (opened
    after the sqlite3 connection made the store and its schema), with the same busy timeout
    and synchronous setting; ``None`` where it cannot be opened, or names another file than
    the store (the batches then go through the sqlite3 connection)."""
    if rows is None:
        return None
    try:
        store = rows.open(os.fsdecode(path), _store.WRITE_BUSY_TIMEOUT_MS, C_PRAGMAS)
    except Exception as exc:  # sqlite3.Error, or anything else: the sqlite3 path works
        logger.debug("poolscope's C inserter cannot open %s (%s)", path, exc)
        return None
    try:
        reached = store.filename()
        if reached and os.path.realpath(reached) == os.path.realpath(path):
            return store
    except Exception:
        pass
    with contextlib.suppress(Exception):
        store.close()
    return None


_process_start = REAL.wall()
_writers: dict[str, Writer] = {}
_registry_lock = threading.Lock()


def get_writer(path: Path | _store.PostgresStore) -> Writer:
    """Return this process's writer for ``path`` (a SQLite file, or a PostgreSQL store),
    creating and starting it once, and waiting (``START_WAIT_SECONDS`` at most) until it
    has opened the store and written the process's row."""
    key = str(path) if isinstance(path, _store.PostgresStore) else os.path.abspath(path)
    with _registry_lock:
        writer = _writers.get(key)
        if writer is None:
            if isinstance(path, _store.PostgresStore):
                from ._pg_writer import PostgresWriter

                writer = _writers[key] = PostgresWriter(path)
            else:
                writer = _writers[key] = Writer(Path(key))
            _hook_multiprocessing_exit()
        _install_sigterm_handler()
        writer.start()
    # Outside the lock (another thread may attach meanwhile); at once for a started writer.
    writer._started.wait(START_WAIT_SECONDS)
    return writer


def _sqlalchemy_version() -> str:
    import sqlalchemy

    return sqlalchemy.__version__


def _poolscope_version() -> str:
    from . import __version__

    return __version__


def _at_exit() -> None:
    global _ending
    _ending = _WRITING
    # Collect first so that a connection dropped without close is recorded as
    # gc_checkin, not as never returned.
    with contextlib.suppress(Exception):
        gc.collect()
    with contextlib.suppress(Exception):  # holds flagged just before exit: diagnosed too
        settle_all()
    try:
        shutdown_all(timeout=10.0, reason="exit")
    except Exception:  # pragma: no cover
        logger.exception("poolscope could not finish writing its store")
    _ending = _WRITTEN
    if _deferred_signal is not None:  # a SIGTERM came meanwhile: die of it now
        _die_of(_deferred_signal)


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


_RUNNING, _WRITING, _WRITTEN = 0, 1, 2
_ending = _RUNNING
"""Whether the process's last records are being written (at exit or on SIGTERM), or are."""

_deferred_signal: int | None = None
"""A SIGTERM that arrived while the last records were being written: raised once they are."""

_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Handle SIGTERM while its disposition is the default (see ``on_sigterm``).

    Only from the main thread (the only one that may set a handler), only where SIGTERM's
    handler is ``SIG_DFL``: an application's own handler, or ``SIG_IGN``, is left alone,
    and one it installs later simply replaces this one. Once per process; a forked child
    inherits it, as it inherits any handler.
    """
    global _sigterm_installed
    if _sigterm_installed or os.name != "posix":
        return
    if threading.current_thread() is not threading.main_thread():
        return  # a later attach from the main thread may install it
    _sigterm_installed = True
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, on_sigterm)
    except (ValueError, OSError, RuntimeError):  # not the main interpreter, or no signals
        pass


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM with the default disposition (a container stop, ``Pool.terminate()``): write
    everything queued and mark the process's end ``'terminated'``, then restore the default
    and raise the signal again, so that the process dies of it exactly as it would have.

    Arriving while the last records are being written already (at exit: a
    ``multiprocessing`` worker told to stop and then terminated), it lets that finish and
    the process dies of it then. A handler the application installed later that calls
    this one as "the previous handler" gets the same default action. Bounded: past
    ``TERMINATE_TIMEOUT_SECONDS`` what is not written is lost, as at a kill.
    """
    global _ending, _deferred_signal
    if _ending == _WRITING:
        _deferred_signal = signum
        return
    try:
        if _ending == _RUNNING:
            _ending = _WRITING
            deadline = REAL.perf() + TERMINATE_TIMEOUT_SECONDS
            # No registry lock: the code this handler interrupted may hold it.
            for writer in list(_writers.values()):
                writer.shutdown(max(0.0, deadline - REAL.perf()), reason="terminated")
            _ending = _WRITTEN
    except Exception:  # pragma: no cover - whatever happens, die as the default would
        logger.exception("poolscope could not finish writing its store")
    finally:
        _die_of(signum)


def _die_of(signum: int) -> None:
    """Restore ``signum``'s default disposition and raise it: the process dies of it."""
    with contextlib.suppress(ValueError):  # not the main thread: the handler raises it again
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_forking: list[Writer] = []
"""The writers whose I/O lock fork() holds (see ``_before_fork``)."""

_waited: list[Writer] = []
"""The writers told that a fork waits for them (``_fork_pending``)."""

_inherited: list[Any] = []
"""Handles a forked child copied mid-call (see ``Writer.reinit_after_fork``): never closed."""


def _before_fork() -> None:
    """Quiesce every writer before ``fork()`` copies the process.

    A writer that has not written its process row yet writes it now, so that the
    child can name its parent; then it is asked to stop between transactions and its
    I/O lock is taken, so that no SQLite call or transaction is half-done in the copy.
    Both waits are bounded (``FORK_WAIT_SECONDS``): fork is never held up long.
    """
    current = threading.current_thread()
    for writer in list(_writers.values()):
        thread = writer._thread
        if thread is current:
            continue
        if writer.process_id is None and thread is not None and thread.is_alive():
            writer.flush(timeout=1.0)
        writer._fork_done.clear()
        writer._fork_pending = True
        _waited.append(writer)
        if writer._io_lock.acquire(timeout=FORK_WAIT_SECONDS):
            _forking.append(writer)


def _after_fork_in_parent() -> None:
    while _forking:
        _forking.pop()._io_lock.release()
    while _waited:
        writer = _waited.pop()
        writer._fork_pending = False
        writer._fork_done.set()


def _after_fork_in_child() -> None:
    global _registry_lock, _process_start, _multiprocessing_hooked, _ending, _deferred_signal
    # The writers whose lock the fork held, or whose thread forked: none was mid-call.
    waited = {id(w) for w in _waited}
    quiet = {id(w) for w in _forking} | {id(w) for w in _writers.values() if id(w) not in waited}
    _forking.clear()  # the child's writers get fresh locks below
    _waited.clear()
    _ending, _deferred_signal = _RUNNING, None
    _registry_lock = threading.Lock()
    _process_start = REAL.wall()
    for writer in _writers.values():
        writer.reinit_after_fork(quiet=id(writer) in quiet)
        for owner, (_, after_fork) in list(writer.ticking.items()):
            after_fork(owner)
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


def retire(writer: Writer, timeout: float = 10.0) -> bool:
    """Drain and stop ``writer`` if no attached monitor writes through it any more, and
    forget it (a later ``attach()`` to its store starts a new one); return whether it did."""
    if any(getattr(owner, "attached", False) for owner in list(writer.ticking.keys())):
        return False
    with _registry_lock:
        if _writers.get(str(writer.path)) is writer:
            del _writers[str(writer.path)]
    writer.shutdown(timeout=timeout)
    return True


def shutdown_all(timeout: float = 10.0, reason: str | None = None) -> None:
    """Drain and stop every writer of this process and forget them (tests, and exit)."""
    with _registry_lock:
        writers = list(_writers.values())
        _writers.clear()
    for writer in writers:
        writer.shutdown(timeout=timeout, reason=reason)
