"""Recycle and pre-ping advice: connections dropped while idle in the pool, found at checkout."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import jsonschema
import sqlalchemy as sa

import instrument
from instrument import _writer, analysis
from instrument.report import make_report

SCHEMA = json.loads((Path(instrument.__file__).parent / "report_schema.json").read_text())

IDLE_S = 2.0
"""How long the pooled connections sit idle before the server kills them."""


def _kill_idle(pg_url: str, app: str) -> int:
    """Terminate every backend of ``app`` from a connection of its own; return how many."""
    killer = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with killer.connect() as conn:
            return len(
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :app AND pid <> pg_backend_pid()"
                    ),
                    {"app": app},
                ).all()
            )
    finally:
        killer.dispose()


def run_dropped(store: Path, pg_url: str, *, pre_ping: bool) -> dict:
    """Three pooled connections used, left idle ``IDLE_S``, killed server-side, then used
    again; return what the application saw."""
    app = f"poolscope-recycle-{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(
        pg_url,
        pool_size=3,
        max_overflow=0,
        pool_pre_ping=pre_ping,
        connect_args={"application_name": app},
    )
    monitor = instrument.attach(engine, store=store, name="dropped")
    errors = []
    try:
        held = [engine.connect() for _ in range(3)]
        for conn in held:
            conn.exec_driver_sql("select 1")
            conn.close()
        for _ in range(10):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        time.sleep(IDLE_S)
        killed = _kill_idle(pg_url, app)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        except sa.exc.DBAPIError as exc:
            errors.append(exc.connection_invalidated)
        for _ in range(5):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        monitor.flush()
    finally:
        monitor.detach()
        engine.dispose()
    return {"killed": killed, "errors": errors}


def _sizing(store: Path) -> dict:
    conn = analysis.open_store(store)
    try:
        [entry] = analysis.sizing_advice(conn)
    finally:
        conn.close()
    return entry


class TestDroppedConnections:
    def test_disconnects_give_a_recycle_below_the_idle_time_and_count_the_pings(
        self, tmp_path: Path, pg_url: str
    ) -> None:
        """Idle connections the server killed fail the next checkout's query: the store
        shows the disconnect, and the advice names a pool_recycle below the idle time seen
        or pool_pre_ping=True, with the pings that would cost."""
        seen = run_dropped(tmp_path / "s.db", pg_url, pre_ping=False)
        assert seen["killed"] == 3
        assert seen["errors"] == [True]  # the application got one disconnect error

        db = sqlite3.connect(tmp_path / "s.db")
        invalidations = db.execute(
            "SELECT count FROM events WHERE kind = 'invalidate' AND connection_id IS NOT NULL"
        ).fetchall()
        checkouts, opened = db.execute(
            "SELECT count(*), count(connect_s) FROM events WHERE kind = 'checkout'"
        ).fetchone()
        [(pre_ping,)] = db.execute("SELECT pre_ping FROM pools").fetchall()
        db.close()
        assert invalidations == [(1,)]  # one disconnect, recorded as such
        assert pre_ping == 0
        assert checkouts == 3 + 10 + 1 + 5

        recycle = _sizing(tmp_path / "s.db")["recycle"]
        assert recycle["invalidations"] == recycle["disconnects"] == 1
        assert IDLE_S <= recycle["min_idle_s_at_disconnect"] < IDLE_S + 2
        assert recycle["median_idle_s_at_disconnect"] == recycle["min_idle_s_at_disconnect"]
        assert recycle["max_age_s"] >= recycle["min_idle_s_at_disconnect"]
        assert recycle["pre_ping"] is False
        advised = recycle["recommended_pool_recycle_s"]
        assert 1 <= advised < recycle["min_idle_s_at_disconnect"]
        # pre_ping pings every checkout of a connection it did not just open.
        assert recycle["pre_ping_cost"]["pings"] == checkouts - opened > 0
        # Only the dropped connection, idle past the advice, would have been recycled.
        assert recycle["pre_ping_cost"]["recycle_reconnects"] >= 1

        text, report = make_report(tmp_path / "s.db")
        jsonschema.validate(report, SCHEMA, cls=jsonschema.Draft202012Validator)
        [pool] = report["pools"]
        assert pool["sizing"]["recycle"] == recycle
        below = f"{recycle['min_idle_s_at_disconnect']:.3g}"
        assert (
            f"1 connection was dropped after about 2 s idle; set pool_recycle below {below} "
            f"or pool_pre_ping=True (pre_ping: one ping per checkout, "
            f"{checkouts - opened} pings over the window; pool_recycle={advised}: "
            f"{recycle['pre_ping_cost']['recycle_reconnects']} reconnect"
        ) in pool["sizing"]["advice"]
        assert f"set pool_recycle below {below} or pool_pre_ping=True" in text

    def test_with_pre_ping_on_the_advice_says_it_already_is(
        self, tmp_path: Path, pg_url: str
    ) -> None:
        """With pool_pre_ping=True the dropped connection is replaced at checkout without an
        error, and the advice says pre_ping is already on rather than to turn it on."""
        seen = run_dropped(tmp_path / "s.db", pg_url, pre_ping=True)
        assert seen["killed"] == 3
        assert seen["errors"] == []  # pre_ping hid the drop from the application

        recycle = _sizing(tmp_path / "s.db")["recycle"]
        assert recycle["pre_ping"] is True
        assert recycle["disconnects"] >= 1
        assert recycle["min_idle_s_at_disconnect"] >= IDLE_S
        advice = _sizing(tmp_path / "s.db")["advice"]
        assert "pool_pre_ping=True is already on and replaced them at checkout" in advice
        assert "or pool_pre_ping=True" not in advice


class TestNoInvalidations:
    def test_a_pool_without_invalidations_gets_no_recycle_advice(self, tmp_path: Path) -> None:
        """A pool whose connections were never invalidated has no recycle entry and no
        recycle sentence; one invalidated by the application (not a disconnect) has its
        invalidation counted and no advice either."""
        store = tmp_path / "s.db"
        for name, invalidate in (("quiet", False), ("invalidated", True)):
            engine = sa.create_engine(
                f"sqlite:///{tmp_path / (name + '.db')}", poolclass=sa.pool.QueuePool
            )
            monitor = instrument.attach(engine, store=store, name=name)
            for _ in range(3):
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")
                    if invalidate:
                        conn.invalidate()
            monitor.flush()
            monitor.detach()
            engine.dispose()
        conn = analysis.open_store(store)
        advice = {entry["pool"]: entry for entry in analysis.sizing_advice(conn)}
        conn.close()
        assert advice["quiet"]["recycle"] is None
        assert "pool_recycle" not in advice["quiet"]["advice"]
        recycle = advice["invalidated"]["recycle"]
        assert (recycle["invalidations"], recycle["disconnects"]) == (3, 0)
        assert recycle["recommended_pool_recycle_s"] is None
        assert recycle["pre_ping"] is False
        assert "pool_recycle" not in advice["invalidated"]["advice"]


class TestOlderStores:
    def test_a_store_without_pre_ping_is_read_and_gains_the_column(self, tmp_path: Path) -> None:
        """A store whose pools table predates pre_ping reports it as unknown, and the next
        process writing to it adds the column."""
        store = tmp_path / "s.db"
        url = f"sqlite:///{tmp_path / 'app.db'}"
        engine = sa.create_engine(url, poolclass=sa.pool.QueuePool)
        monitor = instrument.attach(engine, store=store, name="old")
        with engine.connect() as conn:
            conn.invalidate()
        monitor.flush()
        monitor.detach()
        engine.dispose()
        _writer.shutdown_all()
        db = sqlite3.connect(store)
        db.execute("ALTER TABLE pools DROP COLUMN pre_ping")
        db.close()
        assert _sizing(store)["recycle"]["pre_ping"] is None
        text, report = make_report(store)
        jsonschema.validate(report, SCHEMA, cls=jsonschema.Draft202012Validator)

        engine = sa.create_engine(url, poolclass=sa.pool.QueuePool, pool_pre_ping=True)
        monitor = instrument.attach(engine, store=store, name="old")
        with engine.connect() as conn:
            conn.invalidate()
        monitor.flush()
        monitor.detach()
        engine.dispose()
        db = sqlite3.connect(store)
        assert db.execute("SELECT pre_ping FROM pools ORDER BY id").fetchall() == [(None,), (1,)]
        db.close()
        assert _sizing(store)["recycle"]["pre_ping"] is True
