"""End to end: the sample shop runs in its own process, and the store names each of its bugs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import PG_URL, query, require_postgres

import instrument
from instrument import _writer, analysis
from instrument.sample_app.__main__ import main
from instrument.sample_app.demo import dashboard_problem

REPO = Path(__file__).resolve().parents[1]

LEAK_AFTER_S = 1.5
"""Long enough that correct code never gets near it on a busy machine, short enough
that the slow card payment (1.5 x leak_after) passes it within a short run."""

BUGS = [
    ("price_with_coupon_leaking_on_error", "gc_reclaimed"),
    ("featured_products_keeping_session", "never_returned"),
    ("iter_order_history_unclosed", "gc_reclaimed"),
    ("charge_card_inside_transaction", "held_too_long"),
]
"""(function in sample_app/bugs.py, the leak class poolscope must give its checkouts)."""

CORRECT = [
    "browse_category",
    "product_detail",
    "search_products",
    "place_order",
    "sales_report",
    "export_orders_csv",
]
"""Request handlers in sample_app/shop.py, which always give their connection back."""


@dataclass
class Run:
    """One finished run of the sample app: its store, what it printed, its frames."""

    store: Path
    stdout: str
    returncode: int
    leaks: pd.DataFrame
    timeouts: pd.DataFrame
    checkouts: pd.DataFrame
    processes: pd.DataFrame


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Run ``python -m sample_app`` for a few seconds on each database, once per module."""
    tmp = tmp_path_factory.mktemp(request.param)
    schema = "shop_" + uuid.uuid4().hex[:12]
    if request.param == "postgresql":
        require_postgres()
        url = PG_URL
    else:
        url = f"sqlite:///{tmp / 'shop.db'}"
    store = tmp / "poolscope.db"
    args = [
        sys.executable, "-m", "sample_app", "--url", url, "--store", str(store),
        "--duration", "6", "--workers", "6", "--seed", "7", "--leak-after", str(LEAK_AFTER_S),
        "--pool-timeout", "0.3", "--bursts", "2", "--schema", schema,
    ]  # fmt: skip
    try:
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=90)
    finally:
        if request.param == "postgresql":
            engine = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
    assert proc.returncode == 0, proc.stderr
    conn = analysis.open_store(store)
    try:
        return Run(
            store=store,
            stdout=proc.stdout,
            returncode=proc.returncode,
            leaks=analysis.leaks(conn),
            timeouts=analysis.timeouts(conn),
            checkouts=analysis.checkouts(conn),
            processes=analysis.processes(conn),
        )
    finally:
        conn.close()


def _at(frame: pd.DataFrame, function: str) -> pd.DataFrame:
    return frame[frame["site"].str.contains(f" in {function}", regex=False)]


class TestBugsFound:
    @pytest.mark.parametrize(("function", "leak_class"), BUGS)
    def test_each_bug_is_its_leak_class_at_its_site(
        self, run: Run, function: str, leak_class: str
    ) -> None:
        """Each deliberate leak shows up with the right class, at a site naming its function."""
        found = _at(run.leaks, function)
        assert "sample_app/bugs.py" in " ".join(found["site"]), run.leaks[["leak_class", "site"]]
        assert leak_class in set(found["leak_class"]), found[["leak_class", "site", "count"]]

    def test_the_cached_session_is_the_only_never_returned_leak(self, run: Run) -> None:
        """Exactly one connection stays checked out at exit: the cached session's."""
        never = run.leaks[run.leaks["leak_class"] == "never_returned"]
        assert list(never["count"]) == [1]
        assert "featured_products_keeping_session" in never["site"].iloc[0]
        assert list(run.processes["state"]) == ["exited"]

    def test_the_burst_times_out_and_names_who_held_the_pool(self, run: Run) -> None:
        """The repricing burst exhausts the pool: timeouts at its site, burst threads holding."""
        burst = _at(run.timeouts, "reprice_product_in_burst")
        assert len(burst) >= 1, run.timeouts[["site", "waited_s"]]
        holders = {h["site"].split(" in ")[-1] for hs in burst["holders"] for h in hs}
        assert "reprice_product_in_burst" in holders
        assert (burst["waited_s"] >= 0.25).all()


