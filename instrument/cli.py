"""The ``poolscope`` command line: a thin shell over the library."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .exceptions import PoolscopeError


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a spec
        return False


def _fail(message: str) -> NoReturn:
    """Print ``poolscope: <message>`` on stderr and exit 2: the input is unusable."""
    click.echo(f"poolscope: {message}", err=True)
    sys.exit(2)


def _store_of(store: str | None) -> Any:
    """The store ``store`` names (a path, or a PostgreSQL store); exit 2 for a URL of
    another database, or a PostgreSQL URL without psycopg installed."""
    from ._store import PostgresStore, resolve_store_path

    try:
        resolved = resolve_store_path(store)
        if isinstance(resolved, PostgresStore):
            from ._pg_store import psycopg

            psycopg()
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    return resolved


def _require_part(module: str, what: str) -> None:
    """Exit 2 unless ``module``, a part of poolscope that lives outside ``instrument/`` in a
    clone, can be imported: it cannot when a clone is run without being installed."""
    if not _installed(module):
        _fail(
            f"{what} is not installed with this poolscope (no {module}): "
            "pip install 'poolscope[dashboard]', or pip install -e '.[dashboard]' in a clone"
        )


_STORE_FILES = {
    "": "the store itself",
    "-wal": "the store's write-ahead log",
    "-shm": "the store's shared-memory file",
    "-journal": "the store's rollback journal",
}
"""The store's own files (its database and SQLite's files next to it), as the CLI names them."""


def _clobbers_store(output: str, store: Path) -> str | None:
    """What of the store writing to ``output`` would overwrite (as :data:`_STORE_FILES`
    says, with the path), or ``None``.

    Compared by real path (symlinks and relative paths resolved) and, for files that
    exist, by identity (a hard link has another path but is the same file).
    """
    target = Path(output).resolve()
    for base in dict.fromkeys((store.absolute(), store.resolve())):  # as named, as linked
        for suffix, what in _STORE_FILES.items():
            candidate = Path(f"{base}{suffix}")
            try:
                same = target == candidate.resolve() or os.path.samefile(target, candidate)
            except OSError:  # one of them does not exist
                same = False
            if same:
                return f"{what} ({candidate})"
    return None


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--version``: poolscope's version, then which C helpers this interpreter loads."""
    if not value or ctx.resilient_parsing:
        return
    from . import _native

    click.echo(f"poolscope, version {__version__}")
    for line in _native.describe().splitlines():
        click.echo(f"C helper {line}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and which C helpers are loaded, and exit.",
)
def cli() -> None:
    """poolscope: who held your SQLAlchemy pool's connections, for how long, and which never
    came back."""


@cli.command()
@click.argument("store", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json", "html"]),
    default="text",
    show_default=True,
    help="Output format: text for a terminal, markdown, json (schema poolscope.report/1) "
    "or one self-contained html page.",
)
@click.option("--output", "-o", metavar="FILE", help="Write the report to FILE, not stdout.")
@click.option(
    "--leak-after",
    type=float,
    metavar="S",
    help="Seconds a hold may last before it is a suspected leak (default: the leak_after "
    "each pool was attached with).",
)
@click.option("--since", metavar="TIME", help="Only what happened from TIME (ISO or unix s).")
@click.option("--until", metavar="TIME", help="Only what happened up to TIME (ISO or unix s).")
@click.option("--pool", "pools", multiple=True, metavar="NAME", help="Only this pool (repeatable).")
@click.option(
    "--fail-on-leak", is_flag=True, help="Exit with status 1 when any confirmed leak is found."
)
def report(
    store: str | None,
    fmt: str,
    output: str | None,
    leak_after: float | None,
    since: str | None,
    until: str | None,
    pools: tuple[str, ...],
    fail_on_leak: bool,
) -> None:
    """Report leaks, timeouts with their holders, percentiles and sizing advice from STORE.

    STORE is a SQLite file or a PostgreSQL store's URL (postgresql+psycopg://...); it
    defaults to $POOLSCOPE_STORE, else ./poolscope.db. Exit status: 0 fine, 1 confirmed
    leaks with --fail-on-leak, 2 unusable input.
    """
    from . import analysis
    from .report import make_report

    path = _store_of(store)
    if output and isinstance(path, Path):
        clobbered = _clobbers_store(output, path)
        if clobbered:
            _fail(f"--output {output} is {clobbered}; write the report elsewhere")
    try:
        filters = analysis.Filters(
            pools=pools or None,
            since=analysis.parse_time(since) if since is not None else None,
            until=analysis.parse_time(until) if until is not None else None,
            leak_after=leak_after,
        )
        text, data = make_report(path, filters, fmt)
    except (PoolscopeError, ValueError) as exc:
        _fail(str(exc))
    if output:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot write {output}: {exc.strerror or exc}")
    else:
        click.echo(text, nl=False)
    if fail_on_leak and data["summary"]["confirmed_leaks"]:
        sys.exit(1)


