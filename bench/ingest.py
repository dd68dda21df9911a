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

Beside the burst's rate, the CPU time per event of the writer threads (all of them, over
the burst) and, into a PostgreSQL store on this machine, of the server processes they
write through: measures that the machine's other load barely moves (Linux only).
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


def _thread_cpu_s(thread: Any) -> float:
    """CPU seconds ``thread`` has run so far (Linux's schedstat); 0 elsewhere."""
    return _cpu_s(f"/proc/self/task/{getattr(thread, 'native_id', None)}/schedstat")


def _cpu_s(path: str) -> float:
    try:
        with open(path) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _backend_cpu_s(writer: Any) -> float:
    """CPU seconds of the server process of ``writer``'s PostgreSQL connection (of any user;
    on this machine), else 0."""
    conn = getattr(writer, "_pg", None)
    try:
        pid = int(conn.info.backend_pid)  # type: ignore[union-attr]
    except Exception:
        return 0.0
    return _cpu_s(f"/proc/{pid}/schedstat")


def burst(tmp: Path, n: int, store: Any = None) -> tuple[float, float, float]:
    """Events per second persisted: ``n`` records queued as fast as the queue takes them;
    with the writer thread's and its server process's CPU µs per event."""
    start, end, writer_s, server_s = _burst(tmp, n, store)
    return n / (end - start), writer_s / n * 1e6, server_s / n * 1e6


def _burst(
    tmp: Path, n: int, store: Any = None, ready: Any = None
) -> tuple[float, float, float, float]:
    store = tmp / "burst.db" if store is None else store
    engine = sa.create_engine(f"sqlite:///{tmp}/app.db")
    monitor = instrument.attach(engine, store=_given(store), name="burst")
    monitor.flush()
    records = _records(monitor, n)
    writer = monitor._writer
    room = _writer.MAX_QUEUE_VALUES // 2
    if ready is not None:
        ready.wait()
    cpu0, server0 = _thread_cpu_s(writer._thread), _backend_cpu_s(writer)
    t0 = time.time()
    for r in records:  # as fast as the writer takes them, never past the queue's bound
        if len(writer.queue) > room:
            while len(writer.queue) > room // 2:
                time.sleep(0.001)
        writer.emit(r)
    monitor.flush(timeout=None)
    t1 = time.time()
    writer_s = _thread_cpu_s(writer._thread) - cpu0
    server_s = _backend_cpu_s(writer) - server0
    counted = _count(store, monitor.store_ids[0])
    assert counted == n, (counted, n)
    monitor.detach()
    return t0, t1, writer_s, server_s


def _burst_worker(args: tuple[str, int, str, Any]) -> tuple[float, float, float, float]:
    tmp, n, url, ready = args
    return _burst(Path(tmp), n, parse_store(url), ready)


def burst_processes(tmp: Path, n: int, store: Any, processes: int) -> tuple[float, float, float]:
    """Events per second persisted by ``processes`` processes bursting at once; with the
    writer threads' and their server processes' CPU µs per event."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        ready = manager.Barrier(processes)
        dirs = [tmp / f"p{i}" for i in range(processes)]
        for d in dirs:
            d.mkdir()
        jobs = [(str(d), n // processes, str(_given(store)), ready) for d in dirs]
        with context.Pool(processes) as pool:
            spans = pool.map(_burst_worker, jobs)
    total = (n // processes) * processes
    rate = total / (max(span[1] for span in spans) - min(span[0] for span in spans))
    return rate, sum(s[2] for s in spans) / total * 1e6, sum(s[3] for s in spans) / total * 1e6


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


def _cpu(writer_us: float, server_us: float) -> str:
    text = f"; writer thread CPU {writer_us:.2f} µs/event" if writer_us else ""
    return text + (f", its server process {server_us:.2f} µs/event" if server_us else "")


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
            rate, writer_us, server_us = burst_processes(
                Path(tmp), args.events, store, args.processes
            )
            print(
                f"burst:  {args.events:,} events from {args.processes} processes persisted "
                f"at {rate:,.0f} events/s{_cpu(writer_us, server_us)}"
            )
            if isinstance(store, PostgresStore):
                _reset(store)
            return 0
        rate, writer_us, server_us = burst(Path(tmp), args.events, store)
        print(
            f"burst:  {args.events:,} events persisted at {rate:,.0f} events/s"
            f"{_cpu(writer_us, server_us)}"
        )
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
