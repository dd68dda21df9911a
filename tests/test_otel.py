"""OpenTelemetry metrics: ``attach(meter_provider=...)`` reports the ``db.client.connection.*``
instruments with their conventional names, units and kinds, and values that agree with the
store for the same workload, on SQLite and PostgreSQL, through the C and the Python record path."""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import PG_URL, query, require_postgres, short_checkouts

pytest.importorskip("opentelemetry.sdk.metrics", reason="the test extra installs the SDK")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import (  # noqa: E402
    Histogram,
    InMemoryMetricReader,
    Sum,
)

import instrument  # noqa: E402
from instrument import _hooks, _otel, _writer  # noqa: E402

SDK_VERSION = tuple(int(p) for p in importlib.metadata.version("opentelemetry-sdk").split(".")[:2])

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
NAME = "orders"
POOL_SIZE = 2
MAX_OVERFLOW = 1
CAPACITY = POOL_SIZE + MAX_OVERFLOW
SHORT = 12  # short checkouts before the pool is exhausted

UNITS = {
    "db.client.connection.count": "{connection}",
    "db.client.connection.max": "{connection}",
    "db.client.connection.idle.max": "{connection}",
    "db.client.connection.pending_requests": "{request}",
    "db.client.connection.timeouts": "{timeout}",
    "db.client.connection.create_time": "s",
    "db.client.connection.wait_time": "s",
    "db.client.connection.use_time": "s",
}
HISTOGRAMS = {
    "db.client.connection.create_time",
    "db.client.connection.wait_time",
    "db.client.connection.use_time",
}


@pytest.fixture
def reader() -> InMemoryMetricReader:
    """An SDK ``InMemoryMetricReader``; its provider is ``reader.provider``."""
    reader = InMemoryMetricReader()
    reader.provider = MeterProvider(metric_readers=[reader])  # type: ignore[attr-defined]
    yield reader
    reader.provider.shutdown()  # type: ignore[attr-defined]


def collect(reader: InMemoryMetricReader) -> dict[str, object]:
    """poolscope's metrics as the reader collects them now, by name."""
    found = {}
    for resource_metrics in reader.get_metrics_data().resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name == _otel.SCOPE:
                found.update({m.name: m for m in scope_metrics.metrics})
    return found


def points(metric, **attributes: str) -> list:
    """The data points of ``metric`` with ``attributes`` (``POOL``, ``STATE``: their values)."""
    return [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]


def value(found: dict, name: str) -> float:
    """The one value of the observable or counter ``name`` for the pool ``NAME``."""
    (point,) = points(found[name], **{POOL: NAME})
    return point.value


def counts(found: dict) -> dict[str, int]:
    """``db.client.connection.count`` for the pool ``NAME``, by state."""
    return {
        p.attributes[STATE]: p.value
        for p in points(found["db.client.connection.count"], **{POOL: NAME})
    }


def histogram(found: dict, name: str):
    """The one data point of histogram ``name`` for the pool ``NAME``."""
    (point,) = points(found[name], **{POOL: NAME})
    return point


def store_numbers(store: Path) -> dict[str, tuple[int, float]]:
    """The store's (count, sum) of waits, holds and connect times, and its timeouts and
    checkouts, for the pool ``NAME``."""

    def one(kinds: tuple[str, ...], column: str) -> tuple[int, float]:
        marks = ", ".join("?" * len(kinds))
        ((n, total),) = query(
            store,
            f"SELECT COUNT({column}), COALESCE(SUM({column}), 0) FROM events e "
            f"JOIN pools p ON p.id = e.pool_id WHERE p.name = ? AND e.kind IN ({marks})",
            NAME,
            *kinds,
        )
        return n, total

    return {
        "wait": one(("checkout",), "wait_s"),
        "use": one(("checkin", "gc_checkin", "detach"), "hold_s"),
        "create": one(("connect",), "connect_s"),
        "timeouts": one(("timeout",), "1"),
        "checkouts": one(("checkout",), "1"),
    }


