"""Why a long hold was held: the breakdown, PostgreSQL's view, lock waits and their blockers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import sqlalchemy as sa
from conftest import query, unique_table

import instrument
from instrument._diagnose import mask_sql
from instrument.analysis import build_report, open_store
from instrument.render.words import diagnosis as diagnosis_text
from instrument.report import render

SCHEMA = json.loads((Path(instrument.__file__).parent / "report_schema.json").read_text())
HOLD_S = 1.5  # how long each test holds: well past leak_after, and 10 % of it is 150 ms
LEAK_AFTER_S = 0.5


def _report(store: Path) -> dict:
    conn = open_store(store)
    try:
        return build_report(conn)
    finally:
        conn.close()


def _leak_at(report: dict, function: str) -> dict:
    found = [leak for leak in report["leaks"] if leak["site"].endswith(f" in {function}")]
    assert found, [leak["site"] for leak in report["leaks"]]
    return found[0]


def _near(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 0.1 * expected


class TestArguments:
    @pytest.mark.parametrize("value", ["yes", 1, None, "full"])
    def test_bad_value_is_one_sentence(self, value, sqlite_url: str, store_path: Path) -> None:
        """A diagnose value other than False, True or 'server' is refused at attach."""
        engine = sa.create_engine(sqlite_url)
        with pytest.raises(ValueError) as info:
            instrument.attach(engine, store=store_path, diagnose=value)
        assert str(info.value) == f"diagnose must be False, True or 'server', not {value!r}."

    def test_detach_puts_the_engine_back_on_the_fast_path(
        self, sqlite_url: str, store_path: Path
    ) -> None:
        """diagnose=True's statement listeners and the engine's events flag go at detach."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, diagnose=True)
        assert engine.dispatch.before_cursor_execute
        monitor.detach()
        assert not engine.dispatch.before_cursor_execute
        assert not engine._has_events


class TestMask:
    @pytest.mark.parametrize(
        ("sql", "masked"),
        [
            ("UPDATE orders SET paid = 'yes', n = 42 WHERE id = 7",
             "UPDATE orders SET paid = '?', n = ? WHERE id = ?"),
            ("select $1, x1 from t2 where a = -3.5e2", "select $1, x1 from t2 where a = -?"),
            ("select E'it''s', $$dollar$$, $q$tagged$q$ -- note 99\n/* 7 */",
             "select '?', '?', '?'"),
            ("insert into \"T 1\" values ('cut off", "insert into \"T 1\" values ('?'"),
        ],
    )  # fmt: skip
    def test_literals_are_masked(self, sql: str, masked: str) -> None:
        """Strings, numbers and comments go; identifiers, keywords and $n stay."""
        assert mask_sql(sql) == masked


class TestBreakdownOnSQLite:
    def test_idle_in_transaction(self, sqlite_url: str, store_path: Path) -> None:
        """On SQLite, diagnose=True gives the breakdown, without a server view."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
        )

        def open_transaction_across_sleep() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                conn.exec_driver_sql("select 2")
                time.sleep(HOLD_S)
                conn.commit()

        open_transaction_across_sleep()
        monitor.flush()
        d = _leak_at(_report(store_path), "open_transaction_across_sleep")["diagnosis"]
        assert d["kind"] == "idle_in_transaction"
        assert d["statements"] == 2
        assert _near(d["idle_in_transaction_s"], HOLD_S)
        assert d["server"] is None and d["blocked_by"] == []

    def test_after_dispose(self, sqlite_url: str, store_path: Path) -> None:
        """The pool engine.dispose() puts in place is diagnosed too, once each, and
        detach() takes every listener off."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
        )
        engine.dispose()

        def idle_after_dispose() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                conn.commit()
                time.sleep(LEAK_AFTER_S * 3)

        idle_after_dispose()
        monitor.flush()
        d = _leak_at(_report(store_path), "idle_after_dispose")["diagnosis"]
        assert d["kind"] == "idle" and d["statements"] == 1
        assert _near(d["idle_s"], LEAK_AFTER_S * 3)
        monitor.detach()
        assert not engine.dispatch.before_cursor_execute
        assert not engine.pool.dispatch.checkout and not engine.pool.dispatch.checkin

    def test_server_only_writes_nothing_on_sqlite(self, sqlite_url: str, store_path: Path) -> None:
        """The default (server view only) has nothing to say on SQLite: no diagnosis."""
        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=LEAK_AFTER_S)
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
            time.sleep(LEAK_AFTER_S * 2)
        monitor.flush()
        assert query(store_path, "SELECT COUNT(*) FROM diagnoses") == [(0,)]


