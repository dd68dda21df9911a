"""The writer's PostgreSQL backend: the same thread, queue and batches, written with COPY.

Only what touches the store differs from the SQLite writer (``_writer.Writer``): opening
(with reconnection and backoff), writing one batch, the process's end, closing. While
the server cannot be reached the records stay queued, up to the queue's bound (past it
the listeners drop and count them, as always); a batch whose transaction fails (the
connection killed under it) is dropped and counted, and the writer reconnects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import sqlite3
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import _pg_store, _retention, _store
from ._clock import REAL
from ._diagnose import diagnosis_row
from ._record import EVENT_COLUMNS, NULLABLE, POOL, RECORD_WIDTH, STACK
from ._retention import Keeper
from ._secrets import masked_argv
from ._store import PostgresStore
from ._writer import POOL_COLUMNS, Writer, _poolscope_version, _sqlalchemy_version, pool_row

logger = logging.getLogger("poolscope")

RETRY_FIRST_SECONDS = 0.5
"""The first wait before reconnecting to a server that could not be reached."""

RETRY_MAX_SECONDS = 30.0
"""The longest wait between two attempts: the backoff doubles up to it."""

ROWS_BETWEEN_YIELDS = 128
"""Rows the writer formats for COPY (holding the GIL) before it lets other threads run."""

_COPY_COLUMNS = [c for c in EVENT_COLUMNS if c != "process_id"] + ["process_id"]
"""The events columns in a record's order, then ``process_id`` (the record does not carry it)."""

COLUMN_TYPES = {
    "at": "d", "process_id": "q", "pool_id": "q", "kind": "t", "connection_id": "q",
    "checkout_id": "q", "thread": "t", "task": "t", "in_use": "q", "idle": "q",
    "overflow": "q", "waiters": "q", "stack_id": "q", "wait_s": "d", "connect_s": "d",
    "hold_s": "d", "count": "q",
}  # fmt: skip
"""The ``events`` table's column types (``_pg_store``'s DDL) as the C formatter names them:
``d`` double precision, ``q`` bigint, ``t`` text."""

_COPY_TYPES = "".join(COLUMN_TYPES[c] for c in _COPY_COLUMNS[:RECORD_WIDTH])
"""Each record field's column type, in the record's order (``process_id`` is not one)."""

_inherited: list[Any] = []
"""Connections a forked child inherited: kept, never closed (closing would end the
parent's session on the shared socket)."""


