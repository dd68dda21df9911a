"""Shared fixtures: store paths, SQLite and PostgreSQL engines, and cleanup of global state."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from instrument import _failures, _hooks, _native, _writer

# SQLAlchemy's own suite runs from its sdist through sqlalchemy_suite/run.py (make
# test-sqlalchemy), never as part of this suite.
collect_ignore = ["sqlalchemy_suite"]

PG_URL = os.environ.get("POOLSCOPE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
"""The PostgreSQL server the suite uses; override with ``$POOLSCOPE_PG_URL``."""

REQUIRE_POSTGRES = os.environ.get("POOLSCOPE_REQUIRE_POSTGRES") == "1"

_pg_error: str | None = None
_pg_checked = False


def _postgres_unavailable() -> str | None:
    global _pg_checked, _pg_error
    if not _pg_checked:
        _pg_checked = True
        try:
            engine = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
            engine.dispose()
        except Exception as exc:  # any failure means "no usable server"
            _pg_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return _pg_error


def require_postgres() -> None:
    """Skip (or, under CI with POOLSCOPE_REQUIRE_POSTGRES=1, fail) without a server."""
    error = _postgres_unavailable()
    if error:
        message = f"PostgreSQL at {PG_URL} is not reachable ({error})"
        if REQUIRE_POSTGRES:
            pytest.fail(message + "; CI requires it", pytrace=False)
        pytest.skip(message)


@pytest.fixture
def pg_url() -> str:
    """The PostgreSQL URL, after checking that the server answers."""
    require_postgres()
    return PG_URL


@pytest.fixture(params=["c", "python"])
def recorder_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each implementation of the recorder: the C helpers, then pure Python.

    "c" is the hot listeners' helper (``_speedups``) and the writer's inserter
    (``_sqlite_rows``); "python" turns both off. Monitors and writers made during
    the test use it. Without the compiled helpers the C run is skipped, except under
    CI, which builds them and must not lose that coverage; and skipped too where
    ``POOLSCOPE_NO_CEXT=1`` turns them off on purpose (a run of the pure-Python path).
    """
    if request.param == "c" and _native.disabled():
        pytest.skip("POOLSCOPE_NO_CEXT is set: the C helpers are off")
    if request.param == "python":
        monkeypatch.setattr(_hooks, "HotPath", None)
        monkeypatch.setattr(_hooks, "TimedGet", None)
        monkeypatch.setattr(_writer, "sqlite_rows", None)
    else:
        missing = [
            name
            for name, built in (
                ("instrument._speedups", _hooks.HotPath is not None),
                ("instrument._sqlite_rows", _writer.sqlite_rows is not None),
            )
            if not built
        ]
        if missing:
            message = f"the C helpers {', '.join(missing)} are not built"
            if os.environ.get("CI"):
                pytest.fail(message + "; CI builds them", pytrace=False)
            pytest.skip(message)
    return request.param


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A fresh store path in the test's own directory."""
    return tmp_path / "poolscope.db"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A URL for an application database file (not the store)."""
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each application database the suite runs on: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    request.applymarker(pytest.mark.postgres)
    require_postgres()
    return PG_URL


@pytest.fixture
def make_engine(db_url: str) -> Iterator:
    """Factory for engines on ``db_url``; every engine made is disposed after the test."""
    engines: list[sa.Engine] = []

    def make(**kwargs) -> sa.Engine:
        engine = sa.create_engine(db_url, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture(autouse=True)
def _reset_poolscope() -> Iterator[None]:
    """Detach every monitor, stop every writer and forget every listener failure a test
    left behind."""
    yield
    for monitor in list(_hooks._monitors.values()):
        monitor.detach()
    _writer.shutdown_all(timeout=10.0)
    _failures.failures.clear()


def query(store: Path, sql: str, *params) -> list[tuple]:
    """Run ``sql`` against a store file and return all rows."""
    conn = sqlite3.connect(str(store))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def short_checkouts(engine: sa.Engine, count: int = 1) -> None:
    """Check out a connection, run ``select 1`` on it and return it, ``count`` times."""
    for _ in range(count):
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")


def unique_table() -> str:
    """A table name no other test (or xdist worker) uses."""
    return "t_" + uuid.uuid4().hex[:12]
