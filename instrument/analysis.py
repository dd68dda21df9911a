"""Turns a store into answers: pandas frames of checkouts, utilization, percentiles, timeouts,
leaks and call sites, plus pool sizing advice and the JSON report built from them.

The report and the dashboard both read the store only through this module, so they agree.
Times are unix seconds (float) in columns named ``*_at``; durations are seconds in ``*_s``.

Heavy lifting happens in SQLite (pairing, bucketing) and in vectorised pandas on a few
selected columns: no Python object is built per event row, so a store of a million events
reports in seconds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__, _replay, _store
from .exceptions import StoreCorruptError

__all__ = [
    "CERTAINTY",
    "LEAK_CLASSES",
    "REPORT_SCHEMA",
    "STALE_HEARTBEAT_S",
    "WAITED_THRESHOLD_S",
    "Filters",
    "build_report",
    "checkouts",
    "leaks",
    "iso",
    "open_store",
    "parse_time",
    "percentiles",
    "pools",
    "processes",
    "replay_demands",
    "sites",
    "sizing_advice",
    "summary",
    "timeouts",
    "utilization",
    "what_if",
]

REPORT_SCHEMA = "poolscope.report/1"
"""The ``schema`` value of the JSON report this module builds."""

STALE_HEARTBEAT_S = 10.0
"""A process without a clean exit whose heartbeat is older than this many seconds has died."""

WAITED_THRESHOLD_S = 0.001
"""A checkout that waited longer than this for the pool counts as having waited."""

LEAK_CLASSES = ("never_returned", "gc_reclaimed", "open_at_crash", "held_too_long", "open_now")
"""The leak classes, in the order the report lists them."""

CERTAINTY = {
    "never_returned": "confirmed",
    "gc_reclaimed": "confirmed",
    "open_at_crash": "unknown",
    "held_too_long": "suspected",
    "open_now": "suspected",
}
"""How sure each leak class is: ``confirmed``, ``unknown`` or ``suspected``."""

_MAX_TIME = 253402300799.0
"""The latest time a store or a filter may name: 9999-12-31T23:59:59Z, in unix seconds. Times
range from 0 (1970-01-01T00:00:00Z) to this; an event outside it is ignored."""

_DEFAULT_LEAK_AFTER_S = 30.0
"""``attach()``'s default leak_after (not imported: the report runs without SQLAlchemy)."""

_CERTAINTY_ORDER = {"confirmed": 0, "unknown": 1, "suspected": 2}
_RETURN_KINDS = ("checkin", "gc_checkin", "detach", "unwatched")
"""Event kinds that end a checkout's watch: its returns, and ``unwatched`` (``detach()``
stopped watching it while it was out; whether it came back is not known)."""

_PROCESS_COLUMNS = [
    "id", "pid", "host", "argv", "started_at", "heartbeat_at", "ended_at", "end_reason",
    "state", "seen_until_at",
]  # fmt: skip
_POOL_COLUMNS = [
    "id", "process_id", "name", "url", "dialect", "pool_class", "pool_size", "max_overflow",
    "timeout_s", "recycle_s", "leak_after_s", "capacity",
]  # fmt: skip
_CHECKOUT_COLUMNS = [
    "process_id", "pool_id", "pool", "checkout_id", "connection_id", "site", "stack_id",
    "fingerprint", "thread", "task", "checked_out_at", "returned_at", "wait_s", "connect_s",
    "hold_s", "outcome", "leak_after_s", "leak_class", "in_use", "waiters",
]  # fmt: skip
_CORE_COLUMNS = [
    "process_id", "pool_id", "pool", "checkout_id", "site", "stack_id", "fingerprint",
    "checked_out_at", "returned_at", "wait_s", "hold_s", "outcome", "leak_after_s",
    "leak_class", "in_use", "waiters",
]  # fmt: skip
_UTILIZATION_COLUMNS = [
    "at", "pool", "in_use", "idle", "overflow", "waiters", "pool_size", "capacity", "processes",
]  # fmt: skip
_PERCENTILE_COLUMNS = [
    "count", "wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s",
    "hold_p50_s", "hold_p95_s", "hold_p99_s", "hold_max_s",
]  # fmt: skip
_TIMEOUT_COLUMNS = [
    "at", "pool", "process_id", "waited_s", "waiters", "site", "thread", "task", "holders",
    "fingerprint", "stack", "in_use",
]  # fmt: skip
_LEAK_COLUMNS = [
    "leak_class", "certainty", "site", "fingerprint", "pool", "count", "first_seen_at",
    "last_seen_at", "max_held_s", "threads", "stack", "processes", "leak_after_s",
]  # fmt: skip
_SITE_COLUMNS = [
    "site", "fingerprint", "checkouts", "total_hold_s", "hold_p95_s", "hold_max_s",
    "wait_p95_s", "pool_time_share", "stack", "pool", "hold_mean_s", "open", "leaks",
]  # fmt: skip