class PostgresWriter(Writer):
    """A :class:`_writer.Writer` whose store is a PostgreSQL schema.

    :param store: the store's URL and schema.
    """

    def __init__(self, store: PostgresStore) -> None:
        super().__init__(store)  # type: ignore[arg-type]
        self.store = store
        self.keeper = PostgresKeeper()
        self._keeper_conn: _SqliteLike | None = None
        self._pg: Any = None
        self._retry_s = RETRY_FIRST_SECONDS
        self._schema = f'"{store.schema}"'
        self._copy = f"COPY {self._schema}.events ({', '.join(_COPY_COLUMNS)}) FROM STDIN"
        self._copy_binary = f"{self._copy} (FORMAT BINARY)"
        # Whether the session's text is UTF-8, as the queue's is: the C formatter's bytes
        # go to the server as they are (see _copy_events).
        self._utf8 = False
        # The SQLite store's upsert (the table named by the target in its SET clauses).
        self._upsert_diagnosis = _SqliteLike.translate(_store.UPSERT_DIAGNOSIS).replace(
            "INSERT INTO diagnoses", f"INSERT INTO {self._schema}.diagnoses", 1
        )

    # -- the store ---------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._pg is not None:
            if not self._pg.closed and not self._pg.broken:
                return self._pg
            self._close()
        now = REAL.wall()
        if self._failed_at is not None and now - self._failed_at < self._retry_s:
            return None
        try:
            conn = _pg_store.connect(self.store, autocommit=True)
        except Exception as exc:  # StoreUnreachableError, ImportError, anything: counted
            self._failed(now, exc)
            return None
        try:
            _pg_store.ensure_schema(conn, self.store)
            # The keeper's SQL names the tables alone: they are found in the store's schema.
            conn.execute(f"SET search_path TO {self._schema}")
            # A commit need not wait for the server's WAL flush: a server crash may lose
            # the last fraction of a second of records (as a hard kill of this process
            # does), and the server spends less on each batch.
            conn.execute("SET synchronous_commit TO off")
            keeper_conn = _SqliteLike(conn)
            with conn.transaction():
                new_process = self.process_id is None
                if new_process:
                    self.process_id = conn.execute(
                        f"INSERT INTO {self._schema}.processes (pid, parent_id, host, argv, "
                        "python, sqlalchemy, poolscope, started_at, heartbeat_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                        (
                            os.getpid(),
                            self.parent_process_id,
                            _text(socket.gethostname()),
                            _text(json.dumps(masked_argv(sys.argv))),
                            platform.python_version(),
                            _sqlalchemy_version(),
                            _poolscope_version(),
                            _writer_process_start(),
                            now,
                        ),
                    ).fetchone()[0]
                else:  # reconnected: the same process row, alive again
                    conn.execute(self._heartbeat(now))
            if new_process:
                self.keeper.start(keeper_conn, self.process_id, now)  # type: ignore[arg-type]
        except Exception as exc:
            with contextlib.suppress(Exception):
                conn.close()
            self._failed(now, exc)
            return None
        if self._reported_failure:
            logger.warning("poolscope writes to its store %s again", self.store)
            self._reported_failure = False
        self._pg = self._conn = conn
        self._keeper_conn = keeper_conn
        self._utf8 = conn.info.encoding == "utf-8"
        self._failed_at = None
        self._retry_s = RETRY_FIRST_SECONDS
        self._last_heartbeat = now
        return conn

    def _failed(self, now: float, exc: BaseException) -> None:
        """Note a failed attempt to reach the store: the next waits twice as long (bounded)."""
        if self._failed_at is not None:
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_SECONDS)
        self._failed_at = now
        self._report_failure(exc)

    def _report_failure(self, exc: BaseException) -> None:
        if not self._reported_failure:
            self._reported_failure = True
            logger.error(
                "poolscope cannot write to its store %s (%s); events are kept queued up to "
                "%d records, then dropped and counted, until it can. The application is "
                "not affected.",
                self.store,
                _pg_store.safe_error(exc, self.store),
                _record_bound(),
            )

    def flush(self, timeout: float | None = 10.0) -> bool:
        """As ``Writer.flush``, but ``False`` at once where the store cannot be reached:
        the records stay queued (up to the bound) until it can."""
        done = super().flush(timeout)
        return done and self._pg is not None

    def _same_store(self) -> bool:
        return True

    def _due_heartbeat(self) -> bool:
        return self._pg is not None and REAL.wall() - self._last_heartbeat > 2.0

    # -- batches -----------------------------------------------------------------------

    def _drain(self) -> None:
        # While the server is away the records wait in the queue (bounded: the listeners
        # drop and count past it), and the diagnoses in theirs (bounded likewise, see
        # _diagnose.MAX_PENDING); a flush() does not wait for them meanwhile. At shutdown
        # they are written if the store can be reached, else counted as dropped. The
        # consumers read the records as they come all the same: the metrics go on.
        if self._connection() is None and not self._stopping:
            self.consume_queued()
            markers = self._markers[:]
            del self._markers[: len(markers)]
            for marker in markers:
                marker.done.set()
            return
        super()._drain()

    def _write(self, flat: Any, ndrops: int) -> None:
        nrecords = len(flat) // RECORD_WIDTH
        conn = self._connection()
        diagnoses = self._take_diagnoses()
        if conn is None:
            self._pending_drops += nrecords + ndrops
            self.dropped_total += nrecords + ndrops
            self.diagnoses_dropped += len(diagnoses)
            return
        self.dropped_total += ndrops
        dropped = self._pending_drops + ndrops
        new_stacks: list[int] = []
        new_pools: list[int] = []
        # The queue's Events as they are (formatted for COPY in C where they can be), or a
        # list queue's values (NULL as None; their ids mapped in place as they are written).
        rows = flat
        if isinstance(flat, list):  # a list queue holds NULL as "" (see _record.NULL)
            for k in NULLABLE:
                rows[k::RECORD_WIDTH] = [None if v == "" else v for v in rows[k::RECORD_WIDTH]]
            pools, stacks = rows[POOL::RECORD_WIDTH], rows[STACK::RECORD_WIDTH]
        now = REAL.wall()
        # At the keeper's size cap the records are rolled up but not stored raw.
        raw = self.keeper.store_raw
        try:
            try:
                self._transaction(conn, rows, dropped, now, new_stacks, new_pools, raw, diagnoses)
            except _Retry:
                self._unwrite(new_stacks, new_pools)
                new_stacks.clear()
                new_pools.clear()
                values = rows if isinstance(flat, list) else flat.tolist()
                rows = [_text(v) if type(v) is str else v for v in values]
                if isinstance(flat, list):
                    rows[POOL::RECORD_WIDTH], rows[STACK::RECORD_WIDTH] = pools, stacks
                self._transaction(conn, rows, dropped, now, new_stacks, new_pools, raw, diagnoses)
            self._last_heartbeat = now
            self._pending_drops = 0
            self.written += nrecords
        except Exception as exc:  # psycopg.Error (a killed connection), or anything else
            self._unwrite(new_stacks, new_pools)
            self._pending_drops += nrecords
            self.dropped_total += nrecords
            self.diagnoses_dropped += len(diagnoses)
            self._reported_failure = False  # each lost connection is worth one line
            self._report_failure(exc)
            if conn.broken or conn.closed:
                self._close()
                self._failed_at = REAL.wall()
            return
        self._after_batch_pg(rows if isinstance(rows, list) else flat, now, raw)

    def _after_batch_pg(self, batch: Any, now: float, raw: bool) -> None:
        """Rollups, notable checkouts and retention of the batch just written: the SQLite
        store's keeper, on this connection. ``batch``: the rows as written (a list, the
        store's ids already), or the queue's ``Events`` (read in C; local ids, mapped)."""
        if self._keeper_conn is None:
            return
        mapped = isinstance(batch, list)
        pools = None if mapped else self._pool_ids
        stacks = None if mapped else self._stack_ids
        leak_after = {
            self._pool_ids[key]: info["leak_after_s"]
            # A copy (see _write_pools): attach() adds pools from other threads.
            for key, info in self.pools.copy().items()
            if key in self._pool_ids
        }
        self.keeper.after_batch(
            self._keeper_conn, batch, pools, stacks, leak_after, now, raw, stop=self._fork_wanted
        )

    def _transaction(
        self,
        conn: Any,
        rows: Any,
        dropped: int,
        now: float,
        new_stacks: list[int],
        new_pools: list[int],
        raw: bool = True,
        diagnoses: list[tuple[Any, ...]] | None = None,
    ) -> None:
        """Write one batch in one transaction: new stack and pool rows, the events (COPY;
        not where ``raw`` is false), the diagnoses, the drop count and the heartbeat.
        ``rows``: the queue's ``Events``, or a list of values (its ids mapped in place)."""
        with conn.transaction():
            self._write_stacks_pg(conn, new_stacks)
            self._write_pools_pg(conn, new_pools)
            if isinstance(rows, list):
                self._map_ids(rows)
                if raw:
                    self._copy_rows(conn, rows)
            elif raw and not self._copy_events(conn, rows):
                values = rows.tolist()
                self._map_ids(values)
                self._copy_rows(conn, values)
            if diagnoses:
                self._write_diagnoses_pg(conn, diagnoses)
            if dropped:
                conn.execute(
                    f"INSERT INTO {self._schema}.events (at, process_id, pool_id, kind, "
                    "count) VALUES (%s, %s, %s, 'dropped', %s)",
                    (now, self.process_id, next(iter(self._pool_ids.values()), 0), dropped),
                )
            conn.execute(self._heartbeat(now))

    def _map_ids(self, rows: list[Any]) -> None:
        """Map the records' pool keys and stack ids in ``rows`` to the store's, in place."""
        rows[POOL::RECORD_WIDTH] = map(self._pool_ids.get, rows[POOL::RECORD_WIDTH])
        rows[STACK::RECORD_WIDTH] = map(self._stack_ids.get, rows[STACK::RECORD_WIDTH])

    def _copy_events(self, conn: Any, events: Any) -> bool:
        """COPY the queue's ``events`` in binary, formatted in C with the GIL released
        (``_sqlite_rows.copy_binary``): no Python object per value, and nothing for the
        server to parse. False, having written nothing, where it cannot: no C formatter,
        a session whose text is not UTF-8, or a value that does not go into its column
        as it is (the batch is then written as Python values, as :meth:`_copy_rows`)."""
        if self._rows is None or not self._utf8:
            return False
        data = self._rows.copy_binary(
            events,
            _COPY_TYPES,
            {POOL: self._pool_ids, STACK: self._stack_ids},
            struct.pack("!iq", 8, self.process_id),  # process_id: an int8 after each record
            1,
        )
        if data is None:
            return False
        with conn.cursor() as cur, cur.copy(self._copy_binary) as copy:
            copy.write(data)
        return True

    def _copy_rows(self, conn: Any, rows: list[Any]) -> None:
        pid = self.process_id
        with conn.cursor() as cur:
            try:
                with cur.copy(self._copy) as copy:
                    write = copy.write_row
                    step = RECORD_WIDTH * ROWS_BETWEEN_YIELDS
                    for start in range(0, len(rows), step):
                        for i in range(start, min(start + step, len(rows)), RECORD_WIDTH):
                            write((*rows[i : i + RECORD_WIDTH], pid))
                        # Let the application's threads have the GIL: otherwise one waits
                        # up to the 5 ms switch interval each time it needs it.
                        time.sleep(0)
            except (UnicodeEncodeError, _pg_store.psycopg().DataError) as exc:
                # A name PostgreSQL's text cannot hold (a lone surrogate, a NUL byte): the
                # rows again, every str made valid. Only such a batch pays for the check.
                if conn.broken or not _invalid_text(exc):
                    raise
                logger.debug("poolscope: rewriting a batch with invalid text (%s)", exc)
                raise _Retry from None

    def _write_diagnoses_pg(self, conn: Any, diagnoses: list[tuple[Any, ...]]) -> None:
        """Upsert one ``diagnoses`` row per queued diagnosis whose pool row is written, as
        the SQLite writer does (``_store.UPSERT_DIAGNOSIS``)."""
        rows = []
        for item in diagnoses:
            pool_id = self._pool_ids.get(item[0])
            if pool_id is not None:
                values = (_text(v) if type(v) is str else v for v in diagnosis_row(item))
                rows.append((self.process_id, pool_id, *values))
        if rows:
            with conn.cursor() as cur:
                cur.executemany(self._upsert_diagnosis, rows)

    def _heartbeat(self, now: float) -> str:
        return (
            f"UPDATE {self._schema}.processes SET heartbeat_at = {float(now)!r} "
            f"WHERE id = {int(self.process_id)}"  # type: ignore[arg-type]
        )

    def _write_stacks_pg(self, conn: Any, written: list[int]) -> None:
        table = self.stacks
        pending = table.pending
        new = []
        while pending:
            local = pending.popleft()
            written.append(local)
            new.append((local, table.resolve(local)))
        # In fingerprint order: two processes inserting the same new stacks in one
        # transaction each wait for each other in the same order, never in a deadlock.
        for local, resolved in sorted(new, key=lambda item: item[1].fingerprint):
            row = conn.execute(
                f"INSERT INTO {self._schema}.stacks (fingerprint, site, frames) "
                "VALUES (%s, %s, %s) ON CONFLICT (fingerprint) DO NOTHING RETURNING id",
                (resolved.fingerprint, _text(resolved.site), _text(json.dumps(resolved.frames))),
            ).fetchone()
            if row is None:  # another process wrote it first
                row = conn.execute(
                    f"SELECT id FROM {self._schema}.stacks WHERE fingerprint = %s",
                    (resolved.fingerprint,),
                ).fetchone()
            self._stack_ids[local] = row[0]

    def _write_pools_pg(self, conn: Any, written: list[int]) -> None:
        for pool_key, info in self.pools.copy().items():
            if pool_key in self._pool_ids:
                continue
            info = {k: _text(v) if isinstance(v, str) else v for k, v in info.items()}
            self._pool_ids[pool_key] = conn.execute(
                f"INSERT INTO {self._schema}.pools ({', '.join(POOL_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(POOL_COLUMNS))}) RETURNING id",
                pool_row(self.process_id, info),
            ).fetchone()[0]
            written.append(pool_key)

    def _record_end(self, reason: str) -> None:
        conn = self._pg
        if conn is None or self.process_id is None or conn.closed or conn.broken:
            return
        try:
            now = REAL.wall()
            conn.execute(
                f"UPDATE {self._schema}.processes SET ended_at = %s, end_reason = %s, "
                "heartbeat_at = %s WHERE id = %s",
                (now, reason, now, self.process_id),
            )
        except Exception as exc:
            self._report_failure(exc)

    def _close(self) -> None:
        conn, self._pg, self._conn = self._pg, None, None
        self._keeper_conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def reinit_after_fork(self, quiet: bool = True) -> None:
        if self._pg is not None:
            _inherited.append(self._pg)  # the parent's session: neither ours to use nor close
        self._pg = self._conn = None
        self._keeper_conn = None
        super().reinit_after_fork(quiet)
        self._retry_s = RETRY_FIRST_SECONDS


