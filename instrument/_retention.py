"""Retention: rollups written with each batch, notable checkouts marked, raw events pruned.

The writer thread hands each batch it wrote to its :class:`Keeper` (one call). The keeper

1. feeds the batch to its :class:`~instrument._rollups.Rollups` and merges the rows into the
   store's ``rollups`` and ``pool_rollups`` (read, add, write: each process owns its rows);
2. marks the batch's notable checkouts in ``notable`` (see :class:`Notable`), so that no
   prune deletes their raw events;
3. prunes this process's raw events older than the retention in small steps (a range of
   :data:`PRUNE_STEP_IDS` event ids per transaction; never another process's rows, so
   several processes may write one store), and records from when its raw events are
   complete (``retention.raw_since``, and the store-wide ``meta`` ``raw_since``). A
   checkout is pruned with its return: one still open is kept, and deleted by id in the
   transaction of the batch that returns it (its return pruned as any other event);
4. watches the store's size (pages in use) against ``max_store_mb``: past 80 % it halves
   the retention applied at each check; past 95 % it prunes all it may and raw events are
   rolled up but not stored (counted in ``retention.raw_skipped``) until the store is back
   under 60 %, where the retention grows back. One WARNING on logger ``poolscope`` the
   first time. The application is never slowed or failed for it.

The SQL is plain (``DELETE ... WHERE`` on an id range, ``INSERT ... ON CONFLICT``), so that
another store can run the same steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _rollups
from ._clock import REAL
from ._record import AT, CHECKOUT_ID, HOLD_S, KIND, POOL, RECORD_WIDTH
from ._rollups import KINDS, Batch, Rollups

logger = logging.getLogger("poolscope")

DEFAULT_KEEP_RAW_S = 900.0
"""Raw events are kept 15 minutes by default: a post-mortem reads the minutes around an
incident, and its notable checkouts (leaks, timeouts and their holders, long holds) are kept
for good anyway; at 500 checkouts/s that is about 80 MB of raw events (measured)."""

DEFAULT_MAX_STORE_MB = 1024.0
"""The store's default budget: 1 GiB, a size any production host can spare."""

KEEP_RAW_ENV = "POOLSCOPE_KEEP_RAW"
MAX_STORE_MB_ENV = "POOLSCOPE_MAX_STORE_MB"

LEAK_MARGIN_S = 10.0
"""Raw events younger than a pool's ``leak_after`` plus this are never pruned: a checkout
open that long has been flagged ``leak_suspected`` (a notable row) by then."""

PRUNE_STEP_IDS = 10_000
"""Event ids per prune transaction: each step holds the store for about 50 ms at most."""

PRUNE_BUDGET_S = 2.0
"""The most one batch's pruning takes before it leaves the rest for the next batch. A step
deletes about 150,000 events/s, so at a real rate (1,000 events/s) a batch's pruning takes
milliseconds; the budget lets a backlog (a store opened with old events, or a simulated
day) be caught up while the store is released between steps."""

SIZE_CHECK_S = 5.0
"""How often (writer time) the store's size is checked against ``max_store_mb``."""

MINUTE_ROWS_S = 86400.0
"""Minute rollups older than a day are merged into hour rows (``period_s`` 3600)."""

MINUTE_ROWS_AT_CAP_S = 3600.0
"""While the store is at its size cap, minute rollups older than an hour are merged."""

COARSEN_EVERY_S = 600.0
COARSEN_ROWS = 2000

MAX_LATE = 100_000
"""Old checkouts a prune kept open (their return not written yet: a backlog) that a
keeper remembers until they are returned, to delete them then (see :func:`kept_open`);
past it, such a checkout is left in the store when its return is pruned."""

MAX_NOTABLE = 100_000
"""Notable checkouts and events kept per process; past it, new ones are counted in
``retention.notable_dropped`` and their raw events are pruned as any other."""

DELETABLE_KINDS = ("checkout", "checkin", "connect", "close", "close_detached")
"""The kinds a prune may delete (unless their checkout is notable). Every other kind (timeout,
leak_*, gc_checkin, detach, unwatched, invalidate, dropped) is kept, up to the cap."""

PROTECTED_KINDS = (
    "timeout", "leak_suspected", "leak_cleared", "gc_checkin", "detach", "unwatched",
    "invalidate",
)  # fmt: skip
"""The kept kinds that count against :data:`MAX_NOTABLE` (and are pruned past it)."""

LEAK_MARK_KINDS = ("leak_suspected", "leak_cleared", "gc_checkin", "detach", "unwatched")
RETURN_KINDS = ("checkin", "gc_checkin", "detach", "unwatched")


