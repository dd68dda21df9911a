"""The writer's rollups and retention (its keeper) on one batch: CPU time per checkout.

Records one batch the way the writer takes it: ``--checkouts`` checkouts (default 14,000,
what the writer takes every 0.5 s from a loop of 28,000 checkouts/s) from ``--pools``
pools and ``--sites`` call sites, through the real listeners, with the writer held off.
Then it hands a copy of that batch (the C queue's ``Events`` where the C helpers are
built, else the flat list) to the writer's keeper ``--repeat`` times, on the store the
writer made, and prints the median ``time.thread_time()`` of a keeper call, per batch
and per checkout: CPU time on this thread only, which machine load barely moves. The
keeper's call is what the writer thread runs after each batch it writes, holding the
GIL for most of it: time the application's threads wait.

``--numpy`` rolls the batch up and finds its notable records in numpy, as the keeper
does where the C helpers are not built or leave a batch to it (``Events.rollup`` and
``Events.survey`` declined): the two ways on the same machine.

``--save FILE`` keeps the recorded batch (pickled) and ``--load FILE`` times a saved one,
so that two versions of the code time the very same batch. ``--profile`` prints a
cProfile of the keeper calls too (the top functions by own time). ``--same-batch`` hands
the keeper one copy of the batch every time, made once: under valgrind, two runs with
``--repeat`` 2 and 7 differ by five keeper calls' instructions, and nothing else.

    python bench/keeper.py [--checkouts 14000] [--pools 3] [--sites 5] [--repeat 30]
                           [--save FILE | --load FILE] [--profile] [--same-batch] [--numpy]
"""

from __future__ import annotations

import argparse
import cProfile
import pickle
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import instrument
from instrument import _writer
from instrument._record import AT, RECORD_WIDTH


def _site(k: int) -> Any:
    """A function that checks out a connection of ``engine``: a call site of its own."""
    src = (
        f"def site_{k}(engine):\n"
        "    with engine.connect() as c:\n"
        "        c.exec_driver_sql('select 1')\n"
    )
    space: dict[str, Any] = {}
    exec(compile(src, f"app_module_{k}.py", "exec"), space)
    return space[f"site_{k}"]


def record(tmp: Path, checkouts: int, pools: int, sites: int) -> dict[str, Any]:
    """One batch of ``checkouts`` checkouts as the writer takes it, with the store's ids."""
    engines = [sa.create_engine(f"sqlite:///{tmp}/app{i}.db") for i in range(pools)]
    store = tmp / "store.db"
    monitors = [instrument.attach(e, store=store, name=f"pool{i}") for i, e in enumerate(engines)]
    calls = [_site(k) for k in range(sites)]
    for e in engines:  # the stacks and pools written, as in a running process
        for call in calls:
            call(e)
    monitors[0].flush()
    writer = monitors[0]._writer
    with writer._io_lock:  # the writer held off: the queue fills as it would in 0.5 s
        for i in range(checkouts):
            calls[i % sites](engines[(i // sites) % pools])
        queue = writer.queue
        values = queue.tolist() if hasattr(queue, "tolist") else list(queue)
    monitors[0].flush()
    leak_after = {
        writer._pool_ids[key]: info["leak_after_s"]
        for key, info in writer.pools.items()
        if key in writer._pool_ids
    }
    for m in monitors:
        m.detach()
    for e in engines:
        e.dispose()
    return {
        "values": values,
        "pool_ids": dict(writer._pool_ids),
        "stack_ids": dict(writer._stack_ids),
        "leak_after": leak_after,
        "checkouts": checkouts,
        "store": store,
    }


def _batch(values: list[Any], c_queue: bool) -> Any:
    """``values`` as the writer hands them to its keeper: a C ``Events``, or the list."""
    if not c_queue:
        return list(values)
    events = _writer.sqlite_rows.Events(RECORD_WIDTH)
    for i in range(0, len(values), RECORD_WIDTH):
        events.extend(values[i : i + RECORD_WIDTH])
    return events


def time_keeper(
    batch: dict[str, Any], repeat: int, profile: bool, same: bool = False
) -> list[float]:
    """Thread CPU seconds of each of ``repeat`` keeper calls on copies of the batch (or,
    ``same``, on one copy, made once)."""
    import sqlite3

    from instrument._retention import Keeper

    conn = sqlite3.connect(batch["store"], isolation_level=None)
    keeper = Keeper()
    process_id = conn.execute("SELECT max(id) FROM processes").fetchone()[0]
    keeper.start(conn, process_id, time.time())
    c_queue = _writer.sqlite_rows is not None
    shift = 0.0
    times = []
    profiler = cProfile.Profile() if profile else None
    values = batch["values"]
    at = AT  # each repeat's batch is a little later, as the writer's are
    flat = _batch(values, c_queue) if same else None
    for _ in range(repeat):
        if not same:
            copy = list(values)
            for i in range(at, len(copy), RECORD_WIDTH):
                copy[i] = copy[i] + shift
            shift += 0.5
            flat = _batch(copy, c_queue)
        now = time.time()
        if profiler is not None:
            profiler.enable()
        t0 = time.thread_time()
        keeper.after_batch(
            conn, flat, batch["pool_ids"], batch["stack_ids"], batch["leak_after"], now, True
        )
        times.append(time.thread_time() - t0)
        if profiler is not None:
            profiler.disable()
    conn.close()
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", type=int, default=14_000)
    parser.add_argument("--pools", type=int, default=3)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--same-batch", action="store_true")
    parser.add_argument("--numpy", action="store_true", help="roll up in numpy, not in C")
    args = parser.parse_args()
    if args.numpy:
        from instrument import _retention, _rollups

        _rollups.Rollups.feed_events = lambda self, *args: False  # type: ignore[method-assign]
        _retention._survey = lambda *args: None
    with tempfile.TemporaryDirectory() as tmp:
        if args.load is not None:
            batch = pickle.loads(args.load.read_bytes())
            store = Path(tmp) / "store.db"
            store.write_bytes(batch.pop("store_bytes"))
            batch["store"] = store
        else:
            batch = record(Path(tmp), args.checkouts, args.pools, args.sites)
            _writer.shutdown_all()
            if args.save is not None:
                saved = {k: v for k, v in batch.items() if k != "store"}
                saved["store_bytes"] = batch["store"].read_bytes()
                args.save.write_bytes(pickle.dumps(saved))
        times = time_keeper(batch, args.repeat, args.profile, args.same_batch)
    n = len(batch["values"]) // RECORD_WIDTH
    median = statistics.median(times)
    print(
        f"keeper: {n:,} records ({batch['checkouts']:,} checkouts) per batch, "
        f"median {median * 1e3:.2f} ms CPU per batch "
        f"({median / batch['checkouts'] * 1e6:.2f} us per checkout; "
        f"min {min(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms, {len(times)} batches)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
