"""The replay of recorded demand on QueuePool semantics, and the pool settings it advises."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import sqlalchemy as sa

import instrument
from instrument import _replay, analysis
from instrument.report import make_report

BURST_HOLD_S = 0.25
"""How long each burst thread holds its connection: longer than the pool timeout."""


def burst_of(engine: sa.Engine, threads: int, hold_s: float) -> int:
    """Start ``threads`` threads at once, each holding a connection ``hold_s``; return how
    many of them the pool timed out."""
    barrier = threading.Barrier(threads)
    failed = []

    def hold() -> None:
        barrier.wait()
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
                time.sleep(hold_s)
        except sa.exc.TimeoutError:
            failed.append(1)

    workers = [threading.Thread(target=hold, name=f"burst-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(failed)


def run_bursty(
    store: Path, url: str, *, pool_size: int, max_overflow: int, timeout_s: float
) -> int:
    """Quick checkouts, then bursts wider than a small pool (8 and 5 threads), recorded as
    pool ``bursty``; return the timeouts the application saw."""
    engine = sa.create_engine(
        url,
        poolclass=sa.pool.QueuePool,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=timeout_s,
        connect_args={"check_same_thread": False},
    )
    monitor = instrument.attach(engine, store=store, name="bursty")
    seen = 0
    for threads in (8, 5):
        for _ in range(5):
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        seen += burst_of(engine, threads, BURST_HOLD_S)
    monitor.flush()
    monitor.detach()
    engine.dispose()
    return seen


@pytest.fixture(scope="module")
def bursty(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bursty workload on pool_size 2, max_overflow 1, pool_timeout 0.15 s, its sizing
    advice, and the same workload re-run with that advice."""
    tmp = tmp_path_factory.mktemp("bursty")
    url = f"sqlite:///{tmp / 'app.db'}"
    seen = run_bursty(tmp / "before.db", url, pool_size=2, max_overflow=1, timeout_s=0.15)
    conn = analysis.open_store(tmp / "before.db")
    [advice] = analysis.sizing_advice(conn)
    text, report = make_report(tmp / "before.db")
    conn.close()
    rec = advice["replay"]["recommended"]
    seen_after = run_bursty(
        tmp / "after.db",
        url,
        pool_size=rec["pool_size"],
        max_overflow=rec["max_overflow"],
        timeout_s=rec["pool_timeout_s"],
    )
    conn = analysis.open_store(tmp / "after.db")
    [after] = analysis.sizing_advice(conn)
    conn.close()
    return {"seen": seen, "advice": advice, "report": report, "text": text, "after": after,
            "seen_after": seen_after}  # fmt: skip


class TestReplayOfRecordedSettings:
    def test_it_reproduces_the_timeouts_and_the_peak(self, bursty: dict) -> None:
        """Replayed with the settings it ran with, the workload times out as often as it did
        (within 30 % or 1) and peaks at exactly the connections it had."""
        advice = bursty["advice"]
        current = advice["replay"]["current"]
        assert bursty["seen"] == advice["timeouts"] > 0
        assert abs(current["timeouts"] - advice["timeouts"]) <= max(1, 0.3 * advice["timeouts"])
        assert current["peak"] == advice["peak_in_use"] == 3
        assert (current["pool_size"], current["max_overflow"], current["pool_timeout_s"]) == (
            2, 1, 0.15,
        )  # fmt: skip
        # Each timed-out request is replayed too, with its site's typical hold.
        assert advice["replay"]["timeouts"] == advice["timeouts"]
        assert current["requests"] == advice["checkouts"] + advice["timeouts"]


