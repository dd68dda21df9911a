"""``poolscope run -- CMD`` and ``POOLSCOPE_AUTO=1``: real programs, servers and signals."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from instrument import _launch
from instrument.cli import cli

BIN = Path(sys.executable).parent
PTH = Path(_launch.BOOTSTRAP_DIR) / "poolscope-auto.pth"


def _env(**extra: str) -> dict[str, str]:
    """This environment without poolscope's variables, with the venv's commands first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLSCOPE_")}
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    env.update(extra)
    return env


def _launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "instrument", "run", *args]


def _sigterm_when_ready(*args: str) -> int:
    """Run ``poolscope run ARGS``, send it SIGTERM once the program prints ``ready``, and
    check that it died of that signal; return its pid."""
    proc = subprocess.Popen(
        _launcher(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == -signal.SIGTERM
    finally:
        _stop(proc)
    return proc.pid


def _report(store: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "instrument", "report", str(store), "--format", "json"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _line(path: Path, marker: str) -> int:
    """The line number of ``path`` holding ``marker``."""
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text)


def _write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


LEAKY_SCRIPT = """\
    import sys
    from sqlalchemy import create_engine, text

    engine = create_engine(sys.argv[1])
    kept = []


    def handler():
        conn = engine.connect()  # the leak
        conn.execute(text("select 1"))
        kept.append(conn)


    handler()
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    print("argv", sys.argv[1:], flush=True)
    sys.exit(int(sys.argv[2]))
"""


class TestScript:
    def test_leak_is_reported_at_its_line(self, tmp_path: Path) -> None:
        """A script that never imports poolscope: its leak is reported at its line, its pool
        is named after the database, and its argv, stdout and exit status are its own."""
        script = _write(tmp_path / "leaky.py", LEAKY_SCRIPT)
        store = tmp_path / "s.db"
        url = f"sqlite:///{tmp_path / 'orders.db'}"
        done = subprocess.run(
            _launcher("--store", str(store), "--", sys.executable, str(script), url, "3"),
            capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 3
        assert done.stdout == f"argv ['{url}', '3']\n"
        assert done.stderr == ""
        data = _report(store)
        assert [(p["name"], p["checkouts"]) for p in data["pools"]] == [("orders.db", 2)]
        assert [(leak["class"], leak["site"]) for leak in data["leaks"]] == [
            ("never_returned", f"leaky.py:{_line(script, 'the leak')} in handler")
        ]
        (process,) = data["processes"]
        assert process["argv"] == [str(script), url, "3"]
        assert process["state"] == "exited"

    def test_store_from_the_environment_and_leak_after(self, tmp_path: Path) -> None:
        """Without --store, $POOLSCOPE_STORE (relative to where poolscope run started) is
        the store; --leak-after reaches every pool."""
        script = _write(tmp_path / "leaky.py", LEAKY_SCRIPT)
        work = tmp_path / "elsewhere"
        work.mkdir()
        url = f"sqlite:///{tmp_path / 'app.db'}"
        code = (
            f"import os, runpy, sys; os.chdir({str(work)!r}); sys.argv.pop(0); "
            "runpy.run_path(sys.argv[0])"
        )
        done = subprocess.run(
            _launcher("--leak-after", "2.5", "--", sys.executable, "-c", code, str(script), url,
                      "0"),
            capture_output=True, text=True, timeout=60, env=_env(POOLSCOPE_STORE="rel.db"),
            cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert not (work / "rel.db").exists()
        (pool,) = _report(tmp_path / "rel.db")["pools"]
        assert pool["leak_after_s"] == 2.5

    def test_keep_raw_and_max_store_mb_reach_the_store(self, tmp_path: Path) -> None:
        """--keep-raw and --max-store-mb are the retention every pool's writer applies."""
        script = _write(tmp_path / "leaky.py", LEAKY_SCRIPT)
        store = tmp_path / "s.db"
        url = f"sqlite:///{tmp_path / 'app.db'}"
        done = subprocess.run(
            _launcher("--store", str(store), "--keep-raw", "120", "--max-store-mb", "64", "--",
                      sys.executable, str(script), url, "0"),
            capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        conn = sqlite3.connect(str(store))
        try:
            assert conn.execute("SELECT keep_raw_s FROM retention").fetchall() == [(120.0,)]
        finally:
            conn.close()

    @pytest.mark.parametrize(("word", "statements"), [("on", [2]), ("off", [])])
    def test_diagnose_reaches_every_pool(
        self, tmp_path: Path, word: str, statements: list[int]
    ) -> None:
        """--diagnose on gives a long hold its breakdown (statements run, idle in
        transaction); off writes no diagnosis."""
        script = _write(
            tmp_path / "slow.py",
            """\
            import sys, time
            from sqlalchemy import create_engine

            engine = create_engine(sys.argv[1])
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                conn.exec_driver_sql("select 2")
                time.sleep(0.6)
                conn.commit()
            """,
        )
        store = tmp_path / "s.db"
        done = subprocess.run(
            _launcher("--store", str(store), "--leak-after", "0.2", "--diagnose", word, "--",
                      sys.executable, str(script), f"sqlite:///{tmp_path / 'a.db'}"),
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (leak,) = _report(store)["leaks"]
        diagnosis = leak["diagnosis"]
        assert ([diagnosis["statements"]] if diagnosis else []) == statements

    def test_metrics_reach_the_programs_meter_provider(self, tmp_path: Path) -> None:
        """--metrics: the program's global MeterProvider, set after its engine is made, gets
        every checkout's use time and wait time under the pool's name."""
        script = _write(
            tmp_path / "metered.py",
            """\
            import sys
            from opentelemetry import metrics
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from sqlalchemy import create_engine, text

            engine = create_engine(sys.argv[1], pool_logging_name="orders")
            reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            for _ in range(5):
                with engine.connect() as conn:
                    conn.execute(text("select 1"))
            import instrument
            instrument.monitor_of(engine).flush()
            for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
                for point in metric.data.data_points:
                    pool = point.attributes["db.client.connection.pool.name"]
                    if hasattr(point, "count"):
                        print(metric.name, pool, point.count)
            """,
        )
        done = subprocess.run(
            _launcher("--store", str(tmp_path / "s.db"), "--metrics", "--",
                      sys.executable, str(script), f"sqlite:///{tmp_path / 'a.db'}"),
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert set(done.stdout.splitlines()) == {
            "db.client.connection.wait_time orders 5",
            "db.client.connection.use_time orders 5",
            "db.client.connection.create_time orders 1",
        }

    def test_engine_made_after_dispose(self, tmp_path: Path) -> None:
        """The pool engine.dispose() puts in place and an engine made after it are watched:
        a leak on each is reported at its own line."""
        script = _write(
            tmp_path / "dispose.py",
            """\
            import sys
            from sqlalchemy import create_engine, text

            first = create_engine(sys.argv[1])
            with first.connect() as conn:
                conn.execute(text("select 1"))
            first.dispose()
            kept = [first.connect()]  # leak on the new pool
            second = create_engine(sys.argv[2], pool_logging_name="reports")
            kept.append(second.connect())  # leak on the later engine
            """,
        )
        store = tmp_path / "s.db"
        done = subprocess.run(
            _launcher("--store", str(store), "--", sys.executable, str(script),
                      f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"),
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        data = _report(store)
        assert {(leak["class"], leak["site"]) for leak in data["leaks"]} == {
            ("never_returned", f"dispose.py:{_line(script, 'new pool')} in <module>"),
            ("never_returned", f"dispose.py:{_line(script, 'later engine')} in <module>"),
        }
        assert [(p["name"], p["checkouts"]) for p in data["pools"]] == [("a.db", 2), ("reports", 1)]

    def test_sitecustomize_of_the_program_still_runs(self, tmp_path: Path) -> None:
        """The sitecustomize CMD's environment had still runs, before the program, and
        the program's engines are attached all the same."""
        site_dir = tmp_path / "site"
        site_dir.mkdir()
        _write(site_dir / "sitecustomize.py", "import sys\nMARK = 'theirs'\nprint('site ran')\n")
        script = _write(
            tmp_path / "check.py",
            """\
            import sys, sitecustomize
            from sqlalchemy import create_engine
            print(sitecustomize.MARK)
            engine = create_engine(sys.argv[1])
            kept = engine.connect()
            """,
        )
        store = tmp_path / "s.db"
        done = subprocess.run(
            _launcher("--store", str(store), "--", sys.executable, str(script),
                      f"sqlite:///{tmp_path / 'a.db'}"),
            capture_output=True, text=True, timeout=60, env=_env(PYTHONPATH=str(site_dir)),
        )  # fmt: skip
        # Once as poolscope run itself starts (it is Python too), once as the program does.
        assert (done.returncode, done.stdout, done.stderr) == (0, "site ran\n" * 2 + "theirs\n", "")
        assert _report(store)["summary"]["confirmed_leaks"] == 1

    def test_program_without_sqlalchemy_is_left_alone(self, tmp_path: Path) -> None:
        """A program that never imports SQLAlchemy does not import it under the launcher,
        and no store is made."""
        store = tmp_path / "s.db"
        code = (
            "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'))"
        )
        done = subprocess.run(
            _launcher("--store", str(store), "--", sys.executable, "-c", code),
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "[]\n")
        assert not store.exists()

    def test_store_that_cannot_be_written(self, tmp_path: Path) -> None:
        """A store that cannot be written changes nothing in what the program does."""
        script = _write(tmp_path / "leaky.py", LEAKY_SCRIPT)
        url = f"sqlite:///{tmp_path / 'a.db'}"
        done = subprocess.run(
            _launcher("--store", str(tmp_path / "missing" / "dir" / "s.db"), "--",
                      sys.executable, str(script), url, "4"),
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (4, f"argv ['{url}', '4']\n")

    def test_exit_status_of_any_command(self, tmp_path: Path) -> None:
        """A command that is not Python runs too, and its exit status is poolscope run's."""
        done = subprocess.run(
            _launcher("--", "sh", "-c", "echo $POOLSCOPE_AUTO; exit 5"),
            capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (5, "1\n")

    def test_sigterm_ends_the_program_cleanly(self, tmp_path: Path) -> None:
        """SIGTERM sent to poolscope run reaches the program itself (there is no parent in
        between): it dies of it, and the report shows a terminated process."""
        script = _write(
            tmp_path / "serve.py",
            """\
            import sys, time
            from sqlalchemy import create_engine, text
            engine = create_engine(sys.argv[1])
            conn = engine.connect()  # held
            conn.execute(text("select 1"))
            print("ready", flush=True)
            time.sleep(60)
            """,
        )
        store = tmp_path / "s.db"
        pid = _sigterm_when_ready(
            "--store", str(store), "--", sys.executable, str(script),
            f"sqlite:///{tmp_path / 'a.db'}",
        )  # fmt: skip
        data = _report(store)
        assert [p["state"] for p in data["processes"]] == ["terminated"]
        assert data["processes"][0]["pid"] == pid  # the launcher became the program
        assert [leak["class"] for leak in data["leaks"]] == ["open_at_crash"]

    def test_sigterm_to_a_program_without_sqlalchemy(self, tmp_path: Path) -> None:
        """A program that never imports SQLAlchemy still dies of SIGTERM, as without the
        launcher, and leaves no store."""
        script = _write(
            tmp_path / "plain.py",
            """\
            import sys, time
            print("ready", flush=True)
            time.sleep(60)
            """,
        )
        store = tmp_path / "s.db"
        _sigterm_when_ready("--store", str(store), "--", sys.executable, str(script))
        assert not store.exists()


class TestAutoWithoutLauncher:
    @pytest.mark.parametrize("auto", ["1", ""])
    def test_pth_file(self, tmp_path: Path, auto: str) -> None:
        """The .pth file installed with poolscope attaches every engine when POOLSCOPE_AUTO=1,
        and does nothing (SQLAlchemy's import included) when it is unset."""
        site_dir = tmp_path / "site-packages"
        site_dir.mkdir()
        shutil.copy(PTH, site_dir)
        script = _write(tmp_path / "leaky.py", LEAKY_SCRIPT)
        store = tmp_path / "s.db"
        # site.addsitedir() reads a .pth file exactly as Python's start-up does.
        code = (
            "import site, runpy, sys; site.addsitedir(sys.argv.pop(1)); sys.argv.pop(0); "
            "print('sqlalchemy' in sys.modules); runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(site_dir), str(script),
             f"sqlite:///{tmp_path / 'a.db'}", "0"],
            capture_output=True, text=True, timeout=60,
            env=_env(POOLSCOPE_AUTO=auto, POOLSCOPE_STORE=str(store)),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == "False"
        if auto:
            assert _report(store)["summary"]["confirmed_leaks"] == 1
        else:
            assert not store.exists()


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            ([], "run needs a command: poolscope run [OPTIONS] -- CMD [ARGS]..."),
            (["--"], "run needs a command: poolscope run [OPTIONS] -- CMD [ARGS]..."),
            (["--bogus", "--", "true"], "no such option: --bogus (try 'poolscope run --help')"),
            (["--", "no-such-command-here"], "command not found: no-such-command-here"),
            (["--", "./nope.py"], "command not found: ./nope.py"),
            (["--leak-after", "0", "--", "true"],
             "--leak-after must be a number of seconds above 0, not '0'"),
            (["--leak-after", "soon", "--", "true"],
             "--leak-after must be a number of seconds above 0, not 'soon'"),
            (["--leak-after"], "Option '--leak-after' requires an argument."),
            (["--keep-raw", "30", "--", "true"],
             "--keep-raw must be at least 60 seconds, not '30'."),
            (["--max-store-mb", "big", "--", "true"],
             "--max-store-mb must be a number of megabytes, not 'big'."),
            (["--diagnose", "always", "--", "true"],
             "--diagnose must be off, server or on, not 'always'"),
        ],
    )  # fmt: skip
    def test_one_line_and_status_2(self, args: list[str], message: str) -> None:
        result = CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == f"poolscope: {message}\n"


# ---- prefork servers ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop ``proc`` and whatever it started (its process group), bounded."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(20)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


@contextlib.contextmanager
def _server(command: list[str], port: int, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` under poolscope run in its own process group until it answers on
    ``port``; always stopped at the end."""
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield proc
    finally:
        _stop(proc)


def _worker_pids(port: int, workers: int) -> set[int]:
    """Send concurrent requests (each answers its worker's pid) until ``workers`` answered."""
    pids: set[int] = set()
    lock = threading.Lock()

    def get() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            pid = int(response.read())
        with lock:
            pids.add(pid)

    deadline = time.monotonic() + 20
    while len(pids) < workers and time.monotonic() < deadline:
        threads = [threading.Thread(target=get) for _ in range(workers * 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
    assert len(pids) == workers, f"only workers {pids} answered"
    return pids


def _wait_for_checkouts(store: Path, processes: int) -> None:
    """Wait (bounded) until checkouts of ``processes`` processes are in ``store``."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(store)) as db:
            query = "SELECT count(DISTINCT process_id) FROM events WHERE kind = 'checkout'"
            if db.execute(query).fetchone()[0] >= processes:
                return
        time.sleep(0.1)
    raise AssertionError(f"the checkouts of {processes} processes never reached the store")


WSGI_APP = """\
    import os, sys, time
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    engine = create_engine(os.environ["APP_DB"])  # made in each worker, at import
    leaked = []


    def app(environ, start_response):
        session = Session(engine)
        session.execute(text("select 1"))  # the session's connection leaks
        leaked.append(session)
        time.sleep(0.3)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
"""

ASGI_APP = """\
    import asyncio, os
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(os.environ["APP_DB"])
    leaked = []


    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        conn = await engine.connect()  # the connection leaks
        await conn.execute(text("select 1"))
        leaked.append(conn)
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""


class TestPreforkServers:
    def test_gunicorn_sync_workers(self, tmp_path: Path) -> None:
        """gunicorn with 3 sync workers: each worker records as its own process into the
        one store, its session leak reported at the handler's line; SIGTERM to poolscope
        run stops gunicorn, which stops its workers cleanly."""
        pytest.importorskip("gunicorn")
        app = _write(tmp_path / "wsgiapp.py", WSGI_APP)
        store, port = tmp_path / "s.db", _free_port()
        command = _launcher(
            "--store", str(store), "--", "gunicorn", "--workers", "3", "--bind",
            f"127.0.0.1:{port}", "--graceful-timeout", "5", "--chdir", str(tmp_path),
            "wsgiapp:app",
        )  # fmt: skip
        env = _env(APP_DB=f"sqlite:///{tmp_path / 'app.db'}")
        with _server(command, port, env) as proc:
            pids = _worker_pids(port, 3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        data = _report(store)
        assert {p["pid"] for p in data["processes"]} == pids
        assert {p["state"] for p in data["processes"]} == {"exited"}
        assert {(leak["class"], leak["site"]) for leak in data["leaks"]} == {
            ("never_returned", f"wsgiapp.py:{_line(app, 'leaks')} in app")
        }
        assert sum(len(leak["processes"]) for leak in data["leaks"]) == 3

    def test_uvicorn_workers_async_engine(self, tmp_path: Path) -> None:
        """uvicorn --workers 2 with an async engine (aiosqlite): each worker (a fresh
        interpreter) attaches its engine and records as its own process."""
        pytest.importorskip("uvicorn")
        pytest.importorskip("aiosqlite")
        app = _write(tmp_path / "asgiapp.py", ASGI_APP)
        store, port = tmp_path / "s.db", _free_port()
        command = _launcher(
            "--store", str(store), "--", "uvicorn", "--workers", "2", "--port", str(port),
            "--host", "127.0.0.1", "--app-dir", str(tmp_path), "--log-level", "warning",
            "asgiapp:app",
        )  # fmt: skip
        env = _env(APP_DB=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
        with _server(command, port, env) as proc:
            pids = _worker_pids(port, 2)
            _wait_for_checkouts(store, len(pids))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        data = _report(store)
        assert {p["pid"] for p in data["processes"]} == pids
        # A uvicorn worker ends by raising SIGTERM again under the disposition it saved
        # before it imported the app: poolscope's handler, installed at the worker's start,
        # writes its end as a termination. Its open checkouts are open at that end.
        assert {p["state"] for p in data["processes"]} == {"terminated"}
        assert [(p["name"], p["pool_class"], len(p["processes"])) for p in data["pools"]] == [
            ("app.db", "AsyncAdaptedQueuePool", 2)
        ]
        assert {(leak["class"], leak["site"]) for leak in data["leaks"]} == {
            ("open_at_crash", f"asgiapp.py:{_line(app, 'leaks')} in app")
        }
