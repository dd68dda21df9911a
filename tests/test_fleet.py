"""The PostgreSQL store: store URLs, many processes on one store, reading it, push, faults,
secrets and roles. Every test on the real server records into a schema of its own."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import PG_URL, query, require_postgres

import instrument
from instrument import _hooks, _record, _writer
from instrument._store import PostgresStore, parse_store
from instrument.cli import cli
from instrument.report import make_report

pytestmark = pytest.mark.postgres

PASSWORD = "Pw-n0t-Here-4417"
"""A password put in store URLs (the server trusts local connections and ignores it)."""


def _conninfo(url: str = PG_URL) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _admin() -> psycopg.Connection:
    return psycopg.connect(_conninfo(), autocommit=True)


def _with_password(url: str) -> str:
    head, rest = url.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{head}://{userinfo.split(':')[0]}:{PASSWORD}@{host}"


def _with_query(url: str, **query: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in query.items())


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema name of this test's own, dropped afterwards."""
    require_postgres()
    name = f"ps_{uuid.uuid4().hex[:12]}"
    yield name
    _writer.shutdown_all(timeout=10.0)
    with _admin() as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def pg_store(schema: str) -> str:
    """A PostgreSQL store URL on the test server, in a schema of this test's own."""
    return _with_query(PG_URL, schema=schema)


def _rows(schema: str, sql: str) -> list[tuple[Any, ...]]:
    with _admin() as conn:
        return conn.execute(sql.replace("S.", f'"{schema}".')).fetchall()


WORKLOAD = textwrap.dedent(
    """
    import gc, sys
    import sqlalchemy as sa
    import instrument

    def quick(engine):
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")

    def forget(engine):
        conn = engine.connect()
        conn.exec_driver_sql("select 1")

    def hold(engine):
        return engine.connect()

    def wait_here(engine):
        try:
            with engine.connect():
                pass
        except sa.exc.TimeoutError:
            return True
        return False

    engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=2,
                              max_overflow=0, pool_timeout=0.2)
    monitor = instrument.attach(engine, store=sys.argv[1], name="shop", leak_after=60)
    for _ in range(int(sys.argv[2])):
        quick(engine)
    forget(engine)
    gc.collect()
    a, b = hold(engine), hold(engine)
    assert wait_here(engine)
    a.close()
    b.close()
    kept = engine.connect()
    """
)


def _run_workers(tmp_path: Path, store: str, n: int = 4, quick: int = 40) -> None:
    script = tmp_path / "work.py"
    script.write_text(WORKLOAD)
    procs = [
        subprocess.Popen([sys.executable, str(script), store, str(quick + i)]) for i in range(n)
    ]
    assert [p.wait(60) for p in procs] == [0] * n


def _shape(report: dict[str, Any]) -> dict[str, Any]:
    """What a report says that does not depend on when the workload ran."""
    s = report["summary"]
    return {
        "summary": {
            k: s[k]
            for k in (
                "processes",
                "pools",
                "events",
                "checkouts",
                "open_checkouts",
                "peak_in_use",
                "capacity",
                "timeouts",
                "confirmed_leaks",
                "suspected_leaks",
                "unknown_leaks",
                "dropped",
                "crashed_processes",
            )
        },  # fmt: skip
        "hosts": sorted(p["host"] for p in report["processes"]),
        "states": sorted(p["state"] for p in report["processes"]),
        "pools": [
            (p["name"], p["checkouts"], p["timeouts"], p["peak_in_use"]) for p in report["pools"]
        ],  # fmt: skip
        "leaks": sorted((x["class"], x["site"], x["count"]) for x in report["leaks"]),
        "timeouts": sorted(
            (t["site"], tuple(sorted(h["site"] for h in t["holders"]))) for t in report["timeouts"]
        ),
        "sites": sorted((x["site"], x["checkouts"]) for x in report["sites"]),
    }


