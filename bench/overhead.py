"""Hot-path overhead: the same checkout loop bare, detached, listeners only, and fully on.

Variants: ``bare`` (no poolscope), ``detached`` (attached, then detached),
``listeners`` (attached, with the writer thread held off during the round: the
cost of the listeners and hooks alone, a stack captured at every checkout) and
``full`` (attached, the writer thread writing alongside, as in production).
Rounds of about 2 s are interleaved so that machine noise hits all variants
alike, in a new random order each time (a fixed order biased the first variant, which
always followed the last one's settling); between rounds the writer catches up and
the store's WAL is checkpointed, untimed, so that one round's backlog never slows
another variant.
Prints the median over rounds of the throughput ratio against the adjacent bare
round (higher is better; 1.0 means no cost).

    python bench/overhead.py [--seconds 20] [--round-seconds 2] [--postgres-url URL]
                             [--sqlite-only | --postgres-only]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

import instrument
from instrument import _writer

ROUND_SECONDS = 2.0  # length of one round: many times the writer's schedule delay


def _loop(
    engine: sa.Engine,
    n: int,
    monitor: instrument.Monitor | None = None,
    hold_writer: bool = False,
) -> float:
    lock = monitor._writer._io_lock if monitor is not None and hold_writer else None
    if lock is not None:
        lock.acquire()  # the writer thread waits on this lock: listeners only
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with engine.connect() as c:
                c.exec_driver_sql("select 1")
        elapsed = time.perf_counter() - t0
    finally:
        if lock is not None:
            lock.release()
    if monitor is not None:
        _settle(monitor)
    return elapsed


def _settle(monitor: instrument.Monitor) -> None:
    """Write what the writer still has queued and checkpoint the store's WAL, untimed.

    Otherwise the backlog of a ``listeners`` round (written only after it) and the
    checkpoint it calls for would land in the next variant's round. In a ``full``
    round the writer's own checkpoints are part of its cost, and are timed.
    """
    monitor.flush()
    conn = sqlite3.connect(monitor.store)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def measure(url: str, seconds: float, store: Path, round_seconds: float) -> dict[str, float]:
    """Return iterations per second for each variant, interleaved for ``seconds``."""
    bare = sa.create_engine(url)
    detached = sa.create_engine(url)
    full = sa.create_engine(url)
    instrument.attach(detached, store=store, name="detached").detach()
    monitor = instrument.attach(full, store=store, name="full")
    engines = {"bare": bare, "detached": detached, "listeners": full, "full": full}
    for engine in engines.values():  # warm up: connections made, stacks interned
        _loop(engine, 200)
    per_round = max(100, int(round_seconds * 200 / _loop(bare, 200)))
    rates: dict[str, list[float]] = {k: [] for k in engines}
    ratios: dict[str, list[float]] = {k: [] for k in engines if k != "bare"}
    order = list(engines)
    shuffle = random.Random(0).shuffle  # the same orders in every run
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        shuffle(order)
        for name in order:
            engine = engines[name]
            seconds_taken = _loop(
                engine,
                per_round,
                monitor if engine is full else None,
                hold_writer=name == "listeners",
            )
            rates[name].append(per_round / seconds_taken)
        for name in ratios:  # adjacent rounds: drift in machine load cancels out
            ratios[name].append(rates[name][-1] / rates["bare"][-1])
    monitor.flush()
    checkouts = monitor._writer.written
    dropped = monitor.dropped
    for engine in engines.values():
        engine.dispose()
    result = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in ratios.items():
        result[f"{name}_ratio"] = statistics.median(r)
    result["rounds"] = len(rates["bare"])
    result["per_round"] = per_round
    result["events_written"] = checkouts
    result["dropped"] = dropped
    return result


def report(label: str, r: dict[str, float]) -> None:
    bare = r["bare"]
    print(f"{label}: bare {bare:,.0f} it/s ({1e6 / bare:.1f} µs/it)")
    for name in ("detached", "listeners", "full"):
        cost_us = 1e6 / r[name] - 1e6 / bare
        print(
            f"  {name:10s} {r[name]:,.0f} it/s  ratio {r[f'{name}_ratio']:.3f}  "
            f"(+{cost_us:.2f} µs/it)"
        )
    print(
        f"  {int(r['rounds'])} rounds of {int(r['per_round'])} per variant; events written "
        f"{int(r['events_written']):,}, dropped {int(r['dropped'])}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per database")
    parser.add_argument(
        "--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    parser.add_argument(
        "--round-seconds", type=float, default=ROUND_SECONDS, help="length of one round"
    )
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--postgres-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.db"
        if not args.postgres_only:
            r = measure(f"sqlite:///{tmp}/app.db", args.seconds, store, args.round_seconds)
            report("SQLite", r)
        if not args.sqlite_only:
            r = measure(args.postgres_url, args.seconds, store, args.round_seconds)
            report("PostgreSQL", r)
        _writer.shutdown_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
