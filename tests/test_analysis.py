"""instrument.analysis against stores recorded from real workloads on SQLite and PostgreSQL.

Each store is recorded once per module (the workloads take about a second) and analysed
right away, while its process is alive; the tests then check every frame against what
the workload did and against numbers computed independently from the raw events.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import PG_URL, query, require_postgres
from report_workloads import (
    LEAK_AFTER,
    POOL_TIMEOUT,
    quick_query,
    run_dies_mid_batch,
    run_exiting_leak,
    run_killed,
    run_mixed,
)

import instrument
from instrument import analysis
from instrument.analysis import Filters, _load, _model, _summary

DATABASES = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


def fn(site: str) -> str:
    """``path.py:42 in hold_first`` → ``hold_first``."""
    return site.rsplit(" in ", 1)[1]


@pytest.fixture(scope="module", params=DATABASES)
def app_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The application database: a SQLite file, then the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('app') / 'app.db'}"
    require_postgres()
    return PG_URL


@pytest.fixture(scope="module")
def mixed(app_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The mixed in-process workload, analysed while its connection is still open."""
    store = tmp_path_factory.mktemp("mixed") / "poolscope.db"
    work = run_mixed(app_url, store)
    try:
        conn = analysis.open_store(store)
        pinned = time.time()
        r = SimpleNamespace(
            work=work,
            store=store,
            co=analysis.checkouts(conn),
            procs=analysis.processes(conn),
            pools=analysis.pools(conn),
            leaks=analysis.leaks(conn),
            leaks_60=analysis.leaks(conn, Filters(leak_after=60)),
            leaks_other_pool=analysis.leaks(conn, Filters(pools=("other",))),
            timeouts=analysis.timeouts(conn),
            pct=analysis.percentiles(conn),
            pct_site=analysis.percentiles(conn, by="site"),
            pct_pool=analysis.percentiles(conn, by="pool"),
            sites=analysis.sites(conn),
            util=analysis.utilization(conn, interval_s=0.05),
            util_auto=analysis.utilization(conn),
            sizing=analysis.sizing_advice(conn),
            # Pinned to one moment, so the open checkout's hold is the same in both.
            pinned_co=analysis.checkouts(conn, Filters(until=pinned)),
            pinned_sizing=analysis.sizing_advice(conn, Filters(until=pinned)),
            summary=analysis.summary(conn),
            # Counted now: the cleanup after each test detaches the monitor, which then
            # records the still open connection as unwatched.
            events=conn.execute("SELECT COUNT(*) FROM events").fetchone()[0],
            summaries=[_both_summaries(conn, f) for f in SUMMARY_FILTERS],
        )
        first_hold = r.co[r.co["site"].map(fn) == "hold_first"].iloc[0]
        timeout_at = float(r.timeouts["at"].iloc[0])
        r.before_timeout = analysis.checkouts(conn, Filters(until=first_hold["checked_out_at"]))
        r.timeouts_before = analysis.timeouts(conn, Filters(until=timeout_at - 1e-3))
        r.after_all = analysis.checkouts(conn, Filters(since=timeout_at + 60))
        conn.close()
        yield r
    finally:
        work.close()


