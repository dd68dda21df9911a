"""Why a long hold was held: the ``diagnoses`` rows, as each leak group's and timeout
holder's ``diagnosis`` (see DIAGNOSIS_KINDS)."""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

import pandas as pd

from ._load import _Data, _load
from ._model import Filters, iso

DIAGNOSIS_KINDS = ("slow_sql", "idle_in_transaction", "idle", "lock_wait")
"""``slow_sql``: held mostly running statements; ``idle_in_transaction``: mostly idle with a
transaction open; ``idle``: mostly idle outside one; ``lock_wait``: the server saw it
waiting on a lock another backend held."""

_SERVER_KINDS = {"active": "slow_sql", "idle in transaction": "idle_in_transaction"}


def kind_of(d: dict[str, Any]) -> str | None:
    """The diagnosis's kind: a lock wait the server saw, else the largest part of the
    breakdown, else the server's state; ``None`` when neither says anything."""
    server = d.get("server") or {}
    if server.get("wait_event_type") == "Lock" and server.get("state") == "active":
        return "lock_wait"
    parts = {
        "slow_sql": d.get("sql_s"),
        "idle_in_transaction": d.get("idle_in_transaction_s"),
        "idle": d.get("idle_s"),
    }
    if all(v is not None for v in parts.values()):
        return max(parts, key=lambda k: parts[k])  # type: ignore[return-value,arg-type]
    state = server.get("state")
    if state is None:
        return None
    if state.startswith("idle in transaction"):
        return "idle_in_transaction"
    return _SERVER_KINDS.get(state, "idle" if state == "idle" else None)


def _num(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _diagnoses(data: _Data) -> dict[tuple[int, int, int], dict[str, Any]]:
    """Every diagnosis in the store, by (process id, pool id, checkout id); cached."""
    cached = getattr(data, "_diagnosis_cache", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    found: dict[tuple[int, int, int], dict[str, Any]] = {}
    conn = data.conn
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'diagnoses'"
    ).fetchone()
    if has is not None:
        rows = conn.execute(
            "SELECT process_id, pool_id, checkout_id, hold_s, complete, statements, sql_s, "
            "idle_in_transaction_s, idle_s, server_at, server_pid, server_state, xact_start, "
            "state_change, wait_event_type, wait_event, query, blocked_by FROM diagnoses"
        ).fetchall()
        for r in rows:
            server = None
            if r[9] is not None:
                server = {
                    "at": iso(r[9]),
                    "pid": r[10],
                    "state": r[11],
                    "xact_start": iso(r[12]),
                    "state_change": iso(r[13]),
                    "wait_event_type": r[14],
                    "wait_event": r[15],
                    "query": r[16],
                }
            blocked = json.loads(r[17]) if r[17] else []
            d: dict[str, Any] = {
                "kind": None,
                "held_s": _num(r[3]),
                "complete": bool(r[4]),
                "statements": r[5],
                "sql_s": _num(r[6]),
                "idle_in_transaction_s": _num(r[7]),
                "idle_s": _num(r[8]),
                "server": server,
                "blocked_by": [{"site": b.get("site"), "pid": b.get("pid")} for b in blocked],
            }
            d["kind"] = kind_of(d)
            found[(int(r[0]), int(r[1]), int(r[2]))] = d
    data._diagnosis_cache = found  # type: ignore[attr-defined]
    return found


def diagnosis_of(data: _Data, process_id: Any, pool_id: Any, checkout_id: Any) -> Any:
    """The diagnosis of one checkout, or ``None``."""
    if any(_num(v) is None for v in (process_id, pool_id, checkout_id)):
        return None
    return _diagnoses(data).get((int(process_id), int(pool_id), int(checkout_id)))


def leak_diagnoses(data: _Data, leak_frame: pd.DataFrame) -> list[dict[str, Any] | None]:
    """For each leak group of ``leak_frame`` (in its order), the diagnosis of its longest
    diagnosed hold; ``None`` where none of its checkouts has one."""
    found = _diagnoses(data)
    if not found or leak_frame.empty:
        return [None] * len(leak_frame)
    co = data.core
    leaked = co[co["leak_class"].notna()]
    best: dict[tuple[Any, Any, Any], tuple[float, dict[str, Any]]] = {}
    for r in leaked[
        ["leak_class", "pool", "fingerprint", "process_id", "pool_id", "checkout_id", "hold_s"]
    ].itertuples(index=False):
        d = found.get((int(r.process_id), int(r.pool_id), int(r.checkout_id)))
        if d is None:
            continue
        key = (r.leak_class, r.pool, r.fingerprint)
        held = _num(r.hold_s)
        held = float(held) if held is not None else float(d.get("held_s") or 0.0)
        if key not in best or held > best[key][0]:
            best[key] = (held, d)
    return [
        best.get((r.leak_class, r.pool, r.fingerprint), (0.0, None))[1]
        for r in leak_frame.itertuples(index=False)
    ]


_DIAGNOSIS_COLUMNS = [
    "process_id", "pool_id", "checkout_id", "pool", "leak_class", "fingerprint", "site",
    "hold_s", "kind", "diagnosis",
]  # fmt: skip


def diagnoses(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Every diagnosed checkout in the filters: one row per checkout with its pool, leak
    class (NaN where it is no leak), fingerprint, site, hold, ``kind`` and the whole
    ``diagnosis`` dict (as in the JSON report), longest held first.

    .. versionadded:: 0.2
    """
    data = _load(conn, filters)
    found = _diagnoses(data)
    co = data.core
    if not found or co.empty:
        return pd.DataFrame(columns=_DIAGNOSIS_COLUMNS)
    keys = list(zip(co["process_id"], co["pool_id"], co["checkout_id"], strict=True))
    mask = [(int(p), int(q), int(c)) in found for p, q, c in keys]
    rows = co[mask]
    out = rows[["process_id", "pool_id", "checkout_id", "pool", "leak_class", "fingerprint",
                "site", "hold_s"]].copy()  # fmt: skip
    for col in ("pool", "leak_class", "fingerprint", "site"):
        out[col] = out[col].astype("object")
    out["diagnosis"] = [
        found[(int(p), int(q), int(c))]
        for p, q, c in zip(out["process_id"], out["pool_id"], out["checkout_id"], strict=True)
    ]
    out["kind"] = [d["kind"] for d in out["diagnosis"]]
    out = out.sort_values("hold_s", ascending=False, na_position="last")
    return out[_DIAGNOSIS_COLUMNS].reset_index(drop=True)
