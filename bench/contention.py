"""Control experiment: how much does *any* SQLite writing beside the app cost it?

The same checkout loop as ``bench/overhead.py`` (bare SQLAlchemy on SQLite, no
poolscope), timed in alternating rounds while a *separate process* is idle or
inserting poolscope-shaped rows (17 columns, 200-row statements) into its own
in-memory SQLite database at ``--rate`` rows per second. A separate process
shares no GIL and no lock with the app: what it costs is the machine's second
core doing memory-heavy work, which poolscope's writer thread also does.

    python bench/contention.py [--rate 86000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import statistics
import sys
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized

import sqlalchemy as sa

ROWS_PER_STATEMENT = 200


def _insert_rows(state: Synchronized, rate: int) -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE events (a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q)")
    row = [time.time(), 1, 1, "checkout", 3, 4, "worker-1", None]
    row += [2, 1, 0, 0, 5, 1e-4, None, None, None]
    one = "(" + ", ".join("?" * len(row)) + ")"
    sql = "INSERT INTO events VALUES " + ", ".join([one] * ROWS_PER_STATEMENT)
    params = row * ROWS_PER_STATEMENT
    statements = max(1, int(rate * 0.05 / ROWS_PER_STATEMENT))
    while state.value >= 0:
        time.sleep(0.05)
        if state.value == 1:
            db.execute("BEGIN")
            db.executemany(sql, (params for _ in range(statements)))
            db.execute("COMMIT")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=86_000, help="rows per second")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/app.db")

        def loop(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                with engine.connect() as c:
                    c.exec_driver_sql("select 1")
            return n / (time.perf_counter() - t0)

        state = multiprocessing.Value("i", 0)
        writer = multiprocessing.Process(target=_insert_rows, args=(state, args.rate))
        writer.start()
        n = max(1000, int(0.4 * loop(1000)))
        idle, busy = [], []
        for _ in range(args.rounds):
            state.value = 0
            time.sleep(0.1)
            idle.append(loop(n))
            state.value = 1
            time.sleep(0.1)
            busy.append(loop(n))
        state.value = -1
        writer.join()
        engine.dispose()
    ratio = statistics.median(b / i for b, i in zip(busy, idle, strict=True))
    print(
        f"app alone {statistics.median(idle):,.0f} it/s; beside a process inserting "
        f"{args.rate:,} rows/s: {statistics.median(busy):,.0f} it/s (ratio {ratio:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
