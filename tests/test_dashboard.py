"""The Streamlit dashboard, driven through AppTest on stores recorded from real workloads."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from instrument import _store, analysis, report
from instrument.dashboard import access, charts, data, filters, screenshots, ui

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
PAGES = ["overview", "utilization", "waits", "sites", "leaks", "live"]

WORKLOAD = '''
"""Two pools: quick orders, slow reports that exhaust the pool, a timeout, a connection only
the garbage collector returns, and one kept until exit; billing just charges."""
import gc
import sys
import threading
import time

import sqlalchemy as sa

import instrument

KEEP = []


def place_order(engine):
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")


def slow_report(engine, barrier, release):
    with engine.connect() as conn:
        barrier.wait()
        release.wait(10)  # hold on until the export has timed out
        time.sleep(0.3)
        conn.exec_driver_sql("select 1")


def export(engine):
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
    except sa.exc.TimeoutError:
        return "timeout"
    return "ok"


def forget_connection(engine):
    conn = engine.connect()
    conn.exec_driver_sql("select 1")


def keep_forever(engine):
    KEEP.append(engine.connect())


def charge(engine):
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")


def main(store, app_db):
    orders = sa.create_engine(f"sqlite:///{app_db}", poolclass=sa.pool.QueuePool,
                              pool_size=2, max_overflow=1, pool_timeout=0.3)
    billing = sa.create_engine(f"sqlite:///{app_db}", poolclass=sa.pool.QueuePool,
                               pool_size=1, max_overflow=0)
    instrument.attach(orders, store=store, leak_after=0.25, name="orders", diagnose=True)
    instrument.attach(billing, store=store, leak_after=30.0, name="billing")
    for _ in range(40):
        place_order(orders)
    for _ in range(7):
        charge(billing)
    barrier, release = threading.Barrier(4), threading.Event()
    threads = [threading.Thread(target=slow_report, args=(orders, barrier, release),
                                name=f"report-{i}") for i in range(3)]
    for t in threads:
        t.start()
    barrier.wait()
    assert export(orders) == "timeout"
    release.set()
    for t in threads:
        t.join()
    for _ in range(2):
        forget_connection(orders)
        gc.collect()
    keep_forever(orders)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''

LIVE = '''
"""Holds one connection open and keeps running until its stdin closes."""
import sys

import sqlalchemy as sa

import instrument


def hold_open(engine):
    return engine.connect()


engine = sa.create_engine(f"sqlite:///{sys.argv[2]}", pool_size=2, max_overflow=0)
monitor = instrument.attach(engine, store=sys.argv[1], leak_after=30.0, name="live")
conn = hold_open(engine)
monitor.flush()
print("ready", flush=True)
sys.stdin.read()
'''


def _run_workload(directory: Path, source: str, name: str) -> Path:
    """Write ``source`` as ``shop/<name>.py`` and run it to completion; return its store."""
    package = directory / "shop"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / f"{name}.py").write_text(textwrap.dedent(source))
    store = directory / f"{name}.db"
    done = subprocess.run(
        [sys.executable, "-m", f"shop.{name}", str(store), str(directory / f"{name}-app.db")],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(directory)},
    )
    assert done.returncode == 0, done.stderr
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store recorded by a real workload that exited cleanly (see ``WORKLOAD``)."""
    return _run_workload(tmp_path_factory.mktemp("workload"), WORKLOAD, "work")


@contextmanager
def running_live_app(directory: Path) -> Iterator[Path]:
    """Run ``LIVE`` in ``directory`` until the block ends; yield the store it is writing."""
    package = directory / "shop"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "live.py").write_text(textwrap.dedent(LIVE))
    store = directory / "live.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shop.live", str(store), str(directory / "live-app.db")],
        cwd=directory,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(directory)},
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield store
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture
def live_store(tmp_path: Path) -> Iterator[Path]:
    """A store that a running process is writing, with one connection checked out."""
    with running_live_app(tmp_path) as store:
        yield store


NO_FILTERS = analysis.Filters()


def _summary(store: Path, filters_: analysis.Filters = NO_FILTERS) -> dict:
    conn = analysis.open_store(store)
    try:
        return analysis.summary(conn, filters_)
    finally:
        conn.close()


def _frame(store: Path, name: str, filters_: analysis.Filters = NO_FILTERS) -> pd.DataFrame:
    conn = analysis.open_store(store)
    try:
        return getattr(analysis, name)(conn, filters_)
    finally:
        conn.close()