@cli.command()
@click.argument("store", required=False)
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True,
              help="Port to serve the dashboard on (bound to 127.0.0.1).")  # fmt: skip
@click.option(
    "--allow-any-store",
    is_flag=True,
    help="Let the sidebar open a store in any directory (default: only STORE's directory).",
)
def dashboard(store: str | None, port: int, allow_any_store: bool) -> None:
    """Open the Streamlit dashboard on STORE at http://127.0.0.1:PORT.

    STORE is a SQLite file or a PostgreSQL store's URL; it defaults to $POOLSCOPE_STORE,
    else ./poolscope.db. The sidebar opens only the
    stores of STORE's directory, unless --allow-any-store.
    """
    from . import analysis

    if not _installed("streamlit"):
        _fail("the dashboard needs Streamlit: pip install 'poolscope[dashboard]'")
    _require_part("instrument.dashboard", "the dashboard")
    from .dashboard import APP  # dashboard/app.py in a clone, instrument/dashboard/ installed

    path = _store_of(store)
    try:
        analysis.open_store(path).close()
    except PoolscopeError as exc:
        _fail(str(exc))
    env = dict(os.environ)
    if isinstance(path, Path):
        store_args = ["--store", str(path.resolve())]
    else:  # a URL may hold a password: through the environment, never the command line
        env["POOLSCOPE_STORE"] = path.url
        store_args = []
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", "127.0.0.1", "--server.port", str(port),
        # The project's .streamlit/config.toml says the same, but Streamlit reads it
        # only from the current directory: say it here for any directory.
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--", *store_args,
        *(["--allow-any-store"] if allow_any_store else []),
    ]  # fmt: skip
    click.echo(f"poolscope dashboard: http://127.0.0.1:{port} (Ctrl+C to stop)", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        # Become Streamlit: a terminate or Ctrl+C sent to this process reaches the server,
        # which would otherwise be left running behind an exited parent.
        os.execve(sys.executable, command, env)
    try:
        sys.exit(subprocess.call(command, env=env))
    except KeyboardInterrupt:
        sys.exit(0)


@cli.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds the sample app runs.",
)
@click.option(
    "--store",
    type=click.Path(dir_okay=False),
    default="poolscope-demo.db",
    show_default=True,
    help="Store to record into; a previous demo store there is replaced.",
)
@click.option("--no-dashboard", is_flag=True, help="Stop after printing the report.")
def demo(duration: float, store: str, no_dashboard: bool) -> None:
    """Run the sample app for about half a minute on SQLite, then open the dashboard."""
    _require_part("instrument.sample_app", "the demo's shop")
    from .sample_app.demo import run_demo  # sample_app/ in a clone, installed inside

    code = run_demo(
        Path(store),
        duration=duration,
        dashboard=not no_dashboard,
        commands=set(cli.commands),
        echo=click.echo,
    )
    if code:
        sys.exit(code)


@cli.command()
@click.argument("source", metavar="STORE.db")
@click.option(
    "--to", "target", required=True, metavar="URL",
    help="The PostgreSQL store to copy into (postgresql+psycopg://...).",
)  # fmt: skip
def push(source: str, target: str) -> None:
    """Copy the SQLite store STORE.db into the PostgreSQL store URL, idempotently.

    Pushing the same store twice, or again after it grew, copies only what is new.
    """
    from ._push import push as push_store
    from ._store import PostgresStore

    source_path = _store_of(source)
    if not isinstance(source_path, Path):
        _fail(f"push copies a SQLite store (a file), not {source_path}")
    target_store = _store_of(target)
    if not isinstance(target_store, PostgresStore):
        _fail(f"--to takes a PostgreSQL store's URL (postgresql+psycopg://...), not {target}")
    shown = {"done": 0}

    def progress(done: int, total: int) -> None:
        # A line per tenth on long pushes: visible in a CI log as on a terminal.
        if total >= 100_000 and done * 10 // total > shown["done"] * 10 // total:
            click.echo(f"poolscope push: {done:,} of {total:,} events", err=True)
        shown["done"] = done

    try:
        result = push_store(source_path, target_store, progress=progress)
    except PoolscopeError as exc:
        _fail(str(exc))
    click.echo(
        f"poolscope push: {source_path} -> {target_store}: {result.events} events, "
        f"{result.processes} processes, {result.pools} pools, {result.stacks} stacks added"
    )