class TestStoreUrls:
    """A file path is SQLite, a PostgreSQL URL is PostgreSQL, anything else is refused."""

    @pytest.mark.parametrize(
        "store",
        ["mysql://app:pw@db/shop", "sqlite:///x.db", "postgresql+psycopg2://u@h/d",
         "https://example.com/x", "mssql+pyodbc://h/d", "postgresql:shop"],
    )  # fmt: skip
    def test_attach_refuses_another_database(
        self, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """attach() raises ValueError with one sentence, names no password, creates nothing."""
        engine = sa.create_engine("sqlite://")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ValueError) as info:
            instrument.attach(engine, store=store)
        assert "pw@" not in str(info.value) and str(info.value).count(". ") == 0
        assert list(tmp_path.iterdir()) == []

    def test_environment_url_is_checked_too(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad ``$POOLSCOPE_STORE`` is refused as a bad ``store=`` is."""
        monkeypatch.setenv("POOLSCOPE_STORE", "mysql://app:pw@db/shop")
        with pytest.raises(ValueError, match="neither a file path"):
            instrument.attach(sa.create_engine("sqlite://"))

    @pytest.mark.parametrize("command", [["report"], ["dashboard"], ["push", "x.db", "--to"]])
    def test_cli_refuses_another_database(self, command: list[str]) -> None:
        """Each command taking a store exits 2 with one line naming no password."""
        result = CliRunner().invoke(cli, [*command, "mysql://app:s3cret@db/shop"])
        assert result.exit_code == 2
        assert result.output.startswith("poolscope: ") and result.output.count("\n") == 1
        assert "s3cret" not in result.output

    def test_run_refuses_another_database(self) -> None:
        result = CliRunner().invoke(cli, ["run", "--store", "mysql://db/x", "--", "true"])
        assert result.exit_code == 2 and "neither a file path" in result.output

    def test_missing_extra_names_what_to_install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without psycopg, attach() raises ImportError and the CLI exits 2, each naming
        the extra to install."""
        monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
        url = "postgresql+psycopg://u:pw@127.0.0.1/db"
        with pytest.raises(ImportError, match=r"pip install 'poolscope\[postgres\]'"):
            instrument.attach(sa.create_engine("sqlite://"), store=url)
        result = CliRunner().invoke(cli, ["report", url])
        assert result.exit_code == 2 and "poolscope[postgres]" in result.output

    def test_paths_and_urls(self) -> None:
        """Paths that merely hold a colon stay files; a URL keeps its schema apart."""
        assert parse_store("C:\\stores\\a.db") == Path("C:\\stores\\a.db")
        assert parse_store("notes:1.db") == Path("notes:1.db")
        store = parse_store("postgresql+psycopg://u:pw@h:5433/db?schema=fleet&sslmode=require")
        assert isinstance(store, PostgresStore)
        assert store.schema == "fleet"
        assert store.conninfo == "postgresql://u:pw@h:5433/db?sslmode=require"
        assert str(store) == "postgresql+psycopg://u:***@h:5433/db?schema=fleet&sslmode=require"
        assert "pw" not in repr(store)
        assert parse_store("postgresql://h/db").schema == "poolscope"
        with pytest.raises(ValueError, match="not a plain PostgreSQL name"):
            parse_store("postgresql://h/db?schema=a;drop")


class TestFleet:
    """Many processes write one PostgreSQL store; it reads as a SQLite store does."""

    def test_four_processes_report_as_sqlite(self, tmp_path: Path, pg_store: str) -> None:
        """Four processes on one PostgreSQL store give the report four on one SQLite file
        give: the same leaks, timeouts with their holders, and counts."""
        sqlite_store = tmp_path / "fleet.db"
        _run_workers(tmp_path, str(sqlite_store))
        _run_workers(tmp_path, pg_store)
        _, from_sqlite = make_report(sqlite_store, fmt="json")
        _, from_pg = make_report(pg_store, fmt="json")
        assert from_pg["store"] == pg_store  # no password in this URL to mask
        expected = _shape(from_sqlite)
        assert expected["summary"]["processes"] == 4
        assert expected["summary"]["timeouts"] == 4
        assert len(expected["leaks"]) == 2  # gc_reclaimed at forget, never_returned at kept
        assert _shape(from_pg) == expected

    def test_pushed_store_reads_exactly_as_the_file(self, tmp_path: Path, pg_store: str) -> None:
        """A store pushed into PostgreSQL gives the very report its file gives."""
        sqlite_store = tmp_path / "one.db"
        _run_workers(tmp_path, str(sqlite_store), n=2)
        result = CliRunner().invoke(cli, ["push", str(sqlite_store), "--to", pg_store])
        assert result.exit_code == 0, result.output
        _, from_sqlite = make_report(sqlite_store, fmt="json")
        _, from_pg = make_report(pg_store, fmt="json")
        for report in (from_sqlite, from_pg):
            del report["generated_at"], report["store"]
        assert from_pg == from_sqlite

    def test_push_twice_adds_nothing(self, tmp_path: Path, pg_store: str, schema: str) -> None:
        """Pushing a store again adds nothing; pushing it after it grew adds only the new rows."""
        sqlite_store = tmp_path / "host.db"
        _run_workers(tmp_path, str(sqlite_store), n=1)
        runner = CliRunner()
        first = runner.invoke(cli, ["push", str(sqlite_store), "--to", pg_store])
        assert first.exit_code == 0, first.output
        counts = _rows(schema, "SELECT (SELECT count(*) FROM S.events), "
                               "(SELECT count(*) FROM S.processes)")[0]  # fmt: skip
        again = runner.invoke(cli, ["push", str(sqlite_store), "--to", pg_store])
        assert "0 events, 0 processes, 0 pools, 0 stacks added" in again.output
        assert _rows(schema, "SELECT (SELECT count(*) FROM S.events), "
                             "(SELECT count(*) FROM S.processes)")[0] == counts  # fmt: skip
        _run_workers(tmp_path, str(sqlite_store), n=1)  # the store grows
        runner.invoke(cli, ["push", str(sqlite_store), "--to", pg_store])
        runner.invoke(cli, ["push", str(sqlite_store), "--to", pg_store])
        _, from_sqlite = make_report(sqlite_store, fmt="json")
        _, from_pg = make_report(pg_store, fmt="json")
        assert from_pg["summary"] == from_sqlite["summary"]
        assert from_pg["summary"]["processes"] == 2

    @pytest.mark.parametrize(
        "args, message",
        [(["missing.db"], "no store at"), (["x.db", "--to", "y.db"], "--to takes a PostgreSQL")],
    )
    def test_push_bad_input(
        self, tmp_path: Path, pg_store: str, args, message, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / "x.db").write_text("")
        monkeypatch.chdir(tmp_path)
        if "--to" not in args:
            args = [*args, "--to", pg_store]
        else:
            sqlite_store = tmp_path / "x.db"
            sqlite_store.unlink()
            _run_workers(tmp_path, str(sqlite_store), n=1, quick=1)
        result = CliRunner().invoke(cli, ["push", *args])
        assert result.exit_code == 2 and message in result.output
        assert "Traceback" not in result.output

    def test_no_store_in_schema(self, pg_store: str) -> None:
        result = CliRunner().invoke(cli, ["report", pg_store])
        assert result.exit_code == 2
        assert "no poolscope store in schema" in result.output

    def test_concurrent_creation(self, pg_store: str, schema: str) -> None:
        """Processes starting on a new store at once all record (the schema is made once)."""
        script = textwrap.dedent(
            """
            import sys, sqlalchemy as sa, instrument
            e = sa.create_engine("sqlite://")
            m = instrument.attach(e, store=sys.argv[1], name="p")
            with e.connect() as c:
                c.exec_driver_sql("select 1")
            assert m.flush() and m.dropped == 0
            """
        )
        procs = [subprocess.Popen([sys.executable, "-c", script, pg_store]) for _ in range(4)]
        assert [p.wait(60) for p in procs] == [0] * 4
        assert _rows(schema, "SELECT count(*) FROM S.processes")[0][0] == 4
        assert _rows(schema, "SELECT count(*) FROM S.events WHERE kind = 'checkout'")[0][0] == 4


def _terminate_writer(schema: str) -> int:
    with _admin() as conn:
        return len(
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (f"poolscope {schema}",),
            ).fetchall()
        )


def _stored(schema: str) -> tuple[int, int]:
    """(events other than drop counts, records the drop counts say were lost)."""
    row = _rows(
        schema,
        "SELECT count(*) FILTER (WHERE kind <> 'dropped'), "
        "COALESCE(sum(count) FILTER (WHERE kind = 'dropped'), 0) FROM S.events",
    )[0]
    return int(row[0]), int(row[1])


def _ops(engine: sa.Engine, n: int) -> None:
    for _ in range(n):
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")


def _until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