def _app(store: Path | str, monkeypatch: pytest.MonkeyPatch, page: str = "overview") -> AppTest:
    """Run the dashboard on ``store`` (via ``$POOLSCOPE_STORE``) and open ``page``."""
    monkeypatch.setenv("POOLSCOPE_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    if page != "overview":
        at.switch_page(f"app_pages/{page}.py").run()
    return at


def _copy_store(source: Path, target: Path) -> Path:
    """Copy the store ``source`` to ``target`` through SQLite's backup; return ``target``."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return target


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _trace_names(figure: dict) -> list[str]:
    return [trace.get("name") for trace in figure["data"]]


def _leak_tables(at: AppTest) -> dict[str, pd.DataFrame]:
    """The Leaks page's tables by the leak class in the header above each."""
    classes = [h.value.split(" · ")[0] for h in at.header]
    return dict(zip(classes, (df.value for df in at.dataframe), strict=True))


def _expected_kpis(summary: dict) -> dict[str, str]:
    return {
        "Processes": str(summary["processes"]),
        "Pools": str(summary["pools"]),
        "Checkouts": f"{summary['checkouts']:,}",
        "Peak in use / capacity": ui.fmt_peak(summary["peak_in_use"], summary["capacity"]),
        "p95 wait": ui.fmt_duration(summary["wait_p95_s"]),
        "Timeouts": str(summary["timeouts"]),
        "Confirmed leaks": str(summary["confirmed_leaks"]),
        "Suspected leaks": str(summary["suspected_leaks"]),
    }


class TestPages:
    @pytest.mark.parametrize("page", PAGES)
    def test_every_page_runs_without_exception_or_error(self, store, monkeypatch, page):
        """Each page renders its charts on a real store, with no exception and no error box."""
        at = _app(store, monkeypatch, page)
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        assert at.get("plotly_chart"), f"{page} shows no chart"
        assert at.title[0].value

    @pytest.mark.parametrize("page", PAGES)
    def test_every_page_survives_a_tampered_event(self, store, tmp_path, monkeypatch, page):
        """Events with a time of 1e300 or a string are left out: each page still renders
        its charts, with no exception and no error box."""
        tampered = tmp_path / "tampered.db"
        with sqlite3.connect(store) as source, sqlite3.connect(tampered) as copy:
            source.backup(copy)
        with sqlite3.connect(tampered) as conn:
            conn.execute("UPDATE events SET at = 1e300 WHERE id = (SELECT MIN(id) FROM events)")
            conn.execute("UPDATE events SET at = 'noon' WHERE id = (SELECT MAX(id) FROM events)")
        conn.close()
        assert _summary(tampered)["ignored_events"] == 2
        at = _app(tampered, monkeypatch, page)
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        assert at.get("plotly_chart"), f"{page} shows no chart"

    def test_overview_kpis_equal_analysis_summary(self, store, monkeypatch):
        """The Overview's KPIs are exactly instrument.analysis.summary's numbers."""
        summary = _summary(store)
        at = _app(store, monkeypatch)
        assert _metrics(at) == _expected_kpis(summary)
        # The workload's facts, so the equality above is not vacuous.
        assert summary["pools"] == 2
        assert summary["timeouts"] == 1
        assert summary["peak_in_use"] == 3 and summary["capacity"] == 3
        assert summary["confirmed_leaks"] == 3  # 2 gc_reclaimed + 1 never_returned
        assert summary["suspected_leaks"] == 3  # the three slow reports

    def test_overview_timeline_has_each_pool(self, store, monkeypatch):
        """The compact timeline draws in-use and capacity lines for both pools."""
        at = _app(store, monkeypatch)
        names = _trace_names(_figures(at)[0])
        assert {"orders in use", "orders capacity", "billing in use", "billing capacity"} <= set(
            names
        )

    def test_utilization_stacks_counts_with_limits_waiters_and_timeouts(self, store, monkeypatch):
        """One utilization chart per pool; the orders pool's carries its timeout marker."""
        at = _app(store, monkeypatch, "utilization")
        figures = {fig["layout"]["title"]["text"]: fig for fig in _figures(at)}
        assert {t for t in figures if t.startswith("Pool ")} == {"Pool billing", "Pool orders"}
        names = _trace_names(figures["Pool orders"])
        assert names == [
            "in use",
            "overflow",
            "idle",
            "pool_size",
            "pool_size + max_overflow",
            "waiters",
            "timeout",
        ]
        assert "timeout" not in _trace_names(figures["Pool billing"])
        assert _metrics(at)["Peak in use"] == "3"

    def test_what_if_sliders_rerun_the_replay(self, store, monkeypatch):
        """The orders pool's replay at its recorded settings predicts its one timeout; one
        more overflow connection on the slider, and the prediction drops to none."""
        at = _app(store, monkeypatch, "utilization")
        assert _metrics(at)["Predicted timeouts"] == "1"
        at.slider(key="wi_overflow_orders").set_value(2).run()
        assert _metrics(at)["Predicted timeouts"] == "0"
        chart = next(
            f for f in _figures(at) if f["layout"]["title"]["text"] == "What if: pool orders"
        )
        assert _trace_names(chart) == ["recorded (1 timeout)", "predicted (0 timeouts)"]

    def test_waits_page_names_the_holders_of_the_timeout(self, store, monkeypatch):
        """For the timeout, the page lists the three slow reports that held the pool."""
        at = _app(store, monkeypatch, "waits")
        assert any(h.value == "Timeouts (1)" for h in at.header)
        holders = next(df.value for df in at.dataframe if "held_s" in df.value.columns)
        assert list(holders["site"].str.endswith("in slow_report")) == [True] * 3
        assert sorted(holders["thread"]) == ["report-0", "report-1", "report-2"]
        assert (holders["held_s"] > 0).all()
        assert holders["why"].str.startswith("held ").all()  # diagnose=True: the breakdown
        expander = at.expander[0]
        assert "in export" in expander.label and "3 holders" in expander.label
        by_site = next(df.value for df in at.dataframe if "most_held" in df.value.columns)
        assert len(by_site) == 1 and by_site["site"].iloc[0].endswith("in slow_report")
        assert (by_site["timeouts"].iloc[0], by_site["most_held"].iloc[0]) == (1, 3)

    def test_sites_table_holds_every_site_and_shows_the_chosen_stack(self, store, monkeypatch):
        """The sites table lists every call site; choosing one shows its stack."""
        expected = _frame(store, "sites")
        at = _app(store, monkeypatch, "sites")
        table = at.dataframe[0].value
        functions = {s.rsplit(" in ", 1)[1] for s in table["site"]}
        assert functions == {
            "place_order",
            "slow_report",
            "export",
            "forget_connection",
            "keep_forever",
            "charge",
        } - {"export"}  # the timed-out caller never got a connection
        assert sorted(table["checkouts"]) == sorted(expected["checkouts"])
        box = at.selectbox(key="site")
        keys = list(expected["pool"] + "|" + expected["fingerprint"])
        labels = charts.site_labels(expected)
        assert sorted(box.options) == sorted(labels)
        index = next(i for i, label in enumerate(labels) if "forget_connection" in label)
        box.set_value(keys[index]).run()
        assert not at.exception
        assert "in forget_connection" in at.subheader[0].value
        assert at.code[0].value.splitlines()[0].endswith("in forget_connection")
        assert _metrics(at)["Checkouts"] == "2"

    def test_leaks_page_groups_by_class_and_site(self, store, monkeypatch):
        """Each leak class has its table with the leaking sites and counts, and stacks."""
        at = _app(store, monkeypatch, "leaks")
        tables = _leak_tables(at)
        assert list(tables) == ["never_returned", "gc_reclaimed", "held_too_long"]
        gc_rows = tables["gc_reclaimed"]
        assert list(gc_rows["count"]) == [2]
        assert gc_rows["site"].iloc[0].endswith("in forget_connection")
        assert tables["never_returned"]["site"].iloc[0].endswith("in keep_forever")
        assert tables["held_too_long"]["count"].sum() == 3
        assert any("in keep_forever" in c.value for c in at.code)
        assert any(t.value.startswith("Why: held ") for t in at.text)  # diagnose=True
        labels = {b.label for b in at.get("download_button")}
        assert "Download JSON report" in labels

    def test_leak_threshold_filter_changes_leaks_and_url(self, store, monkeypatch):
        """A leak threshold typed in the sidebar re-classifies leaks and lands in the URL."""
        at = _app(store, monkeypatch, "leaks")
        at.number_input(key="leak_after").set_value(100.0).run()
        assert at.query_params["leak_after"] == "100"
        expected = _summary(store, analysis.Filters(leak_after=100.0))
        assert expected["suspected_leaks"] == 0
        assert _metrics(at)["Suspected leaks"] == "0"
        assert list(_leak_tables(at)) == ["never_returned", "gc_reclaimed"]

    def test_filters_come_from_the_url(self, store, monkeypatch):
        """A shared link with ?pool=billing opens the Overview for that pool only."""
        monkeypatch.setenv("POOLSCOPE_STORE", str(store))
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["pool"] = "billing"
        at.run()
        expected = _summary(store, analysis.Filters(pools=("billing",)))
        assert expected["checkouts"] == 7
        assert _metrics(at) == _expected_kpis(expected)
        assert at.multiselect(key="pools").value == ["billing"]
        assert at.query_params["pool"] == "billing"

    def test_process_and_window_filters(self, store, monkeypatch):
        """Narrowing the time window to the first instant leaves no timeout in view."""
        at = _app(store, monkeypatch)
        slider = at.slider(key="window")
        start, end = slider.value
        at.slider(key="window").set_range(start, start).run()
        assert "until" in at.query_params and "since" not in at.query_params
        assert _metrics(at)["Timeouts"] == "0"
        at.multiselect(key="processes").set_value([1]).run()
        assert at.query_params["process"] == "1"
        assert not at.exception

    def test_switching_stores_drops_the_old_filters(self, store, live_store, monkeypatch):
        """Filters chosen on one store do not carry over to another store typed in the sidebar."""
        monkeypatch.setenv(access.ALLOW_ANY_STORE_ENV, "1")  # the live store is elsewhere
        at = _app(store, monkeypatch)
        at.multiselect(key="pools").set_value(["billing"]).run()
        start, _ = at.slider(key="window").value
        at.slider(key="window").set_range(start, start).run()
        at.text_input(key="store").set_value(str(live_store)).run()
        assert not at.exception and not at.error
        assert at.multiselect(key="pools").value == []
        assert at.query_params == {}
        assert _metrics(at) == _expected_kpis(_summary(live_store))

    def test_live_page_shows_open_checkouts_of_a_running_process(self, live_store, monkeypatch):
        """With a live process holding a connection, Live shows it with its site."""
        at = _app(live_store, monkeypatch, "live")
        assert not at.exception
        metrics = _metrics(at)
        assert metrics["Running processes"] == "1"
        assert metrics["Checked out now"] == "1"
        table = at.dataframe[0].value
        assert table["site"].iloc[0].endswith("in hold_open")
        assert at.toggle(key="live_paused").value is False
        at.toggle(key="live_paused").set_value(True).run()
        assert not at.exception
        assert "paused" in at.caption[-1].value


class TestBadInput:
    def _only_error(self, at: AppTest) -> str:
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.error) == 1
        assert not at.metric and not at.get("plotly_chart")
        message = at.error[0].value
        assert "Point the dashboard at a poolscope store" in message
        return message

    def test_missing_store(self, tmp_path, monkeypatch):
        """A path with no file says there is no store there."""
        message = self._only_error(_app(tmp_path / "nope.db", monkeypatch))
        assert "no store at" in message and "nope.db" in message

    def test_corrupt_store(self, tmp_path, monkeypatch):
        """A file that is not SQLite is named as such."""
        path = tmp_path / "junk.db"
        path.write_bytes(b"this is not a database at all\n" * 100)
        assert "not a SQLite file" in self._only_error(_app(path, monkeypatch))

    def test_damaged_sqlite_store(self, tmp_path, monkeypatch, store):
        """A SQLite file with a valid header and garbage after it is called damaged."""
        path = tmp_path / "damaged.db"
        content = bytearray(store.read_bytes())
        content[100:] = b"\xff" * (len(content) - 100)
        path.write_bytes(bytes(content))
        message = self._only_error(_app(path, monkeypatch))
        assert "damaged" in message or "not a poolscope store" in message

    def test_foreign_store(self, tmp_path, monkeypatch):
        """Another application's SQLite database is refused as foreign."""
        path = tmp_path / "other.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
        conn.commit()
        conn.close()
        assert "another application" in self._only_error(_app(path, monkeypatch))

    def test_empty_file(self, tmp_path, monkeypatch):
        """A zero-byte file is refused as empty."""
        path = tmp_path / "empty.db"
        path.touch()
        assert "is empty" in self._only_error(_app(path, monkeypatch))

    def test_store_without_events(self, tmp_path, monkeypatch):
        """A valid store in which nothing was recorded yet says to run the app first."""
        path = tmp_path / "fresh.db"
        _store.connect_for_writing(path).close()
        assert "holds no pool events yet" in self._only_error(_app(path, monkeypatch))

    def test_newer_store(self, tmp_path, monkeypatch):
        """A store from a newer poolscope says to upgrade."""
        path = tmp_path / "newer.db"
        conn = _store.connect_for_writing(path)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.close()
        assert "upgrade poolscope" in self._only_error(_app(path, monkeypatch))

    def test_fixing_the_path_in_the_sidebar_recovers(self, tmp_path, monkeypatch, store):
        """After an error, typing a good path in the sidebar shows the dashboard."""
        good = _copy_store(store, tmp_path / "good.db")
        at = _app(tmp_path / "nope.db", monkeypatch)
        assert at.error
        at.text_input(key="store").set_value(str(good)).run()
        assert not at.error and not at.exception
        assert _metrics(at) == _expected_kpis(_summary(good))


