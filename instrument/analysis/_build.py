"""The JSON report (schema ``poolscope.report/1``) assembled from every question's answer."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from . import _aggregate
from ._diagnosis import diagnosis_of, leak_diagnoses
from ._leaks import _leaks
from ._load import _Data, _load, _load_pools
from ._model import _PERCENTILE_COLUMNS, REPORT_SCHEMA, Filters, Report, iso
from ._sites import _sites
from ._sizing import _first_number, _sizing
from ._summary import _summary
from ._timeouts import _missing, _timeouts
from ._usage import _percentiles, _percentiles_from_rollups, _pool_peaks, _utilization


def _clean(value: Any) -> Any:
    """Make a value JSON-ready: numpy scalars to Python, NaN to ``None``."""
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:  # most values: as they are
        return value
    if kind is float:
        return None if math.isnan(value) or math.isinf(value) else value
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
) -> Report:
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
    if data.source == "rollups":
        by_pool = _percentiles_from_rollups(data, "pool").set_index("pool")
    else:
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
            "diagnosis": diagnosis,
        }
        for r, diagnosis in zip(
            leak_frame.itertuples(index=False), leak_diagnoses(data, leak_frame), strict=True
        )
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
                    "diagnosis": diagnosis_of(data, r.process_id, r.pool_id, h["checkout_id"]),
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
    report["source"] = _source(data)
    if with_utilization:
        report["utilization"] = _utilization_series(data)
    summary_ = report["summary"]
    summary_["first_event_at"] = iso(summary_["first_event_at"])
    summary_["last_event_at"] = iso(summary_["last_event_at"])
    return _clean(report)


def _source(data: _Data) -> dict[str, Any]:
    """Where the report's figures come from (see docs/report-json.md, ``source``)."""
    rollups = data.source == "rollups"
    since = _aggregate.raw_since(data.conn)
    return {
        "figures": data.source,
        "percentiles": "histograms" if rollups else "raw_events",
        "percentile_relative_error": _aggregate.HISTOGRAM_RELATIVE_ERROR if rollups else 0.0,
        "findings": "raw_events",
        "replay": "raw_events" if not rollups else None,
        "raw_since": iso(since) if since is not None else None,
        "notable_dropped": _aggregate.notable_dropped(data.conn, data.filters.processes),
    }


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
