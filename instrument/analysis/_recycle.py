"""Recycle and pre-ping advice: how old and how long idle connections were when they were
invalidated, which of those were disconnects, and what ``pool_recycle`` or
``pool_pre_ping`` would have cost on the recorded checkouts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .._store import has_column
from ._load import _Data, _event_scope, _event_window, _frame, _in_list

RECYCLE_MARGIN = 0.9
"""The advised ``pool_recycle`` is this fraction of the shortest idle time at a disconnect
(rounded down), so that connections are replaced before the server or network drops them."""


def _nice_floor(seconds: float) -> int | None:
    """``seconds`` rounded down to a round figure: a minute above 10 min, 10 s above one."""
    if seconds >= 600:
        return int(seconds // 60 * 60)
    if seconds >= 60:
        return int(seconds // 10 * 10)
    if seconds >= 1:
        return int(seconds)
    return None  # below a second: pool_recycle cannot help, only pre_ping


def about(seconds: float) -> str:
    """``seconds`` as a person says it: ``45 s``, ``10 min``, ``2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _pre_ping(data: _Data, pool_ids: list[int]) -> bool | None:
    """Whether ``pool_pre_ping`` was on: ``None`` where the store does not say (its pool
    rows were written before poolscope recorded it)."""
    if not has_column(data.conn, "pools", "pre_ping"):
        return None
    rows = data.conn.execute(
        f"SELECT pre_ping FROM pools WHERE pre_ping IS NOT NULL{_in_list('id', pool_ids)}"
    ).fetchall()
    if not rows:
        return None
    return any(bool(r[0]) for r in rows)


def _recycle(data: _Data, pool_ids: list[int], recycle_s: float | None) -> dict[str, Any] | None:
    """The ``recycle`` entry of one pool name's sizing; ``None`` without an invalidation in
    the window (nothing to advise on).

    Each invalidation's connection (process and connection id) gives its age (invalidated
    at − connected at) and how long it sat idle before the checkout that found it broken
    (that checkout's time, or the invalidation's for one caught by ``pool_pre_ping``
    before the checkout, − its previous return to the pool, or its connect). The advised
    ``pool_recycle`` is below the shortest idle at a disconnect: a connection idle that
    long is at least that old, so it is replaced at checkout before it can be dropped.
    """
    scope, window, params = _scope(data, pool_ids)
    until = data.filters.until
    inv = _frame(
        "SELECT process_id, pool_id, at, connection_id, checkout_id, count FROM events "
        f"WHERE kind = 'invalidate'{scope}{window} ORDER BY at",
        data.conn,
        params,
    )
    if inv.empty:
        return None
    # The history of the connections invalidated, from before the window too: their
    # connect and their returns to the pool.
    keys = inv.dropna(subset=["connection_id"])[["process_id", "connection_id"]]
    keys = keys.drop_duplicates().astype("int64")
    history = pd.DataFrame(columns=["process_id", "connection_id", "kind", "at"])
    if len(keys):
        # Connection ids are per process: read those ids, keep the (process, id) pairs.
        ids = sorted({int(c) for c in keys["connection_id"]})
        history = _frame(
            "SELECT process_id, connection_id, kind, at FROM events "
            f"WHERE kind IN ('connect', 'checkin'){_in_list('connection_id', ids)}{scope}"
            + (" AND at <= ?" if until is not None else ""),
            data.conn,
            [until] if until is not None else [],
        )
        wanted = pd.MultiIndex.from_frame(keys)
        mine = pd.MultiIndex.from_frame(history[["process_id", "connection_id"]].astype("int64"))
        history = history[mine.isin(wanted)]
    found = _frame(
        "SELECT process_id, pool_id, checkout_id, at FROM events WHERE kind = 'checkout' "
        f"AND checkout_id IN ({', '.join(str(int(c)) for c in inv['checkout_id'].dropna())})"
        f"{scope}"
        if inv["checkout_id"].notna().any()
        else "SELECT NULL AS process_id, NULL AS pool_id, NULL AS checkout_id, NULL AS at WHERE 0",
        data.conn,
    )
    checked_out = {
        (int(r.process_id), int(r.pool_id), int(r.checkout_id)): float(r.at)
        for r in found.itertuples(index=False)
    }
    connects: dict[tuple[int, int], float] = {}
    returns: dict[tuple[int, int], list[float]] = {}
    for r in history.itertuples(index=False):
        key = (int(r.process_id), int(r.connection_id))
        if r.kind == "connect":
            connects[key] = float(r.at)
        else:
            returns.setdefault(key, []).append(float(r.at))
    ages, idles, disconnect = [], [], []
    for r in inv.itertuples(index=False):
        disconnect.append(r.count == 1)
        key = (int(r.process_id), int(r.connection_id)) if pd.notna(r.connection_id) else None
        connected = connects.get(key) if key is not None else None
        found_at = (
            checked_out.get((int(r.process_id), int(r.pool_id), int(r.checkout_id)), r.at)
            if pd.notna(r.checkout_id)
            else r.at
        )
        before = [t for t in returns.get(key, ()) if t <= found_at] if key is not None else []
        since_use = max(before) if before else connected
        ages.append(r.at - connected if connected is not None else math.nan)
        idles.append(found_at - since_use if since_use is not None else math.nan)
    age = np.array(ages, "float64")
    idle = np.array(idles, "float64")
    dropped = np.array(disconnect, bool)
    idle_dropped = idle[dropped & ~np.isnan(idle)]
    shortest = float(idle_dropped.min()) if len(idle_dropped) else None
    advised = _nice_floor(shortest * RECYCLE_MARGIN) if shortest is not None else None
    if advised is not None and recycle_s is not None and recycle_s <= advised:
        advised = None  # pool_recycle was already below: these drops are not idle timeouts
    pings, reconnects = _costs(data, pool_ids, advised)
    return {
        "invalidations": int(len(inv)),
        "disconnects": int(dropped.sum()),
        "median_idle_s_at_disconnect": float(np.median(idle_dropped))
        if len(idle_dropped)
        else None,
        "min_idle_s_at_disconnect": shortest,
        "max_age_s": float(np.nanmax(age)) if np.isfinite(age).any() else None,
        "pool_recycle_s": recycle_s,
        "pre_ping": _pre_ping(data, pool_ids),
        "recommended_pool_recycle_s": advised,
        "pre_ping_cost": {"pings": pings, "recycle_reconnects": reconnects},
    }