@pytest.mark.postgres
class TestOnPostgres:
    @pytest.mark.parametrize("diagnose", [True, "server"])
    def test_each_kind(self, pg_url: str, store_path: Path, diagnose) -> None:
        """A pg_sleep is slow SQL, a transaction open across a sleep is idle in transaction,
        a checkout kept after its commit is idle; each part within 10 %."""
        engine = sa.create_engine(pg_url)
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=diagnose
        )

        def sleeps_in_sql() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("select pg_sleep(:s)"), {"s": HOLD_S})

        def sleeps_in_transaction() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                time.sleep(HOLD_S)
                conn.commit()

        def sleeps_after_commit() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                conn.commit()
                time.sleep(HOLD_S)

        sleeps_in_sql()
        sleeps_in_transaction()
        sleeps_after_commit()
        monitor.flush()
        engine.dispose()
        report = _report(store_path)
        expected = {
            "sleeps_in_sql": ("slow_sql", "sql_s", "active"),
            "sleeps_in_transaction": ("idle_in_transaction", "idle_in_transaction_s",
                                      "idle in transaction"),
            "sleeps_after_commit": ("idle", "idle_s", "idle"),
        }  # fmt: skip
        for function, (kind, part, state) in expected.items():
            d = _leak_at(report, function)["diagnosis"]
            assert d["kind"] == kind, (function, d)
            assert d["server"]["state"] == state, (function, d)
            if diagnose is True:
                assert d["statements"] == 1, (function, d)
                assert _near(d[part], HOLD_S), (function, part, d)
                assert _near(d["held_s"], HOLD_S), (function, d)
            else:
                assert d["statements"] is None and d["sql_s"] is None
        text = diagnosis_text(_leak_at(report, "sleeps_in_sql")["diagnosis"])
        assert "(server: active since " in text and "select pg_sleep($1)" in text
        for fmt in ("text", "markdown", "html"):  # one line per diagnosed leak in each
            # Wherever the text report wraps the line (its length varies with the figures).
            # Only the server's part: on a busy machine the return may come a millisecond or
            # more after the commit, and the breakdown then ends with that idle time too.
            rendered = " ".join(render(report, fmt).split())
            assert rendered.count("(server: idle in transaction since ") == 1

    def test_lock_wait_names_the_blocker(self, pg_url: str, store_path: Path) -> None:
        """A checkout waiting on a row lock another thread's checkout holds is a lock wait,
        blocked by that checkout's site."""
        table = unique_table()
        engine = sa.create_engine(pg_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)")
            conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, 0)")
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
        )
        locked = threading.Event()

        def refund_slowly() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
                locked.set()
                time.sleep(HOLD_S)
                conn.commit()

        def pay() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"UPDATE {table} SET n = n + 2 WHERE id = 1")
                conn.commit()

        blocker = threading.Thread(target=refund_slowly)
        blocker.start()
        assert locked.wait(10)
        started = time.monotonic()
        pay()
        waited = time.monotonic() - started
        blocker.join()
        monitor.flush()
        try:
            report = _report(store_path)
            jsonschema.validate(report, SCHEMA, cls=jsonschema.Draft202012Validator)
            d = _leak_at(report, "pay")["diagnosis"]
            assert d["kind"] == "lock_wait"
            assert d["server"]["wait_event_type"] == "Lock"
            assert _near(d["sql_s"], waited)
            [blocked_by] = d["blocked_by"]
            assert blocked_by["site"].endswith(" in refund_slowly")
            assert isinstance(blocked_by["pid"], int)
            assert _leak_at(report, "refund_slowly")["diagnosis"]["kind"] == "idle_in_transaction"
            assert "blocked by " in diagnosis_text(d) and "refund_slowly" in diagnosis_text(d)
        finally:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP TABLE {table}")
            engine.dispose()

    def test_timeout_holders_are_diagnosed(self, pg_url: str, store_path: Path) -> None:
        """Every holder at a pool timeout gets a diagnosis, even one held under leak_after."""
        engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
        monitor = instrument.attach(engine, store=store_path, leak_after=30, diagnose=True)
        held = threading.Event()

        def hold_in_transaction() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                held.set()
                time.sleep(1.0)
                conn.commit()

        holder = threading.Thread(target=hold_in_transaction)
        holder.start()
        assert held.wait(10)
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        holder.join()
        monitor.flush()
        engine.dispose()
        [timeout] = _report(store_path)["timeouts"]
        [h] = timeout["holders"]
        assert h["diagnosis"]["kind"] == "idle_in_transaction"
        assert h["diagnosis"]["server"]["state"] == "idle in transaction"
        assert _near(h["diagnosis"]["idle_in_transaction_s"], 1.0)  # the whole hold, at checkin

    def test_no_literal_or_parameter_reaches_the_store(self, pg_url: str, store_path: Path) -> None:
        """Neither a statement's literals nor its parameters are in the store's bytes."""
        table = unique_table()
        engine = sa.create_engine(pg_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (id int, note text, n int)")
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
        )
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(
                    f"INSERT INTO {table} VALUES (918273, 'literal-Secret-q7', 5550123)"
                )
                conn.execute(
                    sa.text(f"UPDATE {table} SET note = :note WHERE n = :n"),
                    {"note": "param-Secret-z9", "n": 7770321},
                )
                time.sleep(LEAK_AFTER_S * 3)
                conn.rollback()
            with engine.connect() as conn:  # literals last on the server when sampled
                conn.exec_driver_sql(
                    f"SELECT 'literal-Secret-q7', 918273 FROM {table} WHERE note = 'x'"
                )
                time.sleep(LEAK_AFTER_S * 3)
            monitor.flush()
            queries = [r[0] for r in query(store_path, "SELECT query FROM diagnoses")]
            assert any(q and q.startswith("SELECT '?', ? FROM") for q in queries), queries
            monitor.close()
            raw = b"".join(
                p.read_bytes() for p in store_path.parent.iterdir() if p.name.startswith("pool")
            )
            for secret in ("literal-Secret-q7", "param-Secret-z9", "918273", "5550123", "7770321"):
                assert secret.encode() not in raw
        finally:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP TABLE {table}")
            engine.dispose()

    def test_async_engine(self, pg_url: str, store_path: Path) -> None:
        """An AsyncEngine gets the breakdown and the server's view too."""
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(pg_url)
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
        )

        async def sleeps_in_transaction_async() -> None:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("select 1")
                await asyncio.sleep(HOLD_S)
                await conn.commit()

        async def main() -> None:
            await sleeps_in_transaction_async()
            await engine.dispose()

        asyncio.run(main())
        monitor.flush()
        d = _leak_at(_report(store_path), "sleeps_in_transaction_async")["diagnosis"]
        assert d["kind"] == "idle_in_transaction"
        assert d["server"]["state"] == "idle in transaction"
        assert _near(d["idle_in_transaction_s"], HOLD_S)


