"""Hot-path overhead: the same checkout loop bare, detached, listeners only, and fully on.

Variants: ``bare`` (no poolscope), ``detached`` (attached, then detached),
``listeners`` (attached, with the writer thread held off during the round: the
cost of the listeners and hooks alone, a stack captured at every checkout) and
``full`` (attached, the writer thread writing alongside, as in production).
All variants run on one engine, so on one database connection: poolscope is
attached and detached between rounds, untimed. Rounds of about 1 s are interleaved
so that machine noise hits all variants alike, in a new random order each time;
between rounds the writer catches up and the store's WAL is checkpointed, untimed,
so that one round's backlog never slows another variant. (An engine per variant, in
a fixed order, biased whole runs by up to 3 %: each connection has its own speed,
and the first variant always followed the last one's settling.)
Prints the median over rounds of the throughput ratio against the same round's
bare one (higher is better; 1.0 means no cost), and, where Linux tells, the writer
thread's CPU time per iteration (its records written, up to the flush after the round):
unlike the ratios, machine load barely moves it. Recording into a PostgreSQL store on
this machine, the CPU time per iteration of the server process the writer talks to is
printed beside it (read from ``/proc``, as the writer thread's).

With ``--metrics``, a fifth variant, ``metrics``: ``full`` with ``meter_provider=`` an
OpenTelemetry SDK ``MeterProvider`` whose periodic reader collects every second (into an
exporter that keeps nothing): the ``db.client.connection.*`` instruments on top.

``--statements N`` runs N statements per checkout and commits (default: one statement,
no commit). ``--diagnose`` adds a ``full`` variant per ``diagnose`` setting that is not
the default (``diagnose=False`` and ``diagnose=True``): ``diagnose=True`` installs
``ConnectionEvents`` listeners, which put every statement on SQLAlchemy's slower path.

    python bench/overhead.py [--seconds 60] [--round-seconds 1] [--postgres-url URL]
                             [--sqlite-only | --postgres-only] [--statements N]
                             [--diagnose] [--metrics] [--store URL]

``--store URL`` adds a variant, ``full_pg``: fully on, recording into that PostgreSQL
store (``postgresql+psycopg://...?schema=...``; its schema is dropped first and after),
interleaved with the others, so that ``full`` (a SQLite file) and ``full_pg`` meet the
same machine load.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import instrument
from instrument import _pg_store, _writer
from instrument._store import PostgresStore, parse_store

ROUND_SECONDS = 1.0  # length of one round: two of the writer's batches
SECONDS = 60.0  # per database: a median over about 15 rounds; one round varies by several %


def _thread_cpu_s(thread: threading.Thread | None) -> float:
    """CPU time ``thread`` has run so far, in seconds (Linux's schedstat, in ns); 0 elsewhere."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:  # type: ignore[union-attr]
            return int(f.read().split()[0]) / 1e9
    except (AttributeError, OSError, ValueError, IndexError):
        return 0.0


def _process_cpu_s(pid: int | None) -> float:
    """CPU time the process ``pid`` (of any user) has run so far, in seconds; 0 elsewhere."""
    try:
        with open(f"/proc/{int(pid)}/schedstat") as f:  # type: ignore[arg-type]
            return int(f.read().split()[0]) / 1e9
    except (TypeError, OSError, ValueError, IndexError):
        return 0.0


def _store_backend(monitor: instrument.Monitor | None) -> int | None:
    """The pid of the PostgreSQL server process serving ``monitor``'s writer (a PostgreSQL
    store on this machine), else ``None``."""
    conn = getattr(monitor._writer, "_pg", None) if monitor is not None else None
    try:
        return int(conn.info.backend_pid) if conn is not None else None
    except Exception:
        return None


writer_cpu: dict[str, list[float]] = {}
"""Per variant, the writer thread's CPU seconds per iteration in each round, written
records included (its work after the round, up to the flush, is counted with it)."""

backend_cpu: dict[str, list[float]] = {}
"""Per variant recording into a PostgreSQL store on this machine: the CPU seconds per
iteration of the server process its writer talks to, measured as ``writer_cpu`` is."""


STATEMENTS = 1  # per checkout; more than one: committed at the end


def _loop(
    engine: sa.Engine,
    n: int,
    monitor: instrument.Monitor | None = None,
    hold_writer: bool = False,
    variant: str | None = None,
) -> float:
    writer_thread = monitor._writer._thread if monitor is not None else None
    cpu0 = _thread_cpu_s(writer_thread)
    backend = _store_backend(monitor)
    server0 = _process_cpu_s(backend)
    lock = monitor._writer._io_lock if monitor is not None and hold_writer else None
    if lock is not None:
        lock.acquire()  # the writer thread waits on this lock: listeners only
    try:
        t0 = time.perf_counter()
        if STATEMENTS == 1:
            for _ in range(n):
                with engine.connect() as c:
                    c.exec_driver_sql("select 1")
        else:
            for _ in range(n):
                with engine.connect() as c:
                    for _ in range(STATEMENTS):
                        c.exec_driver_sql("select 1")
                    c.commit()
        elapsed = time.perf_counter() - t0
    finally:
        if lock is not None:
            lock.release()
    if monitor is not None:
        _settle(monitor)
        if variant is not None:
            writer_cpu.setdefault(variant, []).append((_thread_cpu_s(writer_thread) - cpu0) / n)
            if backend is not None and backend == _store_backend(monitor):
                server = (_process_cpu_s(backend) - server0) / n
                backend_cpu.setdefault(variant, []).append(server)
    return elapsed


def _settle(monitor: instrument.Monitor) -> None:
    """Write what the writer still has queued and checkpoint the store's WAL, untimed.

    Otherwise the backlog of a ``listeners`` round (written only after it) and the
    checkpoint it calls for would land in the next variant's round. In a ``full``
    round the writer's own checkpoints are part of its cost, and are timed.
    """
    monitor.flush()
    if isinstance(monitor.store, PostgresStore):
        return  # no WAL of poolscope's to checkpoint
    conn = sqlite3.connect(monitor.store)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _meter_provider() -> object:
    """An SDK ``MeterProvider`` collecting every second into an exporter that drops it all."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )

    class _Discard(MetricExporter):
        def export(self, metrics_data, timeout_millis=10_000, **kwargs):  # noqa: ANN001
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis=10_000):  # noqa: ANN001
            return True

        def shutdown(self, timeout_millis=30_000, **kwargs):  # noqa: ANN001
            pass

    reader = PeriodicExportingMetricReader(_Discard(), export_interval_millis=1000)
    return MeterProvider(metric_readers=[reader])


def measure(
    url: str,
    seconds: float,
    store: Path,
    round_seconds: float,
    metrics: bool = False,
    diagnose: bool = False,
    pg_store: str | None = None,
) -> dict[str, float]:
    """Return iterations per second for each variant, interleaved for ``seconds``.

    Every variant runs on one engine, and so on the same database connection (and, on
    PostgreSQL, the same server process): poolscope is attached before a monitored
    round and detached before an unmonitored one, untimed. With an engine per variant,
    each connection's own speed biased its variant for the whole run, by up to 3 %.
    """
    engine = sa.create_engine(url)
    monitor: instrument.Monitor | None = None
    monitored_as: str | None = None
    provider = _meter_provider() if metrics else None
    # The attached variants, each with its attach() options.
    attached: dict[str, dict[str, Any]] = {"listeners": {}, "full": {}}
    if diagnose:
        attached |= {"diagnose_off": {"diagnose": False}, "diagnose_on": {"diagnose": True}}
    if metrics:
        attached["metrics"] = {"meter_provider": provider}
    if pg_store is not None:
        attached["full_pg"] = {"store": pg_store}
    writers = [_writer.get_writer(store)]
    if pg_store is not None:
        writers.append(_writer.get_writer(parse_store(pg_store)))
    written = sum(w.written for w in writers)
    dropped = sum(w.dropped_total + len(w.drops) for w in writers)

    def options_of(name: str | None) -> dict[str, Any] | None:
        return attached.get(name) if name is not None else None

    def prepare(name: str) -> instrument.Monitor | None:
        nonlocal monitor, monitored_as
        if monitor is not None and options_of(name) != options_of(monitored_as):
            monitor.detach()
            _settle(monitor)
            monitor = None
        if name == "detached":  # attached, then detached: nothing may be left behind
            instrument.attach(engine, store=store, name="detached").detach()
        if name in attached and monitor is None:
            options = {"store": store, **attached[name]}
            monitor = instrument.attach(engine, name="full", **options)
        monitored_as = name if monitor is not None else None
        return monitor

    variants = ["bare", "detached", *attached]
    for name in variants:  # warm up: connection made, stacks interned
        _loop(engine, 200, prepare(name))
    prepare("bare")
    per_round = max(100, int(round_seconds * 200 / _loop(engine, 200)))
    rates: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants if k != "bare"}
    order = list(variants)
    shuffle = random.Random(0).shuffle  # the same orders in every run
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        shuffle(order)
        for name in order:
            watched = prepare(name)
            seconds_taken = _loop(
                engine, per_round, watched, hold_writer=name == "listeners", variant=name
            )
            rates[name].append(per_round / seconds_taken)
        for name in ratios:  # the same round: drift in machine load cancels out
            ratios[name].append(rates[name][-1] / rates["bare"][-1])
    prepare("bare")  # detached and flushed: the writer has written everything
    engine.dispose()
    if provider is not None:
        provider.shutdown()
    result = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in ratios.items():
        result[f"{name}_ratio"] = statistics.median(r)
    for name, cpu in writer_cpu.items():
        result[f"{name}_writer_us"] = statistics.median(cpu) * 1e6
    writer_cpu.clear()
    for name, cpu in backend_cpu.items():
        result[f"{name}_server_us"] = statistics.median(cpu) * 1e6
    backend_cpu.clear()
    result["rounds"] = len(rates["bare"])
    result["per_round"] = per_round
    result["events_written"] = sum(w.written for w in writers) - written
    result["dropped"] = sum(w.dropped_total + len(w.drops) for w in writers) - dropped
    return result


def report(label: str, r: dict[str, float]) -> None:
    bare = r["bare"]
    print(f"{label}: bare {bare:,.0f} it/s ({1e6 / bare:.1f} µs/it)")
    for name in [k for k in r if k.endswith("_ratio")]:
        name = name[: -len("_ratio")]
        cost_us = 1e6 / r[name] - 1e6 / bare
        writer_us = r.get(f"{name}_writer_us")
        server_us = r.get(f"{name}_server_us")
        print(
            f"  {name:10s} {r[name]:,.0f} it/s  ratio {r[f'{name}_ratio']:.3f}  "
            f"(+{cost_us:.2f} µs/it)"
            + (f"  writer thread CPU {writer_us:.2f} µs/it" if writer_us else "")
            + (f", its store's server process {server_us:.2f} µs/it" if server_us else "")
        )
    print(
        f"  {int(r['rounds'])} rounds of {int(r['per_round'])} per variant; events written "
        f"{int(r['events_written']):,}, dropped {int(r['dropped'])}"
    )


def main() -> int:
    global STATEMENTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="seconds per database")
    parser.add_argument(
        "--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    parser.add_argument(
        "--round-seconds", type=float, default=ROUND_SECONDS, help="length of one round"
    )
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--postgres-only", action="store_true")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also the variant 'metrics': full, with OpenTelemetry metrics (needs the SDK)",
    )
    parser.add_argument(
        "--statements", type=int, default=STATEMENTS, help="statements per checkout"
    )
    parser.add_argument(
        "--diagnose", action="store_true", help="add a full variant per diagnose setting"
    )
    parser.add_argument("--store", help="a PostgreSQL store URL (default: a SQLite file)")
    args = parser.parse_args()
    STATEMENTS = args.statements
    pg_store = parse_store(args.store) if args.store else None
    if pg_store is not None and not isinstance(pg_store, PostgresStore):
        parser.error("--store takes a PostgreSQL store URL")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.db"
        if pg_store is not None:
            _drop(pg_store)
        databases = {"SQLite": f"sqlite:///{tmp}/app.db", "PostgreSQL": args.postgres_url}
        if args.postgres_only:
            del databases["SQLite"]
        if args.sqlite_only:
            del databases["PostgreSQL"]
        for label, url in databases.items():
            options = (args.metrics, args.diagnose, args.store)
            report(label, measure(url, args.seconds, store, args.round_seconds, *options))
        _writer.shutdown_all()
        if pg_store is not None:
            _drop(pg_store)
    return 0


def _drop(store: PostgresStore) -> None:
    with _pg_store.connect(store, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
