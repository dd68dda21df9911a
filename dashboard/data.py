"""Cached loaders over :mod:`instrument.analysis`: the dashboard's only way to read a store.

Every loader takes the store path and a *token* (sizes and modification times of the
store and its WAL), so a finished store is read once while a store that a live process
is writing is read again as soon as it changes. A connection is opened per load and
closed after it: a read-only SQLite connection is cheap, and a fresh one always sees the
newest committed events of a live writer.

Frames that every page filters differently (checkouts) are cached whole and filtered
here, outside the cache; analyses whose result depends on the filters themselves (leak
classes depend on the threshold, resampling on the window) are cached per filter value.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from instrument import _pg_store, analysis, report
from instrument._store import PostgresStore, parse_store
from instrument.analysis._usage import waits_by_interval
from instrument.exceptions import StoreCorruptError, StoreError
from instrument.render import words

CACHE_TTL_S = 600
"""How long a cached result may live; the token already invalidates it when the store changes."""

LIVE_REFRESH_S = 3.0
"""How often the Live page refreshes, in seconds."""

LIVE_WINDOW_S = 300.0
"""How much recent history the Live page draws, in seconds."""

_VIEW_KEY = "poolscope.view"

T = TypeVar("T")

Token = tuple[int, ...]
"""A cheap fingerprint of a store's files: changes whenever the store is written."""


@dataclass(frozen=True)
class View:
    """What every page shows: which store, as of which token, through which filters."""

    store: str
    token: Token
    filters: analysis.Filters


# -- the store ---------------------------------------------------------------------------