class TestCorrectCode:
    @pytest.mark.parametrize("function", CORRECT)
    def test_correct_handlers_ran_and_are_not_leaks(self, run: Run, function: str) -> None:
        """The shop's correct handlers check out connections and are never reported."""
        assert len(_at(run.checkouts, function)) > 0
        assert _at(run.leaks, function).empty, _at(run.leaks, function)

    def test_every_leak_is_in_the_bugs_module(self, run: Run) -> None:
        """No site outside sample_app/bugs.py is reported as a leak (seeding included)."""
        outside = run.leaks[~run.leaks["site"].str.contains("sample_app/bugs.py", regex=False)]
        assert outside.empty, outside[["leak_class", "site"]]


class TestOutput:
    def test_prints_progress_and_the_commands_to_open_the_store(self, run: Run) -> None:
        """The run shows progress lines, then the exact report and dashboard commands."""
        lines = run.stdout.splitlines()
        assert any(line.startswith("[") and "timeouts" in line for line in lines)
        assert f"poolscope report {run.store}" in run.stdout
        assert f"poolscope dashboard {run.store}" in run.stdout

    def test_no_request_failed_except_by_the_bugs(self, run: Run) -> None:
        """Apart from 503s and rejected coupons, every request succeeded."""
        done = [line for line in run.stdout.splitlines() if line.startswith("done after")]
        assert len(done) == 1 and done[0].endswith(", 0 errors"), run.stdout

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--duration", "0"], "sample_app: --duration must be more than 0 seconds, not 0.0"),
            (["--workers", "0"], "sample_app: --workers must be at least 1, not 0"),
            (["--url", "nonsense"], "sample_app: --url 'nonsense' is not a database URL"),
            (["--schema", "a;b"], "sample_app: --schema must be letters, digits and "
                                  "underscores, not 'a;b'"),
        ],
    )  # fmt: skip
    def test_bad_options_exit_2_with_one_line(
        self, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unusable option is one line on stderr and exit code 2."""
        assert main(argv) == 2
        assert capsys.readouterr().err == message + "\n"

    def test_unreachable_database_exits_2_with_one_line(self, tmp_path: Path) -> None:
        """A database that does not answer is one line on stderr, exit code 2, no traceback."""
        proc = subprocess.run(
            [sys.executable, "-m", "sample_app", "--store", str(tmp_path / "s.db"),
             "--url", "postgresql+psycopg://nobody@127.0.0.1:1/none"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2
        assert proc.stderr.startswith("sample_app: cannot use the database: ")
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1


class TestDemo:
    def test_demo_runs_the_shop_and_prints_its_report(self, tmp_path: Path) -> None:
        """``poolscope demo --no-dashboard`` records the shop, then prints the report of it;
        a previous demo's store at --store is replaced, not appended to."""
        store = tmp_path / "demo.db"
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'previous.db'}")
        previous = instrument.attach(engine, store=store, name="previous-demo")
        with engine.connect():
            pass
        previous.flush()
        previous.detach()
        _writer.shutdown_all(timeout=10.0)
        engine.dispose()
        proc = subprocess.run(
            [sys.executable, "-m", "instrument", "demo", "--duration", "3", "--no-dashboard",
             "--store", str(store)],
            cwd=REPO, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"poolscope dashboard {store.resolve()}" in proc.stdout
        report = proc.stdout.split(f"$ poolscope report {store}", 1)[1]
        for function, leak_class in BUGS:
            line = next(x for x in report.splitlines() if f" in {function}" in x)
            assert leak_class in line, line
        assert "Uvicorn" not in proc.stdout + proc.stderr  # no dashboard was started
        assert ("previous-demo",) not in query(store, "SELECT name FROM pools")
        assert query(store, "SELECT count(*) FROM processes") == [(1,)]

    def test_demo_refuses_to_replace_a_file_that_is_not_a_store(self, tmp_path: Path) -> None:
        """A --store that is not a poolscope store is left alone: one line, exit 2."""
        precious = tmp_path / "notes.db"
        precious.write_text("my notes\n")
        proc = subprocess.run(
            [sys.executable, "-m", "instrument", "demo", "--no-dashboard", "--store",
             str(precious)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"poolscope: {precious} exists and is not a poolscope")
        assert len(proc.stderr.splitlines()) == 1
        assert proc.stdout == ""
        assert precious.read_text() == "my notes\n"

    def test_demo_says_why_the_dashboard_cannot_start(self) -> None:
        """Without a dashboard command, the demo names what is missing instead of failing."""
        assert dashboard_problem({"report"}) == "this poolscope has no dashboard command yet"
