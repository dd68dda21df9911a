"""Time ``poolscope report --format json`` on a store of 1,000,000 synthetic events.

The store is recorded through the real writer (:func:`record`): 8 processes (each a
subprocess with 3 attached pools, its writer's clock driven by the synthetic time, raw
events all kept: ``keep_raw=inf`` and ``max_store_mb=inf``; the writer writes its rollups
too), 8 threads each,
30 call sites (real stacks captured in code compiled under ``app/*.py`` names), lognormal
hold times, pool counts computed from the overlapping checkouts, a few timeouts, leaks of
every class (gc-reclaimed, never returned at a clean exit, open at a crash: the last
process ends without a clean exit) and dropped records. The report runs in a subprocess;
its wall time, CPU time and peak RSS (its own ``rusage``, from ``os.wait4``) are printed.

``--direct`` writes the same workload as rows inserted with ``executemany`` instead
(:func:`generate`, a first-release store without rollups; the tests use it for small
stores): the report then pairs every raw checkout.

Usage::

    .venv/bin/python bench/report.py [--events 1000000] [--sites 30] [--format json]
                                     [--store PATH] [--keep] [--direct]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from instrument import _store

PROCESSES = 8
POOLS = ("orders", "users", "reports")
THREADS = 8
SITES = 30
POOL_SIZE = 5
MAX_OVERFLOW = 10
SPAN_S = 3600.0


def _stacks(sites: int = SITES) -> list[tuple[str, str, str]]:
    rows = []
    for i in range(sites):
        module = ("orders", "users", "reports", "billing", "search")[i % 5]
        site = f"app/{module}.py:{10 + i * 7} in handler_{i}"
        frames = [site, f"app/api.py:{100 + i} in route_{i}", "app/server.py:12 in dispatch"]
        rows.append((f"{i:016x}", site, json.dumps(frames)))
    return rows


def generate(path: Path, events: int, seed: int = 7, sites: int = SITES) -> dict[str, int]:
    """Write a store with about ``events`` event rows at ``path`` whose checkouts come from
    ``sites`` call sites; return counts by kind."""
    rng = np.random.default_rng(seed)
    conn = _store.connect_for_writing(path)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO stacks (fingerprint, site, frames) VALUES (?, ?, ?)", _stacks(sites)
    )
    t_start = 1_700_000_000.0
    n_groups = PROCESSES * len(POOLS)
    # Each checkout gives a checkout and a return; about 1 in 20 also opens a connection.
    per_group = int(events / n_groups / 2.05)
    counts: dict[str, int] = {}
    pool_id = 0
    for proc in range(1, PROCESSES + 1):
        crashed = proc == PROCESSES  # the last process dies without a clean exit
        ended = None if crashed else t_start + SPAN_S + 1
        conn.execute(
            "INSERT INTO processes (id, pid, host, argv, python, sqlalchemy, poolscope, "
            "started_at, heartbeat_at, ended_at, end_reason) VALUES (?, ?, 'bench', ?, "
            "'3.12', '2.1', '0.1.0', ?, ?, ?, ?)",
            (proc, 1000 + proc, json.dumps(["app.py"]), t_start, t_start + SPAN_S,
             ended, None if crashed else "exit"),
        )  # fmt: skip
        for name in POOLS:
            pool_id += 1
            conn.execute(
                "INSERT INTO pools (id, process_id, name, url, dialect, pool_class, pool_size, "
                "max_overflow, timeout_s, recycle_s, leak_after_s, created_at) VALUES "
                "(?, ?, ?, ?, 'postgresql', 'QueuePool', ?, ?, 30.0, -1, 30.0, ?)",
                (pool_id, proc, name, f"postgresql+psycopg://app:***@db/{name}", POOL_SIZE,
                 MAX_OVERFLOW, t_start),
            )  # fmt: skip
            _group(conn, rng, proc, pool_id, per_group, t_start, counts, sites)
    conn.execute("COMMIT")
    conn.close()
    return counts


def _workload(rng, n: int, t0: float, sites: int) -> dict[str, np.ndarray]:
    """One pool's synthetic checkouts: the columns :func:`_group` and :func:`_records` write."""
    starts = np.sort(rng.uniform(t0, t0 + SPAN_S, n))
    holds = rng.lognormal(mean=-3.0, sigma=1.0, size=n)  # median ~50 ms
    slow = rng.random(n) < 0.001
    holds[slow] += rng.uniform(30, 90, slow.sum())  # held_too_long
    ends = starts + holds
    gc = rng.random(n) < 0.0005
    is_open = np.zeros(n, dtype=bool)
    is_open[rng.choice(n, 3, replace=False)] = True  # never returned / open at crash
    ends[is_open] = np.inf
    waits = np.where(rng.random(n) < 0.02, rng.exponential(0.2, n), rng.exponential(5e-5, n))
    stack = rng.integers(1, sites + 1, n)
    thread = rng.integers(0, THREADS, n)
    times = np.concatenate([starts, ends[~is_open]])
    delta = np.concatenate([np.ones(n, dtype=np.int64), -np.ones((~is_open).sum(), np.int64)])
    order = np.argsort(times, kind="stable")
    in_use = np.empty(len(times), dtype=np.int64)
    in_use[order] = np.cumsum(delta[order])
    connects = rng.random(n) < 0.05
    return {"starts": starts, "holds": holds, "ends": ends, "gc": gc, "is_open": is_open,
            "waits": waits, "stack": stack, "thread": thread, "co_in_use": in_use[:n],
            "ret_in_use": in_use[n:], "connects": connects}  # fmt: skip


