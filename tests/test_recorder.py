"""Recording: every checkout from many threads, attach and detach, a broken store, privacy, and
many processes writing one store."""

from __future__ import annotations

import _thread
import asyncio
import copy
import functools
import gc
import importlib.util
import inspect
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import defaultdict
from pathlib import Path
from unittest import mock

import pytest
import sqlalchemy as sa
from conftest import query, short_checkouts, unique_table
from sqlalchemy import event
from sqlalchemy.pool import QueuePool

import instrument
from instrument import _failures, _hooks, _store, _writer, analysis
from instrument.testing import EVENT_FIELDS, capture_events

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

POOL_EVENTS = (
    "connect",
    "first_connect",
    "checkout",
    "checkin",
    "reset",
    "invalidate",
    "soft_invalidate",
    "close",
    "detach",
    "close_detached",
)

POOL_SIZE = 3
MAX_OVERFLOW = 2
CAPACITY = POOL_SIZE + MAX_OVERFLOW
THREADS = 6
PER_THREAD = 10


def site_of(func, marker: str) -> str:
    """The site poolscope should record for the line of ``func`` holding ``marker``."""
    lines, first = inspect.getsourcelines(func)
    hits = [first + i for i, line in enumerate(lines) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} must appear once in {func.__name__}"
    return f"{THIS_FILE}:{hits[0]} in {func.__name__}"


def store_bytes(store: Path) -> bytes:
    """The raw bytes of the store file and its -wal and -shm companions."""
    return b"".join(p.read_bytes() for p in sorted(store.parent.glob(store.name + "*")))


