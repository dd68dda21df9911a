"""Pool sizing advice: Little's law for the estimate, a replay of the recorded demand on
QueuePool's rules (:mod:`instrument._replay`) for the settings advised."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import numpy as np
import pandas as pd

from .. import _replay
from . import _aggregate
from ._load import _Data, _frame, _in_list, _load, _load_pools, _superseded
from ._model import WAITED_THRESHOLD_S, Filters
from ._recycle import _recycle, recycle_sentence
from ._timeouts import _timeouts
from ._usage import _pool_peaks


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
        n, hold, waited = _load_of(data, co, name, [int(i) for i in group["pool_id"]])
        span = float(group["span_s"].sum())
        rate = n / span if span > 0 else math.nan
        mean_in_use = rate * hold if n and span > 0 else math.nan
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
        recycle_s = pd.to_numeric(pool_rows["recycle_s"], errors="coerce").dropna()
        entry["recycle"] = recycle = (
            None
            if _no_invalidations(data, group)
            else _recycle(
                data,
                [int(i) for i in group["pool_id"]],
                float(recycle_s.min()) if len(recycle_s) else None,
            )
        )
        if recycle is not None:
            entry["advice"] += recycle_sentence(recycle)
        advice.append(entry)
    return advice


def _no_invalidations(data: _Data, group: pd.DataFrame) -> bool:
    """Whether the rollups say these pools had no invalidation (the recycle advice then has
    nothing to read; without rollups it looks)."""
    if data.source != "rollups":
        return False
    pools = data.rollup.pools
    mine = pools[pools["pool_id"].isin(group["pool_id"])]
    return not mine["invalidations"].fillna(0).sum()


def _load_of(
    data: _Data, co: pd.DataFrame, name: str, pool_ids: list[int]
) -> tuple[int, float, int]:
    """A pool name's checkouts, mean hold and checkouts that waited longer than
    :data:`WAITED_THRESHOLD_S`: from the paired checkouts, or from the rollups (the mean
    hold over the returns and the open checkouts' time so far; the waits counted from the
    histogram, to within its bucket at the threshold)."""
    if data.source != "rollups":
        mine = co[co["pool"] == name]
        n = len(mine)
        hold = float(mine["hold_s"].mean()) if n else math.nan
        return n, hold, int((mine["wait_s"] > WAITED_THRESHOLD_S).sum())
    rollup = data.rollup
    rows = rollup.sites[rollup.sites["pool_id"].isin(pool_ids)]
    opened = co[(co["outcome"] == "open").to_numpy() & co["pool_id"].isin(pool_ids).to_numpy()]
    held = opened["hold_s"].to_numpy(dtype="float64")
    n = int(rows["checkouts"].sum())
    n_holds = int(rows["returns"].sum()) + len(held)
    hold = (float(rows["hold_sum_s"].sum()) + float(held.sum())) / n_holds if n_holds else math.nan
    wait = _aggregate.merged(rollup.wait, rows.index)
    return n, hold, _aggregate.count_above(wait, WAITED_THRESHOLD_S)


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


# ---- sizing by replay ----------------------------------------------------------------------

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
    if data.source == "rollups":
        return None  # see _source: the replay needs every checkout; the report says so
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
    out: dict[str, Any] = {}
    if data.source == "rollups":
        return out  # the replay reads every checkout: not where the figures are rollups
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
