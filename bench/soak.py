"""Soak: a simulated day of a busy pool through the real writer, with retention on.

24 simulated hours (``--hours``) at 500 checkouts/s (``--rate``) are queued on an attached
monitor's writer as the listeners queue them, with the writer's clock driven by the
simulation (so retention, rollups and the size checks see simulated time). Planted at known
moments: leaks of three classes at their own call sites (returned by the garbage collector,
held past leak_after then returned, never returned) and pool timeouts. Then:

- the store's final size (target: at most 150 MB for the day), and the wall time;
- ``poolscope report --format json`` over the whole store: its time and peak RSS (targets
  5 s and 400 MB) and that the leaks and timeouts it lists are exactly those planted.

    python bench/soak.py [--hours 24] [--rate 500] [--keep-raw 900] [--store PATH] [--unpaced]

Simulated time runs far faster than real time; a real minute gives the writer a minute to
prune, so by default each simulated minute waits (at most 30 s) until the writer has pruned
what is due (``--unpaced``: never wait, and the store holds the writer's backlog too).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

import instrument
from instrument import _clock, _writer

LEAK_AFTER = 30.0
POOL_SIZE = 10


class SimClock:
    """The writer's wall clock: the simulation's current second."""

    def __init__(self, start: float) -> None:
        self.t = start

    def wall(self) -> float:
        return self.t


# One function per call site, so each has its own stack.
def site_orders(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def site_catalog(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def site_reports(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def site_users(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def site_search(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def leak_by_gc(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def leak_held_long(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def leak_never_returned(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def timed_out(w):  # type: ignore[no-untyped-def]
    return w.stacks.capture()


def simulate(  # type: ignore[type-arg]
    store: Path, app_db: Path, hours: float, rate: int, keep_raw: float, paced: bool = True
) -> dict:
    """Queue the simulated day on a monitor of ``store``; return what was planted."""
    engine = sa.create_engine(f"sqlite:///{app_db}")
    monitor = instrument.attach(
        engine, store=store, name="soak", leak_after=LEAK_AFTER, keep_raw=keep_raw
    )
    monitor.flush()
    w = monitor._writer
    key = monitor.pool_key
    null = _writer.NULL
    sites = [f(w) for f in (site_orders, site_catalog, site_reports, site_users, site_search)]
    gc_site, long_site, never_site, timeout_site = (
        leak_by_gc(w), leak_held_long(w), leak_never_returned(w), timed_out(w)
    )  # fmt: skip
    seconds = int(hours * 3600)
    start = math.floor(time.time() - seconds - 3600)
    clock = SimClock(start)
    real = _writer.REAL
    _writer.REAL = _clock.Clocks(wall=clock.wall, perf=real.perf)

    # Planted: at fixed fractions of the run.
    def moments(n: int, offset: float) -> list[int]:
        return [int(seconds * (k + offset) / (n + 1)) for k in range(1, n + 1)]

    plant: dict[int, list[str]] = {}
    for s in moments(3, 0.0):
        plant.setdefault(s, []).append("gc")
    for s in moments(3, 0.3):
        plant.setdefault(s, []).append("long")
    for s in moments(2, 0.6):
        plant.setdefault(s, []).append("never")
    for s in moments(4, 0.45):
        plant.setdefault(s, []).append("timeout")
    planted = {"gc_reclaimed": 0, "held_too_long": 0, "never_returned": 0, "timeouts": []}
    later: dict[int, list[tuple]] = {}  # type: ignore[type-arg]  # records due at a later second

    rng = np.random.default_rng(16)
    room = _writer.MAX_QUEUE_VALUES // 2
    queue = w.queue
    emit = queue.extend
    cid = 0
    t_wall = time.perf_counter()
    for s in range(seconds):
        t = start + s
        offsets = np.sort(rng.random(rate))
        holds = rng.lognormal(math.log(0.004), 0.8, rate)
        waits = rng.lognormal(math.log(0.00005), 1.0, rate)
        site_of = rng.integers(0, len(sites), rate)
        ats = (t + offsets).tolist()
        ends = (t + offsets + holds).tolist()
        holds_l, waits_l = holds.tolist(), waits.tolist()
        stacks = [sites[i] for i in site_of.tolist()]
        base = cid
        cid += rate
        for i in range(rate):
            c = base + i + 1
            in_use = 1 + (i & 3)
            emit((ats[i], key, "checkout", 1 + (c % POOL_SIZE), c, "worker", null, in_use,
                  POOL_SIZE - in_use, 0, 0, stacks[i], waits_l[i], null, null, null))  # fmt: skip
            idle = POOL_SIZE - in_use + 1
            emit((ends[i], key, "checkin", 1 + (c % POOL_SIZE), c, "worker", null, in_use - 1,
                  idle, 0, 0, stacks[i], null, null, holds_l[i], null))  # fmt: skip
        for kind in plant.get(s, ()):
            cid += 1
            c = cid
            at = t + 0.5
            out = (at, key, "checkout", 1, c, "worker", null, 5, 5, 0, 0)
            if kind == "gc":
                emit((*out, gc_site, 0.0001, null, null, null))
                ret = (at + 5, key, "gc_checkin", 1, c, "worker", null, 4, 6, 0, 0, gc_site,
                       null, null, 5.0, null)  # fmt: skip
                later.setdefault(s + 5, []).append(ret)
                planted["gc_reclaimed"] += 1
            elif kind in ("long", "never"):
                site = long_site if kind == "long" else never_site
                emit((*out, site, 0.0001, null, null, null))
                flag = (at + LEAK_AFTER + 0.5, key, "leak_suspected", null, c, "worker", null, 5,
                        5, 0, 0, site, null, null, LEAK_AFTER + 0.5, null)  # fmt: skip
                later.setdefault(s + int(LEAK_AFTER) + 1, []).append(flag)
                if kind == "long":
                    back = at + 45
                    later.setdefault(s + 45, []).extend([
                        (back, key, "leak_cleared", 1, c, "worker", null, 4, 6, 0, 0, site, null,
                         null, 45.0, null),
                        (back, key, "checkin", 1, c, "worker", null, 4, 6, 0, 0, site, null, null,
                         45.0, null),
                    ])  # fmt: skip
                    planted["held_too_long"] += 1
                else:
                    planted["never_returned"] += 1
            else:
                emit((at, key, "timeout", null, null, "worker", null, POOL_SIZE, 0, 0, 1,
                      timeout_site, 30.0, null, null, 1))  # fmt: skip
                planted["timeouts"].append(at)
        for r in later.pop(s, ()):
            emit(r)
        clock.t = t + 1
        if len(queue) > room:
            while len(queue) > room // 4:
                time.sleep(0.002)
        if paced and s % 60 == 59:
            # At 500 checkouts/s in real time the writer has a minute per simulated minute:
            # here it is given the time to prune what is due before the day goes on.
            due = clock.t - keep_raw - LEAK_AFTER - 10 - 120
            deadline = time.perf_counter() + 30
            while w.keeper._stop_at < due and time.perf_counter() < deadline:
                time.sleep(0.01)
        if s % 3600 == 3599:
            print(
                f"  simulated hour {(s + 1) // 3600}: {time.perf_counter() - t_wall:.0f} s, "
                f"store {_size(store) / 1e6:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    for s in sorted(later):
        for r in later.pop(s):
            emit(r)
    monitor.flush(timeout=None)
    monitor.flush(timeout=None)
    planted["checkouts"] = cid
    planted["wall_s"] = time.perf_counter() - t_wall
    planted["dropped"] = monitor.dropped
    monitor.detach()
    _writer.shutdown_all(timeout=60.0, reason="exit")
    _writer.REAL = real
    engine.dispose()
    return planted


def _size(store: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        p = Path(f"{store}{suffix}")
        if p.exists():
            total += p.stat().st_size
    return total


def report(store: Path) -> tuple[float, float, dict]:  # type: ignore[type-arg]
    """``poolscope report --format json`` on ``store``: (seconds, peak RSS in MB, the JSON)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "instrument", "report", str(store), "--format", "json"],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise SystemExit(f"report failed: {done.stderr.strip()}")
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return elapsed, rss_mb, json.loads(done.stdout)