@pytest.fixture(scope="module")
def children(app_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Three child processes on one store: one exits with a connection open, one is killed
    holding one, one dies inside a write transaction."""
    directory = tmp_path_factory.mktemp("children")
    store = directory / "poolscope.db"
    exited = run_exiting_leak(directory, app_url, store)
    assert exited.returncode == 0, exited.stderr
    assert run_killed(directory, app_url, store) == -9
    assert run_dies_mid_batch(directory, app_url, store) == -9
    conn = analysis.open_store(store)
    yield SimpleNamespace(
        store=store,
        procs=analysis.processes(conn),
        co=analysis.checkouts(conn),
        leaks=analysis.leaks(conn),
        summary=analysis.summary(conn),
        summaries=[_both_summaries(conn, f) for f in SUMMARY_FILTERS],
    )
    conn.close()


SUMMARY_FILTERS = [
    Filters(),
    Filters(leak_after=0.05),
    Filters(leak_after=1000.0),
    Filters(pools=("mixed", "orders")),
    Filters(pools=("nope",)),
    Filters(processes=(1,)),
    Filters(processes=(2, 3), leak_after=0.2),
]
"""Filters without a time window: :func:`analysis.summary` takes its fast path with each."""


def _plain(summary: dict | None) -> dict | None:
    """NaN as None, so that two summaries compare with ``==``."""
    if summary is None:
        return None
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}


def _both_summaries(conn: sqlite3.Connection, filters: Filters) -> SimpleNamespace:
    """The fast summary (``None`` if it declined), the exact one from paired checkouts, and
    what :func:`analysis.summary` returned, for ``filters``."""
    return SimpleNamespace(
        filters=filters,
        fast=_plain(_summary._fast_summary(_load._load(conn, filters))),
        exact=_plain(_summary._summary_exact(_load._load(conn, filters))),
        public=_plain(analysis.summary(conn, filters)),
    )


def _generate(path: Path, events: int) -> None:
    """bench/report.py's synthetic store (8 processes × 3 pools, leaks of every class)."""
    spec = importlib.util.spec_from_file_location(
        "bench_report", Path(__file__).resolve().parents[1] / "bench" / "report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(path, events)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20,000-event generated store, with what the generator never writes added: a
    running process with open checkouts, leak_suspected/leak_cleared rows, a return whose
    checkout record was dropped, and a checkout without a wait."""
    store = tmp_path_factory.mktemp("generated") / "bench.db"
    _generate(store, 20_000)
    db = sqlite3.connect(store)
    with db:
        # Process 3 is alive: heartbeat now, no end; its open checkouts are open_now.
        db.execute(
            "UPDATE processes SET ended_at = NULL, end_reason = NULL, heartbeat_at = ?, "
            "host = 'elsewhere' WHERE id = 3",
            (time.time() + 3600,),
        )
        # Leak notices carry checkout ids: one for a returned checkout, one for an id
        # that has no checkout or return at all.
        db.execute(
            "INSERT INTO events (at, process_id, pool_id, kind, checkout_id, hold_s) "
            "SELECT at, process_id, pool_id, 'leak_suspected', checkout_id, 40.0 FROM events "
            "WHERE kind = 'checkin' AND pool_id = 1 ORDER BY id LIMIT 1"
        )
        db.execute(
            "INSERT INTO events (at, process_id, pool_id, kind, checkout_id, hold_s) "
            "VALUES (1700000001.0, 1, 2, 'leak_suspected', 99999999, 40.0)"
        )
        # The checkout of a gc_checkin, and of a long checkin, was dropped: orphan returns.
        for kind, extra in (("gc_checkin", ""), ("checkin", "AND r.hold_s > 30")):
            db.execute(
                "DELETE FROM events WHERE id = (SELECT o.id FROM events AS o JOIN events AS r "
                "ON r.process_id = o.process_id AND r.pool_id = o.pool_id "
                f"AND r.checkout_id = o.checkout_id WHERE o.kind = 'checkout' "
                f"AND r.kind = '{kind}' {extra} ORDER BY o.id LIMIT 1)"
            )
        db.execute(
            "UPDATE events SET wait_s = NULL WHERE id = "
            "(SELECT MAX(id) FROM events WHERE kind = 'checkout')"
        )
    db.close()
    return store


def by_fn(frame, column: str = "site"):
    return frame.assign(fn=frame[column].astype(str).map(fn))


def record_quick(
    store: Path, url: str, name: str, checkouts: int, **engine_kwargs
) -> sqlite3.Connection:
    """Record ``checkouts`` short checkouts on a new engine attached as ``name``, and open
    ``store`` for analysis."""
    engine = sa.create_engine(url, **engine_kwargs)
    monitor = instrument.attach(engine, store=store, name=name)
    for _ in range(checkouts):
        quick_query(engine)
    monitor.flush()
    engine.dispose()
    return analysis.open_store(store)


class TestCheckouts:
    def test_every_checkout_is_paired_with_how_it_ended(self, mixed: SimpleNamespace) -> None:
        """Each function's checkouts appear once, with checkin, gc_checkin or open."""
        co = by_fn(mixed.co)
        outcomes = {
            name: sorted(g["outcome"].astype(str)) for name, g in co.groupby("fn", sort=True)
        }
        assert outcomes == {
            "quick_query": ["checkin"] * mixed.work.quick,
            "hold_first": ["checkin"],
            "hold_second": ["checkin"],
            "forget_to_close": ["gc_checkin"],
            "keep_open_now": ["open"],
        }
        assert list(co.columns[: len(_model._CHECKOUT_COLUMNS)]) == _model._CHECKOUT_COLUMNS
        assert set(co.loc[co["fn"] == "hold_first", "thread"]) == {"holder-1"}
        assert set(co.loc[co["fn"] == "hold_second", "thread"]) == {"holder-2"}
        assert co["checkout_id"].is_unique
        assert (co["pool"] == "mixed").all()

    def test_hold_lies_within_what_the_workload_measured(self, mixed: SimpleNamespace) -> None:
        """A recorded hold is at least the time inside the with block and at most the time
        around it; returned_at is checked_out_at + hold_s."""
        co = by_fn(mixed.co)
        for name in ("hold_first", "hold_second"):
            row = co[co["fn"] == name].iloc[0]
            inner, outer = mixed.work.holds[name]
            assert inner <= row["hold_s"] <= outer
            assert row["returned_at"] == pytest.approx(row["checked_out_at"] + row["hold_s"])

    def test_open_checkout_is_held_until_now(self, mixed: SimpleNamespace) -> None:
        """An open checkout in a live process has no return and has been held at least as
        long as the workload slept after taking it."""
        row = by_fn(mixed.co).query("fn == 'keep_open_now'").iloc[0]
        assert np.isnan(row["returned_at"])
        assert row["hold_s"] >= LEAK_AFTER * 2

    def test_time_filters_keep_what_overlaps_the_window(self, mixed: SimpleNamespace) -> None:
        """until keeps checkouts taken by then; since keeps those still held then."""
        assert set(by_fn(mixed.before_timeout)["fn"]) == {"quick_query", "hold_first"}
        assert list(by_fn(mixed.after_all)["fn"]) == ["keep_open_now"]

    def test_processes_and_pools(self, mixed: SimpleNamespace) -> None:
        """The recording process is running; the pool has the size it was created with."""
        assert list(mixed.procs["state"]) == ["running"]
        pool = mixed.pools.iloc[0]
        assert (pool["name"], pool["pool_size"], pool["max_overflow"], pool["capacity"]) == (
            "mixed", 2, 0, 2,
        )  # fmt: skip
        assert pool["leak_after_s"] == LEAK_AFTER
        assert pool["timeout_s"] == POOL_TIMEOUT


class TestLeaks:
    def test_each_leak_is_classified_by_what_happened(self, mixed: SimpleNamespace) -> None:
        """held past leak_after: held_too_long (returned) or open_now (still open); left to
        the garbage collector: gc_reclaimed."""
        got = {
            (r.leak_class, fn(r.site), r.count, r.certainty, tuple(r.threads))
            for r in mixed.leaks.itertuples()
        }
        assert got == {
            ("gc_reclaimed", "forget_to_close", 1, "confirmed", ("MainThread",)),
            ("held_too_long", "hold_first", 1, "suspected", ("holder-1",)),
            ("held_too_long", "hold_second", 1, "suspected", ("holder-2",)),
            ("open_now", "keep_open_now", 1, "suspected", ("MainThread",)),
        }
        assert list(mixed.leaks["certainty"])[0] == "confirmed"  # most certain first

    def test_leak_numbers_come_from_the_checkouts(self, mixed: SimpleNamespace) -> None:
        """max_held_s and first/last seen are the leaked checkout's own hold and time."""
        co = by_fn(mixed.co).set_index("fn")
        assert len(mixed.leaks) == 4
        for r in mixed.leaks.itertuples():
            name = fn(r.site)
            if name == "keep_open_now":
                assert r.max_held_s >= LEAK_AFTER * 2
                continue
            assert r.max_held_s == pytest.approx(co.loc[name, "hold_s"])
            assert r.first_seen_at == r.last_seen_at == co.loc[name, "checked_out_at"]
            assert r.leak_after_s == LEAK_AFTER

    def test_stack_starts_at_the_site(self, mixed: SimpleNamespace) -> None:
        """The stack is innermost first: the site, then the function that called it
        (run_mixed, or the holder thread's run)."""
        assert len(mixed.leaks) == 4
        for r in mixed.leaks.itertuples():
            assert r.stack[0] == r.site
            caller = "run" if fn(r.site) in ("hold_first", "hold_second") else "run_mixed"
            assert fn(r.stack[1]) == caller, r.stack

    def test_leak_after_filter_overrides_the_pools(self, mixed: SimpleNamespace) -> None:
        """With leak_after=60 nothing was held too long; the GC leak stays."""
        assert list(mixed.leaks_60["leak_class"]) == ["gc_reclaimed"]

    def test_pool_filter(self, mixed: SimpleNamespace) -> None:
        """A pool name that is not in the store selects nothing."""
        assert mixed.leaks_other_pool.empty
        assert list(mixed.leaks_other_pool.columns) == _model._LEAK_COLUMNS

    def test_open_at_exit_is_never_returned(self, children: SimpleNamespace) -> None:
        """A connection still open when its process exited cleanly is never_returned."""
        leak = children.leaks.query("leak_class == 'never_returned'")
        assert [fn(s) for s in leak["site"]] == ["keep_until_exit"]
        assert list(leak["certainty"]) == ["confirmed"]
        exited = children.procs.query("state == 'exited'")
        assert list(leak["processes"].iloc[0]) == list(exited["id"])

    def test_open_at_a_kill_is_open_at_crash(self, children: SimpleNamespace) -> None:
        """A connection still open when its process was killed is open_at_crash (unknown),
        held until the process was last seen alive."""
        leak = children.leaks.query("leak_class == 'open_at_crash'")
        assert [fn(s) for s in leak["site"]] == ["hold_until_killed"]
        assert list(leak["certainty"]) == ["unknown"]
        proc = children.procs.set_index("id").loc[leak["processes"].iloc[0][0]]
        assert proc["state"] == "crashed"
        co = by_fn(children.co).query("fn == 'hold_until_killed'").iloc[0]
        assert co["hold_s"] == pytest.approx(proc["heartbeat_at"] - co["checked_out_at"])

    def test_only_those_two_leaked(self, children: SimpleNamespace) -> None:
        """Short checkouts never count as leaks; the writer that died mid-batch lost only
        its last batch (4 committed checkouts remain, all returned)."""
        assert sorted(children.leaks["leak_class"]) == ["never_returned", "open_at_crash"]
        counts = by_fn(children.co).groupby(["process_id", "fn"]).size().to_dict()
        ids = list(children.procs["id"])
        assert counts == {
            (ids[0], "quick_query"): 3,
            (ids[0], "keep_until_exit"): 1,
            (ids[1], "quick_query"): 2,
            (ids[1], "hold_until_killed"): 1,
            (ids[2], "quick_query"): 4,
        }
        assert list(children.procs["state"]) == ["exited", "crashed", "crashed"]
        s = children.summary
        assert (s["confirmed_leaks"], s["unknown_leaks"], s["suspected_leaks"]) == (1, 1, 0)


class TestTimeouts:
    def test_timeout_names_the_caller_and_its_holders(self, mixed: SimpleNamespace) -> None:
        """The one timeout is at wait_and_time_out; the holders are the two threads that
        held both connections, longest held first."""
        assert len(mixed.timeouts) == 1
        t = mixed.timeouts.iloc[0]
        assert fn(t["site"]) == "wait_and_time_out"
        assert (t["pool"], t["thread"], t["waiters"], t["in_use"]) == ("mixed", "MainThread", 1, 2)
        assert t["waited_s"] >= POOL_TIMEOUT
        assert [(fn(h["site"]), h["thread"]) for h in t["holders"]] == [
            ("hold_first", "holder-1"),
            ("hold_second", "holder-2"),
        ]

    def test_holder_times_come_from_the_checkout_intervals(self, mixed: SimpleNamespace) -> None:
        """held_s is the timeout's time minus the holder's checkout time, and no more than
        the holder's whole hold."""
        t = mixed.timeouts.iloc[0]
        co = mixed.co.set_index("checkout_id")
        assert len(t["holders"]) == 2
        for h in t["holders"]:
            row = co.loc[h["checkout_id"]]
            assert h["checked_out_at"] == row["checked_out_at"]
            assert h["held_s"] == pytest.approx(t["at"] - row["checked_out_at"], abs=1e-6)
            assert t["waited_s"] <= h["held_s"] <= row["hold_s"]

    def test_until_before_the_timeout_has_none(self, mixed: SimpleNamespace) -> None:
        assert mixed.timeouts_before.empty


class TestPercentiles:
    def test_waits_match_the_raw_events(self, mixed: SimpleNamespace) -> None:
        """Overall wait percentiles equal numpy's over every recorded checkout wait."""
        waits = [w for (w,) in query(mixed.store, "SELECT wait_s FROM events WHERE kind = "
                                     "'checkout'")]  # fmt: skip
        row = mixed.pct.iloc[0]
        assert row["count"] == len(waits) == len(mixed.co)
        expected = np.percentile(waits, [50, 95, 99])
        assert [row["wait_p50_s"], row["wait_p95_s"], row["wait_p99_s"]] == pytest.approx(expected)
        assert row["wait_max_s"] == pytest.approx(max(waits))

    def test_site_holds_match_the_raw_returns(self, mixed: SimpleNamespace) -> None:
        """Per-site hold percentiles equal numpy's over that site's recorded returns."""
        holds = [
            h
            for (h,) in query(
                mixed.store,
                "SELECT e.hold_s FROM events e JOIN stacks s ON s.id = e.stack_id "
                "WHERE e.kind = 'checkin' AND s.site LIKE '% in quick_query'",
            )
        ]
        row = by_fn(mixed.pct_site).set_index("fn").loc["quick_query"]
        assert row["count"] == len(holds) == mixed.work.quick
        assert [row["hold_p50_s"], row["hold_p95_s"], row["hold_p99_s"], row["hold_max_s"]] == (
            pytest.approx([*np.percentile(holds, [50, 95, 99]), max(holds)])
        )

    def test_per_pool_and_overall_agree(self, mixed: SimpleNamespace) -> None:
        """One pool: its row has the overall count and waits."""
        pool = mixed.pct_pool.set_index("pool").loc["mixed"]
        assert pool["count"] == mixed.pct["count"].iloc[0]
        assert pool["wait_p95_s"] == pytest.approx(mixed.pct["wait_p95_s"].iloc[0])
        assert set(mixed.pct_site.columns) == {"site", *_model._PERCENTILE_COLUMNS}


class TestSites:
    def test_site_statistics(self, mixed: SimpleNamespace) -> None:
        """Per site: checkouts, open and leaked counts, and its share of the pool's time."""
        sites = by_fn(mixed.sites).set_index("fn")
        co = by_fn(mixed.co)
        assert sites["checkouts"].to_dict() == co.groupby("fn").size().to_dict()
        assert sites.loc["keep_open_now", "open"] == 1
        assert sites.loc["quick_query", "leaks"] == 0
        assert sites.loc["forget_to_close", "leaks"] == 1
        assert sites["pool_time_share"].sum() == pytest.approx(1.0)
        total = sites["total_hold_s"].sum()
        first = sites.loc["hold_first"]
        assert first["pool_time_share"] == pytest.approx(first["total_hold_s"] / total)
        assert first["hold_max_s"] == pytest.approx(
            co.query("fn == 'hold_first'")["hold_s"].iloc[0]
        )
        assert first["stack"][0] == first["site"]


class TestUtilization:
    def test_counts_over_time(self, mixed: SimpleNamespace) -> None:
        """The pool is full (2 of 2) in the bucket of the timeout, 1 in use at the end."""
        util = mixed.util
        assert list(util.columns[:8]) == _model._UTILIZATION_COLUMNS[:8]
        assert (util["capacity"] == 2).all() and (util["pool_size"] == 2).all()
        assert util["in_use"].max() == 2
        at = mixed.timeouts["at"].iloc[0]
        bucket = util[(util["at"] <= at) & (at < util["at"] + 0.05)]
        assert list(bucket["in_use"]) == [2]
        assert util["in_use"].iloc[-1] == 1
        assert np.allclose(np.diff(util["at"]), 0.05)

    def test_automatic_interval_gives_a_few_hundred_points(self, mixed: SimpleNamespace) -> None:
        assert 2 <= len(mixed.util_auto) <= 301
        assert mixed.util_auto["in_use"].max() == 2


class TestSizing:
    def test_advice_states_the_numbers_it_came_from(self, mixed: SimpleNamespace) -> None:
        """A timeout with 2 of 2 in use and 1 waiting: capacity 3 would have served everyone;
        the Little's-law numbers are consistent with the checkouts."""
        [advice] = mixed.sizing
        assert advice["pool"] == "mixed"
        assert advice["verdict"] == "too_small"
        assert (advice["peak_in_use"], advice["timeouts"], advice["peak_demand"]) == (2, 1, 3)
        assert (advice["pool_size"], advice["max_overflow"], advice["capacity"]) == (2, 0, 2)
        assert advice["recommended_pool_size"] + advice["recommended_max_overflow"] == 3
        assert advice["checkouts"] == len(mixed.co)
        assert advice["arrival_rate_per_s"] == pytest.approx(
            advice["checkouts"] / advice["observed_s"]
        )
        [pinned] = mixed.pinned_sizing
        assert pinned["mean_hold_s"] == pytest.approx(mixed.pinned_co["hold_s"].mean())
        assert advice["mean_in_use"] == pytest.approx(
            advice["arrival_rate_per_s"] * advice["mean_hold_s"]
        )
        assert advice["confirmed_leaks"] == 1
        for text in ("peak 2 in use with 1 waiting", "1 timed out", "capacity 3",
                     "pool_size=2, max_overflow=0 (capacity 2)", "Little's law",
                     f"{advice['arrival_rate_per_s']:.2f} checkouts/s"):  # fmt: skip
            assert text in advice["advice"]

    def test_a_pool_without_pressure_is_left_alone(self, tmp_path: Path, sqlite_url: str) -> None:
        """No waits, no timeouts: verdict ok, and the replay's advice is no larger than the
        one connection these one-at-a-time checkouts used."""
        conn = record_quick(tmp_path / "calm.db", sqlite_url, "calm", 5,
                            poolclass=sa.pool.QueuePool, pool_size=4, max_overflow=6)  # fmt: skip
        [advice] = analysis.sizing_advice(conn)
        assert advice["verdict"] == "ok"
        assert (advice["recommended_pool_size"], advice["recommended_max_overflow"]) == (1, 0)
        assert advice["replay"]["current"]["timeouts"] == 0
        assert "no waits or timeouts" in advice["advice"]
        assert "(peak 1 of 10)" in advice["advice"]


class TestSummary:
    def test_headline_numbers(self, mixed: SimpleNamespace) -> None:
        s = mixed.summary
        assert {k: s[k] for k in (
            "processes", "pools", "checkouts", "open_checkouts", "peak_in_use", "capacity",
            "timeouts", "confirmed_leaks", "suspected_leaks", "unknown_leaks", "dropped",
        )} == {
            "processes": 1, "pools": 1, "checkouts": mixed.work.quick + 4, "open_checkouts": 1,
            "peak_in_use": 2, "capacity": 2, "timeouts": 1, "confirmed_leaks": 1,
            "suspected_leaks": 3, "unknown_leaks": 0, "dropped": 0,
        }  # fmt: skip
        assert s["events"] == mixed.events

    def test_fast_summary_equals_pairing_every_checkout(
        self, mixed: SimpleNamespace, children: SimpleNamespace
    ) -> None:
        """Without a time window the summary is counted from per-pool aggregates; it is the
        same as the one computed from every paired checkout, filtered or not."""
        for both in [*mixed.summaries, *children.summaries]:
            assert both.fast is not None, both.filters
            assert both.fast == both.exact, both.filters
            assert both.public == both.exact, both.filters
        assert mixed.summaries[0].fast["suspected_leaks"] == 3  # open_now of a live process
        assert children.summaries[0].fast["unknown_leaks"] == 1

    def test_fast_summary_on_a_generated_store(self, generated: Path) -> None:
        """On bench/report.py's store (with a live process, leak notices, orphan returns and
        a NULL wait added) the fast summary equals the exact one under every filter."""
        conn = analysis.open_store(generated)
        filters = [*SUMMARY_FILTERS, Filters(pools=("orders",), leak_after=0.5),
                   Filters(processes=(3,)), Filters(processes=(3, 8), leak_after=10.0)]  # fmt: skip
        for f in filters:
            both = _both_summaries(conn, f)
            assert both.fast is not None, f
            assert both.fast == both.exact == both.public, f
        s = _both_summaries(conn, Filters()).fast
        assert s["events"] > 19_000
        assert s["confirmed_leaks"] and s["suspected_leaks"] and s["unknown_leaks"]
        assert s["open_checkouts"] > s["unknown_leaks"]  # some open in the live process
        conn.close()

    def test_time_windows_pair_every_checkout(self, generated: Path) -> None:
        """since/until cut checkouts from their returns: the fast path declines and
        summary() pairs checkouts as before."""
        conn = analysis.open_store(generated)
        first, last = conn.execute("SELECT MIN(at), MAX(at) FROM events").fetchone()
        middle = (first + last) / 2
        for f in (Filters(since=middle), Filters(until=middle), Filters(since=first, until=last)):
            both = _both_summaries(conn, f)
            assert both.fast is None
            assert both.public == both.exact
        conn.close()

    def test_a_store_without_stacks_still_analyses(self, generated: Path, tmp_path: Path) -> None:
        """With the stacks table empty every checkout and timeout has the unknown site and
        no stack, without a pandas warning, and the summary is the same as with stacks."""
        bare = tmp_path / "bare.db"
        bare.write_bytes(generated.read_bytes())
        db = sqlite3.connect(bare)
        with db:
            db.execute("DELETE FROM stacks")
        db.close()
        conn = analysis.open_store(bare)
        with warnings.catch_warnings():
            # Every warning, not only Pandas4Warning (which pandas before 3.0 does not have).
            warnings.simplefilter("error")
            co = analysis.checkouts(conn, Filters(pools=("orders",)))
            to = analysis.timeouts(conn)
            report = analysis.build_report(conn)
        assert len(co) > 1000
        assert set(co["site"].astype(str)) == {"<unknown>"}
        assert set(co["fingerprint"].astype(str)) == {""}
        assert len(to) == 120
        assert set(to["site"]) == {"<unknown>"} and set(to["fingerprint"]) == {""}
        assert all(stack == [] for stack in to["stack"])
        assert {leak["site"] for leak in report["leaks"]} == {"<unknown>"}
        both = _both_summaries(conn, Filters())
        assert both.fast == both.exact
        with_stacks = analysis.open_store(generated)
        assert _plain(analysis.summary(with_stacks)) == both.exact
        with_stacks.close()
        conn.close()

    def test_parse_time(self) -> None:
        """Unix seconds or ISO 8601; without an offset, UTC."""
        assert analysis.parse_time("1764246000.5") == 1764246000.5
        assert analysis.parse_time("2025-11-27T12:20:00Z") == 1764246000.0
        assert analysis.parse_time("2025-11-27 12:20:00") == 1764246000.0
        assert analysis.parse_time("2025-11-27T13:20:00+01:00") == 1764246000.0
        with pytest.raises(ValueError, match="cannot read 'yesterday' as a time"):
            analysis.parse_time("yesterday")

    def test_filters_are_checked(self) -> None:
        with pytest.raises(ValueError, match="leak_after must be more than 0 seconds"):
            Filters(leak_after=0)
        with pytest.raises(ValueError, match="since must not be later than until"):
            Filters(since=2, until=1)


class TestOtherPools:
    def test_async_timeout_names_tasks(self, tmp_path: Path) -> None:
        """On an AsyncEngine the caller that timed out and its holder carry their task names."""
        from sqlalchemy.ext.asyncio import create_async_engine

        store = tmp_path / "async.db"

        async def main() -> None:
            engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", pool_size=1,
                                         max_overflow=0, pool_timeout=0.2)  # fmt: skip
            monitor = instrument.attach(engine, store=store, name="async")
            held = asyncio.Event()
            done = asyncio.Event()

            async def hold_in_task() -> None:
                async with engine.connect() as conn:
                    await conn.exec_driver_sql("select 1")
                    held.set()
                    await done.wait()

            async def time_out_in_task() -> None:
                await held.wait()
                try:
                    with pytest.raises(sa.exc.TimeoutError):
                        async with engine.connect():
                            pass
                finally:  # a caller that got a connection must not leave the holder hanging
                    done.set()

            await asyncio.gather(
                asyncio.create_task(hold_in_task(), name="holder-task"),
                asyncio.create_task(time_out_in_task(), name="waiter-task"),
            )
            monitor.flush()
            await engine.dispose()

        asyncio.run(main())
        conn = analysis.open_store(store)
        [t] = analysis.timeouts(conn).to_dict("records")
        assert (fn(t["site"]), t["task"]) == ("time_out_in_task", "waiter-task")
        assert [(fn(h["site"]), h["task"]) for h in t["holders"]] == [
            ("hold_in_task", "holder-task")
        ]
        co = analysis.checkouts(conn)
        assert list(co["task"]) == ["holder-task"]

    def test_pools_without_a_size_are_not_sized(self, tmp_path: Path, sqlite_url: str) -> None:
        """NullPool has no size: no capacity, verdict unbounded, and the advice says so."""
        conn = record_quick(tmp_path / "null.db", sqlite_url, "null", 3, poolclass=sa.pool.NullPool)
        assert analysis.pools(conn)["capacity"].isna().all()
        [advice] = analysis.sizing_advice(conn)
        assert (advice["verdict"], advice["capacity"], advice["checkouts"]) == (
            "unbounded",
            None,
            3,
        )
        assert "no size limit" in advice["advice"]
        assert analysis.summary(conn)["capacity"] is None
