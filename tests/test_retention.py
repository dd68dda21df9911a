"""Rollups, retention and the size cap, through the real writer on real store files.

The workloads are records queued on an attached monitor's writer (as the listeners queue
them), dated an hour ago, so that retention has something to prune without waiting: the
writer, its rollups and its pruning are the real ones.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import query

import instrument
from instrument import _histogram, _retention, _store, _writer, analysis

LEAK_AFTER = 30.0


def _attach(tmp_path: Path, store: Path, **kwargs):  # type: ignore[no-untyped-def]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    monitor = instrument.attach(engine, store=store, leak_after=LEAK_AFTER, name="app", **kwargs)
    monitor.flush()
    return engine, monitor


def _record(monitor, at, kind, cid, *, stack, in_use=1, waiters=0, wait=None, hold=None,
            count=None):  # type: ignore[no-untyped-def]  # fmt: skip
    null = _writer.NULL
    return (
        at, monitor.pool_key, kind, 1, cid if cid is not None else null, "worker-1", null,
        in_use, 1, 0, waiters, stack, null if wait is None else wait, null,
        null if hold is None else hold, null if count is None else count,
    )  # fmt: skip


def _leaky_site(writer) -> int:  # type: ignore[no-untyped-def]
    """A stack id of another call site than the ordinary checkouts'."""
    return writer.stacks.capture()


class Workload:
    """An hour-old history of ordinary checkouts with notable ones sprinkled in."""

    def __init__(self, monitor, t0: float) -> None:  # type: ignore[no-untyped-def]
        w = monitor._writer
        self.ordinary = w.stacks.capture()
        self.leaky = _leaky_site(w)
        rng = np.random.default_rng(7)
        recs = []
        self.holds: list[float] = []
        self.waits: list[float] = []
        for i in range(3000):
            cid = i + 1
            at = t0 + i * 0.1
            hold = float(rng.lognormal(-4, 1))
            wait = float(rng.lognormal(-7, 1))
            self.holds.append(hold)
            self.waits.append(wait)
            recs.append(_record(monitor, at, "checkout", cid, stack=self.ordinary, wait=wait))
            recs.append(_record(monitor, at + hold, "checkin", cid, stack=self.ordinary,
                                in_use=0, hold=hold))  # fmt: skip
        s = self.leaky
        # Leak by the garbage collector, one never returned, one held past leak_after.
        recs += [
            _record(monitor, t0 + 10, "checkout", 10_001, stack=s),
            _record(monitor, t0 + 50, "gc_checkin", 10_001, stack=s, hold=40.0),
            _record(monitor, t0 + 20, "checkout", 10_002, stack=s),
            _record(monitor, t0 + 20 + LEAK_AFTER + 0.5, "leak_suspected", 10_002, stack=s,
                    hold=LEAK_AFTER + 0.5),
            _record(monitor, t0 + 30, "checkout", 10_003, stack=s),
            _record(monitor, t0 + 30 + LEAK_AFTER + 0.5, "leak_suspected", 10_003, stack=s,
                    hold=LEAK_AFTER + 0.5),
            _record(monitor, t0 + 75, "leak_cleared", 10_003, stack=s, hold=45.0),
            _record(monitor, t0 + 75, "checkin", 10_003, stack=s, hold=45.0),
            # A timeout while two checkouts held the pool.
            _record(monitor, t0 + 99.5, "checkout", 10_004, stack=s, in_use=2),
            _record(monitor, t0 + 99.6, "checkout", 10_005, stack=s, in_use=3),
            _record(monitor, t0 + 100, "timeout", None, stack=s, in_use=3, waiters=1,
                    wait=0.3, count=1),
            _record(monitor, t0 + 100.5, "checkin", 10_004, stack=s, in_use=2, hold=1.0),
            _record(monitor, t0 + 100.6, "checkin", 10_005, stack=s, in_use=1, hold=1.0),
            _record(monitor, t0 + 120, "invalidate", None, stack=None, count=1),
        ]  # fmt: skip
        recs.sort(key=lambda r: r[0])
        self.records = recs
        self.notable_checkouts = {10_001, 10_002, 10_003, 10_004, 10_005}
        self.checkouts = 3005
        self.returns = 3004  # 3000 + gc_checkin + 3 checkins (10_002 never returned)

    def emit(self, monitor) -> None:  # type: ignore[no-untyped-def]
        for r in self.records:
            monitor._writer.emit(r)
        # Twice: the first batch writes and rolls up, the second prunes what is due.
        monitor.flush()
        monitor.flush()


