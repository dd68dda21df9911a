"""Pool timeouts, each with the checkouts that held the pool at that moment."""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

import numpy as np
import pandas as pd

from ._load import _all_pool_names, _Data, _empty, _event_filter, _frame, _load, _lookup_threads
from ._model import _TIMEOUT_COLUMNS, Filters


def _timeouts(data: _Data) -> pd.DataFrame:
    if data._timeouts is not None:
        return data._timeouts
    cond, params = _event_filter(data, "e")
    if data.source == "rollups":
        data.core  # noqa: B018 - its scan finds the timeouts' row ids too
        ids = data.timeout_ids or []
        cond += f" AND e.id IN ({', '.join(str(i) for i in ids)})" if ids else " AND 0"
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


def _count_timeouts(data: _Data) -> int:
    cond, params = _event_filter(data)
    return int(
        data.conn.execute(
            f"SELECT COUNT(*) FROM events WHERE kind = 'timeout' {cond}", params
        ).fetchone()[0]
    )
