"""Call sites ranked by how much pool time their checkouts held."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd

from ._leaks import _stacks_of
from ._load import _Data, _empty, _load
from ._model import _SITE_COLUMNS, Filters


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
