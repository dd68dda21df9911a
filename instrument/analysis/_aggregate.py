"""Figures from the rollups (schema 2): counts, sums, maxima and histograms per call site and
per pool, read instead of pairing every raw checkout.

The analysis reads rollups where pairing raw events would cost too much (more than
:data:`EXACT_LIMIT` checkouts in the window) or where the raw events are gone (retention
pruned them: the window starts before ``raw_since``). Counts, sums and maxima from rollups
are exact; percentiles come from their log-bucket histograms, within
:data:`HISTOGRAM_RELATIVE_ERROR` of a recorded value. The few checkouts a report shows one
by one (leaks, open checkouts, the holders of each timeout) are always read from the raw
events, which retention keeps for them (see :func:`notable_keys`).
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import numpy as np
import pandas as pd

from .. import _histogram, _store
from ._model import _MAX_TIME

EXACT_LIMIT = 250_000
"""Up to this many checkouts in the window (and raw events complete there), the analysis
pairs raw events and every figure is exact; past it, where the store has rollups, counts
come from them (still exact) and percentiles from their histograms."""

RAW_SCAN_LIMIT = 2_000_000
"""A time window of a store holding more raw events than this reads rollups whatever its
size: raw events have no index on time, so pairing any window of them scans them all."""

HISTOGRAM_RELATIVE_ERROR = _histogram.MAX_RELATIVE_ERROR
"""The most a percentile read from a histogram differs from the recorded value of that rank,
relative to it (0.995 %)."""

SITE_COLUMNS = [
    "process_id", "pool_id", "stack_id", "checkouts", "returns", "gc_returned", "timeouts",
    "hold_sum_s", "hold_max_s", "wait_sum_s", "wait_max_s", "first_at", "last_at",
]  # fmt: skip

POOL_COLUMNS = [
    "process_id", "pool_id", "first_at", "last_at", "events", "peak_in_use", "peak_overflow",
    "peak_waiters", "peak_demand", "in_use_s", "invalidations", "disconnects",
]  # fmt: skip


class Rollup:
    """The rollups of a window: per (process, pool, stack) and per (process, pool).

    ``hold``/``wait`` map a row of ``sites`` (its position) to its merged histogram
    ``(indices, counts)``; rows without values are absent. Each is read and merged on
    first use (the summary needs no hold histogram).
    """

    def __init__(
        self, sites: pd.DataFrame, pools: pd.DataFrame, period_s: float, reader: Any = None
    ) -> None:
        self.sites = sites
        self.pools = pools
        self.period_s = period_s
        self._reader = reader
        self._merged: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def _histograms(self, column: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        if column not in self._merged:
            self._merged[column] = self._reader(column) if self._reader is not None else {}
        return self._merged[column]

    @property
    def hold(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return self._histograms("hold_hist")

    @property
    def wait(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return self._histograms("wait_hist")

    def total(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """The sum of every row's ``column`` histogram (``hold_hist`` or ``wait_hist``):
        from the merged ones where they are read already, else in one pass of their BLOBs."""
        name = column.removesuffix("_hist")
        if column in self._merged or self._reader is None:
            return merged(getattr(self, name), range(len(self.sites)))
        return self._reader(column, total=True).get(0, _histogram.merge([]))


def has_rollups(conn: sqlite3.Connection) -> bool:
    """Whether the store has a ``rollups`` table with at least one row."""
    if not _store.has_table(conn, "rollups"):
        return False
    return conn.execute("SELECT 1 FROM rollups LIMIT 1").fetchone() is not None


def unrolled_processes(data: Any) -> bool:
    """Whether a process of ``data``'s scope has no rollups of its events (the first release
    recorded it, and ``poolscope compact`` has not rolled it up): its figures must come
    from raw events."""
    if not _store.has_table(data.conn, "retention"):
        return True
    scope = ""
    if data.filters.processes is not None:
        ids = ", ".join(str(int(p)) for p in data.filters.processes)
        scope = f" AND id IN ({ids})" if ids else " AND 0"
    row = data.conn.execute(
        f"SELECT 1 FROM processes WHERE id NOT IN (SELECT process_id FROM retention){scope} LIMIT 1"
    ).fetchone()
    return row is not None


def raw_since(conn: sqlite3.Connection) -> float | None:
    """From when the store's raw events are complete (``None``: all of them are there)."""
    try:
        return _store.raw_since(conn)
    except (sqlite3.OperationalError, ValueError):
        return None


