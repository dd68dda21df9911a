"""Reading rollups: the report of a store before and after ``poolscope compact`` agrees
(counts exactly, percentiles within the histogram's error), a first-release store still
reads, and every dashboard page renders on a window whose raw events were pruned.

The store is the report benchmark's generated one (one simulated hour, 8 processes, 3
pools, 30 call sites, timeouts and leaks of every class), compacted with raw events kept
for its last 10 minutes only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import instrument
from instrument import _compact, _histogram, _retention, _store, analysis
from instrument.analysis import Filters, _aggregate
from instrument.analysis import _load as _load_module

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
SCHEMA = json.loads((Path(instrument.__file__).parent / "report_schema.json").read_text())
ERROR = _histogram.MAX_RELATIVE_ERROR
PAGES = ["overview", "utilization", "waits", "sites", "leaks", "live"]


def _generate(path: Path, events: int) -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(path, events)


def _copy(source: Path, target: Path) -> Path:
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return target


def _report(store: Path, filters: Filters | None = None) -> dict[str, Any]:
    conn = analysis.open_store(store)
    try:
        return analysis.build_report(conn, filters or Filters(), with_utilization=True)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generated store as the first release wrote it (``raw``), and a copy compacted
    with raw events kept for the last 600 s (``compacted``)."""
    tmp = tmp_path_factory.mktemp("rollups")
    raw = tmp / "raw.db"
    _generate(raw, 40_000)
    compacted = _copy(raw, tmp / "compacted.db")
    _compact.compact(compacted, keep_raw=600.0)
    return {"raw": raw, "compacted": compacted}


