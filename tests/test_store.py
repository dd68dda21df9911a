"""The store file: schema and version, WAL, the checkouts view, validated reading, appending."""

from __future__ import annotations

import gc
import hashlib
import logging
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import query

import instrument
from instrument import _store, _writer
from instrument.exceptions import (
    ForeignStoreError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
)


@pytest.fixture
def engine(sqlite_url: str):
    """A SQLite file engine (QueuePool), disposed after the test."""
    engine = sa.create_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def written_store(engine, store_path: Path) -> Path:
    """A store holding one checkout and its checkin, with its writer stopped."""
    monitor = instrument.attach(engine, store=store_path)
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
    monitor.flush()
    monitor.detach()
    _writer.shutdown_all(timeout=10.0)
    return store_path


def _set_schema_version(store: Path, version: int) -> None:
    conn = sqlite3.connect(str(store))
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.close()


def _checkouts(store: Path) -> int:
    """The checkouts the analysis counts in ``store``."""
    from instrument import analysis

    conn = analysis.open_store(store)
    try:
        return int(analysis.summary(conn)["checkouts"])
    finally:
        conn.close()


class TestSchema:
    def test_meta_holds_the_schema_version(self, written_store: Path) -> None:
        """A new store records its schema version, that poolscope wrote it, its own
        identity (a uuid: what ``poolscope push`` maps its rows by) and, per process, the
        first and last time of its events (``span:<process id>``)."""
        meta = dict(query(written_store, "SELECT key, value FROM meta"))
        assert uuid.UUID(meta.pop("store_id"))
        spans = {k: meta.pop(k) for k in list(meta) if k.startswith("span:")}
        for value in spans.values():
            first, last = (float(v) for v in value.split())
            assert 0 < first <= last
        assert meta == {
            "schema_version": str(_store.SCHEMA_VERSION),
            "application": "poolscope",
        }

    def test_wal_mode(self, written_store: Path) -> None:
        """The store is in WAL mode, so readers never block the writers."""
        assert query(written_store, "PRAGMA journal_mode") == [("wal",)]

    def test_tables_and_view(self, written_store: Path) -> None:
        """The store has the documented tables and the checkouts view."""
        objects = query(
            written_store, "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view')"
        )
        assert sorted(objects) == [
            ("table", "diagnoses"),
            ("table", "events"),
            ("table", "meta"),
            ("table", "notable"),
            ("table", "pool_rollups"),
            ("table", "pools"),
            ("table", "processes"),
            ("table", "retention"),
            ("table", "rollups"),
            ("table", "stacks"),
            ("view", "checkouts"),
        ]

    def test_a_first_release_store_reads_and_is_upgraded_in_place(
        self, written_store: Path, engine
    ) -> None:
        """A version 1 store (no rollups tables) reads as it is; a writer adds the version 2
        tables in place, keeps its events and marks it version 2."""
        conn = sqlite3.connect(str(written_store))
        with conn:
            for table in ("rollups", "pool_rollups", "notable", "retention"):
                conn.execute(f"DROP TABLE {table}")
        conn.close()
        _set_schema_version(written_store, 1)
        before = query(written_store, "SELECT count(*) FROM events")
        reader = _store.open_for_reading(written_store)
        assert _store.schema_version(reader) == 1
        assert not _store.has_table(reader, "rollups")
        assert _store.raw_since(reader) is None
        reader.close()
        assert _checkouts(written_store) == 1

        monitor = instrument.attach(engine, store=written_store)
        with engine.connect() as c:
            c.exec_driver_sql("select 1")
        monitor.flush()
        monitor.detach()
        _writer.shutdown_all(timeout=10.0)
        assert query(written_store, "SELECT value FROM meta WHERE key = 'schema_version'") == [
            ("2",)
        ]
        assert query(written_store, "SELECT count(*) FROM events")[0][0] > before[0][0]
        # The rollups hold the new process's checkout only: the old events are not rolled
        # up by a writer (``poolscope compact`` does that).
        assert query(written_store, "SELECT sum(checkouts) FROM rollups") == [(1,)]
        assert _checkouts(written_store) == 2

    def test_event_columns_are_the_writers(self, written_store: Path) -> None:
        """``events`` has an id and exactly the columns the writer inserts."""
        columns = [r[1] for r in query(written_store, "PRAGMA table_info(events)")]
        assert columns == ["id", *_store.EVENT_COLUMNS]


