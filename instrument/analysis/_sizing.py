"""Pool sizing advice by Little's law, from arrival rate, mean hold and peak demand."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import numpy as np
import pandas as pd

from ._load import _Data, _load, _load_pools, _superseded
from ._model import WAITED_THRESHOLD_S, Filters
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
        advice.append(entry)
    return advice


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
