"""Real instrumented workloads with known leaks, long holds and timeouts, for the analysis,
report and CLI tests. Each returns what it did, so tests can check the store against it."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

import instrument

LEAK_AFTER = 0.2
"""leak_after the in-process workload attaches with: the two holders exceed it."""

POOL_TIMEOUT = 0.3


@dataclass
class Mixed:
    """What :func:`run_mixed` did."""

    store: Path
    engine: sa.Engine
    monitor: instrument.Monitor
    quick: int
    kept: sa.Connection
    holds: dict[str, tuple[float, float]] = field(default_factory=dict)
    """function name -> (inner, outer) seconds the workload itself measured around the hold."""

    def close(self) -> None:
        self.kept.close()
        self.engine.dispose()


def quick_query(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")


def _use_until_released(
    conn: sa.Connection, ready: threading.Event, release: threading.Event
) -> float:
    """Use ``conn``, say it is held, wait for the release; return the seconds this took."""
    start = time.perf_counter()
    conn.exec_driver_sql("select 1")
    ready.set()
    release.wait(10)
    return time.perf_counter() - start


# hold_first and hold_second differ only in name: each engine.connect() line is its own site.
def hold_first(engine: sa.Engine, ready: threading.Event, release: threading.Event,
               spans: dict[str, tuple[float, float]]) -> None:  # fmt: skip
    outer = time.perf_counter()
    with engine.connect() as conn:
        inner = _use_until_released(conn, ready, release)
    spans["hold_first"] = (inner, time.perf_counter() - outer)


def hold_second(engine: sa.Engine, ready: threading.Event, release: threading.Event,
                spans: dict[str, tuple[float, float]]) -> None:  # fmt: skip
    outer = time.perf_counter()
    with engine.connect() as conn:
        inner = _use_until_released(conn, ready, release)
    spans["hold_second"] = (inner, time.perf_counter() - outer)


def wait_and_time_out(engine: sa.Engine) -> None:
    with engine.connect() as conn:  # the pool is full: this raises TimeoutError
        conn.exec_driver_sql("select 1")


def forget_to_close(engine: sa.Engine) -> None:
    conn = engine.connect()
    conn.exec_driver_sql("select 1")
    # returns without closing: the garbage collector gets the connection back


def keep_open_now(engine: sa.Engine) -> sa.Connection:
    return engine.connect()


def run_mixed(url: str, store: Path, quick: int = 10) -> Mixed:
    """In this process, on a pool of 2 (no overflow, 0.3 s timeout) attached with
    leak_after=0.2: ``quick`` short checkouts, two threads holding both connections while a
    third caller times out, one connection left to the garbage collector, and one kept
    open past leak_after (returned by :meth:`Mixed.close`).

    Expected classes: hold_first and hold_second ``held_too_long``, forget_to_close
    ``gc_reclaimed``, keep_open_now ``open_now``; one timeout at wait_and_time_out with
    hold_first and hold_second as holders.
    """
    engine = sa.create_engine(
        url, poolclass=sa.pool.QueuePool, pool_size=2, max_overflow=0, pool_timeout=POOL_TIMEOUT
    )
    monitor = instrument.attach(engine, store=store, leak_after=LEAK_AFTER, name="mixed")
    for _ in range(quick):
        quick_query(engine)
    ready = [threading.Event(), threading.Event()]
    release = threading.Event()
    spans: dict[str, tuple[float, float]] = {}
    threads = [
        threading.Thread(target=hold_first, args=(engine, ready[0], release, spans),
                         name="holder-1"),
        threading.Thread(target=hold_second, args=(engine, ready[1], release, spans),
                         name="holder-2"),
    ]  # fmt: skip
    threads[0].start()
    assert ready[0].wait(10)
    threads[1].start()
    assert ready[1].wait(10)
    try:
        wait_and_time_out(engine)
    except sa.exc.TimeoutError:
        pass
    else:  # pragma: no cover - the workload is wrong, not the code under test
        raise AssertionError("the third caller should have timed out")
    release.set()
    for t in threads:
        t.join(10)
    forget_to_close(engine)
    gc.collect()
    kept = keep_open_now(engine)
    time.sleep(LEAK_AFTER * 2)  # past leak_after, still open
    assert monitor.flush()
    return Mixed(store=store, engine=engine, monitor=monitor, quick=quick, kept=kept,
                 holds=spans)  # fmt: skip


# Runs the script in the real __main__ namespace, so its globals live until interpreter exit.
_RUNNER = "import sys; path = sys.argv[1]; exec(compile(open(path).read(), path, 'exec'))"

_HEADER = """\
import sys, time
import sqlalchemy as sa
import instrument