@dataclass(frozen=True)
class Filters:
    """What part of a store to analyse. Every field may be ``None`` for "no restriction".

    :param pools: pool names to keep.
    :param processes: ``processes.id`` values to keep.
    :param since: keep what happened at or after this unix time (a checkout counts when
        it was still held at ``since``).
    :param until: keep what happened at or before this unix time.
    :param leak_after: seconds after which a hold is a suspected leak; ``None`` uses
        each pool's own ``leak_after_s`` (the value it was attached with).
    """

    pools: tuple[str, ...] | None = None
    processes: tuple[int, ...] | None = None
    since: float | None = None
    until: float | None = None
    leak_after: float | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            at = getattr(self, name)
            if at is not None and not 0 <= at <= _MAX_TIME:  # NaN fails every comparison
                raise ValueError(
                    f"{name} must be unix seconds from 0 to {_MAX_TIME:.0f}, not {at!r}."
                )
        if self.leak_after is not None and not self.leak_after > 0:
            raise ValueError(f"leak_after must be more than 0 seconds, not {self.leak_after!r}.")
        if self.leak_after is not None and math.isinf(self.leak_after):
            raise ValueError("leak_after must be a finite number of seconds, not inf.")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must not be later than until.")


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
    untouched) and shadows ``main.events`` for every query; a store without such rows, the
    normal case, is read directly, at the cost of one scan here.
    """
    bad = conn.execute(f"SELECT COUNT(*) FROM main.events WHERE NOT ({_SANE_EVENT})").fetchone()
    conn.execute("CREATE TEMP TABLE poolscope_ignored (events INTEGER NOT NULL)")
    conn.execute("INSERT INTO poolscope_ignored VALUES (?)", (int(bad[0] or 0),))
    if bad[0]:
        conn.execute(f"CREATE TEMP VIEW events AS SELECT * FROM main.events WHERE {_SANE_EVENT}")


def _ignored_events(conn: sqlite3.Connection) -> int:
    """How many events :func:`open_store` left out of this connection (0 if it did not open it)."""
    try:
        return int(conn.execute("SELECT events FROM temp.poolscope_ignored").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


# ---- loading -------------------------------------------------------------------------------


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

    @property
    def checkouts(self) -> pd.DataFrame:
        """Every paired checkout with all columns (thread and task included)."""
        if self._checkouts is None:
            self._checkouts = _load_checkouts(self, full=True)
            self._core = self._checkouts
        return self._checkouts

    @property
    def core(self) -> pd.DataFrame:
        """Paired checkouts without the string columns: what the report needs for all rows."""
        if self._core is None:
            self._core = _load_checkouts(self, full=False)
        return self._core


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
    prefix = f"{alias}." if alias else ""
    sql = _in_list(f"{prefix}pool_id", data.pool_ids)
    if data.filters.processes is not None:
        sql += _in_list(f"{prefix}process_id", list(data.filters.processes))
    params: list[Any] = []
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


def _checkout_sql(data: _Data, select: str) -> tuple[str, list[Any]]:
    f = data.filters
    sql = (
        f"SELECT {select} FROM events AS o LEFT JOIN events AS r "
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


def _load_checkouts(data: _Data, full: bool) -> pd.DataFrame:
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
    sql, params = _checkout_sql(data, select)
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


# ---- public frames ---------------------------------------------------------------------------


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


def _nice_interval(span: float, points: int = 300) -> float:
    raw = max(span / points, 1e-3)
    steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
             120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]  # fmt: skip
    for step in steps:
        if step >= raw:
            return float(step)
    return float(math.ceil(raw / 86400) * 86400)


def _utilization(data: _Data, interval_s: float | None) -> pd.DataFrame:
    cond, params = _event_filter(data)
    lo, hi = data.conn.execute(
        f"SELECT MIN(at), MAX(at) FROM events WHERE in_use IS NOT NULL {cond}", params
    ).fetchone()
    if lo is None:
        return _empty(_UTILIZATION_COLUMNS)
    if interval_s is not None and not interval_s > 0:
        raise ValueError(f"interval_s must be more than 0 seconds, not {interval_s!r}.")
    dt = float(interval_s) if interval_s else _nice_interval(hi - lo)
    t0 = math.floor(lo / dt) * dt
    base = (
        f"FROM events WHERE in_use IS NOT NULL AND idle IS NOT NULL {cond} "
        "GROUP BY process_id, pool_id, b"
    )
    bucket = "CAST((at - ?) / ? AS INTEGER) AS b"
    peaks = _frame(
        f"SELECT process_id, pool_id, {bucket}, MAX(in_use) AS in_use, MIN(idle) AS idle, "
        f"MAX(overflow) AS overflow, "
        # A timeout row counts the waiters at that moment in `count` (itself included).
        f"MAX(CASE WHEN kind = 'timeout' THEN count ELSE waiters END) AS waiters, "
        f"MAX(id) AS last_id {base}",
        data.conn,
        params=[t0, dt, *params],
    )
    # The counts after each bucket's last event (rows are written in time order per
    # process), looked up by primary key: they carry into the buckets without events.
    ids = [int(i) for i in peaks["last_id"]]
    rows = []
    for start in range(0, len(ids), 5000):
        chunk = ", ".join(str(i) for i in ids[start : start + 5000])
        rows += data.conn.execute(
            f"SELECT id, in_use, idle, overflow, waiters FROM events WHERE id IN ({chunk})"
        ).fetchall()
    last_rows = pd.DataFrame(rows, columns=["id", "in_use", "idle", "overflow", "waiters"])
    lasts = peaks[["process_id", "pool_id", "b", "last_id"]].merge(
        last_rows, left_on="last_id", right_on="id", how="left"
    )
    seen = data.processes.set_index("id")["seen_until_at"]
    all_pools = _load_pools(data.conn)
    superseded = _superseded(all_pools)
    all_pools = all_pools.set_index("id")
    end_bucket = int((hi - t0) // dt)
    if data.filters.until is not None:
        end_bucket = max(end_bucket, int((data.filters.until - t0) // dt))
    frames = []
    metrics = ["in_use", "idle", "overflow", "waiters"]
    for (proc, pool_id), group in peaks.groupby(["process_id", "pool_id"], sort=False):
        last = lasts[(lasts["process_id"] == proc) & (lasts["pool_id"] == pool_id)]
        first_b = int(group["b"].min())
        last_b = int(group["b"].max())
        until_b = (seen.get(proc, hi) - t0) // dt if pool_id not in superseded else last_b
        stop_b = int(min(max(until_b, last_b), end_bucket))
        index = pd.RangeIndex(first_b, stop_b + 1)
        g = group.set_index("b")[metrics].reindex(index)
        carried = last.set_index("b")[metrics].reindex(index).ffill().shift(1)
        out = pd.DataFrame(index=index)
        for m in ("in_use", "overflow", "waiters"):
            out[m] = np.fmax(g[m].to_numpy(dtype="float64"), carried[m].to_numpy(dtype="float64"))
        out["idle"] = np.fmin(g["idle"].to_numpy(dtype="float64"),
                              carried["idle"].to_numpy(dtype="float64"))  # fmt: skip
        out["pool"] = all_pools.at[pool_id, "name"] if pool_id in all_pools.index else "?"
        out["pool_size"] = all_pools["pool_size"].get(pool_id, np.nan)
        out["capacity"] = all_pools["capacity"].get(pool_id, np.nan)
        out["process_id"] = proc
        frames.append(out.reset_index(names="b"))
    if not frames:
        return _empty(_UTILIZATION_COLUMNS)
    long = pd.concat(frames, ignore_index=True)
    num = ["in_use", "idle", "overflow", "waiters", "pool_size", "capacity"]
    long[num] = long[num].astype("float64")
    grouped = long.groupby(["pool", "b"], sort=True)
    out = grouped[num].sum(min_count=1)
    out["processes"] = grouped["process_id"].nunique()
    out = out.reset_index()
    out["at"] = t0 + out["b"] * dt
    for m in ("in_use", "idle", "overflow", "waiters", "processes"):
        out[m] = out[m].fillna(0).astype("int64")
    out["interval_s"] = dt
    return out[[*_UTILIZATION_COLUMNS, "interval_s"]].reset_index(drop=True)


def utilization(
    conn: sqlite3.Connection, filters: Filters = Filters(), interval_s: float | None = None
) -> pd.DataFrame:
    """Pool counts over time, one row per pool name and time bucket.

    ``in_use``, ``overflow`` and ``waiters`` are the most seen at once in the bucket
    (including what was carried in from before it), ``idle`` the fewest; ``at`` is the
    bucket start. Pools of the same name in several processes are summed, as are their
    ``pool_size`` and ``capacity``; ``processes`` says how many contributed.

    :param interval_s: bucket width in seconds. May be ``None`` for about 300 buckets
        over the recorded span, rounded to a readable width.
    """
    return _utilization(_load(conn, filters), interval_s)


def _quantiles(values: np.ndarray) -> tuple[float, float, float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan,) * 4  # type: ignore[return-value]
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return float(p50), float(p95), float(p99), float(values.max())


def _percentiles(co: pd.DataFrame, by: str | None) -> pd.DataFrame:
    if by not in (None, "pool", "site"):
        raise ValueError(f"by must be None, 'pool' or 'site', not {by!r}.")
    if by is None:
        w = _quantiles(co["wait_s"].to_numpy(dtype="float64"))
        h = _quantiles(co["hold_s"].to_numpy(dtype="float64"))
        return pd.DataFrame([[len(co), *w, *h]], columns=_PERCENTILE_COLUMNS)
    if co.empty:
        return _empty([by, *_PERCENTILE_COLUMNS])
    grouped = co.groupby(by, observed=True, sort=True)
    out = pd.DataFrame({"count": grouped.size()})
    for col, prefix in (("wait_s", "wait"), ("hold_s", "hold")):
        q = grouped[col].quantile([0.5, 0.95, 0.99]).unstack()
        out[f"{prefix}_p50_s"] = q[0.5]
        out[f"{prefix}_p95_s"] = q[0.95]
        out[f"{prefix}_p99_s"] = q[0.99]
        out[f"{prefix}_max_s"] = grouped[col].max()
    out = out.reset_index()
    out[by] = out[by].astype("object")
    return out[[by, *_PERCENTILE_COLUMNS]]


def percentiles(
    conn: sqlite3.Connection, filters: Filters = Filters(), by: str | None = None
) -> pd.DataFrame:
    """Wait and hold percentiles (p50/p95/p99/max, linear interpolation) of checkouts.

    Waits are the time spent waiting for the pool (connect time excluded). Holds include
    checkouts still open, counted with the time held so far.

    :param by: ``None`` for one overall row, ``"pool"`` per pool name, ``"site"`` per call site.
    """
    return _percentiles(_load(conn, filters).core, by)


def _timeouts(data: _Data) -> pd.DataFrame:
    if data._timeouts is not None:
        return data._timeouts
    cond, params = _event_filter(data, "e")
    df = _frame(
        "SELECT e.at, e.process_id, e.pool_id, e.wait_s AS waited_s, e.count AS waiters, "
        "e.stack_id, e.thread, e.task, e.in_use FROM events AS e "
        f"WHERE e.kind = 'timeout' {cond} ORDER BY e.at",
        data.conn,
        params=params,
    )
    if df.empty:
        data._timeouts = _empty(_TIMEOUT_COLUMNS + ["pool_id"])
        return data._timeouts
    df["pool"] = df["pool_id"].map(_all_pool_names(data))
    # Looked up one by one (timeouts are few): a stack id that is NULL or not in the
    # stacks table gets the unknown site, an empty fingerprint and no frames.
    stacks = {int(r.id): r for r in data.stacks.itertuples(index=False)}
    found = [stacks.get(int(i)) if pd.notna(i) else None for i in df["stack_id"]]
    df["site"] = [r.site if r is not None else "<unknown>" for r in found]
    df["fingerprint"] = [r.fingerprint if r is not None else "" for r in found]
    df["stack"] = [json.loads(r.frames) if r is not None else [] for r in found]
    df["holders"] = _holders(data, df)
    data._timeouts = df[_TIMEOUT_COLUMNS + ["pool_id"]].reset_index(drop=True)
    return data._timeouts


def _holders(data: _Data, to: pd.DataFrame) -> list[list[dict[str, Any]]]:
    """For each timeout, the checkouts of its process and pool held at that moment.

    Checkouts are sorted by start; short holds are found in the window ``[t - H, t]`` by
    binary search and the few long holds (longer than ``H``, the p99 hold) are checked
    directly, so each timeout costs a slice, not a scan of every checkout.
    """
    co = data.core
    result: list[list[dict[str, Any]]] = [[] for _ in range(len(to))]
    if co.empty:
        return result
    groups = co.groupby(["process_id", "pool_id"], sort=False).indices
    pairs: list[tuple[int, int, float]] = []  # (timeout row, checkout row in co, held_s)
    for (proc, pool_id), rows in to.groupby(["process_id", "pool_id"], sort=False).indices.items():
        idx = groups.get((proc, pool_id))
        if idx is None:
            continue
        starts_all = co["checked_out_at"].to_numpy()[idx]
        order = np.argsort(starts_all, kind="stable")
        idx = idx[order]
        starts = starts_all[order]
        ends = co["returned_at"].to_numpy()[idx]
        ends = np.where(np.isnan(ends), np.inf, ends)
        spans = ends - starts
        finite = spans[np.isfinite(spans)]
        horizon = max(1.0, float(np.percentile(finite, 99))) if finite.size else 1.0
        long_idx = np.nonzero(spans > horizon)[0]
        for row in rows:
            t = float(to["at"].iat[row])
            lo = int(np.searchsorted(starts, t - horizon, "left"))
            hi = int(np.searchsorted(starts, t, "right"))
            near = np.arange(lo, hi)[ends[lo:hi] > t]
            far = long_idx[(starts[long_idx] <= t) & (ends[long_idx] > t)]
            for i in np.union1d(near, far):
                pairs.append((int(row), int(idx[i]), t - float(starts[i])))
    if not pairs:
        return result
    found = co.iloc[[p[1] for p in pairs]]
    names = _lookup_threads(data, found[["process_id", "pool_id", "checkout_id"]])
    found = found.drop(columns=["thread", "task"], errors="ignore").merge(
        names, how="left", on=["process_id", "pool_id", "checkout_id"]
    )
    for (row, _, held), h in zip(pairs, found.itertuples(index=False), strict=True):
        result[row].append(
            {
                "site": str(h.site),
                "thread": None if _missing(h.thread) else str(h.thread),
                "task": None if _missing(h.task) else str(h.task),
                "held_s": round(held, 6),
                "checkout_id": int(h.checkout_id),
                "fingerprint": str(h.fingerprint),
                "checked_out_at": float(h.checked_out_at),
            }
        )
    for holders in result:
        holders.sort(key=lambda h: h["held_s"], reverse=True)
    return result


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def timeouts(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Every pool timeout, with who held the pool at that moment.

    ``site``/``thread``/``task`` are the caller that timed out; ``waiters`` counts the
    callers waiting at that moment including it. ``holders`` is a list of dicts
    ``{site, thread, task, held_s, checkout_id, fingerprint, checked_out_at}``, longest
    held first: the checkouts of the same process and pool taken before the timeout and
    not yet returned.
    """
    return _timeouts(_load(conn, filters)).drop(columns=["pool_id"])


