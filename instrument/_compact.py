"""``poolscope compact``: roll up and prune a store offline, while processes may write it.

1. The store is opened for writing (a first-release store gets the schema 2 tables).
2. Every process without a ``retention`` row (recorded by the first release, so never
   rolled up) has its raw events fed, in chunks of event ids, to the same
   :class:`~instrument._rollups.Rollups` and :class:`~instrument._retention.Notable` the
   writer uses; the rows and notable marks go out with each chunk in one short transaction.
   Its checkouts never returned are marked notable too. It then gets its ``retention`` row.
3. Raw events older than ``keep_raw`` before the store's last event are pruned, every
   process's, with the writer's protection of notable rows, in small transactions.
4. Minute rollups older than a day before the last event become hour rows.
5. Where no process is writing the store any more, ``VACUUM`` gives the freed pages back
   to the file system; otherwise they stay in the file for its writers to reuse.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _retention, _store
from ._clock import REAL
from ._rollups import BATCH_SELECT, Batch, Rollups

CHUNK_IDS = 200_000
"""Event ids read per chunk while rolling up (one short write transaction per chunk)."""

PRUNE_STEP_IDS = 20_000
"""Event ids per prune transaction: a few tens of milliseconds each."""

LIVE_S = 30.0
"""A process whose heartbeat is this recent (and has not ended) is taken to be writing."""

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``, called as the work goes on."""


@dataclass
class Compacted:
    """What :func:`compact` did."""

    rolled_up_processes: int
    rolled_up_events: int
    pruned: int
    hour_rows: int
    vacuumed: bool
    live_processes: int
    size_before: int
    size_after: int


def compact(path: Path, keep_raw: float, progress: Progress | None = None) -> Compacted:
    """Roll up and prune the store at ``path`` (see the module). Raises ``StoreError``s
    (a store that is not there, foreign, newer) and ``sqlite3.Error``."""
    _store.open_for_reading(path).close()  # the reader's checks and messages
    size_before = _size(path)
    conn = _store.connect_for_writing(path)
    try:
        report = progress or (lambda phase, done, total: None)
        rolled, events = _roll_up(conn, report)
        pruned = _prune(conn, keep_raw, report)
        last = _last_at(conn)
        hours = 0
        if last is not None:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                moved = _retention.coarsen_step(conn, None, last - _retention.MINUTE_ROWS_S, 2000)
                conn.execute("COMMIT")
                hours += moved
                if not moved:
                    break
        live = _live_processes(conn)
        vacuumed = False
        if not live:
            conn.execute("VACUUM")
            vacuumed = True
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return Compacted(rolled, events, pruned, hours, vacuumed, live, size_before, _size(path))


def _size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += Path(f"{path}{suffix}").stat().st_size
    return total


