"""Runtime detection on real databases: waits and timeouts, GC-returned leaks, the live
watchdog, forked and killed processes, and asyncio engines (issue 3)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import query, short_checkouts
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

import instrument
from instrument import _native, _writer, analysis

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

TIMEOUT_PREFIX = "QueuePool limit of size 2 overflow 1 reached, connection timed out, timeout 0.50"


def site_of(marker: str) -> str:
    """Return the site poolscope should record for the line of this file tagged ``marker``."""
    lines = HERE.read_text().splitlines()
    hits = [n for n, line in enumerate(lines, 1) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, f"marker {marker!r} must tag exactly one line"
    lineno = hits[0]
    func = None
    for line in reversed(lines[: lineno - 1]):
        m = re.match(r"\s*(?:async\s+)?def\s+(\w+)", line)
        if m:
            func = m.group(1)
            break
    rel = os.path.relpath(HERE, os.getcwd())
    return f"{rel}:{lineno} in {func}"


def events(store: Path, kind: str, *columns: str) -> list[tuple]:
    """Rows of ``kind`` events in insertion order, with ``columns`` (default: everything)."""
    cols = ", ".join(columns) if columns else "*"
    return query(store, f"SELECT {cols} FROM events WHERE kind = ? ORDER BY id", kind)


def site_of_stack(store: Path, stack_id: int | None) -> str | None:
    """The site of stack ``stack_id`` in ``store``."""
    rows = query(store, "SELECT site FROM stacks WHERE id = ?", stack_id)
    return rows[0][0] if rows else None


def returned_by(store: Path) -> list[str | None]:
    """How each checkout in ``store`` was returned (``None``: never), in checkout order."""
    return [r for (r,) in query(store, "SELECT returned_by FROM checkouts ORDER BY checkout_id")]


def leak_classes(store: Path) -> list[str]:
    """The leak classes the analysis (shared by report and dashboard) finds in ``store``."""
    conn = analysis.open_store(store)
    try:
        return sorted(analysis.leaks(conn)["leak_class"].astype(str))
    finally:
        conn.close()


class Holders:
    """Threads that each check out one connection and hold it until released."""

    def __init__(self, engine: sa.Engine, count: int) -> None:
        self._release = [threading.Event() for _ in range(count)]
        self._ready = threading.Barrier(count + 1, timeout=10)
        self._threads = [
            threading.Thread(target=self._hold, args=(engine, ev), name=f"holder-{i}")
            for i, ev in enumerate(self._release)
        ]
        for t in self._threads:
            t.start()
        self._ready.wait()

    def _hold(self, engine: sa.Engine, release: threading.Event) -> None:
        with engine.connect() as conn:  # holder
            conn.exec_driver_sql("select 1")
            self._ready.wait()
            release.wait(10)

    def release_one(self, index: int = 0) -> None:
        """Let holder ``index`` close its connection."""
        self._release[index].set()

    def release_all(self) -> None:
        """Let every holder close its connection, and wait for them."""
        for ev in self._release:
            ev.set()
        for t in self._threads:
            t.join(10)


@contextmanager
def held(engine: sa.Engine, count: int) -> Iterator[Holders]:
    """``count`` threads hold a connection each for the duration of the block."""
    holders = Holders(engine, count)
    try:
        yield holders
    finally:
        holders.release_all()


def small_pool(make_engine: Callable[..., sa.Engine]) -> sa.Engine:
    """An engine whose pool holds at most 3 connections and makes callers wait 0.5 s."""
    return make_engine(poolclass=QueuePool, pool_size=2, max_overflow=1, pool_timeout=0.5)


# -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("recorder_impl")
class TestTimeouts:
    def _exhaust(self, engine: sa.Engine) -> sa_exc.TimeoutError:
        """Three holders, then a fourth caller that times out; return what it got."""
        with held(engine, 3), pytest.raises(sa_exc.TimeoutError) as info:
            engine.connect()  # timeout-caller
        return info.value

    def _queue_behind(self, engine: sa.Engine) -> None:
        """Three holders; one releases after 0.2 s and a fourth caller gets its connection."""
        with held(engine, 3) as holders:
            timer = threading.Timer(0.2, holders.release_one)
            timer.start()
            with engine.connect() as conn:  # queued-caller
                conn.exec_driver_sql("select 1")
            timer.join()

    def test_fourth_caller_times_out_with_sqlalchemys_message(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """A caller that times out gets SQLAlchemy's own TimeoutError, and one timeout event
        records its wait, its stack and the waiters, before and after engine.dispose()."""
        engine = small_pool(make_engine)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        first = self._exhaust(engine)
        engine.dispose()
        second = self._exhaust(engine)
        monitor.flush()

        for error in (first, second):
            assert type(error) is sa_exc.TimeoutError
            assert str(error).startswith(TIMEOUT_PREFIX)
        rows = events(store_path, "timeout", "wait_s", "count", "stack_id", "thread")
        assert len(rows) == 2
        for wait_s, count, stack_id, thread in rows:
            assert 0.45 <= wait_s < 2.0
            assert count == 1
            assert thread == threading.current_thread().name
            assert site_of_stack(store_path, stack_id) == site_of("timeout-caller")

        conn = analysis.open_store(store_path)
        try:
            found = analysis.timeouts(conn)
        finally:
            conn.close()
        assert len(found) == 2
        for holders in found["holders"]:
            assert sorted(h["thread"] for h in holders) == ["holder-0", "holder-1", "holder-2"]
            assert {h["site"] for h in holders} == {site_of("holder")}

    def test_message_is_the_same_as_without_poolscope(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """The exception the application sees is identical with and without poolscope."""
        bare = self._exhaust(small_pool(make_engine))
        engine = small_pool(make_engine)
        instrument.attach(engine, store=store_path)
        hooked = self._exhaust(engine)
        assert type(hooked) is type(bare)
        assert str(hooked) == str(bare)
        assert hooked.args == bare.args

    def test_waits_recorded_on_queued_checkouts(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """A checkout that queued 0.2 s for a holder records wait_s of about 0.2 s, also after
        engine.dispose(); checkouts served at once record almost no wait."""
        engine = small_pool(make_engine)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        self._queue_behind(engine)
        engine.dispose()
        self._queue_behind(engine)
        monitor.flush()

        rows = query(
            store_path,
            "SELECT e.wait_s, s.site, e.waiters FROM events e JOIN stacks s ON s.id = e.stack_id "
            "WHERE e.kind = 'checkout' ORDER BY e.id",
        )
        queued = [r for r in rows if r[1] == site_of("queued-caller")]
        others = [r for r in rows if r[1] != site_of("queued-caller")]
        assert len(queued) == 2
        for wait_s, _, _ in queued:
            assert 0.12 <= wait_s < 0.5  # the release comes 0.2 s after the timer started
        assert len(others) == 6
        for wait_s, _, _ in others:
            assert wait_s < 0.1
        assert not events(store_path, "timeout")

    def test_connect_listeners_count_as_connect_time_not_wait(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """Opening a new connection, with the application's own connect listener (slow session
        setup here), is recorded as connect_s; nobody waited, so wait_s stays near zero."""
        engine = small_pool(make_engine)

        @sa.event.listens_for(engine, "connect")
        def _slow_session_setup(dbapi_connection: object, record: object) -> None:
            time.sleep(0.2)

        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        monitor.flush()
        ((wait_s, connect_s),) = events(store_path, "checkout", "wait_s", "connect_s")
        assert connect_s >= 0.2
        assert wait_s < 0.1

    def test_waiters_counted_while_queued(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """While callers queue for an exhausted pool, events report them as waiters."""
        engine = small_pool(make_engine)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        with held(engine, 3) as holders:
            timer = threading.Timer(0.2, holders.release_one)
            timer.start()
            with engine.connect():
                pass
            timer.join()
        monitor.flush()
        # The holder's checkin happened while the main thread was queued.
        waiters = [w for (w,) in events(store_path, "checkin", "waiters")]
        assert waiters[0] == 1
        assert waiters[-1] == 0

    def test_checkout_held_across_dispose_is_returned(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """A connection checked out before engine.dispose() and closed after it is recorded as
        a normal checkin of its own checkout, not as a leak."""
        engine = small_pool(make_engine)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        conn = engine.connect()  # held-across-dispose
        conn.exec_driver_sql("select 1")
        engine.dispose()
        with engine.connect() as other:
            other.exec_driver_sql("select 1")
        conn.close()
        monitor.flush()
        rows = query(
            store_path,
            "SELECT s.site, c.returned_by FROM checkouts c JOIN stacks s ON s.id = c.stack_id "
            "ORDER BY c.checkout_id",
        )
        assert rows[0] == (site_of("held-across-dispose"), "checkin")
        assert [r[1] for r in rows] == ["checkin", "checkin"]
        assert not monitor.open_checkouts()

    def test_connect_errors_pass_through_unchanged(self, tmp_path: Path, store_path: Path) -> None:
        """A connection that cannot be opened fails exactly as it would without poolscope,
        and records no checkout."""
        url = f"sqlite:///{tmp_path / 'missing-dir' / 'app.db'}"

        def failure(engine: sa.Engine) -> sa_exc.OperationalError:
            with pytest.raises(sa_exc.OperationalError) as info:
                engine.connect()
            return info.value

        bare = failure(sa.create_engine(url))
        engine = sa.create_engine(url)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        hooked = failure(engine)
        monitor.flush()
        assert type(hooked.orig) is type(bare.orig)
        assert str(hooked) == str(bare)
        assert not events(store_path, "checkout")
        assert not monitor.open_checkouts()

    def test_detach_restores_do_get(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """detach() takes poolscope's hook off the pool, also off the pool dispose() made."""
        engine = small_pool(make_engine)
        monitor = instrument.attach(engine, store=store_path)
        assert "_do_get" in vars(engine.pool)
        engine.dispose()
        assert "_do_get" in vars(engine.pool)
        with engine.connect():
            pass
        monitor.flush()
        before = query(store_path, "SELECT count(*) FROM events")[0][0]
        monitor.detach()
        assert "_do_get" not in vars(engine.pool)
        assert "recreate" not in vars(engine.pool)
        assert engine.pool._do_get.__func__ is QueuePool._do_get
        self._exhaust(engine)
        with engine.connect():
            pass
        monitor.flush()
        assert query(store_path, "SELECT count(*) FROM events")[0][0] == before