class TestStorePicker:
    def _refusal(self, at: AppTest, path: Path | str) -> str:
        at.text_input(key="store").set_value(str(path)).run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.error) == 1
        assert not at.metric and not at.get("plotly_chart")
        return at.error[0].value

    def test_a_store_elsewhere_is_refused_alike_whether_or_not_it_exists(
        self, store, tmp_path, monkeypatch
    ):
        """A store outside the started store's directory, a missing file there and a path
        climbing out with '..' all get the same refusal, which says nothing of the file."""
        other = _copy_store(store, tmp_path / "other.db")
        at = _app(store, monkeypatch)
        assert _metrics(at)
        climbing = store.parent / ".." / tmp_path.name / "other.db"
        messages = {self._refusal(at, p) for p in (other, tmp_path / "missing.db", climbing)}
        assert len(messages) == 1
        (message,) = messages
        assert f"opens only the stores in {store.parent}" in message
        assert "--allow-any-store" in message and "no store at" not in message

    def test_the_started_store_and_its_siblings_open(self, store, monkeypatch):
        """Another store in the started store's directory opens, and so does the first again."""
        sibling = _copy_store(store, store.parent / "sibling.db")
        at = _app(store, monkeypatch)
        at.text_input(key="store").set_value(str(sibling)).run()
        assert not at.error and not at.exception
        assert _metrics(at) == _expected_kpis(_summary(sibling))
        at.text_input(key="store").set_value(str(store)).run()
        assert not at.error and _metrics(at) == _expected_kpis(_summary(store))

    def test_a_link_leading_out_of_the_directory_is_refused(self, store, tmp_path, monkeypatch):
        """A symbolic link in the started store's directory to a store elsewhere is refused."""
        link = store.parent / f"link-{tmp_path.name}.db"
        link.symlink_to(_copy_store(store, tmp_path / "other.db"))
        at = _app(store, monkeypatch)
        assert "opens only the stores in" in self._refusal(at, link)

    @pytest.mark.parametrize("how", ["flag", "environment"])
    def test_allowing_any_store_opens_another_directory(self, store, tmp_path, monkeypatch, how):
        """With --allow-any-store (or its variable), a store in another directory opens."""
        other = _copy_store(store, tmp_path / "other.db")
        if how == "flag":  # as `poolscope dashboard --allow-any-store` starts the app
            monkeypatch.setattr(sys, "argv", [str(APP), "--store", str(store), "--allow-any-store"])
        else:
            monkeypatch.setenv(access.ALLOW_ANY_STORE_ENV, "1")
        at = _app(store, monkeypatch)
        at.text_input(key="store").set_value(str(other)).run()
        assert not at.error and not at.exception
        assert _metrics(at) == _expected_kpis(_summary(other))