URL, STORE = sys.argv[-2], sys.argv[-1]
engine = sa.create_engine(URL, poolclass=sa.pool.QueuePool, pool_size=3, max_overflow=0)
monitor = instrument.attach(engine, store=STORE, name="child")


def quick_query():
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
"""


def write_script(directory: Path, name: str, body: str) -> Path:
    """Write an application script (a real file, so its frames have real sites)."""
    path = directory / f"{name}.py"
    path.write_text(_HEADER + "\n" + textwrap.dedent(body))
    return path


def child(script: Path, url: str, store: Path) -> list[str]:
    """The command that runs ``script`` in a fresh interpreter (``python -c``)."""
    return [sys.executable, "-c", _RUNNER, str(script), url, str(store)]


def run_exiting_leak(directory: Path, url: str, store: Path) -> subprocess.CompletedProcess:
    """A process that makes 3 short checkouts, keeps one connection open (taken in
    ``keep_until_exit``) and exits cleanly: that one is ``never_returned``."""
    script = write_script(
        directory,
        "exiting_app",
        """
        def keep_until_exit():
            conn = engine.connect()
            conn.exec_driver_sql("select 1")
            return conn


        for _ in range(3):
            quick_query()
        KEPT = keep_until_exit()
        """,
    )
    return subprocess.run(child(script, url, store), capture_output=True, text=True, timeout=60)


def run_killed(directory: Path, url: str, store: Path) -> int:
    """A process that makes 2 short checkouts, holds one connection (taken in
    ``hold_until_killed``) and is killed with SIGKILL: that one is ``open_at_crash``.

    :returns: the child's return code (``-9``).
    """
    script = write_script(
        directory,
        "killed_app",
        """
        def hold_until_killed():
            return engine.connect()


        for _ in range(2):
            quick_query()
        HELD = hold_until_killed()
        monitor.flush()
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    proc = subprocess.Popen(child(script, url, store), stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "ready", f"child did not get ready: {line!r}"
    finally:
        proc.kill()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
    return proc.returncode


def run_dies_mid_batch(directory: Path, url: str, store: Path) -> int:
    """A process whose writer is killed (SIGKILL) inside a write transaction, after the
    events were inserted and before COMMIT: the 4 checkouts of ``committed_work`` are on
    disk, the 3 of ``lost_work`` never are.

    :returns: the child's return code (``-9``).
    """
    script = write_script(
        directory,
        "dying_app",
        """
        import os, signal
        import time as real_time


        def committed_work():
            for _ in range(4):
                quick_query()


        def lost_work():
            for _ in range(3):
                quick_query()


        def die():
            os.kill(os.getpid(), signal.SIGKILL)


        committed_work()
        monitor.flush()
        # The writer's next insert into events kills the process: inside the write
        # transaction, after the rows went in and before COMMIT. It writes through its
        # sqlite3 connection here (a trigger on the C inserter's handle cannot call Python).
        with monitor._writer._io_lock:
            if monitor._writer._c_store is not None:
                monitor._writer._c_store.close()
                monitor._writer._c_store = None
        store_conn = monitor._writer._conn
        store_conn.create_function("die", 0, die)
        store_conn.execute(
            "CREATE TEMP TRIGGER die_inside_write AFTER INSERT ON events BEGIN SELECT die(); END"
        )
        lost_work()
        real_time.sleep(30)
        """,
    )
    proc = subprocess.run(child(script, url, store), capture_output=True, text=True, timeout=60)
    return proc.returncode
