"""Writer ingest: how many events per second the background writer persists.

Two measurements on a fresh store:

1. burst: 1,000,000 checkout/checkin records queued as fast as the queue takes
   them, timed until they are all on disk (events/s persisted);
2. steady: a producer emits records at 50,000 events/s for a few seconds; every
   one must be persisted, with zero dropped.

    python bench/ingest.py [--events 1000000] [--rate 50000] [--seconds 5]
                           [--store URL] [--processes N]

``--store`` takes a PostgreSQL store's URL (``postgresql+psycopg://...?schema=...``; the
schema is dropped first and after): the same measurements into PostgreSQL. With
``--processes N`` the burst runs in N processes at once, each queueing ``events / N``,
and the rate is all of them over the wall time from the first start to the last end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import instrument
from instrument import _pg_store, _writer
from instrument._store import PostgresStore, parse_store


def _records(monitor: instrument.Monitor, n: int) -> list[tuple]:
    """``n`` records shaped like real checkout/checkin pairs of ``monitor``'s pool, absent
    values queued as ``NULL``, as the listeners queue them."""
    sid = monitor._writer.stacks.capture()
    now = time.time()
    null = _writer.NULL
    out = []
    for i in range(n // 2):
        out.append(
            (now, monitor.pool_key, "checkout", 1, i, "worker-1", null, 3, 2, 0, 0, sid,
             0.0001, null, null, null)
        )  # fmt: skip
        out.append(
            (now, monitor.pool_key, "checkin", 1, i, "worker-1", null, 2, 3, 0, 0, sid,
             null, null, 0.002, null)
        )  # fmt: skip
    return out


def _count(store: Any, process_id: int | None = None) -> int:
    where = "kind IN ('checkout','checkin')"
    if process_id is not None:
        where += f" AND process_id = {int(process_id)}"
    if isinstance(store, PostgresStore):
        with _pg_store.connect(store) as conn:
            return conn.execute(
                f'SELECT count(*) FROM "{store.schema}".events WHERE {where}'
            ).fetchone()[0]
    with sqlite3.connect(store) as conn:
        return conn.execute(f"SELECT count(*) FROM events WHERE {where}").fetchone()[0]


def _given(store: Any) -> Any:
    """``store`` as attach() takes it: a path, or the URL as given."""
    return store.url if isinstance(store, PostgresStore) else store


def _reset(store: PostgresStore) -> None:
    with _pg_store.connect(store, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')


def burst(tmp: Path, n: int, store: Any = None) -> float:
    """Events per second persisted: ``n`` records queued as fast as the queue takes them."""
    start, end = _burst(tmp, n, store)
    return n / (end - start)


def _burst(tmp: Path, n: int, store: Any = None, ready: Any = None) -> tuple[float, float]:
    store = tmp / "burst.db" if store is None else store
    engine = sa.create_engine(f"sqlite:///{tmp}/app.db")
    monitor = instrument.attach(engine, store=_given(store), name="burst")
    monitor.flush()
    records = _records(monitor, n)
    writer = monitor._writer
    room = _writer.MAX_QUEUE_VALUES // 2
    if ready is not None:
        ready.wait()
    t0 = time.time()
    for r in records:  # as fast as the writer takes them, never past the queue's bound
        if len(writer.queue) > room:
            while len(writer.queue) > room // 2:
                time.sleep(0.001)
        writer.emit(r)
    monitor.flush(timeout=None)
    t1 = time.time()
    counted = _count(store, monitor.store_ids[0])
    assert counted == n, (counted, n)
    monitor.detach()
    return t0, t1


def _burst_worker(args: tuple[str, int, str, Any]) -> tuple[float, float]:
    tmp, n, url, ready = args
    return _burst(Path(tmp), n, parse_store(url), ready)


def burst_processes(tmp: Path, n: int, store: Any, processes: int) -> float:
    """Events per second persisted by ``processes`` processes bursting at once."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        ready = manager.Barrier(processes)
        dirs = [tmp / f"p{i}" for i in range(processes)]
        for d in dirs:
            d.mkdir()
        jobs = [(str(d), n // processes, str(_given(store)), ready) for d in dirs]
        with context.Pool(processes) as pool:
            spans = pool.map(_burst_worker, jobs)
    return (n // processes) * processes / (max(e for _, e in spans) - min(s for s, _ in spans))


def steady(tmp: Path, rate: int, seconds: float, store: Any = None) -> tuple[int, int, int]:
    store = tmp / "steady.db" if store is None else store
    engine = sa.create_engine(f"sqlite:///{tmp}/app2.db")
    monitor = instrument.attach(engine, store=_given(store), name="steady")
    monitor.flush()
    before = _count(store, monitor.store_ids[0]) if monitor.store_ids else 0
    writer = monitor._writer
    chunk = rate // 100  # every 10 ms
    records = _records(monitor, chunk)
    sent = 0
    start = time.perf_counter()
    for tick in range(int(seconds * 100)):
        for r in records:
            writer.emit(r)
        sent += len(records)
        delay = start + (tick + 1) / 100 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    monitor.flush(timeout=None)
    monitor.detach()
    return sent, _count(store, monitor.store_ids[0]) - before, monitor.dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--store", help="a PostgreSQL store URL (default: a SQLite file)")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    store = parse_store(args.store) if args.store else None
    if store is not None and not isinstance(store, PostgresStore):
        parser.error("--store takes a PostgreSQL store URL")
    with tempfile.TemporaryDirectory() as tmp:
        if store is not None:
            _reset(store)
        if args.processes > 1:
            if store is None:
                store = Path(tmp) / "burst.db"
            rate = burst_processes(Path(tmp), args.events, store, args.processes)
            print(
                f"burst:  {args.events:,} events from {args.processes} processes persisted "
                f"at {rate:,.0f} events/s"
            )
            if isinstance(store, PostgresStore):
                _reset(store)
            return 0
        rate = burst(Path(tmp), args.events, store)
        print(f"burst:  {args.events:,} events persisted at {rate:,.0f} events/s")
        sent, stored, dropped = steady(Path(tmp), args.rate, args.seconds, store)
        print(
            f"steady: {args.rate:,} events/s for {args.seconds:g} s: sent {sent:,}, "
            f"stored {stored:,}, dropped {dropped}"
        )
        _writer.shutdown_all()
        if store is not None:
            _reset(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
