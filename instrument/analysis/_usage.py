"""How busy the pools were: utilization over time, wait and hold percentiles, peaks in use."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pandas as pd

from . import _aggregate
from ._load import _Data, _empty, _event_filter, _frame, _load, _load_pools, _superseded
from ._model import _PERCENTILE_COLUMNS, _UTILIZATION_COLUMNS, Filters
from ._timeouts import _timeouts


def _nice_interval(span: float, points: int = 300) -> float:
    raw = max(span / points, 1e-3)
    steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
             120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]  # fmt: skip
    for step in steps:
        if step >= raw:
            return float(step)
    return float(math.ceil(raw / 86400) * 86400)


_SUMMED = ["in_use", "idle", "overflow", "waiters", "pool_size", "capacity"]


def _summed_over_processes(per: pd.DataFrame, t0: float, dt: float) -> pd.DataFrame:
    """Per-process rows (``pool``, interval index ``b``, ``process_id`` and the
    :data:`_SUMMED` counts) summed per pool and interval: the utilization frame."""
    grouped = per.groupby(["pool", "b"], sort=True)
    out = grouped[_SUMMED].sum(min_count=1)
    out["processes"] = grouped["process_id"].nunique()
    out = out.reset_index()
    out["at"] = t0 + out["b"] * dt
    for m in ("in_use", "idle", "overflow", "waiters", "processes"):
        out[m] = out[m].fillna(0).astype("int64")
    out["interval_s"] = dt
    return out[[*_UTILIZATION_COLUMNS, "interval_s"]].reset_index(drop=True)


def _utilization(data: _Data, interval_s: float | None) -> pd.DataFrame:
    if interval_s is not None and not interval_s > 0:
        raise ValueError(f"interval_s must be more than 0 seconds, not {interval_s!r}.")
    if data.source == "rollups":
        return _utilization_from_rollups(data, interval_s)
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
    return _summed_over_processes(long.astype({c: "float64" for c in _SUMMED}), t0, dt)


def _utilization_from_rollups(data: _Data, interval_s: float | None) -> pd.DataFrame:
    """:func:`_utilization` from ``pool_rollups``: per bucket (a whole number of rollup
    periods) the peaks of each process's pool, summed over the processes of a name. A
    period without events holds its mean in use (the integral over the period). ``idle``
    is not rolled up: it is ``pool_size`` minus the peak in use (at least 0)."""
    f = data.filters
    cond, params = _aggregate._scope(data.pool_ids, f.processes, f.since, f.until)
    rows = _frame(
        "SELECT process_id, pool_id, start_at, period_s, peak_in_use AS in_use, "
        "peak_overflow AS overflow, peak_waiters AS waiters, in_use_s FROM pool_rollups "
        f"WHERE 1 {cond}",
        data.conn,
        params=params,
    )
    if rows.empty:
        return _empty(_UTILIZATION_COLUMNS)
    lo = float(rows["start_at"].min())
    hi = float((rows["start_at"] + rows["period_s"]).max())
    period = float(rows["period_s"].max())
    dt = float(interval_s) if interval_s else _nice_interval(hi - lo)
    dt = max(dt, period)  # never finer than the rollups
    t0 = math.floor(lo / dt) * dt
    for c in ("in_use", "overflow", "waiters", "in_use_s"):
        rows[c] = pd.to_numeric(rows[c], errors="coerce").astype("float64")
    mean = (rows["in_use_s"] / rows["period_s"]).round()
    rows["in_use"] = rows["in_use"].fillna(mean)
    rows["b"] = ((rows["start_at"] - t0) // dt).astype("int64")
    per = (
        rows.groupby(["process_id", "pool_id", "b"], sort=True)[["in_use", "overflow", "waiters"]]
        .max()
        .reset_index()
    )
    all_pools = _load_pools(data.conn).set_index("id")
    per["pool"] = per["pool_id"].map(all_pools["name"]).fillna("?")
    per["pool_size"] = per["pool_id"].map(all_pools["pool_size"]).astype("float64")
    per["capacity"] = per["pool_id"].map(all_pools["capacity"]).astype("float64")
    per["idle"] = np.maximum(per["pool_size"] - per["in_use"], 0)
    return _summed_over_processes(per, t0, dt)


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
    data = _load(conn, filters)
    if data.source == "rollups":
        return _percentiles_from_rollups(data, by)
    return _percentiles(data.core, by)


def _percentiles_from_rollups(data: _Data, by: str | None) -> pd.DataFrame:
    """:func:`_percentiles` from the rollups' histograms (within
    :data:`_aggregate.HISTOGRAM_RELATIVE_ERROR`), counts and maxima exact; open checkouts
    add their time held so far."""
    if by not in (None, "pool", "site"):
        raise ValueError(f"by must be None, 'pool' or 'site', not {by!r}.")
    from ._sites import _site_keys

    rollup = data.rollup
    rows = rollup.sites.reset_index(drop=True)
    if rows.empty:
        return (
            _empty([by, *_PERCENTILE_COLUMNS])
            if by
            else pd.DataFrame([[0] + [math.nan] * 8], columns=_PERCENTILE_COLUMNS)
        )
    keys = _site_keys(data, rows["pool_id"].to_numpy(), rows["stack_id"].to_numpy())
    rows = pd.concat([rows, keys], axis=1)
    co = data.core
    if by is None:
        opened = co[(co["outcome"] == "open").to_numpy()] if len(co) else co
        held_by = {None: opened["hold_s"].to_numpy(dtype="float64")} if len(opened) else {}
    else:
        held_by = _aggregate.open_holds(co, [by])
    groups = [(None, rows)] if by is None else list(rows.groupby(by, sort=True))
    out = []
    for key, group in groups:
        held = held_by.get(key, np.zeros(0))
        hold = _aggregate.add_values(_aggregate.merged(rollup.hold, group.index), held)
        wait = _aggregate.merged(rollup.wait, group.index)
        n = int(group["checkouts"].sum())
        if by is not None and n == 0:
            continue
        w = _aggregate.quantiles(wait, [0.5, 0.95, 0.99])
        h = _aggregate.quantiles(hold, [0.5, 0.95, 0.99])
        hold_max = np.fmax(group["hold_max_s"].max(), held.max() if len(held) else np.nan)
        row = [n, *w, float(group["wait_max_s"].max()), *h, float(hold_max)]
        out.append(row if by is None else [key, *row])
    columns = _PERCENTILE_COLUMNS if by is None else [by, *_PERCENTILE_COLUMNS]
    return pd.DataFrame(out, columns=columns)


def _pool_peaks(data: _Data) -> pd.DataFrame:
    """Per (process, pool): first and last moment seen, peak in use, peak waiting, peak
    demand (in use + waiting at one moment) and timeouts, from checkouts and timeouts.

    In-use only rises at a checkout, so the checkout rows' counts hold every peak.
    """
    if data._peaks is not None:
        return data._peaks
    if data.source == "rollups":
        data._peaks = _pool_peaks_from_rollups(data)
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


def _pool_peaks_from_rollups(data: _Data) -> pd.DataFrame:
    """:func:`_pool_peaks` from ``pool_rollups`` (peaks exact; first and last moment to the
    rollup period) and the rollups' timeouts."""
    pools = data.rollup.pools
    sites = data.rollup.sites
    timeouts = sites.groupby(["process_id", "pool_id"])["timeouts"].sum()
    out = pd.DataFrame(
        {
            "process_id": pools["process_id"].astype("int64"),
            "pool_id": pools["pool_id"].astype("int64"),
            "first_at": pools["first_at"],
            "last_at": pools["last_at"],
            "peak_in_use": pools["peak_in_use"],
            "peak_waiting": pools["peak_waiters"].fillna(0),
            "peak_demand": pools["peak_demand"],
            "timeouts": [
                int(timeouts.get((p, q), 0))
                for p, q in zip(pools["process_id"], pools["pool_id"], strict=True)
            ],
        }
    )
    return out