def _scope(
    pool_ids: list[int] | None, processes: tuple[int, ...] | None, since: float | None,
    until: float | None,
) -> tuple[str, list[Any]]:  # fmt: skip
    """SQL conditions (from `` AND``) for rollup rows of these pools, processes and periods
    overlapping ``[since, until]``."""
    sql, params = "", []
    if pool_ids is not None:
        ids = ", ".join(str(int(i)) for i in pool_ids)
        sql += f" AND pool_id IN ({ids})" if pool_ids else " AND 0"
    if processes is not None:
        sql += (
            f" AND process_id IN ({', '.join(str(int(p)) for p in processes)})"
            if processes
            else " AND 0"
        )
    if since is not None:
        sql += " AND start_at + period_s > ?"
        params.append(since)
    if until is not None:
        sql += " AND start_at <= ?"
        params.append(until)
    return sql, params


def checkouts_in(conn: sqlite3.Connection, data: Any) -> int:
    """How many checkouts the rollups count in the window of ``data`` (0 without rollups)."""
    f = data.filters
    cond, params = _scope(data.pool_ids, f.processes, f.since, f.until)
    row = conn.execute(f"SELECT SUM(checkouts) FROM rollups WHERE 1 {cond}", params).fetchone()
    return int(row[0] or 0)


def raw_event_count(conn: sqlite3.Connection) -> int:
    """How many raw events the store holds (counted on an index, not row by row)."""
    return int(conn.execute("SELECT COUNT(*) FROM main.events").fetchone()[0])