def _finish(engine, monitor) -> None:  # type: ignore[no-untyped-def]
    monitor.detach()
    engine.dispose()
    _writer.shutdown_all(timeout=10.0)


def test_rollups_equal_what_the_raw_events_say(recorder_impl: str, tmp_path: Path) -> None:
    """Counts, sums and maxima of the rollups equal the raw events'; their quantiles are
    within 1 % of the raw ones."""
    store = tmp_path / "all.db"
    engine, monitor = _attach(tmp_path, store, keep_raw=math.inf)
    work = Workload(monitor, instrument._clock.REAL.wall() - 3600)
    work.emit(monitor)
    _finish(engine, monitor)
    raw = dict(query(store, "SELECT kind, count(*) FROM events GROUP BY kind"))
    (checkouts, returns, gc, timeouts, leaks, hold_sum, hold_max, wait_sum, wait_max), = query(
        store,
        "SELECT sum(checkouts), sum(returns), sum(gc_returned), sum(timeouts), sum(leaks), "
        "sum(hold_sum_s), max(hold_max_s), sum(wait_sum_s), max(wait_max_s) FROM rollups",
    )  # fmt: skip
    assert checkouts == raw["checkout"] == work.checkouts + 1 - 1  # the engine made none
    assert returns == raw["checkin"] + raw["gc_checkin"] == work.returns
    assert (gc, timeouts, leaks) == (1, 1, 2)
    (raw_hold_sum, raw_hold_max), = query(
        store, "SELECT sum(hold_s), max(hold_s) FROM events WHERE kind IN ('checkin', 'gc_checkin')"
    )  # fmt: skip
    assert hold_sum == pytest.approx(raw_hold_sum, rel=1e-9)
    assert hold_max == raw_hold_max
    (raw_wait_sum, raw_wait_max), = query(
        store, "SELECT sum(wait_s), max(wait_s) FROM events WHERE kind = 'checkout'"
    )  # fmt: skip
    assert wait_sum == pytest.approx(raw_wait_sum, rel=1e-9)
    assert wait_max == raw_wait_max
    blobs = query(store, "SELECT hold_hist, wait_hist FROM rollups")
    holds = _histogram.merge([b[0] for b in blobs])
    waits = _histogram.merge([b[1] for b in blobs])
    hold_sql = "SELECT hold_s FROM events WHERE kind IN ('checkin', 'gc_checkin')"
    wait_sql = "SELECT wait_s FROM events WHERE kind = 'checkout' AND wait_s IS NOT NULL"
    raw_holds = np.sort([r[0] for r in query(store, hold_sql)])
    raw_waits = np.sort([r[0] for r in query(store, wait_sql)])
    for q in (0.5, 0.95, 0.99, 1.0):
        for h, values in ((holds, raw_holds), (waits, raw_waits)):
            sample = values[max(1, math.ceil(q * values.size)) - 1]
            assert _histogram.quantile(*h, q) == pytest.approx(sample, rel=0.01)
    (peak, in_use_s, invalidations, disconnects), = query(
        store, "SELECT max(peak_in_use), sum(in_use_s), sum(invalidations), sum(disconnects) "
        "FROM pool_rollups"
    )  # fmt: skip
    assert peak == 3 and invalidations == disconnects == 1
    assert in_use_s > 0