_SITE_SOURCE = "def handler_{i}(capture):\n    return capture()\n"


def _site_functions(sites: int) -> list[Any]:
    """One function per call site, compiled under an ``app/*.py`` name at the line
    :func:`_stacks` names, so that the writer captures real stacks with those sites."""
    out = []
    for i in range(sites):
        module = ("orders", "users", "reports", "billing", "search")[i % 5]
        line = 10 + i * 7
        code = compile("\n" * (line - 2) + _SITE_SOURCE.format(i=i), f"app/{module}.py", "exec")
        namespace: dict[str, Any] = {}
        exec(code, namespace)  # noqa: S102 - our own two lines, for their file name and line
        out.append(namespace[f"handler_{i}"])
    return out


class _SimClock:
    """The writer's wall clock: the synthetic time of the record being queued."""

    def __init__(self, start: float) -> None:
        self.t = start

    def wall(self) -> float:
        return self.t


def _record_process(path: Path, proc: int, per_group: int, seed: int, sites: int) -> None:
    """Record process ``proc``'s three pools through the real writer (run in a child)."""
    import math

    import sqlalchemy as sa

    import instrument
    from instrument import _clock, _writer

    rng = np.random.default_rng(seed * 1000 + proc)
    t0 = 1_700_000_000.0
    clock = _SimClock(t0)
    real = _writer.REAL
    _writer.REAL = _clock.Clocks(wall=clock.wall, perf=real.perf)
    tmp = path.parent  # one application database per pool name, shared by the processes
    monitors = []
    for name in POOLS:
        engine = sa.create_engine(
            f"sqlite:///{tmp / ('bench-app-' + name)}.db", poolclass=sa.pool.QueuePool,
            pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=30.0,
        )  # fmt: skip
        monitors.append(
            instrument.attach(
                engine,
                store=path,
                name=name,
                leak_after=30.0,
                keep_raw=math.inf,
                max_store_mb=math.inf,
            )
        )
    w = monitors[0]._writer
    stacks = [f(w.stacks.capture) for f in _site_functions(sites)]
    null = _writer.NULL
    threads = [f"worker-{i}" for i in range(THREADS)]
    records: list[tuple[Any, ...]] = []
    for m in monitors:
        key = m.pool_key
        g = _workload(rng, per_group, t0, sites)
        co_idle, co_over = (
            np.maximum(POOL_SIZE - g["co_in_use"], 0),
            np.maximum(g["co_in_use"] - POOL_SIZE, 0),
        )
        base = key * 10_000_000  # checkout ids grow with time in each pool
        cid = 0
        for i in range(per_group):
            sid, th, at = (
                stacks[int(g["stack"][i]) - 1],
                threads[int(g["thread"][i])],
                float(g["starts"][i]),
            )
            u, idle, over = int(g["co_in_use"][i]), int(co_idle[i]), int(co_over[i])
            if g["connects"][i]:
                cid += 1
                records.append((at, key, "connect", cid, null, th, null, u - 1, idle, over, 0,
                                sid, null, 0.004, null, null))  # fmt: skip
            records.append((at, key, "checkout", cid or 1, base + i + 1, th, null, u, idle, over,
                            0, sid, float(g["waits"][i]), 0.004 if g["connects"][i] else null,
                            null, null))  # fmt: skip
        ridx = np.nonzero(~g["is_open"])[0]
        for j, i in enumerate(ridx.tolist()):
            u = int(g["ret_in_use"][j])
            records.append((float(g["ends"][i]), key, "gc_checkin" if g["gc"][i] else "checkin",
                            1, base + i + 1, threads[int(g["thread"][i])], null, u,
                            max(POOL_SIZE - u, 0), max(u - POOL_SIZE, 0), 0,
                            stacks[int(g["stack"][i]) - 1], null, null, float(g["holds"][i]),
                            null))  # fmt: skip
        for i in np.argsort(g["co_in_use"])[-5:].tolist():  # timeouts at the busiest moments
            records.append((float(g["starts"][i]) + 0.001, key, "timeout", null, null, "worker-0",
                            null, int(g["co_in_use"][i]), 0, int(co_over[i]), 1,
                            stacks[int(g["stack"][i]) - 1], 30.0, null, null, 2))  # fmt: skip
        records.append((t0 + SPAN_S / 2, key, "dropped", null, null, null, null, 0, 0, 0, 0,
                        null, null, null, null, 17))  # fmt: skip
    records.sort(key=lambda r: r[0])
    queue = w.queue
    room = _writer.MAX_QUEUE_VALUES // 2
    for r in records:
        clock.t = r[0]
        queue.extend(r)
        if len(queue) > room:
            while len(queue) > room // 4:
                time.sleep(0.002)
    clock.t = t0 + SPAN_S + 1
    for m in monitors:
        m.flush(timeout=None)
    if proc == PROCESSES:  # the last process dies without a clean exit
        os._exit(0)
    for m in monitors:
        m.detach()
    _writer.shutdown_all(timeout=120.0, reason="exit")