def _last_at(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT at FROM events ORDER BY id DESC LIMIT 1").fetchone()
    return float(row[0]) if row is not None else None


def _live_processes(conn: sqlite3.Connection) -> int:
    return int(
        conn.execute(
            "SELECT count(*) FROM processes WHERE ended_at IS NULL AND heartbeat_at > ?",
            (REAL.wall() - LIVE_S,),
        ).fetchone()[0]
    )


def _roll_up(conn: sqlite3.Connection, progress: Progress) -> tuple[int, int]:
    """Roll up the processes without a ``retention`` row; return (processes, events)."""
    todo = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM processes WHERE id NOT IN (SELECT process_id FROM retention) "
            "ORDER BY id"
        )
    ]
    if not todo:
        return 0, 0
    wanted = np.array(todo, dtype=np.int64)
    limits: dict[int, dict[int, float]] = {}  # leak_after by process and pool id
    for pid, pool, s in conn.execute("SELECT process_id, id, leak_after_s FROM pools"):
        limits.setdefault(int(pid), {})[int(pool)] = float(s)
    rollups = {pid: Rollups(pid) for pid in todo}
    notable = {pid: _retention.Notable() for pid in todo}
    top = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    low = conn.execute("SELECT coalesce(min(id), 0) FROM events").fetchone()[0]
    fed = 0
    after = low - 1
    while after < top:
        upto = min(after + CHUNK_IDS, top)
        rows = conn.execute(
            f"SELECT process_id, {BATCH_SELECT} FROM events WHERE id > ? AND id <= ? ORDER BY id",
            (after, upto),
        ).fetchall()
        after = upto
        if rows:
            procs = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            ours = np.isin(procs, wanted)
            marks: list[tuple[int, int, int, str]] = []
            for pid in np.unique(procs[ours]).tolist():
                idx = np.nonzero(procs == pid)[0].tolist()
                batch = Batch.from_rows([rows[i][1:] for i in idx])
                rollups[pid].feed(batch)
                found = notable[pid].marks(batch, limits.get(pid, {}))
                marks.extend((pid, p, c, r) for p, c, r in found)
                fed += len(idx)
            _write(conn, rollups, marks)
        progress("rolling up", after - low + 1, top - low + 1)
    # Checkouts never returned: kept, as a writer keeps what is still open.
    marks = [(pid, p, c, "open") for pid, n in notable.items() for (p, c) in n.open]
    conn.execute("BEGIN IMMEDIATE")
    _write_rows(conn, rollups)
    _insert_marks(conn, marks)
    conn.executemany(
        "INSERT OR IGNORE INTO retention (process_id, raw_since, notable) VALUES (?, 0, ?)",
        [(pid, 0) for pid in todo],
    )
    conn.execute("COMMIT")
    return len(todo), fed


def _write(conn: sqlite3.Connection, rollups: dict[int, Rollups], marks: list) -> None:  # type: ignore[type-arg]
    conn.execute("BEGIN IMMEDIATE")
    try:
        _write_rows(conn, rollups)
        _insert_marks(conn, marks)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _write_rows(conn: sqlite3.Connection, rollups: dict[int, Rollups]) -> None:
    for r in rollups.values():
        rows, pool_rows = r.flush_rows()
        _retention.upsert_rollups(conn, rows, pool_rows)


def _insert_marks(conn: sqlite3.Connection, marks: list) -> None:  # type: ignore[type-arg]
    conn.executemany(
        "INSERT OR IGNORE INTO notable (process_id, pool_id, checkout_id, reason) "
        "VALUES (?, ?, ?, ?)",
        marks,
    )


def _prune(conn: sqlite3.Connection, keep_raw: float, progress: Progress) -> int:
    """Prune every process's raw events older than ``keep_raw`` before the last event (and
    never younger than the longest ``leak_after`` plus the margin before now)."""
    last = _last_at(conn)
    if last is None or math.isinf(keep_raw):
        return 0
    longest = conn.execute("SELECT coalesce(max(leak_after_s), 0) FROM pools").fetchone()[0]
    cutoff = min(last - keep_raw, REAL.wall() - longest - _retention.LEAK_MARGIN_S)
    top = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    low = conn.execute("SELECT coalesce(min(id), 0) FROM events").fetchone()[0]
    pruned = 0
    pruned_by: dict[int, int] = {}
    after = low - 1
    while after < top:
        upto = min(after + PRUNE_STEP_IDS, top)
        conn.execute("BEGIN IMMEDIATE")
        try:
            per = conn.execute(
                "SELECT process_id, count(*) FROM events WHERE id > ? AND id <= ? AND at < ? "
                "GROUP BY process_id",
                (after, upto, cutoff),
            ).fetchall()
            for pid, _ in per:
                deleted, _, _ = _retention.prune_step(conn, pid, after, upto, cutoff, None)
                pruned += deleted
                pruned_by[pid] = pruned_by.get(pid, 0) + deleted
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        after = upto
        progress("pruning", after - low + 1, top - low + 1)
    conn.execute("BEGIN IMMEDIATE")
    for pid, n in pruned_by.items():
        if n:
            conn.execute(
                "UPDATE retention SET raw_since = max(raw_since, ?), pruned = pruned + ? "
                "WHERE process_id = ?",
                (cutoff, n, pid),
            )
    if any(pruned_by.values()):
        _retention.set_raw_since(conn, cutoff)
    conn.execute("COMMIT")
    return pruned