def _stacks_of(data: _Data, fingerprints: pd.Series) -> list[list[str]]:
    """The frames (innermost first) of each fingerprint; ``[]`` for one the stacks table
    lacks."""
    frames = data.stacks.set_index("fingerprint")["frames"]
    return [json.loads(frames.get(fp, "[]")) for fp in fingerprints]


def _leaks(data: _Data) -> pd.DataFrame:
    co = data.core
    leaked = co[co["leak_class"].notna()]
    if leaked.empty:
        return _empty(_LEAK_COLUMNS)
    names = _lookup_threads(data, leaked[["process_id", "pool_id", "checkout_id"]])
    leaked = leaked.drop(columns=["thread", "task"], errors="ignore").merge(
        names, how="left", on=["process_id", "pool_id", "checkout_id"]
    )
    leaked["thread"] = leaked["thread"].astype(object).fillna("?").astype(str)
    grouped = leaked.groupby(["leak_class", "pool", "fingerprint"], observed=True, sort=False)
    out = grouped.agg(
        site=("site", "first"),
        count=("checkout_id", "size"),
        first_seen_at=("checked_out_at", "min"),
        last_seen_at=("checked_out_at", "max"),
        max_held_s=("hold_s", "max"),
        leak_after_s=("leak_after_s", "max"),
    ).reset_index()
    out["threads"] = [sorted(set(v)) for v in grouped["thread"].agg(list)]
    out["processes"] = [sorted(int(p) for p in set(v)) for v in grouped["process_id"].agg(list)]
    for col in ("leak_class", "pool", "fingerprint", "site"):
        out[col] = out[col].astype("object")
    out["certainty"] = out["leak_class"].map(CERTAINTY)
    out["stack"] = _stacks_of(data, out["fingerprint"])
    out["_c"] = out["certainty"].map(_CERTAINTY_ORDER)
    out["_k"] = out["leak_class"].map({c: i for i, c in enumerate(LEAK_CLASSES)})
    out = out.sort_values(["_c", "_k", "count", "max_held_s"], ascending=[True, True, False, False])
    return out[_LEAK_COLUMNS].reset_index(drop=True)