def _visit(port: int, host: str) -> tuple[list[str], list[str], bytes]:
    """Run the app once over the server's websocket as a browser would, sending ``Host:
    host``; return the alerts and metric labels it drew, and every byte it sent."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)  # the name resolved here
    alerts: list[str] = []
    metrics: list[str] = []
    received = b""
    with connect(
        f"ws://{host}/_stcore/stream", sock=sock, subprotocols=["streamlit"],
        origin=f"http://{host}", open_timeout=30,
    ) as ws:  # fmt: skip
        rerun = BackMsg()
        rerun.rerun_script.query_string = ""
        ws.send(rerun.SerializeToString())
        while True:
            raw = ws.recv(timeout=60)
            received += raw
            msg = ForwardMsg()
            msg.ParseFromString(raw)
            if msg.WhichOneof("type") == "script_finished":
                return alerts, metrics, received
            if msg.WhichOneof("type") == "delta" and msg.delta.HasField("new_element"):
                element = msg.delta.new_element
                if element.HasField("alert"):
                    alerts.append(element.alert.body)
                if element.HasField("metric"):
                    metrics.append(element.metric.label)


class TestHostCheck:
    @pytest.mark.parametrize(
        ("host", "address", "allowed"),
        [
            (None, "127.0.0.1", True),  # no Host: no browser sent it
            ("127.0.0.1:8501", "127.0.0.1", True),
            ("localhost:8501", "127.0.0.1", True),
            ("LOCALHOST.:8501", "127.0.0.1", True),
            ("[::1]:8501", "127.0.0.1", True),
            ("evil.test:8501", "127.0.0.1", False),  # a rebound name
            ("localhost.evil.test:8501", "127.0.0.1", False),
            ("127.0.0.1:8502", "127.0.0.1", False),
            ("127.0.0.1", "127.0.0.1", False),  # port 80
            ("user@localhost:8501", "127.0.0.1", False),
            ("localhost:85x1", "127.0.0.1", False),
            ("10.1.2.3:8501", "10.1.2.3", True),
            ("10.1.2.3:8501", "127.0.0.1", False),
            ("10.1.2.3:8501", "0.0.0.0", True),  # every interface: any address
            ("[fe80::1]:8501", "", True),
            ("evil.test:8501", "0.0.0.0", False),
            ("dash.example.com:443", "127.0.0.1", False),
        ],
    )
    def test_which_hosts_are_answered(self, host, address, allowed):
        """Only the bound address, localhost and its loopback addresses, on the bound port."""
        assert access.host_allowed(host, address, 8501) is allowed

    def test_listed_host_names_are_answered_on_any_port(self, monkeypatch):
        """A name in $POOLSCOPE_ALLOWED_HOSTS is answered, for a reverse proxy."""
        monkeypatch.setenv(access.ALLOWED_HOSTS_ENV, "dash.example.com, other.example.com")
        also = access.allowed_hosts_from()
        assert access.host_allowed("dash.example.com:443", "127.0.0.1", 8501, also)
        assert access.host_allowed("Dash.Example.com", "127.0.0.1", 8501, also)
        assert not access.host_allowed("evil.test:8501", "127.0.0.1", 8501, also)

    def test_a_rebound_host_name_sees_nothing_from_a_real_server(self, store):
        """Served by `poolscope dashboard`, a request naming 127.0.0.1 or localhost gets the
        dashboard, and one naming another host gets one error and not a byte of the store."""
        port = screenshots.free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "instrument", "dashboard", str(store), "--port", str(port),
             "--allow-any-store"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.3)
            # The command hands --allow-any-store to the app, after its store.
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"--") :][:4] == [
                b"--",
                b"--store",
                bytes(store),
                b"--allow-any-store",
            ]
            for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
                alerts, metrics, _ = _visit(port, host)
                assert alerts == [] and "Checkouts" in metrics
            alerts, metrics, received = _visit(port, f"evil.test:{port}")
            assert len(alerts) == 1 and "does not answer under this host name" in alerts[0]
            assert metrics == []
            assert bytes(store) not in received and b"orders" not in received
        finally:
            os.killpg(proc.pid, 9)
            proc.wait(20)


class TestCharts:
    def test_utilization_chart_traces(self, store):
        """One pool's utilization: stacked counts, both limits, waiters and timeouts."""
        util = _frame(store, "utilization")
        timeouts = _frame(store, "timeouts")
        orders = util[util["pool"] == "orders"]
        fig = charts.utilization_chart(orders, timeouts[timeouts["pool"] == "orders"])
        names = [t.name for t in fig.data]
        assert names[:3] == ["in use", "overflow", "idle"]
        assert {"pool_size", "pool_size + max_overflow", "waiters", "timeout"} <= set(names)
        stacked = [t for t in fig.data if t.stackgroup == "conns"]
        assert len(stacked) == 3
        in_use = next(t for t in fig.data if t.name == "in use")
        overflow = next(t for t in fig.data if t.name == "overflow")
        assert max(a + b for a, b in zip(in_use.y, overflow.y, strict=True)) == 3
        assert fig.layout.xaxis2.rangeslider.visible

    def test_charts_on_real_frames(self, store):
        """Each builder returns a figure with its expected traces on the workload's frames."""
        co = _frame(store, "checkouts")
        sites = _frame(store, "sites")
        leaks = _frame(store, "leaks")
        timeouts = _frame(store, "timeouts")
        holders = pd.DataFrame(timeouts["holders"].iloc[0])
        assert {t.name for t in charts.wait_histogram_chart(co).data} == {"orders", "billing"}
        over_time = data.wait_percentiles_over_time(co[co["pool"] == "orders"])
        assert [t.name for t in charts.wait_percentiles_chart(over_time).data] == [
            "p50",
            "p95",
            "p99",
            "max",
        ]
        assert len(charts.holders_chart(holders).data[0].y) == 3
        assert charts.timeouts_chart(timeouts).data[0].name == "orders"
        bar = charts.sites_chart(sites).data[0]
        assert len(set(bar.y)) == len(bar.y) == len(sites)  # place_order twice, told apart
        leak_fig = charts.leaks_chart(leaks)
        assert {t.name for t in leak_fig.data} == {"confirmed", "suspected"}
        assert sum(sum(t.y) for t in leak_fig.data) == 6
        holds = co[co["site"].astype(str).str.endswith("in slow_report")]
        assert sum(len(t.x) for t in charts.hold_histogram_chart(holds).data) == 3

    @pytest.mark.parametrize(
        "builder",
        [
            charts.utilization_chart,
            charts.timeline_chart,
            charts.wait_histogram_chart,
            charts.timeouts_chart,
            charts.leaks_chart,
            charts.open_checkouts_chart,
        ],
    )
    def test_empty_frames_give_a_message_not_an_error(self, store, builder):
        """With nothing in the window a chart says so instead of failing."""
        source = {
            charts.utilization_chart: "utilization",
            charts.timeline_chart: "utilization",
            charts.wait_histogram_chart: "checkouts",
            charts.timeouts_chart: "timeouts",
            charts.leaks_chart: "leaks",
            charts.open_checkouts_chart: "checkouts",
        }[builder]
        frame = _frame(store, source).iloc[0:0]
        fig = builder(frame)
        assert not fig.data
        assert fig.layout.annotations[0].text.startswith("no")