_HISTOGRAM_COLUMNS = ["pool", "fingerprint", "site", "measure", "value_s", "count"]


def _histograms(data: _Data) -> pd.DataFrame:
    """Per pool and call site, the wait and hold distributions as log-bucket histograms."""
    from .. import _histogram
    from ._sites import _site_keys

    out = []
    if data.source == "rollups":
        rollup = data.rollup
        rows = rollup.sites.reset_index(drop=True)
        keys = _site_keys(data, rows["pool_id"].to_numpy(), rows["stack_id"].to_numpy())
        held_by = _aggregate.open_holds(data.core, ["pool", "fingerprint"])
        for (pool, fp), group in pd.concat([rows, keys], axis=1).groupby(
            ["pool", "fingerprint"], sort=True
        ):
            site = group["site"].iloc[0]
            hists = {
                "wait": _aggregate.merged(rollup.wait, group.index),
                "hold": _aggregate.add_values(
                    _aggregate.merged(rollup.hold, group.index),
                    held_by.get((pool, fp), np.zeros(0)),
                ),
            }
            out += _hist_rows(pool, fp, site, hists)
    else:
        co = data.core
        for (pool, fp), group in co.groupby(["pool", "fingerprint"], observed=True, sort=True):
            site = str(group["site"].iloc[0])
            hists = {
                "wait": _histogram.from_values(group["wait_s"].to_numpy(dtype="float64")),
                "hold": _histogram.from_values(group["hold_s"].to_numpy(dtype="float64")),
            }
            out += _hist_rows(str(pool), str(fp), site, hists)
    return pd.DataFrame(out, columns=_HISTOGRAM_COLUMNS)