@pytest.fixture
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repository root, so sites read ``tests/test_recorder.py:N in f``."""
    monkeypatch.chdir(ROOT)
    return ROOT


def _hold_connections(engine: sa.Engine, index: int, sleep_s: float, log: list, gate) -> None:
    """One holder thread: ``PER_THREAD`` checkouts, each held ``sleep_s`` seconds.

    On its first checkout every thread waits until ``CAPACITY`` connections are held
    at once, so the pool is driven into overflow on every run.
    """
    for seq in range(PER_THREAD):
        t0 = time.perf_counter()
        conn = engine.connect()  # <- checkout site
        t1 = time.perf_counter()
        conn.exec_driver_sql("select 1")
        if seq == 0:
            with gate:
                gate.held += 1
                gate.notify_all()
                gate.wait_for(lambda: gate.held >= CAPACITY, timeout=30)
        time.sleep(sleep_s)
        t2 = time.perf_counter()
        conn.close()
        t3 = time.perf_counter()
        log.append((threading.current_thread().name, seq, sleep_s, t2 - t1, t3 - t0))


@pytest.mark.usefixtures("recorder_impl")
class TestThreadedCheckouts:
    def test_every_checkout_is_paired_with_its_checkin(
        self, make_engine, store_path: Path, in_repo_root: Path
    ) -> None:
        """N checkouts from M threads give exactly N checkouts and N checkins, paired by id,
        with the hold time slept, the test's own line as site, and honest pool counts."""
        engine = make_engine(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=30)
        monitor = instrument.attach(engine, store=store_path, name="threads")
        log: list[tuple[str, int, float, float, float]] = []
        gate = threading.Condition()
        gate.held = 0  # type: ignore[attr-defined]
        threads = [
            threading.Thread(
                target=_hold_connections,
                args=(engine, i, 0.004 * (i + 1), log, gate),
                name=f"holder-{i}",
            )
            for i in range(THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(log) == THREADS * PER_THREAD
        assert monitor.flush() is True

        (pool_id,) = query(store_path, "SELECT id FROM pools WHERE name = 'threads'")[0]
        assert query(store_path, "SELECT pool_size, max_overflow FROM pools") == [
            (POOL_SIZE, MAX_OVERFLOW)
        ]
        rows = query(
            store_path,
            "SELECT kind, checkout_id, thread, stack_id, hold_s, in_use, overflow, at "
            "FROM events WHERE pool_id = ? AND kind IN ('checkout', 'checkin') ORDER BY id",
            pool_id,
        )
        checkouts = {r[1]: r for r in rows if r[0] == "checkout"}
        checkins = {r[1]: r for r in rows if r[0] == "checkin"}
        n = THREADS * PER_THREAD
        assert len([r for r in rows if r[0] == "checkout"]) == n
        assert len([r for r in rows if r[0] == "checkin"]) == n
        assert len(checkouts) == n and set(checkins) == set(checkouts)
        for cid, out in checkouts.items():
            back = checkins[cid]
            assert back[2] == out[2], "checkin recorded on another thread than its checkout"
            assert back[3] == out[3], "checkin does not carry its checkout's stack"
            assert back[7] >= out[7]

        # Hold times: at least what the thread held the connection, at most the whole turn.
        by_thread = defaultdict(list)
        for cid in sorted(checkouts):
            by_thread[checkouts[cid][2]].append(cid)
        assert sorted(by_thread) == [f"holder-{i}" for i in range(THREADS)]
        eps = 0.002  # the recorder's wall clock against the test's perf_counter
        for thread, seq, slept, inner, outer in log:
            hold = checkins[by_thread[thread][seq]][4]
            assert hold >= slept - eps
            assert inner - eps <= hold <= outer + eps, (thread, seq, inner, hold, outer)

        # Every checkout's site is the line in this file that called engine.connect().
        expected_site = site_of(_hold_connections, "<- checkout site")
        sites = query(
            store_path,
            "SELECT DISTINCT s.site FROM events e JOIN stacks s ON s.id = e.stack_id "
            "WHERE e.kind IN ('checkout', 'checkin')",
        )
        assert sites == [(expected_site,)]

        # Pool counts: never above capacity; overflow is exactly what exceeds pool_size.
        counts = query(
            store_path,
            "SELECT kind, in_use, overflow FROM events WHERE pool_id = ? AND in_use IS NOT NULL",
            pool_id,
        )
        assert max(r[1] for r in counts) == CAPACITY
        for kind, in_use, overflow in counts:
            assert 0 <= in_use <= CAPACITY
            assert overflow == max(0, in_use - POOL_SIZE), (kind, in_use, overflow)
        assert any(r[2] > 0 for r in counts)

        paired = query(
            store_path,
            "SELECT returned_by, count(*) FROM checkouts WHERE pool_id = ? GROUP BY 1",
            pool_id,
        )
        assert paired == [("checkin", n)]
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'dropped'") == [(0,)]

    def test_counts_match_the_pool_at_every_event(self, make_engine, store_path: Path) -> None:
        """in_use, idle and overflow at each checkout and checkin agree with the pool itself."""
        engine = make_engine(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
        monitor = instrument.attach(engine, store=store_path)
        pool = engine.pool
        expected = []
        conns = []
        for _ in range(CAPACITY):
            conns.append(engine.connect())
            expected.append(("checkout", pool.checkedout(), pool.checkedin(), pool.overflow()))
        while conns:
            conns.pop().close()
            out = pool.checkedout()
            expected.append(("checkin", out, pool.checkedin(), max(0, out - POOL_SIZE)))
        assert max(e[3] for e in expected) == MAX_OVERFLOW
        monitor.flush()
        rows = query(
            store_path,
            "SELECT kind, in_use, idle, overflow FROM events "
            "WHERE kind IN ('checkout', 'checkin') ORDER BY id",
        )
        assert rows == [(k, used, idle, max(0, over)) for k, used, idle, over in expected]


def _mixed_workload(engine: sa.Engine) -> None:
    """Nested checkouts into overflow, a GC-returned one, and a second thread."""
    held = [engine.connect() for _ in range(CAPACITY)]  # <- nested
    for conn in reversed(held):
        conn.close()
    short_checkouts(engine, 3)
    leaked = engine.connect()  # <- leaked
    leaked.exec_driver_sql("select 1")
    del leaked
    gc.collect()
    worker = threading.Thread(target=short_checkouts, args=(engine, 2), name="other")
    worker.start()
    worker.join(30)


class TestHotPath:
    def test_c_helper_and_python_record_the_same_events(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_repo_root: Path
    ) -> None:
        """The C helpers and the pure-Python listeners and writer store the same rows for
        one workload (times and hold times aside): kinds, ids, threads, counts and sites."""
        if _hooks.HotPath is None or _writer.sqlite_rows is None:
            pytest.skip("the C helpers are not built")
        rows = {}
        for impl in ("c", "python"):
            if impl == "python":
                monkeypatch.setattr(_hooks, "HotPath", None)
                monkeypatch.setattr(_hooks, "TimedGet", None)
                monkeypatch.setattr(_writer, "sqlite_rows", None)
            store = tmp_path / f"{impl}.db"
            engine = sa.create_engine(
                f"sqlite:///{tmp_path / 'app.db'}", pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW
            )
            monitor = instrument.attach(engine, store=store, leak_after=60)
            _mixed_workload(engine)
            monitor.flush()
            monitor.detach()
            engine.dispose()
            # Checkout and connection ids count per process: compare them from the first.
            first = query(store, "SELECT min(checkout_id), min(connection_id) FROM events")[0]
            rows[impl] = query(
                store,
                "SELECT e.kind, e.connection_id - ?, e.checkout_id - ?, e.thread, e.task, "
                "e.in_use, e.idle, e.overflow, e.waiters, s.site, e.hold_s IS NULL FROM events e "
                "LEFT JOIN stacks s ON s.id = e.stack_id ORDER BY e.id",
                first[1],
                first[0],
            )
        assert rows["c"] == rows["python"]
        kinds = [r[0] for r in rows["c"]]
        assert kinds.count("checkout") == CAPACITY + 3 + 1 + 2
        assert kinds.count("gc_checkin") == 1
        assert {r[3] for r in rows["c"] if r[0] == "checkout"} == {
            threading.current_thread().name,
            "other",
        }
        assert max(r[7] for r in rows["c"] if r[7] is not None) == MAX_OVERFLOW

    @pytest.mark.usefixtures("recorder_impl")
    def test_thread_unknown_to_threading(self, sqlite_url: str, store_path: Path) -> None:
        """A thread started outside ``threading`` is recorded under the name threading
        gives it on first sight (``Dummy-N``), its checkout paired with its checkin."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        short_checkouts(engine)  # the stack is known before the foreign thread runs
        done = threading.Event()

        def foreign() -> None:
            try:
                short_checkouts(engine, 2)
            finally:
                done.set()

        _thread.start_new_thread(foreign, ())
        assert done.wait(30)
        monitor.flush()
        engine.dispose()
        rows = query(
            store_path,
            "SELECT kind, thread FROM events WHERE kind IN ('checkout', 'checkin') ORDER BY id",
        )
        main = threading.current_thread().name
        assert [r[0] for r in rows] == ["checkout", "checkin"] * 3
        assert rows[:2] == [("checkout", main), ("checkin", main)]
        foreign_names = {r[1] for r in rows[2:]}
        assert len(foreign_names) == 1 and foreign_names.pop().startswith("Dummy-")

    @pytest.mark.usefixtures("recorder_impl")
    def test_own_failure_never_reaches_the_application(
        self,
        sqlite_url: str,
        store_path: Path,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """When the checkout and checkin listeners fail themselves, queries go on; the
        failures are counted and the first is logged once, with its traceback."""
        monkeypatch.setattr(_failures, "failures", [])
        caplog.set_level(logging.WARNING, logger="poolscope")
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        short_checkouts(engine)  # a connection is open and idle before anything breaks
        # With the C helper, the first checkout below records its new stack in Python and
        # the next two take the helper's own path: both fail, and both are caught.
        monitor._state[1] = object()  # the idle queue: it has no length
        for i in range(3):
            with engine.connect() as conn:
                assert conn.exec_driver_sql(f"select {i}").scalar() == i
        assert _failures.failures.count("_on_checkout") == 3
        assert _failures.failures.count("_on_checkin") == 3
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "_on_checkout failed" in errors[0].getMessage()
        assert errors[0].exc_info is not None and errors[0].exc_info[0] is TypeError

        # The pool's wait timer fails too (a start time that is not a number): the
        # connection is handed over all the same.
        monitor._state[1] = monitor._pool._pool.queue  # the idle queue is back
        record = monitor._state[1][0]
        monitor._connect_starts[record] = "not a time"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select 7").scalar() == 7
        assert _failures.failures[-1:] == ["_do_get"]


@pytest.mark.usefixtures("recorder_impl")
class TestThreadNames:
    def test_a_renamed_thread_is_recorded_under_its_new_name(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """Events name the thread as it is called at that moment."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)

        def work() -> None:
            with engine.connect():
                pass
            threading.current_thread().name = "job-42"
            with engine.connect():
                pass

        thread = threading.Thread(target=work, name="worker")
        thread.start()
        thread.join(30)
        monitor.flush()
        engine.dispose()
        rows = query(
            store_path,
            "SELECT kind, thread FROM events WHERE kind IN ('checkout', 'checkin') ORDER BY id",
        )
        assert rows == [
            ("checkout", "worker"),
            ("checkin", "worker"),
            ("checkout", "job-42"),
            ("checkin", "job-42"),
        ]

    def test_each_of_many_interleaved_threads_is_named(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """With more threads than the C helper keeps at hand (8), taking turns, each
        checkout and checkin names the thread that made it, including threads started
        after others ended (whose OS thread ids may be reused)."""
        engine = sa.create_engine(sqlite_url, pool_size=5, max_overflow=20)
        monitor = instrument.attach(engine, store=store_path)
        turns = threading.Barrier(12)

        def work() -> None:
            for _ in range(5):
                turns.wait(10)  # all threads check out in the same rounds
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")

        for wave in range(2):
            threads = [threading.Thread(target=work, name=f"wave{wave}-t{i}") for i in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        monitor.flush()
        engine.dispose()
        rows = query(
            store_path,
            "SELECT co.thread, ci.thread FROM events co JOIN events ci "
            "ON ci.checkout_id = co.checkout_id AND ci.kind = 'checkin' "
            "WHERE co.kind = 'checkout'",
        )
        assert len(rows) == 2 * 12 * 5
        assert all(out == back for out, back in rows)
        counts: dict[str, int] = defaultdict(int)
        for out, _ in rows:
            counts[out] += 1
        assert counts == {f"wave{w}-t{i}": 5 for w in range(2) for i in range(12)}


class TestOpenCheckouts:
    def test_lists_who_holds_connections_now(self, make_engine, store_path, in_repo_root) -> None:
        """open_checkouts() names each held connection's site, thread and stack, longest
        held first, and forgets it once returned."""
        engine = make_engine(pool_size=2, max_overflow=0)
        monitor = instrument.attach(engine, store=store_path)
        first = engine.connect()  # <- first holder
        held = threading.Event()
        release = threading.Event()

        def second_holder() -> None:
            with engine.connect():  # <- second holder
                held.set()
                release.wait(30)

        thread = threading.Thread(target=second_holder, name="second-holder")
        thread.start()
        try:
            assert held.wait(30)
            now = monitor.open_checkouts()
        finally:
            release.set()
            thread.join(30)
        this_test = TestOpenCheckouts.test_lists_who_holds_connections_now
        assert [(c.site, c.thread) for c in now] == [
            (site_of(this_test, "<- " + "first holder"), "MainThread"),
            (site_of(second_holder, "<- " + "second holder"), "second-holder"),
        ]
        assert now[0].held_s >= now[1].held_s > 0
        assert now[0].checked_out_at <= now[1].checked_out_at
        assert now[0].stack[0] == now[0].site and now[0].task is None
        assert now[1].stack[0] == now[1].site
        assert [c.checkout_id for c in monitor.open_checkouts()] == [now[0].checkout_id]
        first.close()
        assert monitor.open_checkouts() == []


class TestRefusedCheckout:
    def test_checkout_refused_by_a_listener_is_not_left_open(
        self, make_engine, store_path: Path
    ) -> None:
        """A checkout a later listener refuses (DisconnectionError, then SQLAlchemy retries
        with a new connection) is closed, so it never looks like a leak."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path)
        refusals = []

        @event.listens_for(engine, "checkout")
        def refuse_once(dbapi_connection, record, proxy) -> None:
            if not refusals:
                refusals.append(record)
                raise sa.exc.DisconnectionError("stale connection")

        with engine.connect() as conn:
            assert conn.exec_driver_sql("select 3").scalar() == 3
        event.remove(engine, "checkout", refuse_once)
        monitor.flush()
        assert refusals
        assert query(store_path, "SELECT count(*) FROM checkouts WHERE returned_at IS NULL") == [
            (0,)
        ]
        kinds = [r[0] for r in query(store_path, "SELECT kind FROM events ORDER BY id")]
        assert kinds.count("checkout") == kinds.count("checkin") == 2
        assert "invalidate" in kinds


class TestAttach:
    def test_detach_leaves_nothing_behind(self, make_engine, store_path: Path) -> None:
        """After detach() no poolscope listener or pool hook is left, and nothing more is
        recorded."""
        engine = make_engine()
        pool = engine.pool
        before = {name: len(getattr(pool.dispatch, name)) for name in POOL_EVENTS}
        disposed_before = len(engine.dispatch.engine_disposed)
        creator = vars(pool)["_invoke_creator"]

        monitor = instrument.attach(engine, store=store_path)
        listeners = dict(monitor._listeners)
        assert all(event.contains(engine, n, fn) for n, fn in listeners.items())
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        monitor.detach()

        for name, fn in listeners.items():
            assert not event.contains(engine, name, fn), name
        assert {name: len(getattr(pool.dispatch, name)) for name in POOL_EVENTS} == before
        assert len(engine.dispatch.engine_disposed) == disposed_before
        assert "_do_get" not in vars(pool) and "recreate" not in vars(pool)
        assert vars(pool)["_invoke_creator"] is creator
        assert not monitor.attached

        monitor.flush()
        recorded = query(store_path, "SELECT count(*) FROM events")
        short_checkouts(engine, 3)
        monitor.flush()
        assert query(store_path, "SELECT count(*) FROM events") == recorded
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(1,)]

    def test_detach_after_dispose_leaves_nothing_behind(
        self, make_engine, store_path: Path
    ) -> None:
        """The pool that engine.dispose() puts in place is unhooked by detach() too."""
        engine = make_engine()
        before = {name: len(getattr(engine.pool.dispatch, name)) for name in POOL_EVENTS}
        monitor = instrument.attach(engine, store=store_path)
        old_pool = engine.pool
        with engine.connect():
            pass
        engine.dispose()
        assert engine.pool is not old_pool
        with engine.connect():
            pass
        monitor.detach()
        for pool in (old_pool, engine.pool):
            assert {name: len(getattr(pool.dispatch, name)) for name in POOL_EVENTS} == before
            assert not {"_do_get", "recreate", "_poolscope_creator"} & set(vars(pool))
        with engine.connect():
            pass
        monitor.flush()
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(2,)]

    def test_connection_held_across_detach_is_not_reported(
        self, make_engine, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A connection checked out before detach() is forgotten: the watchdog never flags it."""
        caplog.set_level(logging.INFO, logger="poolscope")
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path, leak_after=1.0)
        conn = engine.connect()
        monitor.detach()
        assert monitor.open_checkouts() == []
        monitor.watch(time.time() + 3600)  # the watchdog's pass, an hour later
        conn.close()
        monitor.flush()
        kinds = [k for (k,) in query(store_path, "SELECT kind FROM events ORDER BY id")]
        assert "leak_suspected" not in kinds and kinds.count("checkout") == 1
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_detach_is_idempotent(self, make_engine, store_path: Path) -> None:
        """A second detach() does nothing, and attaching again records again."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path)
        monitor.detach()
        monitor.detach()
        assert not monitor.attached
        again = instrument.attach(engine, store=store_path)
        assert again is not monitor and again.attached
        with engine.connect():
            pass
        again.flush()
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(1,)]

    def test_attaching_twice_returns_the_same_monitor(self, make_engine, store_path: Path) -> None:
        """attach() on an attached engine returns its monitor and adds no second listener."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path)
        counts = {name: len(getattr(engine.pool.dispatch, name)) for name in POOL_EVENTS}
        assert instrument.attach(engine, store=store_path) is monitor
        assert instrument.attach(engine) is monitor
        assert {name: len(getattr(engine.pool.dispatch, name)) for name in POOL_EVENTS} == counts
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        monitor.flush()
        rows = query(
            store_path,
            "SELECT kind, count(*) FROM events WHERE kind IN ('checkout', 'checkin') GROUP BY 1",
        )
        assert rows == [("checkin", 1), ("checkout", 1)]
        assert query(store_path, "SELECT count(*) FROM pools") == [(1,)]

    def test_async_engine(self, tmp_path: Path, store_path: Path, in_repo_root: Path) -> None:
        """An AsyncEngine is attached through its sync engine; its task name and the
        awaiting line are recorded."""
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        monitor = instrument.attach(engine, store=store_path, name="async")
        assert instrument.attach(engine.sync_engine) is monitor

        async def use_connection() -> int:
            async with engine.connect() as conn:  # <- async checkout
                result = await conn.exec_driver_sql("select 7")
                return result.scalar()

        async def main() -> int:
            try:
                return await asyncio.create_task(use_connection(), name="order-task")
            finally:
                await engine.dispose()

        assert asyncio.run(main()) == 7
        monitor.flush()
        rows = query(
            store_path,
            "SELECT e.kind, e.task, s.site FROM events e LEFT JOIN stacks s ON s.id = e.stack_id "
            "WHERE e.kind IN ('checkout', 'checkin') ORDER BY e.id",
        )
        site = site_of(use_connection, "<- async checkout")
        # The checkin names the checkout's task, though SQLAlchemy closes an AsyncConnection
        # in a shielded task of its own.
        assert rows == [("checkout", "order-task", site), ("checkin", "order-task", site)]

    @pytest.mark.parametrize(
        "pool_class",
        [sa.pool.NullPool, sa.pool.StaticPool, sa.pool.SingletonThreadPool, sa.pool.AssertionPool],
    )
    def test_other_pool_classes(self, pool_class, sqlite_url: str, store_path: Path) -> None:
        """Pools other than QueuePool are recorded too, with no size or overflow in ``pools``."""
        engine = sa.create_engine(sqlite_url, poolclass=pool_class)
        monitor = instrument.attach(engine, store=store_path)
        short_checkouts(engine, 2)
        monitor.flush()
        engine.dispose()
        rows = query(
            store_path,
            "SELECT kind, checkout_id, in_use, overflow FROM events "
            "WHERE kind IN ('checkout', 'checkin') ORDER BY id",
        )
        assert [(k, used, over) for k, _, used, over in rows] == [
            ("checkout", 1, 0),
            ("checkin", 0, 0),
        ] * 2
        assert rows[0][1] == rows[1][1] != rows[2][1] == rows[3][1]
        assert query(store_path, "SELECT pool_class, pool_size, max_overflow FROM pools") == [
            (pool_class.__name__, None, None)
        ]

    @pytest.mark.usefixtures("recorder_impl")
    def test_static_pool_overlapping_checkouts_are_all_returned(
        self, store_path: Path, tmp_path: Path
    ) -> None:
        """A StaticPool hands its one connection to overlapping checkouts and SQLAlchemy
        fires one checkin for them all: each checkout gets its return there, none is
        left open (which a clean exit would report as never returned)."""
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}", poolclass=sa.pool.StaticPool)
        monitor = instrument.attach(engine, store=store_path)
        short_checkouts(engine)  # every stack below is known: the C helper's case too
        outer = engine.connect()
        inner = engine.connect()
        assert len(monitor.open_checkouts()) == 2
        inner.close()
        assert monitor.open_checkouts() == []
        outer.close()  # SQLAlchemy already counts the connection as returned: no event
        short_checkouts(engine)
        monitor.flush()
        engine.dispose()
        rows = query(
            store_path,
            "SELECT returned_by, count(*) FROM checkouts GROUP BY 1 ORDER BY 1",
        )
        assert rows == [("checkin", 4)]
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'gc_checkin'") == [(0,)]

    def test_bare_pool(self, tmp_path: Path, store_path: Path) -> None:
        """A Pool without an engine is recorded, with its class and size in ``pools``."""
        database = tmp_path / "bare.db"
        pool = QueuePool(lambda: sqlite3.connect(database), pool_size=2, max_overflow=1)
        monitor = instrument.attach(pool, store=store_path, name="bare")
        assert instrument.attach(pool) is monitor
        conn = pool.connect()
        conn.cursor().execute("select 1")
        conn.close()
        monitor.flush()
        pool.dispose()
        assert query(store_path, "SELECT kind FROM events ORDER BY id") == [
            ("connect",),
            ("checkout",),
            ("checkin",),
        ]
        assert query(
            store_path, "SELECT name, url, dialect, pool_class, pool_size, max_overflow FROM pools"
        ) == [("bare", "<QueuePool>", None, "QueuePool", 2, 1)]

    @pytest.mark.parametrize(
        ("target", "kwargs", "error", "message"),
        [
            ("sqlite://", {}, TypeError, "attach() takes an Engine, an AsyncEngine or a Pool"),
            (None, {"leak_after": 0}, ValueError, "leak_after must be more than 0 seconds"),
            (None, {"leak_after": "5"}, ValueError, "leak_after must be a number of seconds"),
        ],
    )
    def test_bad_arguments(self, sqlite_url, store_path, target, kwargs, error, message) -> None:
        """attach() rejects what it cannot record with one plain sentence."""
        engine = sa.create_engine(sqlite_url) if target is None else target
        with pytest.raises(error) as info:
            instrument.attach(engine, store=store_path, **kwargs)
        assert str(info.value).startswith(message)
        assert not store_path.exists()

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"store": 123}, "store must be a file path or a PostgreSQL URL, not 123."),
            ({"store": ""}, "store must be a file path or a PostgreSQL URL, not ''."),
            ({"name": 5}, "name must be a non-empty string, not 5."),
            ({"name": " "}, "name must be a non-empty string, not ' '."),
        ],
    )
    def test_bad_store_or_name(self, sqlite_url, store_path, kwargs, message) -> None:
        """A store that is no path, or a blank name, is refused with one plain sentence,
        also when the engine is already attached (the existing monitor is not returned)."""
        engine = sa.create_engine(sqlite_url)

        def refused() -> None:
            with pytest.raises(ValueError) as info:
                instrument.attach(engine, **kwargs)
            assert str(info.value) == message
            with pytest.raises(ValueError):
                instrument.attach(engine, leak_after=-1)

        refused()
        monitor = instrument.attach(engine, store=store_path)
        refused()
        assert monitor.attached