def exhaust_and_time_out(engine: sa.Engine) -> list:
    """Check out every connection the pool allows, then fail once more with its TimeoutError."""
    held = [engine.connect() for _ in range(CAPACITY)]
    with pytest.raises(sa.exc.TimeoutError):
        engine.connect()
    return held


class TestInstruments:
    def test_names_units_kinds_values_agree_with_the_store(
        self, make_engine, store_path: Path, reader, recorder_impl: str
    ) -> None:
        """Each instrument has its conventional name, unit, kind and pool name attribute; a
        timeout is counted once, every checkout's wait and use time is recorded, the counts
        match the pool at collection, and every value agrees with the store's."""
        engine = make_engine(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=0.2)
        monitor = instrument.attach(
            engine, store=store_path, name=NAME, meter_provider=reader.provider
        )
        short_checkouts(engine, SHORT)
        held = exhaust_and_time_out(engine)
        monitor.flush()

        found = collect(reader)
        assert {name: found[name].unit for name in UNITS} == UNITS
        assert "db.client.connection.idle.min" not in found  # SQLAlchemy has no such limit
        for name, metric in found.items():
            if name in HISTOGRAMS:
                assert isinstance(metric.data, Histogram), name
            else:
                assert isinstance(metric.data, Sum), name
                assert metric.data.is_monotonic == (name == "db.client.connection.timeouts")
            for point in metric.data.data_points:
                assert point.attributes[POOL] == NAME
        # All out, nobody waiting, at collection.
        assert counts(found) == {"used": CAPACITY, "idle": 0}
        assert value(found, "db.client.connection.max") == CAPACITY
        assert value(found, "db.client.connection.idle.max") == POOL_SIZE
        assert value(found, "db.client.connection.pending_requests") == 0
        assert value(found, "db.client.connection.timeouts") == 1

        for conn in held:
            conn.close()
        monitor.flush()
        found = collect(reader)
        pool = engine.pool
        assert (
            counts(found)
            == {"used": pool.checkedout(), "idle": pool.checkedin()}
            == {
                "used": 0,
                "idle": POOL_SIZE,  # the overflow connection was closed on its return
            }
        )
        assert value(found, "db.client.connection.timeouts") == 1  # once, still

        store = store_numbers(store_path)
        checkouts = SHORT + CAPACITY
        assert store["checkouts"][0] == checkouts
        assert store["timeouts"][0] == 1
        for metric, key in (
            ("db.client.connection.wait_time", "wait"),
            ("db.client.connection.use_time", "use"),
            ("db.client.connection.create_time", "create"),
        ):
            point = histogram(found, metric)
            n, total = store[key]
            assert point.count == n, metric
            assert math.isclose(point.sum, total, rel_tol=1e-9, abs_tol=1e-12), metric
            assert sum(point.bucket_counts) == n
        assert histogram(found, "db.client.connection.use_time").count == checkouts
        assert histogram(found, "db.client.connection.wait_time").count == checkouts
        assert histogram(found, "db.client.connection.create_time").count == CAPACITY
        # Durations in seconds, with boundaries made for them (not the SDK's milliseconds),
        # where the SDK takes an instrument's advice (1.30 on).
        boundaries = tuple(histogram(found, "db.client.connection.use_time").explicit_bounds)
        if SDK_VERSION >= (1, 30):
            assert boundaries == _otel.DURATION_BUCKETS_S
        else:
            assert boundaries != _otel.DURATION_BUCKETS_S and boundaries[-1] == 10_000.0

    def test_pending_requests_counts_a_caller_waiting(
        self, make_engine, store_path: Path, reader
    ) -> None:
        """A caller blocked waiting for a connection is a pending request at collection; once
        it has one it is not, and its wait is recorded."""
        engine = make_engine(pool_size=1, max_overflow=0, pool_timeout=30)
        monitor = instrument.attach(
            engine, store=store_path, name=NAME, meter_provider=reader.provider
        )
        held = engine.connect()
        got = threading.Event()

        def wait_for_one() -> None:
            with engine.connect():
                got.set()

        thread = threading.Thread(target=wait_for_one)
        thread.start()
        deadline = time.monotonic() + 10
        pending = 0
        while time.monotonic() < deadline:
            pending = value(collect(reader), "db.client.connection.pending_requests")
            if pending:
                break
            time.sleep(0.01)
        assert pending == 1
        held.close()
        assert got.wait(10)
        thread.join(10)
        monitor.flush()
        found = collect(reader)
        assert value(found, "db.client.connection.pending_requests") == 0
        wait = histogram(found, "db.client.connection.wait_time")
        assert wait.count == 2 and wait.max > 0.0  # the waiter's wait is in it
        assert histogram(found, "db.client.connection.use_time").count == 2

    @pytest.mark.postgres
    def test_a_postgresql_store(self, sqlite_url: str, reader, recorder_impl: str) -> None:
        """With a PostgreSQL store the metrics are fed by the same writer: their counts and
        sums agree with the events it wrote there."""
        require_postgres()
        psycopg = pytest.importorskip("psycopg")
        schema = f"ps_otel_{uuid.uuid4().hex[:12]}"
        store = f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
        engine = sa.create_engine(
            sqlite_url, poolclass=sa.pool.QueuePool, pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW, pool_timeout=0.2,
        )  # fmt: skip
        conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://", 1)
        try:
            monitor = instrument.attach(
                engine, store=store, name=NAME, meter_provider=reader.provider
            )
            short_checkouts(engine, SHORT)
            for conn in exhaust_and_time_out(engine):
                conn.close()
            assert monitor.flush() and monitor.dropped == 0
            found = collect(reader)
            with psycopg.connect(conninfo) as conn:

                def one(kinds: str, column: str) -> tuple[int, float]:
                    return conn.execute(
                        f"SELECT COUNT({column}), COALESCE(SUM({column}), 0) "
                        f'FROM "{schema}".events WHERE kind IN ({kinds})'
                    ).fetchone()

                stored = {
                    "db.client.connection.wait_time": one("'checkout'", "wait_s"),
                    "db.client.connection.use_time": one("'checkin', 'gc_checkin'", "hold_s"),
                    "db.client.connection.create_time": one("'connect'", "connect_s"),
                }
                (timeouts,) = conn.execute(
                    f"SELECT COUNT(*) FROM \"{schema}\".events WHERE kind = 'timeout'"
                ).fetchone()
            assert stored["db.client.connection.use_time"][0] == SHORT + CAPACITY
            for metric, (n, total) in stored.items():
                point = histogram(found, metric)
                assert point.count == n, metric
                assert math.isclose(point.sum, total, rel_tol=1e-9, abs_tol=1e-12), metric
            assert value(found, "db.client.connection.timeouts") == timeouts == 1
        finally:
            _writer.shutdown_all(timeout=10.0)
            engine.dispose()
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @pytest.mark.postgres
    def test_a_postgresql_store_away_metrics_go_on(
        self, sqlite_url: str, reader, recorder_impl: str
    ) -> None:
        """While a PostgreSQL store is away its records wait in the queue, and the metrics
        read them meanwhile all the same: each once, before and after the store is back."""
        require_postgres()
        psycopg = pytest.importorskip("psycopg")
        database = f"ps_otel_down_{uuid.uuid4().hex[:10]}"
        store = f"{PG_URL.split('?', 1)[0].rsplit('/', 1)[0]}/{database}"
        admin = PG_URL.split("?", 1)[0].replace("postgresql+psycopg://", "postgresql://", 1)
        engine = sa.create_engine(sqlite_url)
        try:
            monitor = instrument.attach(
                engine, store=store, name=NAME, meter_provider=reader.provider
            )
            short_checkouts(engine, 5)
            assert not monitor.flush(timeout=5)  # the store is not there: nothing written
            found = collect(reader)
            assert histogram(found, "db.client.connection.use_time").count == 5
            assert histogram(found, "db.client.connection.wait_time").count == 5
            short_checkouts(engine, 2)
            assert not monitor.flush(timeout=5)
            assert histogram(collect(reader), "db.client.connection.use_time").count == 7
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{database}"')
            stored_conninfo = store.replace("postgresql+psycopg://", "postgresql://", 1)

            def stored() -> tuple[int, float]:
                try:
                    with psycopg.connect(stored_conninfo) as conn:
                        return conn.execute(
                            "SELECT COUNT(hold_s), COALESCE(SUM(hold_s), 0) FROM "
                            "poolscope.events WHERE kind IN ('checkin', 'gc_checkin')"
                        ).fetchone()
                except psycopg.Error:
                    return 0, 0.0

            deadline = time.monotonic() + 20
            while not (monitor.flush(timeout=5) and stored()[0] == 7):
                assert time.monotonic() < deadline, stored()
                time.sleep(0.1)
            short_checkouts(engine, 3)
            assert monitor.flush(timeout=10)
            n, total = stored()
            use = histogram(collect(reader), "db.client.connection.use_time")
            assert use.count == n == 10
            assert math.isclose(use.sum, total, rel_tol=1e-9, abs_tol=1e-12)
            assert histogram(collect(reader), "db.client.connection.wait_time").count == 10
            assert monitor.dropped == 0
        finally:
            _writer.shutdown_all(timeout=5)
            engine.dispose()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    def test_the_store_unwritable_metrics_go_on(
        self, sqlite_url: str, tmp_path: Path, reader
    ) -> None:
        """Where the store cannot be written (its folder is a file), the metrics still get
        every checkout: they are read from the records, not from the store."""
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        engine = sa.create_engine(sqlite_url)
        try:
            monitor = instrument.attach(
                engine, store=blocker / "store.db", name=NAME, meter_provider=reader.provider
            )
            short_checkouts(engine, 5)
            monitor.flush()
            assert monitor.dropped >= 5  # the store got none of them
            found = collect(reader)
            assert histogram(found, "db.client.connection.use_time").count == 5
            assert histogram(found, "db.client.connection.wait_time").count == 5
        finally:
            engine.dispose()

    def test_dropped_records_are_missing_from_both(
        self, sqlite_url: str, store_path: Path, reader, monkeypatch, recorder_impl: str
    ) -> None:
        """Records the full queue drops reach neither the store nor the metrics: the two
        still agree, and the drops are counted."""
        monkeypatch.setattr(_hooks, "MAX_QUEUE_VALUES", 10 * _writer.RECORD_WIDTH)
        engine = sa.create_engine(sqlite_url)
        try:
            monitor = instrument.attach(
                engine, store=store_path, name=NAME, meter_provider=reader.provider
            )
            monitor.flush()
            with monitor._writer._io_lock:  # the writer cannot take the queue meanwhile
                short_checkouts(engine, 20)
            monitor.flush()
            assert monitor.dropped > 0
            store = store_numbers(store_path)
            found = collect(reader)
            use = histogram(found, "db.client.connection.use_time")
            assert 0 < use.count == store["use"][0] < 20
            assert math.isclose(use.sum, store["use"][1], rel_tol=1e-9)
            assert histogram(found, "db.client.connection.wait_time").count == store["wait"][0]
        finally:
            engine.dispose()

    def test_an_async_engine(self, tmp_path: Path, store_path: Path, reader) -> None:
        """An ``AsyncEngine``'s pool reports the same way: its checkouts' wait and use times,
        its connection counts and a caller awaiting a connection as a pending request."""
        import asyncio

        from sqlalchemy.ext.asyncio import create_async_engine

        async def work() -> tuple[int, dict[str, int]]:
            engine = create_async_engine(
                f"sqlite+aiosqlite:///{tmp_path / 'async.db'}",
                poolclass=sa.pool.AsyncAdaptedQueuePool,
                pool_size=1,
                max_overflow=0,
                pool_timeout=10,
            )
            monitor = instrument.attach(
                engine, store=store_path, name=NAME, meter_provider=reader.provider
            )
            for _ in range(3):
                async with engine.connect() as conn:
                    await conn.exec_driver_sql("select 1")
            held = await engine.connect()
            waiter = asyncio.ensure_future(engine.connect())
            pending = 0
            for _ in range(500):
                await asyncio.sleep(0.01)
                pending = value(collect(reader), "db.client.connection.pending_requests")
                if pending:
                    break
            seen = counts(collect(reader))
            await held.close()
            await (await waiter).close()
            monitor.flush()
            await engine.dispose()
            return pending, seen

        pending, seen = asyncio.run(work())
        assert pending == 1
        assert seen == {"used": 1, "idle": 0}
        found = collect(reader)
        assert histogram(found, "db.client.connection.use_time").count == 5
        assert histogram(found, "db.client.connection.wait_time").count == 5