class PostgresKeeper(Keeper):
    """The SQLite store's :class:`_retention.Keeper` (rollups, notable checkouts, pruning
    past ``keep_raw``) on a PostgreSQL store, through :class:`_SqliteLike`.

    ``max_store_mb`` is not applied: PostgreSQL does not give back the space of deleted
    rows (autovacuum lets new rows reuse it), so the tables' size says little of what is
    stored; ``keep_raw`` bounds a PostgreSQL store.
    """

    def _check_size(self, conn: Any, now: float) -> None:
        return None

    def _upsert(
        self, conn: Any, rows: list[dict[str, Any]], pool_rows: list[dict[str, Any]]
    ) -> None:
        """As the SQLite store's, reading the stored rows of a table in one statement."""
        _retention.upsert_rollups(conn, rows, pool_rows, find=find_all)


_KEY_TYPES = {"period_s": "bigint", "start_at": "double precision"}
"""The rollup keys' column types other than ``bigint`` (the ids)."""


def find_all(
    conn: Any, table: str, columns: Sequence[str], key: Sequence[str], keys: list[tuple[Any, ...]]
) -> dict[tuple[Any, ...], Any]:
    """A ``_retention.Find`` that reads every key's row of ``table`` in one ``SELECT`` (the
    keys as arrays, one per key column): one round trip a table per batch, however many
    call sites and minutes the batch holds. The key columns come first in ``columns``."""
    arrays = ", ".join(f"?::{_KEY_TYPES.get(k, 'bigint')}[]" for k in key)
    rows = conn.execute(
        f"SELECT {', '.join(columns)} FROM {table} WHERE ({', '.join(key)}) IN "
        f"(SELECT * FROM unnest({arrays}))",
        [list(column) for column in zip(*keys, strict=True)],
    ).fetchall()
    return {tuple(row[: len(key)]): row for row in rows}