class TestRecreatedPools:
    @pytest.mark.usefixtures("recorder_impl")
    def test_copied_engine_disposed_is_a_pool_of_its_own(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """copy.copy(engine).dispose() leaves two pools in use: each is its own pool row with
        its own counts, so no pool is ever seen with more in use than it can hold."""
        engine = sa.create_engine(sqlite_url, poolclass=QueuePool, pool_size=1, max_overflow=0)
        monitor = instrument.attach(engine, store=store_path, name="orders")
        twin = copy.copy(engine)
        twin.dispose()  # the copy gets a new pool; the original keeps the old one
        assert twin.pool is not engine.pool
        first, second = engine.connect(), twin.connect()
        assert len(monitor.open_checkouts()) == 2
        first.close()
        second.close()
        monitor.flush()

        pools = query(store_path, "SELECT id, name, pool_size, max_overflow FROM pools")
        assert [row[1:] for row in pools] == [("orders", 1, 0), ("orders", 1, 0)]
        per_pool = query(
            store_path,
            "SELECT pool_id, MAX(in_use), SUM(kind = 'checkout') FROM events GROUP BY pool_id",
        )
        assert per_pool == [(pools[0][0], 1, 1), (pools[1][0], 1, 1)]
        report = analysis.build_report(analysis.open_store(store_path))
        assert report["summary"]["peak_in_use"] <= report["summary"]["capacity"] == 1
        assert [(p["name"], p["peak_in_use"], p["capacity"]) for p in report["pools"]] == [
            ("orders", 1, 1)
        ]
        assert report["summary"]["confirmed_leaks"] == 0

    def test_connection_held_across_dispose_returns_to_its_pool(
        self, make_engine, store_path: Path
    ) -> None:
        """After engine.dispose(), a connection still out is returned to the old pool's row,
        and the engine's new pool is recorded as the same pool name."""
        engine = make_engine(poolclass=QueuePool, pool_size=1, max_overflow=0)
        monitor = instrument.attach(engine, store=store_path, name="orders")
        held = engine.connect()
        engine.dispose()
        with engine.connect():  # the new pool has room: the held one is the old pool's
            pass
        held.close()
        monitor.flush()
        rows = query(store_path, "SELECT pool_id, kind, in_use FROM events "
                     "WHERE kind IN ('checkout', 'checkin') ORDER BY id")  # fmt: skip
        old, new = rows[0][0], rows[1][0]
        assert old != new
        assert rows == [(old, "checkout", 1), (new, "checkout", 1), (new, "checkin", 0),
                        (old, "checkin", 0)]  # fmt: skip
        report = analysis.build_report(analysis.open_store(store_path))
        assert [(p["name"], p["checkouts"], p["peak_in_use"]) for p in report["pools"]] == [
            ("orders", 2, 1)
        ]
        assert report["summary"]["open_checkouts"] == 0


class TestDetachWithOpenCheckouts:
    def test_connection_open_at_detach_is_not_a_confirmed_leak(
        self, tmp_path: Path, store_path: Path
    ) -> None:
        """A connection still out when detach() runs, in a process that then exits cleanly,
        is never a confirmed leak: at most a suspected one if it was held past leak_after."""
        script = tmp_path / "app.py"
        script.write_text(
            "import time, sqlalchemy as sa, instrument\n"
            f"engine = sa.create_engine('sqlite:///{tmp_path / 'app.db'}')\n"
            f"short = instrument.attach(engine, store={str(store_path)!r}, name='short')\n"
            f"other = sa.create_engine('sqlite:///{tmp_path / 'other.db'}')\n"
            f"long = instrument.attach(other, store={str(store_path)!r}, name='long',\n"
            "                         leak_after=0.05)\n"
            "kept = [engine.connect(), other.connect()]\n"
            "time.sleep(0.2)\n"
            "short.detach()\n"
            "long.detach()\n"
        )
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert query(store_path, "SELECT end_reason FROM processes") == [("exit",)]
        conn = analysis.open_store(store_path)
        summary = analysis.summary(conn)
        assert (summary["confirmed_leaks"], summary["open_checkouts"]) == (0, 0)
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'unwatched'") == [(2,)]
        assert [(r.leak_class, r.pool) for r in analysis.leaks(conn).itertuples()] == [
            ("held_too_long", "long")
        ]
        co = analysis.checkouts(conn)
        assert list(co["outcome"]) == ["unwatched", "unwatched"]
        report = analysis.build_report(conn)
        assert report["summary"]["confirmed_leaks"] == 0
        assert [leak["class"] for leak in report["leaks"]] == ["held_too_long"]


class TestManyStacks:
    def test_stacks_past_the_cap_share_one_placeholder(
        self, sqlite_url: str, store_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past MAX_STACKS distinct stacks, checkouts are still recorded, under one
        placeholder site, and no more code objects are kept."""
        from instrument import _stacks

        monkeypatch.setattr(_stacks, "MAX_STACKS", 3)
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        for i in range(6):  # six call sites: six distinct stacks
            code = compile("\n" * i + "engine.connect().close()", f"site{i}.py", "exec")
            exec(code, {"engine": engine})
        monitor.flush()
        sites = [
            s
            for (s,) in query(
                store_path,
                "SELECT site FROM checkouts JOIN stacks "
                "ON stacks.id = checkouts.stack_id ORDER BY checkout_id",
            )
        ]
        assert len(sites) == 6
        assert sites[:3] == [
            "site0.py:1 in <module>",
            "site1.py:2 in <module>",
            "site2.py:3 in <module>",
        ]
        assert sites[3:] == ["<more than 3 distinct stacks>"] * 3
        assert len(monitor._writer.stacks.frames) == 3
        engine.dispose()


class TestSitePaths:
    def test_package_modules_are_written_from_their_top_package(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A module in a package reads the same from any working directory (so the
        fingerprint is the same in every process); a loose script is cwd-relative."""
        from instrument._stacks import display_path

        module = tmp_path / "srv" / "shop" / "orders" / "place.py"
        module.parent.mkdir(parents=True)
        (tmp_path / "srv" / "shop" / "__init__.py").write_text("")
        (module.parent / "__init__.py").write_text("")
        module.write_text("")
        script = tmp_path / "srv" / "run.py"
        script.write_text("")
        for cwd in (tmp_path, tmp_path / "srv", module.parent):
            monkeypatch.chdir(cwd)
            assert display_path(str(module)) == "shop/orders/place.py"
        monkeypatch.chdir(tmp_path)
        assert display_path(str(script)) == "srv/run.py"


@pytest.mark.usefixtures("recorder_impl")
class TestBrokenStore:
    @pytest.mark.parametrize("where", ["under a regular file", "in /proc"])
    def test_unwritable_store_never_reaches_the_application(
        self,
        where: str,
        tmp_path: Path,
        sqlite_url: str,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Queries run normally, every event is counted as dropped, and one error is logged."""
        if where == "in /proc":
            store = Path(f"/proc/poolscope-{uuid.uuid4().hex[:8]}/poolscope.db")
        else:
            (tmp_path / "afile").write_text("a regular file, not a directory")
            store = tmp_path / "afile" / "poolscope.db"
        # Retry opening the store at every batch: the failure must still be reported once.
        monkeypatch.setattr(_writer, "RETRY_OPEN_SECONDS", 0.0)
        engine = sa.create_engine(sqlite_url)
        caplog.set_level(logging.DEBUG, logger="poolscope")
        monitor = instrument.attach(engine, store=store)
        for i in range(3):
            with engine.connect() as conn:
                assert conn.exec_driver_sql(f"select {i}").scalar() == i
            assert monitor.flush() is True
        # connect + 3 checkouts + 3 checkins, none stored, all counted.
        assert monitor.dropped == 7
        _writer.shutdown_all(timeout=10.0)
        engine.dispose()
        problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(problems) == 1, [r.getMessage() for r in problems]
        assert problems[0].name == "poolscope"
        assert problems[0].levelno == logging.ERROR
        assert str(store) in problems[0].getMessage()
        assert not store.exists()

    def test_locked_store_loses_nothing_silently(
        self,
        sqlite_url: str,
        store_path: Path,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While another process locks the store, batches are dropped and counted; once it is
        free again, a ``dropped`` event tells how many were lost."""
        monkeypatch.setattr(
            _store,
            "connect_for_writing",
            functools.partial(_store.connect_for_writing, busy_timeout_ms=100),
        )
        caplog.set_level(logging.WARNING, logger="poolscope")
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        with engine.connect():
            pass
        monitor.flush()
        locker = sqlite3.connect(str(store_path), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(3):
                with engine.connect() as conn:
                    assert conn.exec_driver_sql("select 1").scalar() == 1
            assert monitor.flush() is True
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert monitor.dropped == 6
        with engine.connect():
            pass
        monitor.flush()
        engine.dispose()
        kinds = query(store_path, "SELECT kind, count FROM events ORDER BY id")
        assert [k for k, _ in kinds if k in ("checkout", "checkin")] == ["checkout", "checkin"] * 2
        assert [c for k, c in kinds if k == "dropped"] == [6]
        assert len(caplog.records) == 1 and "locked" in caplog.records[0].getMessage()

    def test_batch_the_store_refuses_is_counted_and_the_writer_goes_on(
        self, sqlite_url: str, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A row SQLite refuses part-way through a batch (here a NOT NULL column left
        empty) rolls back that batch, whose events are counted as dropped; the error is
        logged once and the next batch is written."""
        caplog.set_level(logging.WARNING, logger="poolscope")
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        writer = monitor._writer
        with writer._io_lock:  # the writer waits: all of this is one batch
            for _ in range(300):  # several multi-row statements' worth before the bad row
                with engine.connect():
                    pass
            writer.emit((None, monitor.pool_key, "close") + (_writer.NULL,) * 13)  # at: NOT NULL
        assert monitor.flush() is True
        assert monitor.dropped == 602  # connect, 300 checkouts and checkins, the bad row
        with engine.connect():
            pass
        monitor.flush()
        engine.dispose()
        kinds = query(store_path, "SELECT kind, count FROM events ORDER BY id")
        assert [k for k, _ in kinds if k in ("checkout", "checkin")] == ["checkout", "checkin"]
        assert [c for k, c in kinds if k == "dropped"] == [602]
        assert len(caplog.records) == 1 and "NOT NULL" in caplog.records[0].getMessage()

    def test_a_value_of_another_type_is_still_written(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A value of a type the listeners never queue, but one SQLite takes (a bool, an
        int subclass), is written as its integer, with its batch, in either queue."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        with engine.connect():
            pass
        monitor._emit("close", connection_id=True)
        monitor.flush()
        engine.dispose()
        rows = query(store_path, "SELECT kind, connection_id FROM events ORDER BY id")
        assert [k for k, _ in rows] == ["connect", "checkout", "checkin", "close"]
        assert rows[-1] == ("close", 1)

    def test_missing_directory_is_created(self, tmp_path: Path, sqlite_url: str) -> None:
        """A store in a directory that does not exist yet creates the directory."""
        store = tmp_path / "not" / "yet" / "poolscope.db"
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store)
        with engine.connect():
            pass
        monitor.flush()
        assert query(store, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(1,)]


def _work(engine: sa.Engine) -> None:
    with engine.connect():  # <- work
        pass


def _work_times(engine: sa.Engine, times: int) -> None:
    for _ in range(times):
        _work(engine)


def _other(engine: sa.Engine) -> None:
    with engine.connect():  # <- other
        pass


def _hold(engine: sa.Engine) -> sa.Connection:
    return engine.connect()  # <- hold


def _checkouts_by_site(store: Path) -> dict[str, int]:
    return dict(
        query(
            store,
            "SELECT s.site, count(*) FROM events e JOIN stacks s ON s.id = e.stack_id "
            "WHERE e.kind = 'checkout' GROUP BY s.site",
        )
    )


def _never_returned_sites(store: Path) -> list[str]:
    """The site of each checkout without a return, of a pool the store has a row for."""
    return [
        site
        for (site,) in query(
            store,
            "SELECT s.site FROM checkouts c JOIN pools p ON p.id = c.pool_id "
            "JOIN stacks s ON s.id = c.stack_id WHERE c.returned_at IS NULL",
        )
    ]


@pytest.mark.usefixtures("recorder_impl", "in_repo_root")
class TestStoreFaults:
    def test_rows_of_a_batch_lost_to_a_full_disk_are_written_again(
        self, sqlite_url: str, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A batch the full disk refuses (the first: the pool and stack rows with it) is
        counted as dropped; once there is room, its pool and stack rows are written again, so
        each later checkout has its pool and its own site, and the one never closed shows."""
        caplog.set_level(logging.WARNING, logger="poolscope")
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, name="orders")
        writer = monitor._writer
        with writer._io_lock:  # the writer waits: its process row, then a disk with no room
            conn = writer._connection()
            assert conn is not None
            # The limit is per connection: on the C inserter's own handle too, if open.
            handles = [conn.execute]
            if writer._c_store is not None:
                handles.append(writer._c_store.execute)
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            for execute in handles:
                execute(f"PRAGMA max_page_count = {pages}")
            for _ in range(300):  # more than the events table's one page holds
                _work(engine)
        assert monitor.flush() is True
        assert monitor.dropped == 601  # connect, 300 checkouts and checkins
        assert query(store_path, "SELECT count(*) FROM events") == [(0,)]
        with writer._io_lock:
            for execute in handles:
                execute("PRAGMA max_page_count = 1073741823")  # room again
        for _ in range(3):
            _other(engine)
        for _ in range(5):
            _work(engine)
        held = _hold(engine)
        assert monitor.flush() is True
        assert query(store_path, "SELECT name FROM pools") == [("orders",)]
        assert not query(
            store_path, "SELECT id FROM events WHERE pool_id NOT IN (SELECT id FROM pools)"
        )
        assert _checkouts_by_site(store_path) == {
            site_of(_work, "<- work"): 5,
            site_of(_other, "<- other"): 3,
            site_of(_hold, "<- hold"): 1,
        }
        assert _never_returned_sites(store_path) == [site_of(_hold, "<- hold")]
        assert [
            c for (c,) in query(store_path, "SELECT count FROM events WHERE kind = 'dropped'")
        ] == [601]
        assert len(caplog.records) == 1 and "full" in caplog.records[0].getMessage()
        held.close()
        engine.dispose()

    @pytest.mark.parametrize("how", ["deleted", "replaced"])
    def test_store_deleted_or_replaced_while_recording_is_made_again(
        self, how: str, sqlite_url: str, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A store deleted (or replaced by another poolscope store) while recording is noticed
        at the next batch and said once; the process, pool and stack rows go into the store
        now at that path, with everything recorded after."""
        caplog.set_level(logging.WARNING, logger="poolscope")
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, name="orders")
        _work(engine)
        assert monitor.flush() is True
        if how == "deleted":
            for path in store_path.parent.glob(store_path.name + "*"):
                path.unlink()
        else:
            other = store_path.with_name("other.db")
            _store.connect_for_writing(other).close()
            other.replace(store_path)
        for _ in range(2):
            _work(engine)
        held = _hold(engine)
        assert monitor.flush() is True
        assert monitor.dropped == 0
        assert query(store_path, "SELECT name FROM pools") == [("orders",)]
        assert query(store_path, "SELECT count(*) FROM processes") == [(1,)]
        assert _checkouts_by_site(store_path) == {
            site_of(_work, "<- work"): 2,
            site_of(_hold, "<- hold"): 1,
        }
        assert _never_returned_sites(store_path) == [site_of(_hold, "<- hold")]
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "deleted or replaced" in messages[0], messages
        held.close()
        engine.dispose()


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, with ``env`` added to (or, as "", removed from)
    this one's environment."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("POOLSCOPE_")}
    full.update(env)
    full = {k: v for k, v in full.items() if v}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=full
    )


_RECORD_SOME = """
import sqlite3, sys, tempfile
import sqlalchemy as sa
import instrument
from instrument import _hooks, _writer

d = tempfile.mkdtemp()
engine = sa.create_engine(f"sqlite:///{d}/app.db")
monitor = instrument.attach(engine, store=f"{d}/store.db")
for _ in range(3):
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
assert monitor.flush()
rows = sqlite3.connect(f"{d}/store.db").execute(
    "SELECT kind, thread, task, hold_s IS NULL FROM events ORDER BY id").fetchall()
print(_hooks.HotPath is not None, _writer.sqlite_rows is not None, rows)
"""


class TestNativeHelpers:
    def test_each_helper_reports_the_record_contract_python_defines(self, store_path: Path) -> None:
        """Each built C helper was compiled with the record width, field positions, NO_SIZE
        and open-checkout entry that ``_record`` defines, and those match the columns of
        the ``events`` table a new store has."""
        from instrument import _native, _record

        _store.connect_for_writing(store_path).close()
        table = [row[1] for row in query(store_path, "PRAGMA table_info(events)")]
        renamed = {"pool": "pool_id", "stack": "stack_id"}
        assert _record.LAYOUT["width"] == len(_record.RECORD_FIELDS) == 16
        assert [renamed.get(f, f) for f in _record.RECORD_FIELDS] == [
            c for c in table if c not in ("id", "process_id")
        ]
        assert sorted(table) == sorted(["id", *_record.EVENT_COLUMNS])
        built = 0
        for name in _native.HELPERS:
            try:
                module = importlib.import_module(f"instrument.{name}")
            except ImportError:
                continue
            assert module.layout() == _record.LAYOUT, name
            built += 1
        if not built and os.environ.get("CI"):
            pytest.fail("no C helper is built; CI builds them", pytrace=False)

    def test_a_helper_built_for_another_layout_is_left_off_with_a_warning(self) -> None:
        """A C helper whose layout differs from the record contract is not used: the
        pure-Python path writes the same rows, and a WARNING on logger ``poolscope`` says
        which helper is off and why."""
        if importlib.util.find_spec("instrument._speedups") is None:
            pytest.skip("the C helpers are not built")
        patch = "from instrument import _record\n_record.LAYOUT = {**_record.LAYOUT, 'width': 17}\n"
        proc = _run_python(patch + _RECORD_SOME)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("False False ")
        assert "('checkout', 'MainThread', None, 1)" in proc.stdout
        assert "('checkin', 'MainThread', None, 0)" in proc.stdout
        assert "C helper _speedups is off (built for another record layout" in proc.stderr
        assert "C helper _sqlite_rows is off (built for another record layout" in proc.stderr

    def test_require_cext_turns_a_refused_helper_into_an_import_error(self) -> None:
        """With ``POOLSCOPE_REQUIRE_CEXT=1`` a helper that cannot be used stops the import
        of the recorder with an ImportError naming it, rather than running without it."""
        if importlib.util.find_spec("instrument._speedups") is None:
            pytest.skip("the C helpers are not built")
        patch = (
            "from instrument import _record\n_record.LAYOUT = {**_record.LAYOUT, 'no_size': 1}\n"
        )
        proc = _run_python(patch + _RECORD_SOME, POOLSCOPE_REQUIRE_CEXT="1")
        assert proc.returncode == 1
        assert "ImportError: poolscope's C helper _speedups is required but off" in proc.stderr

    def test_no_cext_turns_both_helpers_off_and_version_says_which_are_loaded(self) -> None:
        """``POOLSCOPE_NO_CEXT=1`` records through pure Python, the same rows, without a
        warning; ``poolscope --version`` says for each helper whether it is loaded."""
        proc = _run_python(_RECORD_SOME, POOLSCOPE_NO_CEXT="1")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("False False ")
        assert "('checkin', 'MainThread', None, 0)" in proc.stdout
        assert proc.stderr == ""
        version = (
            "import sys; from instrument.cli import main; sys.argv[1:] = ['--version']; main()"
        )
        off = _run_python(version, POOLSCOPE_NO_CEXT="1")
        assert off.stdout.splitlines() == [
            f"poolscope, version {instrument.__version__}",
            "C helper _speedups: off (POOLSCOPE_NO_CEXT is set)",
            "C helper _sqlite_rows: off (POOLSCOPE_NO_CEXT is set)",
        ]
        on = _run_python(version)
        built = importlib.util.find_spec("instrument._speedups") is not None
        if built or os.environ.get("CI"):
            assert on.stdout.splitlines()[1:] == [
                "C helper _speedups: loaded",
                "C helper _sqlite_rows: loaded",
            ]

    @pytest.mark.parametrize("recorder_impl", ["c"], indirect=True)
    def test_a_batch_the_c_handle_cannot_write_is_rolled_back_whole(
        self, recorder_impl: str, sqlite_url: str, store_path: Path
    ) -> None:
        """The C inserter writes the common batch through a SQLite handle of its own on the
        store; a batch it cannot write is rolled back whole (no row, no heartbeat, no
        transaction left open) and counted as dropped, and the next batches go in."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)

        def work(times: int) -> None:  # from one thread's stack each time: no new stack row
            worker = threading.Thread(target=_work_times, args=(engine, times), name="worker")
            worker.start()
            worker.join()

        work(1)
        assert monitor.flush() is True
        writer = monitor._writer
        handle = writer._c_store
        assert handle is not None
        assert os.path.realpath(handle.filename()) == os.path.realpath(store_path)
        (beat,) = query(store_path, "SELECT heartbeat_at FROM processes")[0]
        with writer._io_lock:
            handle.execute("PRAGMA query_only = ON")  # this handle alone may not write
            work(3)
        assert monitor.flush() is True
        assert monitor.dropped == 6
        assert query(store_path, "SELECT count(*) FROM events") == [(3,)]  # the first work
        assert query(store_path, "SELECT heartbeat_at FROM processes") == [(beat,)]
        with writer._io_lock:
            handle.execute("PRAGMA query_only = OFF")
        work(1)  # with the drop count: through the sqlite3 connection
        assert monitor.flush() is True
        work(1)  # the common batch again: through the C handle
        assert monitor.flush() is True
        assert writer._c_store is handle
        kinds = query(store_path, "SELECT kind, count FROM events ORDER BY id")
        done = [("checkout", None), ("checkin", None)]
        assert kinds[3:] == [*done, ("dropped", 6), *done]
        engine.dispose()


@pytest.mark.usefixtures("recorder_impl")
class TestNamesThatAreNotUtf8:
    """A name holding a lone surrogate (how Python holds a file name's undecodable byte) is
    written as valid text, its byte as ``\\xff`` (another surrogate as ``\\ud800``)."""

    @staticmethod
    def _threaded(engine: sa.Engine, name: str) -> None:
        worker = threading.Thread(target=_work, args=(engine,), name=name)
        worker.start()
        worker.join()

    @pytest.mark.parametrize(
        ("name", "written"), [("orders\udcff", "orders\\xff"), ("orders\ud800", "orders\\ud800")]
    )
    def test_pool_name(self, name: str, written: str, sqlite_url: str, store_path: Path) -> None:
        """The pool row and every event are written; later batches too."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, name=name)
        _work(engine)
        assert monitor.flush() is True
        _work(engine)
        assert monitor.flush() is True
        engine.dispose()
        assert query(store_path, "SELECT name FROM pools") == [(written,)]
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(2,)]
        assert monitor.dropped == 0

    def test_application_database_file_name(self, tmp_path: Path, store_path: Path) -> None:
        """attach() takes an engine on a file whose name is not UTF-8, and records it."""
        app_db = tmp_path / os.fsdecode(b"app\xff.db")
        engine = sa.create_engine(f"sqlite:///{app_db}")
        monitor = instrument.attach(engine, store=store_path)
        _work(engine)
        assert monitor.flush() is True
        engine.dispose()
        [(name, url)] = query(store_path, "SELECT name, url FROM pools")
        # SQLAlchemy 2.1 quotes the backslash in a rendered URL; 2.0 leaves it.
        assert name == "app\\xff.db" and url.endswith(("app%5Cxff.db", "app\\xff.db"))
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(1,)]
        assert monitor.dropped == 0

    def test_store_file_name(self, tmp_path: Path, sqlite_url: str) -> None:
        """A store whose file name is not UTF-8 is written under that very name."""
        store = tmp_path / os.fsdecode(b"store\xff.db")
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store)
        _work(engine)
        assert monitor.flush() is True
        engine.dispose()
        assert os.listdir(os.fsencode(tmp_path)).count(b"store\xff.db") == 1
        assert query(store, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(1,)]

    def test_source_path(self, tmp_path: Path, sqlite_url: str, store_path: Path) -> None:
        """A checkout from a module whose file name is not UTF-8 has its site, and the
        batches after it are written."""
        source = tmp_path / os.fsdecode(b"jobs\xff.py")
        source.write_text(
            "def run(engine):\n    with engine.connect():\n        pass\n\n\n"
            "def hold(engine):\n    return engine.connect()\n"
        )
        spec = importlib.util.spec_from_file_location("jobs_not_utf8", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        module.run(engine)
        assert monitor.flush() is True
        held = module.hold(engine)
        assert [c.site[-21:] for c in monitor.open_checkouts()] == ["jobs\\xff.py:7 in hold"]
        held.close()
        _work(engine)
        assert monitor.flush() is True
        engine.dispose()
        sites = _checkouts_by_site(store_path)
        assert [n for site, n in sites.items() if site.endswith("jobs\\xff.py:2 in run")] == [1]
        assert len(sites) == 3 and monitor.dropped == 0

    @pytest.mark.parametrize(
        ("name", "written"), [("worker\udcff", "worker\\xff"), ("worker\ud800", "worker\\ud800")]
    )
    def test_thread_name(self, name: str, written: str, sqlite_url: str, store_path: Path) -> None:
        """The thread's checkouts are written under its name, and the batches after them."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        self._threaded(engine, name)
        assert monitor.flush() is True
        self._threaded(engine, "next")
        assert monitor.flush() is True
        engine.dispose()
        rows = query(
            store_path, "SELECT kind, thread FROM events WHERE kind LIKE 'check%' ORDER BY id"
        )
        assert rows == [
            ("checkout", written),
            ("checkin", written),
            ("checkout", "next"),
            ("checkin", "next"),
        ]
        assert monitor.dropped == 0 and not _failures.failures

    def test_task_name(self, tmp_path: Path, store_path: Path) -> None:
        """An asyncio task's checkouts are written under its name."""
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        monitor = instrument.attach(engine, store=store_path)

        async def use_connection() -> None:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("select 1")

        async def main() -> None:
            try:
                await asyncio.create_task(use_connection(), name="task\udcff")
            finally:
                await engine.dispose()

        asyncio.run(main())
        assert monitor.flush() is True
        rows = query(
            store_path, "SELECT kind, task FROM events WHERE kind LIKE 'check%' ORDER BY id"
        )
        assert rows == [("checkout", "task\\xff"), ("checkin", "task\\xff")]
        assert monitor.dropped == 0


@pytest.mark.parametrize("recorder_impl", ["c"], indirect=True)  # a list is written so anyway
def test_queue_is_written_where_the_c_inserter_cannot_reach_the_store(
    recorder_impl: str,
    sqlite_url: str,
    store_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the C inserter cannot open its own handle on the store (or the one it opens
    names another file), the records queued as C values are written through the sqlite3
    module instead, text and NULLs intact."""
    monkeypatch.setattr(_writer, "_open_c_store", lambda rows, path: None)
    engine = sa.create_engine(sqlite_url)
    monitor = instrument.attach(engine, store=store_path)
    assert not isinstance(monitor._writer.queue, list)
    done = threading.Event()

    def work() -> None:
        with engine.connect():
            pass
        done.set()

    threading.Thread(target=work, name="wörker").start()
    assert done.wait(10)
    monitor.flush()
    engine.dispose()
    assert monitor._writer._c_store is None
    rows = query(
        store_path,
        "SELECT kind, thread, task, hold_s IS NOT NULL, stack_id IS NOT NULL "
        "FROM events WHERE kind IN ('checkout', 'checkin') ORDER BY id",
    )
    assert rows == [("checkout", "wörker", None, 0, 1), ("checkin", "wörker", None, 1, 1)]


@pytest.mark.parametrize("recorder_impl", ["c"], indirect=True)  # a list takes anything
def test_a_record_the_queue_cannot_hold_is_refused_whole(
    recorder_impl: str, sqlite_url: str, store_path: Path
) -> None:
    """A record with a value the C queue cannot hold is refused whole (the caller gets
    TypeError; a listener counts it as its own failure): nothing of it is written, and
    the records after it are written intact."""
    engine = sa.create_engine(sqlite_url)
    monitor = instrument.attach(engine, store=store_path)
    with engine.connect():
        pass
    writer = monitor._writer
    queued = len(writer.queue)
    null = _writer.NULL
    bad = (time.time(), monitor.pool_key, "close", null, null, "refused-thread", null)
    bad += (0, 0, 0, 0, null, null, null, null, object())
    with pytest.raises(TypeError):
        writer.emit(bad)
    assert len(writer.queue) == queued
    monitor._emit("close", thread="next-thread", task="next-task")
    monitor.flush()
    engine.dispose()
    rows = query(store_path, "SELECT kind, thread, task FROM events ORDER BY id")
    assert [k for k, _, _ in rows] == ["connect", "checkout", "checkin", "close"]
    assert rows[-1] == ("close", "next-thread", "next-task")
    assert not query(store_path, "SELECT 1 FROM events WHERE thread = 'refused-thread'")


class TestPrivacy:
    PASSWORD = "s3cr3t-pw"

    def test_password_never_stored(self, pg_url: str, store_path: Path) -> None:
        """The engine's password appears nowhere in the store's bytes; the URL shows ***."""
        url = sa.make_url(pg_url).set(password=self.PASSWORD)
        engine = sa.create_engine(url, pool_size=2)
        try:
            monitor = instrument.attach(engine, store=store_path)
            with engine.connect() as conn:  # trust auth accepts any password
                conn.exec_driver_sql("select 1")
            conn = engine.connect()
            conn.invalidate()
            conn.close()
            assert monitor.flush() is True
            assert self.PASSWORD.encode() not in store_bytes(store_path)
        finally:
            engine.dispose()
        _writer.shutdown_all(timeout=10.0, reason="exit")  # checkpoints the WAL into the file
        assert self.PASSWORD.encode() not in store_bytes(store_path)
        masked = url.render_as_string(hide_password=True)
        assert "***" in masked
        assert query(store_path, "SELECT url FROM pools") == [(masked,)]

    def test_secret_query_values_are_masked(self) -> None:
        """Secret-looking query values in a URL are masked like the password."""
        url = sa.make_url(
            "postgresql+psycopg://app:pw1@db/shop"
            "?sslpassword=pw2%2F%26x&sslmode=require&api_token=t1&api_token=t2"
        )
        assert url.query["sslpassword"] == "pw2/&x"
        masked = _hooks.mask_url(url)
        assert masked == (  # SQLAlchemy renders the query keys sorted
            "postgresql+psycopg://app:***@db/shop"
            "?api_token=***&api_token=***&sslmode=require&sslpassword=***"
        )

    def test_password_on_the_command_line_never_stored(
        self, tmp_path: Path, store_path: Path
    ) -> None:
        """A database URL or --password given on the command line is masked in ``processes``."""
        script = tmp_path / "app.py"
        script.write_text(
            "import sys, sqlalchemy as sa, instrument\n"
            f"engine = sa.create_engine('sqlite:///{tmp_path / 'app.db'}')\n"
            f"instrument.attach(engine, store={str(store_path)!r})\n"
            "with engine.connect():\n"
            "    pass\n"
        )
        argv = [
            str(script),
            f"--db=postgresql+psycopg://app:{self.PASSWORD}@db/shop",
            "--password",
            self.PASSWORD,
            f"PGPASSWORD={self.PASSWORD}",
        ]
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert self.PASSWORD.encode() not in store_bytes(store_path)
        ((stored,),) = query(store_path, "SELECT argv FROM processes")
        assert json.loads(stored) == [
            str(script),
            "--db=postgresql+psycopg://app:***@db/shop",
            "--password",
            "***",
            "PGPASSWORD=***",
        ]

    def test_secrets_of_every_shape_never_stored(self, tmp_path: Path, store_path: Path) -> None:
        """Every shape of secret on a real process's command line is absent from the raw bytes
        of the store, its WAL and its shared memory, both while the process runs and after."""
        secret = {n: f"x{n}-{uuid.uuid4().hex[:10]}" for n in range(1, 17)}
        url_password = f"{secret[9]}/{secret[10]}@{secret[11]}:{secret[12]}"
        argv = [
            "-p", secret[1], f"-p{secret[2]}", "--pass", secret[3], "--pwd", secret[4],
            "--db-pass", secret[5], "--api-key", secret[6], "--passphrase", secret[7],
            f"--auth-token={secret[8]}", f"postgresql://app:{url_password}@db/shop",
            f"password={secret[13]} {secret[14]}", "--password", f"{secret[15]} {secret[16]}",
            "password='two", "words'", "--keep-raw", "60",
        ]  # fmt: skip
        words = ("two", "words'")  # the quoted value split in two: a word of its own each
        script = tmp_path / "app.py"
        script.write_text(
            "import sys, sqlalchemy as sa, instrument\n"
            f"engine = sa.create_engine('sqlite:///{tmp_path / 'app.db'}')\n"
            f"monitor = instrument.attach(engine, store={str(store_path)!r})\n"
            "conn = engine.connect()\n"
            "monitor.flush()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
            "conn.close()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, str(script), *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout.readline() == "ready\n", proc.stderr.read()
            assert Path(f"{store_path}-wal").stat().st_size > 0  # the rows are in the WAL now
            running = store_bytes(store_path)
        finally:
            _, err = proc.communicate("", timeout=60)
        assert proc.returncode == 0, err
        for data in (running, store_bytes(store_path)):
            leaked = [s for s in [*secret.values(), *words] if s.encode() in data]
            assert leaked == []
        ((stored,),) = query(store_path, "SELECT argv FROM processes")
        assert json.loads(stored) == [
            str(script), "-p", "***", "-p***", "--pass", "***", "--pwd", "***",
            "--db-pass", "***", "--api-key", "***", "--passphrase", "***",
            "--auth-token=***", "postgresql://app:***@db/shop", "password=***", "--password",
            "***", "password=***", "***", "--keep-raw", "60",
        ]  # fmt: skip

    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            (["run", "postgresql://u:p@ss@h/db"], ["run", "postgresql://u:***@h/db"]),
            (["run", "pg://u:a/b:c@d@h:5/db"], ["run", "pg://u:***@h:5/db"]),
            (
                ["x", "mysql://u:pw@h/d?ssl_key=k&api_token=t&port=1"],
                ["x", "mysql://u:***@h/d?ssl_key=***&api_token=***&port=1"],
            ),
            (["x", "a://u:p@h b://v:q@h2"], ["x", "a://u:***@h b://v:***@h2"]),
            (["x", "--db-password", "pw", "next"], ["x", "--db-password", "***", "next"]),
            (["x", "--secret=pw", "-v"], ["x", "--secret=***", "-v"]),
            (
                ["x", "-p", "pw", "-pHUNTER2", "-P", "5432"],
                ["x", "-p", "***", "-p***", "-P", "5432"],
            ),
            (["x", "PGPASSWORD=pw", "user=bob"], ["x", "PGPASSWORD=***", "user=bob"]),
            (["x", "--password='a", "b", "c'", "d"], ["x", "--password=***", "***", "***", "d"]),
            (["x", "--no-auth", "--token", "t", "y"], ["x", "--no-auth", "***", "***", "y"]),
            (["x", "Authorization: Bearer t"], ["x", "Authorization: ***"]),
            (
                ["sh", "-c", "app --password pw --user bob"],
                ["sh", "-c", "app --password *** --user bob"],
            ),
            (
                ["x", "--monkey", "3", "--keep-raw", "60"],
                ["x", "--monkey", "***", "--keep-raw", "60"],
            ),
            (["x", "user@example.com", "http://h/a@b"], ["x", "user@example.com", "http://h/a@b"]),
            (["x", "http://h:8080/p", "--port", "80"], ["x", "http://h:8080/p", "--port", "80"]),
        ],
    )
    def test_argv_masking(self, argv: list[str], expected: list[str]) -> None:
        """Secrets in a command line are masked by the documented rule; other words are kept."""
        assert _writer.masked_argv(argv) == expected

    def test_argv_masking_is_linear(self) -> None:
        """A huge word on the command line is masked in well under a second."""
        n = 20_000
        words = ["a" * n, "-" * n, "key" * (n // 3) + "!", "a." * (n // 2), "x://a:b" * (n // 7)]
        started = time.perf_counter()
        masked = _writer.masked_argv(["x", *words])
        assert time.perf_counter() - started < 1.0
        assert masked[:5] == ["x", *words[:4]]

    @pytest.mark.parametrize("name", ["sslpassword", "passfile", "sslkey", "x_auth", "client_pw"])
    def test_one_word_list_for_argv_and_url_queries(self, name: str) -> None:
        """A name that is secret on the command line is secret in a URL query too."""
        assert _writer.masked_argv([f"--{name}=v"]) == [f"--{name}=***"]
        url = sa.make_url(f"postgresql://u@h/db?{name}=v&sslmode=require")
        masked = sa.make_url(_hooks.mask_url(url))
        assert dict(masked.query) == {name: "***", "sslmode": "require"}

    def test_sql_and_parameters_never_stored(self, make_engine, store_path: Path) -> None:
        """Neither statements nor their bound parameters reach the store."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path)
        table = unique_table()
        secret = f"param-{uuid.uuid4().hex}"
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (v VARCHAR(100))")
            conn.execute(sa.text(f"INSERT INTO {table} (v) VALUES (:v)"), {"v": secret})
            found = conn.execute(sa.text(f"SELECT v FROM {table} WHERE v = :v"), {"v": secret})
            assert found.scalar() == secret
            conn.exec_driver_sql(f"DROP TABLE {table}")
        monitor.flush()
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(1,)]
        data = store_bytes(store_path)
        assert secret.encode() not in data
        assert table.encode() not in data


WORKER = """\
import os
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import sqlalchemy as sa

import instrument

store, app_db, go, checkouts = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
engine = sa.create_engine(f"sqlite:///{app_db}", pool_size=2, max_overflow=0)
instrument.attach(engine, store=store, name=f"proc-{os.getpid()}")
print("ready", os.getpid(), flush=True)
while not go.exists():
    time.sleep(0.005)


def work():
    for _ in range(checkouts // 2):
        with engine.connect() as conn:  # <- worker checkout
            conn.exec_driver_sql("select 1")


threads = [threading.Thread(target=work, name=f"w{i}") for i in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("connections", engine.pool.checkedin(), flush=True)
"""


class TestManyProcesses:
    def test_four_processes_share_one_store(self, tmp_path: Path, store_path: Path) -> None:
        """Four processes writing one store concurrently lose no event, each under its own
        process row, ended cleanly."""
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        go = tmp_path / "go"
        per_process = 2000
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(store_path),
                    str(tmp_path / f"app{i}.db"),
                    str(go),
                    str(per_process),
                ],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        try:
            pids = []
            for proc in procs:
                word, pid = proc.stdout.readline().split()
                assert word == "ready"
                pids.append(int(pid))
            go.touch()  # all four are attached: start together
            connections = {}
            for pid, proc in zip(pids, procs, strict=True):
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
                assert "Traceback" not in err, err
                word, n = out.split()
                assert word == "connections"
                connections[pid] = int(n)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()

        processes = query(store_path, "SELECT id, pid, end_reason, ended_at FROM processes")
        assert sorted(p[1] for p in processes) == sorted(pids)
        assert all(p[2] == "exit" and p[3] is not None for p in processes)
        assert query(store_path, "SELECT count(DISTINCT process_id), count(*) FROM pools") == [
            (4, 4)
        ]
        for process_id, pid, _, _ in processes:
            assert query(store_path, "SELECT name FROM pools WHERE process_id = ?", process_id) == [
                (f"proc-{pid}",)
            ]
            kinds = dict(
                query(
                    store_path,
                    "SELECT kind, count(*) FROM events WHERE process_id = ? GROUP BY kind",
                    process_id,
                )
            )
            (dropped,) = query(
                store_path,
                "SELECT coalesce(sum(count), 0) FROM events "
                "WHERE process_id = ? AND kind = 'dropped'",
                process_id,
            )[0]
            kinds.pop("dropped", None)
            expected = {
                "connect": connections[pid],
                "checkout": per_process,
                "checkin": per_process,
            }
            if dropped:  # each lost record is counted, none vanishes silently
                assert sum(kinds.values()) + dropped == sum(expected.values())
            else:
                assert kinds == expected
            (unpaired,) = query(
                store_path,
                "SELECT count(*) FROM checkouts WHERE process_id = ? AND returned_at IS NULL",
                process_id,
            )[0]
            assert unpaired == 0 or dropped
        # The same line in four processes is one stack: fingerprints are stable across them.
        marker = next(i for i, line in enumerate(WORKER.splitlines(), 1) if "<- worker" in line)
        assert query(
            store_path,
            "SELECT DISTINCT s.site FROM events e JOIN stacks s ON s.id = e.stack_id",
        ) == [(f"worker.py:{marker} in work",)]
        assert query(store_path, "SELECT count(*) FROM stacks") == [(1,)]


class TestCaptureEvents:
    def test_event_fields_are_the_documented_ones(self) -> None:
        """EVENT_FIELDS is public: derived from the store's columns, it must not change
        silently when the schema does."""
        assert EVENT_FIELDS == (
            "at", "kind", "pool", "connection_id", "checkout_id", "thread", "task", "in_use",
            "idle", "overflow", "waiters", "wait_s", "connect_s", "hold_s", "count", "site",
            "stack",
        )  # fmt: skip

    def test_captures_the_blocks_events(self, sqlite_url: str, in_repo_root: Path) -> None:
        """capture_events() fills its list on exit with the block's events, then detaches."""
        engine = sa.create_engine(sqlite_url)
        try:
            with capture_events(engine) as events:
                with engine.connect() as conn:  # <- captured
                    conn.exec_driver_sql("select 1")
                assert events == []
            assert [e["kind"] for e in events] == ["connect", "checkout", "checkin"]
            assert all(tuple(e) == EVENT_FIELDS for e in events)
            marker = "<- " + "captured"  # split, so only the comment above matches
            site = site_of(TestCaptureEvents.test_captures_the_blocks_events, marker)
            checkout, checkin = events[1], events[2]
            assert checkout["site"] == checkin["site"] == site
            assert checkout["stack"][0] == site
            assert checkout["checkout_id"] == checkin["checkout_id"]
            assert checkin["hold_s"] >= 0 and checkout["thread"] == "MainThread"
            assert events[0]["site"] is None and events[0]["stack"] == []
            assert _hooks._monitors.get(engine) is None
            assert not any(t.name.startswith("poolscope-writer") for t in threading.enumerate())
        finally:
            engine.dispose()

    def test_attached_engine_keeps_its_monitor(self, sqlite_url: str, store_path: Path) -> None:
        """On an engine attached earlier, only the block's events are returned and the
        monitor stays attached."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, name="kept")
        with engine.connect():
            pass
        with capture_events(engine) as events, engine.connect():
            pass
        assert [e["kind"] for e in events] == ["checkout", "checkin"]
        assert {e["pool"] for e in events} == {"kept"}
        assert monitor.attached
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(2,)]
        engine.dispose()

    def test_async_engine(self, tmp_path: Path) -> None:
        """An AsyncEngine's events carry the task that checked the connection out."""
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")

        async def main() -> None:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("select 1")
            await engine.dispose()

        with capture_events(engine) as events:
            asyncio.run(main())
        checkouts = [e for e in events if e["kind"] in ("checkout", "checkin")]
        assert [e["kind"] for e in checkouts] == ["checkout", "checkin"]
        assert checkouts[0]["task"] is not None
        assert checkouts[0]["task"] == checkouts[1]["task"]

    def test_bad_arguments_leave_nothing_behind(
        self, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A rejected argument raises before the block runs and leaves no temporary store."""
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        engine = sa.create_engine(sqlite_url)
        with pytest.raises(ValueError, match="leak_after"), capture_events(engine, leak_after=-1):
            pytest.fail("the block must not run")
        assert not list(tmp_path.glob("poolscope-capture-*"))
        assert _hooks._monitors.get(engine) is None

    def test_events_are_returned_when_the_block_raises(self, sqlite_url: str) -> None:
        """An exception in the block propagates, and the events are still filled in."""
        engine = sa.create_engine(sqlite_url)
        with pytest.raises(ZeroDivisionError), capture_events(engine) as events, engine.connect():
            1 / 0  # noqa: B018
        assert [e["kind"] for e in events] == ["connect", "checkout", "checkin"]
        engine.dispose()


class _TrackedConnection(sqlite3.Connection):
    """A DBAPI connection that can be referenced weakly (``sqlite3.Connection`` cannot)."""

    opened: list[weakref.ref] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _TrackedConnection.opened.append(weakref.ref(self))


def _count_live(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


@pytest.mark.usefixtures("recorder_impl")
class TestDroppedEnginesAreFreed:
    """An attached engine, its pool and its DBAPI connections are freed as without poolscope."""

    def _engines(self, tmp_path: Path, count: int, attach_to: Path | None) -> list:
        """Make, use and drop ``count`` engines; return weak references to them, their pools
        and their monitors."""
        _TrackedConnection.opened = []
        refs: list[tuple[weakref.ref, weakref.ref]] = []
        monitors = []
        for i in range(count):
            engine = sa.create_engine(
                f"sqlite:///{tmp_path / f'app{i % 4}.db'}",
                connect_args={"factory": _TrackedConnection},
            )
            if attach_to is not None:
                monitors.append(weakref.ref(instrument.attach(engine, store=attach_to)))
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
            refs.append((weakref.ref(engine), weakref.ref(engine.pool)))
            del engine, conn
        return [r for pair in refs for r in pair] + monitors

    def test_two_hundred_dropped_engines_are_freed(self, tmp_path: Path, store_path: Path) -> None:
        """200 attached engines, once dropped, leave no engine, pool, DBAPI connection or
        monitor alive after a collection, and every checkout they made is in the store."""
        bare = self._engines(tmp_path, 200, attach_to=None)
        assert _count_live(bare) == 0 and _count_live(_TrackedConnection.opened) == 0

        refs = self._engines(tmp_path, 200, attach_to=store_path)
        assert len(_TrackedConnection.opened) == 200
        # A batch the writer has under way may still hold a dropped pool's monitor: let it end.
        writer = _writer.get_writer(store_path)
        assert writer.flush()
        assert _count_live(refs) == 0
        assert _count_live(_TrackedConnection.opened) == 0
        assert len(writer.ticking) == 0 and not _hooks._monitors.values()
        assert writer.flush()
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(200,)]
        assert query(store_path, "SELECT count(*) FROM pools") == [(200,)]

    def test_kept_monitor_of_a_disposed_engine(self, tmp_path: Path, store_path: Path) -> None:
        """A monitor the application keeps lets its disposed and dropped engine, pool and
        connections go, then reports itself detached; detach() and flush() still work."""
        _TrackedConnection.opened = []
        engine = sa.create_engine(
            f"sqlite:///{tmp_path / 'app.db'}", connect_args={"factory": _TrackedConnection}
        )
        monitor = instrument.attach(engine, store=store_path)
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        refs = [weakref.ref(engine), weakref.ref(engine.pool)]
        engine.dispose()
        refs.append(weakref.ref(engine.pool))
        assert monitor.attached
        del engine, conn
        assert _count_live(refs) == 0 and _count_live(_TrackedConnection.opened) == 0
        assert not monitor.attached and monitor.open_checkouts() == []
        monitor.detach()
        assert monitor.flush()
        kinds = query(store_path, "SELECT kind FROM events ORDER BY id")
        assert kinds == [("connect",), ("checkout",), ("checkin",), ("close",)]

    def test_dropped_postgres_engines_close_their_server_connections(
        self, pg_url: str, store_path: Path
    ) -> None:
        """20 attached PostgreSQL engines, once dropped, leave no server connection open."""
        app_name = "poolscope_" + uuid.uuid4().hex[:12]
        probe = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)

        def server_connections() -> int:
            with probe.connect() as conn:
                return conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (app_name,),
                ).scalar_one()

        baseline = server_connections()
        engines = []
        for _ in range(20):
            engine = sa.create_engine(pg_url, connect_args={"application_name": app_name})
            instrument.attach(engine, store=store_path)
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
            engines.append(engine)
        assert server_connections() == baseline + 20  # each engine keeps its idle connection
        refs = [weakref.ref(engine) for engine in engines]
        del engines, engine, conn
        assert _count_live(refs) == 0
        deadline = time.monotonic() + 10
        while server_connections() != baseline and time.monotonic() < deadline:
            time.sleep(0.05)  # the server ends a backend shortly after its client hangs up
        assert server_connections() == baseline
        probe.dispose()


class TestPoolStateUntouched:
    """Attaching leaves no state of poolscope's on the pool object."""

    POOLS = (
        (QueuePool, {"pool_size": 8, "max_overflow": 10, "timeout": 25, "use_lifo": True}),
        (QueuePool, {}),
        (sa.pool.NullPool, {}),
        (sa.pool.SingletonThreadPool, {}),
        (sa.pool.StaticPool, {}),
        (sa.pool.AssertionPool, {}),
    )

    @pytest.mark.usefixtures("recorder_impl")
    @pytest.mark.parametrize(
        ("pool_cls", "pool_args"), POOLS, ids=lambda x: getattr(x, "__name__", "")
    )
    def test_recreated_pool_equals_its_origin(self, pool_cls, pool_args, store_path: Path) -> None:
        """An attached pool's __dict__ gains only names its class has, and a pool it recreates
        has the same __dict__ as its origin (SQLAlchemy's own test_recreate_state)."""
        from sqlalchemy.engine import default

        creator = object()
        p1 = pool_cls(
            creator=creator,
            pre_ping=True,
            reset_on_return="commit",
            recycle=35,
            logging_name="somepool",
            dialect=default.DefaultDialect(),
            echo="debug",
            **pool_args,
        )
        cls_keys = set(dir(pool_cls))
        keys_before = set(vars(p1))
        monitor = instrument.attach(p1, store=store_path)
        assert set(vars(p1)) <= keys_before | cls_keys

        d1 = dict(vars(p1))
        p2 = p1.recreate()
        d2 = dict(vars(p2))
        for key in cls_keys:
            d1.pop(key, None)
            d2.pop(key, None)
        for key in ("_invoke_creator", "_pool", "_overflow_lock", "_fairy", "_conn", "logger"):
            if key in d2:
                d2[key] = mock.ANY
        assert d1 == d2
        creator_before = vars(p1)["_invoke_creator"].__wrapped__
        monitor.detach()
        for pool in (p1, p2):  # ("dispatch": SQLAlchemy's own, made by any listener)
            assert set(vars(pool)) - {"dispatch"} == keys_before
        assert vars(p1)["_invoke_creator"] is creator_before


@pytest.mark.usefixtures("recorder_impl")
class TestDetachKeepsTheApplicationsCreator:
    """detach() puts back only the hooks that are still poolscope's."""

    def test_creator_set_after_attach_survives_detach(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A creator the application set on the pool after attaching is still the one used
        to connect after detach()."""
        engine = sa.create_engine(sqlite_url, poolclass=sa.pool.NullPool)
        monitor = instrument.attach(engine, store=store_path)
        path = sqlite_url.removeprefix("sqlite:///")
        calls = []

        def new_creator():
            calls.append(1)
            return sqlite3.connect(path)

        engine.pool._creator = new_creator
        short_checkouts(engine)
        monitor.detach()
        short_checkouts(engine)
        assert len(calls) == 2
        assert vars(engine.pool)["_invoke_creator"] is not None
        assert "_do_get" not in vars(engine.pool) and "recreate" not in vars(engine.pool)
        engine.dispose()

    def test_hooks_replaced_after_attach_survive_detach(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A _do_get or recreate the application set on the pool after attaching stays."""
        engine = sa.create_engine(sqlite_url)
        pool = engine.pool
        monitor = instrument.attach(engine, store=store_path)
        do_get, recreate = pool._do_get, pool.recreate

        def own_do_get():
            return do_get()

        def own_recreate():
            return recreate()

        pool._do_get, pool.recreate = own_do_get, own_recreate
        monitor.detach()
        assert vars(pool)["_do_get"] is own_do_get and vars(pool)["recreate"] is own_recreate
        short_checkouts(engine)
        engine.dispose()


@pytest.mark.usefixtures("recorder_impl")
class TestEngineAndItsPool:
    """An engine and its own pool are one pool: attaching both gives one monitor."""

    @pytest.mark.parametrize("pool_first", [False, True], ids=["engine-first", "pool-first"])
    def test_engine_and_its_pool_are_recorded_once(
        self, sqlite_url: str, store_path: Path, pool_first: bool
    ) -> None:
        """attach(engine) and attach(engine.pool), in either order, return the same monitor,
        and each checkout is recorded once, under one pool."""
        engine = sa.create_engine(sqlite_url)
        targets = [engine.pool, engine] if pool_first else [engine, engine.pool]
        first = instrument.attach(targets[0], store=store_path)
        second = instrument.attach(targets[1], store=store_path)
        assert second is first
        short_checkouts(engine, 5)
        first.flush()
        assert query(store_path, "SELECT count(*) FROM pools") == [(1,)]
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(5,)]
        assert query(store_path, "SELECT count(*) FROM events WHERE kind = 'checkin'") == [(5,)]
        engine.dispose()

    def test_capture_events_on_an_engine_whose_pool_is_attached(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """capture_events(engine) uses the monitor of the engine's pool, once, and leaves it
        attached."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine.pool, store=store_path)
        with capture_events(engine) as events:
            short_checkouts(engine)
        assert [e["kind"] for e in events] == ["connect", "checkout", "checkin"]
        assert monitor.attached
        engine.dispose()


class TestPublicHandles:
    def test_monitor_of_finds_the_monitor_without_attaching(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """monitor_of() returns None for an engine not attached (and attaches nothing), and
        the engine's monitor for the engine and for its pool once attached."""
        engine = sa.create_engine(sqlite_url)
        assert instrument.monitor_of(engine) is None and not store_path.exists()
        monitor = instrument.attach(engine, store=store_path)
        assert instrument.monitor_of(engine) is monitor
        assert instrument.monitor_of(engine.pool) is monitor
        monitor.detach()
        assert instrument.monitor_of(engine) is None
        engine.dispose()

    def test_store_ids_name_the_rows_events_carry(self, sqlite_url: str, store_path: Path) -> None:
        """store_ids is (process_id, pool_id) of the monitor's events once written."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path)
        short_checkouts(engine, 2)
        assert monitor.flush() is True
        ids = monitor.store_ids
        assert ids is not None
        assert query(
            store_path,
            "SELECT count(*) FROM events "
            "WHERE kind = 'checkout' AND process_id = ? AND pool_id = ?",
            *ids,
        ) == [(2,)]
        engine.dispose()

    def test_close_stops_the_writer_only_when_no_other_monitor_uses_it(
        self, sqlite_url: str, tmp_path: Path
    ) -> None:
        """close() writes what is queued and stops the store's writer thread, unless another
        attached monitor still writes to that store, which then goes on recording."""
        store_path = tmp_path / f"close-{uuid.uuid4().hex[:8]}.db"  # names its writer thread
        first = sa.create_engine(sqlite_url)
        second = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
        m1 = instrument.attach(first, store=store_path, name="first")
        m2 = instrument.attach(second, store=store_path, name="second")
        writers = lambda: [t for t in threading.enumerate() if t.name.endswith(store_path.name)]  # noqa: E731
        short_checkouts(first)
        m1.close()
        assert not m1.attached and len(writers()) == 1
        short_checkouts(second)
        m2.close()
        assert writers() == []
        assert query(
            store_path,
            "SELECT p.name, count(*) FROM events e JOIN pools p ON p.id = e.pool_id "
            "WHERE e.kind = 'checkout' GROUP BY p.name ORDER BY p.name",
        ) == [("first", 1), ("second", 1)]
        first.dispose()
        second.dispose()
