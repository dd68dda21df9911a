"""The keeper's CPU time on the writer thread: rollups, notable checkouts and pruning.

Batches of checkout/checkin pairs (``--pairs`` a batch, one simulated second apart) are
inserted into a real store, then handed to the store's ``Keeper`` as the writer hands them
(``keep_raw`` 60 s), and the keeper's ``time.thread_time()`` is summed over the batches
after the first ``keep_raw`` (when each batch prunes a batch's worth of events: each event
is deleted once). ``--split`` of the checkouts are returned in the next batch;
``--age`` dates the records that many seconds back (a backlog: the writer behind by more
than ``keep_raw``, so the prune meets checkouts whose return is not written yet).

    python bench/prune.py [--pg URL] [--batches 400] [--pairs 500] [--split 0.01] [--age 0]

Printed: the keeper's CPU per batch (ms) and per event written, and what was pruned.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from instrument import _pg_store, _store
from instrument._pg_writer import PostgresKeeper, _SqliteLike
from instrument._record import RECORD_WIDTH
from instrument._retention import Keeper
from instrument._store import PostgresStore, parse_store

INSERT = (
    "INSERT INTO events (at, process_id, pool_id, kind, checkout_id, in_use, stack_id, wait_s, "
    "hold_s) VALUES (?, 1, 1, ?, ?, 1, 1, ?, ?)"
)


def _record(at: float, kind: str, cid: int, wait: Any, hold: Any) -> list[Any]:
    rec: list[Any] = [None] * RECORD_WIDTH
    rec[0:5] = [at, 1, kind, 1, cid]
    rec[7], rec[9], rec[10], rec[11], rec[12], rec[14] = 1, 0, 0, 1, wait, hold
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", help="a PostgreSQL store URL (default: a SQLite file)")
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--split", type=float, default=0.01)
    parser.add_argument("--age", type=float, default=0.0)
    args = parser.parse_args()
    keep_raw = 60.0
    conn: Any
    if args.pg:
        store = parse_store(args.pg)
        assert isinstance(store, PostgresStore)
        pg = _pg_store.connect(store, autocommit=True)
        _pg_store.ensure_schema(pg, store)
        pg.execute(f'SET search_path TO "{store.schema}"')
        pg.execute("SET synchronous_commit TO off")
        conn, keeper = _SqliteLike(pg), PostgresKeeper(keep_raw, math.inf)
    else:
        path = Path(tempfile.mkdtemp()) / "prune.db"
        conn, keeper = _store.connect_for_writing(path), Keeper(keep_raw, math.inf)
    t0 = time.time() - args.age
    keeper.start(conn, 1, t0)
    every = max(1, round(1 / args.split)) if args.split > 0 else 0
    cid, carried, cpu, measured, written = 0, [], 0.0, 0, 0
    for b in range(args.batches):
        now = t0 + b
        recs = carried
        carried = []
        for i in range(args.pairs):
            cid += 1
            at = now + i / args.pairs
            recs.append(_record(at, "checkout", cid, 0.001, None))
            ret = _record(at + 0.001, "checkin", cid, None, 0.001)
            (carried if every and cid % every == 0 else recs).append(ret)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, [(r[0], r[2], r[4], r[12], r[14]) for r in recs])
        conn.execute("COMMIT")
        flat = [v for r in recs for v in r]
        start = time.thread_time()
        keeper.after_batch(conn, flat, None, None, {1: 30.0}, now + args.age, True)
        spent = time.thread_time() - start
        written += len(recs)
        if b >= keep_raw + 10:
            cpu += spent
            measured += len(recs)
    (left,) = conn.execute("SELECT count(*) FROM events").fetchone()
    (pruned,) = conn.execute("SELECT pruned FROM retention WHERE process_id = 1").fetchone()
    n = args.batches - int(keep_raw + 10)
    print(
        f"keeper CPU {cpu / n * 1e3:.2f} ms/batch, {cpu / measured * 1e6:.2f} us/event "
        f"({n} batches measured); events written {written}, pruned {pruned}, left {left}"
    )
    if args.pg:
        pg.execute(f'DROP SCHEMA "{store.schema}" CASCADE')


if __name__ == "__main__":
    main()