@pytest.mark.postgres
class TestSampleApp:
    def test_bugs_are_diagnosed(self, pg_url: str, store_path: Path) -> None:
        """The shop's card charge is idle in transaction; its buy-now waits on the lock of
        the slow restock, which the diagnosis names."""
        import random

        from instrument.sample_app import bugs, db

        schema = unique_table()
        engine, bound = db.make_engine(
            pg_url, pool_size=3, max_overflow=0, pool_timeout=10, schema=schema
        )
        db.create_schema(engine, bound, schema)
        try:
            db.seed(bound, random.Random(1))
            monitor = instrument.attach(
                engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
            )
            bugs.restock_while_buying(bound, 1, HOLD_S)
            provider = bugs.PaymentProvider(fast_s=HOLD_S, slow_s=HOLD_S)
            bugs.charge_card_inside_transaction(bound, 1, provider)
            monitor.flush()
            report = _report(store_path)
            charge = _leak_at(report, "charge_card_inside_transaction")["diagnosis"]
            assert charge["kind"] == "idle_in_transaction"
            buy = _leak_at(report, "buy_product_now")["diagnosis"]
            assert buy["kind"] == "lock_wait"
            assert [b["site"].rsplit(" in ", 1)[1] for b in buy["blocked_by"]] == [
                "restock_product_slowly"
            ]
        finally:
            db.drop_schema(engine, bound, schema)
            engine.dispose()