class TestFaults:
    """The server away or the writer's session killed: the application carries on, what is
    lost is counted, and recording resumes."""

    def test_writer_connection_terminated(self, pg_store: str, schema: str) -> None:
        """pg_terminate_backend on the writer mid-run: the application completes, the store's
        drop count makes up exactly for what is missing, and later events are recorded."""
        engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=1)
        monitor = instrument.attach(engine, store=pg_store, name="k")
        _ops(engine, 100)
        assert monitor.flush()
        assert _terminate_writer(schema) == 1
        _ops(engine, 100)  # the batch these go out in meets the dead session
        monitor.flush()
        killed_at = time.time()
        _ops(engine, 100)
        produced = 1 + 2 * 300  # one connect, then a checkout and a checkin each
        assert _until(lambda: (monitor.flush(), sum(_stored(schema)) == produced)[1])
        stored, lost = _stored(schema)
        assert lost > 0 and lost == monitor.dropped
        assert _rows(schema, f"SELECT count(*) FROM S.events WHERE at > {killed_at}")[0][0] > 0
        assert _rows(schema, "SELECT count(*) FROM S.processes")[0][0] == 1  # the same row

    def test_server_down_at_start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A store whose database is not there yet: records wait in the queue up to its
        bound, those beyond it are dropped and counted, and all is written once it is up."""
        require_postgres()
        bound = 150
        monkeypatch.setattr(_hooks, "MAX_QUEUE_VALUES", bound * _record.RECORD_WIDTH)
        monkeypatch.setattr(_writer, "MAX_QUEUE_VALUES", bound * _record.RECORD_WIDTH)
        database = f"ps_down_{uuid.uuid4().hex[:10]}"
        base = PG_URL.rsplit("/", 1)[0]
        store = f"{base}/{database}"
        engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=1)
        try:
            monitor = instrument.attach(engine, store=store, name="d")
            _ops(engine, 100)  # 201 records: 51 beyond the bound
            # flush() does not wait for a store that is away, and says it could not write.
            assert not monitor.flush(timeout=5)
            with _admin() as conn:
                conn.execute(f'CREATE DATABASE "{database}"')
            db = _conninfo(store)

            def written() -> int:
                monitor.flush()
                try:
                    with psycopg.connect(db) as conn:
                        return conn.execute(
                            "SELECT count(*) FROM poolscope.events WHERE kind <> 'dropped'"
                        ).fetchone()[0]
                except psycopg.Error:
                    return 0

            assert _until(lambda: written() == bound)
            _ops(engine, 10)
            assert _until(lambda: written() == bound + 20)
            with psycopg.connect(db) as conn:
                lost = conn.execute(
                    "SELECT sum(count) FROM poolscope.events WHERE kind = 'dropped'"
                ).fetchone()[0]
            assert lost == 51 == monitor.dropped
            monitor.close()
        finally:
            _writer.shutdown_all(timeout=5)
            with _admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_text_postgresql_cannot_hold(pg_store: str, schema: str, sqlite_url: str) -> None:
    """A thread name with a lone surrogate and a NUL is written escaped; the batch's other
    events are not lost."""
    import threading

    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.QueuePool, pool_size=1)
    monitor = instrument.attach(engine, store=pg_store, name="t")
    worker = threading.Thread(target=_ops, args=(engine, 1), name="bad\udcff\x00name")
    worker.start()
    worker.join()
    _ops(engine, 2)
    assert monitor.flush() and monitor.dropped == 0
    threads = [r[0] for r in _rows(schema, "SELECT thread FROM S.events WHERE kind = 'checkout'")]
    assert sorted(threads) == ["MainThread", "MainThread", "bad\\xff\\x00name"]


class TestSecrets:
    """A password in the store URL reaches neither the store, nor a log line, nor an error."""

    def test_password_goes_nowhere(
        self, tmp_path: Path, pg_store: str, schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="poolscope")
        store = _with_password(PG_URL.split("?")[0]) + f"?schema={schema}"
        # A process given the URL on its command line, as poolscope run or a config would.
        _run_workers(tmp_path, store, n=1, quick=3)
        engine = sa.create_engine("sqlite://")
        monitor = instrument.attach(engine, store=store, name="s")
        _ops(engine, 3)
        assert monitor.flush()
        assert PASSWORD not in repr(monitor) + str(monitor.store)
        # A server that is not there: the error logged and the CLI's error.
        down = store.replace("@127.0.0.1:5432/", "@127.0.0.1:1/").replace(schema, schema + "x")
        down_engine = sa.create_engine("sqlite://")
        down_monitor = instrument.attach(down_engine, store=down, name="x")
        _ops(down_engine, 1)
        down_monitor.flush(timeout=1)
        time.sleep(0.3)
        report = CliRunner().invoke(cli, ["report", down])
        assert report.exit_code == 2 and "***" in report.output
        text, _ = make_report(store, fmt="json")
        dump = "".join(
            str(row)
            for table in ("meta", "processes", "pools", "stacks", "events")
            for row in _rows(schema, f"SELECT * FROM S.{table}")
        )
        assert "***" in dump  # the argv's URL, masked
        assert any("cannot write to its store" in r.getMessage() for r in caplog.records)
        for text_seen in (dump, text, report.output, caplog.text):
            assert PASSWORD not in text_seen


class TestRoles:
    """The documented least-privilege roles: a writer owning its schema, a reader with
    SELECT only."""

    def test_writer_and_reader_roles(self, tmp_path: Path, schema: str) -> None:
        suffix = uuid.uuid4().hex[:8]
        writer, reader = f"ps_writer_{suffix}", f"ps_reader_{suffix}"
        with _admin() as conn:
            for statement in (
                f"CREATE ROLE {writer} LOGIN",
                f"CREATE ROLE {reader} LOGIN",
                f'CREATE SCHEMA "{schema}" AUTHORIZATION {writer}',
                f'GRANT USAGE ON SCHEMA "{schema}" TO {reader}',
                f'ALTER DEFAULT PRIVILEGES FOR ROLE {writer} IN SCHEMA "{schema}" '
                f"GRANT SELECT ON TABLES TO {reader}",
            ):
                conn.execute(statement)
        try:
            host = PG_URL.split("@", 1)[1].split("?")[0]
            as_writer = f"postgresql+psycopg://{writer}@{host}?schema={schema}"
            as_reader = f"postgresql+psycopg://{reader}@{host}?schema={schema}"
            _run_workers(tmp_path, as_writer, n=2, quick=5)
            _, read = make_report(as_reader, fmt="json")
            assert read["summary"]["processes"] == 2 and read["summary"]["timeouts"] == 2
            _, owned = make_report(_with_query(PG_URL, schema=schema), fmt="json")
            for report in (read, owned):
                del report["generated_at"], report["store"]
            assert read == owned
            # The reader cannot write.
            with (
                psycopg.connect(_conninfo(as_reader.split("?")[0])) as conn,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                conn.execute(f'DELETE FROM "{schema}".events')
        finally:
            with _admin() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                for role in (writer, reader):
                    conn.execute(f"DROP OWNED BY {role}")
                    conn.execute(f"DROP ROLE {role}")


def test_analysis_takes_the_url(pg_store: str, tmp_path: Path) -> None:
    """instrument.analysis opens a store URL as it opens a file."""
    _run_workers(tmp_path, pg_store, n=1, quick=2)
    conn = instrument.analysis.open_store(pg_store)
    try:
        assert len(instrument.analysis.processes(conn)) == 1
    finally:
        conn.close()


class TestRetention:
    """Rollups, notable checkouts and keep_raw on a PostgreSQL store, as on a SQLite one."""

    def test_pruned_store_finds_what_the_whole_one_finds(
        self, tmp_path: Path, schema: str, sqlite_url: str
    ) -> None:
        """Raw events past keep_raw are pruned once rolled up, but not those of leaks,
        timeout holders or long holds: the leaks and timeouts found, the rollups' counts
        and the notable reasons are those of the same workload kept whole, and of the same
        workload in a SQLite store."""
        from test_retention import LEAK_AFTER, Workload, _findings

        t0 = time.time() - 3600
        found: dict[str, Any] = {}
        for name, keep in (("whole", math.inf), ("pruned", 60.0), ("file", 60.0)):
            store = (
                str(tmp_path / "file.db")
                if name == "file"
                else _with_query(PG_URL, schema=f"{schema}_{name}")
            )
            engine = sa.create_engine(sqlite_url)
            monitor = instrument.attach(
                engine, store=store, leak_after=LEAK_AFTER, name="app", keep_raw=keep
            )
            monitor.flush()
            Workload(monitor, t0).emit(monitor)
            monitor.close()
            engine.dispose()
            found[name] = store
        pruned = f"{schema}_pruned"
        try:
            old = _rows(pruned, f"SELECT count(*) FROM S.events WHERE at < {t0 + 3000}")[0][0]
            whole = _rows(f"{schema}_whole", f"SELECT count(*) FROM S.events "
                                             f"WHERE at < {t0 + 3000}")[0][0]  # fmt: skip
            assert old < whole / 10  # pruned
            assert _rows(pruned, "SELECT sum(checkouts) FROM S.rollups")[0][0] == 3005
            reasons = dict(_rows(pruned, "SELECT checkout_id, reason FROM S.notable"))
            assert reasons[10_004] == reasons[10_005] == "timeout_holder"
            assert reasons[10_001] == "leak"
            (raw_since,) = _rows(pruned, "SELECT value FROM S.meta WHERE key = 'raw_since'")[0]
            assert t0 + 300 < float(raw_since) < time.time()
            assert _findings(found["pruned"]) == _findings(found["whole"])
            assert _findings(found["pruned"]) == _findings(found["file"])
        finally:
            with _admin() as conn:
                for name in ("whole", "pruned"):
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}_{name}" CASCADE')

    def test_push_carries_rollups_and_notable(
        self, tmp_path: Path, pg_store: str, schema: str, sqlite_url: str
    ) -> None:
        """A pruned SQLite store pushed twice gives the PostgreSQL store its rollups (counted
        once), notable checkouts and raw_since: the same leaks and timeouts are found."""
        from test_retention import LEAK_AFTER, Workload, _findings

        store = tmp_path / "pruned.db"
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(
            engine, store=store, leak_after=LEAK_AFTER, name="app", keep_raw=60.0
        )
        monitor.flush()
        Workload(monitor, time.time() - 3600).emit(monitor)
        monitor.close()
        engine.dispose()
        for _ in range(2):
            result = CliRunner().invoke(cli, ["push", str(store), "--to", pg_store])
            assert result.exit_code == 0, result.output
        assert _rows(schema, "SELECT sum(checkouts) FROM S.rollups")[0][0] == 3005
        assert _rows(schema, "SELECT count(*) FROM S.meta WHERE key = 'raw_since'")[0][0] == 1
        assert _findings(pg_store) == _findings(store)
        assert _findings(store)[0]  # leaks found, so the equality is not vacuous

    def test_rollups_are_the_sqlite_stores(
        self, tmp_path: Path, pg_store: str, schema: str, sqlite_url: str
    ) -> None:
        """The same records, written in many batches (each batch's rollup rows merged into
        those stored by the ones before), give the same rollup rows in a PostgreSQL store
        as in a SQLite file."""
        from conftest import query
        from test_retention import LEAK_AFTER, Workload

        from instrument import _rollups

        file = tmp_path / "rollups.db"
        # Half a minute past a minute's start: the 300 s of records span six minutes (from
        # just past a minute's start, they ended before the sixth, one run in 700).
        t0 = math.floor(time.time() / 60) * 60 - 600 + 30
        for store in (str(file), pg_store):
            engine = sa.create_engine(sqlite_url)
            monitor = instrument.attach(
                engine, store=store, leak_after=LEAK_AFTER, name="app", keep_raw=math.inf
            )
            monitor.flush()
            records = Workload(monitor, t0).records
            for start in range(0, len(records), 400):
                for record in records[start : start + 400]:
                    monitor._writer.emit(record)
                assert monitor.flush()
            monitor.close()
            engine.dispose()
        # Stacks by fingerprint: the two stores number them in the order they were written.
        rest = ", ".join(f"r.{c}" for c in _rollups.ROLLUP_COLUMNS[5:])
        by_site = (
            f"SELECT r.period_s, r.start_at, r.pool_id, s.fingerprint, {rest} FROM S.rollups r "
            "LEFT JOIN S.stacks s ON s.id = r.stack_id ORDER BY 1, 2, 3, 4"
        )
        by_pool = "SELECT * FROM S.pool_rollups ORDER BY 1, 2, 4"
        for table, sql in (("rollups", by_site), ("pool_rollups", by_pool)):
            in_file = query(file, sql.replace("S.", ""))
            in_pg = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                     for row in _rows(schema, sql)]  # fmt: skip
            # Sums of floats may differ in their last bits where the writer thread took
            # the records in other batches: the same to 1e-9, every other column exactly.
            assert len(in_pg) == len(in_file) > 5, table
            for pg_row, file_row in zip(in_pg, in_file, strict=True):
                assert len(pg_row) == len(file_row)
                for a, b in zip(pg_row, file_row, strict=True):
                    same = math.isclose(a, b, rel_tol=1e-9) if type(b) is float else a == b
                    assert same, (table, pg_row, file_row)
        assert sum(r[0] for r in query(file, "SELECT checkouts FROM rollups")) == 3005

    def test_prune_finds_returns_through_their_index(self, pg_store: str, schema: str) -> None:
        """The prune's test that a checkout was returned reads the returns' index, which
        holds the returns alone (writing any other event adds no index entry)."""
        from instrument import _retention

        engine = sa.create_engine("sqlite://")
        monitor = instrument.attach(engine, store=pg_store, name="app")
        _ops(engine, 3)
        assert monitor.flush()
        kinds = ", ".join(f"'{k}'" for k in _retention.DELETABLE_KINDS)
        with _admin() as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute("SET enable_seqscan TO off")  # as on a store of many events
            plan = "\n".join(
                row[0]
                for row in conn.execute(
                    f"EXPLAIN DELETE FROM events WHERE id > 0 AND id <= 100 AND process_id = 1 "
                    f"AND kind IN ({kinds}) AND (checkout_id IS NULL OR "
                    f"({_retention._NOT_NOTABLE} AND {_retention._RETURNED}))"
                )
            )
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        assert "Scan using events_returns" in plan or "Scan on events_returns" in plan, plan
        assert events > 6  # the connect, 3 checkouts, 3 checkins
        assert _index_entries(schema, "events_returns") == 3

    def test_a_checkout_returned_in_a_later_batch_is_pruned_with_its_return(
        self, pg_store: str, schema: str, sqlite_url: str
    ) -> None:
        """As on a SQLite store: a checkout past keep_raw when written, returned in a later
        batch, is pruned with its return (no checkout is left without its return), through
        lookups by event id (the primary key), as the prune's."""
        from test_retention import LATE, LEAK_AFTER, UNRETURNED_SQL, emit_late_return

        from instrument import _retention

        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(
            engine, store=pg_store, leak_after=LEAK_AFTER, name="app", keep_raw=60.0
        )
        monitor.flush()
        checkouts = emit_late_return(monitor, time.time() - 3600)
        monitor.close()
        engine.dispose()
        assert _rows(schema, UNRETURNED_SQL.format(events="S.events")) == []
        assert _rows(schema, f"SELECT count(*) FROM S.events WHERE checkout_id = {LATE}") == [(0,)]
        assert _rows(schema, "SELECT count(*) FROM S.events WHERE kind = 'checkout'") == [(0,)]
        assert _rows(schema, "SELECT sum(checkouts), sum(returns) FROM S.rollups") == [
            (checkouts, checkouts)
        ]
        with _admin() as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute("SET enable_seqscan TO off")  # as on a store of many events
            for sql in (
                "EXPLAIN SELECT id, pool_id, checkout_id FROM events WHERE id > 0 AND id <= 100 "
                f"AND process_id = 1 AND at < 1 AND kind = 'checkout' AND "
                f"{_retention._NOT_NOTABLE}",
                "EXPLAIN DELETE FROM events WHERE id = 5 AND process_id = 1 AND kind = "
                f"'checkout' AND {_retention._NOT_NOTABLE}",
            ):
                plan = "\n".join(row[0] for row in conn.execute(sql))
                assert "events_pkey" in plan and "Seq Scan on events" not in plan, plan

    def test_rollups_of_a_failed_keeper_transaction_are_added_once(
        self, pg_store: str, schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """As on a SQLite store: the keeper's session is terminated (pg_terminate_backend),
        so its transaction fails; its rollup rows go out with the next batch's on the new
        session, added to them and to the stored row: every checkout is counted once, and
        its notable checkouts are marked then, counted once."""
        from test_retention import keeper_batch

        from instrument import _pg_store
        from instrument._pg_writer import PostgresKeeper, _SqliteLike

        store = parse_store(pg_store)
        assert isinstance(store, PostgresStore)

        def session() -> Any:
            conn = _pg_store.connect(store, autocommit=True)
            _pg_store.ensure_schema(conn, store)
            conn.execute(f'SET search_path TO "{schema}"')
            return conn

        first = session()
        keeper = PostgresKeeper(math.inf, math.inf)
        now = time.time()
        at = math.floor(now / 60) * 60 - 120 + 1  # three batches in one minute
        keeper.start(_SqliteLike(first), 1, now)
        keeper.after_batch(_SqliteLike(first), keeper_batch(at, 1, 10), None, None, {}, now, True)
        with _admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first.info.backend_pid,))
        caplog.set_level(logging.WARNING, logger="poolscope")
        long_holds = {1: 0.0015}  # the batch's holds are 2 ms: seven notable checkouts
        keeper.after_batch(_SqliteLike(first), keeper_batch(at + 1, 11, 7), None, None,
                           long_holds, now, True)  # fmt: skip
        assert "could not update the rollups" in caplog.text
        assert _rows(schema, "SELECT sum(checkouts) FROM S.rollups") == [(10,)]
        second = session()
        try:
            keeper.after_batch(_SqliteLike(second), keeper_batch(at + 2, 18, 5), None, None, {},
                               now, True)  # fmt: skip
        finally:
            second.close()
            first.close()
        assert _rows(schema, "SELECT count(*), sum(checkouts), sum(returns) FROM S.rollups") == [
            (1, 22, 22)
        ]
        assert _rows(schema, "SELECT count(*), sum(events) FROM S.pool_rollups") == [(1, 44)]
        assert _rows(schema, "SELECT count(*), min(checkout_id) FROM S.notable") == [(7, 11)]
        assert _rows(schema, "SELECT notable FROM S.retention") == [(7,)]


