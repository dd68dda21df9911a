"""What a store locked by another process costs: records dropped (and counted), and the app's pace.

The checkout loop of ``bench/overhead.py`` (SQLAlchemy on a SQLite file) runs at full
speed throughout, in phases of ``--phase-seconds``: bare (not attached), then attached
with the store free, then attached while a *separate process* holds the store locked
(``BEGIN EXCLUSIVE``) for ``--lock-seconds``, then attached with the store free again.
Printed: each phase's loop rate, and what the store says once the writer caught up:
events written, the ``dropped`` events' total, and ``Monitor.dropped``.

    python bench/locked_store.py [--lock-seconds 5] [--phase-seconds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

import instrument
from instrument import _writer


def _lock(store: str, seconds: float, locked: multiprocessing.synchronize.Event) -> None:
    conn = sqlite3.connect(store, isolation_level=None, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    locked.set()
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def _loop(engine: sa.Engine, seconds: float) -> int:
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        n += 100
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock-seconds", type=float, default=5.0)
    parser.add_argument("--phase-seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "poolscope.db")
        engine = sa.create_engine(f"sqlite:///{tmp}/app.db")
        _loop(engine, 0.5)  # warm up
        rates = {"bare": _loop(engine, args.phase_seconds) / args.phase_seconds}
        monitor = instrument.attach(engine, store=store)
        rates["attached, store free"] = _loop(engine, args.phase_seconds) / args.phase_seconds
        monitor.flush()
        locked = multiprocessing.Event()
        locker = multiprocessing.Process(target=_lock, args=(store, args.lock_seconds, locked))
        locker.start()
        locked.wait()
        n = _loop(engine, args.lock_seconds)
        rates[f"attached, store locked {args.lock_seconds:g} s"] = n / args.lock_seconds
        locker.join()
        rates["attached, store free again"] = _loop(engine, args.phase_seconds) / args.phase_seconds
        assert monitor.flush(timeout=60)
        dropped = monitor.dropped
        _writer.shutdown_all()
        engine.dispose()
        conn = sqlite3.connect(store)
        written = conn.execute("SELECT count(*) FROM events WHERE kind != 'dropped'").fetchone()[0]
        counted = conn.execute(
            "SELECT coalesce(sum(count), 0) FROM events WHERE kind = 'dropped'"
        ).fetchone()[0]
        conn.close()
    print(f"Python {sys.version.split()[0]}, SQLAlchemy {sa.__version__}")
    for phase, rate in rates.items():
        print(f"{phase:32} {rate:9,.0f} checkouts/s  ({rate / rates['bare']:.3f} of bare)")
    print(f"records during the lock: {2 * n:,} (checkouts and checkins)")
    print(f"events written: {written:,}; dropped events' total: {counted:,}", end="; ")
    print(f"Monitor.dropped: {dropped:,}")


if __name__ == "__main__":
    main()
