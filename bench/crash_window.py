"""Crash window: how much a process killed under steady load loses, and what an early kill keeps.

A child process attaches poolscope to a SQLite engine, checks out 3 connections and holds
them, then checks out and returns a connection in a tight loop (the fastest steady load
there is). The parent kills it (SIGKILL by default) at a random moment 1-2 s after it is
ready, ``--kills`` times, and reads the store: the window lost is the time from the kill
back to the last checkout on disk; the checkouts lost are that window times the rate the
child ran at. Then, ``--early`` times, it kills a child ``--early-at`` seconds (0.2) after it
is ready (attached, 3 connections held) and counts the held connections found open on
disk, and the kills that found no process row (not even the schema, or no row yet).

    python bench/crash_window.py [--kills 10] [--early 3] [--early-at 0.2] [--signal KILL|TERM]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa
    import instrument

    engine = sa.create_engine(sys.argv[1], pool_size=5, max_overflow=0)
    instrument.attach(engine, store=sys.argv[2], leak_after=60)
    held = [engine.connect() for _ in range(3)]
    for conn in held:
        conn.exec_driver_sql("select 1")
    print("ready", flush=True)
    while True:
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
    """
)


def _run(directory: Path, n: int, signum: int, delay: float) -> dict[str, float]:
    store = directory / f"store-{n}.db"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, f"sqlite:///{directory / 'app.db'}", str(store)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        if proc.stdout.readline() != "ready\n":
            raise SystemExit("the child did not start")
        time.sleep(delay)
        killed_at = time.time()
        proc.send_signal(signum)
        proc.wait(30)
    conn = sqlite3.connect(store)
    try:
        count, first, last = conn.execute(
            "SELECT count(*), min(at), max(at) FROM events WHERE kind = 'checkout'"
        ).fetchone()
        held = conn.execute("SELECT count(*) FROM checkouts WHERE returned_by IS NULL").fetchone()[
            0
        ]
        rows = conn.execute("SELECT count(*) FROM processes").fetchone()[0]
    except sqlite3.OperationalError:  # nothing was written, not even the schema
        count, first, last, held, rows = 0, None, None, 0, 0
    finally:
        conn.close()
    if not count:
        return {"lost_s": float("nan"), "lost": float("nan"), "held": held, "count": 0,
                "row": rows}  # fmt: skip
    rate = (count - 3) / (last - first) if last > first else 0.0
    lost_s = killed_at - last
    return {"lost_s": lost_s, "lost": rate * lost_s, "held": held, "count": count, "row": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--early", type=int, default=3)
    parser.add_argument("--early-at", type=float, default=0.2)
    parser.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    args = parser.parse_args()
    signum = getattr(signal, f"SIG{args.signal}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        steady = [_run(directory, n, signum, random.uniform(1.0, 2.0)) for n in range(args.kills)]
        early = [_run(directory, 1000 + n, signum, args.early_at) for n in range(args.early)]
    lost_s = [r["lost_s"] for r in steady]
    lost = [r["lost"] for r in steady]
    if steady:
        print(f"{args.kills} kills (SIG{args.signal}) under steady load, 1-2 s after start:")
        print(
            f"  window lost: median {statistics.median(lost_s):.3f} s, "
            f"min {min(lost_s):.3f} s, max {max(lost_s):.3f} s"
        )
        print(
            f"  checkouts lost: median {statistics.median(lost):,.0f}, max {max(lost):,.0f} "
            f"(of {statistics.median(r['count'] for r in steady):,.0f} on disk)"
        )
    print(f"{args.early} kills {args.early_at} s after ready (attached, 3 connections held):")
    for r in early[:10]:
        print(
            f"  {r['count']:,} checkouts on disk, {r['held']} open "
            f"(3 held, maybe 1 mid-checkout), window lost {r['lost_s']:.3f} s"
        )
    print(
        f"  no process row on disk: {sum(not r['row'] for r in early)} of {len(early)}; "
        f"fewer than 3 held open: {sum(r['held'] < 3 for r in early)} of {len(early)}"
    )
    print(f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