class TestData:
    def test_resolve_store_order(self):
        """--store wins over $POOLSCOPE_STORE, which wins over ./poolscope.db."""
        env = {"POOLSCOPE_STORE": "env.db"}
        assert data.resolve_store(["--store", "arg.db"], env) == "arg.db"
        assert data.resolve_store([], env) == "env.db"
        assert data.resolve_store([], {}) == "poolscope.db"

    @pytest.mark.parametrize(
        "chosen",
        [
            analysis.Filters(pools=("billing",)),
            analysis.Filters(processes=(1,)),
            analysis.Filters(since=0.0, until=0.0),
        ],
    )
    def test_filtering_outside_the_cache_agrees_with_analysis(self, store, chosen):
        """Checkouts filtered by the dashboard equal analysis.checkouts with the same filters."""
        everything = _frame(store, "checkouts")
        ours = data.filter_checkouts(everything, chosen)
        theirs = _frame(store, "checkouts", chosen)
        key = ["process_id", "pool_id", "checkout_id"]
        assert ours[key].sort_values(key).values.tolist() == (
            theirs[key].sort_values(key).values.tolist()
        )

    def test_filtering_by_window_agrees_with_analysis(self, store):
        """A window in the middle keeps the same checkouts the analysis keeps."""
        everything = _frame(store, "checkouts")
        middle = float(everything["checked_out_at"].median())
        chosen = analysis.Filters(since=middle, until=middle + 0.3)
        ours = data.filter_checkouts(everything, chosen)
        theirs = _frame(store, "checkouts", chosen)
        assert 0 < len(ours) < len(everything)
        assert sorted(ours["checkout_id"]) == sorted(theirs["checkout_id"])

    def test_a_window_ending_before_an_open_checkout_ends_caps_its_hold(self, store):
        """A connection still open at the end of the window is held until that end, as the
        analysis counts it."""
        everything = _frame(store, "checkouts")
        kept = everything[everything["outcome"] == "open"].iloc[0]
        chosen = analysis.Filters(until=kept["checked_out_at"] + kept["hold_s"] / 2)
        key = ["process_id", "pool_id", "checkout_id"]
        ours = data.filter_checkouts(everything, chosen).set_index(key)["hold_s"]
        theirs = _frame(store, "checkouts", chosen).set_index(key)["hold_s"]
        assert ours.sort_index().to_list() == theirs.sort_index().to_list()
        assert ours[tuple(kept[key])] == pytest.approx(kept["hold_s"] / 2, abs=1e-6)