def resolve_store(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """Return the store to open first: ``--store PATH`` (after ``--`` on the streamlit
    command line), else ``$POOLSCOPE_STORE``, else ``./poolscope.db``.

    :param argv: the script's arguments. May be ``None`` for an empty list.
    :param environ: the environment. May be ``None`` for ``os.environ``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store")
    known, _ = parser.parse_known_args(list(argv or []))
    environ = os.environ if environ is None else environ
    return known.store or environ.get("POOLSCOPE_STORE") or "poolscope.db"


def postgres_store(store: str) -> PostgresStore | None:
    """The PostgreSQL store ``store`` names, or ``None`` for a file.

    :raises StoreError: a URL of another database.
    """
    try:
        parsed = parse_store(store)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    return parsed if isinstance(parsed, PostgresStore) else None


def shown(store: str) -> str:
    """``store`` as the dashboard shows it: a URL with its password as ``***``."""
    try:
        parsed = parse_store(store)
    except ValueError:
        from instrument._secrets import masked_argv

        return masked_argv([store])[0]
    return str(parsed) if isinstance(parsed, PostgresStore) else store


def store_token(store: str) -> Token:
    """Fingerprint the store and its WAL file by size and modification time; a PostgreSQL
    store by its newest ids and its processes' heartbeats and ends (one query).

    :raises StoreError: a PostgreSQL store that cannot be read.
    """
    pg = postgres_store(store)
    if pg is not None:
        return _pg_store.token(pg)
    token: list[int] = []
    for suffix in ("", "-wal"):
        try:
            stat = os.stat(store + suffix)
        except OSError:
            token.extend((-1, -1))
        else:
            token.extend((stat.st_size, stat.st_mtime_ns))
    return tuple(token)


@contextmanager
def _connection(store: str) -> Iterator[sqlite3.Connection]:
    """Open the store read-only for one load; a damaged file becomes ``StoreCorruptError``."""
    conn = analysis.open_store(store)
    try:
        yield conn
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptError(f"{shown(store)} could not be read ({exc})") from None
    finally:
        conn.close()


def set_view(view: View) -> None:
    """Make ``view`` the one the pages of this run show (called by the router)."""
    st.session_state[_VIEW_KEY] = view


def current_view() -> View:
    """Return the view the router set up for this run."""
    return st.session_state[_VIEW_KEY]


def refreshed(view: View) -> View:
    """Return ``view`` with the store's current token (for the Live page's reruns)."""
    return replace(view, token=store_token(view.store))


# -- cached loaders ----------------------------------------------------------------------


@st.cache_data(ttl=CACHE_TTL_S, max_entries=32, show_spinner=False)
def load_processes(store: str, token: Token) -> pd.DataFrame:
    """Every process that wrote the store (see :func:`instrument.analysis.processes`)."""
    with _connection(store) as conn:
        return analysis.processes(conn)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=32, show_spinner=False)
def load_pools(store: str, token: Token) -> pd.DataFrame:
    """Every pool of every process, unfiltered (see :func:`instrument.analysis.pools`)."""
    with _connection(store) as conn:
        return analysis.pools(conn)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=32, show_spinner=False)
def load_has_events(store: str, token: Token) -> bool:
    """Whether the store holds any event (none: nothing was recorded yet). One row looked
    up, not a count: counting every event of a big store reads all its pages."""
    with _connection(store) as conn:
        # main.events, not through the checking view: any row at all.
        return conn.execute("SELECT 1 FROM main.events LIMIT 1").fetchone() is not None


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_summary(store: str, token: Token, filters: analysis.Filters) -> dict[str, Any]:
    """The headline numbers (see :func:`instrument.analysis.summary`)."""
    with _connection(store) as conn:
        return analysis.summary(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_sizing_advice(store: str, token: Token, filters: analysis.Filters) -> list[dict]:
    """One piece of sizing advice per pool (see :func:`instrument.analysis.sizing_advice`)."""
    with _connection(store) as conn:
        return analysis.sizing_advice(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=16, show_spinner=False)
def load_replay_demands(store: str, token: Token, filters: analysis.Filters) -> dict[str, Any]:
    """Each pool's recorded demand, for the what-if replay (see
    :func:`instrument.analysis.replay_demands`)."""
    with _connection(store) as conn:
        return analysis.replay_demands(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_utilization(
    store: str, token: Token, filters: analysis.Filters, interval_s: float | None = None
) -> pd.DataFrame:
    """Pool counts over time (see :func:`instrument.analysis.utilization`)."""
    with _connection(store) as conn:
        return analysis.utilization(conn, filters, interval_s)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_timeouts(store: str, token: Token, filters: analysis.Filters) -> pd.DataFrame:
    """Every timeout with its holders (see :func:`instrument.analysis.timeouts`)."""
    with _connection(store) as conn:
        return analysis.timeouts(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_percentiles(
    store: str, token: Token, filters: analysis.Filters, by: str | None = None
) -> pd.DataFrame:
    """Wait and hold percentiles (see :func:`instrument.analysis.percentiles`)."""
    with _connection(store) as conn:
        return analysis.percentiles(conn, filters, by=by)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_sites(store: str, token: Token, filters: analysis.Filters) -> pd.DataFrame:
    """Call sites by the pool time they hold (see :func:`instrument.analysis.sites`)."""
    with _connection(store) as conn:
        return analysis.sites(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_diagnoses(store: str, token: Token, filters: analysis.Filters) -> pd.DataFrame:
    """Why long holds were held (see :func:`instrument.analysis.diagnoses`)."""
    with _connection(store) as conn:
        return analysis.diagnoses(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_leaks(store: str, token: Token, filters: analysis.Filters) -> pd.DataFrame:
    """Leaks by class and site (see :func:`instrument.analysis.leaks`)."""
    with _connection(store) as conn:
        return analysis.leaks(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=64, show_spinner=False)
def load_source(store: str, token: Token, filters: analysis.Filters) -> str:
    """Where the figures of the view come from: ``raw_events`` (every checkout paired) or
    ``rollups`` (see :func:`instrument.analysis.source`): on rollups, pages draw
    distributions from histograms instead of loading every checkout."""
    with _connection(store) as conn:
        return analysis.source(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=32, show_spinner=False)
def load_histograms(store: str, token: Token, filters: analysis.Filters) -> pd.DataFrame:
    """Wait and hold histograms per pool and site (see
    :func:`instrument.analysis.histograms`)."""
    with _connection(store) as conn:
        return analysis.histograms(conn, filters)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=32, show_spinner=False)
def load_wait_percentiles_over_time(
    store: str, token: Token, filters: analysis.Filters
) -> pd.DataFrame:
    """Wait percentiles per pool over time (see
    :func:`instrument.analysis.wait_percentiles_over_time`)."""
    with _connection(store) as conn:
        return analysis.wait_percentiles_over_time(conn, filters)


def from_rollups(view: View) -> bool:
    """Whether the figures of ``view`` come from rollups (:func:`load_source`)."""
    return load_source(view.store, view.token, view.filters) == "rollups"


def weighted(histograms: pd.DataFrame, measure: str, column: str) -> pd.DataFrame:
    """Rows of ``histograms`` for ``measure`` as a frame the histogram charts draw: the
    bucket values in ``column`` and their counts in ``weight``."""
    rows = histograms[histograms["measure"] == measure] if len(histograms) else histograms
    return pd.DataFrame(
        {
            "pool": rows.get("pool", pd.Series(dtype=object)),
            "site": rows.get("site", pd.Series(dtype=object)),
            "fingerprint": rows.get("fingerprint", pd.Series(dtype=object)),
            "outcome": "all",
            column: rows.get("value_s", pd.Series(dtype="float64")),
            "weight": rows.get("count", pd.Series(dtype="int64")),
        }
    )


@st.cache_data(ttl=CACHE_TTL_S, max_entries=16, show_spinner=False)
def load_checkouts(store: str, token: Token) -> pd.DataFrame:
    """Every checkout of the store, unfiltered (filter with :func:`filter_checkouts`)."""
    with _connection(store) as conn:
        return analysis.checkouts(conn)


@st.cache_data(ttl=CACHE_TTL_S, max_entries=16, show_spinner=False)
def load_open_checkouts(
    store: str, token: Token, filters: analysis.Filters, as_of: float
) -> pd.DataFrame:
    """The checkouts not returned as of ``as_of`` (unix seconds), for the Live page.

    Cheaper than every checkout on a big store: only what was still held at ``as_of``
    comes back (the ``since`` rule of :class:`instrument.analysis.Filters`).
    """
    with _connection(store) as conn:
        frame = analysis.checkouts(conn, replace(filters, since=as_of, until=None))
    return frame[frame["outcome"] == "open"] if not frame.empty else frame


@st.cache_data(ttl=CACHE_TTL_S, max_entries=16, show_spinner=False)
def load_report(store: str, token: Token, filters: analysis.Filters) -> dict[str, Any]:
    """The report dict (schema ``poolscope.report/1``), as ``poolscope report`` builds it."""
    with _connection(store) as conn:
        return analysis.build_report(conn, filters)


def render_report(view: View, fmt: str) -> str:
    """Render the report of ``view`` as ``fmt`` (``html`` or ``json``), as ``poolscope report``
    does (:func:`instrument.report.render`)."""
    return report.render(load_report(view.store, view.token, view.filters), fmt)


_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="poolscope-load")


def in_background(call: Callable[[], T]) -> Future[T]:
    """Start a load on a worker thread and return its future.

    SQLite releases the GIL while it reads, so a cold analysis of a big store overlaps
    with the page's other work. The thread carries the script's run context, so cached
    loaders behave exactly as on the script thread.
    """
    ctx = get_script_run_ctx()

    def run() -> T:
        if ctx is not None:
            add_script_run_ctx(threading.current_thread(), ctx)
        return call()

    return _POOL.submit(run)


def load_together(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent loads side by side (see :func:`in_background`); return their results
    in order."""
    if len(calls) < 2:
        return [call() for call in calls]
    futures = [in_background(call) for call in calls[1:]]
    first = calls[0]()
    return [first, *(future.result() for future in futures)]


