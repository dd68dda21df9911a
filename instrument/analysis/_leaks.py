"""Leaks: checkouts grouped by class and stack (see :data:`LEAK_CLASSES`)."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd

from ._load import _Data, _empty, _load, _lookup_threads
from ._model import _CERTAINTY_ORDER, _LEAK_COLUMNS, CERTAINTY, LEAK_CLASSES, Filters


def _stacks_of(data: _Data, fingerprints: pd.Series) -> list[list[str]]:
    """The frames (innermost first) of each fingerprint; ``[]`` for one the stacks table
    lacks."""
    frames = data.stacks.set_index("fingerprint")["frames"]
    return [json.loads(frames.get(fp, "[]")) for fp in fingerprints]


def _leaks(data: _Data) -> pd.DataFrame:
    co = data.core
    leaked = co[co["leak_class"].notna()]
    if leaked.empty:
        return _empty(_LEAK_COLUMNS)
    names = _lookup_threads(data, leaked[["process_id", "pool_id", "checkout_id"]])
    leaked = leaked.drop(columns=["thread", "task"], errors="ignore").merge(
        names, how="left", on=["process_id", "pool_id", "checkout_id"]
    )
    leaked["thread"] = leaked["thread"].astype(object).fillna("?").astype(str)
    grouped = leaked.groupby(["leak_class", "pool", "fingerprint"], observed=True, sort=False)
    out = grouped.agg(
        site=("site", "first"),
        count=("checkout_id", "size"),
        first_seen_at=("checked_out_at", "min"),
        last_seen_at=("checked_out_at", "max"),
        max_held_s=("hold_s", "max"),
        leak_after_s=("leak_after_s", "max"),
    ).reset_index()
    out["threads"] = [sorted(set(v)) for v in grouped["thread"].agg(list)]
    out["processes"] = [sorted(int(p) for p in set(v)) for v in grouped["process_id"].agg(list)]
    for col in ("leak_class", "pool", "fingerprint", "site"):
        out[col] = out[col].astype("object")
    out["certainty"] = out["leak_class"].map(CERTAINTY)
    out["stack"] = _stacks_of(data, out["fingerprint"])
    out["_c"] = out["certainty"].map(_CERTAINTY_ORDER)
    out["_k"] = out["leak_class"].map({c: i for i, c in enumerate(LEAK_CLASSES)})
    out = out.sort_values(["_c", "_k", "count", "max_held_s"], ascending=[True, True, False, False])
    return out[_LEAK_COLUMNS].reset_index(drop=True)


def leaks(conn: sqlite3.Connection, filters: Filters = Filters()) -> pd.DataFrame:
    """Leaked checkouts grouped by class, pool and stack fingerprint; most certain first.

    Classes (see :data:`LEAK_CLASSES`, :data:`CERTAINTY`):

    - ``never_returned`` (confirmed): still open when its process exited cleanly.
    - ``gc_reclaimed`` (confirmed): returned by the garbage collector, never by code.
    - ``open_at_crash`` (unknown): still open when its process died without a clean exit.
    - ``held_too_long`` (suspected): returned by code, but held longer than ``leak_after``.
    - ``open_now`` (suspected): open longer than ``leak_after`` in a live process.

    ``count`` is the number of checkouts; ``threads`` the threads that took them;
    ``processes`` the ``processes.id`` values; ``stack`` the frames, innermost (the site)
    first; ``leak_after_s`` the threshold that applied.
    """
    return _leaks(_load(conn, filters))
