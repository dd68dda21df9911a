"""Headline numbers of a store, counted from aggregates where that gives the same values."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import numpy as np
import pandas as pd

from . import _aggregate
from ._leaks import _leaks
from ._load import (
    _Data,
    _event_filter,
    _ignored_events,
    _in_list,
    _leak_after_by_pool,
    _load,
    _load_pools,
)
from ._model import _RETURN_KINDS, CERTAINTY, Filters
from ._timeouts import _count_timeouts
from ._usage import _pool_peaks, _quantiles


def _top_peak(data: _Data, peaks: pd.DataFrame) -> tuple[int, int | None]:
    """The busiest pool's peak in use and its capacity, from per-(process, pool) peaks."""
    if peaks.empty:
        return 0, None
    caps = _load_pools(data.conn).set_index("id")["capacity"]
    top = peaks.sort_values("peak_in_use", ascending=False).iloc[0]
    cap = caps.get(top["pool_id"], np.nan)
    return int(np.nan_to_num(top["peak_in_use"])), None if pd.isna(cap) else int(cap)


def _summary(data: _Data, leak_frame: pd.DataFrame, timeout_count: int) -> dict[str, Any]:
    if data.source == "rollups":
        return _summary_from_rollups(data, leak_frame)
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


def _leak_counts(leak_frame: pd.DataFrame) -> dict[str, int]:
    counts = {c: 0 for c in ("confirmed", "suspected", "unknown")}
    if not leak_frame.empty:
        for certainty, n in leak_frame.groupby("certainty")["count"].sum().items():
            counts[str(certainty)] = int(n)
    return counts


def _summary_from_rollups(data: _Data, leak_frame: pd.DataFrame | None = None) -> dict[str, Any]:
    """:func:`_summary` where figures come from rollups: checkouts and timeouts counted by
    them, open checkouts and leaks from the raw events kept for them, the p95 wait from the
    histograms. Without ``leak_frame`` the leaks are counted from the checkouts' classes
    (what the frame's groups add up to, without looking up their threads)."""
    rollup = data.rollup
    co = data.core
    leak_counts = _leak_counts(leak_frame) if leak_frame is not None else _class_counts(co)
    wait = rollup.total("wait_hist")
    peak, capacity = _top_peak(data, _pool_peaks(data))
    return _summary_dict(
        data,
        checkouts=int(rollup.sites["checkouts"].sum()),
        open_checkouts=int((co["outcome"] == "open").sum()) if len(co) else 0,
        peak=peak,
        capacity=capacity,
        wait_p95=_aggregate.quantiles(wait, [0.95])[0],
        timeouts=int(rollup.sites["timeouts"].sum()),
        leak_counts=leak_counts,
    )


def _class_counts(co: pd.DataFrame) -> dict[str, int]:
    """Leaked checkouts of ``co`` by certainty, from their ``leak_class``."""
    counts = {c: 0 for c in ("confirmed", "suspected", "unknown")}
    if len(co):
        for leak_class, n in co["leak_class"].value_counts().items():
            counts[CERTAINTY[str(leak_class)]] += int(n)
    return counts


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
    n_events, first_at, last_at, dropped = _event_totals(data)
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


def _event_totals(data: _Data) -> tuple[int, float | None, float | None, int]:
    """Events, first and last event time and records dropped in the filters' scope.

    Where figures come from rollups, the scan that finds the notable checkouts counted them
    (:func:`_aggregate.notable_keys`), checking only each event's time.
    """
    if data.source == "rollups":
        data.core  # noqa: B018 - its scan counts the events
        n, first_at, last_at, dropped, bad = data.event_totals or (0, None, None, 0, 0)
        _set_ignored(data.conn, int(bad or 0))
        # Events pruned live on in the rollups: they count every event recorded, and the
        # first period with one is as close to the first event as they tell.
        pools = data.rollup.pools
        if len(pools) and _aggregate.raw_since(data.conn) is not None:  # some were pruned
            n = max(int(n or 0), int(pools["events"].fillna(0).sum()))
            start = pools["first_at"].min()
            if first_at is None or (start == start and start < first_at):
                first_at = float(start)
        return int(n or 0), first_at, last_at, int(dropped or 0)
    cond, params = _event_filter(data)
    return data.conn.execute(
        "SELECT COUNT(*), MIN(at), MAX(at), COALESCE(SUM(CASE WHEN kind = 'dropped' "
        f"THEN count END), 0) FROM events WHERE 1 {cond}",
        params,
    ).fetchone()


def _set_ignored(conn: sqlite3.Connection, n: int) -> None:
    """Record ``n`` as the events set aside on this connection (unless counted already)."""
    try:
        conn.execute("CREATE TEMP TABLE poolscope_ignored (events INTEGER NOT NULL)")
    except sqlite3.OperationalError:
        return
    conn.execute("INSERT INTO poolscope_ignored VALUES (?)", (n,))


def summary(conn: sqlite3.Connection, filters: Filters = Filters()) -> dict[str, Any]:
    """Headline numbers: processes, pools, events, checkouts, peak in use (of the busiest
    pool in one process) and its capacity, overall p95 wait, timeouts, leaked checkouts by
    certainty (``confirmed_leaks``, ``suspected_leaks``, ``unknown_leaks``) and records the
    recorder dropped.

    Without a time window it is counted from per-pool aggregates, never pairing every
    checkout with its return (see :func:`_fast_summary`); the values are the same.
    """
    data = _load(conn, filters)
    if data.source == "rollups":
        return _summary_from_rollups(data)
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
