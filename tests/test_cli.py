"""The ``poolscope`` command line, driven through click's CliRunner (and once as a real
process): report formats, filters, exit codes, one-line errors for unusable stores, and the
dashboard command."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import short_checkouts
from report_workloads import run_dies_mid_batch

import instrument
from instrument import _store, _writer
from instrument.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"
SCHEMA = json.loads((Path(instrument.__file__).parent / "report_schema.json").read_text())


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def record(
    store: Path,
    url: str,
    *,
    leak: bool = False,
    hold_s: float = 0.0,
    name: str = "app",
    leak_after: float = 30.0,
) -> None:
    """Record 3 short checkouts into ``store`` on a pool called ``name`` attached with
    ``leak_after``; optionally one left to the garbage collector and one held for ``hold_s``
    seconds."""
    engine = sa.create_engine(url, poolclass=sa.pool.QueuePool, pool_size=2, max_overflow=1)
    monitor = instrument.attach(engine, store=store, name=name, leak_after=leak_after)
    short_checkouts(engine, 3)
    if hold_s:
        with engine.connect():
            time.sleep(hold_s)
    if leak:
        engine.connect().exec_driver_sql("select 1")  # never closed: the GC returns it
        gc.collect()
    monitor.flush()
    monitor.detach()
    engine.dispose()


@pytest.fixture
def leaky(tmp_path: Path, sqlite_url: str) -> Path:
    """A store with a confirmed (GC) leak and a 0.3 s hold."""
    store = tmp_path / "leaky.db"
    record(store, sqlite_url, leak=True, hold_s=0.3)
    return store


@pytest.fixture
def clean(tmp_path: Path, sqlite_url: str) -> Path:
    """A store with three short checkouts and a 0.3 s hold: no confirmed leak."""
    store = tmp_path / "clean.db"
    record(store, sqlite_url, hold_s=0.3)
    return store


class TestReport:
    @pytest.mark.parametrize("fmt", ["text", "markdown", "json", "html"])
    def test_every_format(self, leaky: Path, fmt: str) -> None:
        result = invoke("report", str(leaky), "--format", fmt)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        first = {"text": "poolscope report: ", "markdown": "# poolscope report: ",
                 "json": "{", "html": "<!DOCTYPE html>"}[fmt]  # fmt: skip
        assert result.stdout.startswith(first)
        if fmt == "json":
            data = json.loads(result.stdout)
            jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
            assert data["summary"]["checkouts"] == 5
            assert data["summary"]["confirmed_leaks"] == 1

    def test_text_is_the_default(self, leaky: Path) -> None:
        result = invoke("report", str(leaky))
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"poolscope report: {leaky}\n")
        assert "\nLEAKS\n" in result.stdout and "gc_reclaimed" in result.stdout

    def test_output_file(self, leaky: Path, tmp_path: Path) -> None:
        """--output writes the report to the file and nothing to stdout."""
        out = tmp_path / "report.html"
        result = invoke("report", str(leaky), "--format", "html", "--output", str(out))
        assert result.exit_code == 0 and result.stdout == ""
        assert out.read_text().startswith("<!DOCTYPE html>")

    def test_fail_on_leak_exits_1_on_a_confirmed_leak(self, leaky: Path) -> None:
        result = invoke("report", str(leaky), "--fail-on-leak")
        assert result.exit_code == 1
        assert "gc_reclaimed" in result.stdout  # the report is still printed

    def test_fail_on_leak_ignores_suspected_ones(self, clean: Path) -> None:
        """A hold past --leak-after is a suspected leak: reported, but exit 0."""
        result = invoke("report", str(clean), "--fail-on-leak", "--leak-after", "0.2",
                        "--format", "json")  # fmt: skip
        assert result.exit_code == 0
        data = json.loads(result.stdout)
        assert [leak["class"] for leak in data["leaks"]] == ["held_too_long"]
        assert data["filters"]["leak_after_s"] == 0.2

    def test_leaks_without_the_flag_exit_0(self, leaky: Path) -> None:
        assert invoke("report", str(leaky)).exit_code == 0

    def test_leak_after_defaults_to_the_pools(
        self, clean: Path, tmp_path: Path, sqlite_url: str
    ) -> None:
        """The pool was attached with leak_after=30: a 0.3 s hold is no leak. Attached with
        leak_after=0.2, the same hold is one."""
        data = json.loads(invoke("report", str(clean), "--format", "json").stdout)
        assert data["leaks"] == []
        strict = tmp_path / "strict.db"
        record(strict, sqlite_url, hold_s=0.3, leak_after=0.2)
        data = json.loads(invoke("report", str(strict), "--format", "json").stdout)
        assert [leak["class"] for leak in data["leaks"]] == ["held_too_long"]

    def test_since_until_and_pool(self, leaky: Path, sqlite_url: str) -> None:
        """--until before the first event or --since after the last keeps nothing; --since
        the first event keeps everything; --pool keeps only that pool."""
        record(leaky, sqlite_url, name="other")  # 3 more checkouts, in a second pool

        def checkouts(*args: str) -> int:
            result = invoke("report", str(leaky), "--format", "json", *args)
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)["summary"]["checkouts"]

        data = json.loads(invoke("report", str(leaky), "--format", "json").stdout)
        first = data["summary"]["first_event_at"]
        assert data["summary"]["checkouts"] == 8
        assert checkouts("--until", "1000000000") == 0
        assert checkouts("--since", "9999999999") == 0
        assert checkouts("--since", first) == 8
        assert checkouts("--since", first, "--pool", "app") == 5
        assert checkouts("--pool", "other") == 3
        late = invoke("report", str(leaky), "--format", "json", "--pool", "app")
        assert json.loads(late.stdout)["filters"]["pools"] == ["app"]

    def test_store_from_the_environment(self, leaky: Path, tmp_path: Path) -> None:
        """Without STORE, $POOLSCOPE_STORE names the store."""
        result = invoke("report", "--format", "json", env={"POOLSCOPE_STORE": str(leaky)})
        assert json.loads(result.stdout)["store"] == str(leaky)

    def test_default_store_is_in_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        result = invoke("report", env={"POOLSCOPE_STORE": ""})
        assert result.exit_code == 2
        assert result.stderr == (
            "poolscope: no store at poolscope.db (attach poolscope to an engine to create one)\n"
        )

    def test_writer_died_mid_batch(self, tmp_path: Path, sqlite_url: str) -> None:
        """A store whose writer was killed inside a transaction reports what was committed."""
        store = tmp_path / "poolscope.db"
        assert run_dies_mid_batch(tmp_path, sqlite_url, store) == -9
        result = invoke("report", str(store), "--format", "json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["summary"]["checkouts"] == 4
        assert [p["state"] for p in data["processes"]] == ["crashed"]
        assert data["leaks"] == []


TAMPERED = {
    "event at 1e300": ("UPDATE events SET at = 1e300 WHERE id = (SELECT MIN(id) FROM events "
                       "WHERE kind = 'checkout')", 1),
    "event at -1e20": ("UPDATE events SET at = -1e20 WHERE id = (SELECT MIN(id) FROM events "
                       "WHERE kind = 'checkout')", 1),
    "event at infinity": ("UPDATE events SET at = 9e999 WHERE id = (SELECT MIN(id) FROM events "
                          "WHERE kind = 'checkout')", 1),
    "event at a string": ("UPDATE events SET at = 'noon' WHERE id = (SELECT MIN(id) FROM events "
                          "WHERE kind = 'checkout')", 1),
    # The checkin is left out: its checkout, still counted, reads as held until the exit.
    "hold a blob": ("UPDATE events SET hold_s = x'00' WHERE id = (SELECT MIN(id) FROM events "
                    "WHERE kind = 'checkin')", 1),
    "process times": ("UPDATE processes SET started_at = 1e300, heartbeat_at = 'x', "
                      "ended_at = 9e999", 0),
    "pool leak_after": ("UPDATE pools SET leak_after_s = 'soon'", 0),
}  # fmt: skip


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _not_sqlite(path: Path) -> None:
    path.write_text("checkout,checkin\n1,2\n")


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()


def _newer(path: Path) -> None:
    conn = _store.connect_for_writing(path)
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()


BAD_STORES = {
    "missing": (None, "no store at {p} (attach poolscope to an engine to create one)"),
    "empty": (_empty, "{p} is empty, not a poolscope store"),
    "not sqlite": (_not_sqlite, "{p} is not a SQLite file, so not a poolscope store"),
    "another application": (
        _foreign,
        "{p} is a SQLite database of another application (no events, meta, pools, processes, "
        "stacks table), not a poolscope store",
    ),
    "newer schema": (
        _newer,
        "{p} was written by a newer poolscope (store schema 999, this one reads up to 2); "
        "upgrade poolscope to read it",
    ),
}


class TestTamperedStore:
    @pytest.mark.parametrize("case", list(TAMPERED))
    def test_every_format_survives_a_tampered_row(self, leaky: Path, case: str) -> None:
        """A row with an impossible time or number: every format still renders, the leak is
        still found, and the report says how many events it left out."""
        sql, ignored = TAMPERED[case]
        _writer.shutdown_all()
        before = json.loads(invoke("report", str(leaky), "--format", "json").stdout)["summary"]
        conn = sqlite3.connect(leaky)
        assert conn.execute(sql).rowcount >= 1
        conn.commit()
        conn.close()
        for fmt in ("text", "markdown", "html"):
            result = invoke("report", str(leaky), "--format", fmt, "--fail-on-leak")
            assert result.exit_code == 1, result.stderr  # the GC leak is still confirmed
            assert ("1 event left out" in result.stdout) == bool(ignored), fmt
        data = json.loads(invoke("report", str(leaky), "--format", "json").stdout)
        jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
        assert data["summary"]["ignored_events"] == ignored
        assert data["summary"]["confirmed_leaks"] == 1
        lost = 0 if case == "hold a blob" else ignored
        assert data["summary"]["checkouts"] == before["checkouts"] - lost


class TestBadInput:
    @pytest.mark.parametrize("case", list(BAD_STORES))
    def test_unusable_store(self, tmp_path: Path, case: str) -> None:
        """Each unusable store: exit 2, one line on stderr, nothing on stdout."""
        make, message = BAD_STORES[case]
        path = tmp_path / "store.db"
        if make:
            make(path)
        result = invoke("report", str(path))
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr == f"poolscope: {message.format(p=path)}\n"

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--since", "yesterday"], "cannot read 'yesterday' as a time; give unix seconds or "
             "an ISO 8601 time such as 2026-11-27T13:00:00"),
            (["--leak-after", "0"], "leak_after must be more than 0 seconds, not 0.0."),
            (["--since", "20", "--until", "10"], "since must not be later than until."),
            (["--pool", "nope"], "no pool named 'nope' in the store (pools: app)"),
        ],
    )  # fmt: skip
    def test_bad_option_values(self, leaky: Path, args: list[str], message: str) -> None:
        result = invoke("report", str(leaky), *args)
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == f"poolscope: {message}\n"

    def test_store_in_a_read_only_directory_is_read(self, tmp_path: Path, sqlite_url: str) -> None:
        """A healthy WAL store in a directory the reader cannot write (so SQLite cannot make
        its -shm file) is reported, not called damaged."""
        directory = tmp_path / "readonly"
        directory.mkdir()
        store = directory / "clean.db"
        record(store, sqlite_url)
        _writer.shutdown_all()  # the last connection closed: no -wal or -shm is left
        assert sorted(p.name for p in directory.iterdir()) == ["clean.db"]
        # As root, permissions do not stop a write: the immutable attribute does.
        as_root = os.geteuid() == 0
        if as_root:
            made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
            if made.returncode != 0:
                pytest.skip(f"chattr +i is not available here: {made.stderr.decode().strip()}")
        else:
            directory.chmod(0o555)
        try:
            with pytest.raises(OSError):
                (directory / "probe").touch()
            result = invoke("report", str(store), "--format", "json")
        finally:
            if as_root:
                subprocess.run(["chattr", "-i", str(directory)], check=True)
            else:
                directory.chmod(0o755)
        assert (result.exit_code, result.stderr) == (0, "")
        report = json.loads(result.stdout)
        assert [p["name"] for p in report["pools"]] == ["app"]
        assert report["sites"][0]["checkouts"] == 3

    def test_locked_store_is_called_locked(
        self, clean: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A store another process holds locked: exit 2, one line naming the lock and who
        holds it, not "damaged"."""
        _writer.shutdown_all()
        monkeypatch.setattr(_store, "READ_BUSY_TIMEOUT_MS", 100)
        locker = subprocess.Popen(
            [sys.executable, "-c", (
                "import sqlite3, sys\n"
                "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "conn.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
                "conn.execute('BEGIN IMMEDIATE')\n"
                "conn.execute(\"UPDATE meta SET value = value WHERE key = 'application'\")\n"
                "conn.execute('COMMIT')\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n"
            ), str(clean)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert locker.stdout.readline() == "locked\n"
            result = invoke("report", str(clean))
            holder = "another process"
            if sys.platform == "linux":
                command = Path(f"/proc/{locker.pid}/comm").read_text().strip()
                holder = f"another process (pid {locker.pid}, {command})"
        finally:
            locker.communicate("")
        assert (result.exit_code, result.stdout) == (2, "")
        assert (
            result.stderr
            == f"poolscope: {clean} is locked by {holder}; try again when it lets go\n"
        )
        assert invoke("report", str(clean)).exit_code == 0  # once it lets go

    def test_damaged_store(self, leaky: Path) -> None:
        """A poolscope store whose pages were overwritten: exit 2, one line."""
        _writer.shutdown_all()
        conn = sqlite3.connect(leaky)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page into the main file
        conn.close()
        size = leaky.stat().st_size
        assert size >= 5 * 4096
        with open(leaky, "r+b") as fh:
            fh.seek(2 * 4096)
            fh.write(b"\xff" * (size - 2 * 4096))
        result = invoke("report", str(leaky))
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == (
            f"poolscope: {leaky} is a damaged SQLite file (database disk image is malformed)\n"
        )

    def test_unwritable_output(self, leaky: Path, tmp_path: Path) -> None:
        target = tmp_path / "missing-dir" / "r.txt"
        result = invoke("report", str(leaky), "--output", str(target))
        assert result.exit_code == 2
        assert result.stderr == f"poolscope: cannot write {target}: No such file or directory\n"

    @pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "-1e20",
                                       "99999999999999999", "0001-01-01T00:00:00"])  # fmt: skip
    @pytest.mark.parametrize("option", ["--since", "--until"])
    def test_times_out_of_range(self, leaky: Path, option: str, value: str) -> None:
        """A time that is not a number or lies outside 1970 to 9999: exit 2, one line,
        even with --fail-on-leak on a store with a leak."""
        result = invoke("report", str(leaky), option, value, "--fail-on-leak")
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == (
            f"poolscope: {value!r} is not a time between 1970-01-01T00:00:00Z and "
            "9999-12-31T23:59:59Z (unix seconds 0 to 253402300799)\n"
        )

    def test_infinite_leak_after(self, leaky: Path) -> None:
        result = invoke("report", str(leaky), "--leak-after", "inf")
        assert (result.exit_code, result.stdout) == (2, "")
        assert (
            result.stderr == "poolscope: leak_after must be a finite number of seconds, not inf.\n"
        )

    @pytest.mark.parametrize(
        ("name", "what"),
        [
            ("leaky.db", "the store itself ({store})"),
            ("./sub/../leaky.db", "the store itself ({store})"),
            ("symlink.db", "the store itself ({store})"),
            ("hardlink.db", "the store itself ({store})"),
            ("leaky.db-wal", "the store's write-ahead log ({store}-wal)"),
            ("leaky.db-shm", "the store's shared-memory file ({store}-shm)"),
            ("leaky.db-journal", "the store's rollback journal ({store}-journal)"),
        ],
    )
    def test_output_over_the_store(
        self, leaky: Path, monkeypatch: pytest.MonkeyPatch, name: str, what: str
    ) -> None:
        """-o naming the store or one of SQLite's files next to it (by a relative path, a
        symlink or a hard link): exit 2, one line, the store byte for byte intact."""
        _writer.shutdown_all()
        monkeypatch.chdir(leaky.parent)
        (leaky.parent / "sub").mkdir()
        (leaky.parent / "symlink.db").symlink_to(leaky)
        os.link(leaky, leaky.parent / "hardlink.db")
        files = {p: p.read_bytes() for p in leaky.parent.glob("leaky.db*")}
        for fmt in ("text", "html"):
            result = invoke("report", "leaky.db", "-o", name, "--format", fmt)
            assert (result.exit_code, result.stdout) == (2, "")
            assert result.stderr == (
                f"poolscope: --output {name} is {what.format(store=leaky)}; "
                "write the report elsewhere\n"
            )
        assert {p: p.read_bytes() for p in leaky.parent.glob("leaky.db*")} == files
        assert invoke("report", "leaky.db", "-o", "report.txt").exit_code == 0

    def test_a_real_process_prints_one_line_and_no_traceback(self, tmp_path: Path) -> None:
        """``python -m instrument report`` on a missing store: exit 2, exactly one line."""
        path = tmp_path / "nope.db"
        proc = subprocess.run([sys.executable, "-m", "instrument", "report", str(path)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert proc.stderr == (
            f"poolscope: no store at {path} (attach poolscope to an engine to create one)\n"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestDashboard:
    def test_needs_the_dashboard_extra(self, leaky: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without Streamlit: exit 2 and the extra to install."""
        monkeypatch.setitem(sys.modules, "streamlit", None)  # as if not installed
        result = invoke("dashboard", str(leaky))
        assert result.exit_code == 2
        assert result.stderr == (
            "poolscope: the dashboard needs Streamlit: pip install 'poolscope[dashboard]'\n"
        )

    def test_refuses_an_unusable_store(self, tmp_path: Path) -> None:
        path = tmp_path / "none.db"
        result = invoke("dashboard", str(path))
        assert result.exit_code == 2
        assert result.stderr == (
            f"poolscope: no store at {path} (attach poolscope to an engine to create one)\n"
        )

    def test_serves_the_store_on_localhost(self, leaky: Path) -> None:
        """The dashboard starts on 127.0.0.1 at the given port, answers its health check, and
        stops when the command is terminated."""
        if importlib.util.find_spec("streamlit") is None:  # the dashboard extra
            message = "the dashboard command needs Streamlit"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message + "; CI requires it", pytrace=False)
            pytest.skip(message)
        port = _free_port()
        env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "instrument", "dashboard", str(leaky), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            body = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/_stcore/health", timeout=2
                    ) as response:
                        body = response.read().decode()
                        break
                except OSError:
                    time.sleep(0.3)
            assert body == "ok", proc.stderr.read().decode() if proc.poll() is not None else ""
            # Terminating the command stops the server itself: nothing is left listening.
            proc.terminate()
            proc.wait(20)
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 2):
                pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(20)
            if proc.stderr:
                proc.stderr.close()


class TestDocs:
    def test_every_command_has_help_and_is_in_the_readme(self) -> None:
        readme = README.read_text()
        assert set(cli.commands) >= {"report", "dashboard", "demo"}
        for name, command in cli.commands.items():
            assert command.help and command.help.strip(), name
            assert f"poolscope {name}" in readme, f"README does not mention poolscope {name}"
            result = invoke(name, "--help")
            assert result.exit_code == 0 and "Usage: " in result.stdout

    def test_report_options_are_documented(self) -> None:
        help_text = invoke("report", "--help").stdout
        for option in ("--format", "--output", "--leak-after", "--since", "--until", "--pool",
                       "--fail-on-leak"):  # fmt: skip
            assert option in help_text