class TestQueryFilters:
    def test_round_trip(self):
        """Filters written to the URL read back the same."""
        state = filters.FilterState(
            pools=("orders", "billing"), processes=(1, 3), since=1795784812.0,
            until=1795784900.0, leak_after=2.5,
        )  # fmt: skip
        query = filters.to_query(state)
        assert query["since"] == "2026-11-27T13:06:52Z"
        assert filters.from_query(query) == state

    def test_defaults_leave_the_url_clean(self):
        """Filters at their defaults write no query parameters."""
        assert filters.to_query(filters.FilterState()) == {}

    def test_bad_values_are_ignored(self):
        """A hand-edited link with nonsense values still opens, unfiltered."""
        state = filters.from_query(
            {"process": ["x", "2"], "since": "yesterday", "leak_after": "-3", "pool": ""}
        )
        assert state == filters.FilterState(processes=(2,))


class TestFormats:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (None, "—"),
            (float("nan"), "—"),
            (0.0000042, "4 µs"),
            (0.0123, "12.3 ms"),
            (1.5, "1.50 s"),
            (90.0, "1m 30s"),
            (150.0, "2m 30s"),
            (9000.0, "2h 30m"),
        ],
    )
    def test_durations_read_like_people_write_them(self, seconds, text):
        """Durations get the unit that keeps them short."""
        assert ui.fmt_duration(seconds) == text

    def test_the_dashboard_writes_what_the_report_writes(self):
        """A duration, a time and a leak class read the same on the dashboard as in the
        report (one wording each, not "2.5 min" on one and "2m 30s" on the other)."""
        for seconds in (0.0000042, 0.0123, 1.5, 90.0, 150.0, 9000.0):
            assert ui.fmt_duration(seconds) == report.duration(seconds)
        assert ui.fmt_time(1764248957.346) == "2025-11-27 13:09:17.346Z"
        assert ui.fmt_time(None) == "—"
        text = report.render_text(_report_with_each_leak_class())
        for leak_class, meaning in ui.LEAK_CLASSES.items():
            assert f"{leak_class} × 1 at app.py:1 in f" in text
            assert f"    {meaning} · pool p" in text

    def test_peak_against_capacity(self):
        """Peak use shows against capacity, or alone for a pool without a size."""
        assert ui.fmt_peak(10, 10) == "10 / 10"
        assert ui.fmt_peak(3, None) == "3"

    def test_process_command_drops_the_directory(self):
        """The process table shows the script's name, not where it lives on disk."""
        frame = pd.DataFrame(
            {
                "id": [1], "pid": [7], "host": ["h"], "state": ["exited"], "end_reason": ["exit"],
                "started_at": [0.0], "seen_until_at": [1.0],
                "argv": [json.dumps(["/srv/app/run.py", "--port", "80"])],
            }
        )  # fmt: skip
        assert ui.process_table(frame)["command"].iloc[0] == "run.py --port 80"