_TRANSLATIONS = (
    ("%", "%%"),
    ("?", "%s"),
    ("BEGIN IMMEDIATE", "BEGIN"),
    ("max(raw_since, ", "GREATEST(raw_since, "),
    ("CAST(value AS REAL)", "CAST(meta.value AS DOUBLE PRECISION)"),
    ("ELSE value END", "ELSE meta.value END"),
    ("AS REAL", "AS DOUBLE PRECISION"),
)
"""How the keeper's SQLite statements read in PostgreSQL (its SQL is plain on purpose)."""


class _SqliteLike:
    """A psycopg connection (autocommit, ``search_path`` on the store's schema) with the
    parts of ``sqlite3.Connection`` the keeper uses: ``execute``, ``executemany`` and
    ``total_changes``; its errors raised as ``sqlite3.OperationalError``."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.total_changes = 0

    @staticmethod
    def translate(sql: str, with_params: bool = True) -> str:
        for old, new in _TRANSLATIONS if with_params else _TRANSLATIONS[2:]:
            sql = sql.replace(old, new)
        if sql.lstrip().upper().startswith("INSERT OR IGNORE"):
            sql = sql.replace("INSERT OR IGNORE", "INSERT", 1) + " ON CONFLICT DO NOTHING"
        return sql

    def _changes(self, sql: str, rowcount: int) -> None:
        if rowcount > 0 and sql.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self.total_changes += rowcount

    def execute(self, sql: str, params: Any = ()) -> Any:
        try:
            cur = self.conn.execute(self.translate(sql, bool(params)), params or None)
        except Exception as exc:
            raise sqlite3.OperationalError(_first_line(exc)) from None
        self._changes(sql, cur.rowcount)
        return cur

    def executemany(self, sql: str, rows: Any) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.executemany(self.translate(sql), list(rows))
                self._changes(sql, cur.rowcount)
        except Exception as exc:
            raise sqlite3.OperationalError(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Retry(Exception):
    """A batch to write again with its text made valid."""


def _invalid_text(exc: BaseException) -> bool:
    return isinstance(exc, UnicodeEncodeError) or "NUL" in str(exc) or "encod" in str(exc)


def _text(value: str) -> str:
    """``value`` as text PostgreSQL takes: valid UTF-8, no NUL."""
    return _store.valid_text(value).replace("\x00", "\\x00")


def _writer_process_start() -> float:
    from . import _writer

    return _writer._process_start


def _record_bound() -> int:
    from ._record import MAX_QUEUE

    return MAX_QUEUE