# -------------------------------------------------------------------------------------------


def _leak_connection_in_cycle(engine: sa.Engine) -> None:
    conn = engine.connect()  # leak-connection
    conn.exec_driver_sql("select 1")
    box: list[object] = [conn]
    box.append(box)  # only the cycle collector can reclaim the connection now


def _leak_raw_connection(engine: sa.Engine) -> None:
    raw = engine.raw_connection()  # leak-raw
    cursor = raw.cursor()
    cursor.execute("select 1")
    cursor.close()


def _leak_session(engine: sa.Engine) -> None:
    session = Session(engine)
    session.execute(sa.text("select 1"))  # leak-session


@pytest.mark.usefixtures("recorder_impl")
class TestGcCheckin:
    @pytest.mark.parametrize(
        ("leak", "marker"),
        [
            (_leak_connection_in_cycle, "leak-connection"),
            (_leak_raw_connection, "leak-raw"),
            (_leak_session, "leak-session"),
        ],
        ids=["connection-in-cycle", "raw-connection", "orm-session"],
    )
    def test_dropped_without_close_is_gc_checkin(
        self,
        make_engine: Callable[..., sa.Engine],
        store_path: Path,
        leak: Callable[[sa.Engine], None],
        marker: str,
    ) -> None:
        """A checkout that only the garbage collector returns is recorded as gc_checkin, with
        the leaking line as its site and the same checkout id as its checkout."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        with engine.connect() as conn:  # a proper one, for contrast
            conn.exec_driver_sql("select 1")
        leak(engine)
        gc.collect()
        monitor.flush()

        rows = query(
            store_path,
            "SELECT c.checkout_id, s.site, c.returned_by, c.hold_s FROM checkouts c "
            "JOIN stacks s ON s.id = c.stack_id ORDER BY c.checkout_id",
        )
        assert [r[2] for r in rows] == ["checkin", "gc_checkin"]
        assert rows[1][1] == site_of(marker)
        assert rows[1][3] >= 0
        assert len(events(store_path, "gc_checkin")) == 1
        assert not monitor.open_checkouts()

    def test_gc_checkin_logs_a_warning_with_the_site(
        self, sqlite_url: str, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A gc_checkin is also reported once on logger ``poolscope``, naming the site."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        with caplog.at_level(logging.INFO, logger="poolscope"):
            _leak_raw_connection(engine)
            gc.collect()
            monitor.flush()
            monitor.flush()  # the writer logs after the batch the first flush waited for
        engine.dispose()
        warnings_ = [r for r in caplog.records if r.name == "poolscope"]
        assert len(warnings_) == 1
        assert warnings_[0].levelno == logging.WARNING
        assert site_of("leak-raw") in warnings_[0].getMessage()

    def test_warnings_show_a_hostile_thread_name_escaped(
        self, sqlite_url: str, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The GC and watchdog warnings write a thread name's terminal escapes as ``\\x1b``,
        never raw, so a log on a terminal cannot be driven by the application's names."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=0.05)
        hostile = "w\x1b]0;pwned\x07\x1b[2J"
        held: list[sa.Connection] = []

        def work() -> None:
            _leak_raw_connection(engine)
            held.append(engine.connect())

        with caplog.at_level(logging.INFO):
            thread = threading.Thread(target=work, name=hostile)
            thread.start()
            thread.join()
            gc.collect()
            time.sleep(0.1)
            monitor.flush()
            monitor.flush()  # the writer logs after the batch the first flush waited for
        held[0].close()
        engine.dispose()
        messages = [r.getMessage() for r in caplog.records if "checked out at" in r.getMessage()]
        assert any("never closed" in m for m in messages), messages
        assert any("suspected leak" in m for m in messages), messages
        for message in messages:
            assert "\x1b" not in message and "\x07" not in message, repr(message)
            assert "w\\x1b]0;pwned\\x07\\x1b[2J" in message

    def test_collector_on_another_thread(self, sqlite_url: str, store_path: Path) -> None:
        """When the garbage collector runs on another thread, the gc_checkin is recorded
        there, with the leaking line as site."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        _leak_connection_in_cycle(engine)
        collector = threading.Thread(target=gc.collect, name="collector")
        collector.start()
        collector.join(10)
        monitor.flush()
        engine.dispose()
        ((thread, stack_id),) = events(store_path, "gc_checkin", "thread", "stack_id")
        assert thread == "collector"
        assert site_of_stack(store_path, stack_id) == site_of("leak-connection")

    def test_collector_running_anywhere(self, sqlite_url: str, store_path: Path) -> None:
        """With the collector running at almost every allocation (inside listeners, inside
        SQLAlchemy, on poolscope's writer thread), every leak is recorded exactly once."""
        engine = sa.create_engine(sqlite_url, poolclass=QueuePool, pool_size=5, max_overflow=-1)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        threshold = gc.get_threshold()

        def leak_many() -> None:
            for _ in range(100):
                _leak_connection_in_cycle(engine)

        gc.set_threshold(5, 1, 1)
        try:
            workers = [threading.Thread(target=leak_many, name=f"w{i}") for i in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(30)
        finally:
            gc.set_threshold(*threshold)
        gc.collect()
        monitor.flush()
        engine.dispose()
        counts = dict(query(store_path, "SELECT kind, count(*) FROM events GROUP BY kind"))
        assert counts.get("checkout") == 200
        assert counts.get("gc_checkin") == 200
        assert "checkin" not in counts
        assert not monitor.open_checkouts()

    def test_no_false_positives_over_ten_thousand_checkouts(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """Connections closed by code, in every usual way, are never recorded as gc_checkin."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        text = sa.text("select 1")
        for i in range(10_000):
            way = i % 5
            if way == 0:
                with engine.connect() as conn:
                    conn.execute(text)
            elif way == 1:
                with engine.begin() as conn:
                    conn.execute(text)
            elif way == 2:
                raw = engine.raw_connection()
                raw.close()
            elif way == 3:
                with Session(engine) as session:
                    session.execute(text)
            else:
                conn = engine.connect()
                conn.close()
                del conn
        gc.collect()
        monitor.flush()
        engine.dispose()

        counts = dict(query(store_path, "SELECT kind, count(*) FROM events GROUP BY kind"))
        assert counts.get("checkout") == 10_000
        assert counts.get("checkin") == 10_000
        assert "gc_checkin" not in counts
        assert "dropped" not in counts


# -------------------------------------------------------------------------------------------


class TestInvalidate:
    def test_terminated_backend_invalidates_the_right_checkout(
        self, pg_url: str, store_path: Path
    ) -> None:
        """pg_terminate_backend on a checked-out connection, then a statement on it, records
        invalidate events carrying that checkout's id."""
        engine = sa.create_engine(pg_url, pool_size=2)
        killer = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)  # not instrumented
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        try:
            with engine.connect() as bystander:
                bystander.exec_driver_sql("select 1")
            victim = engine.connect()  # victim
            pid = victim.exec_driver_sql("select pg_backend_pid()").scalar()
            victim.commit()
            (checkout,) = monitor.open_checkouts()
            with killer.connect() as conn:
                assert conn.execute(sa.text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the backend goes away asynchronously
                with killer.connect() as conn:
                    gone = not conn.execute(
                        sa.text("select count(*) from pg_stat_activity where pid = :p"),
                        {"p": pid},
                    ).scalar()
                if gone:
                    break
                time.sleep(0.02)
            with pytest.raises(sa_exc.OperationalError) as info:
                victim.exec_driver_sql("select 1")
            assert info.value.connection_invalidated
            victim.close()
            monitor.flush()
        finally:
            engine.dispose()
            killer.dispose()

        rows = events(store_path, "invalidate", "checkout_id", "stack_id")
        assert rows
        assert {r[0] for r in rows} == {checkout.checkout_id}
        assert {site_of_stack(store_path, r[1]) for r in rows} == {site_of("victim")}
        assert checkout.site == site_of("victim")
        returned = query(
            store_path,
            "SELECT returned_by FROM checkouts WHERE checkout_id = ?",
            checkout.checkout_id,
        )
        assert returned == [("checkin",)]


# -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("recorder_impl")
class TestWatchdog:
    def test_suspected_then_cleared(
        self,
        make_engine: Callable[..., sa.Engine],
        store_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A checkout held past leak_after gets one leak_suspected event and one WARNING naming
        its site, thread, held seconds and stack; returning it gets leak_cleared and one INFO."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path, leak_after=0.3)
        with caplog.at_level(logging.INFO, logger="poolscope"):
            conn = engine.connect()  # long-hold
            conn.exec_driver_sql("select 1")
            (checkout,) = monitor.open_checkouts()
            time.sleep(0.8)
            monitor.flush()
            monitor.flush()  # a watchdog round ran after the first flush, and was written
            suspected = events(store_path, "leak_suspected", "checkout_id", "hold_s", "stack_id")
            logged_while_held = [r for r in caplog.records if r.name == "poolscope"]
            conn.close()
            monitor.flush()
            monitor.flush()  # the writer logs after the batch the first flush waited for

        assert len(suspected) == 1
        checkout_id, hold_s, stack_id = suspected[0]
        assert checkout_id == checkout.checkout_id
        assert 0.3 <= hold_s < 5.0  # flagged once past leak_after (however busy the machine)
        assert site_of_stack(store_path, stack_id) == site_of("long-hold")

        assert len(logged_while_held) == 1
        warning = logged_while_held[0]
        assert warning.levelno == logging.WARNING
        text = warning.getMessage()
        assert site_of("long-hold") in text
        assert f"thread {threading.current_thread().name}" in text
        held = float(re.search(r"held for (\d+\.\d+) s", text).group(1))
        assert 0.3 <= held < 5.0
        assert "test_runtime.py" in text.split("checked out at:")[1]  # the stack

        cleared = events(store_path, "leak_cleared", "checkout_id", "hold_s")
        assert len(cleared) == 1
        assert cleared[0][0] == checkout.checkout_id
        assert cleared[0][1] >= max(0.8, hold_s)
        records = [r for r in caplog.records if r.name == "poolscope"]
        assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
        assert site_of("long-hold") in records[1].getMessage()
        checkins = events(store_path, "checkin", "checkout_id")
        assert checkins == [(checkout.checkout_id,)]

    def test_short_holds_are_not_suspected(
        self, sqlite_url: str, store_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Checkouts returned before leak_after never produce watchdog events or log lines."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=5)
        with caplog.at_level(logging.INFO, logger="poolscope"):
            short_checkouts(engine, 50)
            monitor.watch(time.time() + 3600)  # a watchdog pass an hour later flags none
            monitor.flush()
            monitor.flush()
        engine.dispose()
        assert not events(store_path, "leak_suspected")
        assert not events(store_path, "leak_cleared")
        assert not [r for r in caplog.records if r.name == "poolscope"]


# -------------------------------------------------------------------------------------------


def _run_forked_child(engine: sa.Engine, monitor: instrument.Monitor) -> dict:
    """Fork; the child does what a gunicorn worker does and reports back as JSON."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it must leave through os._exit
        code = 1
        try:
            os.close(read_fd)
            engine.dispose(close=False)
            open_before = [c.checkout_id for c in monitor.open_checkouts()]
            with engine.connect() as conn:  # child-checkout
                conn.exec_driver_sql("select 1")
            flushed = monitor.flush(timeout=10)
            report = {"pid": os.getpid(), "open_before": open_before, "flushed": flushed}
            os.write(write_fd, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(b"".join(chunks))


def _multiprocessing_child(engine: sa.Engine) -> None:
    engine.dispose(close=False)
    with engine.connect() as conn:  # mp-child-checkout
        conn.exec_driver_sql("select 1")


def _multiprocessing_own_engine(url: str, store: str) -> None:
    engine = sa.create_engine(url)
    instrument.attach(engine, store=store, leak_after=60)
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
class TestFork:
    def test_child_records_under_its_own_process(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """A forked child records under its own process row (parent_id = the parent's row),
        does not inherit the parent's open checkouts, and the parent keeps recording."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        held_conn = engine.connect()  # held-across-fork
        held_conn.exec_driver_sql("select 1")
        (parent_checkout,) = monitor.open_checkouts()

        child = _run_forked_child(engine, monitor)

        assert child["flushed"] is True
        assert child["open_before"] == []
        held_conn.close()
        with engine.connect() as conn:  # parent-after-fork
            conn.exec_driver_sql("select 1")
        monitor.flush()

        procs = query(store_path, "SELECT id, pid, parent_id FROM processes ORDER BY id")
        by_pid = {pid: (row_id, parent_id) for row_id, pid, parent_id in procs}
        assert set(by_pid) == {os.getpid(), child["pid"]}
        parent_row, grandparent = by_pid[os.getpid()]
        child_row, child_parent = by_pid[child["pid"]]
        assert grandparent is None
        assert child_parent == parent_row

        sql = (
            "SELECT s.site, c.returned_by FROM checkouts c JOIN stacks s ON s.id = c.stack_id "
            "WHERE c.process_id = ? ORDER BY c.checkout_id"
        )
        assert query(store_path, sql, child_row) == [(site_of("child-checkout"), "checkin")]
        assert query(store_path, sql, parent_row) == [
            (site_of("held-across-fork"), "checkin"),
            (site_of("parent-after-fork"), "checkin"),
        ]
        child_kinds = {
            k
            for (k,) in query(store_path, "SELECT kind FROM events WHERE process_id = ?", child_row)
        }
        assert child_kinds <= {"connect", "checkout", "checkin"}
        # The child's dispose(close=False) gives it a pool of its own, with its own row.
        pools = query(store_path, "SELECT process_id FROM pools ORDER BY id")
        assert {p for (p,) in pools} == {parent_row, child_row}
        child_pools = query(
            store_path, "SELECT DISTINCT pool_id FROM events WHERE process_id = ?", child_row
        )
        assert len(child_pools) == 1 and (child_row,) in query(
            store_path, "SELECT process_id FROM pools WHERE id = ?", child_pools[0][0]
        )

    def test_multiprocessing_child_records_and_ends_cleanly(
        self, make_engine: Callable[..., sa.Engine], store_path: Path
    ) -> None:
        """A multiprocessing child (fork start method) ends with os._exit(), skipping atexit:
        its records are still written, with end_reason 'exit', without any flush()."""
        engine = make_engine()
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        child = multiprocessing.get_context("fork").Process(
            target=_multiprocessing_child, args=(engine,)
        )
        child.start()
        child.join(20)
        assert child.exitcode == 0
        monitor.flush()

        procs = query(
            store_path, "SELECT id, pid, parent_id, end_reason FROM processes ORDER BY id"
        )
        by_pid = {pid: (row_id, parent_id, reason) for row_id, pid, parent_id, reason in procs}
        parent_row = by_pid[os.getpid()][0]
        child_row, child_parent, child_reason = by_pid[child.pid]
        assert child_parent == parent_row
        assert child_reason == "exit"
        sql = (
            "SELECT s.site, c.returned_by FROM checkouts c JOIN stacks s ON s.id = c.stack_id "
            "WHERE c.process_id = ?"
        )
        assert query(store_path, sql, child_row) == [(site_of("mp-child-checkout"), "checkin")]

    def test_multiprocessing_child_attaching_its_own_engine(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A multiprocessing child that creates and attaches its own engine also records its
        checkouts and its clean end, without any flush()."""
        child = multiprocessing.get_context("fork").Process(
            target=_multiprocessing_own_engine, args=(sqlite_url, str(store_path))
        )
        child.start()
        child.join(20)
        assert child.exitcode == 0
        assert query(store_path, "SELECT pid, end_reason FROM processes") == [(child.pid, "exit")]
        assert query(store_path, "SELECT returned_by FROM checkouts") == [("checkin",)]

    def test_multiprocessing_child_importing_poolscope_itself(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A multiprocessing child of a parent that never imported poolscope records its
        checkouts and its clean end too."""
        script = textwrap.dedent(
            """
            import multiprocessing, sys

            def work(url, store):
                import sqlalchemy as sa
                import instrument

                engine = sa.create_engine(url)
                instrument.attach(engine, store=store, leak_after=60)
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")

            if __name__ == "__main__":
                assert "instrument" not in sys.modules
                child = multiprocessing.get_context("fork").Process(
                    target=work, args=sys.argv[1:3]
                )
                child.start()
                child.join(20)
                sys.exit(child.exitcode)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script, sqlite_url, str(store_path)], cwd=REPO, timeout=60
        )
        assert done.returncode == 0
        assert query(store_path, "SELECT end_reason FROM processes") == [("exit",)]
        assert query(store_path, "SELECT returned_by FROM checkouts") == [("checkin",)]


_FORK_WHILE_WRITING = textwrap.dedent(
    """
    import json, os, sys, time
    import sqlalchemy as sa
    import instrument
    from instrument import _writer

    url, store = sys.argv[1:3]
    engine = sa.create_engine(url)
    monitor = instrument.attach(engine, store=store, leak_after=1, keep_raw=60)
    writer, null = monitor._writer, _writer.NULL
    stack = writer.stacks.capture()
    t0 = time.time() - 3600

    def backlog(first, n):  # hour-old checkouts and returns: big batches, then pruned
        for i in range(first, first + n):
            at = t0 + i * 1e-3
            writer.emit((at, monitor.pool_key, "checkout", 1, i, "w", null, 1, 0, 0, 0,
                         stack, 0.001, null, null, null))
            writer.emit((at + 1e-4, monitor.pool_key, "checkin", 1, i, "w", null, 0, 1, 0, 0,
                         stack, null, null, 1e-4, null))

    children = []
    for k in range(3):
        backlog(k * 100_000, 100_000)
        time.sleep(0.3)  # the writer is writing that batch, or pruning the one before
        pid = os.fork()
        if pid == 0:
            engine.dispose(close=False)
            for _ in range(20):
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")
            sys.exit(0)  # a normal exit: atexit writes the rest and the end
        children.append(pid)
    statuses = {}
    for pid in children:
        deadline = time.monotonic() + 60
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:  # hung: the test fails on its status
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                statuses[pid] = "hung"
                break
            time.sleep(0.05)
        else:
            statuses[pid] = "exited"
    monitor.flush(timeout=60)
    print(json.dumps(statuses))
    """
)

_ATTACHED = textwrap.dedent(
    """
    import os, sqlite3, sys, threading, time
    import sqlalchemy as sa
    import instrument
    from instrument import _writer

    url, store = sys.argv[1:3]
    engine = sa.create_engine(url)
    monitor = instrument.attach(engine, store=store, leak_after=60)
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
    monitor.flush()
    """
)
"""The start of the fork scripts: an engine on ``argv[1]`` attached to the store ``argv[2]``,
one checkout written."""

_FORK_WHILE_LOCKED = _ATTACHED + textwrap.dedent(
    """
    other = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the store a while
    for _ in range(10):
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
    monitor.flush(timeout=0)  # the writer starts its batch: it waits for the lock
    threading.Timer(3.5, other.execute, ("ROLLBACK",)).start()
    time.sleep(0.5)
    pid = os.fork()
    if pid == 0:
        engine.dispose(close=False)
        for _ in range(20):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        sys.exit(0)
    deadline = time.monotonic() + 60
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:  # hung
            os.kill(pid, 9)
            sys.exit("the child hung")
        time.sleep(0.05)
    monitor.flush(timeout=30)
    """
)

_CHILD_OUTLIVES_PARENT = _ATTACHED + textwrap.dedent(
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        os.read(read_fd, 1)  # until the parent's writer has closed the store
        engine.dispose(close=False)
        for _ in range(100):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        sys.exit(0)
    os.close(read_fd)
    _writer.shutdown_all(reason="exit")  # the parent's last handles on the store close
    os.write(write_fd, b"x")
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def _impl_env(impl: str) -> dict[str, str]:
    """The environment of a child Python running recorder ``impl`` ("c" or "python")."""
    if impl == "c" and _native.disabled():
        pytest.skip("POOLSCOPE_NO_CEXT is set: the C helpers are off")
    return {**os.environ, "POOLSCOPE_NO_CEXT": "1" if impl == "python" else "0"}


def _children_checkouts(
    script: str, impl: str, sqlite_url: str, store_path: Path
) -> list[tuple[object, ...]]:
    """Run ``script`` (with the C helpers or without, ``impl``), check that it succeeded,
    and return its forked children's ``(end_reason, checkouts, returned)`` rows."""
    done = subprocess.run(
        [sys.executable, "-c", script, sqlite_url, str(store_path)],
        cwd=REPO,
        env=_impl_env(impl),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return query(
        store_path,
        "SELECT p.end_reason, count(*), count(c.returned_by) FROM processes p "
        "JOIN checkouts c ON c.process_id = p.id WHERE p.parent_id IS NOT NULL",
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
class TestForkWhileWriting:
    def test_children_forked_while_the_writer_writes_and_prunes_record_and_exit(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """Children forked while the writer writes big batches and prunes them (retention)
        each record under their own row and exit normally: the fork waited for the writer
        to finish its transaction, so no child copied a SQLite call half-done (a child
        could wait forever for a mutex held in the copy, or find the store locked)."""
        done = subprocess.run(
            [sys.executable, "-c", _FORK_WHILE_WRITING, sqlite_url, str(store_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr
        statuses = json.loads(done.stdout)
        assert sorted(statuses.values()) == ["exited"] * 3, done.stderr
        rows = query(
            store_path,
            "SELECT p.pid, p.end_reason, count(c.checkout_id), count(c.returned_by) "
            "FROM processes p LEFT JOIN checkouts c ON c.process_id = p.id "
            "WHERE p.parent_id IS NOT NULL GROUP BY p.id ORDER BY p.id",
        )
        assert {str(pid) for pid, *_ in rows} == set(statuses)
        assert [tuple(r[1:]) for r in rows] == [("exit", 20, 20)] * 3
        assert query(store_path, "SELECT sum(pruned) > 0 FROM retention") == [(1,)]

    @pytest.mark.parametrize("impl", ["c", "python"])
    def test_child_forked_while_the_writer_waits_for_a_locked_store_records(
        self, impl: str, sqlite_url: str, store_path: Path
    ) -> None:
        """A child forked while the writer waits, inside SQLite, for a store another
        process holds locked records under its own row and exits normally: the fork
        waited for that transaction, so the child's own handle did not share the lock
        record of a copy caught mid-call (with it, the store looked locked to the child
        for good, and the child recorded nothing)."""
        assert _children_checkouts(_FORK_WHILE_LOCKED, impl, sqlite_url, store_path) == [
            ("exit", 20, 20)
        ]
        parent_checkouts = query(
            store_path,
            "SELECT count(*) FROM checkouts c JOIN processes p ON p.id = c.process_id "
            "WHERE p.parent_id IS NULL",
        )
        assert parent_checkouts == [(11,)]

    @pytest.mark.parametrize("impl", ["c", "python"])
    def test_child_outliving_its_parents_writer_keeps_recording(
        self, impl: str, sqlite_url: str, store_path: Path
    ) -> None:
        """A forked child that goes on recording after its parent's writer closed the
        store has every checkout on disk: the child closed its copies of the parent's
        handles, so its own handle holds real locks on the store, and the parent's last
        close did not take the WAL (and what the child writes to it) away."""
        assert _children_checkouts(_CHILD_OUTLIVES_PARENT, impl, sqlite_url, store_path) == [
            ("exit", 100, 100)
        ]


# -------------------------------------------------------------------------------------------

_CHILD_SCRIPT = textwrap.dedent(
    """
    import gc, sys, time
    import sqlalchemy as sa
    import instrument

    engine = sa.create_engine(sys.argv[1])
    monitor = instrument.attach(engine, store=sys.argv[2], leak_after=60)
    with engine.connect() as closed:
        closed.exec_driver_sql("select 1")
    parked = engine.connect()  # parked in a global: never returned
    parked.exec_driver_sql("select 1")
    monitor.flush()
    print("ready", flush=True)
    if sys.argv[3] == "hold":
        time.sleep(60)
    if sys.argv[3] == "exit-with-cycle":
        gc.disable()  # so that only poolscope's collection at exit can reclaim it
        leaked = engine.connect()
        leaked.exec_driver_sql("select 1")
        leaked.cycle = [leaked]
        del leaked
    """
)


def _run_child(db_url: str, store_path: Path, mode: str) -> tuple[int, int]:
    """Run ``_CHILD_SCRIPT``; in mode ``hold``, SIGKILL it once it holds its connection.

    :returns: the child's pid and return code.
    """
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD_SCRIPT, db_url, str(store_path), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    ) as proc:
        try:
            ready = proc.stdout.readline() if proc.stdout else ""
        finally:
            if mode == "hold":
                proc.send_signal(signal.SIGKILL)
        code = proc.wait(20)
    assert ready == "ready\n"
    return proc.pid, code


class TestProcessEnd:
    def test_heartbeat_while_alive(
        self, sqlite_url: str, store_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A live process's heartbeat advances even when its pool is idle."""
        monkeypatch.setattr(_writer, "HEARTBEAT_SECONDS", 0.1)
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=60)
        with engine.connect():
            pass
        monitor.flush()
        ((first,),) = query(store_path, "SELECT heartbeat_at FROM processes")
        latest = first
        deadline = time.monotonic() + 10
        while latest == first and time.monotonic() < deadline:
            time.sleep(0.05)
            ((latest,),) = query(store_path, "SELECT heartbeat_at FROM processes")
        assert latest > first
        assert query(store_path, "SELECT count(*) FROM events")[0][0] == 3  # no new events
        engine.dispose()

    def test_killed_child_leaves_its_checkout_open_and_its_end_unknown(
        self, db_url: str, store_path: Path
    ) -> None:
        """A SIGKILLed process has no end time and its held checkout has no return: it can
        only be classified as open at crash."""
        pid, code = _run_child(db_url, store_path, "hold")
        assert code == -signal.SIGKILL

        ((row_pid, ended_at, end_reason),) = query(
            store_path, "SELECT pid, ended_at, end_reason FROM processes"
        )
        assert row_pid == pid
        assert ended_at is None
        assert end_reason is None
        assert returned_by(store_path) == ["checkin", None]
        assert leak_classes(store_path) == ["open_at_crash"]

    def test_clean_exit_records_the_end_and_the_never_returned_checkout(
        self, db_url: str, store_path: Path
    ) -> None:
        """A process that exits cleanly records end_reason 'exit'; a connection it parked in a
        global stays without a return (never returned), and no gc_checkin is invented."""
        _, code = _run_child(db_url, store_path, "exit")
        assert code == 0

        ((ended_at, end_reason, heartbeat_at),) = query(
            store_path, "SELECT ended_at, end_reason, heartbeat_at FROM processes"
        )
        assert end_reason == "exit"
        assert ended_at is not None
        assert ended_at >= heartbeat_at - 1e-6
        assert returned_by(store_path) == ["checkin", None]
        assert not events(store_path, "gc_checkin")
        assert leak_classes(store_path) == ["never_returned"]

    def test_clean_exit_collects_before_ending(self, sqlite_url: str, store_path: Path) -> None:
        """At a clean exit, a connection left in a reference cycle is first reclaimed by the
        collector and recorded as gc_checkin, not as never returned."""
        _, code = _run_child(sqlite_url, store_path, "exit-with-cycle")
        assert code == 0
        assert query(store_path, "SELECT end_reason FROM processes") == [("exit",)]
        assert returned_by(store_path) == ["checkin", None, "gc_checkin"]
        assert leak_classes(store_path) == ["gc_reclaimed", "never_returned"]


# -------------------------------------------------------------------------------------------

_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading, time
    import sqlalchemy as sa
    import instrument
    from instrument import _writer

    url, store, mode = sys.argv[1:4]

    def own_handler(signum, frame):
        print("handled", flush=True)
        sys.exit(3)

    if mode == "own-before":
        signal.signal(signal.SIGTERM, own_handler)
    engine = sa.create_engine(url, pool_size=5, max_overflow=0)
    if mode == "attach-in-thread":
        worker = threading.Thread(
            target=instrument.attach, args=(engine,), kwargs={"store": store, "leak_after": 60}
        )
        worker.start()
        worker.join()
    else:
        instrument.attach(engine, store=store, leak_after=60)
    if mode == "own-after":
        signal.signal(signal.SIGTERM, own_handler)
    handler = signal.getsignal(signal.SIGTERM)
    print("default" if handler == signal.SIG_DFL else
          "poolscope" if handler is getattr(_writer, "on_sigterm", None) else "app",
          flush=True)
    held = [engine.connect() for _ in range(3)]
    for conn in held:
        conn.exec_driver_sql("select 1")
    if mode != "busy":
        for _ in range(1000):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
    print("ready", flush=True)
    while mode == "busy":
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
    time.sleep(60)
    """
)


def _signal_child(
    url: str, store: Path, mode: str, signum: int, delay: float = 0.0
) -> tuple[int, list[str], float]:
    """Run ``_SIGNAL_SCRIPT`` in ``mode``; send it ``signum`` ``delay`` seconds after it is
    ready (it holds 3 connections by then).

    :returns: its exit code, the lines it printed (the SIGTERM disposition it saw after
        attaching, ``ready``, then anything else) and when the signal was sent.
    """
    with subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_SCRIPT, url, str(store), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    ) as proc:
        assert proc.stdout is not None
        try:
            lines = [proc.stdout.readline(), proc.stdout.readline()]
            time.sleep(delay)
        finally:
            sent_at = time.time()
            proc.send_signal(signum)
        lines += proc.stdout.readlines()
        code = proc.wait(20)
    return code, [line.strip() for line in lines], sent_at


def _leak_counts(store: Path) -> dict[str, int]:
    """Checkouts per leak class in ``store``, as the analysis counts them."""
    conn = analysis.open_store(store)
    try:
        leaks = analysis.leaks(conn)
    finally:
        conn.close()
    return {
        str(k): int(v) for k, v in leaks.groupby("leak_class", observed=True)["count"].sum().items()
    }


def _process_states(store: Path) -> list[str]:
    conn = analysis.open_store(store)
    try:
        return list(analysis.processes(conn)["state"])
    finally:
        conn.close()


class TestCrashWindow:
    def test_kill_soon_after_start_keeps_the_held_connections_and_the_first_checkouts(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A process SIGKILLed 0.8 s after attaching, busy checking out, has its row, the 3
        connections it held (open at crash) and its checkouts up to half a second before the
        kill on disk: the first batch is written soon after the first events."""
        # The bound is a time: on a machine too loaded to schedule the writer's first batch
        # (its statements each wait for the busy loop to give the GIL back) within 0.8 s,
        # one kill can come first; one CI run on a loaded machine missed it three times at
        # 0.4 s. Four tries, each held to every assertion but the timing ones, of which one
        # try must meet all.
        seen = []
        for attempt in range(4):
            store = store_path.with_name(f"attempt{attempt}.db")
            code, lines, killed_at = _signal_child(
                sqlite_url, store, "busy", signal.SIGKILL, delay=0.8
            )
            assert code == -signal.SIGKILL
            assert lines[1] == "ready"
            # attach() returned once the writer had made the store and the process row.
            assert query(store, "SELECT ended_at, end_reason FROM processes") == [(None, None)]
            ((written, last_at),) = query(
                store, "SELECT count(*), max(at) FROM events WHERE kind = 'checkout'"
            )
            held = _leak_counts(store).get("open_at_crash", 0)  # and maybe one mid-checkout
            seen.append((held, written, None if last_at is None else killed_at - last_at))
            if (
                held >= 3
                and written > 3
                and killed_at - last_at < _writer.SCHEDULE_DELAY_SECONDS + 0.5
            ):
                return
        pytest.fail(f"no try had its held connections and first checkouts on disk: {seen}")

    def test_kill_as_attach_returns_leaves_the_schema_and_the_process_row(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """A process SIGKILLed the moment attach() returns leaves a readable store with its
        process row (no end: it died): attach() waits for the writer to make them, since
        the writer's start competes for the GIL with the application's thread."""
        script = textwrap.dedent(
            """
            import os, signal, sys
            import sqlalchemy as sa
            import instrument
            from instrument import _writer

            _writer.START_WAIT_SECONDS = 120.0  # its bound is not what is tested here
            engine = sa.create_engine(sys.argv[1])
            instrument.attach(engine, store=sys.argv[2], leak_after=60)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script, sqlite_url, str(store_path)], cwd=REPO, timeout=120
        )
        assert done.returncode == -signal.SIGKILL
        assert query(store_path, "SELECT ended_at, end_reason FROM processes") == [(None, None)]
        assert _process_states(store_path) == ["crashed"]  # its pid is gone


class TestSigterm:
    def test_default_disposition_writes_everything_and_records_a_termination(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """SIGTERM with its default disposition (a container stop): every checkout is on disk,
        the end is recorded as terminated (not crashed), its 3 held connections are open at
        crash, and the process still dies of SIGTERM."""
        code, lines, _ = _signal_child(sqlite_url, store_path, "idle", signal.SIGTERM)
        assert code == -signal.SIGTERM
        assert lines == ["poolscope", "ready"]
        ((end_reason, ended_at),) = query(store_path, "SELECT end_reason, ended_at FROM processes")
        assert end_reason == "terminated"
        assert ended_at is not None
        assert query(store_path, "SELECT count(*) FROM checkouts")[0][0] == 1003
        assert returned_by(store_path).count(None) == 3
        assert _process_states(store_path) == ["terminated"]
        assert _leak_counts(store_path) == {"open_at_crash": 3}
        conn = analysis.open_store(store_path)
        try:
            summary = analysis.summary(conn)
        finally:
            conn.close()
        assert (summary["terminated_processes"], summary["crashed_processes"]) == (1, 0)

    @pytest.mark.parametrize("mode", ["own-before", "own-after"])
    def test_the_applications_own_handler_is_left_alone(
        self, sqlite_url: str, store_path: Path, mode: str
    ) -> None:
        """An application's own SIGTERM handler, installed before or after attach, is the one
        that runs, and the process ends as it decides (here a clean exit with code 3)."""
        code, lines, _ = _signal_child(sqlite_url, store_path, mode, signal.SIGTERM)
        assert code == 3
        assert lines == ["app", "ready", "handled"]
        assert query(store_path, "SELECT end_reason FROM processes") == [("exit",)]
        assert query(store_path, "SELECT count(*) FROM checkouts")[0][0] == 1003
        assert _leak_counts(store_path) == {"never_returned": 3}

    def test_attach_from_another_thread_installs_nothing(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """Attached from a thread other than the main one, poolscope sets no signal handler:
        SIGTERM keeps its default disposition and kills the process as before."""
        code, lines, _ = _signal_child(sqlite_url, store_path, "attach-in-thread", signal.SIGTERM)
        assert code == -signal.SIGTERM
        assert lines == ["default", "ready"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
class TestMultiprocessingPool:
    def test_terminated_pool_workers_record_everything(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """``with multiprocessing.Pool(2) as pool:`` terminates its workers on exit: every
        checkout they made is still recorded, and none of them is marked crashed."""
        script = textwrap.dedent(
            """
            import multiprocessing, sys
            import sqlalchemy as sa
            import instrument

            def work(_):
                for _ in range(20):
                    with engine.connect() as conn:
                        conn.exec_driver_sql("select 1")

            if __name__ == "__main__":
                engine = sa.create_engine(sys.argv[1])
                instrument.attach(engine, store=sys.argv[2], leak_after=60)
                with multiprocessing.get_context("fork").Pool(2) as pool:
                    pool.map(work, range(30))
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script, sqlite_url, str(store_path)], cwd=REPO, timeout=60
        )
        assert done.returncode == 0
        children = query(
            store_path, "SELECT id FROM processes WHERE parent_id IS NOT NULL ORDER BY id"
        )
        assert len(children) == 2
        assert query(
            store_path,
            "SELECT count(*), count(returned_by) FROM checkouts WHERE process_id IN "
            "(SELECT id FROM processes WHERE parent_id IS NOT NULL)",
        ) == [(600, 600)]
        parent, *workers = _process_states(store_path)
        assert parent == "exited"
        assert set(workers) <= {"exited", "terminated"}


# -------------------------------------------------------------------------------------------


@asynccontextmanager
async def _attached_async_engine(
    db_url: str, store_path: Path, **kwargs
) -> AsyncIterator[tuple[AsyncEngine, instrument.Monitor]]:
    """An AsyncEngine on the same database (aiosqlite, or psycopg in async mode), attached
    with leak_after=60 and disposed when the block ends."""
    if db_url.startswith("sqlite:"):
        db_url = db_url.replace("sqlite:", "sqlite+aiosqlite:", 1)
    engine = create_async_engine(db_url, **kwargs)
    monitor = instrument.attach(engine, store=store_path, leak_after=60)
    try:
        yield engine, monitor
    finally:
        await engine.dispose()


async def _async_work(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:  # async-checkout
        await conn.execute(sa.text("select 1"))


async def _async_leak(engine: AsyncEngine) -> None:
    conn = await engine.connect()  # async-leak
    await conn.execute(sa.text("select 1"))


class TestAsync:
    def test_checkouts_carry_the_task_name_and_the_coroutine_site(
        self, db_url: str, store_path: Path
    ) -> None:
        """On an AsyncEngine, checkouts and checkins record the asyncio task's name, and the
        site is the application's coroutine line."""

        async def main() -> instrument.Monitor:
            async with _attached_async_engine(db_url, store_path) as (engine, monitor):
                await asyncio.gather(
                    asyncio.create_task(_async_work(engine), name="worker-7"),
                    asyncio.create_task(_async_work(engine), name="worker-8"),
                )
            return monitor

        asyncio.run(main()).flush()

        rows = query(
            store_path,
            "SELECT c.task, s.site, c.returned_by, r.task FROM checkouts c "
            "JOIN stacks s ON s.id = c.stack_id JOIN events r ON r.process_id = c.process_id "
            "AND r.checkout_id = c.checkout_id AND r.kind = c.returned_by ORDER BY c.task",
        )
        site = site_of("async-checkout")
        assert rows == [
            ("worker-7", site, "checkin", "worker-7"),
            ("worker-8", site, "checkin", "worker-8"),
        ]
        assert not events(store_path, "gc_checkin")

    def test_async_timeout_keeps_sqlalchemys_error_and_records_the_task(
        self, db_url: str, store_path: Path
    ) -> None:
        """On an AsyncEngine, a caller that times out still gets SQLAlchemy's TimeoutError, and
        the timeout event names its task and its coroutine line."""

        async def hold(engine: AsyncEngine, release: asyncio.Event) -> None:
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1"))
                await release.wait()

        async def late(engine: AsyncEngine) -> None:
            async with engine.connect():  # async-timeout
                pass

        async def main() -> tuple[instrument.Monitor, BaseException | None]:
            async with _attached_async_engine(
                db_url, store_path, pool_size=1, max_overflow=0, pool_timeout=0.3
            ) as (engine, monitor):
                release = asyncio.Event()
                holder = asyncio.create_task(hold(engine, release), name="holder")
                while not monitor.open_checkouts():
                    await asyncio.sleep(0.01)
                error = None
                try:
                    await asyncio.create_task(late(engine), name="late-3")
                except sa_exc.TimeoutError as exc:
                    error = exc
                release.set()
                await holder
            return monitor, error

        monitor, error = asyncio.run(main())
        monitor.flush()
        assert type(error) is sa_exc.TimeoutError
        assert str(error).startswith(
            "QueuePool limit of size 1 overflow 0 reached, connection timed out, timeout 0.30"
        )
        ((task, wait_s, stack_id),) = events(store_path, "timeout", "task", "wait_s", "stack_id")
        assert task == "late-3"
        assert 0.27 <= wait_s < 2.0
        assert site_of_stack(store_path, stack_id) == site_of("async-timeout")

    @pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
    # aiosqlite's worker thread of the leaked connection may answer after the loop closed.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    def test_async_connection_never_closed_is_gc_checkin(
        self, db_url: str, store_path: Path
    ) -> None:
        """An AsyncConnection dropped without close is recorded as gc_checkin when the
        garbage collector reclaims it (SQLAlchemy detaches it rather than checking it in)."""

        async def main() -> instrument.Monitor:
            async with _attached_async_engine(db_url, store_path) as (engine, monitor):
                await asyncio.create_task(_async_work(engine), name="closer")
                await asyncio.create_task(_async_leak(engine), name="leaker")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gc.collect()
            return monitor

        asyncio.run(main()).flush()

        rows = query(
            store_path,
            "SELECT c.task, s.site, c.returned_by FROM checkouts c "
            "JOIN stacks s ON s.id = c.stack_id ORDER BY c.checkout_id",
        )
        assert rows == [
            ("closer", site_of("async-checkout"), "checkin"),
            ("leaker", site_of("async-leak"), "gc_checkin"),
        ]


@pytest.mark.usefixtures("recorder_impl")
class TestFailedConnects:
    """Connects that fail leave nothing of theirs in the monitor."""

    def test_failed_connects_do_not_pile_up(self, tmp_path: Path, store_path: Path) -> None:
        """1,000 failed connects (a database file that cannot be opened) leave no record
        behind; once it can be opened, the first connect is recorded with its connect time."""
        app = tmp_path / "not-yet" / "app.db"
        engine = sa.create_engine(f"sqlite:///{app}")
        monitor = instrument.attach(engine, store=store_path)
        for _ in range(1000):
            with pytest.raises(sa_exc.OperationalError):
                engine.connect()
        assert len(monitor._connect_starts) == 0
        assert len(monitor._connect_times) == len(monitor._waits) == 0
        app.parent.mkdir()
        short_checkouts(engine)
        monitor.flush()
        ((connect_s,),) = events(store_path, "connect", "connect_s")
        assert 0 < connect_s < 5
        ((wait_s,),) = events(store_path, "checkout", "wait_s")
        assert 0 <= wait_s < 5
        engine.dispose()


@contextmanager
def _module_scanning_clock(fake: Callable[[], float]) -> Iterator[None]:
    """Replace every module attribute that is the real ``time.time`` or ``perf_counter``
    by ``fake``, as freezegun does, and put them back after."""
    real = {id(time.time), id(time.perf_counter)}
    replaced = []
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if id(value) in real:
                replaced.append((module, name, value))
                setattr(module, name, fake)
    try:
        yield
    finally:
        for module, name, value in replaced:
            setattr(module, name, value)


@pytest.mark.usefixtures("recorder_impl")
class TestRealClock:
    """Timestamps and durations come from the real clocks, whatever the application mocks."""

    @pytest.mark.parametrize("patcher", ["mock.patch", "module-scan"])
    def test_mocked_clocks_do_not_reach_the_store(
        self, sqlite_url: str, store_path: Path, patcher: str
    ) -> None:
        """An engine attached while time.time and time.perf_counter return 0 records
        timestamps of now, real connect, wait and hold times, a heartbeat of now, and the
        watchdog still flags a checkout held past leak_after."""
        from unittest import mock

        start = time.time()
        fake_clock = (
            _module_scanning_clock(lambda: 0.0)
            if patcher == "module-scan"
            else _patched(
                mock.patch("time.time", return_value=0.0),
                mock.patch("time.perf_counter", return_value=0.0),
            )
        )
        with fake_clock:
            assert time.time() == 0.0 and time.perf_counter() == 0.0
            engine = sa.create_engine(sqlite_url)
            monitor = instrument.attach(engine, store=store_path, leak_after=0.2)
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                time.sleep(0.5)
                monitor.flush()
                monitor.flush()  # a watchdog round ran after the first flush, and was written
            short_checkouts(engine)
            monitor.flush()
        end = time.time()

        stamps = [at for (at,) in query(store_path, "SELECT at FROM events")]
        # connect, checkout, leak_suspected, leak_cleared, checkin, checkout, checkin
        assert len(stamps) == 7
        assert all(start <= at <= end for at in stamps)
        ((connect_s,),) = events(store_path, "connect", "connect_s")
        assert 0 < connect_s < 5
        assert all(0 <= w < 5 for (w,) in events(store_path, "checkout", "wait_s"))
        assert [h >= 0.5 for (h,) in events(store_path, "checkin", "hold_s")] == [True, False]
        ((suspected,),) = events(store_path, "leak_suspected", "hold_s")
        assert 0.2 <= suspected < 5
        ((heartbeat, created),) = query(
            store_path, "SELECT p.heartbeat_at, o.created_at FROM processes p, pools o"
        )
        assert start <= heartbeat <= end and start <= created <= end
        engine.dispose()


@contextmanager
def _patched(*patches) -> Iterator[None]:
    """Enter every patch of ``patches`` for the block."""
    for patch in patches:
        patch.start()
    try:
        yield
    finally:
        for patch in reversed(patches):
            patch.stop()
