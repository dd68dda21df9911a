"""The pytest plugin, run the way a user runs it: a small suite in a pytest subprocess."""

from __future__ import annotations

import re
import textwrap

import pytest
import sqlalchemy as sa
import sqlalchemy.orm  # noqa: F401

pytest_plugins = ["pytester"]

# sqlalchemy.orm is imported here, before any in-process run: pytester unloads the modules
# a run imported, and SQLAlchemy 2.0 refuses to register its ORM types a second time.

SUITE = """
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

engine = sa.create_engine({url!r})
parked = []


@pytest.fixture(scope="module")
def module_connection():
    with engine.connect() as conn:
        yield conn


@pytest.fixture(scope="module")
def module_session():
    with Session(engine) as s:  # checks out lazily, during the first test that queries it
        yield s


@pytest.fixture
def session():
    with Session(engine) as s:
        yield s


def test_uses_module_connection(module_connection):
    assert module_connection.scalar(sa.text("select 1")) == 1


def test_uses_module_session(module_session):
    assert module_session.scalar(sa.text("select 1")) == 1


def test_uses_session_fixture(session):
    assert session.scalar(sa.text("select 1")) == 1


def test_closes_its_connection():
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select 1")) == 1


def test_disposes_engine():
    engine.dispose()
    with Session(engine) as s:
        assert s.scalar(sa.text("select 1")) == 1


{leaky}
"""

LEAKS = {
    "connection": """
        def test_leaky():
            conn = engine.connect()  # leak
            assert conn.scalar(sa.text("select 1")) == 1
        """,
    "session": """
        def test_leaky():
            s = Session(engine)
            assert s.scalar(sa.text("select 1")) == 1  # leak
        """,
    "global": """
        def test_leaky():
            parked.append(engine.connect())  # leak
        """,
}
"""The leaking test of each kind; ``# leak`` marks the line that takes the connection."""

CLEAN_TESTS = 5


def write_suite(pytester: pytest.Pytester, url: str, leaky: str) -> int:
    """Write ``test_app.py``; return the line number of the ``# leak`` line."""
    source = SUITE.format(url=url, leaky=textwrap.dedent(leaky))
    pytester.makepyfile(test_app=source)
    path = pytester.path / "test_app.py"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.rstrip().endswith("# leak"):
            return number
    return 0


