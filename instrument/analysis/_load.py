"""Reading a store: opening it read-only, its processes and pools, and every checkout paired
with its return and classified (the :class:`_Data` every other question derives from)."""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .. import _store
from ..exceptions import StoreCorruptError
from . import _aggregate
from ._model import (
    _CHECKOUT_COLUMNS,
    _CORE_COLUMNS,
    _DEFAULT_LEAK_AFTER_S,
    _MAX_TIME,
    _POOL_COLUMNS,
    _PROCESS_COLUMNS,
    _RETURN_KINDS,
    LEAK_CLASSES,
    STALE_HEARTBEAT_S,
    Filters,
)


def open_store(store: str | os.PathLike[str] | None) -> sqlite3.Connection:
    """Open a store read-only after checking that it is a poolscope store this version reads.

    :param store: path to the store. May be ``None`` for ``$POOLSCOPE_STORE``, else
        ``./poolscope.db``.
    :raises StoreNotFoundError: no file at that path.
    :raises StoreCorruptError: not a SQLite file, or a damaged one.
    :raises ForeignStoreError: an empty file, or a SQLite file of another application.
    :raises StoreVersionError: written by a newer poolscope.

    Events whose time or numbers cannot be real (a time out of range or not a number, a
    text where a count belongs: a damaged or tampered store) are left out of everything
    read through the connection; :func:`summary` counts them as ``ignored_events``.
    """
    conn = _store.open_for_reading(store)
    try:
        _set_aside_bad_events(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        path = _store.resolve_store_path(store)
        raise StoreCorruptError(f"{path} is a damaged SQLite file ({exc})") from None
    return conn


_NUMERIC_EVENT_COLUMNS = (
    "process_id", "pool_id", "connection_id", "checkout_id", "in_use", "idle", "overflow",
    "waiters", "stack_id", "wait_s", "connect_s", "hold_s", "count",
)  # fmt: skip


_SANE_EVENT = f"at BETWEEN 0 AND {_MAX_TIME!r}" + "".join(
    f" AND ({c} IS NULL OR {c} BETWEEN -1e15 AND 1e15)" for c in _NUMERIC_EVENT_COLUMNS
)
"""An event row every reader can take: its time in range, its numbers numbers (a text or a
blob compares greater than any number in SQLite, and infinity lies outside the bounds)."""


def _set_aside_bad_events(conn: sqlite3.Connection) -> None:
    """Hide events that are not :data:`_SANE_EVENT` behind a temporary ``events`` view.

    The view lives in the connection's own temporary schema (the store stays read-only and
    untouched) and shadows ``main.events`` for every query. A store without rollups is
    checked by one scan here, and a store without such rows, the normal case, is then read
    directly. A store with rollups is not scanned (checking every number of every row of a
    big store costs more than its whole report): the view checks each row a query reads,
    and :func:`_ignored_events` counts the bad ones only when asked.
    """
    if _aggregate.has_rollups(conn):
        conn.execute(f"CREATE TEMP VIEW events AS SELECT * FROM main.events WHERE {_SANE_EVENT}")
        return
    bad = conn.execute(f"SELECT COUNT(*) FROM main.events WHERE NOT ({_SANE_EVENT})").fetchone()
    conn.execute("CREATE TEMP TABLE poolscope_ignored (events INTEGER NOT NULL)")
    conn.execute("INSERT INTO poolscope_ignored VALUES (?)", (int(bad[0] or 0),))
    if bad[0]:
        conn.execute(f"CREATE TEMP VIEW events AS SELECT * FROM main.events WHERE {_SANE_EVENT}")


def _ignored_events(conn: sqlite3.Connection) -> int:
    """How many events :func:`open_store` left out of this connection (0 if it did not open
    it); counted once, by one scan, on first asking."""
    try:
        row = conn.execute("SELECT events FROM temp.poolscope_ignored").fetchone()
    except sqlite3.OperationalError:
        if not conn.execute(
            "SELECT 1 FROM sqlite_temp_master WHERE type = 'view' AND name = 'events'"
        ).fetchone():
            return 0
        bad = conn.execute(f"SELECT COUNT(*) FROM main.events WHERE NOT ({_SANE_EVENT})")
        n = int(bad.fetchone()[0] or 0)
        conn.execute("CREATE TEMP TABLE poolscope_ignored (events INTEGER NOT NULL)")
        conn.execute("INSERT INTO poolscope_ignored VALUES (?)", (n,))
        return n
    return int(row[0])


@dataclass
class _Data:
    """Everything loaded once for one set of filters; the public functions derive from it."""

    conn: sqlite3.Connection
    filters: Filters
    now: float
    processes: pd.DataFrame
    pools: pd.DataFrame
    pool_ids: list[int] | None  # None: no restriction
    stacks: pd.DataFrame
    _checkouts: pd.DataFrame | None = field(default=None, repr=False)
    _core: pd.DataFrame | None = field(default=None, repr=False)
    _peaks: pd.DataFrame | None = field(default=None, repr=False)
    _timeouts: pd.DataFrame | None = field(default=None, repr=False)
    _source: str | None = field(default=None, repr=False)
    _rollup: _aggregate.Rollup | None = field(default=None, repr=False)
    timeout_ids: list[int] | None = field(default=None, repr=False)
    event_totals: tuple[Any, ...] | None = field(default=None, repr=False)

    @property
    def checkouts(self) -> pd.DataFrame:
        """Every paired checkout with all columns (thread and task included)."""
        if self._checkouts is None:
            self._checkouts = _load_checkouts(self, full=True)
            if self.source == "raw_events":
                self._core = self._checkouts
        return self._checkouts

    @property
    def core(self) -> pd.DataFrame:
        """Paired checkouts without the string columns: what the report needs for all rows.

        Where the figures come from rollups (:attr:`source`), only the checkouts shown one
        by one: leaked, open, held long, and those around each timeout (the holders)."""
        if self._core is None:
            if self.source == "raw_events":
                self._core = _load_checkouts(self, full=False)
            else:
                self._core = _load_checkouts(self, full=False, keys=_notable_keys(self))
        return self._core

    @property
    def source(self) -> str:
        """Where counts and distributions come from: ``raw_events`` (every checkout paired,
        exact) or ``rollups`` (counts exact, percentiles from histograms; see
        :mod:`._aggregate`)."""
        if self._source is None:
            self._source = _choose_source(self)
        return self._source

    @property
    def rollup(self) -> _aggregate.Rollup:
        """The rollups of the window (read once)."""
        if self._rollup is None:
            self._rollup = _aggregate.load_rollup(self)
        return self._rollup


def _choose_source(data: _Data) -> str:
    """``rollups`` where the store has them for every process and the window reaches back
    before the raw events are complete, or it holds more than
    :data:`_aggregate.EXACT_LIMIT` checkouts, or it is a time window of a store holding more
    than :data:`_aggregate.RAW_SCAN_LIMIT` raw events; else ``raw_events``."""
    if not _aggregate.has_rollups(data.conn) or _aggregate.unrolled_processes(data):
        return "raw_events"
    since = _aggregate.raw_since(data.conn)
    if since is not None and (data.filters.since is None or data.filters.since < since):
        return "rollups"
    if _aggregate.checkouts_in(data.conn, data) > _aggregate.EXACT_LIMIT:
        return "rollups"
    # Raw events have no index on time: any window of them is read by a scan of them all.
    windowed = data.filters.since is not None or data.filters.until is not None
    if windowed and _aggregate.raw_event_count(data.conn) > _aggregate.RAW_SCAN_LIMIT:
        return "rollups"
    return "raw_events"


def _notable_keys(data: _Data) -> str:
    """The temporary table of the checkouts :attr:`_Data.core` holds where figures come
    from rollups (see :func:`_aggregate.notable_keys`)."""
    if _aggregate._notable_complete(data):  # every holder is marked: no horizon needed
        return _aggregate.notable_keys(data, math.inf, {})
    rollup = data.rollup
    leak_after = _leak_after_by_pool(data).dropna()
    horizons = {}
    sites = rollup.sites
    groups = sites.groupby(["process_id", "pool_id"], sort=False).groups
    for (proc, pool_id), rows in groups.items():
        p99 = _aggregate.quantiles(_aggregate.merged(rollup.hold, rows), [0.99])[0]
        horizons[(int(proc), int(pool_id))] = max(1.0, 0.0 if math.isnan(p99) else p99)
    # Holds longer than the shortest horizon are read whole: a holder of any timeout that
    # started before the horizon of its pool is one of them.
    long_s = min([*horizons.values(), *(float(v) for v in leak_after)], default=1.0)
    return _aggregate.notable_keys(data, long_s, horizons)


def _load(conn: sqlite3.Connection, filters: Filters) -> _Data:
    now = time.time()
    procs = _load_processes(conn, now)
    all_pools = _load_pools(conn)
    selected = all_pools
    restricted = False
    if filters.pools is not None:
        selected = selected[selected["name"].isin(list(filters.pools))]
        restricted = True
    if filters.processes is not None:
        selected = selected[selected["process_id"].isin(list(filters.processes))]
        procs = procs[procs["id"].isin(list(filters.processes))].reset_index(drop=True)
        restricted = True
    if filters.pools is not None:  # only the processes that had one of those pools
        procs = procs[procs["id"].isin(selected["process_id"])].reset_index(drop=True)
    pool_ids = [int(i) for i in selected["id"]] if restricted else None
    stacks = _frame("SELECT id, fingerprint, site, frames FROM stacks", conn)
    return _Data(conn, filters, now, procs, selected.reset_index(drop=True), pool_ids, stacks)


def _load_processes(conn: sqlite3.Connection, now: float) -> pd.DataFrame:
    df = _frame(
        "SELECT id, pid, host, argv, started_at, heartbeat_at, ended_at, end_reason "
        "FROM processes ORDER BY id",
        conn,
    )
    if df.empty:
        return pd.DataFrame(columns=_PROCESS_COLUMNS)
    for column in ("started_at", "heartbeat_at", "ended_at"):
        # A time no process can have (a damaged or edited row) reads as missing.
        at = pd.to_numeric(df[column], errors="coerce")
        df[column] = at.where((at >= 0) & (at <= _MAX_TIME))
    df["heartbeat_at"] = df["heartbeat_at"].fillna(df["started_at"]).fillna(0.0)
    df["started_at"] = df["started_at"].fillna(df["heartbeat_at"])
    here = socket.gethostname()
    states = []
    seen = []
    for pid, host, heartbeat, ended, reason in zip(
        df["pid"], df["host"], df["heartbeat_at"], df["ended_at"], df["end_reason"], strict=True
    ):  # one row per process, not per event
        if reason == "exit" and pd.notna(ended):
            states.append("exited")
            seen.append(float(ended))
        elif reason == "terminated" and pd.notna(ended):
            states.append("terminated")
            seen.append(float(ended))
        elif pd.notna(ended):
            states.append("crashed")
            seen.append(float(ended))
        elif now - float(heartbeat) > STALE_HEARTBEAT_S or (
            host == here and not _pid_alive(int(pid))
        ):
            states.append("crashed")
            seen.append(float(heartbeat))
        else:
            states.append("running")
            seen.append(now)
    df["state"] = states
    df["seen_until_at"] = seen
    return df[_PROCESS_COLUMNS]


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine (a dead writer's pid is gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _load_pools(conn: sqlite3.Connection) -> pd.DataFrame:
    df = _frame(
        "SELECT id, process_id, name, url, dialect, pool_class, pool_size, max_overflow, "
        "timeout_s, recycle_s, leak_after_s FROM pools ORDER BY id",
        conn,
    )
    for column in ("timeout_s", "recycle_s", "leak_after_s"):
        df[column] = pd.to_numeric(df[column], errors="coerce")  # a damaged value: NaN
    # A leak_after no attach() can have (a damaged or edited row): attach()'s default.
    usable = (df["leak_after_s"] > 0) & np.isfinite(df["leak_after_s"])
    df["leak_after_s"] = df["leak_after_s"].where(usable, _DEFAULT_LEAK_AFTER_S)
    size = pd.to_numeric(df["pool_size"], errors="coerce")
    overflow = pd.to_numeric(df["max_overflow"], errors="coerce")
    # max_overflow -1 means "no limit" in SQLAlchemy: no capacity then.
    df["capacity"] = (size + overflow).where(overflow >= 0)
    df["name"] = _distinct_names(df)
    return df[_POOL_COLUMNS]


_SAME_POOL = ["url", "pool_class", "pool_size", "max_overflow"]
"""What pool rows of one name must share to be reported as one pool."""


def _distinct_names(df: pd.DataFrame) -> list[str]:
    """The name each pool row is reported under: its own, unless pools of that name differ.

    Rows of one name with the same URL, class and size are one pool: in several processes,
    or one after the other (the pool ``engine.dispose()`` puts in place). Rows of one name
    that differ there are different pools (two engines given one name, two bare pools of
    one class): the first keeps the name and the others, in the order they first appear,
    are ``name#2``, ``name#3``, ..., so that each is reported with its own size.
    """
    names = df["name"].astype(str).tolist()
    columns = [[None if pd.isna(v) else v for v in df[c]] for c in _SAME_POOL]
    signatures = list(zip(*columns, strict=True)) if len(df) else []
    taken = set(names)
    given: dict[tuple[str, tuple[Any, ...]], str] = {}
    variants: dict[str, int] = {}
    out = []
    for name, signature in zip(names, signatures, strict=True):
        key = (name, signature)
        if key not in given:
            n = variants[name] = variants.get(name, 0) + 1
            distinct = name
            if n > 1:
                while (distinct := f"{name}#{n}") in taken:
                    n += 1
                variants[name] = n
                taken.add(distinct)
            given[key] = distinct
        out.append(given[key])
    return out


def _superseded(pools: pd.DataFrame) -> set[int]:
    """Ids of pool rows followed by a later row of the same reported name in their process
    (as a pool is by the one ``engine.dispose()`` puts in place): such a pool is observed
    until its last event, not until its process ended."""
    later = pools.sort_values("id").duplicated(["process_id", "name"], keep="last")
    return {int(i) for i in pools.sort_values("id")["id"][later]}


def _frame(sql: str, conn: sqlite3.Connection, params: Any = ()) -> pd.DataFrame:
    """Run a query whose result is small (one row per process, pool, stack, bucket or
    timeout) and return it as a frame."""
    cursor = conn.execute(sql, params)
    columns = [d[0] for d in cursor.description]
    return pd.DataFrame.from_records(cursor.fetchall(), columns=columns, coerce_float=True)


def _in_list(column: str, values: list[int] | None) -> str:
    if values is None:
        return ""
    if not values:
        return " AND 0"
    return f" AND {column} IN ({', '.join(str(int(v)) for v in values)})"


def _event_filter(data: _Data, alias: str = "") -> tuple[str, list[Any]]:
    """SQL conditions (starting with `` AND``) restricting events to the filters."""
    window, params = _event_window(data, alias)
    return _event_scope(data, data.pool_ids, alias) + window, params


def _event_scope(data: _Data, pool_ids: list[int] | None, alias: str = "") -> str:
    """SQL conditions (starting with `` AND``) restricting events to ``pool_ids`` (all for
    ``None``) in the filters' processes."""
    prefix = f"{alias}." if alias else ""
    sql = _in_list(f"{prefix}pool_id", pool_ids)
    if data.filters.processes is not None:
        sql += _in_list(f"{prefix}process_id", list(data.filters.processes))
    return sql


def _event_window(data: _Data, alias: str = "") -> tuple[str, list[Any]]:
    """SQL conditions (starting with `` AND``) restricting events to the filters' window,
    with their parameters."""
    prefix = f"{alias}." if alias else ""
    sql, params = "", []
    if data.filters.since is not None:
        sql += f" AND {prefix}at >= ?"
        params.append(data.filters.since)
    if data.filters.until is not None:
        sql += f" AND {prefix}at <= ?"
        params.append(data.filters.until)
    return sql, params


_OUTCOMES = ["checkin", "gc_checkin", "detach", "open", "unwatched"]


_FETCH_CHUNK = 65_536
"""Rows fetched at a time: memory stays bounded by one chunk of Python tuples."""


def _fetch_columns(
    conn: sqlite3.Connection, sql: str, params: list[Any], spec: list[tuple[str, str]]
) -> dict[str, np.ndarray]:
    """Run ``sql`` and return its columns as numpy arrays, fetched a chunk at a time.

    ``spec`` gives each column's name and kind: ``"f"`` (float64, NULL as NaN), ``"i"``
    (int64, NULL as -1) or ``"o"`` (object).
    """
    cursor = conn.execute(sql, params)
    empty = {"o": object, "i": "int64", "f": "float64"}
    if all(kind != "o" for _, kind in spec):
        # All numeric: one C-level conversion of each chunk into a 2-D float array.
        blocks = []
        while rows := cursor.fetchmany(_FETCH_CHUNK):
            blocks.append(np.array(rows, dtype="float64"))
            del rows
        if not blocks:
            return {name: np.array([], dtype=empty[kind]) for name, kind in spec}
        table = np.concatenate(blocks)
        out = {}
        for i, (name, kind) in enumerate(spec):
            column = table[:, i]
            out[name] = np.nan_to_num(column, nan=-1).astype("int64") if kind == "i" else column
        return out
    parts: list[list[np.ndarray]] = [[] for _ in spec]
    while rows := cursor.fetchmany(_FETCH_CHUNK):
        for i, column in enumerate(zip(*rows, strict=True)):
            kind = spec[i][1]
            if kind == "o":
                parts[i].append(np.array(column, dtype=object))
            else:
                values = np.array(column, dtype="float64")
                if kind == "i":
                    values = np.nan_to_num(values, nan=-1).astype("int64")
                parts[i].append(values)
        del rows
    return {
        name: np.concatenate(chunks) if chunks else np.array([], dtype=empty[kind])
        for (name, kind), chunks in zip(spec, parts, strict=True)
    }


def _checkout_sql(data: _Data, select: str, keys: str | None = None) -> tuple[str, list[Any]]:
    f = data.filters
    # Only the checkouts named in the temporary table ``keys``, found through its rows.
    source = (
        f"temp.{keys} AS k CROSS JOIN events AS o ON o.process_id = k.process_id "
        "AND o.pool_id = k.pool_id AND o.checkout_id = k.checkout_id"
        if keys
        else "events AS o"
    )
    sql = (
        f"SELECT {select} FROM {source} LEFT JOIN events AS r "
        "ON r.process_id = o.process_id AND r.pool_id = o.pool_id "
        f"AND r.checkout_id = o.checkout_id AND r.kind IN {_RETURN_KINDS} "
        "WHERE o.kind = 'checkout' AND o.checkout_id IS NOT NULL"
    )
    sql += _in_list("o.pool_id", data.pool_ids)
    if f.processes is not None:
        sql += _in_list("o.process_id", list(f.processes))
    params: list[Any] = []
    if f.until is not None:
        sql += " AND o.at <= ?"
        params.append(f.until)
    if f.since is not None:
        sql += " AND (r.at IS NULL OR r.at >= ?)"
        params.append(f.since)
    return sql, params


def _load_checkouts(data: _Data, full: bool, keys: str | None = None) -> pd.DataFrame:
    """Pair checkouts with their returns in SQL; build the frame column by column.

    The lean frame (``full=False``) leaves out the string columns (thread, task) and
    the rarely used ones, which cost the most to fetch; the report looks those up only
    for the few rows it shows (:func:`_lookup_threads`).
    """
    spec = [
        ("pool_id", "i"),
        ("checkout_id", "i"),
        ("stack_id", "i"),
        ("checked_out_at", "f"),
        ("wait_s", "f"),
        ("hold_s", "f"),
        ("outcome_code", "i"),
        ("in_use", "i"),
        ("waiters", "i"),
    ]
    select = (
        "o.pool_id, o.checkout_id, o.stack_id, o.at, o.wait_s, r.hold_s, "
        "CASE r.kind WHEN 'checkin' THEN 0 WHEN 'gc_checkin' THEN 1 WHEN 'detach' THEN 2 "
        "WHEN 'unwatched' THEN 4 ELSE 3 END, o.in_use, o.waiters"
    )
    if full:
        spec += [("connection_id", "f"), ("thread", "o"), ("task", "o"), ("connect_s", "f")]
        select += ", o.connection_id, o.thread, o.task, o.connect_s"
    sql, params = _checkout_sql(data, select, keys)
    columns = _fetch_columns(data.conn, sql, params, spec)
    if not len(columns["checkout_id"]):
        return _empty(_CHECKOUT_COLUMNS if full else _CORE_COLUMNS)
    df = pd.DataFrame(columns)
    # Pools belong to one process each, so the pool id gives the process.
    owners = dict(data.conn.execute("SELECT id, process_id FROM pools").fetchall())
    df.insert(0, "process_id", df["pool_id"].map(owners).fillna(-1).astype("int64"))
    if df.duplicated(["process_id", "pool_id", "checkout_id"]).any():
        df = df.drop_duplicates(["process_id", "pool_id", "checkout_id"], keep="first")
    df["outcome"] = pd.Categorical.from_codes(df.pop("outcome_code").to_numpy(), _OUTCOMES)
    is_open = df["outcome"].to_numpy() == "open"
    hold = df["hold_s"].to_numpy()
    start = df["checked_out_at"].to_numpy()
    # A return's time is its checkout time plus the hold it carries. An unwatched checkout
    # has no known return: its hold is how long it was out when detach() stopped watching.
    not_returned = is_open | (df["outcome"].to_numpy() == "unwatched")
    df["returned_at"] = np.where(not_returned, np.nan, start + hold)
    if is_open.any():
        seen = data.processes.set_index("id")["seen_until_at"]
        until = df["process_id"].map(seen).fillna(data.now).to_numpy(dtype="float64")
        if data.filters.until is not None:  # held "so far" as of the end of the window
            until = np.minimum(until, data.filters.until)
        df["hold_s"] = np.where(is_open, np.maximum(until - start, 0.0), hold)
    # Names, sites and stacks: small lookup tables mapped onto the frame as categoricals.
    names = _all_pool_names(data)
    df["pool"] = _categorical(df["pool_id"].to_numpy(), names.index, names.to_numpy(), "?")
    stacks = data.stacks
    stack_ids = df["stack_id"].to_numpy()
    df["site"] = _categorical(stack_ids, stacks["id"], stacks["site"].to_numpy(), "<unknown>")
    df["fingerprint"] = _categorical(stack_ids, stacks["id"], stacks["fingerprint"].to_numpy(),
                                     "")  # fmt: skip
    df["stack_id"] = df["stack_id"].where(df["stack_id"] >= 0)
    df["leak_after_s"] = df["pool_id"].map(_leak_after_by_pool(data)).astype("float64")
    df["leak_class"] = _classify(df, data.processes)
    if full:
        df["thread"] = df["thread"].astype("category")
        df["connection_id"] = df["connection_id"].astype("Int64")
        df["stack_id"] = df["stack_id"].astype("Int64")
        return df[_CHECKOUT_COLUMNS].reset_index(drop=True)
    return df[_CORE_COLUMNS].reset_index(drop=True)


def _categorical(ids: np.ndarray, keys: Any, values: np.ndarray, missing: str) -> pd.Categorical:
    """Map integer ``ids`` through a small ``keys`` → ``values`` table, as a categorical,
    without building a Python object per row."""
    categories = pd.Index(pd.unique(np.append(values.astype(object), missing)))
    value_codes = categories.get_indexer(values.astype(object))
    position = pd.Index(np.asarray(keys)).get_indexer(ids)
    missing_code = categories.get_loc(missing)
    if not len(value_codes):  # an empty table: every id is missing
        codes = np.full(len(position), missing_code)
    else:
        codes = np.where(position >= 0, value_codes[np.maximum(position, 0)], missing_code)
    return pd.Categorical.from_codes(codes, categories=categories).remove_unused_categories()


def _lookup_threads(data: _Data, keys: pd.DataFrame) -> pd.DataFrame:
    """Thread and task of the checkouts in ``keys`` (process_id, pool_id, checkout_id)."""
    found = []
    for (proc, pool_id), group in keys.groupby(["process_id", "pool_id"], sort=False):
        ids = sorted({int(i) for i in group["checkout_id"]})
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found += data.conn.execute(
                "SELECT process_id, pool_id, checkout_id, thread, task FROM events "
                "WHERE process_id = ? AND pool_id = ? AND kind = 'checkout' "
                f"AND checkout_id IN ({', '.join(str(i) for i in chunk)})",
                (int(proc), int(pool_id)),
            ).fetchall()
    return pd.DataFrame(
        found, columns=["process_id", "pool_id", "checkout_id", "thread", "task"]
    ).drop_duplicates(["process_id", "pool_id", "checkout_id"])


def _all_pool_names(data: _Data) -> pd.Series:
    pools = _load_pools(data.conn)
    return pd.Series(pools["name"].to_numpy(), index=pools["id"].to_numpy(), dtype="object")


def _leak_after_by_pool(data: _Data) -> pd.Series:
    leak_after = _load_pools(data.conn).set_index("id")["leak_after_s"].astype("float64")
    if data.filters.leak_after is not None:
        return pd.Series(data.filters.leak_after, index=leak_after.index, dtype="float64")
    return leak_after


def _classify(df: pd.DataFrame, procs: pd.DataFrame) -> pd.Categorical:
    """Each checkout's leak class (NaN for none), on integer codes throughout."""
    position = pd.Index(procs["id"].to_numpy()).get_indexer(df["process_id"].to_numpy())
    state_names = np.append(procs["state"].to_numpy(dtype=object), "running")
    state = state_names[position]  # -1 (an unknown process) picks the appended "running"
    exited = state == "exited"
    crashed = (state == "crashed") | (state == "terminated")  # both died mid-work
    running = ~(exited | crashed)
    outcome = np.asarray(df["outcome"].cat.codes)  # index into _OUTCOMES
    is_open = outcome == _OUTCOMES.index("open")
    # An unwatched checkout may still come back: at most held_too_long, never confirmed.
    returned = np.isin(outcome, [_OUTCOMES.index(k) for k in ("checkin", "detach", "unwatched")])
    over = (df["hold_s"] > df["leak_after_s"]).to_numpy()
    code = {name: i for i, name in enumerate(LEAK_CLASSES)}
    codes = np.select(
        [
            outcome == _OUTCOMES.index("gc_checkin"),
            is_open & exited,
            is_open & crashed,
            returned & over,
            is_open & running & over,
        ],
        [code["gc_reclaimed"], code["never_returned"], code["open_at_crash"],
         code["held_too_long"], code["open_now"]],
        default=-1,
    )  # fmt: skip
    return pd.Categorical.from_codes(codes, categories=list(LEAK_CLASSES))


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


def processes(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """One row per recording process, with how it ended.

    ``state`` is ``exited`` (clean interpreter exit), ``terminated`` (killed by a SIGTERM
    that poolscope saw: everything it recorded was written first), ``crashed`` (no clean
    exit and a heartbeat older than :data:`STALE_HEARTBEAT_S`, or its pid is gone on this
    host) or ``running``. The open checkouts of terminated and crashed processes are
    ``open_at_crash``. ``seen_until_at`` is when it was last known alive.
    """
    return _load(conn, filters).processes


def pools(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """One row per attached pool per process (``capacity`` = pool_size + max_overflow; NaN when
    the pool has no size or no overflow limit)."""
    return _load(conn, filters).pools


def checkouts(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Every checkout paired with its return.

    ``outcome`` is ``checkin``, ``gc_checkin`` (returned by the garbage collector),
    ``detach``, ``open`` (never returned as far as the store knows) or ``unwatched``
    (``detach()`` stopped watching it while it was out; its ``hold_s`` is the time held
    until then, and it is never a confirmed leak). ``hold_s`` of an open checkout is the
    time held so far: until its process exited, was last seen alive, or now (or
    ``filters.until``, when earlier).
    ``leak_class`` is one of :data:`LEAK_CLASSES` or NaN; ``leak_after_s`` is the threshold
    used for it.
    """
    return _load(conn, filters).checkouts