def leaks(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Leaked checkouts grouped by class, pool and stack fingerprint; most certain first.

    Classes (see :data:`LEAK_CLASSES`, :data:`CERTAINTY`):

    - ``never_returned`` (confirmed): still open when its process exited cleanly.
    - ``gc_reclaimed`` (confirmed): returned by the garbage collector, never by code.
    - ``open_at_crash`` (unknown): still open when its process died without a clean exit.
    - ``held_too_long`` (suspected): returned by code, but held longer than ``leak_after``.
    - ``open_now`` (suspected): open longer than ``leak_after`` in a live process.

    ``count`` is the number of checkouts; ``threads`` the threads that took them;
    ``processes`` the ``processes.id`` values; ``stack`` the frames, innermost (the site)
    first; ``leak_after_s`` the threshold that applied.
    """
    return _leaks(_load(conn, filters))


def _sites(data: _Data) -> pd.DataFrame:
    co = data.core
    if co.empty:
        return _empty(_SITE_COLUMNS)
    co = co.assign(
        _open=(co["outcome"] == "open").to_numpy(), _leak=co["leak_class"].notna().to_numpy()
    )
    grouped = co.groupby(["pool", "fingerprint"], observed=True, sort=False)
    out = grouped.agg(
        site=("site", "first"),
        checkouts=("checkout_id", "size"),
        total_hold_s=("hold_s", "sum"),
        hold_mean_s=("hold_s", "mean"),
        hold_max_s=("hold_s", "max"),
        open=("_open", "sum"),
        leaks=("_leak", "sum"),
    )
    out["hold_p95_s"] = grouped["hold_s"].quantile(0.95)
    out["wait_p95_s"] = grouped["wait_s"].quantile(0.95)
    out = out.reset_index()
    pool_total = out.groupby("pool", observed=True)["total_hold_s"].transform("sum")
    out["pool_time_share"] = (out["total_hold_s"] / pool_total.replace(0, np.nan)).fillna(0.0)
    for col in ("pool", "fingerprint", "site"):
        out[col] = out[col].astype("object")
    out["stack"] = _stacks_of(data, out["fingerprint"])
    out = out.sort_values(["total_hold_s", "checkouts"], ascending=False)
    return out[_SITE_COLUMNS].reset_index(drop=True)


def sites(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Per call site (pool and stack fingerprint): checkouts, hold and wait statistics.

    ``pool_time_share`` is the site's share of all connection-seconds held in its pool;
    ``open`` counts checkouts never returned, ``leaks`` those in any leak class. Sorted by
    ``total_hold_s``, biggest first.
    """
    return _sites(_load(conn, filters))


# ---- sizing ----------------------------------------------------------------------------------


def _pool_peaks(data: _Data) -> pd.DataFrame:
    """Per (process, pool): first and last moment seen, peak in use, peak waiting, peak
    demand (in use + waiting at one moment) and timeouts, from checkouts and timeouts.

    In-use only rises at a checkout, so the checkout rows' counts hold every peak.
    """
    if data._peaks is not None:
        return data._peaks
    co = data.core
    to = _timeouts(data)
    parts = []
    if len(co):
        ends = co["returned_at"].fillna(co["checked_out_at"])
        parts.append(
            pd.DataFrame(
                {
                    "process_id": co["process_id"].to_numpy(),
                    "pool_id": co["pool_id"].to_numpy(),
                    "first_at": co["checked_out_at"].to_numpy(),
                    "last_at": ends.to_numpy(),
                    "in_use": co["in_use"].to_numpy(dtype="float64"),
                    "waiting": np.maximum(co["waiters"].to_numpy(dtype="float64"), 0),
                    "timeout": 0,
                }
            )
        )
    if len(to):
        parts.append(
            pd.DataFrame(
                {
                    "process_id": to["process_id"].to_numpy(),
                    "pool_id": to["pool_id"].to_numpy(),
                    "first_at": to["at"].to_numpy(dtype="float64"),
                    "last_at": to["at"].to_numpy(dtype="float64"),
                    "in_use": to["in_use"].to_numpy(dtype="float64"),
                    "waiting": to["waiters"].to_numpy(dtype="float64"),
                    "timeout": 1,
                }
            )
        )
    if not parts:
        data._peaks = _empty(
            [
                "process_id",
                "pool_id",
                "first_at",
                "last_at",
                "peak_in_use",
                "peak_waiting",
                "peak_demand",
                "timeouts",
            ]  # fmt: skip
        )
        return data._peaks
    rows = pd.concat(parts, ignore_index=True)
    rows["in_use"] = rows["in_use"].where(rows["in_use"] >= 0)
    rows["demand"] = rows["in_use"].fillna(0) + rows["waiting"].fillna(0)
    out = (
        rows.groupby(["process_id", "pool_id"], sort=True)
        .agg(
            first_at=("first_at", "min"),
            last_at=("last_at", "max"),
            peak_in_use=("in_use", "max"),
            peak_waiting=("waiting", "max"),
            peak_demand=("demand", "max"),
            timeouts=("timeout", "sum"),
        )
        .reset_index()
    )
    data._peaks = out
    return out


def _fmt_s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms"


def _sizing(data: _Data) -> list[dict[str, Any]]:
    co = data.core
    peaks = _pool_peaks(data).copy()
    if peaks.empty:
        return []
    all_pools = _load_pools(data.conn)
    superseded = _superseded(all_pools)
    all_pools = all_pools.set_index("id")
    seen = data.processes.set_index("id")["seen_until_at"]
    peaks["pool"] = peaks["pool_id"].map(all_pools["name"])
    # The span a pool was observed: from its first event to its process's end (or to its
    # last event, for a pool a later one of its name took over from).
    end = peaks["process_id"].map(seen).fillna(peaks["last_at"])
    end = end.where(~peaks["pool_id"].isin(superseded), peaks["last_at"])
    if data.filters.until is not None:
        end = end.clip(upper=data.filters.until)
    peaks["span_s"] = np.maximum(end.to_numpy() - peaks["first_at"].to_numpy(), 0.0)
    confirmed = co[co["leak_class"].isin(["never_returned", "gc_reclaimed"])]
    advice = []
    for name, group in peaks.groupby("pool", sort=True):
        pool_rows = all_pools[all_pools["name"] == name]
        pool_rows = pool_rows[pool_rows.index.isin(group["pool_id"])]
        mine = co[co["pool"] == name]
        n = len(mine)
        span = float(group["span_s"].sum())
        rate = n / span if span > 0 else math.nan
        hold = float(mine["hold_s"].mean()) if n else math.nan
        mean_in_use = rate * hold if n and span > 0 else math.nan
        waited = int((mine["wait_s"] > WAITED_THRESHOLD_S).sum())
        n_timeouts = int(group["timeouts"].sum())
        peak = int(np.nan_to_num(group["peak_in_use"].max()))
        peak_waiting = int(np.nan_to_num(group["peak_waiting"].max()))
        demand = int(np.nan_to_num(group["peak_demand"].max()))
        size = _first_number(pool_rows["pool_size"])
        overflow = _first_number(pool_rows["max_overflow"])
        capacity = _first_number(pool_rows["capacity"])
        leaked = int((confirmed["pool"] == name).sum())
        entry: dict[str, Any] = {
            "pool": name,
            "processes": int(group["process_id"].nunique()),
            "checkouts": n,
            "observed_s": span,
            "arrival_rate_per_s": rate,
            "mean_hold_s": hold,
            "mean_in_use": mean_in_use,
            "peak_in_use": peak,
            "peak_waiting": peak_waiting,
            "peak_demand": demand,
            "waited_checkouts": waited,
            "timeouts": n_timeouts,
            "confirmed_leaks": leaked,
            "pool_size": size,
            "max_overflow": overflow,
            "capacity": capacity,
            "recommended_pool_size": None,
            "recommended_max_overflow": None,
            "verdict": "unbounded",
            "advice": "",
        }
        little = (
            f"{rate:.2f} checkouts/s × {_fmt_s(hold)} mean hold = {mean_in_use:.2f} connections "
            f"in use on average per process (Little's law)"
            if n and span > 0
            else "no checkouts recorded"
        )
        observed = f"peak {peak} in use with {peak_waiting} waiting"
        pressure = f"{waited} checkouts waited > {WAITED_THRESHOLD_S * 1000:g} ms, " + (
            f"{n_timeouts} timed out"
        )
        if size is None or capacity is None:
            entry["advice"] = (
                f"{name}: {little}; {observed}. This pool class has no size limit "
                f"(pool_size={size}, max_overflow={overflow}), so there is nothing to size."
            )
        else:
            # pool_size should cover the mean concurrency, so overflow only serves bursts.
            mean_needed = max(1, math.ceil(mean_in_use - 1e-9)) if n and span > 0 else 1
            pressured = n_timeouts > 0 or waited > 0
            current = f"pool_size={size}, max_overflow={overflow} (capacity {capacity})"
            if pressured and demand > capacity:
                rec_size = min(max(size, mean_needed), demand)
                rec_overflow = demand - rec_size
                entry["verdict"] = "too_small"
                text = (
                    f"{name}: {little}; {observed}; {pressure}. {current} was too small at "
                    f"the peak: pool_size={rec_size}, max_overflow={rec_overflow} "
                    f"(capacity {demand}) would have served all {demand} callers that "
                    "wanted a connection at once without waiting."
                )
            else:
                rec_size = max(size, mean_needed)
                rec_overflow = max(capacity - rec_size, 0)
                entry["verdict"] = "ok"
                if pressured:
                    text = (
                        f"{name}: {little}; {observed}; {pressure}, although at most {demand} "
                        f"callers wanted a connection at once, within {current}: the pool's "
                        "size was not the cause (look at lock contention or connect time)."
                    )
                else:
                    text = (
                        f"{name}: {little}; {observed}; no waits or timeouts. {current} was "
                        f"large enough (peak {peak} of {capacity})."
                    )
                if rec_size > size:
                    text += (
                        f" pool_size is below the mean concurrency, so overflow connections "
                        f"are opened and closed all the time: pool_size={rec_size}, "
                        f"max_overflow={rec_overflow} keeps the capacity and stops that churn."
                    )
            entry["recommended_pool_size"] = rec_size
            entry["recommended_max_overflow"] = rec_overflow
            if leaked:
                held = "checkout" if leaked == 1 else "checkouts"
                text += (
                    f" {leaked} confirmed leaked {held} held connections too: fix those "
                    + ("before growing the pool." if entry["verdict"] == "too_small" else
                       "first (see the leaks).")
                )  # fmt: skip
            entry["advice"] = text
            calm = f"no waits or timeouts (peak {peak} of {capacity})"
            seen = f"{little}; {observed}; {pressure if pressured else calm}"
            _apply_replay(entry, _replay_sizing(data, group, mean_in_use), seen)
        advice.append(entry)
    return advice


# ---- sizing by replay (issue 19) ------------------------------------------------------------

_CONFIRMED_LEAKS = ("never_returned", "gc_reclaimed")


def _replay_demands(
    data: _Data, pool_ids: list[int]
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """The recorded demand on the pools ``pool_ids`` of one name, one :class:`_replay.Demand`
    per (process, pool): as it happened, and without the confirmed leaks.

    A checkout asked for its connection at its checkout time minus its wait and connect
    time, and held it for its hold (an open one: held so far). A timeout asked at its time
    minus its wait and got nothing; replayed, it holds a connection for the median hold of
    its call site (of the pool, for a site with no checkout), what it would have done had
    it been served. Confirmed leaks (``never_returned``, ``gc_reclaimed``) stay in the
    demand as it happened, which the recorded settings are checked against, and are left
    out of the demand the advice is sized for: fixed code returns those connections.
    """
    co = data.core
    co = co[co["pool_id"].isin(pool_ids)]
    connects = _frame(
        "SELECT pool_id, checkout_id, connect_s FROM events WHERE kind = 'checkout' "
        f"AND connect_s IS NOT NULL AND checkout_id IS NOT NULL{_in_list('pool_id', pool_ids)}",
        data.conn,
    )
    connect = pd.Series(
        connects["connect_s"].to_numpy(dtype="float64") if len(connects) else [],
        index=pd.MultiIndex.from_frame(connects[["pool_id", "checkout_id"]])
        if len(connects)
        else pd.MultiIndex.from_tuples([], names=["pool_id", "checkout_id"]),
        dtype="float64",
    )
    connect = connect[~connect.index.duplicated()]
    to = _timeouts(data)
    to = to[to["pool_id"].isin(pool_ids)]
    holds = co["hold_s"].astype("float64")
    by_site = holds.groupby(co["fingerprint"].astype(object)).median()
    pool_median = float(holds.median()) if len(holds) else 0.0
    leaked = co["leak_class"].isin(_CONFIRMED_LEAKS).to_numpy()
    recorded, fixed = [], []
    co_groups = co.groupby(["process_id", "pool_id"], sort=False).indices
    to_groups = to.groupby(["process_id", "pool_id"], sort=False).indices
    empty = np.array([], "int64")
    for proc_pool in sorted(set(co_groups) | set(to_groups)):
        mine = co_groups.get(proc_pool, empty)
        rows = co.iloc[mine]
        key = pd.MultiIndex.from_arrays([rows["pool_id"], rows["checkout_id"]])
        c = np.nan_to_num(connect.reindex(key).to_numpy(dtype="float64"))
        wait = np.nan_to_num(rows["wait_s"].to_numpy(dtype="float64"))
        arrivals = rows["checked_out_at"].to_numpy(dtype="float64") - wait - c
        hold = np.nan_to_num(rows["hold_s"].to_numpy(dtype="float64"))
        t = to.iloc[to_groups.get(proc_pool, empty)]
        t_arrivals = t["at"].to_numpy(dtype="float64") - np.nan_to_num(
            t["waited_s"].to_numpy(dtype="float64")
        )
        t_holds = np.array([by_site.get(fp, pool_median) for fp in t["fingerprint"]], "float64")
        t_holds = np.nan_to_num(t_holds, nan=pool_median)
        keep = ~leaked[mine]
        zeros = np.zeros(len(t))
        recorded.append(
            _replay.Demand(
                np.concatenate([arrivals, t_arrivals]),
                np.concatenate([hold, t_holds]),
                np.concatenate([c, zeros]),
            )
        )
        fixed.append(
            _replay.Demand(
                np.concatenate([arrivals[keep], t_arrivals]),
                np.concatenate([hold[keep], t_holds]),
                np.concatenate([c[keep], zeros]),
            )
        )
    leak_rows = co[leaked]
    sites = leak_rows["site"].astype(object).value_counts()
    info = {
        "checkouts": int(len(co)),
        "timeouts": int(len(to)),
        "leaks_removed": int(leaked.sum()),
        "leak_sites": [str(s) for s in sites.index],
    }
    return recorded, fixed, info


def _replay_sizing(data: _Data, group: pd.DataFrame, mean_in_use: float) -> dict[str, Any] | None:
    """The ``replay`` entry of one pool name's sizing: its recorded settings and the advice,
    each replayed on the recorded demand (see :mod:`instrument._replay`). ``None`` for a
    pool without a size limit or a timeout, or without recorded demand.

    It works on the raw events in the window: there are no rollups to replay from.
    """
    pool_ids = [int(i) for i in group["pool_id"]]
    rows = _load_pools(data.conn).set_index("id").loc[pool_ids]
    size = _first_number(rows["pool_size"])
    overflow = _first_number(rows["max_overflow"])
    timeout = pd.to_numeric(rows["timeout_s"], errors="coerce").dropna()
    if size is None or overflow is None or timeout.empty:
        return None
    timeout_s = float(timeout.max())
    if _replay.capacity_of(size, overflow) is None or not timeout_s >= 0:
        return None
    recorded, fixed, info = _replay_demands(data, pool_ids)
    if not info["checkouts"] + info["timeouts"]:
        return None
    current = _replay.replay(recorded, size, overflow, timeout_s)
    advice = _replay.recommend(fixed, size, overflow, timeout_s, mean_in_use=mean_in_use)
    assert advice is not None  # the pool has a limit
    processes = int(group["process_id"].nunique())
    capacity = advice.pool_size + advice.max_overflow
    return {
        "source": "raw_events",
        **info,
        "timed_out_hold": "site_median",
        "max_wait_p99_ms": _replay.DEFAULT_MAX_WAIT_P99_S * 1000,
        "peak_demand": _replay.peak_demand(fixed),
        "current": current.as_dict(),
        "recommended": advice.outcome.as_dict(),
        "total_connections": capacity * processes,
    }


def replay_demands(conn: sqlite3.Connection, filters: Filters = Filters()) -> dict[str, Any]:
    """The recorded demand of each pool name, as the sizing advice replays it: one
    ``_replay.Demand`` per process and pool, confirmed leaks included as they happened.
    Pass one pool's list to :func:`what_if`.
    """
    data = _load(conn, filters)
    out = {}
    for name, rows in data.pools.groupby("name", sort=True):
        recorded, _, info = _replay_demands(data, [int(i) for i in rows["id"]])
        if info["checkouts"] + info["timeouts"]:
            out[str(name)] = recorded
    return out


def what_if(
    demands: list[Any], pool_size: int, max_overflow: int, timeout_s: float
) -> dict[str, Any]:
    """What the demand of :func:`replay_demands` would have met on a QueuePool of these
    settings: ``timeouts``, ``wait_p50_ms`` ... ``wait_max_ms``, ``peak``, ``peak_total``
    (see docs/report-json.md, ``sizing.replay``).

    :raises ValueError: ``timeout_s`` is negative or not a number.
    """
    return _replay.replay(demands, pool_size, max_overflow, timeout_s).as_dict()


def _settings(outcome: dict[str, Any]) -> str:
    size, overflow = outcome["pool_size"], outcome["max_overflow"]
    return (
        f"pool_size={size}, max_overflow={overflow} (capacity {size + overflow}), "
        f"pool_timeout={outcome['pool_timeout_s']:g}"
    )


def _predicted(outcome: dict[str, Any]) -> str:
    n = outcome["timeouts"]
    p99 = outcome["wait_p99_ms"]
    wait = "no wait" if p99 is None else f"p99 wait {_fmt_s(p99 / 1000)}"
    return f"{n or 'no'} timeout{'' if n == 1 else 's'}, {wait}, peak {outcome['peak']}"


def _apply_replay(entry: dict[str, Any], replayed: dict[str, Any] | None, seen: str) -> None:
    """Put the replay's advice into a sizing entry: ``replay``, the recommended settings
    and one paragraph; without a replay the entry keeps its estimate."""
    entry["replay"] = replayed
    if replayed is None:
        return
    cur, rec = replayed["current"], replayed["recommended"]
    entry["recommended_pool_size"] = rec["pool_size"]
    entry["recommended_max_overflow"] = rec["max_overflow"]
    entry["recommended_pool_timeout_s"] = rec["pool_timeout_s"]
    name = entry["pool"]
    timed_out = replayed["timeouts"]
    asked = f"{replayed['checkouts']} recorded checkouts" + (
        f" and {timed_out} timed-out request{'' if timed_out == 1 else 's'}" if timed_out else ""
    )
    same = (rec["pool_size"], rec["max_overflow"], rec["pool_timeout_s"]) == (
        cur["pool_size"], cur["max_overflow"], cur["pool_timeout_s"]
    )  # fmt: skip
    text = (
        f"{name}: {seen}. Replaying the {asked} on QueuePool: the recorded {_settings(cur)} "
        f"gives {_predicted(cur)} (recorded: {entry['timeouts'] or 'no'} timeout"
        f"{'' if entry['timeouts'] == 1 else 's'}, peak {entry['peak_in_use']})"
    )
    bound = _fmt_s(replayed["max_wait_p99_ms"] / 1000)
    if same and not cur["timeouts"]:
        text += f"; it is the smallest with no timeouts and a p99 wait under {bound}: keep it."
    elif same:
        text += (
            f"; without the confirmed leaks it gives {_predicted(rec)}: the size is enough "
            "once they are fixed."
        )
    else:
        verb = (
            ""
            if rec["timeouts"]
            else f" (the smallest with no timeouts and a p99 wait under {bound})"
        )
        text += f"; {_settings(rec)}{verb} gives {_predicted(rec)}."
    if entry["processes"] > 1:
        text += (
            f" Across {entry['processes']} processes the database must accept up to "
            f"{replayed['total_connections']} connections from this pool "
            f"({rec['peak_total']} at once in the replay): compare with its max_connections."
        )
    if replayed["leaks_removed"]:
        n = replayed["leaks_removed"]
        where = ", ".join(replayed["leak_sites"][:3])
        text += (
            f" {n} confirmed leaked checkout{'' if n == 1 else 's'} at {where} "
            f"{'is' if n == 1 else 'are'} left out of the advice's demand: fix these before "
            "growing the pool."
        )
    entry["advice"] = text


def _first_number(values: pd.Series) -> int | None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return int(values.max()) if not values.empty else None


def sizing_advice(conn: sqlite3.Connection, filters: Filters = Filters()) -> list[dict[str, Any]]:
    """Pool sizing advice, one dict per pool name, with the numbers it came from.

    By Little's law, arrival rate (checkouts per second per process) × mean hold = mean
    connections in use. ``peak_demand`` is the most connections in use plus callers
    waiting at one moment. When checkouts waited (> :data:`WAITED_THRESHOLD_S`) or timed
    out, the recommended capacity is that peak demand, with ``pool_size`` covering the mean.
    ``verdict`` is ``ok``, ``too_small`` or ``unbounded``; ``advice`` is one paragraph.
    """
    return _sizing(_load(conn, filters))


# ---- summary and the JSON report -----------------------------------------------------------


def _top_peak(data: _Data, peaks: pd.DataFrame) -> tuple[int, int | None]:
    """The busiest pool's peak in use and its capacity, from per-(process, pool) peaks."""
    if peaks.empty:
        return 0, None
    caps = _load_pools(data.conn).set_index("id")["capacity"]
    top = peaks.sort_values("peak_in_use", ascending=False).iloc[0]
    cap = caps.get(top["pool_id"], np.nan)
    return int(np.nan_to_num(top["peak_in_use"])), None if pd.isna(cap) else int(cap)


def _summary(data: _Data, leak_frame: pd.DataFrame, timeout_count: int) -> dict[str, Any]:
    co = data.core
    counts = {c: 0 for c in ("confirmed", "suspected", "unknown")}
    if not leak_frame.empty:
        for certainty, n in leak_frame.groupby("certainty")["count"].sum().items():
            counts[str(certainty)] = int(n)
    peak, capacity = _top_peak(data, _pool_peaks(data))
    return _summary_dict(
        data,
        checkouts=len(co),
        open_checkouts=int((co["outcome"] == "open").sum()) if len(co) else 0,
        peak=peak,
        capacity=capacity,
        wait_p95=_quantiles(co["wait_s"].to_numpy(dtype="float64"))[1] if len(co) else math.nan,
        timeouts=timeout_count,
        leak_counts=counts,
    )


def _summary_dict(
    data: _Data,
    *,
    checkouts: int,
    open_checkouts: int,
    peak: int,
    capacity: int | None,
    wait_p95: float,
    timeouts: int,
    leak_counts: dict[str, int],
) -> dict[str, Any]:
    cond, params = _event_filter(data)
    n_events, first_at, last_at, dropped = data.conn.execute(
        "SELECT COUNT(*), MIN(at), MAX(at), COALESCE(SUM(CASE WHEN kind = 'dropped' "
        f"THEN count END), 0) FROM events WHERE 1 {cond}",
        params,
    ).fetchone()
    states = data.processes["state"].value_counts()
    return {
        "processes": len(data.processes),
        "crashed_processes": int(states.get("crashed", 0)),
        "terminated_processes": int(states.get("terminated", 0)),
        "running_processes": int(states.get("running", 0)),
        "pools": int(data.pools["name"].nunique()),
        "events": int(n_events),
        "first_event_at": first_at,
        "last_event_at": last_at,
        "checkouts": int(checkouts),
        "open_checkouts": int(open_checkouts),
        "peak_in_use": peak,
        "capacity": capacity,
        "wait_p95_s": wait_p95,
        "timeouts": int(timeouts),
        "confirmed_leaks": leak_counts["confirmed"],
        "suspected_leaks": leak_counts["suspected"],
        "unknown_leaks": leak_counts["unknown"],
        "dropped": int(dropped or 0),
        "ignored_events": _ignored_events(data.conn),
    }


def summary(conn: sqlite3.Connection, filters: Filters = Filters()) -> dict[str, Any]:
    """Headline numbers: processes, pools, events, checkouts, peak in use (of the busiest
    pool in one process) and its capacity, overall p95 wait, timeouts, leaked checkouts by
    certainty (``confirmed_leaks``, ``suspected_leaks``, ``unknown_leaks``) and records the
    recorder dropped.

    Without a time window it is counted from per-pool aggregates, never pairing every
    checkout with its return (see :func:`_fast_summary`); the values are the same.
    """
    data = _load(conn, filters)
    fast = _fast_summary(data)
    return fast if fast is not None else _summary_exact(data)


def _summary_exact(data: _Data) -> dict[str, Any]:
    """:func:`summary` from the paired checkouts: what the fast path must equal."""
    return _summary(data, _leaks(data), _count_timeouts(data))


_RETURNED = f"kind IN {_RETURN_KINDS}"
_HELD_KINDS = ("checkin", "detach", "unwatched")  # held_too_long when past leak_after
_PAIR_KINDS = ("checkout", *_RETURN_KINDS)
_HAS_CHECKOUT = (
    "EXISTS (SELECT 1 FROM events AS o WHERE o.process_id = e.process_id "
    "AND o.pool_id = e.pool_id AND o.checkout_id = e.checkout_id AND o.kind = 'checkout')"
)


def _fast_summary(data: _Data) -> dict[str, Any] | None:
    """:func:`summary` without pairing checkouts; ``None`` where it cannot be sure to agree.

    It relies on what the recorder guarantees: a checkout id is unique within its process
    (one counter) and a checkout is returned at most once (its entry is popped), so a
    (process, pool, checkout_id) key has at most one checkout row and at most one return
    row (``checkin``, ``gc_checkin`` or ``detach``). One walk of the checkout index, grouped
    per (process, pool), then gives every count: the open checkouts are the distinct keys
    of checkouts and returns minus the returns (right also when a checkout record was
    dropped and only its return was written), ``gc_reclaimed`` and ``held_too_long`` are
    returns whose checkout row exists, open checkouts of exited processes are
    ``never_returned`` and of crashed ones ``open_at_crash``; only the open checkouts of
    running processes are read one by one, to see which are past ``leak_after``
    (``open_now``). The p95 wait needs only the top 5 % of the waits.

    A time window (``since``/``until``) cuts pairs, so then it returns ``None`` and the
    caller pairs checkouts (:func:`_summary_exact`); so do counts that cannot come from
    such a store (more checkouts or returns than ids, a pool written by two processes).
    """
    f = data.filters
    if f.since is not None or f.until is not None:
        return None
    conn = data.conn
    pools = _load_pools(conn)
    owners = dict(zip(pools["id"].tolist(), pools["process_id"].tolist(), strict=True))
    leak_after = _leak_after_by_pool(data)
    cond = _in_list("e.pool_id", data.pool_ids)
    if f.processes is not None:
        cond += _in_list("e.process_id", list(f.processes))
    thresholds = leak_after.dropna()
    if thresholds.empty:
        over = "0"
        over_params: list[Any] = []
    elif f.leak_after is not None:
        over = f"kind IN {_HELD_KINDS} AND hold_s > ? AND {_HAS_CHECKOUT}"
        over_params = [f.leak_after]
    else:
        cases = " ".join("WHEN ? THEN ?" for _ in range(len(thresholds)))
        over = (
            f"kind IN {_HELD_KINDS} AND hold_s > ? AND hold_s > "
            f"(CASE e.pool_id {cases} END) AND {_HAS_CHECKOUT}"
        )
        over_params = [float(thresholds.min())]
        for pool_id, value in thresholds.items():
            over_params += [int(pool_id), float(value)]
    groups = conn.execute(
        f"SELECT e.process_id, e.pool_id, SUM(kind = 'checkout'), SUM({_RETURNED}), "
        f"COUNT(DISTINCT CASE WHEN kind IN {_PAIR_KINDS} THEN e.checkout_id END), "
        "MAX(CASE WHEN kind = 'checkout' AND in_use >= 0 THEN in_use END), "
        "COUNT(CASE WHEN kind = 'checkout' THEN wait_s END), "
        f"SUM(CASE WHEN kind = 'gc_checkin' AND {_HAS_CHECKOUT} THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN {over} THEN 1 ELSE 0 END) "
        f"FROM events AS e WHERE e.checkout_id IS NOT NULL {cond} "
        "GROUP BY e.process_id, e.pool_id",
        over_params,
    ).fetchall()

    procs = data.processes.set_index("id")
    n_checkouts = n_open = n_waits = 0
    leaked = {c: 0 for c in ("confirmed", "suspected", "unknown")}
    peak_rows: list[tuple[int, int, float]] = []
    for group in groups:
        proc, pool_id, n_co, n_ret, keys, peak, waits, gc, too_long = group
        if owners.get(pool_id) != proc:  # a pool unknown, or written by two processes
            return None
        if not n_co:  # returns without checkouts are not in the summary
            continue
        # Every key with a return is paired or an orphan (its checkout record was dropped),
        # so the keys left over are the open checkouts.
        open_ = keys - n_ret
        if not (n_co <= keys and n_ret <= keys and 0 <= open_ <= n_co):  # ids used twice
            return None
        n_checkouts += n_co
        n_open += open_
        n_waits += waits
        peak_rows.append((proc, pool_id, math.nan if peak is None else float(peak)))
        leaked["confirmed"] += gc
        leaked["suspected"] += too_long
        state = procs["state"].get(proc, "running")
        if state == "exited":
            leaked["confirmed"] += open_  # never_returned
        elif state in ("crashed", "terminated"):
            leaked["unknown"] += open_  # open_at_crash
        elif open_:  # open_now once held longer than leak_after
            starts = np.array(
                [
                    row[0]
                    for row in conn.execute(
                        "SELECT e.at FROM events AS e WHERE e.process_id = ? AND e.pool_id = ? "
                        "AND e.checkout_id IS NOT NULL AND e.kind = 'checkout' "
                        "AND NOT EXISTS (SELECT 1 FROM events AS r "
                        "WHERE r.process_id = e.process_id AND r.pool_id = e.pool_id "
                        f"AND r.checkout_id = e.checkout_id AND r.{_RETURNED})",
                        (proc, pool_id),
                    )
                ],
                dtype="float64",
            )
            if len(starts) != open_:
                return None
            until = float(procs["seen_until_at"].get(proc, data.now))
            held = np.maximum(until - starts, 0.0)
            leaked["suspected"] += int((held > leak_after.get(pool_id, np.nan)).sum())

    n_timeouts = 0
    for proc, pool_id, n, peak in conn.execute(
        "SELECT e.process_id, e.pool_id, COUNT(*), MAX(CASE WHEN in_use >= 0 THEN in_use END) "
        f"FROM events AS e WHERE e.kind = 'timeout' {cond} GROUP BY e.process_id, e.pool_id"
    ):
        n_timeouts += n
        peak_rows.append((proc, pool_id, math.nan if peak is None else float(peak)))
    peaks = pd.DataFrame(peak_rows, columns=["process_id", "pool_id", "in_use"])
    peaks = (
        peaks.astype({"in_use": "float64"})
        .groupby(["process_id", "pool_id"], sort=True)
        .agg(peak_in_use=("in_use", "max"))
        .reset_index()
    )
    peak, capacity = _top_peak(data, peaks)
    wait_p95 = _top_wait_p95(data, cond, n_waits) if n_checkouts else math.nan
    if wait_p95 is None:
        return None
    return _summary_dict(
        data,
        checkouts=n_checkouts,
        open_checkouts=n_open,
        peak=peak,
        capacity=capacity,
        wait_p95=wait_p95,
        timeouts=n_timeouts,
        leak_counts=leaked,
    )


def _top_wait_p95(data: _Data, cond: str, n: int) -> float | None:
    """The p95 of the ``n`` non-NULL checkout waits, exactly as :func:`_quantiles` gives it
    on all of them, from only the largest waits: a percentile depends on the two values
    around its rank, so the smaller ones may be anything no larger. ``None`` if the
    store does not hold ``n`` such waits."""
    if n == 0:
        return math.nan
    m = min(n, n - math.floor(0.95 * (n - 1)) + 2)
    top = np.array(
        [
            row[0]
            for row in data.conn.execute(
                "SELECT e.wait_s FROM events AS e WHERE e.kind = 'checkout' "
                f"AND e.checkout_id IS NOT NULL AND e.wait_s IS NOT NULL {cond} "
                "ORDER BY e.wait_s DESC LIMIT ?",
                (m,),
            )
        ],
        dtype="float64",
    )
    if len(top) != m:  # the waits changed under us
        return None
    values = np.full(n, top.min())
    values[n - m :] = top
    return _quantiles(values)[1]


def _count_timeouts(data: _Data) -> int:
    cond, params = _event_filter(data)
    return int(
        data.conn.execute(
            f"SELECT COUNT(*) FROM events WHERE kind = 'timeout' {cond}", params
        ).fetchone()[0]
    )


def parse_time(text: str) -> float:
    """Read a time given on the command line: unix seconds (``1764246000.5``) or ISO 8601
    (``2026-11-27T13:00:00``, ``2026-11-27 13:00:00+01:00``, ``...Z``); without an offset,
    UTC.

    :raises ValueError: neither form, or not a time from 1970 to 9999 (``nan``, ``inf``,
        ``1e400``, ``-5``).
    """
    value = text.strip()
    try:
        at = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"cannot read {text!r} as a time; give unix seconds or an ISO 8601 time such "
                "as 2026-11-27T13:00:00"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        at = moment.timestamp()
    if not 0 <= at <= _MAX_TIME:  # NaN fails every comparison
        raise ValueError(
            f"{text!r} is not a time between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z "
            f"(unix seconds 0 to {_MAX_TIME:.0f})"
        )
    return at


def iso(at: float | None) -> str | None:
    """Write unix seconds as an ISO 8601 UTC time with milliseconds, e.g. ``...T12:00:01.250Z``.

    ``None`` for ``None``, NaN and a time outside 0 to :data:`_MAX_TIME`, which has no such
    writing (a tampered row)."""
    if at is None:
        return None
    at = float(at)
    if not 0 <= at <= _MAX_TIME:
        return None
    moment = datetime.fromtimestamp(at, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Any) -> Any:
    """Make a value JSON-ready: numpy scalars to Python, NaN to ``None``."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, np.bool_):
        return bool(value)
    if value is pd.NaT or value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def _ms(p50: float, p95: float, p99: float, mx: float) -> dict[str, float | None]:
    def conv(v: float) -> float | None:
        return None if v is None or math.isnan(v) else round(v * 1000, 3)

    return {"p50": conv(p50), "p95": conv(p95), "p99": conv(p99), "max": conv(mx)}


def _store_path(conn: sqlite3.Connection) -> str:
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return str(Path(file)) if file else ""
    return ""


def build_report(
    conn: sqlite3.Connection, filters: Filters = Filters(), *, with_utilization: bool = False
) -> dict[str, Any]:
    """Build the JSON report (schema :data:`REPORT_SCHEMA`) from a store.

    Keys: ``schema``, ``generated_at``, ``poolscope``, ``store``, ``filters``, ``summary``,
    ``processes``, ``pools``, ``leaks``, ``timeouts``, ``sites``. Times are ISO 8601 UTC
    strings; ``*_ms`` objects hold p50/p95/p99/max in milliseconds. The shape is described
    in ``instrument/report_schema.json`` and docs/report-json.md.

    :param with_utilization: also add ``utilization``: per pool name, the in-use, waiting
        and capacity series of :func:`utilization` (about 300 points; costs one more scan).
    """
    data = _load(conn, filters)
    co = data.core
    leak_frame = _leaks(data)
    timeout_frame = _timeouts(data)
    site_frame = _sites(data)
    sizing = {entry["pool"]: entry for entry in _sizing(data)}
    by_pool = _percentiles(co, "pool").set_index("pool") if len(co) else pd.DataFrame()
    peaks = _pool_peaks(data).copy()
    all_pools = _load_pools(data.conn).set_index("id")
    peaks["pool"] = peaks["pool_id"].map(all_pools["name"])

    pool_entries = []
    for name, rows in data.pools.groupby("name", sort=True):
        first = rows.iloc[0]
        pct = by_pool.loc[name] if name in by_pool.index else None
        mine = peaks[peaks["pool"] == name]
        stats = [pct[c] for c in _PERCENTILE_COLUMNS[1:]] if pct is not None else [math.nan] * 8
        pool_entries.append(
            {
                "name": name,
                "url": first["url"],
                "dialect": first["dialect"],
                "pool_class": first["pool_class"],
                "pool_size": _first_number(rows["pool_size"]),
                "max_overflow": _first_number(rows["max_overflow"]),
                "capacity": _first_number(rows["capacity"]),
                "timeout_s": first["timeout_s"],
                "leak_after_s": filters.leak_after or first["leak_after_s"],
                "processes": sorted(int(p) for p in rows["process_id"].unique()),
                "checkouts": int(pct["count"]) if pct is not None else 0,
                "peak_in_use": int(np.nan_to_num(mine["peak_in_use"].max())) if len(mine) else 0,
                "timeouts": int(mine["timeouts"].sum()) if len(mine) else 0,
                "wait_ms": _ms(*stats[:4]),
                "hold_ms": _ms(*stats[4:]),
                "sizing": sizing.get(name),
            }
        )

    leak_entries = [
        {
            "class": r.leak_class,
            "certainty": r.certainty,
            "site": r.site,
            "fingerprint": r.fingerprint,
            "pool": r.pool,
            "count": int(r.count),
            "first_seen_at": iso(r.first_seen_at),
            "last_seen_at": iso(r.last_seen_at),
            "max_held_s": r.max_held_s,
            "leak_after_s": r.leak_after_s,
            "threads": list(r.threads),
            "processes": list(r.processes),
            "stack": list(r.stack),
        }
        for r in leak_frame.itertuples(index=False)
    ]
    timeout_entries = [
        {
            "at": iso(r.at),
            "pool": r.pool,
            "process_id": int(r.process_id),
            "waited_s": r.waited_s,
            "waiters": None if _missing(r.waiters) else int(r.waiters),
            "in_use": None if _missing(r.in_use) else int(r.in_use),
            "site": r.site,
            "thread": r.thread,
            "task": None if _missing(r.task) else r.task,
            "stack": list(r.stack),
            "holders": [
                {
                    "site": h["site"],
                    "thread": h["thread"],
                    "task": h["task"],
                    "held_s": h["held_s"],
                    "checkout_id": h["checkout_id"],
                    "checked_out_at": iso(h["checked_out_at"]),
                }
                for h in r.holders
            ],
        }
        for r in timeout_frame.itertuples(index=False)
    ]
    site_entries = [
        {
            "site": r.site,
            "fingerprint": r.fingerprint,
            "pool": r.pool,
            "checkouts": int(r.checkouts),
            "open": int(r.open),
            "leaks": int(r.leaks),
            "total_hold_s": r.total_hold_s,
            "hold_ms": {
                "mean": _round_ms(r.hold_mean_s),
                "p95": _round_ms(r.hold_p95_s),
                "max": _round_ms(r.hold_max_s),
            },
            "wait_ms": {"p95": _round_ms(r.wait_p95_s)},
            "pool_time_share": r.pool_time_share,
            "stack": list(r.stack),
        }
        for r in site_frame.itertuples(index=False)
    ]
    process_entries = [
        {
            "id": int(r.id),
            "pid": int(r.pid),
            "host": r.host,
            "argv": _argv(r.argv),
            "started_at": iso(r.started_at),
            "last_seen_at": iso(r.seen_until_at),
            "state": r.state,
        }
        for r in data.processes.itertuples(index=False)
    ]
    report = {
        "schema": REPORT_SCHEMA,
        "generated_at": iso(data.now),
        "poolscope": __version__,
        "store": _store_path(conn),
        "filters": {
            "pools": list(filters.pools) if filters.pools is not None else None,
            "processes": list(filters.processes) if filters.processes is not None else None,
            "since": iso(filters.since),
            "until": iso(filters.until),
            "leak_after_s": filters.leak_after,
        },
        "summary": _summary(data, leak_frame, len(timeout_frame)),
        "processes": process_entries,
        "pools": pool_entries,
        "leaks": leak_entries,
        "timeouts": timeout_entries,
        "sites": site_entries,
    }
    if with_utilization:
        report["utilization"] = _utilization_series(data)
    summary_ = report["summary"]
    summary_["first_event_at"] = iso(summary_["first_event_at"])
    summary_["last_event_at"] = iso(summary_["last_event_at"])
    return _clean(report)


def _utilization_series(data: _Data) -> list[dict[str, Any]]:
    util = _utilization(data, None)
    series = []
    for name, rows in util.groupby("pool", sort=True):
        capacity = rows["capacity"].dropna()
        series.append(
            {
                "pool": name,
                "start_at": iso(float(rows["at"].iloc[0])),
                "interval_s": float(rows["interval_s"].iloc[0]),
                "at_offsets_s": [round(float(a - rows["at"].iloc[0]), 6) for a in rows["at"]],
                "in_use": [int(v) for v in rows["in_use"]],
                "waiters": [int(v) for v in rows["waiters"]],
                "capacity": int(capacity.max()) if len(capacity) else None,
            }
        )
    return series


def _round_ms(seconds: float) -> float | None:
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 3)


def _argv(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return [str(text)]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]