def run(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    """Run pytest on the suite; in a fresh interpreter when the test inspects process state."""
    runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest_inprocess
    return runner("-p", "no:cacheprovider", "-v", *args)


def teardown_errors(result: pytest.RunResult) -> list[str]:
    return re.findall(r"ERROR at teardown of (\w+)", result.stdout.str())


class TestLeakingTest:
    @pytest.mark.parametrize("kind", sorted(LEAKS))
    def test_only_the_leaking_test_fails_naming_its_line(
        self, pytester: pytest.Pytester, db_url: str, kind: str
    ) -> None:
        """With --pool-leaks, the test that leaks errors at teardown with the line that took
        the connection, its thread and its stack; every clean test passes."""
        line = write_suite(pytester, db_url, LEAKS[kind])
        result = run(pytester, "--pool-leaks")
        assert result.ret == 1
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)
        assert teardown_errors(result) == ["test_leaky"]
        result.stdout.fnmatch_lines(
            [
                f"poolscope: test_leaky leaked 1 connection; checked out at "
                f"test_app.py:{line} in test_leaky (thread MainThread), *",
                "*stack (most recent call last):",
                f"*test_app.py:{line} in test_leaky",
                "*# leak",
            ]
        )
        how = "still checked out" if kind == "global" else "only the garbage collector"
        assert how in result.stdout.str()
        result.stdout.fnmatch_lines(["poolscope: * watched in 6 tests, 1 leak found"])

    def test_plugin_off_every_test_passes(self, pytester: pytest.Pytester, db_url: str) -> None:
        """Without the option, marker or fixture, the leaking suite passes and the plugin
        prints nothing."""
        write_suite(pytester, db_url, LEAKS["connection"] + LEAKS["global"].replace("y(", "y2("))
        result = run(pytester)
        result.assert_outcomes(passed=CLEAN_TESTS + 2)
        assert "poolscope:" not in result.stdout.str()

    def test_allowed_leak_passes(self, pytester: pytest.Pytester, sqlite_url: str) -> None:
        """@pytest.mark.allow_pool_leak lets a known leak pass, and the summary counts it."""
        leaky = "@pytest.mark.allow_pool_leak(reason='known: issue 12')\n" + textwrap.dedent(
            LEAKS["global"]
        )
        write_suite(pytester, sqlite_url, leaky)
        result = run(pytester, "--pool-leaks")
        result.assert_outcomes(passed=CLEAN_TESTS + 1)
        result.stdout.fnmatch_lines(["poolscope: * watched in 6 tests, 1 leak found (1 allowed)"])

    def test_leak_in_a_function_fixture_is_the_tests(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """A function-scoped fixture that never closes its connection fails the test that
        used it, even when the test also uses session-scoped fixtures."""
        leaky = """
            @pytest.fixture
            def unclosed():
                return engine.connect()  # leak


            def test_leaky(unclosed, pytestconfig, tmp_path_factory):
                assert unclosed.scalar(sa.text("select 1")) == 1
            """
        line = write_suite(pytester, sqlite_url, leaky)
        result = run(pytester, "--pool-leaks")
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)
        assert teardown_errors(result) == ["test_leaky"]
        result.stdout.fnmatch_lines([f"*checked out at test_app.py:{line} in unclosed*"])

    def test_thread_that_leaks_is_named(self, pytester: pytest.Pytester, sqlite_url: str) -> None:
        """A connection taken in a thread the test started names that thread and its line."""
        leaky = """
            def test_leaky():
                def take():
                    parked.append(engine.connect())  # leak

                worker = threading.Thread(target=take, name="report-worker")
                worker.start()
                worker.join()
            """
        line = write_suite(pytester, sqlite_url, leaky)
        result = run(pytester, "--pool-leaks")
        assert teardown_errors(result) == ["test_leaky"]
        result.stdout.fnmatch_lines(
            [
                f"poolscope: test_leaky leaked 1 connection; checked out at test_app.py:{line} "
                "in take (thread report-worker), still checked out after the test"
            ]
        )