def _number(value: Any, what: str, env: str, default: float, minimum: float) -> float:
    """``value`` (else ``$env``, else ``default``) as a number ``>= minimum`` (``inf`` allowed);
    ``ValueError`` in one sentence otherwise."""
    source = what
    if value is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        source = f"${env}"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{source} must be a number of {_unit(what)}, not {text!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{source} must be a number of {_unit(what)}, not {value!r}.")
    if value < minimum:
        raise ValueError(f"{source} must be at least {minimum:g} {_unit(what)}, not {value!r}.")
    return float(value)


def _unit(what: str) -> str:
    return "seconds" if what == "keep_raw" else "megabytes"


def keep_raw_setting(value: Any) -> float:
    """``attach(keep_raw=...)``: seconds of raw events kept (``inf``: all), at least 60;
    ``None`` for ``$POOLSCOPE_KEEP_RAW``, else :data:`DEFAULT_KEEP_RAW_S`."""
    return _number(value, "keep_raw", KEEP_RAW_ENV, DEFAULT_KEEP_RAW_S, 60.0)


def max_store_setting(value: Any) -> float:
    """``attach(max_store_mb=...)``: the store's budget in MiB (``inf``: none), at least 16;
    ``None`` for ``$POOLSCOPE_MAX_STORE_MB``, else :data:`DEFAULT_MAX_STORE_MB`."""
    return _number(value, "max_store_mb", MAX_STORE_MB_ENV, DEFAULT_MAX_STORE_MB, 16.0)


# -- notable checkouts -----------------------------------------------------------------


class Notable:
    """Finds the notable checkouts of one process's batches, and tracks its open checkouts.

    Notable: a checkout with a ``leak_*``, ``gc_checkin``, ``detach`` or ``unwatched`` event
    (``'leak'``); one returned after more than its pool's ``leak_after`` (``'long_hold'``);
    one open at a timeout of its pool (``'timeout_holder'``, found from the checkouts open
    before the batch and those of the batch up to the timeout).
    """

    def __init__(self) -> None:
        self.open: dict[tuple[int, int], float] = {}

    def marks(self, b: Batch, leak_after: dict[int, float]) -> list[tuple[int, int, str]]:
        """The notable checkouts of batch ``b``: ``(pool_id, checkout_id, reason)``; updates
        the open checkouts. ``leak_after``: each pool id's threshold (missing: never long)."""
        out: list[tuple[int, int, str]] = []
        if not len(b):
            return out
        cid = b.checkout_id
        has_id = ~np.isnan(cid)
        ids = np.where(has_id, cid, -1).astype(np.int64)
        if b.has(*LEAK_MARK_KINDS):
            leak = b.of(*LEAK_MARK_KINDS) & has_id
            for pool, c in zip(b.pool[leak].tolist(), ids[leak].tolist(), strict=True):
                out.append((pool, c, "leak"))
        returned = b.of(*RETURN_KINDS) & has_id
        if leak_after and returned.any():
            # Held past the lowest threshold first (a few, if any), then past their pool's.
            lowest = np.fmin.reduce(np.fromiter(leak_after.values(), np.float64, len(leak_after)))
            maybe = np.flatnonzero((b.hold_s > lowest) & returned)
            long = maybe[b.hold_s[maybe] > _limits(b.pool[maybe], leak_after)]
            for pool, c in zip(b.pool[long].tolist(), ids[long].tolist(), strict=True):
                out.append((pool, c, "long_hold"))
        co = b.of("checkout") & has_id
        if b.has("timeout"):
            for j in np.flatnonzero(b.of("timeout")).tolist():  # rare: one pass each
                t, pool = float(b.at[j]), int(b.pool[j])
                held = {c for (p, c), at in self.open.items() if p == pool and at <= t}
                m = co & (b.pool == pool) & (b.at <= t)
                held.update(ids[m].tolist())
                m = returned & (b.pool == pool) & (b.at <= t)
                held.difference_update(ids[m].tolist())
                out.extend((pool, c, "timeout_holder") for c in sorted(held))
        # The open checkouts after the batch (only the few that outlive it are touched).
        stays, gone = _unmatched(b.pool, ids, np.flatnonzero(co), np.flatnonzero(returned))
        keys = b.pool.take(stays).astype(np.int64) * (1 << 40) + ids.take(stays)
        for k, at in zip(keys.tolist(), b.at.take(stays).tolist(), strict=True):
            self.open[(k >> 40, k & ((1 << 40) - 1))] = at
        keys = b.pool.take(gone).astype(np.int64) * (1 << 40) + ids.take(gone)
        for k in keys.tolist():
            self.open.pop((k >> 40, k & ((1 << 40) - 1)), None)
        return out


def _survey(
    flat: Any, pool_ids: dict[int, int] | None, stack_ids: dict[int, int] | None,
    leak_after: dict[int, float],
) -> tuple[list[int], float, float, Batch] | None:  # fmt: skip
    """What the keeper needs of the C queue's batch ``flat`` besides its rollups, read in
    C (``Events.survey``) with the GIL held: the records of each kind (by code, as
    :meth:`Batch.kind_counts`), the first and last time, and a :class:`Batch` of only the
    records :meth:`Notable.marks` finds anything in (the leak kinds, returns held past the
    lowest ``leak_after`` or whose checkout is not in the batch, checkouts not returned in
    it), so that its marks and open checkouts are those of the whole batch; the whole batch
    where it holds a timeout (whose holders are any checkout open at its time). ``None``
    where the helper is not there or leaves the batch to numpy."""
    survey = getattr(flat, "survey", None)
    if survey is None:
        return None
    # The lowest threshold, NaN passed over (as Notable.marks takes it, with np.fmin).
    lowest = min((v for v in map(float, leak_after.values()) if v == v), default=math.inf)
    got = survey(
        KINDS, ("checkout",), RETURN_KINDS, LEAK_MARK_KINDS, ("timeout",),
        (AT, POOL, KIND, CHECKOUT_ID, HOLD_S), pool_ids, lowest,
    )  # fmt: skip
    if got is None:
        return None
    counts, first, last, rows = got
    values = flat.numbers(KINDS, _rollups.NUMBER_FIELDS, rows)
    notable = Batch.from_numbers(np.frombuffer(values, dtype=np.float64), pool_ids, stack_ids)
    return counts, first, last, notable


def _limits(pools: np.ndarray, leak_after: dict[int, float]) -> np.ndarray:
    """Each of ``pools``' threshold in ``leak_after`` (``inf`` where it has none)."""
    known = np.array(sorted(leak_after), dtype=np.int64)
    values = np.array([leak_after[p] for p in known.tolist()], dtype=np.float64)
    top = int(known[-1])
    if known[0] >= 0 and top < (1 << 16):  # the store's pool ids: a lookup table
        table = np.full(top + 2, math.inf)  # the last: any pool past them
        table[known] = values
        return table.take(np.clip(pools, -1, top + 1))  # -1 (no such id) reads the last too
    at = np.minimum(np.searchsorted(known, pools), known.size - 1)
    return np.where(known[at] == pools, values[at], math.inf)


def _unmatched(
    pool: np.ndarray, ids: np.ndarray, co: np.ndarray, returned: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Of the checkouts at ``co`` and the returns at ``returned`` (indices of the records
    whose ``(pool, ids)`` they are), the checkouts with no return in the batch and the
    returns with no checkout (their indices, in order)."""
    if co.size and returned.size:
        co_pool, co_id = pool.take(co), ids.take(co)
        ret_pool, ret_id = pool.take(returned), ids.take(returned)
        plo = min(int(co_pool.min()), int(ret_pool.min()))
        clo = min(int(co_id.min()), int(ret_id.min()))
        npool = max(int(co_pool.max()), int(ret_pool.max())) - plo + 1
        nid = max(int(co_id.max()), int(ret_id.max())) - clo + 1
        if npool * nid <= (1 << 16) + 8 * (co.size + returned.size):  # close ids: a table
            co_key = (co_pool - plo) * nid + (co_id - clo)
            ret_key = (ret_pool - plo) * nid + (ret_id - clo)
            seen = np.zeros(npool * nid, dtype=bool)
            seen[ret_key] = True
            stays = co[~seen[co_key]]
            seen[:] = False
            seen[co_key] = True
            return stays, returned[~seen[ret_key]]
        keys = pool.astype(np.int64) * (1 << 40) + ids
        co_keys, ret_keys = keys.take(co), keys.take(returned)
        return co[~np.isin(co_keys, ret_keys)], returned[~np.isin(ret_keys, co_keys)]
    return co, returned


# -- store steps (plain SQL; the connection is in autocommit mode) -----------------------


Find = Callable[[Any, str, Sequence[str], Sequence[str], list[tuple[Any, ...]]], dict]
"""``find(conn, table, columns, key, keys)``: the stored rows (``columns``, in order) of
``table`` whose ``key`` columns are one of ``keys``, by key tuple."""


def upsert_rollups(
    conn: Any,
    rows: Sequence[dict[str, Any]],
    pool_rows: Sequence[dict[str, Any]],
    find: Find | None = None,
) -> None:
    """Merge delta rows into the store's ``rollups`` and ``pool_rollups`` (in the caller's
    transaction): each row is read (with ``find``; default :func:`find_joined`), added to
    and written back."""
    find = find or find_joined
    _upsert(conn, "rollups", _rollups.ROLLUP_COLUMNS, _rollups.ROLLUP_KEY, rows,
            _rollups.rollup_from_values, _rollups.merge_rollup, _rollups.rollup_params,
            find)  # fmt: skip
    _upsert(conn, "pool_rollups", _rollups.POOL_ROLLUP_COLUMNS, _rollups.POOL_ROLLUP_KEY,
            pool_rows, _rollups.pool_rollup_from_values, _rollups.merge_pool_rollup,
            _rollups.pool_rollup_params, find)  # fmt: skip


_VARIABLES = 900
"""Parameters per statement at most: SQLite before 3.32 takes 999."""


def find_joined(
    conn: Any, table: str, columns: Sequence[str], key: Sequence[str], keys: list[tuple[Any, ...]]
) -> dict[tuple[Any, ...], Any]:
    """A :data:`Find` that reads every key's row in one statement (per 900 parameters): the
    keys as a ``VALUES`` list joined to ``table`` on its primary key, an index seek each.
    One statement, not one a row: each statement the writer makes through ``sqlite3``
    gives the GIL up a few times, and the application pays for taking it back. The key
    columns come first in ``columns``."""
    names = ", ".join(f"k{j}" for j in range(len(key)))
    on = " AND ".join(f"t.{c} = k.k{j}" for j, c in enumerate(key))
    one = "(" + ", ".join("?" * len(key)) + ")"
    per = max(1, _VARIABLES // len(key))
    found = {}
    for i in range(0, len(keys), per):
        chunk = keys[i : i + per]
        rows = conn.execute(
            f"WITH k({names}) AS (VALUES {', '.join([one] * len(chunk))}) "
            f"SELECT {', '.join(f't.{c}' for c in columns)} FROM k JOIN {table} AS t ON {on}",
            [v for k in chunk for v in k],
        ).fetchall()
        for row in rows:
            found[tuple(row[: len(key)])] = row
    return found


def _upsert(conn, table, columns, key, rows, from_values, merge, params, find) -> None:  # type: ignore[no-untyped-def]
    if not rows:
        return
    sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    one = "(" + ", ".join("?" * len(columns)) + ")"
    conflict = f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"
    # Rows of one key (a batch's rows with those of a batch whose transaction failed) are
    # added together first: each written row replaces the stored one.
    deltas: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[c] for c in key)
        before = deltas.get(k)
        deltas[k] = row if before is None else merge(before, row)
    found = find(conn, table, columns, key, list(deltas))
    out = []
    for k, row in deltas.items():
        stored = found.get(k)
        merged = merge(from_values(stored), row) if stored is not None else row
        out.append(params(merged))
    per = max(1, _VARIABLES // len(columns))  # rows a statement (see find_joined)
    for i in range(0, len(out), per):
        chunk = out[i : i + per]
        conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * len(chunk))}"
            + conflict,
            [v for row in chunk for v in row],
        )


def coarsen_step(conn: Any, process_id: int | None, before: float, limit: int) -> int:
    """Merge up to ``limit`` minute rows (of ``process_id``, or every process for ``None``)
    that start before ``before`` into their hour rows, and delete them; return how many."""
    which = "" if process_id is None else "AND process_id = ?"
    args: tuple[Any, ...] = (before,) if process_id is None else (before, process_id)
    moved = 0
    for table, columns, from_values in (
        ("rollups", _rollups.ROLLUP_COLUMNS, _rollups.rollup_from_values),
        ("pool_rollups", _rollups.POOL_ROLLUP_COLUMNS, _rollups.pool_rollup_from_values),
    ):
        found = conn.execute(
            f"SELECT {', '.join(columns)} FROM {table} WHERE period_s = 60 AND start_at < ? "
            f"{which} ORDER BY start_at LIMIT {int(limit)}",
            args,
        ).fetchall()
        if not found:
            continue
        rows = [from_values(r) for r in found]
        key = _rollups.ROLLUP_KEY if table == "rollups" else _rollups.POOL_ROLLUP_KEY
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        merge = _rollups.merge_rollup if table == "rollups" else _rollups.merge_pool_rollup
        for row in rows:
            hour = _rollups.coarsen(row)
            k = tuple(hour[c] for c in key)
            merged[k] = merge(merged.get(k), hour)
        if table == "rollups":
            upsert_rollups(conn, list(merged.values()), [])
        else:
            upsert_rollups(conn, [], list(merged.values()))
        where = " AND ".join(f"{k} = ?" for k in key)
        conn.executemany(
            f"DELETE FROM {table} WHERE {where}", [tuple(r[k] for k in key) for r in rows]
        )
        moved += len(rows)
    return moved


_NOT_NOTABLE = (
    "NOT EXISTS (SELECT 1 FROM notable AS n WHERE n.process_id = events.process_id "
    "AND n.pool_id = events.pool_id AND n.checkout_id = events.checkout_id)"
)


_RETURNED = (
    "(kind <> 'checkout' OR EXISTS (SELECT 1 FROM events AS r WHERE "
    "r.process_id = events.process_id AND r.pool_id = events.pool_id "
    "AND r.checkout_id = events.checkout_id "
    "AND r.kind IN ('checkin', 'gc_checkin', 'detach', 'unwatched')))"
)
"""A checkout is pruned only once its return is in the store: one still open (or open when
its process exited or crashed) is kept."""


def prune_step(
    conn: Any, process_id: int, after_id: int, upto_id: int, cutoff: float, cap_id: int | None
) -> tuple[int, int, int | None]:
    """Delete ``process_id``'s prunable events with ids in ``(after_id, upto_id]`` older than
    ``cutoff`` (in the caller's transaction). Return ``(deleted, notable_deleted, stop)``:
    notable rows deleted because they are past the cap (ids above ``cap_id``), and the
    first id in the range of this process's events at or after ``cutoff`` (``None`` if
    none: the whole range is behind the cutoff)."""
    kinds = ", ".join(f"'{k}'" for k in DELETABLE_KINDS)
    deleted = conn.execute(
        f"DELETE FROM events WHERE id > ? AND id <= ? AND process_id = ? AND at < ? "
        f"AND kind IN ({kinds}) AND (checkout_id IS NULL OR ({_NOT_NOTABLE} AND {_RETURNED}))",
        (after_id, upto_id, process_id, cutoff),
    ).rowcount
    dropped = 0
    if cap_id is not None and upto_id > cap_id:
        kept = ", ".join(f"'{k}'" for k in PROTECTED_KINDS)
        dropped = conn.execute(
            f"DELETE FROM events WHERE id > ? AND id <= ? AND process_id = ? AND at < ? "
            f"AND kind IN ({kept})",
            (max(after_id, cap_id), upto_id, process_id, cutoff),
        ).rowcount
    stop = conn.execute(
        "SELECT min(id) FROM events WHERE id > ? AND id <= ? AND process_id = ? AND at >= ?",
        (after_id, upto_id, process_id, cutoff),
    ).fetchone()[0]
    return deleted, dropped, stop


def kept_open(
    conn: Any, process_id: int, after_id: int, upto_id: int, cutoff: float
) -> list[tuple[int, int, int]]:
    """After :func:`prune_step` on the same range: ``process_id``'s checkouts in
    ``(after_id, upto_id]`` older than ``cutoff`` that it kept because they were not returned
    (not notable), as ``(id, pool_id, checkout_id)``. Once returned, each is deleted by
    :func:`delete_returned` (a later step would not see it again)."""
    return conn.execute(
        f"SELECT id, pool_id, checkout_id FROM events WHERE id > ? AND id <= ? "
        f"AND process_id = ? AND at < ? AND kind = 'checkout' AND {_NOT_NOTABLE}",
        (after_id, upto_id, process_id, cutoff),
    ).fetchall()


def delete_returned(conn: Any, process_id: int, ids: Sequence[int]) -> None:
    """Delete the checkouts of ``process_id`` with event ``ids`` (from :func:`kept_open`,
    returned since) unless notable (in the caller's transaction): by id, so one index
    lookup each on any store. Their returns are pruned as any other event."""
    conn.executemany(
        f"DELETE FROM events WHERE id = ? AND process_id = ? AND kind = 'checkout' "
        f"AND {_NOT_NOTABLE}",
        [(i, process_id) for i in ids],
    )


def set_raw_since(conn: Any, value: float) -> None:
    """Raise the store-wide ``meta`` ``raw_since`` to ``value`` (never lowers it)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('raw_since', ?) ON CONFLICT (key) DO UPDATE "
        "SET value = CASE WHEN CAST(value AS REAL) < CAST(excluded.value AS REAL) "
        "THEN excluded.value ELSE value END",
        (repr(float(value)),),
    )


def recorded_spans(conn: Any) -> dict[int, tuple[float, float]]:
    """Per process, what its writer last wrote in ``meta`` ``span:<id>``: the first and
    last time of its events whose rollups were written (in the same transaction)."""
    out = {}
    for key, value in conn.execute("SELECT key, value FROM meta WHERE key LIKE 'span:%'"):
        try:
            first, last = str(value).split()
            out[int(str(key)[5:])] = (float(first), float(last))
        except ValueError:
            continue
    return out


# -- the writer's keeper --------------------------------------------------------------


class Keeper:
    """One process's rollups and retention on one SQLite store (the writer thread's).

    :param keep_raw: seconds of raw events kept (``inf``: all).
    :param max_store_mb: the store's budget in MiB (``inf``: none).
    """

    def __init__(
        self, keep_raw: float = DEFAULT_KEEP_RAW_S, max_store_mb: float = DEFAULT_MAX_STORE_MB
    ) -> None:
        self.keep_raw = keep_raw
        self.max_store_mb = max_store_mb
        self.effective_keep = keep_raw
        self.store_raw = True
        self._warned = False
        self._reported = False
        self.process_id: int | None = None
        self.rollups: Rollups | None = None
        self.notable = Notable()
        self._unwritten: tuple[list[Any], list[Any]] = ([], [])
        # Marks and kept events of batches whose transaction failed: written with the next.
        self._unmarked: list[tuple[int, int, str]] = []
        self._unprotected = 0
        self._late: dict[int, tuple[int, float]] = {}
        self._due: list[tuple[int, float]] = []
        self._cursor = 0
        self._raw_since = 0.0
        self._stop_at = -math.inf
        self._notable_count = 0
        self._cap_id: int | None = None
        self._counts = {"pruned": 0, "notable": 0, "notable_dropped": 0, "raw_skipped": 0}
        self._next_size_check = 0.0
        self._next_coarsen = 0.0
        self.max_leak_after = 0.0
        self._configured = False
        self._span: tuple[float, float] | None = None
        self._stop: Callable[[], bool] = _never

    def configure(self, keep_raw: float, max_store_mb: float) -> None:
        """Apply a monitor's settings: the tightest of every monitor's on this store wins."""
        if not self._configured:
            self.keep_raw, self.max_store_mb = keep_raw, max_store_mb
        else:
            self.keep_raw = min(self.keep_raw, keep_raw)
            self.max_store_mb = min(self.max_store_mb, max_store_mb)
        self._configured = True
        self.effective_keep = self.keep_raw

    def start(self, conn: sqlite3.Connection, process_id: int, now: float) -> None:
        """A new connection and process row: start afresh (rows of this process start after
        the store's last event id), with this process's ``retention`` row."""
        self.process_id = process_id
        self.rollups = Rollups(process_id)
        self.notable = Notable()
        self._unwritten = ([], [])
        self._unmarked, self._unprotected = [], 0
        self._late, self._due = {}, []
        self._cursor = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        self._raw_since = 0.0
        self._stop_at = -math.inf
        self._notable_count = 0
        self._cap_id = None
        self._counts = dict.fromkeys(self._counts, 0)
        self._next_size_check = 0.0
        self._next_coarsen = now + COARSEN_EVERY_S
        self._span = None
        conn.execute(
            "INSERT OR IGNORE INTO retention (process_id, raw_since, keep_raw_s, "
            "effective_keep_s) VALUES (?, 0, ?, ?)",
            (process_id, _finite(self.keep_raw), _finite(self.effective_keep)),
        )

    def after_batch(
        self,
        conn: sqlite3.Connection,
        flat: Sequence[Any],
        pool_ids: dict[int, int] | None,
        stack_ids: dict[int, int] | None,
        leak_after: dict[int, float],
        now: float,
        raw_written: bool,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Roll up the batch ``flat`` the writer just wrote (or skipped: ``raw_written``
        false), mark its notable checkouts, then prune and check the size. Never raises.

        ``pool_ids``/``stack_ids`` map the records' pool keys and stack ids to the store's
        (``None``: already the store's); ``leak_after`` is by the store's pool id. Pruning
        and merging minute rows stop between two steps (each its own transaction) once
        ``stop()`` is true, as past their time budget: the rest is left for the next batch.
        """
        self._stop = stop or _never
        try:
            self._after_batch(conn, flat, pool_ids, stack_ids, leak_after, now, raw_written)
        except Exception as exc:  # sqlite3.Error, or anything else: the writer carries on
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if not self._reported:
                self._reported = True
                logger.warning(
                    "poolscope could not update the rollups or retention of its store (%s); "
                    "it retries with the next batch and prunes nothing meanwhile",
                    exc,
                )

    def _after_batch(self, conn, flat, pool_ids, stack_ids, leak_after, now, raw_written) -> None:  # type: ignore[no-untyped-def]
        rollups = self.rollups
        if rollups is None or self.process_id is None:
            return
        marks: list[tuple[int, int, str]] = []
        protected = 0
        if len(flat):
            limits = leak_after
            if limits:
                self.max_leak_after = max(self.max_leak_after, max(limits.values()))
            # From the C queue, in C where it can: the rollups, then the few records the
            # notable checkouts are found in; else (or with late checkouts to look for)
            # the whole batch in numpy.
            survey = None if self._late else _survey(flat, pool_ids, stack_ids, limits)
            batch = Batch.from_flat(flat, pool_ids, stack_ids) if survey is None else None
            if batch is not None:
                counts, notable = batch.kind_counts(), batch
                first, last = float(batch.at.min()), float(batch.at.max())
            else:
                counts, first, last, notable = survey  # type: ignore[misc]
            if self._span is not None:
                first, last = min(first, self._span[0]), max(last, self._span[1])
            self._span = (first, last)
            if not rollups.feed_events(flat, pool_ids, stack_ids):
                rollups.feed(
                    batch if batch is not None else Batch.from_flat(flat, pool_ids, stack_ids)
                )
            marks = self.notable.marks(notable, limits)
            if self._late:  # then the batch was read whole
                self._find_returned(batch)  # type: ignore[arg-type]
            protected = int(sum(counts[code] for code in _rollups.kind_codes(*PROTECTED_KINDS)))
            if not raw_written:
                self._counts["raw_skipped"] += len(flat) // RECORD_WIDTH
                self._raw_since = max(self._raw_since, last + 1e-6)
        rows, pool_rows = rollups.flush_rows()
        rows, pool_rows = self._unwritten[0] + rows, self._unwritten[1] + pool_rows
        self._unwritten = (rows, pool_rows)
        marks, protected = self._unmarked + marks, self._unprotected + protected
        if rows or pool_rows or marks or protected or self._due or any(self._counts.values()):
            # What the transaction changes in this keeper is put back if it fails: its marks
            # and counters then go with the next batch's, each once.
            saved = (dict(self._counts), self._notable_count, self._cap_id, self._raw_since)
            self._unmarked, self._unprotected = marks, protected
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._upsert(conn, rows, pool_rows)
                self._mark(conn, marks, protected)
                self._delete_returned(conn)
                self._write_counts(conn)
                self._write_span(conn)
                conn.execute("COMMIT")
            except BaseException:
                self._counts, self._notable_count, self._cap_id, self._raw_since = saved
                raise
            self._unmarked, self._unprotected = [], 0
        self._unwritten = ([], [])
        self._due = []
        if now >= self._next_size_check:
            self._next_size_check = now + SIZE_CHECK_S
            self._check_size(conn, now)
        self._prune(conn, now)
        if now >= self._next_coarsen:
            self._next_coarsen = now + COARSEN_EVERY_S
            self._coarsen(conn, now)

    def _upsert(
        self, conn: Any, rows: list[dict[str, Any]], pool_rows: list[dict[str, Any]]
    ) -> None:
        """Merge the batch's rollup rows into the store's (:func:`upsert_rollups`)."""
        upsert_rollups(conn, rows, pool_rows)

    def _mark(
        self, conn: sqlite3.Connection, marks: list[tuple[int, int, str]], protected: int
    ) -> None:
        room = MAX_NOTABLE - self._notable_count
        if marks:
            keep, over = marks[: max(0, room)], marks[max(0, room) :]
            if keep:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO notable (process_id, pool_id, checkout_id, reason) "
                    "VALUES (?, ?, ?, ?)",
                    [(self.process_id, p, c, r) for p, c, r in keep],
                )
                added = conn.total_changes - before
                self._notable_count += added
                self._counts["notable"] += added
            self._counts["notable_dropped"] += len(over)
        self._notable_count += protected
        if self._cap_id is None and self._notable_count > MAX_NOTABLE:
            # Kept kinds written from here on are pruned as any other (and counted).
            self._cap_id = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    def _find_returned(self, b: Batch) -> None:
        """Move the old checkouts the prune kept open (``_late``) that batch ``b`` returns
        to ``_due``: they are deleted in the batch's transaction (:meth:`_delete_returned`),
        their returns pruned as any other event."""
        returned = b.of(*RETURN_KINDS) & ~np.isnan(b.checkout_id)
        if not returned.any():
            return
        keys = b.pool[returned].astype(np.int64) * (1 << 40) + b.checkout_id[returned].astype(
            np.int64
        )
        late = np.fromiter(self._late, np.int64, len(self._late))
        for k in keys[np.isin(keys, late)].tolist():
            entry = self._late.pop(k, None)
            if entry is not None:
                self._due.append(entry)

    def _delete_returned(self, conn: sqlite3.Connection) -> None:
        if not self._due or self.process_id is None:
            return
        before = conn.total_changes
        delete_returned(conn, self.process_id, [i for i, _ in self._due])
        self._counts["pruned"] += conn.total_changes - before
        # Raw events before the prune that kept them are no longer complete.
        self._raw_since = max(self._raw_since, max(cutoff for _, cutoff in self._due))

    def _track_open(self, conn: sqlite3.Connection, lo: int, hi: int, cutoff: float) -> None:
        """Remember the checkouts of ids ``(lo, hi]`` the prune step just kept open."""
        for eid, pool, cid in kept_open(conn, self.process_id, lo, hi, cutoff):  # type: ignore[arg-type]
            if len(self._late) >= MAX_LATE:
                break
            self._late[int(pool) * (1 << 40) + int(cid)] = (int(eid), cutoff)

    def _write_span(self, conn: sqlite3.Connection) -> None:
        """In the transaction of the rollups (never one of its own): the first and last time
        of the events of this process rolled up so far, in ``meta`` ``span:<process id>``
        (see :func:`recorded_spans`)."""
        if self._span is None or self.process_id is None:
            return
        first, last = self._span
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value",
            (f"span:{self.process_id}", f"{first!r} {last!r}"),
        )

    def _write_counts(self, conn: sqlite3.Connection) -> None:
        c = self._counts
        conn.execute(
            "UPDATE retention SET raw_since = max(raw_since, ?), keep_raw_s = ?, "
            "effective_keep_s = ?, pruned = pruned + ?, notable = notable + ?, "
            "notable_dropped = notable_dropped + ?, raw_skipped = raw_skipped + ? "
            "WHERE process_id = ?",
            (self._raw_since, _finite(self.keep_raw), _finite(self.effective_keep), c["pruned"],
             c["notable"], c["notable_dropped"], c["raw_skipped"], self.process_id),
        )  # fmt: skip
        if self._raw_since:
            set_raw_since(conn, self._raw_since)
        self._counts = dict.fromkeys(c, 0)

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        keep = max(self.effective_keep, self.max_leak_after + LEAK_MARGIN_S)
        if math.isinf(keep):
            return
        cutoff = now - keep
        if cutoff <= self._stop_at:  # the oldest event not pruned is younger than the cutoff
            return
        top = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        deadline = REAL.perf() + PRUNE_BUDGET_S
        deleted_any = False
        while self._cursor < top and REAL.perf() < deadline and not self._stop():
            lo, hi = self._cursor, min(self._cursor + PRUNE_STEP_IDS, top)
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted, dropped, stop = prune_step(
                    conn,
                    self.process_id,
                    lo,
                    hi,
                    cutoff,
                    self._cap_id,  # type: ignore[arg-type]
                )
                self._track_open(conn, lo, hi if stop is None else stop - 1, cutoff)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            deleted_any = deleted_any or bool(deleted + dropped)
            self._counts["pruned"] += deleted + dropped
            self._counts["notable_dropped"] += dropped
            if stop is not None:
                self._cursor = stop - 1
                self._stop_at = conn.execute(
                    "SELECT at FROM events WHERE id = ?", (stop,)
                ).fetchone()[0]
                break
            self._cursor = hi
        if deleted_any:  # what is before the cutoff is no longer complete
            self._raw_since = max(self._raw_since, cutoff)
            conn.execute("BEGIN IMMEDIATE")
            self._write_counts(conn)
            conn.execute("COMMIT")

    def _check_size(self, conn: sqlite3.Connection, now: float) -> None:
        if math.isinf(self.max_store_mb):
            return
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        used = (pages - free) * size
        cap = self.max_store_mb * (1 << 20)
        if used > 0.95 * cap:  # at the cap: prune all that may be, store no more raw
            self.effective_keep = 0.0
            self.store_raw = False
            self._warn(used)
        elif used > 0.8 * cap:  # near it: keep raw events half as long
            before = self.effective_keep
            self.effective_keep = 86400.0 if math.isinf(before) else before / 2
            self._warn(used)
        elif used < 0.6 * cap:
            self.store_raw = True
            if self.effective_keep < self.keep_raw:
                self.effective_keep = min(self.keep_raw, max(60.0, self.effective_keep * 2))

    def _warn(self, used: int) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "poolscope's store is near its max_store_mb=%g (%.0f MB used): raw events are "
                "now kept for less than keep_raw=%g s, and past the cap only rolled up. "
                "Leaks, timeouts and long holds are kept; the application is not affected.",
                self.max_store_mb,
                used / (1 << 20),
                self.keep_raw,
            )

    def _coarsen(self, conn: sqlite3.Connection, now: float) -> None:
        deadline = REAL.perf() + PRUNE_BUDGET_S
        while REAL.perf() < deadline and not self._stop():
            conn.execute("BEGIN IMMEDIATE")
            try:
                age = MINUTE_ROWS_S if self.store_raw else MINUTE_ROWS_AT_CAP_S
                moved = coarsen_step(conn, self.process_id, now - age, COARSEN_ROWS)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if not moved:
                break


def _never() -> bool:
    return False


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