def _index_entries(schema: str, index: str) -> int:
    """How many entries the index holds (its statistics, brought up to date first)."""
    with _admin() as conn:
        conn.execute(f'ANALYZE "{schema}".events')
        return int(
            conn.execute(
                "SELECT reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s",
                (schema, index),
            ).fetchone()[0]
        )


def _child_ops(engine: sa.Engine) -> None:
    engine.dispose(close=False)  # as SQLAlchemy documents for a forked child
    _ops(engine, 5)


def test_forked_child_writes_its_own_process_row(
    pg_store: str, schema: str, sqlite_url: str
) -> None:
    """A forked child records as a process of its own (parent_id set), the pool its
    ``dispose(close=False)`` puts in place included, and the parent's session goes on
    undisturbed by the child's exit."""
    import multiprocessing

    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.QueuePool, pool_size=1)
    monitor = instrument.attach(engine, store=pg_store, name="f")
    _ops(engine, 3)
    assert monitor.flush()
    child = multiprocessing.get_context("fork").Process(target=_child_ops, args=(engine,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    _ops(engine, 3)
    assert monitor.flush() and monitor.dropped == 0
    rows = _rows(schema, "SELECT id, parent_id FROM S.processes ORDER BY id")
    assert len(rows) == 2 and rows[1][1] == rows[0][0]
    per_process = dict(_rows(schema, "SELECT process_id, count(*) FROM S.events "
                                     "WHERE kind = 'checkout' GROUP BY process_id"))  # fmt: skip
    assert per_process == {rows[0][0]: 6, rows[1][0]: 5}


def test_poolscope_run_records_into_a_postgresql_store(
    tmp_path: Path, pg_store: str, schema: str
) -> None:
    """``poolscope run --store URL`` attaches a program that never imports poolscope to a
    PostgreSQL store."""
    program = tmp_path / "app.py"
    program.write_text(
        textwrap.dedent(
            f"""
            import sqlalchemy as sa
            engine = sa.create_engine("sqlite:///{tmp_path / "app.db"}")
            for _ in range(3):
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")
            """
        )
    )
    poolscope = Path(sys.executable).with_name("poolscope")
    done = subprocess.run(
        [str(poolscope), "run", "--store", pg_store, "--", sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert _rows(schema, "SELECT count(*) FROM S.events WHERE kind = 'checkout'")[0][0] == 3
    assert _rows(schema, "SELECT end_reason FROM S.processes") == [("exit",)]


def _one_checkout_stored(engine: sa.Engine, store: str, name: str) -> None:
    """Attach ``engine`` to ``store`` as ``name``, write one checkout, and stop every writer."""
    monitor = instrument.attach(engine, store=store, name=name)
    _ops(engine, 1)
    assert monitor.flush()
    monitor.close()
    _writer.shutdown_all()


def test_a_newer_schema_is_refused(
    pg_store: str, schema: str, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A store schema written by a newer poolscope is neither read (exit 2) nor written
    (one error logged; the records wait in the queue, as for a store that is away)."""
    engine = sa.create_engine(sqlite_url)
    _one_checkout_stored(engine, pg_store, "v")
    with _admin() as conn:
        conn.execute(f"UPDATE \"{schema}\".meta SET value = '99' WHERE key = 'schema_version'")
    result = CliRunner().invoke(cli, ["report", pg_store])
    assert result.exit_code == 2 and "newer poolscope" in result.output
    caplog.set_level(logging.ERROR, logger="poolscope")
    engine2 = sa.create_engine(sqlite_url)
    monitor2 = instrument.attach(engine2, store=pg_store, name="v2")
    _ops(engine2, 1)
    assert not monitor2.flush(timeout=5)
    assert any("newer poolscope" in r.getMessage() for r in caplog.records)
    assert _rows(schema, "SELECT count(*) FROM S.processes")[0][0] == 1


def _diagnosis_at(store: str, function: str) -> dict[str, Any]:
    """The ``diagnosis`` that ``poolscope report STORE --format json`` gives the leak group
    checked out in ``function``."""
    result = CliRunner().invoke(cli, ["report", store, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    found = [x for x in report["leaks"] if x["site"].endswith(f" in {function}")]
    assert found, [x["site"] for x in report["leaks"]]
    return found[0]["diagnosis"]


def _timeless(d: dict[str, Any], hold_s: float) -> dict[str, Any]:
    """What a diagnosis says that does not depend on when (or how fast) it ran: the
    seconds as whether they are within 10 % of ``hold_s``."""
    server = dict(d["server"] or {})
    for key in ("at", "pid", "xact_start", "state_change"):
        assert server.pop(key, None) is not None, (key, d)
    near = {k: abs(d[k] - hold_s) <= 0.1 * hold_s for k in ("held_s", "idle_in_transaction_s")}
    rest = {k: v for k, v in d.items() if not k.endswith("_s") and k != "server"}
    return {**rest, **near, "server": server}


SECRETS = ("literal-Secret-q7", "918273", "param-Secret-z9", "7770321")
"""Values in the statements (a literal and a parameter) that must never reach a store."""


def _hold_in_transaction(engine: sa.Engine, hold_s: float) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT :p, :n"), {"p": "param-Secret-z9", "n": 7770321})
        conn.exec_driver_sql("SELECT 'literal-Secret-q7', 918273")
        time.sleep(hold_s)
        conn.commit()


def _texts(schema: str) -> str:
    """Every row of every table of the PostgreSQL store, as text."""
    tables = [
        r[0]
        for r in _rows(schema, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'")
    ]
    assert "diagnoses" in tables
    return "\n".join(
        str(r[0]) for t in tables for r in _rows(schema, f"SELECT x::text FROM S.{t} x")
    )


class TestDiagnoses:
    """``diagnose=`` on a PostgreSQL store: written, read and pushed as on SQLite."""

    HOLD_S = 1.0
    LEAK_AFTER_S = 0.3

    def test_a_diagnosis_reads_as_on_sqlite_and_holds_no_literal(
        self, tmp_path: Path, pg_url: str, pg_store: str, schema: str
    ) -> None:
        """A transaction left open across a sleep, recorded into a PostgreSQL store, has the
        diagnosis the same workload has in a SQLite store (kind, statements, parts, the
        server's state and masked statement); no literal or parameter is in the store."""
        file = tmp_path / "diag.db"
        found = {}
        for store in (str(file), pg_store):
            engine = sa.create_engine(pg_url)
            monitor = instrument.attach(
                engine, store=store, leak_after=self.LEAK_AFTER_S, diagnose=True
            )
            _hold_in_transaction(engine, self.HOLD_S)
            assert monitor.flush()
            assert monitor._writer.diagnoses == [] and monitor._writer.diagnoses_dropped == 0
            monitor.close()
            engine.dispose()
            found[store] = _diagnosis_at(store, "_hold_in_transaction")
        in_file, in_pg = found[str(file)], found[pg_store]
        assert in_pg["kind"] == "idle_in_transaction" and in_pg["complete"] is True
        assert in_pg["statements"] == 2
        assert in_pg["server"]["query"] == "SELECT '?', ?"
        assert _timeless(in_pg, self.HOLD_S) == _timeless(in_file, self.HOLD_S)
        assert _rows(schema, "SELECT count(*) FROM S.diagnoses")[0][0] == 1
        text = _texts(schema)
        assert "SELECT '?', ?" in text
        for secret in SECRETS:
            assert secret not in text

    def test_push_carries_diagnoses_idempotently(
        self, tmp_path: Path, pg_url: str, pg_store: str, schema: str
    ) -> None:
        """A diagnosis pushed while its checkout is still held (the flagged row) is brought
        up to date by the push after its return (the whole breakdown); pushing again adds
        nothing; the PostgreSQL store then reports what the file reports."""
        file = tmp_path / "pushed.db"
        engine = sa.create_engine(pg_url)
        monitor = instrument.attach(engine, store=file, leak_after=self.LEAK_AFTER_S, diagnose=True)
        runner = CliRunner()

        def push() -> None:
            result = runner.invoke(cli, ["push", str(file), "--to", pg_store])
            assert result.exit_code == 0, result.output

        conn = engine.connect()
        conn.exec_driver_sql("SELECT 'literal-Secret-q7', 918273")
        time.sleep(self.HOLD_S)
        assert monitor.flush()
        push()
        columns = "complete, statements, idle_in_transaction_s, server_state, query"
        (flagged,) = _rows(schema, f"SELECT {columns} FROM S.diagnoses")
        assert flagged[0] == 0 and flagged[3] == "idle in transaction"
        conn.commit()
        conn.close()
        monitor.close()
        engine.dispose()
        push()
        push()
        (row,) = _rows(schema, f"SELECT {columns} FROM S.diagnoses")
        assert row == query(file, f"SELECT {columns} FROM diagnoses")[0]
        assert row[0] == 1 and row[2] > flagged[2]
        _, from_file = make_report(file, fmt="json")
        _, from_pg = make_report(pg_store, fmt="json")
        # This process still runs: what depends on the time of reading is left out.
        assert from_pg["leaks"] == from_file["leaks"]
        assert any(x["diagnosis"] for x in from_pg["leaks"])
        for secret in SECRETS:
            assert secret not in _texts(schema)

    def test_a_store_made_before_gets_the_table(
        self, pg_store: str, schema: str, sqlite_url: str
    ) -> None:
        """A schema-2 store (no diagnoses table) reads as it is, and gets the table, and
        version 3, when a writer opens it next."""
        engine = sa.create_engine(sqlite_url)
        _one_checkout_stored(engine, pg_store, "old")
        with _admin() as conn:
            conn.execute(f'DROP TABLE "{schema}".diagnoses')
            conn.execute(f"UPDATE \"{schema}\".meta SET value = '2' WHERE key = 'schema_version'")
        _, report = make_report(pg_store, fmt="json")
        assert report["summary"]["checkouts"] == 1
        monitor = instrument.attach(engine, store=pg_store, name="old")
        _ops(engine, 1)
        assert monitor.flush()
        version = "SELECT value FROM S.meta WHERE key = 'schema_version'"
        assert _rows(schema, version) == [("3",)]
        assert _rows(schema, "SELECT count(*) FROM S.diagnoses") == [(0,)]

    def test_diagnoses_wait_bounded_while_the_store_is_away(
        self, monkeypatch: pytest.MonkeyPatch, sqlite_url: str
    ) -> None:
        """While the store's database is not there, diagnoses wait up to their bound (the
        rest dropped and counted) and no batch is attempted; once it is up they are written."""
        from instrument import _diagnose

        require_postgres()
        monkeypatch.setattr(_diagnose, "MAX_PENDING", 2)
        database = f"ps_away_{uuid.uuid4().hex[:10]}"
        store = f"{PG_URL.rsplit('/', 1)[0]}/{database}"
        engine = sa.create_engine(sqlite_url)
        try:
            monitor = instrument.attach(engine, store=store, leak_after=0.05, diagnose=True)
            for _ in range(3):  # three long holds: three complete diagnoses at checkin
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")
                    time.sleep(0.1)
            assert not monitor.flush(timeout=5)
            assert len(monitor._writer.diagnoses) == 2
            assert monitor._diagnoser.dropped >= 1
            with _admin() as conn:
                conn.execute(f'CREATE DATABASE "{database}"')

            def written() -> int:
                monitor.flush()
                try:
                    with psycopg.connect(_conninfo(store)) as conn:
                        return conn.execute("SELECT count(*) FROM poolscope.diagnoses").fetchone()[
                            0
                        ]
                except psycopg.Error:
                    return 0

            assert _until(lambda: written() >= 1)
            assert monitor._writer.diagnoses == [] and monitor._writer.diagnoses_dropped == 0
            monitor.close()
        finally:
            _writer.shutdown_all(timeout=5)
            engine.dispose()
            with _admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _records(pool: int, stack: int, at: float) -> list[tuple[Any, ...]]:
    """Records of every shape the events columns take, as the listeners queue them (absent
    values, in the fields that may be absent, as ``_record.NULL``): text of many scripts,
    ints where floats go, negative and 64-bit numbers, infinities, a NUL in a thread name
    (the last record), an unknown stack."""
    null = _record.NULL
    return [
        (at, pool, "connect", 1, null, "MainThread", null, 0, 0, -5, 0, stack, null, 0.0125,
         null, null),
        (at + 1e-6, pool, "checkout", 1, 7, "wörker-1 ✓ 線程", "Task-3", 1, 0, 0, 0, stack,
         0, null, null, null),
        (at + 2, pool, "checkin", 1, 7, "wörker-1 ✓ 線程", "Task-3", 0, 1, 0, 0, stack,
         null, null, 2.000000000000001, null),
        (at + 3, pool, "timeout", null, null, "a\tb\nc\\d", null, 2**62, 0, 0, 3, 999_999,
         30, null, null, null),
        (at + 4, pool, "dropped", null, null, null, null, 0, 0, 0, 0, stack, null, math.inf,
         -math.inf, -(2**63)),
        (at + 5, pool, "checkout", 2, 2**40, "nul\x00here", null, 1, 0, 0, 0, stack,
         1e-300, null, null, null),
    ]  # fmt: skip


def _spy_copies(writer: Any, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each of ``writer``'s calls of ``_copy_events`` (the C COPY) returns, in order."""
    copied: list[bool] = []
    copy_events = writer._copy_events

    def spy(conn: Any, events: Any) -> bool:
        copied.append(copy_events(conn, events))
        return copied[-1]

    monkeypatch.setattr(writer, "_copy_events", spy)
    return copied


def _events(schema: str) -> list[tuple[Any, ...]]:
    return _rows(schema, "SELECT * FROM S.events ORDER BY id")


class TestCopy:
    """The writer's COPY of the queue's records: formatted in C (binary, the GIL released)
    where it can be, else from Python values; the same rows either way."""

    def test_same_rows_from_c_and_python(
        self, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same records written through the C queue and through a list queue are the
        same rows, every column (ids included: each in a fresh schema)."""
        if _writer.sqlite_rows is None:
            pytest.skip("the C helpers are off")
        require_postgres()
        stored = []
        schemas = [f"ps_{uuid.uuid4().hex[:12]}" for _ in range(2)]
        at = time.time() + 1 / 3  # recent: kept raw
        try:
            for impl, name in zip(("c", "python"), schemas, strict=True):
                if impl == "python":
                    monkeypatch.setattr(_writer, "sqlite_rows", None)
                engine = sa.create_engine(sqlite_url)
                monitor = instrument.attach(engine, store=_with_query(PG_URL, schema=name))
                writer = monitor._writer
                assert (writer._rows is None) == (impl == "python")
                copied = _spy_copies(writer, monkeypatch)
                stack = writer.stacks.capture()
                records = _records(monitor.pool_key, stack, at)
                for record in records[:-1]:
                    writer.emit(record)
                assert monitor.flush() and monitor.dropped == 0
                assert copied[-1:] == ([True] if impl == "c" else [])
                writer.emit(records[-1])  # a NUL: the batch is written from Python values
                assert monitor.flush() and monitor.dropped == 0
                assert copied[-1:] == ([False] if impl == "c" else [])
                stored.append(_events(name))
                monitor.detach()
                _writer.shutdown_all(timeout=10.0)
        finally:
            with _admin() as conn:
                for name in schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        from_c, from_python = stored
        assert len(from_c) == 6
        assert from_c == from_python
        threads = [row[7] for row in from_c]
        assert threads[1] == "wörker-1 ✓ 線程" and threads[5] == "nul\\x00here"
        assert [row[14] for row in from_c][:2] == [None, 0.0]  # wait_s: an int queued
        assert from_c[3][13] is None and from_c[0][13] is not None  # stack 999_999: unknown
        assert from_c[3][9] == 2**62 and from_c[4][-1] == -(2**63)

    def test_c_formats_the_binary_stream(self) -> None:
        """``copy_binary`` gives the whole stream: each record's values in its column's
        binary form, the ids mapped (NULL where unmapped), the suffix after each; None
        where a value does not go into its column as it is."""
        rows = _writer.sqlite_rows
        if rows is None:
            pytest.skip("the C helpers are off")
        from instrument import _pg_writer

        events = rows.Events(_record.RECORD_WIDTH)
        records = _records(5, 8, 1.5)[:5]
        for record in records:
            events.extend(record)
        remap = {_record.POOL: {5: 42}, _record.STACK: {8: 9}}
        suffix = (8).to_bytes(4, "big") + (77).to_bytes(8, "big")
        data = rows.copy_binary(events, _pg_writer._COPY_TYPES, remap, suffix, 1)
        assert data[:19] == b"PGCOPY\n\xff\r\n\x00" + bytes(8) and data[-2:] == b"\xff\xff"
        parsed = _parse_copy(data[19:-2], _pg_writer._COPY_TYPES + "q")
        expected = []
        for record in records:
            values = [None if v == _record.NULL else v for v in record]
            values[_record.POOL] = 42
            values[_record.STACK] = {8: 9}.get(values[_record.STACK])
            values[_record.WAIT_S] = (
                None if values[_record.WAIT_S] is None else float(values[_record.WAIT_S])
            )
            expected.append((*values, 77))
        assert parsed == expected
        nul = rows.Events(_record.RECORD_WIDTH)
        nul.extend(_records(5, 8, 1.5)[5])
        assert rows.copy_binary(nul, _pg_writer._COPY_TYPES, remap, suffix, 1) is None
        floated = rows.Events(_record.RECORD_WIDTH)
        floated.extend((1.0, 5, "checkout", 1.5, *records[1][4:]))  # a float connection id
        assert rows.copy_binary(floated, _pg_writer._COPY_TYPES, remap, suffix, 1) is None

    def test_column_types_are_the_tables(self, pg_store: str, schema: str) -> None:
        """The C formatter's column types are those of the store's ``events`` table."""
        from instrument import _pg_writer

        monitor = instrument.attach(sa.create_engine("sqlite://"), store=pg_store)
        assert monitor.flush()
        names = {"double precision": "d", "bigint": "q", "text": "t"}
        found = _rows(
            schema,
            "SELECT column_name, data_type FROM information_schema.columns "
            f"WHERE table_schema = '{schema}' AND table_name = 'events' AND column_name <> 'id'",
        )
        assert {c: names[t] for c, t in found} == _pg_writer.COLUMN_TYPES


def _parse_copy(data: bytes, types: str) -> list[tuple[Any, ...]]:
    """The tuples of a binary COPY stream's body (no signature, no trailer)."""
    import struct

    out, at = [], 0
    while at < len(data):
        (count,) = struct.unpack_from("!h", data, at)
        at += 2
        values: list[Any] = []
        for k in range(count):
            (size,) = struct.unpack_from("!i", data, at)
            at += 4
            if size == -1:
                values.append(None)
                continue
            raw, at = data[at : at + size], at + size
            kind = types[k]
            values.append(
                struct.unpack("!d", raw)[0] if kind == "d" else
                struct.unpack("!q", raw)[0] if kind == "q" else raw.decode()
            )  # fmt: skip
        assert count == len(types)
        out.append(tuple(values))
    return out