def _findings(store: Path) -> tuple[list, list]:  # type: ignore[type-arg]
    conn = analysis.open_store(store)
    try:
        lk = analysis.leaks(conn)
        to = analysis.timeouts(conn)
    finally:
        conn.close()
    leaks = sorted(zip(lk["leak_class"], lk["site"], lk["count"], strict=True))
    timeouts = [
        (round(at, 3), sorted((h["checkout_id"], round(h["held_s"], 3)) for h in holders))
        for at, holders in zip(to["at"], to["holders"], strict=True)
    ]
    return leaks, timeouts


def test_retention_keeps_leaks_timeout_holders_and_long_holds(
    recorder_impl: str, tmp_path: Path
) -> None:
    """Raw events past keep_raw are pruned once rolled up, but not those of a leak (any
    class), a timeout's holders or a hold past leak_after: leaks and timeouts found are
    those of the same workload kept whole."""
    t0 = instrument._clock.REAL.wall() - 3600
    found = {}
    for name, keep in (("whole", math.inf), ("pruned", 60.0)):
        store = tmp_path / f"{name}.db"
        engine, monitor = _attach(tmp_path, store, keep_raw=keep)
        Workload(monitor, t0).emit(monitor)
        _finish(engine, monitor)
        found[name] = store
    pruned = found["pruned"]
    old_sql = "SELECT kind, checkout_id FROM events WHERE at < ?"
    kept = set(query(pruned, old_sql, t0 + 3000))
    # An ordinary checkout may hold the pool at the timeout too: kept as its holder.
    holders = {cid for _, hs in _findings(found["whole"])[1] for cid, _ in hs}
    ordinary = {cid for kind, cid in kept if cid is not None and cid < 10_000}
    assert ordinary <= holders
    assert ordinary == {cid for cid in holders if cid < 10_000}
    for cid in (10_001, 10_002, 10_003, 10_004, 10_005):
        assert ("checkout", cid) in kept
    assert {("gc_checkin", 10_001), ("checkin", 10_003), ("checkin", 10_004),
            ("checkin", 10_005), ("timeout", None), ("invalidate", None)} <= kept  # fmt: skip
    reasons = dict(query(pruned, "SELECT checkout_id, reason FROM notable"))
    assert reasons[10_004] == reasons[10_005] == "timeout_holder"
    assert reasons[10_001] == "leak"
    # The rollups still count every checkout; raw events are complete from raw_since on.
    for store in found.values():
        assert query(store, "SELECT sum(checkouts) FROM rollups") == [(3005,)]
    since_sql = "SELECT CAST(value AS REAL) FROM meta WHERE key = 'raw_since'"
    (raw_since,), = query(pruned, since_sql)  # fmt: skip
    assert t0 + 300 < raw_since < instrument._clock.REAL.wall()
    assert query(found["whole"], "SELECT count(*) FROM meta WHERE key = 'raw_since'") == [(0,)]
    assert _findings(pruned) == _findings(found["whole"])
    leaks, timeouts = _findings(pruned)
    assert {c for c, _, _ in leaks} >= {"gc_reclaimed", "held_too_long"}
    assert {(10_004, 0.5), (10_005, 0.4)} <= set(timeouts[0][1])


def test_notable_rows_past_the_cap_are_counted_and_the_report_says_so(
    tmp_path: Path, monkeypatch
) -> None:
    """Past its cap of notable rows a writer keeps the first ones, counts the rest, and the
    report says how many (source.notable_dropped, a warning in the text report); a store
    that kept every one says 0 and warns of nothing."""
    reports = {}
    for name, cap in (("capped", 2), ("whole", _retention.MAX_NOTABLE)):
        monkeypatch.setattr(_retention, "MAX_NOTABLE", cap)
        store = tmp_path / f"{name}.db"
        engine, monitor = _attach(tmp_path, store)
        Workload(monitor, instrument._clock.REAL.wall() - 3600).emit(monitor)
        _finish(engine, monitor)
        reports[name] = (
            _poolscope("report", str(store), "--format", "json").stdout,
            _poolscope("report", str(store)).stdout,
        )
    (capped_json, capped_text), (whole_json, whole_text) = reports["capped"], reports["whole"]
    sql = "SELECT notable_dropped FROM retention"
    (dropped,), = query(tmp_path / "capped.db", sql)  # fmt: skip
    assert dropped > 0
    assert json.loads(capped_json)["source"]["notable_dropped"] == dropped
    assert f"warning: {dropped} notable records not kept" in " ".join(capped_text.split())
    assert json.loads(whole_json)["source"]["notable_dropped"] == 0
    assert "notable record" not in whole_text