class TestPoolEventsCleared:
    CLEARS = """
        @pytest.fixture
        def clears_events_then_closes():
            conn = engine.connect()
            yield conn
            sa.pool.Pool.dispatch._clear()  # as SQLAlchemy's PoolEventsTest teardown does
            conn.close()


        def test_clears_pool_events(clears_events_then_closes):
            assert clears_events_then_closes.scalar(sa.text("select 1")) == 1


        def test_clears_pool_events_again():
            sa.pool.Pool.dispatch._clear()
        """

    def test_leak_after_a_suite_clears_pool_events_is_still_flagged(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """A suite that clears every class-level pool listener still has its later leak
        flagged, and the connection returned after the clear is not called a leak."""
        line = write_suite(
            pytester, sqlite_url, textwrap.dedent(self.CLEARS) + textwrap.dedent(LEAKS["global"])
        )
        result = run(pytester, "--pool-leaks", subprocess=True)
        result.assert_outcomes(passed=CLEAN_TESTS + 3, errors=1)
        assert teardown_errors(result) == ["test_leaky"]
        result.stdout.fnmatch_lines(
            [f"poolscope: test_leaky leaked 1 connection; checked out at test_app.py:{line} *"]
        )
        result.stdout.fnmatch_lines(["poolscope: 7 * watched in 8 tests, 1 leak found"])

    def test_marked_test_after_a_clear_is_checked(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """With the check asked for by a marker, a marked test running after a clear is
        still checked."""
        clears = textwrap.dedent(self.CLEARS)
        leaky = clears.replace("def test_clears", "@pytest.mark.pool_leaks\ndef test_clears")
        leaky += "\n\n@pytest.mark.pool_leaks\n" + textwrap.dedent(LEAKS["connection"])
        line = write_suite(pytester, sqlite_url, leaky)
        result = run(pytester, subprocess=True)
        result.assert_outcomes(passed=CLEAN_TESTS + 3, errors=1)
        assert teardown_errors(result) == ["test_leaky"]
        result.stdout.fnmatch_lines([f"*checked out at test_app.py:{line} in test_leaky*"])


class TestOwnFailures:
    def test_a_failing_listener_never_reaches_the_test(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """If the plugin's own listener raises, the test's checkout still works: the test
        passes and the failure is logged once on logger ``poolscope``."""
        broken = """
            def test_checkout_survives(monkeypatch, caplog):
                import logging
                import instrument._stacks as stacks

                def boom(*args):
                    raise RuntimeError("boom")

                monkeypatch.setattr(stacks, "stack_key", boom)  # the listener's stack capture
                with caplog.at_level(logging.ERROR, logger="poolscope"):
                    with engine.connect() as conn:
                        assert conn.scalar(sa.text("select 1")) == 1
                    with engine.connect() as conn:
                        assert conn.scalar(sa.text("select 1")) == 1
                failures = [r for r in caplog.records if r.name == "poolscope"]
                assert len(failures) == 1
                assert "_on_checkout failed" in failures[0].getMessage()
            """
        write_suite(pytester, sqlite_url, broken)
        result = run(pytester, "--pool-leaks", "-k", "survives")
        result.assert_outcomes(passed=1)


class TestOptIn:
    def test_marker_checks_only_the_marked_test(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """Without --pool-leaks, @pytest.mark.pool_leaks checks that one test only."""
        leaky = textwrap.dedent(LEAKS["global"]).replace("test_leaky", "test_unmarked_leak")
        leaky += "\n\n@pytest.mark.pool_leaks\n" + textwrap.dedent(LEAKS["connection"])
        write_suite(pytester, sqlite_url, leaky)
        result = run(pytester)
        result.assert_outcomes(passed=CLEAN_TESTS + 2, errors=1)
        assert teardown_errors(result) == ["test_leaky"]
        result.stdout.fnmatch_lines(["poolscope: * watched in 1 test, 1 leak found"])

    def test_fixture_checks_the_test_and_lists_open_checkouts(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """A test that asks for the pool_leaks fixture is checked, and the fixture lists
        the connections it holds right now."""
        leaky = """
            def test_leaky(pool_leaks):
                parked.append(engine.connect())  # leak
                held = pool_leaks.open_checkouts()
                assert [c.site for c in held] == [f"test_app.py:{LINE} in test_leaky"]
                assert held[0].thread == "MainThread"
                assert pool_leaks.checkouts == 1
            """
        line = write_suite(pytester, sqlite_url, leaky)
        source = (pytester.path / "test_app.py").read_text().replace("{LINE}", str(line))
        (pytester.path / "test_app.py").write_text(source)
        result = run(pytester)
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)
        assert teardown_errors(result) == ["test_leaky"]

    @pytest.mark.parametrize("how", ["-p", "conftest"])
    def test_named_explicitly_as_well_as_by_the_entry_point(
        self, pytester: pytest.Pytester, sqlite_url: str, how: str
    ) -> None:
        """``-p instrument.pytest_plugin`` or a conftest's ``pytest_plugins`` naming the
        plugin works even though the installed entry point loads it too."""
        write_suite(pytester, sqlite_url, LEAKS["global"])
        if how == "-p":
            result = run(pytester, "-p", "instrument.pytest_plugin", "--pool-leaks")
        else:
            pytester.makeconftest('pytest_plugins = ["instrument.pytest_plugin"]\n')
            result = run(pytester, "--pool-leaks")
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)

    def test_bad_max_hold_is_a_usage_error(self, pytester: pytest.Pytester) -> None:
        """A --pool-max-hold that is not a positive number is refused in one line."""
        pytester.makepyfile(test_app="def test_nothing():\n    pass\n")
        result = run(pytester, "--pool-max-hold=soon")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["*argument --pool-max-hold: expected a number of seconds above 0, not 'soon'"]
        )
        assert "Traceback" not in result.stderr.str()


class TestOffCostsNothing:
    PROBE = """
        def test_leaky():
            probe = sa.create_engine({url!r})
            assert not probe.pool.dispatch.checkout, "a checkout listener is installed"
            names = [t.name for t in threading.enumerate()]
            assert names == ["MainThread"], names
        """

    def test_off_adds_no_listener_and_no_thread(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """Loaded but off, the plugin leaves pools without listeners and starts no thread;
        turned on, the same probe sees its listener."""
        write_suite(pytester, sqlite_url, self.PROBE.format(url=sqlite_url))
        run(pytester, subprocess=True).assert_outcomes(passed=CLEAN_TESTS + 1)
        result = run(pytester, "--pool-leaks", subprocess=True)
        result.assert_outcomes(passed=CLEAN_TESTS, failed=1)
        result.stdout.fnmatch_lines(["*a checkout listener is installed*"])

    def test_leaves_no_listener_behind(self, pytester: pytest.Pytester, sqlite_url: str) -> None:
        """After a run with --pool-leaks, the process's pools carry no listener of it."""

        def checkout_listeners() -> int:
            probe = sa.create_engine(sqlite_url)
            try:
                return len(probe.pool.dispatch.checkout)
            finally:
                probe.dispose()

        before = checkout_listeners()
        write_suite(pytester, sqlite_url, LEAKS["global"])
        run(pytester, "--pool-leaks").assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)
        assert checkout_listeners() == before

    def test_off_does_not_import_the_recorder(self, pytester: pytest.Pytester) -> None:
        """Loaded but off, the plugin imports neither the recorder nor SQLAlchemy."""
        pytester.makepyfile(
            test_probe="""
            import sys

            def test_probe():
                loaded = [m for m in ("sqlalchemy", "instrument._hooks") if m in sys.modules]
                assert loaded == []
            """
        )
        run(pytester, subprocess=True).assert_outcomes(passed=1)


class TestHoldBudget:
    def test_max_hold_fails_the_slow_test(self, pytester: pytest.Pytester, sqlite_url: str) -> None:
        """--pool-max-hold=S fails the test that held a connection longer than S seconds."""
        leaky = """
            def test_slow():
                with engine.connect() as conn:  # leak
                    time.sleep(0.5)
            """
        line = write_suite(pytester, sqlite_url, leaky)
        result = run(pytester, "--pool-max-hold=0.25")
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)
        assert teardown_errors(result) == ["test_slow"]
        result.stdout.fnmatch_lines(
            [
                "poolscope: test_slow held a connection * s, over --pool-max-hold=0.25; "
                f"checked out at test_app.py:{line} in test_slow (thread MainThread)",
            ]
        )
        result.stdout.fnmatch_lines(["poolscope: * 0 leaks found (1 held past the hold budget)"])

    def test_marker_sets_the_budget_of_one_test(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """@pytest.mark.pool_leaks(max_hold=S) sets that test's budget; a budget that is not
        a positive number errors in one line."""
        leaky = """
            @pytest.mark.pool_leaks(max_hold=0.25)
            def test_slow():
                with engine.connect() as conn:  # leak
                    time.sleep(0.5)


            @pytest.mark.pool_leaks(max_hold="soon")
            def test_bad_budget():
                pass
            """
        line = write_suite(pytester, sqlite_url, leaky)
        result = run(pytester)
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=2)
        assert teardown_errors(result) == ["test_slow"]
        result.stdout.fnmatch_lines(
            [
                "poolscope: test_slow held a connection * s, over pool_leaks(max_hold=0.25); "
                f"checked out at test_app.py:{line} in test_slow (thread MainThread)",
                "*ERROR at setup of test_bad_budget*",
                "pool_leaks(max_hold=...) takes a number of seconds above 0, not 'soon'",
            ]
        )


class TestXdist:
    def test_each_worker_checks_and_the_summary_adds_up(
        self, pytester: pytest.Pytester, sqlite_url: str
    ) -> None:
        """Under pytest-xdist, the leaking test still fails and the summary counts every
        worker's tests."""
        line = write_suite(pytester, sqlite_url, LEAKS["connection"])
        result = run(pytester, "-n", "2", "--pool-leaks", subprocess=True)
        result.assert_outcomes(passed=CLEAN_TESTS + 1, errors=1)
        result.stdout.fnmatch_lines([f"*checked out at test_app.py:{line} in test_leaky*"])
        result.stdout.fnmatch_lines(["poolscope: * watched in 6 tests, 1 leak found"])
