"""Call sites ranked by how much pool time their checkouts held."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd

from . import _aggregate
from ._leaks import _stacks_of
from ._load import _all_pool_names, _categorical, _Data, _empty, _load
from ._model import _SITE_COLUMNS, Filters


def _sites(data: _Data) -> pd.DataFrame:
    if data.source == "rollups":
        return _sites_from_rollups(data)
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


def _site_keys(data: _Data, pool_ids: np.ndarray, stack_ids: np.ndarray) -> pd.DataFrame:
    """Pool name, fingerprint and site of each (pool id, stack id), as the checkouts have them."""
    names = _all_pool_names(data)
    stacks = data.stacks
    return pd.DataFrame(
        {
            "pool": _categorical(pool_ids, names.index, names.to_numpy(), "?"),
            "fingerprint": _categorical(
                stack_ids, stacks["id"], stacks["fingerprint"].to_numpy(), ""
            ),
            "site": _categorical(stack_ids, stacks["id"], stacks["site"].to_numpy(), "<unknown>"),
        }
    ).astype(object)


def _sites_from_rollups(data: _Data) -> pd.DataFrame:
    """:func:`_sites` from the rollups: counts, sums and maxima exact, the p95s from their
    histograms; the checkouts still open (from the raw events) add their time held so far,
    as they do when every checkout is paired."""
    rollup = data.rollup
    rows = rollup.sites
    if rows.empty:
        return _empty(_SITE_COLUMNS)
    keys = _site_keys(data, rows["pool_id"].to_numpy(), rows["stack_id"].to_numpy())
    rows = pd.concat([rows.reset_index(drop=True), keys], axis=1)
    co = data.core
    held_by = _aggregate.open_holds(co, ["pool", "fingerprint"])
    leaks_by = (
        co[co["leak_class"].notna().to_numpy()]
        .astype({"pool": object, "fingerprint": object})
        .groupby(["pool", "fingerprint"])
        .size()
        .to_dict()
        if len(co)
        else {}
    )
    out = []
    for (pool, fp), group in rows.groupby(["pool", "fingerprint"], sort=False):
        held = held_by.get((pool, fp), np.zeros(0))
        hold = _aggregate.add_values(_aggregate.merged(rollup.hold, group.index), held)
        wait = _aggregate.merged(rollup.wait, group.index)
        n_holds = int(group["returns"].sum()) + len(held)
        total = float(group["hold_sum_s"].sum()) + float(held.sum())
        hold_max = np.fmax(group["hold_max_s"].max(), held.max() if len(held) else np.nan)
        n_leaks = int(leaks_by.get((pool, fp), 0))
        out.append(
            {
                "pool": pool,
                "fingerprint": fp,
                "site": group["site"].iloc[0],
                "checkouts": int(group["checkouts"].sum()),
                "total_hold_s": total,
                "hold_mean_s": total / n_holds if n_holds else np.nan,
                "hold_max_s": float(hold_max),
                "open": len(held),
                "leaks": n_leaks,
                "hold_p95_s": _aggregate.quantiles(hold, [0.95])[0],
                "wait_p95_s": _aggregate.quantiles(wait, [0.95])[0],
            }
        )
    frame = pd.DataFrame(out)
    frame = frame[frame["checkouts"] > 0].reset_index(drop=True)
    if frame.empty:
        return _empty(_SITE_COLUMNS)
    pool_total = frame.groupby("pool")["total_hold_s"].transform("sum")
    frame["pool_time_share"] = (frame["total_hold_s"] / pool_total.replace(0, np.nan)).fillna(0.0)
    frame["stack"] = _stacks_of(data, frame["fingerprint"])
    frame = frame.sort_values(["total_hold_s", "checkouts"], ascending=False)
    return frame[_SITE_COLUMNS].reset_index(drop=True)


def sites(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Per call site (pool and stack fingerprint): checkouts, hold and wait statistics.

    ``pool_time_share`` is the site's share of all connection-seconds held in its pool;
    ``open`` counts checkouts never returned, ``leaks`` those in any leak class. Sorted by
    ``total_hold_s``, biggest first.
    """
    return _sites(_load(conn, filters))