class TestCheckoutsView:
    def test_pairs_each_checkout_with_its_return(self, engine, store_path: Path) -> None:
        """Returned by code, by the garbage collector, by detach, or not at all: one row each."""
        monitor = instrument.attach(engine, store=store_path)
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        forgotten = engine.connect()
        del forgotten
        gc.collect()
        detached = engine.connect()
        detached.connection.detach()
        detached.close()
        still_open = engine.connect()
        try:
            monitor.flush()
            rows = query(
                store_path,
                "SELECT checkout_id, returned_by, hold_s IS NOT NULL, returned_at IS NOT NULL "
                "FROM checkouts ORDER BY checkout_id",
            )
            assert [r[1:] for r in rows] == [
                ("checkin", 1, 1),
                ("gc_checkin", 1, 1),
                ("detach", 1, 1),
                (None, 0, 0),
            ]
            assert len({r[0] for r in rows}) == 4
            # The view's hold time is the one the return row carries.
            assert query(
                store_path,
                "SELECT count(*) FROM checkouts c JOIN events e ON e.checkout_id = c.checkout_id "
                "AND e.kind = c.returned_by WHERE e.hold_s = c.hold_s",
            ) == [(3,)]
        finally:
            still_open.close()


class TestReading:
    def test_reads_a_store(self, written_store: Path) -> None:
        """A valid store opens read-only and reads what was written."""
        conn = _store.open_for_reading(written_store)
        try:
            count = "SELECT count(*) FROM events WHERE kind = 'checkout'"
            assert conn.execute(count).fetchone() == (1,)
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.execute("DELETE FROM events")
        finally:
            conn.close()

    def test_reads_while_a_process_is_writing(self, engine, store_path: Path) -> None:
        """A reader sees what a live writer has flushed, without stopping it."""
        monitor = instrument.attach(engine, store=store_path)
        with engine.connect():
            pass
        monitor.flush()
        conn = _store.open_for_reading(store_path)
        try:
            count = "SELECT count(*) FROM events WHERE kind = 'checkout'"
            assert conn.execute(count).fetchone() == (1,)
            with engine.connect():
                pass
            monitor.flush()
            assert conn.execute(count).fetchone() == (2,)
        finally:
            conn.close()

    def test_refuses_a_newer_schema(self, written_store: Path) -> None:
        """A store from a newer poolscope is refused with a message saying so and what to do."""
        newer = _store.SCHEMA_VERSION + 1
        _set_schema_version(written_store, newer)
        with pytest.raises(StoreVersionError) as info:
            _store.open_for_reading(written_store)
        assert str(info.value) == (
            f"{written_store} was written by a newer poolscope (store schema {newer}, this one "
            f"reads up to {_store.SCHEMA_VERSION}); upgrade poolscope to read it"
        )

    @pytest.mark.parametrize(
        ("make", "error", "message"),
        [
            (
                None,
                StoreNotFoundError,
                "no store at {path} (attach poolscope to an engine to create one)",
            ),
            (b"", ForeignStoreError, "{path} is empty, not a poolscope store"),
            (
                b"hello, not a database at all",
                StoreCorruptError,
                "{path} is not a SQLite file, so not a poolscope store",
            ),
            (
                "CREATE TABLE users (id INTEGER)",
                ForeignStoreError,
                "{path} is a SQLite database of another application (no events, meta, pools, "
                "processes, stacks table), not a poolscope store",
            ),
            ("dir", StoreCorruptError, "{path} is a directory, not a poolscope store"),
        ],
        ids=["missing", "empty", "not-sqlite", "foreign", "directory"],
    )
    def test_refuses_what_is_not_a_store(self, tmp_path: Path, make, error, message) -> None:
        """Anything but a poolscope store is refused with one plain sentence naming the path."""
        path = tmp_path / "candidate.db"
        if make == "dir":
            path.mkdir()
        elif isinstance(make, bytes):
            path.write_bytes(make)
        elif isinstance(make, str):
            conn = sqlite3.connect(str(path))
            conn.execute(make)
            conn.close()
        with pytest.raises(error) as info:
            _store.open_for_reading(path)
        assert str(info.value) == message.format(path=path)
        assert isinstance(info.value, StoreError)

    def test_default_path_comes_from_the_environment(
        self, written_store: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a path, ``$POOLSCOPE_STORE`` names the store."""
        monkeypatch.setenv("POOLSCOPE_STORE", str(written_store))
        conn = _store.open_for_reading(None)
        conn.close()
        assert _store.resolve_store_path(None) == written_store


class TestWriting:
    def test_writer_leaves_a_newer_store_alone(
        self, written_store: Path, engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Attaching to a newer store logs one error, writes nothing and never reaches the app."""
        _set_schema_version(written_store, _store.SCHEMA_VERSION + 1)
        counts = (
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM processes), "
            "(SELECT count(*) FROM pools), (SELECT count(*) FROM stacks)"
        )
        before = query(written_store, counts)
        caplog.set_level(logging.WARNING, logger="poolscope")
        monitor = instrument.attach(engine, store=written_store)
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("select 5").scalar() == 5
            monitor.flush()
        assert monitor.dropped == 6
        assert query(written_store, counts) == before
        assert [r.levelno for r in caplog.records] == [logging.ERROR]
        assert "newer poolscope" in caplog.records[0].getMessage()

    def test_writer_leaves_another_applications_database_untouched(
        self, tmp_path: Path, engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Attaching with another application's SQLite database as the store logs one error,
        counts every event as dropped, never reaches the app, and leaves the file as it was,
        byte for byte and in its own journal mode."""
        theirs = tmp_path / "orders.db"
        conn = sqlite3.connect(str(theirs))
        with conn:
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
            conn.executemany("INSERT INTO orders (total) VALUES (?)", [(9.5,), (12.0,)])
        conn.close()
        before = hashlib.sha256(theirs.read_bytes()).hexdigest()
        caplog.set_level(logging.WARNING, logger="poolscope")
        monitor = instrument.attach(engine, store=theirs)
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("select 5").scalar() == 5
            assert monitor.flush() is True
        assert monitor.dropped == 7  # connect, 3 checkouts and checkins
        _writer.shutdown_all(timeout=10.0)
        assert hashlib.sha256(theirs.read_bytes()).hexdigest() == before
        assert sorted(p.name for p in tmp_path.glob("orders.db*")) == ["orders.db"]
        assert query(theirs, "PRAGMA journal_mode") == [("delete",)]
        assert [r.levelno for r in caplog.records] == [logging.ERROR]
        assert "another application" in caplog.records[0].getMessage()

    def test_a_new_process_appends(self, written_store: Path, tmp_path: Path) -> None:
        """A second process attaching to an existing store adds its own rows beside the first's."""
        script = (
            "import sys, sqlalchemy as sa, instrument\n"
            "engine = sa.create_engine(sys.argv[1])\n"
            "instrument.attach(engine, store=sys.argv[2], name='second')\n"
            "for _ in range(3):\n"
            "    with engine.connect() as conn:\n"
            "        conn.exec_driver_sql('select 1')\n"
        )
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                f"sqlite:///{tmp_path / 'other.db'}",
                str(written_store),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        processes = query(written_store, "SELECT id, end_reason FROM processes ORDER BY id")
        assert len(processes) == 2
        second = processes[1][0]
        assert processes[1][1] == "exit"
        assert query(written_store, "SELECT process_id, name FROM pools ORDER BY id")[1] == (
            second,
            "second",
        )
        counts = query(
            written_store,
            "SELECT process_id, count(*) FROM events WHERE kind = 'checkout' GROUP BY 1 ORDER BY 1",
        )
        assert counts == [(processes[0][0], 1), (second, 3)]
        assert query(written_store, "SELECT count(*) FROM meta WHERE key = 'schema_version'") == [
            (1,)
        ]


OPEN_AT = """\
import sys
import time
import time
from pathlib import Path

from instrument import _store

start = float(sys.argv[2])
while time.time() < start:
    pass
_store.connect_for_writing(Path(sys.argv[1])).close()
"""


class TestProcessesCreatingOneStore:
    def test_processes_that_create_one_new_store_at_once_all_open_it(self, tmp_path: Path) -> None:
        """Four processes opening one new store at the same instant all open it: switching
        a new file to WAL can fail at once with 'database is locked' for all but one."""
        script = tmp_path / "open_at.py"
        script.write_text(OPEN_AT)
        for attempt in range(5):
            store = tmp_path / f"store{attempt}.db"
            start = time.time() + 0.5
            procs = [
                subprocess.Popen(
                    [sys.executable, str(script), str(store), str(start)],
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(4)
            ]
            errors = [proc.communicate(timeout=60)[1] for proc in procs]
            assert [proc.returncode for proc in procs] == [0, 0, 0, 0], errors
            assert query(store, "PRAGMA journal_mode") == [("wal",)]