# -- shortcuts for pages -----------------------------------------------------------------


def summary(view: View) -> dict[str, Any]:
    """:func:`load_summary` for ``view``."""
    return load_summary(view.store, view.token, view.filters)


def utilization(view: View, interval_s: float | None = None) -> pd.DataFrame:
    """:func:`load_utilization` for ``view``."""
    return load_utilization(view.store, view.token, view.filters, interval_s)


def host_utilization(view: View, processes: pd.DataFrame) -> pd.DataFrame:
    """In use against capacity over time, per host: each host's pools (those the filters
    select) summed per time bucket. Columns ``host``, ``at``, ``in_use``, ``capacity``.

    :param processes: the store's processes (:func:`load_processes`), for their hosts.
    """
    chosen = set(view.filters.processes) if view.filters.processes else None
    frames = []
    span = time_span(processes)
    interval = max(1.0, (span[1] - span[0]) / 200)
    for host, rows in processes.groupby("host", sort=True):
        ids = [int(i) for i in rows["id"] if chosen is None or int(i) in chosen]
        if not ids:
            continue
        host_view = replace(view, filters=replace(view.filters, processes=tuple(ids)))
        util = load_utilization(host_view.store, host_view.token, host_view.filters, interval)
        if util.empty:
            continue
        summed = util.groupby("at", sort=True)[["in_use", "capacity"]].sum(min_count=1)
        summed["host"] = host
        frames.append(summed.reset_index())
    if not frames:
        return pd.DataFrame(columns=["host", "at", "in_use", "capacity"])
    return pd.concat(frames, ignore_index=True)[["host", "at", "in_use", "capacity"]]


def timeouts(view: View) -> pd.DataFrame:
    """:func:`load_timeouts` for ``view``."""
    return load_timeouts(view.store, view.token, view.filters)


def sites(view: View) -> pd.DataFrame:
    """:func:`load_sites` for ``view``."""
    return load_sites(view.store, view.token, view.filters)


def leaks(view: View) -> pd.DataFrame:
    """:func:`load_leaks` for ``view``."""
    return load_leaks(view.store, view.token, view.filters)


def diagnoses(view: View) -> pd.DataFrame:
    """:func:`load_diagnoses` for ``view``."""
    return load_diagnoses(view.store, view.token, view.filters)


def why_of_leak(found: pd.DataFrame, leak_class: str, pool: str, fingerprint: str) -> str:
    """One line on why the longest diagnosed hold of a leak group was held; ``""`` for none."""
    if found.empty:
        return ""
    mine = found[
        (found["leak_class"] == leak_class)
        & (found["pool"] == pool)
        & (found["fingerprint"] == fingerprint)
    ]
    return words.diagnosis(mine["diagnosis"].iloc[0]) if len(mine) else ""


