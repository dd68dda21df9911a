"""Writer ingest: how many events per second the background writer persists.

Two measurements on a fresh store:

1. burst: 1,000,000 checkout/checkin records queued as fast as the queue takes
   them, timed until they are all on disk (events/s persisted);
2. steady: a producer emits records at 50,000 events/s for a few seconds; every
   one must be persisted, with zero dropped.

    python bench/ingest.py [--events 1000000] [--rate 50000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

import instrument
from instrument import _writer


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


def _count(store: Path) -> int:
    with sqlite3.connect(store) as conn:
        return conn.execute(
            "SELECT count(*) FROM events WHERE kind IN ('checkout','checkin')"
        ).fetchone()[0]


def burst(tmp: Path, n: int) -> float:
    store = tmp / "burst.db"
    engine = sa.create_engine(f"sqlite:///{tmp}/app.db")
    monitor = instrument.attach(engine, store=store, name="burst")
    monitor.flush()
    records = _records(monitor, n)
    writer = monitor._writer
    room = _writer.MAX_QUEUE_VALUES // 2
    t0 = time.perf_counter()
    for r in records:  # as fast as the writer takes them, never past the queue's bound
        if len(writer.queue) > room:
            while len(writer.queue) > room // 2:
                time.sleep(0.001)
        writer.emit(r)
    monitor.flush(timeout=None)
    elapsed = time.perf_counter() - t0
    assert _count(store) == n, (_count(store), n)
    monitor.detach()
    return n / elapsed


def steady(tmp: Path, rate: int, seconds: float) -> tuple[int, int, int]:
    store = tmp / "steady.db"
    engine = sa.create_engine(f"sqlite:///{tmp}/app2.db")
    monitor = instrument.attach(engine, store=store, name="steady")
    monitor.flush()
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
    return sent, _count(store), monitor.dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rate = burst(Path(tmp), args.events)
        print(f"burst:  {args.events:,} events persisted at {rate:,.0f} events/s")
        sent, stored, dropped = steady(Path(tmp), args.rate, args.seconds)
        print(
            f"steady: {args.rate:,} events/s for {args.seconds:g} s: sent {sent:,}, "
            f"stored {stored:,}, dropped {dropped}"
        )
        _writer.shutdown_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
