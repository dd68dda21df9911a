"""``poolscope demo``: run the shop for half a minute, print the report, open the dashboard."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from instrument import PoolscopeError
from instrument.analysis import open_store

DEFAULT_STORE = "poolscope-demo.db"
"""Where the demo records, relative to the working directory."""


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _replace_old_store(store: Path) -> str | None:
    """Delete a previous demo's store; return an error if ``store`` is something else."""
    if not store.exists():
        return None
    try:
        open_store(store).close()
    except PoolscopeError as exc:
        return f"{store} exists and is not a poolscope store ({exc}); pick another --store"
    for path in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        path.unlink(missing_ok=True)
    return None


def dashboard_problem(commands: Collection[str]) -> str | None:
    """Say why the dashboard cannot start here, or ``None`` if it can."""
    if "dashboard" not in commands:
        return "this poolscope has no dashboard command yet"
    if importlib.util.find_spec("streamlit") is None:
        return "streamlit is not installed (pip install 'poolscope[dashboard]')"
    if importlib.util.find_spec("instrument.dashboard") is None:
        return "this poolscope has no instrument.dashboard package"
    return None


def run_demo(
    store: Path,
    *,
    duration: float = 30.0,
    dashboard: bool = True,
    commands: Collection[str] = (),
    echo: Callable[[str], None] = print,
) -> int:
    """Run the sample app in a child process, print its report, then serve the dashboard.

    The app runs in its own process so that its exit is recorded: only then is the
    session it leaks reported as ``never_returned``. The dashboard runs until Ctrl-C.

    :param store: the store to record into; a previous demo store there is replaced.
    :param duration: seconds of traffic.
    :param dashboard: ``False`` to stop after the report.
    :param commands: the names of the ``poolscope`` commands available (``report``,
        ``dashboard``); a missing one is skipped with a message.
    :param echo: prints one line.
    :returns: the exit code: 0, or 2 for an unusable ``store``.
    """
    problem = _replace_old_store(store)
    if problem:
        print(f"poolscope: {problem}", file=sys.stderr)  # an error: stderr, like the CLI's
        return 2
    echo(
        f"poolscope demo: a small shop with five deliberate pool bugs runs for {duration:g} s "
        f"on SQLite, recorded into {store}"
    )
    echo("")
    shop = ["-m", "instrument.sample_app"]  # `python -m sample_app` works only in a clone
    app = subprocess.run(
        _python(*shop, "--duration", f"{duration:g}", "--store", str(store)), check=False
    )
    if app.returncode != 0:
        echo(f"poolscope: the sample app failed (exit code {app.returncode})")
        return app.returncode

    echo("")
    if "report" in commands:
        echo(f"$ poolscope report {store}")
        sys.stdout.flush()
        subprocess.run(_python("-m", "instrument", "report", str(store)), check=False)
    else:
        echo("(this poolscope has no report command yet)")

    if not dashboard:
        return 0
    problem = dashboard_problem(commands)
    if problem:
        echo("")
        echo(f"The dashboard cannot start: {problem}. The report above has the same findings.")
        return 0
    echo("")
    echo(f"$ poolscope dashboard {store}      (Ctrl-C to stop)")
    sys.stdout.flush()
    child = subprocess.Popen(_python("-m", "instrument", "dashboard", str(store)))
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
        echo("dashboard stopped")
        return 0
    if code != 0:
        echo(f"The dashboard stopped (exit code {code}). The report above has the same findings.")
    return 0