def load_rollup(data: Any) -> Rollup:
    """The rollups of ``data``'s window, summed per (process, pool, stack) in SQL and per
    (process, pool); histograms merged in numpy from the BLOBs when first used, never one
    Python object per bucket."""
    f = data.filters
    cond, params = _scope(data.pool_ids, f.processes, f.since, f.until)
    conn = data.conn
    rows = conn.execute(
        "SELECT process_id, pool_id, stack_id, SUM(checkouts), SUM(returns), "
        "SUM(gc_returned), SUM(timeouts), SUM(hold_sum_s), MAX(hold_max_s), SUM(wait_sum_s), "
        "MAX(wait_max_s), MIN(start_at), MAX(start_at + period_s) "
        f"FROM rollups WHERE 1 {cond} GROUP BY process_id, pool_id, stack_id "
        "ORDER BY process_id, pool_id, stack_id",
        params,
    ).fetchall()
    period = conn.execute("SELECT MIN(period_s) FROM rollups").fetchone()[0] or 60
    pools = _load_pools(conn, cond, params)
    if not rows:
        empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in SITE_COLUMNS})
        return Rollup(empty, pools, float(period))
    sites = pd.DataFrame.from_records(rows, columns=SITE_COLUMNS, coerce_float=True)
    for c in SITE_COLUMNS[7:]:
        sites[c] = pd.to_numeric(sites[c], errors="coerce").astype("float64")
    for c in SITE_COLUMNS[:7]:
        sites[c] = sites[c].astype("int64")
    keys = pd.MultiIndex.from_frame(sites[["process_id", "pool_id", "stack_id"]])

    def read(column: str, total: bool = False) -> dict[int, tuple[Any, Any]]:
        """One histogram column's BLOBs of the window, merged per row of ``sites`` (or all
        into one, group 0, for ``total``)."""
        if total:
            found = conn.execute(
                f"SELECT length({column}), {column} FROM rollups WHERE {column} IS NOT NULL {cond}",
                params,
            ).fetchall()
            if not found:
                return {}
            lengths, blobs = zip(*found, strict=True)
            group = np.zeros(len(blobs), dtype=np.int64)
            return _merge_blobs(group, blobs, np.array(lengths, dtype=np.int64) // 8, 1)
        found = conn.execute(
            f"SELECT process_id, pool_id, stack_id, length({column}), {column} "
            f"FROM rollups WHERE {column} IS NOT NULL {cond}",
            params,
        ).fetchall()
        if not found:
            return {}
        p, q, st, lengths, blobs = zip(*found, strict=True)
        group = keys.get_indexer(pd.MultiIndex.from_arrays([p, q, st]))
        return _merge_blobs(group, blobs, np.array(lengths, dtype=np.int64) // 8, len(keys))

    return Rollup(sites, pools, float(period), read)


def _load_pools(conn: sqlite3.Connection, cond: str, params: list[Any]) -> pd.DataFrame:
    rows = conn.execute(
        "SELECT process_id, pool_id, MIN(start_at), MAX(start_at + period_s), SUM(events), "
        "MAX(peak_in_use), MAX(peak_overflow), MAX(peak_waiters), MAX(peak_demand), "
        "SUM(in_use_s), SUM(invalidations), SUM(disconnects) FROM pool_rollups "
        f"WHERE 1 {cond} GROUP BY process_id, pool_id ORDER BY process_id, pool_id",
        params,
    ).fetchall()
    out = pd.DataFrame.from_records(rows, columns=POOL_COLUMNS, coerce_float=True)
    for c in POOL_COLUMNS[2:]:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("float64")
    return out


_MERGE_CHUNK_ROWS = 4096
"""Rollup rows whose histograms are merged at a time: memory stays bounded by one chunk."""


def _merge_blobs(
    group: np.ndarray,
    blobs: tuple[Any, ...],
    pairs_of: np.ndarray | None = None,
    n_groups: int | None = None,
) -> dict[int, tuple[Any, Any]]:
    """Per group, the sum of the histogram BLOBs of its rows, a chunk of rows at a time in
    numpy (never one Python object per bucket). ``pairs_of``: each BLOB's number of
    (bucket, count) pairs, where the caller has them (else measured here)."""
    if n_groups is None:
        n_groups = int(group.max()) + 1 if len(group) else 0
    dense: np.ndarray | None = None  # groups x buckets, while that stays small
    parts = []
    for start in range(0, len(blobs), _MERGE_CHUNK_ROWS):
        chunk = blobs[start : start + _MERGE_CHUNK_ROWS]
        if pairs_of is not None:
            lengths = pairs_of[start : start + _MERGE_CHUNK_ROWS]
        else:
            lengths = np.array([len(b) // 8 if b else 0 for b in chunk], dtype=np.int64)
        if not lengths.sum():
            continue
        pairs = np.frombuffer(b"".join(b for b in chunk if b), dtype="<u4").reshape(-1, 2)
        owner = np.repeat(group[start : start + len(chunk)].astype(np.int64), lengths)
        width = int(pairs[:, 0].max()) + 1
        if n_groups * max(width, dense.shape[1] if dense is not None else 0) <= _DENSE_CELLS:
            if dense is None or dense.shape[1] < width:
                grown = np.zeros((n_groups, width), dtype=np.int64)
                if dense is not None:
                    grown[:, : dense.shape[1]] = dense
                dense = grown
            flat = owner * dense.shape[1] + pairs[:, 0]
            dense += (
                np.bincount(flat, weights=pairs[:, 1].astype(np.float64), minlength=dense.size)
                .astype(np.int64)
                .reshape(dense.shape)
            )
        else:
            parts.append(_sum_by_key(owner * _KEY + pairs[:, 0], pairs[:, 1]))
    if dense is not None:
        g, b = np.nonzero(dense)
        parts.append((g.astype(np.int64) * _KEY + b, dense[g, b]))
    if not parts:
        return {}
    keys, counts = _sum_by_key(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    )
    groups, buckets = keys // _KEY, keys % _KEY
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.append(starts[1:], len(groups))
    return {
        int(groups[lo]): (buckets[lo:hi], counts[lo:hi])
        for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True)
    }


_DENSE_CELLS = 4_000_000
"""Up to this many (group, bucket) cells, histograms are summed in one dense array."""


_KEY = 1 << 32
"""Group and bucket in one int64 key: group * _KEY + bucket."""


def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``keys`` and the sum of ``counts`` of each."""
    uniq, inverse = np.unique(keys.astype(np.int64), return_inverse=True)
    sums = np.bincount(inverse.reshape(-1), weights=counts.astype(np.float64))
    return uniq, sums.astype(np.int64)


def merged(hists: dict[int, tuple[Any, Any]], rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """The sum of the histograms of ``rows`` (positions in :attr:`Rollup.sites`)."""
    return _histogram.merge([hists[int(i)] for i in rows if int(i) in hists])


def add_values(
    hist: tuple[np.ndarray, np.ndarray], values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``hist`` with ``values`` (seconds; NaN left out) added."""
    values = np.asarray(values, dtype="float64")
    values = values[~np.isnan(values)]
    if not values.size:
        return hist
    return _histogram.merge(hist, _histogram.from_values(values))


def open_holds(co: pd.DataFrame, by: list[str]) -> dict[Any, np.ndarray]:
    """The time held so far of the open checkouts in ``co``, per value of the ``by``
    columns (a tuple key for several)."""
    if not len(co):
        return {}
    opened = co[(co["outcome"] == "open").to_numpy()]
    if opened.empty:
        return {}
    opened = opened.astype({c: object for c in by})
    key = by if len(by) > 1 else by[0]
    return {
        k: rows["hold_s"].to_numpy(dtype="float64") for k, rows in opened.groupby(key, sort=False)
    }


def quantiles(hist: tuple[np.ndarray, np.ndarray], qs: list[float]) -> list[float]:
    """``qs`` quantiles (0..1) of ``hist`` in seconds; NaN when empty."""
    indices, counts = hist
    if not int(np.sum(counts)):
        return [math.nan] * len(qs)
    return [float(v) for v in np.atleast_1d(_histogram.quantile(indices, counts, qs))]


def count_above(hist: tuple[np.ndarray, np.ndarray], seconds: float) -> int:
    """How many values of ``hist`` lie in buckets above the one holding ``seconds``."""
    indices, counts = hist
    return int(counts[indices > _histogram.bucket_of(seconds)].sum())


_FOUND_KINDS = ("gc_checkin", "detach", "unwatched", "timeout", "dropped")
"""Event kinds the notable scan reads every row of (besides the long holds)."""


def notable_dropped(conn: sqlite3.Connection, processes: Any = None) -> int:
    """Notable checkouts and events the writers of ``processes`` (all when ``None``) did not
    keep past their cap (``retention.notable_dropped``): findings among them may be missing."""
    if not _store.has_table(conn, "retention"):
        return 0
    scope = ""
    if processes is not None:
        ids = ", ".join(str(int(p)) for p in processes)
        scope = f" AND process_id IN ({ids})" if ids else " AND 0"
    (dropped,) = conn.execute(
        f"SELECT SUM(notable_dropped) FROM retention WHERE 1{scope}"
    ).fetchone()
    return int(dropped or 0)


def _notable_complete(data: Any) -> bool:
    """Whether the ``notable`` table names every checkout a report shows one by one in
    ``data``'s scope but the open ones: every process has a ``retention`` row (its writer,
    or ``compact``, marked them), none dropped a mark past its cap, and the leak threshold
    is not below a pool's own (the marks of long holds used the pool's)."""

    conn = data.conn
    if not _store.has_table(conn, "notable"):
        return False
    if notable_dropped(conn, data.filters.processes):
        return False
    threshold = data.filters.leak_after
    if threshold is None:
        return True
    from ._load import _load_pools

    own = _load_pools(conn)["leak_after_s"].dropna()
    return bool(len(own)) and threshold >= float(own.max())


def notable_keys(data: Any, long_s: float, horizons: dict[tuple[int, int], float]) -> str:
    """Fill the temporary table ``poolscope_keys`` with the checkouts a report shows one by
    one, and return its name: returned by the garbage collector, by ``detach()`` or not
    watched any more, held longer than ``long_s``, still open, and taken by a pool in the
    ``horizons[(process, pool)]`` seconds before one of its timeouts (its holders; a holder
    taken earlier was held longer, so it is one of the long holds). The ids of the timeout
    events go to ``data.timeout_ids``, the event totals of the scope to ``data.event_totals``.

    One scan of the events gives the row ids of those returns and timeouts (as one
    ``group_concat``, no Python object per row); the checkouts before a timeout are found
    by their ids, which grow with time, through the checkout index; the open checkouts from
    that index alone (a key with one row has no return). Where the ``notable`` table is
    complete (:func:`_notable_complete`) the leaked, long-held and holding checkouts come
    from it instead, and the scan looks only for timeouts and drop counts.
    """
    from ._load import _event_filter

    conn = data.conn
    cond, params = _event_filter(data)
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS poolscope_keys (process_id INTEGER, pool_id INTEGER, "
        "checkout_id INTEGER, PRIMARY KEY (process_id, pool_id, checkout_id)) WITHOUT ROWID"
    )
    conn.execute("DELETE FROM temp.poolscope_keys")
    # On main.events, unchecked (checking every number of every row costs more than the
    # rest of the report): the rows found are read again through the checking view.
    marked = _notable_complete(data)
    # Where the writer (or compact) marked every notable checkout, the scan needs only the
    # timeouts and drop counts; the checkouts come from the notable table.
    if marked and _store.has_rare_index(conn):
        # The timeouts and drop counts through their own index (a few rows); the count and
        # span of the events from a scan of their times alone.
        ids = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM main.events INDEXED BY events_rare "
                f"WHERE kind IN ('timeout', 'dropped') {cond}",
                params,
            )
        ]
        span = None if cond else _recorded_span(conn)
        if span is not None:
            n, first_at, last_at = span
        else:
            n, first_at, last_at = conn.execute(
                f"SELECT COUNT(*), MIN(at), MAX(at) FROM main.events WHERE 1 {cond}", params
            ).fetchone()
    else:
        wanted = (
            "kind IN ('timeout', 'dropped')" if marked else f"kind IN {_FOUND_KINDS} OR hold_s > ?"
        )
        found, n, first_at, last_at = conn.execute(
            f"SELECT group_concat(CASE WHEN {wanted} THEN id END), "
            f"COUNT(*), MIN(at), MAX(at) FROM main.events WHERE 1 {cond}",
            [*([] if marked else [float(long_s)]), *params],
        ).fetchone()
        ids = [int(i) for i in found.split(",")] if found else []
    rows = []
    for start in range(0, len(ids), 5000):
        chunk = ", ".join(str(i) for i in ids[start : start + 5000])
        rows += conn.execute(
            "SELECT id, process_id, pool_id, checkout_id, kind, count, at FROM events "
            f"WHERE id IN ({chunk})"
        ).fetchall()
    data.timeout_ids = [r[0] for r in rows if r[4] == "timeout"]
    dropped = sum(int(r[5]) for r in rows if r[4] == "dropped" and r[5] is not None)
    bad = 0
    if n and not (isinstance(first_at, float | int) and isinstance(last_at, float | int)
                  and first_at >= 0 and last_at <= _MAX_TIME):  # fmt: skip
        # A time that cannot be real: count those events and leave them out of the span.
        ok = f"at BETWEEN 0 AND {_MAX_TIME!r}"
        bad, first_at, last_at = conn.execute(
            f"SELECT SUM(NOT ({ok})), MIN(CASE WHEN {ok} THEN at END), "
            f"MAX(CASE WHEN {ok} THEN at END) FROM main.events WHERE 1 {cond}",
            params,
        ).fetchone()
    data.event_totals = (int(n or 0) - int(bad or 0), first_at, last_at, dropped, int(bad or 0))
    conn.executemany(
        "INSERT OR IGNORE INTO temp.poolscope_keys VALUES (?, ?, ?)",
        [(r[1], r[2], r[3]) for r in rows if r[3] is not None and r[4] != "timeout"],
    )
    moments = [(int(r[1]), int(r[2]), float(r[6])) for r in rows if r[4] == "timeout"]
    bounds: dict[tuple[int, int], tuple[int, int] | None] = {}
    if marked:
        from ._load import _event_scope

        conn.execute(
            "INSERT OR IGNORE INTO temp.poolscope_keys SELECT process_id, pool_id, checkout_id "
            f"FROM notable WHERE 1{_event_scope(data, data.pool_ids)}"
        )
        moments = []  # their holders are marked
    for proc, pool_id, at in moments:
        horizon = horizons.get((proc, pool_id), long_s)
        if (proc, pool_id) not in bounds:
            bounds[(proc, pool_id)] = _id_bounds(conn, proc, pool_id)
        ends = bounds[(proc, pool_id)]
        if ends is not None:
            _add_checkouts_between(conn, proc, pool_id, ends, at - horizon - _ID_SLACK_S, at)
    for proc, pool_id, expected, spans in _open_spans(data):
        _add_open_checkouts(conn, proc, pool_id, expected, spans, bounds)
    return "poolscope_keys"


def _recorded_span(conn: sqlite3.Connection) -> tuple[int, float, float] | None:
    """The count, first and last time of every event of the store, exact, without reading
    them all: the count from the range of the events' ids, the times from the span each process's
    writer recorded with its rollups (:func:`_retention.recorded_spans`). Those cover every
    event where the rollups count as many events as the table holds, none was pruned or
    left unstored, and every process has a span; else ``None`` (the caller scans)."""
    from .. import _retention

    spans = _retention.recorded_spans(conn)
    procs = [int(r[0]) for r in conn.execute("SELECT id FROM processes")]
    if not procs or any(p not in spans for p in procs):
        return None
    gone = conn.execute("SELECT COUNT(*), SUM(pruned + raw_skipped) FROM retention").fetchone()
    if int(gone[0] or 0) < len(procs) or int(gone[1] or 0):
        return None
    # The count from the ids' range (two seeks; counting the rows reads every page): rows
    # are only deleted by pruning, counted above, so the ids run without a gap, and a
    # count equal to the rollups' says each row was rolled up.
    # (One aggregate a query: SQLite seeks for a lone MIN or MAX, and scans for both.)
    lo = conn.execute("SELECT MIN(id) FROM main.events").fetchone()[0]
    hi = conn.execute("SELECT MAX(id) FROM main.events").fetchone()[0]
    if lo is None or hi is None:
        return None
    n = int(hi) - int(lo) + 1
    rolled = conn.execute("SELECT SUM(events) FROM pool_rollups").fetchone()[0]
    if int(rolled or 0) != n:
        return None
    first = min(spans[p][0] for p in procs)
    last = max(spans[p][1] for p in procs)
    if not (first >= 0 and last <= _MAX_TIME):
        return None
    return n, first, last


_ID_SLACK_S = 5.0
"""Checkout ids grow with checkout times, but threads may take them a little out of order:
the search for the checkouts of a span reaches this much further back."""


def _id_bounds(conn: sqlite3.Connection, proc: int, pool_id: int) -> tuple[int, int] | None:
    """The smallest and largest checkout id of one pool (two index seeks)."""
    base = (
        "SELECT checkout_id FROM main.events WHERE process_id = ? AND pool_id = ? "
        "AND checkout_id IS NOT NULL ORDER BY checkout_id"
    )
    lo = conn.execute(base + " LIMIT 1", (proc, pool_id)).fetchone()
    hi = conn.execute(base + " DESC LIMIT 1", (proc, pool_id)).fetchone()
    return None if lo is None or hi is None else (int(lo[0]), int(hi[0]))


def _add_checkouts_between(
    conn: sqlite3.Connection, proc: int, pool_id: int, ends: tuple[int, int], lo: float,
    hi: float,
) -> None:  # fmt: skip
    """Add to ``poolscope_keys`` the checkouts of one pool taken from ``lo`` to ``hi``: a
    binary search on the checkout ids (each probe one index seek), then one index range."""
    first = _first_id_at(conn, proc, pool_id, ends, lo)
    last = _first_id_at(conn, proc, pool_id, ends, math.nextafter(hi, math.inf))
    if first is None:
        return
    conn.execute(
        "INSERT OR IGNORE INTO temp.poolscope_keys SELECT DISTINCT process_id, pool_id, "
        "checkout_id FROM main.events WHERE process_id = ? AND pool_id = ? "
        "AND checkout_id BETWEEN ? AND ?",
        (proc, pool_id, first, (last if last is not None else 1 << 62)),
    )


def _first_id_at(
    conn: sqlite3.Connection, proc: int, pool_id: int, ends: tuple[int, int], at: float
) -> int | None:
    """The smallest checkout id of the pool whose checkout happened at ``at`` or later (as
    far as ids follow times); ``None`` if none did."""
    probe = (
        "SELECT checkout_id, at FROM main.events WHERE process_id = ? AND pool_id = ? "
        "AND checkout_id >= ? AND checkout_id IS NOT NULL AND kind = 'checkout' "
        "ORDER BY checkout_id LIMIT 1"
    )
    lo_id, hi_id = ends
    # Every checkout with an id below lo happened before ``at``; every one from hi on at or
    # after it (hi past the last id: none did).
    lo, hi = int(lo_id), int(hi_id) + 1
    lo_at = hi_at = None  # the times of the checkouts at lo - 1 and hi, once probed
    step = 0
    while lo < hi:
        if step % 2 == 0 and lo_at is not None and hi_at is not None and hi_at > lo_at:
            # Ids grow about evenly with time: guess by interpolation (every other step,
            # so that a skewed pool still takes no more than twice the halvings).
            mid = min(max(lo + int((at - lo_at) / (hi_at - lo_at) * (hi - lo)), lo), hi - 1)
        else:
            mid = (lo + hi) // 2
        step += 1
        row = conn.execute(probe, (proc, pool_id, mid)).fetchone()
        if row is None or int(row[0]) >= hi:  # no checkout id in [mid, hi)
            hi = mid
        elif row[1] < at:
            lo, lo_at = int(row[0]) + 1, float(row[1])
        else:
            hi, hi_at = int(row[0]), float(row[1])
    return hi if hi <= int(hi_id) else None


def _open_spans(data: Any) -> list[tuple[int, int, int, list[tuple[float, float]]]]:
    """Per (process, pool) of ``data``'s scope whose rollups, over the whole store, count
    more checkouts than returns (the only ones with open checkouts: a checkout taken before
    the window may still be out in it): how many more, and the rollup periods where those
    were taken, as far as the rollups tell (:func:`_add_open_checkouts` reads on from them).

    Per call site, checkouts (by checkout time) minus returns (by return time) summed up to
    each period is how many were out at its end; the lowest of that from a period on rises
    where a checkout never returned was out, and it was taken by the first period whose
    count is that lowest. Computed for every call site at once in numpy.
    """
    from ._load import _in_list

    f = data.filters
    cond = _in_list("pool_id", data.pool_ids)
    if f.processes is not None:
        cond += _in_list("process_id", list(f.processes))
    rows = data.conn.execute(
        "SELECT process_id, pool_id, stack_id, start_at, period_s, checkouts - returns "
        f"FROM rollups WHERE checkouts != returns{cond} "
        "ORDER BY process_id, pool_id, stack_id, start_at"
    ).fetchall()
    if not rows:
        return []
    table = np.array(rows, dtype=np.float64)
    proc, pool, stack = (table[:, i].astype(np.int64) for i in range(3))
    start, period = table[:, 3], table[:, 4]
    delta = table[:, 5].astype(np.int64)
    # Segments: one per (process, pool, stack), rows in time order within each.
    new_site = np.r_[True, (proc[1:] != proc[:-1]) | (pool[1:] != pool[:-1])
                     | (stack[1:] != stack[:-1])]  # fmt: skip
    site = np.cumsum(new_site) - 1
    site_start = np.flatnonzero(new_site)
    total = np.cumsum(delta)
    before = np.r_[0, total][site_start]  # the running sum before each segment
    out_at_end = total - before[site]
    # The lowest count from each period on, within its segment: a reversed running minimum
    # over segments kept apart by an offset larger than any count (later segments higher).
    span = int(np.abs(delta).sum()) + 1
    shifted = out_at_end + site * (2 * span)
    floor = np.minimum.accumulate(shifted[::-1])[::-1] - site * (2 * span)
    clipped = np.maximum(floor, 0)
    previous = np.r_[0, clipped[:-1]]
    previous[site_start] = 0
    rise = clipped - previous
    settled = np.flatnonzero(out_at_end == floor)  # the last row of each segment is one
    spans: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for i in np.flatnonzero(rise > 0).tolist():
        # Taken from period i (others still out may have raised the count there first)
        # until the first period whose count is the floor.
        j = int(settled[np.searchsorted(settled, i)])
        spans.setdefault((int(proc[i]), int(pool[i])), []).append(
            (float(start[i]), float(start[j] + period[j]))
        )
    expected: dict[tuple[int, int], int] = {}
    for p, q, d in zip(proc.tolist(), pool.tolist(), delta.tolist(), strict=True):
        expected[(p, q)] = expected.get((p, q), 0) + d
    return [(p, q, e, spans.get((p, q), [])) for (p, q), e in sorted(expected.items()) if e > 0]


def _add_open_checkouts(
    conn: sqlite3.Connection,
    proc: int,
    pool_id: int,
    expected: int,
    spans: list[tuple[float, float]],
    bounds: dict[tuple[int, int], tuple[int, int] | None],
) -> None:
    """Add one pool's open checkouts to ``poolscope_keys``: the keys with one row in the
    checkout index (index only) whose row is a checkout, among the checkouts of ``spans``;
    while those and the open ones found already hold fewer than ``expected``, each span is
    read on, twice as far each round (a checkout still out over a later period may have
    made the rollups place one too early), at the end from the first span on to the pool's
    last checkout (a ``detach`` is no return in the rollups: then every key from there on
    is read)."""
    if (proc, pool_id) not in bounds:
        bounds[(proc, pool_id)] = _id_bounds(conn, proc, pool_id)
    ends = bounds[(proc, pool_id)]
    if ends is None:
        return
    # Open checkouts with rows besides their checkout (``leak_suspected``: flagged by the
    # watchdog) are among the keys found already (marked notable, or their hold scanned).
    found = {int(r[0]) for r in conn.execute(_OPEN_KEYS_FOUND, (proc, pool_id))}
    read: list[tuple[int, int]] = []  # checkout id ranges read so far

    def read_ids(first: int, last: int) -> None:
        for lo, hi in _unread(read, first, last):
            candidates = [int(r[0]) for r in conn.execute(_SINGLE_KEYS, (proc, pool_id, lo, hi))]
            for start in range(0, len(candidates), 500):  # a few: checked one by one
                chunk = ", ".join(str(c) for c in candidates[start : start + 500])
                found.update(
                    int(r[0])
                    for r in conn.execute(
                        "SELECT checkout_id FROM main.events WHERE process_id = ? "
                        f"AND pool_id = ? AND checkout_id IN ({chunk}) AND kind = 'checkout'",
                        (proc, pool_id),
                    )
                )
        read.append((first, last))

    starts: dict[float, int | None] = {}
    for lo, _ in spans if len(found) < expected else ():
        if lo not in starts:
            starts[lo] = _first_id_at(conn, proc, pool_id, ends, lo - _ID_SLACK_S)
    reach = [hi - lo for lo, hi in spans]
    while spans and len(found) < expected:
        done = True
        for (lo, _), width in zip(spans, reach, strict=True):
            first = starts[lo]
            if first is None:
                continue
            last = _first_id_at(conn, proc, pool_id, ends, lo + width + _ID_SLACK_S)
            read_ids(first, ends[1] if last is None else last)
            done = done and last is None
        if done:
            break
        reach = [2 * w for w in reach]
    if len(found) < expected:  # not all where the rollups put them: every key from the first
        # None was out at the end of the period before the first span: all were taken since.
        earliest = min((lo for lo, _ in spans), default=None)
        start = starts[earliest] if earliest is not None else None
        read_ids(ends[0] if start is None else start, ends[1])
    conn.executemany(
        "INSERT OR IGNORE INTO temp.poolscope_keys VALUES (?, ?, ?)",
        [(proc, pool_id, c) for c in sorted(found)],
    )


_OPEN_KEYS_FOUND = (
    "SELECT k.checkout_id FROM temp.poolscope_keys AS k WHERE k.process_id = ? "
    "AND k.pool_id = ? AND EXISTS (SELECT 1 FROM main.events AS o "
    "WHERE o.process_id = k.process_id AND o.pool_id = k.pool_id "
    "AND o.checkout_id = k.checkout_id AND o.kind = 'checkout') "
    "AND NOT EXISTS (SELECT 1 FROM main.events AS r WHERE r.process_id = k.process_id "
    "AND r.pool_id = k.pool_id AND r.checkout_id = k.checkout_id "
    "AND r.kind IN ('checkin', 'gc_checkin', 'detach', 'unwatched'))"
)
"""The open checkouts of one pool among the keys found so far."""


_SINGLE_KEYS = (
    "SELECT checkout_id FROM main.events WHERE process_id = ? AND pool_id = ? "
    "AND checkout_id BETWEEN ? AND ? GROUP BY process_id, pool_id, checkout_id "
    "HAVING COUNT(*) = 1"
)
"""The checkout ids of one pool in a range with one row in the checkout index (the index
alone: the keys found are read again through the checking view)."""


def _unread(read: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The parts of the id range ``[first, last]`` outside every range of ``read``."""
    parts = [(first, last)]
    for lo, hi in read:
        parts = [
            piece
            for a, b in parts
            for piece in ((a, min(b, lo - 1)), (max(a, hi + 1), b))
            if piece[0] <= piece[1]
        ]
    return parts