def check(data: dict, planted: dict) -> list[str]:  # type: ignore[type-arg]
    """What the report lists that differs from what was planted (empty: exactly those)."""
    problems = []
    found: dict[str, int] = {}
    sites: dict[str, set[str]] = {}
    for group in data["leaks"]:
        found[group["class"]] = found.get(group["class"], 0) + group["count"]
        sites.setdefault(group["class"], set()).add(group["site"])
    for cls, fn in (("gc_reclaimed", "leak_by_gc"), ("held_too_long", "leak_held_long"),
                    ("never_returned", "leak_never_returned")):  # fmt: skip
        if found.pop(cls, 0) != planted[cls]:
            problems.append(f"{cls}: planted {planted[cls]}, listed {found.get(cls, 0)}")
        if any(fn not in site for site in sites.get(cls, ())):
            problems.append(f"{cls}: listed at {sorted(sites[cls])}, planted in {fn}")
    if found:
        problems.append(f"leaks not planted: {found}")
    if len(data["timeouts"]) != len(planted["timeouts"]):
        problems.append(
            f"timeouts: planted {len(planted['timeouts'])}, listed {len(data['timeouts'])}"
        )
    elif any("timed_out" not in t["site"] for t in data["timeouts"]):
        problems.append("a timeout is listed at another site than the planted one")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--rate", type=int, default=500, help="checkouts per simulated second")
    parser.add_argument("--keep-raw", type=float, default=900.0)
    parser.add_argument("--store", type=Path, help="keep the store here (default: a temp dir)")
    parser.add_argument(
        "--unpaced",
        action="store_true",
        help="never wait for the writer's pruning (by default each simulated minute waits, "
        "up to 30 s, until what is due is pruned, as a real minute would leave time for)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "soak.db"
        if store.exists():
            raise SystemExit(f"{store} exists; name a new store")
        planted = simulate(
            store, Path(tmp) / "app.db", args.hours, args.rate, args.keep_raw, not args.unpaced
        )
        size = _size(store)
        n, wall = planted["checkouts"], planted["wall_s"]
        print(
            f"simulated {args.hours:g} h at {args.rate} checkouts/s: {n:,} checkouts in "
            f"{wall:.0f} s wall ({n / wall:,.0f} checkouts/s), dropped {planted['dropped']}"
        )
        print(f"store: {size / 1e6:.1f} MB (target <= 150 MB for 24 h)")
        elapsed, rss, data = report(store)
        print(f"report --format json: {elapsed:.1f} s, peak RSS {rss:.0f} MB (targets 5 s, 400 MB)")
        print(
            f"report summary: checkouts {data['summary']['checkouts']:,}, "
            f"timeouts {data['summary']['timeouts']}"
        )
        problems = check(data, planted)
        if problems:
            print("leaks/timeouts listed differ from those planted:\n  " + "\n  ".join(problems))
            return 1
        print(
            f"leaks and timeouts listed: exactly those planted ({planted['gc_reclaimed']} "
            f"gc_reclaimed, {planted['held_too_long']} held_too_long, "
            f"{planted['never_returned']} never_returned, {len(planted['timeouts'])} timeouts)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
