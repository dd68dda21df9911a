"""``poolscope run``: become a command whose Python processes attach every SQLAlchemy engine."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._auto import (
    AUTO_ENV,
    DIAGNOSE_ENV,
    DIAGNOSE_WORDS,
    LEAK_AFTER_ENV,
    METRICS_ENV,
    otel_api_installed,
)
from ._retention import KEEP_RAW_ENV, MAX_STORE_MB_ENV, keep_raw_setting, max_store_setting
from ._store import resolve_store_path

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "_bootstrap"
"""The directory of the ``sitecustomize.py`` that ``poolscope run`` puts first on ``PYTHONPATH``."""


def launch_environment(
    environ: Mapping[str, str],
    *,
    store: str | None = None,
    leak_after: str | float | None = None,
    keep_raw: str | float | None = None,
    max_store_mb: str | float | None = None,
    diagnose: str | None = None,
    metrics: bool = False,
) -> dict[str, str]:
    """The environment ``poolscope run`` gives its command: ``environ`` with auto-attach on.

    ``PYTHONPATH`` starts with :data:`BOOTSTRAP_DIR` (once, however deep the nesting),
    ``POOLSCOPE_AUTO=1``, ``POOLSCOPE_STORE`` is the store as an absolute path (a command
    that changes directory, or its workers, still write the one store), and
    ``POOLSCOPE_LEAK_AFTER`` is set when ``leak_after`` is given.

    :param store: the store. May be ``None`` for ``$POOLSCOPE_STORE``, else ``./poolscope.db``.
    :param leak_after: seconds before a hold is a suspected leak. May be ``None`` to
        keep ``$POOLSCOPE_LEAK_AFTER``, else 30.
    :param keep_raw: seconds of raw events kept, for ``$POOLSCOPE_KEEP_RAW``; ``None``
        leaves it as it is.
    :param max_store_mb: the store's budget, for ``$POOLSCOPE_MAX_STORE_MB``; ``None``
        leaves it as it is.
    :param diagnose: ``off``, ``server`` or ``on``, for ``$POOLSCOPE_DIAGNOSE``; ``None``
        leaves it as it is.
    :param metrics: set ``$POOLSCOPE_METRICS``: report OpenTelemetry's pool metrics to the
        program's global ``MeterProvider``.
    :raises ValueError: ``leak_after`` is not a number of seconds above 0,
        ``keep_raw``/``max_store_mb`` is not what ``attach()`` takes, ``diagnose`` is not
        one of its words, or ``metrics`` is asked without OpenTelemetry's API installed.
    """
    seconds = _seconds(leak_after) if leak_after is not None else None
    if diagnose is not None and diagnose.strip().lower() not in DIAGNOSE_WORDS:
        raise ValueError(f"--diagnose must be off, server or on, not {diagnose!r}")
    if metrics and not otel_api_installed():
        raise ValueError("--metrics needs OpenTelemetry's API: pip install 'poolscope[otel]'")
    retention = {}
    if keep_raw is not None:
        retention[KEEP_RAW_ENV] = repr(_setting(keep_raw, "--keep-raw", keep_raw_setting))
    if max_store_mb is not None:
        value = _setting(max_store_mb, "--max-store-mb", max_store_setting)
        retention[MAX_STORE_MB_ENV] = repr(value)
    env = dict(environ)
    bootstrap = str(BOOTSTRAP_DIR)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap]
    env["PYTHONPATH"] = os.pathsep.join([bootstrap, *rest])
    env[AUTO_ENV] = "1"
    path = resolve_store_path(store if store is not None else env.get("POOLSCOPE_STORE") or None)
    # A URL as given (its password too: the environment is the program's own), a path made
    # absolute.
    env["POOLSCOPE_STORE"] = (
        str(path.absolute()) if isinstance(path, Path) else str(store or env["POOLSCOPE_STORE"])
    )
    if seconds is not None:
        env[LEAK_AFTER_ENV] = repr(seconds)
    env.update(retention)
    if diagnose is not None:
        env[DIAGNOSE_ENV] = diagnose.strip().lower()
    if metrics:
        env[METRICS_ENV] = "1"
    return env


def _setting(value: str | float, option: str, check: Callable[[Any], float]) -> float:
    """``value`` checked as ``attach()`` checks it; the error names ``option``."""
    name = option.lstrip("-").replace("-", "_")
    try:
        number = float(value)
    except ValueError:
        number = value  # type: ignore[assignment]
    try:
        return check(number)
    except ValueError as exc:
        message = str(exc).replace(name, option, 1).replace(f"not {number!r}.", f"not {value!r}.")
        raise ValueError(message) from None


def _seconds(value: str | float) -> float:
    """``value`` as a number of seconds above 0; ``ValueError`` (one sentence) otherwise."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"--leak-after must be a number of seconds above 0, not {value!r}")
    return seconds


def run_command(
    command: Sequence[str],
    *,
    store: str | None = None,
    leak_after: str | float | None = None,
    keep_raw: str | float | None = None,
    max_store_mb: str | float | None = None,
    diagnose: str | None = None,
    metrics: bool = False,
) -> NoReturn:
    """Replace this process with ``command``, every SQLAlchemy engine of it attached.

    The command is executed (``execve``), not spawned: its exit status, its signals,
    its standard streams and its ``sys.argv`` are its own. (Where there is no ``exec``,
    on Windows, it runs as a child and its exit status is passed on.)

    :raises ValueError: no command, a command not found or not executable, or a bad
        ``leak_after`` (one sentence, for the CLI to print).
    """
    if not command:
        raise ValueError("run needs a command: poolscope run [OPTIONS] -- CMD [ARGS]...")
    env = launch_environment(
        os.environ,
        store=store,
        leak_after=leak_after,
        keep_raw=keep_raw,
        max_store_mb=max_store_mb,
        diagnose=diagnose,
        metrics=metrics,
    )
    program = command[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        executable = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    else:
        executable = shutil.which(program, path=env.get("PATH", os.defpath))
    if executable is None:
        raise ValueError(f"command not found: {program}")
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name != "posix":  # pragma: no cover - no exec to replace this process with
        sys.exit(subprocess.call([executable, *command[1:]], env=env))
    try:
        os.execve(executable, list(command), env)
    except OSError as exc:
        raise ValueError(f"cannot run {program}: {exc.strerror or exc}") from None
