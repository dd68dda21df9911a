"""``python -m sample_app``: run the shop under traffic with poolscope attached."""

from __future__ import annotations

import argparse
import sys

from .app import Options, run, show_poolscope_warnings
from .db import DEFAULT_SCHEMA


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sample_app",
        description="Run a small shop with deliberate connection-pool bugs under traffic, "
        "recording its pool with poolscope.",
    )
    parser.add_argument(
        "--url",
        help="the shop's database, e.g. postgresql+psycopg://user@host/db "
        "(default: a SQLite file in a temporary directory)",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--workers", type=int, default=8, help="worker threads (default 8)")
    parser.add_argument(
        "--store", help="poolscope store (default: $POOLSCOPE_STORE, else ./poolscope.db)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--leak-after",
        type=float,
        default=2.0,
        help="seconds held before poolscope suspects a leak (default 2)",
    )
    parser.add_argument("--pool-size", type=int, default=5, help="default 5")
    parser.add_argument("--max-overflow", type=int, default=5, help="default 5")
    parser.add_argument(
        "--pool-timeout",
        type=float,
        default=None,
        help="seconds to wait for a connection (default: leak-after / 2, at most 1)",
    )
    parser.add_argument("--bursts", type=int, default=2, help="repricing bursts (default 2)")
    parser.add_argument(
        "--burst-width",
        type=int,
        default=None,
        help="threads per repricing burst (default: pool size + max overflow + 6)",
    )
    parser.add_argument(
        "--schema",
        default=DEFAULT_SCHEMA,
        help=f"PostgreSQL schema for the shop's tables, dropped and re-created "
        f"(default {DEFAULT_SCHEMA})",
    )
    parser.add_argument("--name", default="shop", help="pool name in the report (default shop)")
    parser.add_argument(
        "--diagnose",
        choices=("off", "server", "on"),
        default="server",
        help="why long holds were held: off, server (PostgreSQL's view; the default) or on "
        "(also the breakdown: SQL, idle in transaction, idle)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run; bad options or an unreachable database exit 2."""
    args = _parser().parse_args(argv)
    options = Options(**vars(args))  # one option per field, named alike
    try:
        options.validate()
    except ValueError as exc:
        print(f"sample_app: {exc}", file=sys.stderr)
        return 2
    show_poolscope_warnings(sys.stdout)
    try:
        return run(options)
    except sa_errors() as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sample_app: cannot use the database: {first}", file=sys.stderr)
        return 2


def sa_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the database URL is unusable (no driver, no server, bad login)."""
    import sqlalchemy as sa

    return (
        sa.exc.OperationalError,
        sa.exc.InterfaceError,
        sa.exc.NoSuchModuleError,
        ModuleNotFoundError,
    )


if __name__ == "__main__":
    sys.exit(main())