def _report_with_each_leak_class() -> dict:
    """A minimal report with one leak of each class, as :func:`analysis.build_report` writes it."""
    leak = {"site": "app.py:1 in f", "fingerprint": "f", "pool": "p", "count": 1,
            "first_seen_at": None, "last_seen_at": None, "max_held_s": 1.0,
            "leak_after_s": 0.5, "threads": ["t"], "processes": [1],
            "stack": ["app.py:1 in f"]}  # fmt: skip
    summary = dict.fromkeys(
        ("processes", "crashed_processes", "terminated_processes", "running_processes",
         "pools", "events", "checkouts", "open_checkouts", "peak_in_use", "timeouts",
         "confirmed_leaks", "suspected_leaks", "unknown_leaks", "dropped"), 0)  # fmt: skip
    summary.update(first_event_at=None, last_event_at=None, capacity=None, wait_p95_s=None)
    return {
        "store": "s.db", "summary": summary, "processes": [], "pools": [], "timeouts": [],
        "sites": [], "filters": dict.fromkeys(("pools", "processes", "since", "until")),
        "leaks": [{**leak, "class": c, "certainty": analysis.CERTAINTY[c]}
                  for c in analysis.LEAK_CLASSES],
    }  # fmt: skip


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stores of ``WORKLOAD``, one per host: their process rows' hosts renamed to
    ``web-1`` and ``web-2``, as two machines' would read."""
    directory = tmp_path_factory.mktemp("fleet")
    store = _run_workload(directory, WORKLOAD, "work")
    (directory / "again").mkdir()
    second = _run_workload(directory / "again", WORKLOAD, "work")
    with sqlite3.connect(store) as conn:
        conn.execute("UPDATE processes SET host = 'web-1'")
    conn.close()
    second_store = _copy_store(second, directory / "second.db")
    with sqlite3.connect(second_store) as conn:
        conn.execute("UPDATE processes SET host = 'web-2'")
    conn.close()
    return store, second_store


def _numbers(values) -> np.ndarray:
    """A plotly trace's values as numbers, whether a list or a typed array (``bdata``)."""
    if isinstance(values, dict):
        import base64

        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.array([np.nan if v is None else v for v in values], dtype="float64")