def record(path: Path, events: int, seed: int = 7, sites: int = SITES) -> None:
    """Record about ``events`` events at ``path`` through the real writer: one child process
    per recording process, two at a time."""
    per_group = int(events / (PROCESSES * len(POOLS)) / 2.05)
    running: list[subprocess.Popen[bytes]] = []
    for proc in range(1, PROCESSES + 1):
        running.append(subprocess.Popen(
            [sys.executable, __file__, "--record-process", str(proc), "--store", str(path),
             "--per-group", str(per_group), "--seed", str(seed), "--sites", str(sites)]
        ))  # fmt: skip
        if len(running) >= 2 or proc == PROCESSES:
            for child in running:
                if child.wait() != 0:
                    raise SystemExit(f"recording process failed with {child.returncode}")
            running = []


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())


def _group(
    conn, rng, proc: int, pool_id: int, n: int, t0: float, counts: dict[str, int], sites: int
) -> None:
    starts = np.sort(rng.uniform(t0, t0 + SPAN_S, n))
    holds = rng.lognormal(mean=-3.0, sigma=1.0, size=n)  # median ~50 ms
    slow = rng.random(n) < 0.001
    holds[slow] += rng.uniform(30, 90, slow.sum())  # held_too_long
    ends = starts + holds
    kinds = np.full(n, "checkin", dtype=object)
    kinds[rng.random(n) < 0.0005] = "gc_checkin"
    is_open = np.zeros(n, dtype=bool)
    is_open[rng.choice(n, 3, replace=False)] = True  # never returned / open at crash
    ends[is_open] = np.inf
    waits = np.where(rng.random(n) < 0.02, rng.exponential(0.2, n), rng.exponential(5e-5, n))
    stack = rng.integers(1, sites + 1, n)
    threads = np.array([f"worker-{i}" for i in range(THREADS)], dtype=object)[
        rng.integers(0, THREADS, n)
    ]
    ids = np.arange(1, n + 1)
    # Pool counts: in use after each event = running sum of +1 (checkout) / -1 (return).
    times = np.concatenate([starts, ends[~is_open]])
    delta = np.concatenate([np.ones(n, dtype=np.int64), -np.ones((~is_open).sum(), np.int64)])
    order = np.argsort(times, kind="stable")
    in_use_sorted = np.cumsum(delta[order])
    in_use = np.empty_like(in_use_sorted)
    in_use[order] = in_use_sorted
    co_in_use, ret_in_use = in_use[:n], in_use[n:]
    connects = rng.random(n) < 0.05

    def counts_of(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.maximum(POOL_SIZE - u, 0), np.maximum(u - POOL_SIZE, 0)

    idle, over = counts_of(co_in_use)
    rows = []
    cid = 0
    for i in range(n):  # the synthetic workload, not the code under test
        if connects[i]:
            cid += 1
            rows.append((starts[i], proc, pool_id, "connect", cid, None, threads[i], None,
                         int(co_in_use[i]) - 1, int(idle[i]), int(over[i]), 0, None, None,
                         0.004, None, None))  # fmt: skip
        rows.append((starts[i], proc, pool_id, "checkout", cid or 1, int(ids[i]), threads[i],
                     None, int(co_in_use[i]), int(idle[i]), int(over[i]), 0, int(stack[i]),
                     float(waits[i]), 0.004 if connects[i] else None, None, None))  # fmt: skip
    ridx = np.nonzero(~is_open)[0]
    r_idle, r_over = counts_of(ret_in_use)
    for j, i in enumerate(ridx):
        rows.append((ends[i], proc, pool_id, kinds[i], 1, int(ids[i]), threads[i], None,
                     int(ret_in_use[j]), int(r_idle[j]), int(r_over[j]), 0, int(stack[i]),
                     None, None, float(holds[i]), None))  # fmt: skip
    # Timeouts at the busiest moments, and a dropped-records marker.
    busiest = np.argsort(co_in_use)[-5:]
    for i in busiest:
        rows.append((starts[i] + 0.001, proc, pool_id, "timeout", None, None, "worker-0", None,
                     int(co_in_use[i]), 0, int(over[i]), 1, int(stack[i]), 30.0, None, None,
                     2))  # fmt: skip
    rows.append((t0 + SPAN_S / 2, proc, pool_id, "dropped", None, None, None, None, None, None,
                 None, None, None, None, None, None, 17))  # fmt: skip
    rows.sort(key=lambda r: r[0])
    conn.executemany(
        f"INSERT INTO events ({', '.join(_store.EVENT_COLUMNS)}) VALUES "
        f"({', '.join('?' * len(_store.EVENT_COLUMNS))})",
        rows,
    )
    for r in rows:
        counts[r[3]] = counts.get(r[3], 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=SITES, help="distinct call sites")
    parser.add_argument("--format", dest="fmt", default="json", help="report format to time")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated store")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="insert rows directly (a first-release store) instead of recording",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--record-process", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--per-group", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record_process:
        _record_process(args.store, args.record_process, args.per_group, args.seed, args.sites)
        return
    tmp = tempfile.mkdtemp(prefix="poolscope-bench-")
    store = args.store or Path(tmp) / "bench.db"
    if store.exists():
        store.unlink()
    t = time.perf_counter()
    if args.direct:
        counts = generate(store, args.events, seed=args.seed, sites=args.sites)
    else:
        record(store, args.events, seed=args.seed, sites=args.sites)
        counts = _counts(store)
    total = sum(counts.values())
    print(f"generated {total:,} events in {time.perf_counter() - t:.1f} s: {store}")
    print("  " + ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items())))
    print(f"  store size {store.stat().st_size / 1e6:.0f} MB")
    command = [sys.executable, "-m", "instrument", "report", str(store), "--format", args.fmt,
               "--output", os.devnull]  # fmt: skip
    t = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        # This child's own usage (the recording children's peak RSS is not the report's).
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            errors.seek(0)
            print(errors.read().decode(errors="replace"), file=sys.stderr)
            raise SystemExit(f"report failed with exit code {code}")
    cpu = usage.ru_utime + usage.ru_stime
    rss_mb = usage.ru_maxrss / 1024
    load = os.getloadavg()[0]
    print(
        f"poolscope report --format {args.fmt}: {elapsed:.2f} s wall, {cpu:.2f} s CPU, "
        f"peak RSS {rss_mb:.0f} MB (load average {load:.1f} on {os.cpu_count()} cores)"
    )
    if not args.keep and args.store is None:
        store.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(store) + suffix).unlink(missing_ok=True)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