def why_of_holders(found: pd.DataFrame, process_id: int, checkout_ids: list[int]) -> list[str]:
    """For each of ``checkout_ids`` (holders at a timeout of ``process_id``), one line on why
    it was held; ``""`` for none."""
    if found.empty:
        return ["" for _ in checkout_ids]
    mine = found[found["process_id"] == process_id].set_index("checkout_id")["diagnosis"]
    return [words.diagnosis(mine.get(c)) if c in mine.index else "" for c in checkout_ids]


def checkouts(view: View) -> pd.DataFrame:
    """The checkouts of ``view``: cached whole, filtered here by pool, process and window."""
    return filter_checkouts(load_checkouts(view.store, view.token), view.filters)


# -- derived frames (pure) ---------------------------------------------------------------


def filter_checkouts(frame: pd.DataFrame, filters: analysis.Filters) -> pd.DataFrame:
    """Keep the checkouts of the chosen pools and processes that overlap the time window.

    Same rules as :func:`instrument.analysis.checkouts`: a checkout counts when it was
    taken at or before ``until`` and returned at or after ``since`` (or not returned at
    all), and a checkout still open is held only until ``until``.
    """
    if frame.empty:
        return frame
    keep = pd.Series(True, index=frame.index)
    if filters.pools:
        keep &= frame["pool"].isin(filters.pools)
    if filters.processes:
        keep &= frame["process_id"].isin(filters.processes)
    if filters.until is not None:
        keep &= frame["checked_out_at"] <= filters.until
    if filters.since is not None:
        keep &= frame["returned_at"].isna() | (frame["returned_at"] >= filters.since)
    frame = frame[keep]
    if filters.until is not None:
        held_until = filters.until - frame["checked_out_at"]  # kept rows start by until
        is_open = frame["outcome"] == "open"
        frame = frame.assign(
            hold_s=frame["hold_s"].mask(is_open, np.minimum(frame["hold_s"], held_until))
        )
    return frame


def wait_percentiles_over_time(checkouts: pd.DataFrame, buckets: int = 40) -> pd.DataFrame:
    """Wait percentiles per pool per time bucket: the "is it getting worse?" view.

    ``instrument.analysis.percentiles`` has no time dimension, so this derives it from
    the checkouts: the span is cut into ``buckets`` equal intervals and each gets the
    p50 / p95 / p99 / max of the waits of the checkouts taken in it.

    :returns: columns ``at`` (bucket start), ``pool``, ``count``, ``wait_p50_s``,
        ``wait_p95_s``, ``wait_p99_s``, ``wait_max_s``.
    """
    return waits_by_interval(checkouts, buckets)


def holders_by_site(timeouts: pd.DataFrame) -> pd.DataFrame:
    """Who held the pool across all timeouts: per holder site, in how many timeouts it held
    a connection, how many connections at most, and its longest hold at a timeout.

    :returns: columns ``site, timeouts, most_held, max_held_s``, most timeouts first.
    """
    columns = ["site", "timeouts", "most_held", "max_held_s"]
    rows = [
        {"timeout": number, "site": holder.get("site"), "held_s": holder.get("held_s")}
        for number, holders in enumerate(timeouts.get("holders", []))
        for holder in holders or []
    ]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    per_timeout = frame.groupby(["site", "timeout"]).agg(
        held=("held_s", "size"), max_held_s=("held_s", "max")
    )
    out = per_timeout.groupby("site").agg(
        timeouts=("held", "size"), most_held=("held", "max"), max_held_s=("max_held_s", "max")
    )
    out = out.reset_index().sort_values(["timeouts", "max_held_s"], ascending=False)
    return out[columns].reset_index(drop=True)


def open_now(checkouts: pd.DataFrame, processes: pd.DataFrame) -> pd.DataFrame:
    """The checkouts still open in processes that are running, longest held first."""
    if checkouts.empty:
        return checkouts
    running = processes.loc[processes["state"] == "running", "id"]
    rows = checkouts[(checkouts["outcome"] == "open") & checkouts["process_id"].isin(running)]
    return rows.sort_values("hold_s", ascending=False)


def time_span(processes: pd.DataFrame, now: float | None = None) -> tuple[float, float]:
    """The recorded span of the store: first process start to last end or heartbeat.

    :param now: unused unless no process row exists. May be ``None`` for the clock.
    """
    if processes.empty:
        now = time.time() if now is None else now
        return now, now
    first = float(processes["started_at"].min())
    if "seen_until_at" in processes:
        last = float(processes["seen_until_at"].max())
    else:
        last = float(processes["ended_at"].fillna(processes["heartbeat_at"]).max())
    return first, max(first, last)