class TestHosts:
    def _two_hosts(self, fleet_store, tmp_path) -> Path:
        """One store holding both runs (web-1's and web-2's), merged through SQLite."""
        first, second = fleet_store
        merged = _copy_store(first, tmp_path / "merged.db")
        with sqlite3.connect(merged) as conn:
            conn.execute("ATTACH DATABASE ? AS other", (str(second),))
            offset_p = conn.execute("SELECT max(id) FROM processes").fetchone()[0]
            offset_pool = conn.execute("SELECT max(id) FROM pools").fetchone()[0]
            conn.execute(
                "INSERT INTO processes SELECT id + ?, pid, NULL, host, argv, python, sqlalchemy, "
                "poolscope, started_at, heartbeat_at, ended_at, end_reason FROM other.processes",
                (offset_p,),
            )
            conn.execute(
                "INSERT INTO pools SELECT id + ?, process_id + ?, name, url, dialect, pool_class, "
                "pool_size, max_overflow, timeout_s, recycle_s, leak_after_s, created_at, "
                "pre_ping FROM other.pools",
                (offset_pool, offset_p),
            )
            conn.execute("INSERT OR IGNORE INTO stacks SELECT * FROM other.stacks")
            columns = ", ".join(_store.EVENT_COLUMNS)
            conn.execute(
                f"INSERT INTO events ({columns}) SELECT {columns.replace('process_id', 'process_id + ?').replace('pool_id', 'pool_id + ?')} FROM other.events",  # noqa: E501
                (offset_p, offset_pool),
            )
        conn.close()
        return merged

    def test_host_filter_narrows_every_number(self, fleet_store, tmp_path, monkeypatch):
        """Choosing host web-2 shows exactly the numbers of web-2's processes, and the link
        says so."""
        store = self._two_hosts(fleet_store, tmp_path)
        at = _app(store, monkeypatch)
        assert at.multiselect(key="hosts").options == ["web-1", "web-2"]
        assert _metrics(at)["Processes"] == "2"
        at.multiselect(key="hosts").set_value(["web-2"]).run()
        assert not at.exception and not at.error
        assert at.query_params["host"] == "web-2"
        web2 = _frame(store, "processes")
        web2_ids = tuple(int(i) for i in web2[web2["host"] == "web-2"]["id"])
        expected = _summary(store, analysis.Filters(processes=web2_ids))
        assert expected["processes"] == 1 and expected["timeouts"] == 1
        assert _metrics(at) == _expected_kpis(expected)

    def test_utilization_by_host(self, fleet_store, tmp_path, monkeypatch):
        """The Utilization page draws each host's in use against its capacity."""
        store = self._two_hosts(fleet_store, tmp_path)
        at = _app(store, monkeypatch, "utilization")
        assert not at.exception and not at.error
        figures = {fig["layout"]["title"]["text"]: fig for fig in _figures(at)}
        names = _trace_names(figures["In use by host"])
        assert names == ["web-1 in use", "web-1 capacity", "web-2 in use", "web-2 capacity"]
        capacity = _numbers(figures["In use by host"]["data"][1]["y"])
        assert np.nanmax(capacity) == 4  # orders 3 + billing 1
        at.multiselect(key="hosts").set_value(["web-1"]).run()
        figures = {fig["layout"]["title"]["text"]: fig for fig in _figures(at)}
        assert _trace_names(figures["In use by host"]) == ["web-1 in use", "web-1 capacity"]


class TestPostgresStore:
    @pytest.fixture
    def pg_store(self, store) -> Iterator[str]:
        """The workload's store pushed into a PostgreSQL store of its own schema, as a URL
        holding a password (which the local server, trusting, ignores)."""
        import psycopg
        from conftest import PG_URL, require_postgres

        from instrument import _push

        require_postgres()
        schema = f"ps_dash_{os.getpid()}_{time.monotonic_ns() % 10**9}"
        head, rest = PG_URL.split("://", 1)
        user, host = rest.split("@", 1)
        url = f"{head}://{user.split(':')[0]}:Dash-Pw-991@{host}?schema={schema}"
        _push.push(store, _store.parse_store(url))
        yield url
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @pytest.mark.postgres
    def test_a_postgresql_store_shows_what_its_file_shows(self, store, pg_store, monkeypatch):
        """The dashboard on a URL shows the file's numbers, and the password nowhere."""
        at = _app(pg_store, monkeypatch)
        assert not at.exception and not at.error
        assert _metrics(at) == _expected_kpis(_summary(store))
        assert "***" in at.text_input(key="store").value
        at.switch_page("app_pages/utilization.py").run()
        assert not at.exception and not at.error
        seen = json.dumps([str(e) for e in at.main] + [str(e) for e in at.sidebar], default=str)
        assert "Dash-Pw-991" not in seen

    @pytest.mark.postgres
    def test_another_url_is_refused(self, store, pg_store, monkeypatch):
        """A URL other than the started store's is refused; another database's at once."""
        at = _app(pg_store, monkeypatch)
        at.text_input(key="store").set_value("mysql://u:pw@h/db").run()
        assert "neither a file path" in at.error[0].value
        at.text_input(key="store").set_value(pg_store.replace("schema=", "schema=x")).run()
        assert "opens only the store it was started on" in at.error[0].value