class TestRecommendation:
    def test_the_advice_runs_the_workload_without_timeouts(self, bursty: dict) -> None:
        """Re-running the same workload with the recommended settings times out nowhere, as
        the replay of the advice predicted."""
        advice = bursty["advice"]
        rec = advice["replay"]["recommended"]
        assert (advice["recommended_pool_size"], advice["recommended_max_overflow"]) == (
            rec["pool_size"], rec["max_overflow"],
        )  # fmt: skip
        assert rec["timeouts"] == 0
        assert bursty["seen_after"] == bursty["after"]["timeouts"] == 0

    def test_the_advice_is_never_larger_than_peak_demand_plus_one(self, bursty: dict) -> None:
        """The advised capacity serves the widest burst and is at most the most callers that
        wanted a connection at once, plus one."""
        advice = bursty["advice"]
        capacity = advice["recommended_pool_size"] + advice["recommended_max_overflow"]
        assert capacity <= advice["peak_demand"] + 1
        assert capacity == 8  # the widest burst holds longer than the timeout: all at once

    def test_the_report_says_it_in_one_paragraph(self, bursty: dict) -> None:
        """The text report's SIZING paragraph names the replayed settings and their
        timeouts, and the JSON carries both replays."""
        [pool] = bursty["report"]["pools"]
        replayed = pool["sizing"]["replay"]
        assert set(replayed["current"]) >= {"timeouts", "wait_p99_ms", "peak"}
        rec = replayed["recommended"]
        sizing = " ".join(bursty["text"].split("\nSIZING\n")[1].split())
        assert "Replaying the" in sizing
        assert f"pool_size={rec['pool_size']}, max_overflow={rec['max_overflow']}" in sizing
        assert "gives no timeouts" in sizing
        schema = json.loads((Path(instrument.__file__).parent / "report_schema.json").read_text())
        jsonschema.validate(bursty["report"], schema, cls=jsonschema.Draft202012Validator)

    def test_confirmed_leaks_are_left_out_and_named(self) -> None:
        """A connection leaked for the whole run is left out of the advice's demand and its
        site named: without it one connection serves everything."""
        leaked = _replay.Demand(np.array([0.0]), np.array([100.0]))
        quick = _replay.Demand(np.arange(1.0, 50.0), np.full(49, 0.01))
        both = _replay.Demand(
            np.concatenate([leaked.arrivals, quick.arrivals]),
            np.concatenate([leaked.holds, quick.holds]),
        )
        assert _replay.replay([both], 1, 0, 0.5).timeouts == 49
        advice = _replay.recommend([quick], 1, 0, 0.5)
        assert advice is not None
        assert (advice.pool_size, advice.max_overflow, advice.outcome.timeouts) == (1, 0, 0)


class TestReplayModel:
    def test_fifo_waiters_with_a_timeout(self) -> None:
        """Two connections, four callers at once holding 1 s, timeout 1.5 s: two are served
        at once, two after 1 s; with timeout 0.5 s those two time out."""
        demand = _replay.Demand(np.zeros(4), np.ones(4))
        waited = _replay.replay([demand], 1, 1, 1.5)
        assert (waited.timeouts, waited.peak, sorted(waited.waits_s)) == (0, 2, [0, 0, 1, 1])
        failed = _replay.replay([demand], 2, 0, 0.5)
        assert (failed.timeouts, failed.peak, failed.checkouts) == (2, 2, 4)

    def test_no_limit_never_waits(self) -> None:
        """pool_size 0 or max_overflow -1 mean no limit, as in SQLAlchemy."""
        demand = _replay.Demand(np.zeros(5), np.ones(5))
        for size, overflow in ((0, 3), (2, -1)):
            outcome = _replay.replay([demand], size, overflow, 0.1)
            assert (outcome.timeouts, outcome.peak) == (0, 5)
        assert _replay.recommend([demand], 0, 3, 0.1) is None

    def test_processes_have_their_own_pools(self) -> None:
        """Two processes of three callers each fit a capacity of three, six at once in all."""
        demand = _replay.Demand(np.zeros(3), np.ones(3))
        outcome = _replay.replay([demand, demand], 2, 1, 0.1)
        assert (outcome.timeouts, outcome.peak, outcome.peak_total) == (0, 3, 6)