@pytest.fixture(scope="module")
def reports(stores: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {name: _report(path) for name, path in stores.items()}


def _close(histogram_value: float | None, exact: float | None, values: np.ndarray, q: float):
    """A histogram percentile is the bucket value of the sample of rank ceil(q n): within
    the histogram's error of that sample (the report rounds to 0.001 ms)."""
    if exact is None:
        return histogram_value is None
    rank = max(1, math.ceil(q * len(values)))
    sample = float(np.sort(values)[rank - 1])
    return abs(histogram_value - sample) <= ERROR * abs(sample) + 0.0005


class TestCompactedReport:
    def test_compacting_pruned_raw_events_and_the_report_reads_rollups(self, stores, reports):
        """After compact most raw events are gone; the report says its figures come from
        rollups, with histogram percentiles and their error bound."""
        with sqlite3.connect(stores["compacted"]) as conn:
            left = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert left < reports["raw"]["summary"]["events"] / 4
        assert reports["raw"]["source"]["figures"] == "raw_events"
        source = reports["compacted"]["source"]
        assert source["figures"] == "rollups"
        assert source["percentiles"] == "histograms"
        assert source["percentile_relative_error"] == pytest.approx(ERROR)
        assert source["raw_since"] is not None

    def test_counts_agree_exactly(self, reports):
        """Checkouts, open checkouts, timeouts, leaks by certainty and events recorded are
        the same before and after; so are each pool's and each site's checkouts."""
        before, after = reports["raw"], reports["compacted"]
        keys = ["processes", "pools", "checkouts", "open_checkouts", "peak_in_use", "capacity",
                "timeouts", "confirmed_leaks", "suspected_leaks", "unknown_leaks", "dropped",
                "events", "last_event_at"]  # fmt: skip
        assert {k: after["summary"][k] for k in keys} == {k: before["summary"][k] for k in keys}
        # The first event was pruned: its rollup period's start stands for it.
        assert after["summary"]["first_event_at"][:16] == before["summary"]["first_event_at"][:16]
        for b, a in zip(before["pools"], after["pools"], strict=True):
            assert (a["name"], a["checkouts"], a["timeouts"], a["peak_in_use"]) == (
                b["name"], b["checkouts"], b["timeouts"], b["peak_in_use"]
            )  # fmt: skip
            assert a["wait_ms"]["max"] == b["wait_ms"]["max"]
        site = {(s["pool"], s["fingerprint"]): s for s in before["sites"]}
        assert len(after["sites"]) == len(site)
        for s in after["sites"]:
            b = site[(s["pool"], s["fingerprint"])]
            assert (s["checkouts"], s["open"], s["leaks"]) == (
                b["checkouts"],
                b["open"],
                b["leaks"],
            )
            assert s["total_hold_s"] == pytest.approx(b["total_hold_s"], rel=1e-9)

    def test_leak_and_timeout_findings_are_identical(self, reports):
        """Every leak group and every timeout, with its holders, is the same after compact:
        their raw events are kept as notable."""
        before, after = reports["raw"], reports["compacted"]
        assert after["leaks"] == before["leaks"]
        assert after["timeouts"] == before["timeouts"]

    def test_percentiles_lie_within_the_histogram_error(self, stores, reports):
        """Each pool's wait and hold p50/p95/p99 after compact is within 1 % of the
        recorded value of that rank."""
        conn = analysis.open_store(stores["raw"])
        co = analysis.checkouts(conn)
        conn.close()
        before = {p["name"]: p for p in reports["raw"]["pools"]}
        for pool in reports["compacted"]["pools"]:
            mine = co[co["pool"] == pool["name"]]
            for column, key in (("wait_s", "wait_ms"), ("hold_s", "hold_ms")):
                values = mine[column].dropna().to_numpy() * 1000
                for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
                    got, exact = pool[key][name], before[pool["name"]][key][name]
                    assert _close(got, exact, values, q), (pool["name"], key, name, got, exact)

    def test_json_validates_against_the_schema(self, reports):
        """Both reports, with their source and utilization, validate against the schema."""
        for report in reports.values():
            jsonschema.validate(
                json.loads(json.dumps(report)), SCHEMA, cls=jsonschema.Draft202012Validator
            )

    def test_replay_is_said_to_be_unavailable_on_rollups(self, reports):
        """Where figures come from rollups no sizing has a replay, and the source says so;
        before compact each sized pool has one."""
        assert all(p["sizing"]["replay"] is not None for p in reports["raw"]["pools"])
        assert reports["compacted"]["source"]["replay"] is None
        assert all(p["sizing"]["replay"] is None for p in reports["compacted"]["pools"])


class TestBigWindowReadsRollups:
    def test_past_the_exact_limit_figures_come_from_rollups(self, stores, monkeypatch):
        """A window with more checkouts than the exact limit reads rollups even where every
        raw event is kept; its counts equal the exact ones."""
        with sqlite3.connect(stores["compacted"]) as conn:
            since = float(
                conn.execute("SELECT value FROM meta WHERE key = 'raw_since'").fetchone()[0]
            )
        window = Filters(since=since + 60)
        exact = _report(stores["compacted"], window)
        assert exact["source"]["figures"] == "raw_events"
        monkeypatch.setattr(_aggregate, "EXACT_LIMIT", 10)
        rolled = _report(stores["compacted"], window)
        assert rolled["source"]["figures"] == "rollups"
        assert rolled["summary"]["timeouts"] == exact["summary"]["timeouts"]
        assert rolled["leaks"] == exact["leaks"]


class TestFirstReleaseStore:
    def test_a_version_1_store_reads_from_raw_events(self, stores, tmp_path):
        """A store the first release wrote (schema 1, no rollups tables) reports as before,
        from raw events."""
        old = _copy(stores["raw"], tmp_path / "v1.db")
        with sqlite3.connect(old) as conn:
            for table in ("rollups", "pool_rollups", "notable", "retention"):
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.close()
        report = _report(old)
        assert report["source"]["figures"] == "raw_events"
        keys = ["checkouts", "timeouts", "confirmed_leaks", "suspected_leaks", "unknown_leaks"]
        raw = _report(stores["raw"])
        assert {k: report["summary"][k] for k in keys} == {k: raw["summary"][k] for k in keys}
        assert report["leaks"] == raw["leaks"]


class TestDashboardOnRollups:
    @pytest.mark.parametrize("page", PAGES)
    def test_every_page_renders_on_a_rollups_only_window(self, stores, monkeypatch, page):
        """With the window before raw_since (only rollups and notable raw rows there), each
        page renders with no exception and no error box."""
        with sqlite3.connect(stores["compacted"]) as conn:
            since = float(
                conn.execute("SELECT value FROM meta WHERE key = 'raw_since'").fetchone()[0]
            )
            first = conn.execute("SELECT MIN(start_at) FROM rollups").fetchone()[0]
        conn.close()
        assert (
            analysis.source(
                analysis.open_store(stores["compacted"]), Filters(since=first, until=since - 60)
            )
            == "rollups"
        )
        monkeypatch.setenv("POOLSCOPE_STORE", str(stores["compacted"]))
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["since"] = str(first)
        at.query_params["until"] = str(since - 60)
        at.run()
        if page != "overview":
            at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        assert at.title[0].value


class TestRareEventsIndex:
    def test_a_new_store_indexes_its_timeouts_and_dropped_records_only(self, stores):
        """The writer's store indexes the timeouts and ``dropped`` records (a few rows), so
        the report finds them without reading every event."""
        with sqlite3.connect(stores["compacted"]) as conn:
            indexed = conn.execute(
                "SELECT COUNT(*) FROM events INDEXED BY events_rare "
                "WHERE kind IN ('timeout', 'dropped')"
            ).fetchone()[0]
            counted = conn.execute(
                "SELECT COUNT(*) FROM events NOT INDEXED WHERE kind IN ('timeout', 'dropped')"
            ).fetchone()[0]
        conn.close()
        assert indexed == counted > 0

    def test_a_store_without_the_index_reports_the_same(self, stores, reports, tmp_path):
        """A schema 2 store made before the index (none is added to an older store) reads
        the same report, its timeouts and drop counts found by a scan of the events."""
        old = _copy(stores["compacted"], tmp_path / "unindexed.db")
        with sqlite3.connect(old) as conn:
            conn.execute("DROP INDEX events_rare")
        conn.close()
        report = _report(old)
        indexed = reports["compacted"]
        assert report["source"]["figures"] == indexed["source"]["figures"] == "rollups"
        assert report["summary"]["timeouts"] > 0 and report["summary"]["dropped"] > 0
        assert report["summary"] == indexed["summary"]
        assert report["timeouts"] == indexed["timeouts"]
        assert report["leaks"] == indexed["leaks"]

    def test_a_store_with_events_gets_no_index_when_opened_for_writing(self, stores, tmp_path):
        """Opening a store that has events already (made before the index) for writing adds
        no index: building it would read every event under the write lock."""
        old = _copy(stores["raw"], tmp_path / "older.db")
        with sqlite3.connect(old) as conn:
            conn.execute("DROP INDEX events_rare")
        conn.close()
        conn = _store.connect_for_writing(old)
        try:
            assert not _store.has_rare_index(conn)
        finally:
            conn.close()


class TestRecordedSpan:
    def test_the_writers_spans_give_the_count_and_times_a_scan_gives(
        self, recorded, tmp_path, monkeypatch
    ):
        """On a store the writer recorded (8 processes, the last one crashed), the events'
        count, first and last time come from the B-tree's count and the span each writer
        kept with its rollups, not a scan of every event: the same figures as the scan."""
        store = _copy(recorded, tmp_path / "recorded.db")
        with sqlite3.connect(store) as conn:
            exact = conn.execute("SELECT COUNT(*), MIN(at), MAX(at) FROM events").fetchone()
            assert len(_retention.recorded_spans(conn)) == 8
        conn.close()
        conn = analysis.open_store(store)
        try:
            assert _aggregate._recorded_span(conn) == exact
        finally:
            conn.close()
        monkeypatch.setattr(_aggregate, "EXACT_LIMIT", 10)  # the whole store from rollups
        fast = _report(store)
        assert fast["source"]["figures"] == "rollups"
        with sqlite3.connect(store) as conn:
            conn.execute("DELETE FROM meta WHERE key LIKE 'span:%'")  # as an older writer
        conn.close()
        scanned = _report(store)
        assert scanned["summary"] == fast["summary"]
        assert fast["summary"]["events"] == exact[0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store the writer recorded (8 processes, 3 pools each, 3 checkouts never returned in
    each pool; the last process crashed), rollups written as in production."""
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store = tmp_path_factory.mktemp("recorded") / "recorded.db"
    module.record(store, 20_000)
    return store


def _open_by_scan(store: Path) -> set[tuple[int, int, int]]:
    """Every checkout without a return row, found by reading every event."""
    with sqlite3.connect(store) as conn:
        rows = conn.execute(
            "SELECT process_id, pool_id, checkout_id FROM events AS o NOT INDEXED "
            "WHERE kind = 'checkout' AND NOT EXISTS (SELECT 1 FROM events AS r NOT INDEXED "
            "WHERE r.process_id = o.process_id AND r.pool_id = o.pool_id "
            "AND r.checkout_id = o.checkout_id AND r.kind IN "
            "('checkin', 'gc_checkin', 'detach', 'unwatched'))"
        ).fetchall()
    conn.close()
    return set(rows)


def _open_found(store: Path) -> set[tuple[int, int, int]]:
    """The open checkouts the rollups' periods lead the reader to (the checkout index read
    only where they place them, and on from there while some are missing)."""
    conn = analysis.open_store(store)
    try:
        data = _load_module._load(conn, Filters())
        conn.execute(
            "CREATE TEMP TABLE poolscope_keys (process_id INTEGER, pool_id INTEGER, "
            "checkout_id INTEGER, PRIMARY KEY (process_id, pool_id, checkout_id)) WITHOUT ROWID"
        )
        bounds: dict[tuple[int, int], Any] = {}
        for proc, pool_id, expected, spans in _aggregate._open_spans(data):
            _aggregate._add_open_checkouts(conn, proc, pool_id, expected, spans, bounds)
        return set(conn.execute("SELECT * FROM temp.poolscope_keys").fetchall())
    finally:
        conn.close()


class TestOpenCheckouts:
    def test_the_rollups_periods_lead_to_every_open_checkout(self, recorded):
        """The open checkouts found from the rollups' periods are those a scan of every
        event finds: 3 never returned per pool."""
        truth = _open_by_scan(recorded)
        assert len(truth) == 8 * 3 * 3
        assert _open_found(recorded) == truth

    @pytest.mark.parametrize("misplaced", ["too_early", "none"])
    def test_periods_that_miss_them_are_read_on_from(self, recorded, monkeypatch, misplaced):
        """Where the rollups place the open checkouts too early (a checkout out across the
        end of a period raises its count first), or not at all, the reader reads on and
        finds every one."""
        truth = _open_by_scan(recorded)
        real = _aggregate._open_spans

        def wrong(data):
            out = []
            for proc, pool_id, expected, spans in real(data):
                if misplaced == "too_early":
                    spans = [(lo - 1200.0, lo - 1140.0) for lo, _ in spans]
                else:
                    spans = []
                out.append((proc, pool_id, expected, spans))
            return out

        monkeypatch.setattr(_aggregate, "_open_spans", wrong)
        assert _open_found(recorded) == truth

    def test_the_report_from_rollups_lists_the_leaks_the_raw_events_give(
        self, recorded, monkeypatch
    ):
        """The whole store read from rollups (its open checkouts found as above) reports
        the same open checkouts and leaks as pairing every raw checkout."""
        exact = _report(recorded)
        assert exact["source"]["figures"] == "raw_events"
        monkeypatch.setattr(_aggregate, "EXACT_LIMIT", 10)
        rolled = _report(recorded)
        assert rolled["source"]["figures"] == "rollups"
        for key in ("open_checkouts", "confirmed_leaks", "suspected_leaks", "unknown_leaks"):
            assert rolled["summary"][key] == exact["summary"][key], key
        assert rolled["leaks"] == exact["leaks"]

    def test_the_summary_alone_counts_what_the_report_does(self, recorded, monkeypatch):
        """The summary the dashboard asks for alone (leaks counted by class, every wait
        histogram merged in one pass, no hold histogram) equals the report's, which merges
        them per call site and groups its leaks."""
        monkeypatch.setattr(_aggregate, "EXACT_LIMIT", 10)
        report = _report(recorded)["summary"]
        conn = analysis.open_store(recorded)
        try:
            alone = analysis.summary(conn)
        finally:
            conn.close()
        assert report["confirmed_leaks"] + report["unknown_leaks"] > 0
        for key in ("first_event_at", "last_event_at"):
            report.pop(key), alone.pop(key)
        assert alone == report