class TestLifecycle:
    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
    def test_a_child_forked_during_a_collection_attaches(
        self, sqlite_url: str, store_path: Path, reader
    ) -> None:
        """A fork while the reader's thread collects (holding the instruments' lock) leaves
        the child free to attach and report: it does not wait for a lock no thread of its
        own will release."""
        engine = sa.create_engine(sqlite_url)
        try:
            instrument.attach(engine, store=store_path, name=NAME, meter_provider=reader.provider)
            made = _otel.instruments_of(reader.provider)
            with made._lock:  # as a collection in another thread holds it
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    code = 1
                    try:
                        child = sa.create_engine(sqlite_url)
                        instrument.attach(
                            child, store=store_path, name="child", meter_provider=reader.provider
                        )
                        short_checkouts(child, 1)
                        code = 0
                    finally:
                        os._exit(code)
            deadline = time.monotonic() + 30
            while not (done := os.waitpid(pid, os.WNOHANG))[0]:
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the child waited for the lock the fork copied held")
                time.sleep(0.05)
            assert os.waitstatus_to_exitcode(done[1]) == 0
        finally:
            engine.dispose()

    def test_attach_again_with_a_provider_reports_there(
        self, sqlite_url: str, store_path: Path, reader
    ) -> None:
        """Attaching an engine attached already, now with a provider, returns the same
        monitor, which reports from then on."""
        engine = sa.create_engine(sqlite_url)
        try:
            first = instrument.attach(engine, store=store_path, name=NAME)
            short_checkouts(engine, 3)
            first.flush()
            again = instrument.attach(engine, store=store_path, meter_provider=reader.provider)
            assert again is first
            short_checkouts(engine, 4)
            first.flush()
            assert histogram(collect(reader), "db.client.connection.use_time").count == 4
        finally:
            engine.dispose()

    def test_detach_and_dispose(self, sqlite_url: str, store_path: Path, reader) -> None:
        """A pool ``engine.dispose()`` put in place reports under the same name; a detached
        pool is no longer observed, and what its histograms got stays."""
        engine = sa.create_engine(sqlite_url)
        try:
            monitor = instrument.attach(
                engine, store=store_path, name=NAME, meter_provider=reader.provider
            )
            short_checkouts(engine, 2)
            engine.dispose()
            short_checkouts(engine, 3)
            with engine.connect():
                monitor.flush()
                found = collect(reader)
                assert counts(found)["used"] == 1
            monitor.flush()
            assert histogram(collect(reader), "db.client.connection.use_time").count == 6
            instrument.monitor_of(engine).detach()
            monitor.detach()
            found = collect(reader)
            assert "db.client.connection.count" not in found or not points(
                found["db.client.connection.count"]
            )
            assert histogram(found, "db.client.connection.use_time").count == 6
        finally:
            engine.dispose()

    def test_collecting_changes_nothing_in_the_pool(
        self, sqlite_url: str, store_path: Path, reader
    ) -> None:
        """Collection reads lengths only: the pool's status and its own counts are the same
        before and after, with connections out."""
        engine = sa.create_engine(sqlite_url, pool_size=2, max_overflow=1)
        try:
            instrument.attach(engine, store=store_path, name=NAME, meter_provider=reader.provider)
            held = [engine.connect() for _ in range(2)]
            short_checkouts(engine, 1)
            before = engine.pool.status()
            for _ in range(3):
                collect(reader)
            assert engine.pool.status() == before
            for conn in held:
                conn.close()
        finally:
            engine.dispose()

    def test_the_last_records_reach_the_providers_last_export(self, tmp_path: Path) -> None:
        """A process that exits with checkouts still queued has them in its provider's
        final export (at exit), without calling ``flush()``, even where poolscope's own
        exit handler was registered before the provider's (and so runs after it)."""
        code = (
            "import sqlalchemy as sa, instrument\n"
            "import instrument._hooks  # its exit handler first, as after an earlier attach\n"
            "from opentelemetry.sdk.metrics import MeterProvider\n"
            "from opentelemetry.sdk.metrics.export import (\n"
            "    MetricExporter, MetricExportResult, PeriodicExportingMetricReader)\n"
            "class Print(MetricExporter):\n"
            "    def export(self, data, timeout_millis=10_000, **kw):\n"
            "        for r in data.resource_metrics:\n"
            "            for s in r.scope_metrics:\n"
            "                for x in s.metrics:\n"
            "                    if x.name == 'db.client.connection.use_time':\n"
            "                        print('use_time', x.data.data_points[0].count)\n"
            "        return MetricExportResult.SUCCESS\n"
            "    def force_flush(self, timeout_millis=10_000): return True\n"
            "    def shutdown(self, timeout_millis=10_000, **kw): pass\n"
            "reader = PeriodicExportingMetricReader(Print(), export_interval_millis=600_000)\n"
            "provider = MeterProvider(metric_readers=[reader])\n"
            f"engine = sa.create_engine('sqlite:///{tmp_path}/app.db')\n"
            f"instrument.attach(engine, store='{tmp_path}/store.db', meter_provider=provider)\n"
            "for _ in range(5):\n"
            "    with engine.connect(): pass\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("POOLSCOPE_")},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["use_time", "5"]


class TestArguments:
    def test_not_a_provider_is_a_value_error(self, sqlite_url: str, store_path: Path) -> None:
        """Anything but a MeterProvider, True, False or None is refused in one sentence."""
        engine = sa.create_engine(sqlite_url)
        with pytest.raises(
            ValueError,
            match=r"^meter_provider must be an OpenTelemetry MeterProvider, True for the global "
            r"one, or None, not 'yes'\.$",
        ):
            instrument.attach(engine, store=store_path, meter_provider="yes")
        assert instrument.monitor_of(engine) is None

    def test_without_opentelemetry_the_error_names_the_extra(
        self, sqlite_url: str, store_path: Path, monkeypatch
    ) -> None:
        """Without OpenTelemetry's API installed, asking for metrics raises an ImportError
        naming the extra to install, and attaches nothing."""
        for name in [
            m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")
        ]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, "opentelemetry", None)
        monkeypatch.delitem(sys.modules, "instrument._otel")
        monkeypatch.delattr(instrument, "_otel")
        engine = sa.create_engine(sqlite_url)
        with pytest.raises(ImportError, match=r"pip install 'poolscope\[otel\]'"):
            instrument.attach(engine, store=store_path, meter_provider=True)
        assert instrument.monitor_of(engine) is None

    def test_poolscope_never_imports_opentelemetry_unasked(self, tmp_path: Path) -> None:
        """Importing poolscope and attaching without a provider leaves OpenTelemetry unimported."""
        code = (
            "import sys, sqlalchemy as sa, instrument\n"
            f"engine = sa.create_engine('sqlite:///{tmp_path}/app.db')\n"
            f"m = instrument.attach(engine, store='{tmp_path}/store.db', meter_provider=None)\n"
            "with engine.connect(): pass\n"
            "m.flush()\n"
            "print(sorted(n for n in sys.modules if n.startswith('opentelemetry')))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"

    def test_true_means_the_global_provider(self, tmp_path: Path) -> None:
        """``meter_provider=True`` reports to OpenTelemetry's global provider, set before or
        after attaching: pools attached either side of it are reported once each."""
        code = (
            "import sqlalchemy as sa, instrument\n"
            "from opentelemetry import metrics\n"
            "from opentelemetry.sdk.metrics import MeterProvider\n"
            "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
            f"engine = sa.create_engine('sqlite:///{tmp_path}/app.db')\n"
            f"m = instrument.attach(engine, store='{tmp_path}/store.db', name='g',\n"
            "                       meter_provider=True)\n"
            "reader = InMemoryMetricReader()\n"
            "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
            f"later = sa.create_engine('sqlite:///{tmp_path}/app2.db')\n"
            f"instrument.attach(later, store='{tmp_path}/store.db', name='h',\n"
            "                  meter_provider=True)\n"
            "for _ in range(3):\n"
            "    with engine.connect(): pass\n"
            "with later.connect(): pass\n"
            "m.flush()\n"
            "data = reader.get_metrics_data()\n"
            "found = [x for r in data.resource_metrics for s in r.scope_metrics\n"
            "         for x in s.metrics]\n"
            "for x in found:\n"
            "    if x.name in ('db.client.connection.use_time', 'db.client.connection.max'):\n"
            "        for p in x.data.data_points:\n"
            "            print(x.name, getattr(p, 'count', getattr(p, 'value', None)),\n"
            "                  p.attributes['db.client.connection.pool.name'])\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("POOLSCOPE_")},
        )
        assert done.returncode == 0, done.stderr
        assert sorted(done.stdout.splitlines()) == [
            "db.client.connection.max 15 g",
            "db.client.connection.max 15 h",
            "db.client.connection.use_time 1 h",
            "db.client.connection.use_time 3 g",
        ]


class TestExporters:
    def test_prometheus_reader_as_the_readme_sets_it_up(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """The README's Prometheus set-up serves the metrics under Prometheus's names for
        them, with the pool name as a label, over a real scrape."""
        pytest.importorskip("opentelemetry.exporter.prometheus")
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        server, thread = start_http_server(port=0, addr="127.0.0.1")
        reader = PrometheusMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        engine = sa.create_engine(sqlite_url)
        try:
            monitor = instrument.attach(
                engine, store=store_path, name=NAME, meter_provider=provider
            )
            short_checkouts(engine, 3)
            monitor.flush()
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        finally:
            engine.dispose()
            provider.shutdown()
            server.shutdown()
            thread.join(10)

        def sample(name: str) -> float:
            pattern = rf'^{name}{{db_client_connection_pool_name="{NAME}"[^}}]*}} (\S+)$'
            (found,) = re.findall(pattern, text, re.MULTILINE)
            return float(found)

        assert sample("db_client_connection_use_time_seconds_count") == 3
        assert sample("db_client_connection_wait_time_seconds_count") == 3
        assert sample("db_client_connection_create_time_seconds_count") == 1
        assert sample("db_client_connection_max") == 15  # SQLAlchemy's default 5 + 10
        assert sample("db_client_connection_idle_max") == 5
        assert sample("db_client_connection_pending_requests") == 0
        assert re.search(
            r'^db_client_connection_count\{db_client_connection_pool_name="orders",'
            r'db_client_connection_state="idle"[^}]*\} 1\.0$',
            text,
            re.MULTILINE,
        )