class _OneLineUsageErrors(click.Command):
    """A command whose usage errors (an unknown option, a bad value) are one line, exit 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            _fail(f"no such option: {exc.option_name} (try 'poolscope {self.name} --help')")
        except click.UsageError as exc:
            _fail(exc.format_message())


@cli.command(
    cls=_OneLineUsageErrors,
    context_settings={"allow_interspersed_args": False},
)
@click.option(
    "--store",
    metavar="S",
    help="Store to record into (default: $POOLSCOPE_STORE, else ./poolscope.db here).",
)
@click.option(
    "--leak-after",
    metavar="S",
    help="Seconds a hold may last before it is a suspected leak (default: "
    "$POOLSCOPE_LEAK_AFTER, else 30).",
)
@click.option(
    "--keep-raw",
    metavar="S",
    help="Seconds of raw events the store keeps (default: $POOLSCOPE_KEEP_RAW, else 900).",
)
@click.option(
    "--max-store-mb",
    metavar="MB",
    help="The store's budget in MiB (default: $POOLSCOPE_MAX_STORE_MB, else 1024).",
)
@click.option(
    "--diagnose",
    metavar="off|server|on",
    help="Why long holds were held: attach(diagnose=False | 'server' | True) "
    "(default: $POOLSCOPE_DIAGNOSE, else server).",
)
@click.option(
    "--metrics",
    is_flag=True,
    help="Also report OpenTelemetry's pool metrics to the program's global MeterProvider "
    "(needs poolscope[otel]).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def run(
    store: str | None,
    leak_after: str | None,
    keep_raw: str | None,
    max_store_mb: str | None,
    diagnose: str | None,
    metrics: bool,
    command: tuple[str, ...],
) -> None:
    """Run CMD with every SQLAlchemy pool of its Python processes recorded, no code change.

    CMD is executed in place of poolscope (exit status, signals, output and sys.argv are
    its own); its Python processes, and their workers, attach each engine as it is made.
    """
    from ._launch import run_command

    try:
        run_command(
            command,
            store=store,
            leak_after=leak_after,
            keep_raw=keep_raw,
            max_store_mb=max_store_mb,
            diagnose=diagnose,
            metrics=metrics,
        )
    except ValueError as exc:
        _fail(str(exc))


@cli.command(cls=_OneLineUsageErrors)
@click.argument("store")
@click.option(
    "--keep-raw",
    metavar="S",
    help="Seconds of raw events kept before the store's last event (default: "
    "$POOLSCOPE_KEEP_RAW, else 900; 'inf' keeps them all and only rolls up).",
)
def compact(store: str, keep_raw: str | None) -> None:
    """Roll up STORE's raw events and prune those older than --keep-raw, as an attached
    writer does: for a store recorded by the first release or without retention.

    Leaks, timeouts with their holders' checkouts, holds past leak_after, invalidations and
    checkouts never returned are kept. Safe while processes write STORE (short
    transactions); the file is vacuumed when none does. Progress goes to stderr.
    """
    import math
    import sqlite3

    from ._compact import compact as run_compact
    from ._retention import keep_raw_setting
    from ._store import resolve_store_path

    try:
        keep = keep_raw_setting(None if keep_raw is None else _number(keep_raw, "--keep-raw"))
    except ValueError as exc:
        _fail(str(exc).replace("keep_raw", "--keep-raw"))
    path = resolve_store_path(store)
    bar = _ProgressBar()
    try:
        done = run_compact(path, keep, bar)
    except PoolscopeError as exc:
        bar.end()
        _fail(str(exc))
    except sqlite3.Error as exc:
        bar.end()
        _fail(f"cannot compact {path}: {exc}")
    bar.end()
    mb = 1 << 20
    click.echo(
        f"poolscope compact: {path}: rolled up {done.rolled_up_events:,} events of "
        f"{done.rolled_up_processes} process(es); pruned {done.pruned:,} raw events"
        f"{'' if math.isfinite(keep) else ' (none: --keep-raw inf)'}; "
        f"{done.hour_rows:,} minute rollups merged into hours; "
        + (
            f"vacuumed: {done.size_before / mb:.1f} MB -> {done.size_after / mb:.1f} MB"
            if done.vacuumed
            else f"not vacuumed ({done.live_processes} process(es) writing it; its writers "
            "reuse the freed pages)"
        ),
        err=True,
    )


def _number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{option} must be a number of seconds, not {text!r}.") from None


class _ProgressBar:
    """``(phase, done, total)`` progress on stderr: a bar redrawn in place on a terminal, a
    line per tenth otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown: tuple[str, int] | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        share = done / total if total else 1.0
        if self.tty:
            filled = int(share * 30)
            sys.stderr.write(f"\r{phase:<11} [{'#' * filled}{'.' * (30 - filled)}] {share:4.0%}")
            sys.stderr.flush()
            self.shown = (phase, 0)
            return
        step = int(share * 10)
        if self.shown is None or self.shown != (phase, step):
            self.shown = (phase, step)
            sys.stderr.write(f"poolscope compact: {phase} {share:.0%}\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty and self.shown is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def main() -> None:
    """Entry point of the ``poolscope`` console script."""
    cli()