def _scope(data: _Data, pool_ids: list[int]) -> tuple[str, str, list[Any]]:
    """SQL conditions for the events of ``pool_ids`` in the filters' processes, and for
    the filters' window, with the window's parameters."""
    return (_event_scope(data, pool_ids), *_event_window(data))


def _costs(data: _Data, pool_ids: list[int], recycle: int | None) -> tuple[int, int | None]:
    """Pings ``pool_pre_ping`` makes on the window's checkouts (one per checkout of a
    connection it did not just open) and the reconnects ``pool_recycle=recycle`` would
    cost (checkouts of a connection older than that, each replacing it: its age counts
    again from there)."""
    scope, window, params = _scope(data, pool_ids)
    [(pings,)] = data.conn.execute(
        f"SELECT count(*) - count(connect_s) FROM events WHERE kind = 'checkout'{scope}{window}",
        params,
    ).fetchall()
    if recycle is None:
        return int(pings or 0), None
    connects = {
        (p, c): at
        for p, c, at in data.conn.execute(
            "SELECT process_id, connection_id, at FROM events WHERE kind = 'connect' "
            f"AND connection_id IS NOT NULL{scope}"
        )
    }
    cursor = data.conn.execute(
        "SELECT process_id, connection_id, at FROM events WHERE kind = 'checkout' "
        f"AND connection_id IS NOT NULL{scope}{window} ORDER BY process_id, connection_id, at",
        params,
    )
    reconnects = 0
    last_key, born = None, 0.0
    for p, c, at in cursor:
        key = (p, c)
        if key != last_key:
            last_key = key
            born = connects.get(key, at)
        if at - born > recycle:
            reconnects += 1
            born = at
    return int(pings or 0), reconnects


def recycle_sentence(recycle: dict[str, Any]) -> str:
    """The SIZING paragraph's sentence on disconnects; empty without one."""
    n = recycle["disconnects"]
    if not n:
        return ""
    median = recycle["median_idle_s_at_disconnect"]
    shortest = recycle["min_idle_s_at_disconnect"]
    advised = recycle["recommended_pool_recycle_s"]
    cost = recycle["pre_ping_cost"]
    were = f"{n} connection{' was' if n == 1 else 's were'} dropped"
    idle = f" after about {about(median)} idle" if median is not None else ""
    pings = f"{cost['pings']:,} ping{'' if cost['pings'] == 1 else 's'} over the window"
    recycling = (
        f"pool_recycle={advised}: {cost['recycle_reconnects']:,} reconnect"
        f"{'' if cost['recycle_reconnects'] == 1 else 's'}"
        if advised is not None
        else ""
    )
    if recycle["pre_ping"]:
        text = (
            f" {were}{idle}; pool_pre_ping=True is already on and replaced them at checkout "
            f"(one ping per checkout: {pings})"
        )
        if recycling:
            text += f"; {recycling} would replace them before they are dropped instead"
        return text + "."
    if advised is not None:
        below = f"{shortest:.0f}" if shortest >= 100 else f"{shortest:.3g}"
        return (
            f" {were}{idle}; set pool_recycle below {below} or pool_pre_ping=True "
            f"(pre_ping: one ping per checkout, {pings}; {recycling})."
        )
    return f" {were}{idle}; set pool_pre_ping=True (one ping per checkout, {pings})" + (
        f": pool_recycle={recycle['pool_recycle_s']:g} did not prevent it."
        if recycle["pool_recycle_s"] is not None
        else "."
    )