def _hist_rows(pool: str, fp: str, site: str, hists: dict) -> list[tuple]:  # type: ignore[type-arg]
    from .. import _histogram

    rows = []
    for measure, (indices, counts) in hists.items():
        values = _histogram.value_of(np.asarray(indices, dtype=np.int64))
        rows += [
            (pool, fp, site, measure, float(v), int(c))
            for v, c in zip(
                np.atleast_1d(values).tolist(), np.asarray(counts).tolist(), strict=True
            )
        ]
    return rows


def histograms(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Wait and hold distributions per pool and call site, as log-bucket histograms.

    One row per (pool, fingerprint, site, ``measure`` — ``wait`` or ``hold`` —, bucket):
    ``value_s`` is the bucket's value (within 1 % of every value in it, see
    :mod:`instrument._histogram`) and ``count`` how many checkouts it holds. Read from the
    rollups where the figures come from them, else binned from the paired checkouts; a
    checkout still open counts its hold so far.

    .. versionadded:: 0.2
    """
    return _histograms(_load(conn, filters))


_WAITS_OVER_TIME_COLUMNS = [
    "at", "pool", "count", "wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s",
]  # fmt: skip


def waits_by_interval(checkouts: pd.DataFrame, buckets: int) -> pd.DataFrame:
    """Wait percentiles per pool per interval of the paired ``checkouts`` (their span cut
    into ``buckets`` equal intervals): columns ``at`` (interval start), ``pool``,
    ``count``, ``wait_p50_s``, ``wait_p95_s``, ``wait_p99_s``, ``wait_max_s``."""
    columns = _WAITS_OVER_TIME_COLUMNS
    waits = checkouts.dropna(subset=["wait_s"]) if len(checkouts) else checkouts
    if waits.empty:
        return pd.DataFrame(columns=columns)
    start = float(waits["checked_out_at"].min())
    span = max(float(waits["checked_out_at"].max()) - start, 1e-6)
    width = span / max(buckets, 1)
    index = ((waits["checked_out_at"] - start) // width).clip(upper=buckets - 1)
    grouped = waits.assign(at=start + index * width).groupby(["at", "pool"])["wait_s"]
    frame = grouped.agg(
        count="count",
        wait_p50_s=lambda s: s.quantile(0.50),
        wait_p95_s=lambda s: s.quantile(0.95),
        wait_p99_s=lambda s: s.quantile(0.99),
        wait_max_s="max",
    )
    return frame.reset_index()[columns]


def _wait_percentiles_over_time(data: _Data, buckets: int) -> pd.DataFrame:
    columns = _WAITS_OVER_TIME_COLUMNS
    if data.source != "rollups":
        co = data.core
        return waits_by_interval(co.assign(pool=co["pool"].astype(object)), buckets)
    f = data.filters
    cond, params = _aggregate._scope(data.pool_ids, f.processes, f.since, f.until)
    rows = data.conn.execute(
        "SELECT start_at, pool_id, checkouts, wait_max_s, wait_hist FROM rollups "
        f"WHERE checkouts > 0 {cond}",
        params,
    ).fetchall()
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows, columns=["start_at", "pool_id", "checkouts", "wait_max_s", "h"])
    names = _load_pools(data.conn).set_index("id")["name"]
    frame["pool"] = frame["pool_id"].map(names).fillna("?")
    start = float(frame["start_at"].min())
    span = max(float(frame["start_at"].max()) - start, 1e-6)
    width = max(span / max(buckets, 1), 60.0)
    frame["at"] = start + ((frame["start_at"] - start) // width) * width
    frame = frame.reset_index(drop=True)
    group = frame.groupby(["at", "pool"], sort=True).ngroup().to_numpy()
    hists = _aggregate._merge_blobs(group, tuple(frame["h"]))
    out = []
    for g, ((at, pool), rows_) in enumerate(frame.groupby(["at", "pool"], sort=True)):
        q = _aggregate.quantiles(hists.get(g, _aggregate.merged({}, [])), [0.5, 0.95, 0.99])
        out.append([at, pool, int(rows_["checkouts"].sum()), *q, float(rows_["wait_max_s"].max())])
    return pd.DataFrame(out, columns=columns)


def wait_percentiles_over_time(
    conn: sqlite3.Connection, filters: Filters = Filters(), buckets: int = 40
) -> pd.DataFrame:
    """Wait percentiles per pool in about ``buckets`` equal spans of the window: the "is it
    getting worse?" view. Columns ``at`` (span start), ``pool``, ``count``, ``wait_p50_s``,
    ``wait_p95_s``, ``wait_p99_s``, ``wait_max_s``; from the rollups' histograms (spans of
    whole rollup periods) where the figures come from them, else exact.

    .. versionadded:: 0.2
    """
    return _wait_percentiles_over_time(_load(conn, filters), buckets)


def source(conn: sqlite3.Connection, filters: Filters = Filters()) -> str:
    """Where the figures of this window come from: ``raw_events`` or ``rollups`` (see
    docs/report-json.md, ``source``).

    .. versionadded:: 0.2
    """
    return _load(conn, filters).source