def test_store_at_its_size_cap_keeps_recording_rollups(
    recorder_impl: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """A store at max_store_mb stops taking raw events but keeps rolling them up, says so
    once (logger poolscope), and the application is not affected."""
    monkeypatch.setattr(_retention, "SIZE_CHECK_S", 0.0)
    store = tmp_path / "capped.db"
    engine, monitor = _attach(tmp_path, store, max_store_mb=16)
    sid = monitor._writer.stacks.capture()
    now = instrument._clock.REAL.wall()
    caplog.set_level(logging.WARNING, logger="poolscope")
    n = 0
    for _batch in range(12):  # about 24 MB of raw events, in batches
        for _ in range(20_000):
            n += 1
            monitor._writer.emit(_record(monitor, now, "checkout", n, stack=sid, wait=0.001))
            monitor._writer.emit(_record(monitor, now, "checkin", n, stack=sid, hold=0.002))
        monitor.flush()
    _finish(engine, monitor)
    assert query(store, "SELECT sum(checkouts), sum(returns) FROM rollups") == [(n, n)]
    (skipped,), = query(store, "SELECT raw_skipped FROM retention")  # fmt: skip
    stored = query(store, "SELECT count(*) FROM events WHERE kind = 'checkout'")[0][0]
    assert skipped > 0 and stored < n
    assert stored + skipped // 2 == n
    warnings = [r for r in caplog.records if "max_store_mb" in r.getMessage()]
    assert len(warnings) == 1
    assert monitor.dropped == 0
    assert store.stat().st_size < 20 * (1 << 20)


def test_keep_raw_and_max_store_mb_are_checked_at_attach(tmp_path: Path, monkeypatch) -> None:
    """A bad setting is a one-sentence ValueError at attach, from the argument or the
    environment."""
    engine = sa.create_engine("sqlite://")
    store = tmp_path / "s.db"
    for kwargs, message in (
        ({"keep_raw": 10}, "keep_raw must be at least 60 seconds, not 10."),
        ({"keep_raw": "1h"}, "keep_raw must be a number of seconds, not '1h'."),
        ({"max_store_mb": 0}, "max_store_mb must be at least 16 megabytes, not 0."),
    ):
        with pytest.raises(ValueError) as info:
            instrument.attach(engine, store=store, **kwargs)
        assert str(info.value) == message
    monkeypatch.setenv("POOLSCOPE_MAX_STORE_MB", "lots")
    with pytest.raises(ValueError, match=r"^\$POOLSCOPE_MAX_STORE_MB must be a number"):
        instrument.attach(engine, store=store)
    assert not store.exists()


def _first_release_store(tmp_path: Path, t0: float) -> Path:
    """A store as the first release wrote it: the workload's raw events, no rollups."""
    store = tmp_path / "v1.db"
    engine, monitor = _attach(tmp_path, store, keep_raw=math.inf)
    Workload(monitor, t0).emit(monitor)
    _finish(engine, monitor)
    conn = sqlite3.connect(str(store))
    with conn:
        for table in ("rollups", "pool_rollups", "notable", "retention"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    return store


def _poolscope(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instrument", *args], capture_output=True, text=True, timeout=120
    )


def test_compact_rolls_up_and_prunes_a_first_release_store(tmp_path: Path) -> None:
    """compact on a version 1 store: rollups that count what the raw events did, exactly;
    raw events pruned but the notable ones; the same leaks and timeouts found."""
    t0 = instrument._clock.REAL.wall() - 7200
    store = _first_release_store(tmp_path, t0)
    before = _findings(store)
    conn = analysis.open_store(store)
    counts = analysis.summary(conn)
    conn.close()
    # Rolled up, nothing pruned: the report reads the same.
    kept = _poolscope("compact", str(store), "--keep-raw", "inf")
    assert kept.returncode == 0, kept.stderr
    assert "rolled up 6," in kept.stderr and "pruned 0 raw events" in kept.stderr
    conn = analysis.open_store(store)
    assert analysis.summary(conn) == counts
    conn.close()
    assert _findings(store) == before
    # Then pruned past a minute before the last event.
    result = _poolscope("compact", str(store), "--keep-raw", "60")
    assert result.returncode == 0, result.stderr
    assert "rolled up 0 events" in result.stderr and "vacuumed" in result.stderr
    assert query(store, "SELECT value FROM meta WHERE key = 'schema_version'") == [("2",)]
    assert query(store, "SELECT sum(checkouts), sum(timeouts), sum(gc_returned) FROM rollups") == [
        (counts["checkouts"], counts["timeouts"], 1)
    ]
    # --keep-raw counts back from the store's last event: its last minute is kept whole.
    (last,), = query(store, "SELECT max(at) FROM events")  # fmt: skip
    old = "SELECT count(*) FROM events WHERE checkout_id < 10000 AND at < ?"
    holders = {cid for _, hs in before[1] for cid, _ in hs}
    assert query(store, old, last - 61)[0][0] == len([c for c in holders if c < 10_000]) * 2
    assert query(store, "SELECT count(*) FROM events WHERE at >= ?", last - 59)[0][0] > 1000
    assert _findings(store) == before
    # Again: nothing left to roll up, nothing more to prune.
    again = _poolscope("compact", str(store), "--keep-raw", "60")
    assert again.returncode == 0 and "rolled up 0 events" in again.stderr
    assert query(store, "SELECT sum(checkouts) FROM rollups") == [(counts["checkouts"],)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compact", "{missing}"], "poolscope: no store at"),
        (["compact", "{store}", "--keep-raw", "soon"], "--keep-raw must be a number of seconds"),
        (["compact", "{store}", "--keep-raw", "5"], "--keep-raw must be at least 60 seconds"),
        (["compact", "{foreign}"], "not a poolscope store"),
    ],
)
def test_compact_bad_input_is_one_line_and_exit_2(tmp_path: Path, args, message) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "s.db"
    _store.connect_for_writing(store).close()
    foreign = tmp_path / "other.db"
    sqlite3.connect(str(foreign)).execute("CREATE TABLE t (x)").connection.close()
    paths = {"missing": tmp_path / "nope.db", "store": store, "foreign": foreign}
    result = _poolscope(*[a.format(**paths) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


OTHER_WRITER = """
import math, sys, time
import sqlalchemy as sa
import instrument
from instrument import _writer
store, app = sys.argv[1], sys.argv[2]
engine = sa.create_engine(f"sqlite:///{app}")
monitor = instrument.attach(engine, store=store, name="other", keep_raw=math.inf)
monitor.flush()
sid = monitor._writer.stacks.capture()
t0 = time.time() - 3600
null = _writer.NULL
for i in range(2000):
    monitor._writer.emit((t0 + i * 0.1, monitor.pool_key, "checkout", 1, i + 1, "w", null, 1, 0,
                          0, 0, sid, 0.001, null, null, null))
    monitor._writer.emit((t0 + i * 0.1 + 0.01, monitor.pool_key, "checkin", 1, i + 1, "w", null,
                          0, 1, 0, 0, sid, null, null, 0.01, null))
monitor.flush()
monitor.flush()
"""


def test_a_writer_prunes_only_its_own_process_rows(tmp_path: Path) -> None:
    """Two processes on one store: the one with keep_raw=60 prunes its own old events
    only; the other's (kept whole) and both processes' rollups stay complete."""
    store = tmp_path / "shared.db"
    done = subprocess.run(
        [sys.executable, "-c", OTHER_WRITER, str(store), str(tmp_path / "other.db")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    engine, monitor = _attach(tmp_path, store, keep_raw=60.0)
    Workload(monitor, instrument._clock.REAL.wall() - 3600).emit(monitor)
    _finish(engine, monitor)
    per_process = dict(
        query(store, "SELECT process_id, count(*) FROM events WHERE kind = 'checkout' GROUP BY 1")
    )
    other, ours = sorted(per_process)
    assert per_process[other] == 2000
    assert per_process[ours] < 100
    assert dict(query(store, "SELECT process_id, sum(checkouts) FROM rollups GROUP BY 1")) == {
        other: 2000,
        ours: 3005,
    }
    assert query(store, "SELECT process_id FROM retention WHERE pruned > 0") == [(ours,)]


BUSY_WRITER = """
import sys, time
import sqlalchemy as sa
import instrument
store, app = sys.argv[1], sys.argv[2]
engine = sa.create_engine(f"sqlite:///{app}")
monitor = instrument.attach(engine, store=store, name="busy")
print("ready", flush=True)
end = time.time() + float(sys.argv[3])
while time.time() < end:
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
monitor.flush()
print("dropped", monitor.dropped, flush=True)
"""


def test_compact_while_a_process_writes_the_store(tmp_path: Path) -> None:
    """compact on a store a process is writing: both finish, the writer drops nothing, and
    the file is not vacuumed under it."""
    store = _first_release_store(tmp_path, instrument._clock.REAL.wall() - 7200)
    writer = subprocess.Popen(
        [sys.executable, "-c", BUSY_WRITER, str(store), str(tmp_path / "busy.db"), "4"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    result = _poolscope("compact", str(store), "--keep-raw", "60")
    out, _ = writer.communicate(timeout=60)
    assert result.returncode == 0, result.stderr
    # Writing: the busy process, and the first-release one (its heartbeat is seconds old).
    assert "not vacuumed (2 process(es) writing it" in result.stderr
    assert writer.returncode == 0 and out.strip() == "dropped 0"
    # The writer's own rows are rolled up by the writer, the first release's by compact.
    (rolled,) = query(store, "SELECT count(DISTINCT process_id) FROM rollups")[0]
    assert rolled == 2


LATE = 90_001
"""A checkout whose return comes in a later batch than it (see :func:`emit_late_return`)."""

UNRETURNED_SQL = (
    "SELECT c.checkout_id FROM {events} AS c WHERE c.kind = 'checkout' AND NOT EXISTS "
    "(SELECT 1 FROM {events} AS r WHERE r.process_id = c.process_id AND r.pool_id = c.pool_id "
    "AND r.checkout_id = c.checkout_id AND r.kind IN ('checkin', 'gc_checkin', 'detach', "
    "'unwatched')) ORDER BY 1"
)
"""The stored checkouts without a stored return (``{events}``: the events table's name)."""


def emit_late_return(monitor, t0: float) -> int:  # type: ignore[no-untyped-def]
    """A backlog of hour-old records in two parts, each flushed twice (written, then
    pruned): ordinary checkouts and their returns, and checkout :data:`LATE` whose return
    (a short hold: not notable) is in the second part only. Return the checkouts emitted."""
    sid = monitor._writer.stacks.capture()
    n = 0
    for part in range(2):
        for i in range(200):
            n += 1
            at = t0 + part * 30 + i * 0.1
            monitor._writer.emit(_record(monitor, at, "checkout", n, stack=sid, wait=0.001))
            monitor._writer.emit(_record(monitor, at + 0.01, "checkin", n, stack=sid,
                                         in_use=0, hold=0.01))  # fmt: skip
        if part == 0:
            monitor._writer.emit(_record(monitor, t0 + 5, "checkout", LATE, stack=sid))
        else:
            monitor._writer.emit(_record(monitor, t0 + 45, "checkin", LATE, stack=sid,
                                         in_use=0, hold=40.0 - LEAK_AFTER))  # fmt: skip
        monitor.flush()
        monitor.flush()
    return n + 1


def test_a_checkout_returned_in_a_later_batch_is_pruned_with_its_return(
    recorder_impl: str, tmp_path: Path
) -> None:
    """A checkout already past keep_raw when written, whose return comes in a later batch:
    the first prune keeps it (it is open), and once returned it is pruned with its
    return, so no checkout is left in the store without its return (it would read as
    open for good); the rollups still count every checkout."""
    store = tmp_path / "late.db"
    engine, monitor = _attach(tmp_path, store, keep_raw=60.0)
    t0 = instrument._clock.REAL.wall() - 3600
    checkouts = emit_late_return(monitor, t0)
    _finish(engine, monitor)
    assert query(store, UNRETURNED_SQL.format(events="events")) == []
    assert query(store, "SELECT count(*) FROM events WHERE checkout_id = ?", LATE) == [(0,)]
    assert query(store, "SELECT count(*) FROM events WHERE kind = 'checkout'") == [(0,)]
    assert query(store, "SELECT sum(checkouts), sum(returns) FROM rollups") == [
        (checkouts, checkouts)
    ]


def keeper_batch(at: float, first_cid: int, n: int) -> list:  # type: ignore[type-arg]
    """``n`` checkouts and their returns at ``at`` (one minute, pool 1, stack 1: one
    rollup row), as the writer hands a written batch to its keeper (the store's ids)."""
    from instrument._record import RECORD_WIDTH

    flat: list = []  # type: ignore[type-arg]
    for cid in range(first_cid, first_cid + n):
        for kind, wait, hold in (("checkout", 0.001, None), ("checkin", None, 0.002)):
            rec: list = [None] * RECORD_WIDTH  # type: ignore[type-arg]
            rec[:5] = [at, 1, kind, 1, cid]
            rec[7], rec[9], rec[10], rec[11], rec[12], rec[14] = 1, 0, 0, 1, wait, hold
            flat += rec
    return flat


def test_rollups_of_a_failed_keeper_transaction_are_added_once(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The keeper's transaction fails (the store locked by another connection past the busy
    timeout): its rollup rows are written with the next batch's, added to them (same
    minute and call site) and to the stored row, so every checkout is counted once; its
    notable checkouts (here: seven long holds) are marked then, and counted once."""
    store = tmp_path / "locked.db"
    conn = _store.connect_for_writing(store, busy_timeout_ms=100)
    keeper = _retention.Keeper(math.inf, math.inf)
    now = instrument._clock.REAL.wall()
    at = math.floor(now / 60) * 60 - 120 + 1  # three batches in one minute
    keeper.start(conn, 1, now)
    keeper.after_batch(conn, keeper_batch(at, 1, 10), None, None, {}, now, True)
    other = sqlite3.connect(str(store), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    caplog.set_level(logging.WARNING, logger="poolscope")
    long_holds = {1: 0.0015}  # the batch's holds are 2 ms
    keeper.after_batch(conn, keeper_batch(at + 1, 11, 7), None, None, long_holds, now, True)
    assert "could not update the rollups" in caplog.text
    assert query(store, "SELECT sum(checkouts) FROM rollups") == [(10,)]
    other.execute("ROLLBACK")
    other.close()
    keeper.after_batch(conn, keeper_batch(at + 2, 18, 5), None, None, {}, now, True)
    conn.close()
    assert query(store, "SELECT count(*), sum(checkouts), sum(returns) FROM rollups") == [
        (1, 22, 22)
    ]
    assert query(store, "SELECT count(*), sum(events) FROM pool_rollups") == [(1, 44)]
    assert query(store, "SELECT checkout_id, reason FROM notable ORDER BY checkout_id") == [
        (cid, "long_hold") for cid in range(11, 18)
    ]
    assert query(store, "SELECT notable, notable_dropped FROM retention") == [(7, 0)]
