"""Instructions per checkout, counted by valgrind: the hot path's cost without machine noise.

Wall-clock ratios on a shared 2-vCPU machine move by several per cent from run to
run; instruction counts do not. Each variant runs the SQLite loop of
``bench/overhead.py`` in a child interpreter under ``valgrind --tool=callgrind``,
once with no iterations and once with ``--iterations``; the difference divided by
the iterations is the cost of one iteration, start-up excluded. After the warm-up
the heap is frozen (``gc.freeze()``): otherwise how often a full collection scans
every imported module's objects moves the counts by thousands per iteration.

Variants: ``bare`` (no poolscope), ``noop`` (a checkout and a checkin listener that
do nothing: SQLAlchemy's own dispatch), ``noop-checkout`` (the checkout one alone),
``poolscope`` (attached, the C helpers on,
the writer held off), ``python`` (the same without the C helpers), and ``writer``
(what writing one event costs the writer thread, from queue to disk). For
``diagnose=``: ``noop-statement`` (a ``before_cursor_execute`` and an
``after_cursor_execute`` listener that do nothing: SQLAlchemy's slower statement path
alone), ``diagnose-off`` (``poolscope`` with ``diagnose=False``) and ``diagnose-on``
(``diagnose=True``: the breakdown's listeners); ``poolscope`` has the default.

    python bench/instructions.py [--iterations 3000] [--depth 0] [--variants a,b,...]

Needs valgrind. ``--depth`` runs the loop under that many extra Python frames.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CHILD = """
import gc, os, sys, tempfile
from pathlib import Path
import sqlalchemy as sa
from sqlalchemy import event
import instrument
from instrument import _hooks, _writer

variant, n, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tmp = tempfile.mkdtemp()
engine = sa.create_engine(f"sqlite:///{tmp}/app.db")
monitor = None
if variant in ("noop", "noop-checkout"):
    event.listen(engine, "checkout", lambda *args: None)
    if variant == "noop":
        event.listen(engine, "checkin", lambda *args: None)
elif variant == "noop-statement":
    event.listen(engine, "before_cursor_execute", lambda *args: None)
    event.listen(engine, "after_cursor_execute", lambda *args: None)
elif variant != "bare":
    if variant == "python":
        _hooks.HotPath = _hooks.TimedGet = _writer.sqlite_rows = None
    options = {"diagnose-off": {"diagnose": False}, "diagnose-on": {"diagnose": True}}
    monitor = instrument.attach(engine, store=Path(tmp) / "store.db", **options.get(variant, {}))
    monitor.flush()
    monitor._writer._io_lock.acquire()  # the writer waits: listeners only


def loop(k):
    for _ in range(k):
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")


def nest(d, k):
    return loop(k) if d == 0 else nest(d - 1, k)


nest(depth, 200)  # warm up: connection opened, stack interned
gc.freeze()  # full collections scan only what the loop makes, not every module's objects
nest(depth, 0 if variant == "writer" else n)
if variant == "writer":
    nest(depth, 1000)
    monitor._writer._io_lock.release()
    monitor.flush()  # 2,000 events written, and with n > 0 as many more again
    if n:
        monitor._writer._io_lock.acquire()
        nest(depth, n // 2)
        monitor._writer._io_lock.release()
        monitor.flush()
os._exit(0)
"""


VARIANTS = (
    "bare", "noop", "noop-checkout", "noop-statement", "poolscope", "diagnose-off",
    "diagnose-on", "python", "writer",
)  # fmt: skip


def count(variant: str, iterations: int, depth: int) -> int:
    """Instructions executed by a child running ``variant`` for ``iterations``."""
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-c", CHILD, variant, str(iterations), str(depth)],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    for line in result.stderr.splitlines():
        if "refs:" in line:
            return int(line.split("refs:")[1].replace(",", ""))
    raise RuntimeError(f"valgrind gave no count for {variant}:\n{result.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs valgrind", file=sys.stderr)
        return 2
    variants = [v for v in VARIANTS if v in args.variants.split(",") or v == "bare"]
    jobs = [(v, n) for v in variants for n in (0, args.iterations)]
    print(f"running {len(jobs)} children under valgrind (a few minutes)...", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counts = dict(
            zip(jobs, pool.map(lambda job: count(job[0], job[1], args.depth), jobs), strict=True)
        )
    per = {v: (counts[v, args.iterations] - counts[v, 0]) / args.iterations for v in variants}
    bare = per["bare"]
    print(f"instructions per iteration (depth {args.depth}, {args.iterations:,} iterations)")
    for v in [v for v in variants if v != "writer"]:
        extra = f"  +{per[v] - bare:,.0f} ({per[v] / bare - 1:+.1%})" if v != "bare" else ""
        print(f"  {v:13s} {per[v]:10,.0f}{extra}")
    if "writer" in per and "poolscope" in per:
        # writer: n/2 more loop iterations held, then written: 2 events each
        print(f"  writer        {per['writer'] - per['poolscope'] / 2:10,.0f} per event written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