@pytest.mark.postgres
class TestSamplerFailure:
    def test_a_failed_sample_is_counted_and_the_breakdown_kept(
        self, pg_url: str, store_path: Path
    ) -> None:
        """When poolscope's own connection cannot be made (here: the engine's URL names a
        closed port, its creator the real server), the application is untouched, the
        failure is counted, and the diagnosis keeps its breakdown without a server view."""
        import psycopg

        real = sa.make_url(pg_url)
        engine = sa.create_engine(
            "postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
            creator=lambda: psycopg.connect(
                host=real.host, port=real.port or 5432, user=real.username, dbname=real.database
            ),
        )
        monitor = instrument.attach(
            engine, store=store_path, leak_after=LEAK_AFTER_S, diagnose=True
        )

        def sleeps_in_transaction() -> None:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("select 1").scalar() == 1
                time.sleep(LEAK_AFTER_S * 3)
                conn.commit()

        sleeps_in_transaction()
        monitor.flush()
        engine.dispose()
        assert monitor._diagnoser.failures == 1
        d = _leak_at(_report(store_path), "sleeps_in_transaction")["diagnosis"]
        assert d["kind"] == "idle_in_transaction" and d["server"] is None
        assert _near(d["idle_in_transaction_s"], LEAK_AFTER_S * 3)


class TestLeaks:
    def test_a_gc_returned_leak_is_diagnosed(self, sqlite_url: str, store_path: Path) -> None:
        """A connection the garbage collector returned, held under leak_after, still gets
        its breakdown (diagnose=True)."""
        import gc

        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=store_path, leak_after=30, diagnose=True)

        def forget_connection() -> None:
            conn = engine.connect()
            conn.exec_driver_sql("select 1")

        forget_connection()
        gc.collect()
        monitor.flush()
        d = _leak_at(_report(store_path), "forget_connection")["diagnosis"]
        assert d["complete"] and d["statements"] == 1 and d["kind"] is not None


class TestAtExit:
    def test_holders_at_a_timeout_just_before_exit_are_diagnosed(
        self, pg_url: str, store_path: Path, tmp_path: Path
    ) -> None:
        """A process that ends right after a timeout (the usual crash) still writes its
        holders' server view: exit waits for the samples asked for (2 s at most)."""
        program = tmp_path / "ends_at_timeout.py"
        program.write_text(
            "import sys, sqlalchemy as sa, instrument\n"
            "engine = sa.create_engine(sys.argv[1], pool_size=1, max_overflow=0,"
            " pool_timeout=0.2)\n"
            "instrument.attach(engine, store=sys.argv[2], leak_after=30)\n"
            "held = engine.connect()\n"
            "held.exec_driver_sql('select 1')\n"
            "try:\n"
            "    engine.connect()\n"
            "except sa.exc.TimeoutError:\n"
            "    sys.exit(3)\n"
        )
        done = subprocess.run(
            [sys.executable, str(program), pg_url, str(store_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 3, done.stderr
        [timeout] = _report(store_path)["timeouts"]
        [holder] = timeout["holders"]
        assert holder["diagnosis"]["server"]["state"] == "idle in transaction"
        assert holder["diagnosis"]["kind"] == "idle_in_transaction"
        # Never returned: the line says its hold is the one seen when sampled.
        assert holder["diagnosis"]["complete"] is False
        assert diagnosis_text(holder["diagnosis"]).startswith("held ")
        assert " when sampled: idle in transaction (server: " in diagnosis_text(holder["diagnosis"])
