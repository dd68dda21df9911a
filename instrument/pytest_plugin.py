"""pytest plugin: fail the test that leaks a pooled connection, naming the line that took it.

Installed with poolscope and loaded by every pytest run, but off until asked for:

- ``pytest --pool-leaks`` checks every test;
- ``@pytest.mark.pool_leaks`` or the ``pool_leaks`` fixture checks one test;
- ``@pytest.mark.allow_pool_leak(reason=...)`` lets a known leak pass;
- ``--pool-max-hold=S`` (or ``@pytest.mark.pool_leaks(max_hold=S)``) also fails a
  test that held one connection longer than ``S`` seconds.

After each checked test (and its function-scoped fixtures' teardown), a connection
checked out during it that is still checked out, or that only the garbage collector
returned, fails the test at teardown with the site, the thread and the stack of the
checkout. A connection that a module-, class- or session-scoped fixture takes while
it is set up, or that such a fixture's value still holds after the test (a module-scoped
``Session`` checks out lazily, in the first test that queries it), is that fixture's
and not blamed on the test.

With the plugin off, this module registers its options, markers and fixture and
nothing else: it imports neither SQLAlchemy nor the recorder, adds no listener and
starts no thread.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import linecache
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ._record import CO_AT as _AT
from ._record import CO_ID as _SEQ
from ._record import CO_PROXY as _PROXY
from ._record import CO_STACK as _STACK
from ._record import CO_THREAD as _THREAD
from ._record import returned_by_gc

_CHECK_KEY = pytest.StashKey["_LeakCheck"]()
_TOTALS_KEY = pytest.StashKey["dict[str, int]"]()
_PENDING_KEY = pytest.StashKey[str]()

_PLUGIN_NAME = "poolscope-leak-check"
_HARNESS_MODULES = ("_pytest.", "pytest.", "pluggy.", "xdist.")
_TOTAL_FIELDS = ("tests", "checkouts", "leaks", "allowed", "over_budget")

# _LeakCheck.open maps a connection record to the recorder's open-checkout entry
# (_record.ENTRY_FIELDS), its checkout id being the check's own sequence number.


# ---- options, markers, fixture (always registered, cost nothing) -------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("poolscope", "poolscope: pooled connection leaks")
    group.addoption(
        "--pool-leaks",
        action="store_true",
        default=False,
        help="fail every test that leaves a SQLAlchemy pooled connection checked out, or "
        "leaves it to the garbage collector to return",
    )
    group.addoption(
        "--pool-max-hold",
        type=_seconds,
        default=None,
        metavar="S",
        help="also fail a test that held one pooled connection longer than S seconds "
        "(implies --pool-leaks)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pool_leaks(max_hold=None): fail this test if it leaks a pooled connection "
        "(poolscope); max_hold also fails a connection held longer than that many seconds",
    )
    config.addinivalue_line(
        "markers",
        "allow_pool_leak(reason): this test is known to leak a pooled connection; "
        "poolscope reports the leak but does not fail the test",
    )
    if config.getoption("pool_leaks") or config.getoption("pool_max_hold") is not None:
        _LeakCheck.ensure(config, everywhere=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Turn the check on (for those tests only) when a test asks for it."""
    if _CHECK_KEY in config.stash:
        return
    if any(_asks_for_check(item) for item in items):
        _LeakCheck.ensure(config, everywhere=False)


def _asks_for_check(item: pytest.Item) -> bool:
    """Tell whether ``item`` has the ``pool_leaks`` marker or uses the ``pool_leaks`` fixture."""
    return item.get_closest_marker("pool_leaks") is not None or "pool_leaks" in getattr(
        item, "fixturenames", ()
    )


@pytest.fixture
def pool_leaks(request: pytest.FixtureRequest) -> PoolLeaks:
    """Check this test for leaked pooled connections; returns a :class:`PoolLeaks` handle."""
    check = _LeakCheck.ensure(request.config, everywhere=False)
    error = check.begin(request.node)
    if error:
        pytest.fail(error, pytrace=False)
    return PoolLeaks(check)


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    # This module may be named twice: by the ``poolscope`` entry point and by
    # ``-p instrument.pytest_plugin``, ``PYTEST_PLUGINS`` or a conftest's ``pytest_plugins``.
    # pluggy refuses one module under two names, so the second name is blocked (skipped).
    if plugin is sys.modules[__name__]:
        name = manager.get_name(plugin)
        for other in ("poolscope", __name__):
            if other != name and manager.get_plugin(other) is None:
                manager.set_blocked(other)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist controller: add up what each worker's check counted."""
    counts = getattr(node, "workeroutput", {}).get("poolscope")
    if counts:
        totals = node.config.stash.setdefault(_TOTALS_KEY, dict.fromkeys(_TOTAL_FIELDS, 0))
        for field in _TOTAL_FIELDS:
            totals[field] += int(counts.get(field, 0))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line: checkouts watched and leaks found (only when the check ran)."""
    totals = config.stash.get(_TOTALS_KEY, None)
    if totals is None:
        return
    leaks = totals["leaks"]
    line = (
        f"poolscope: {totals['checkouts']} pooled connection checkout"
        f"{'' if totals['checkouts'] == 1 else 's'} watched in {totals['tests']} "
        f"test{'' if totals['tests'] == 1 else 's'}, {leaks} leak{'' if leaks == 1 else 's'} found"
    )
    extras = []
    if totals["allowed"]:
        extras.append(f"{totals['allowed']} allowed")
    if totals["over_budget"]:
        extras.append(f"{totals['over_budget']} held past the hold budget")
    if extras:
        line += f" ({', '.join(extras)})"
    bad = leaks - totals["allowed"] + totals["over_budget"]
    terminalreporter.write_line(line, red=bool(bad), green=not bad)


# ---- the check (registered only when on) ----------------------------------------------------


@dataclass(frozen=True)
class CheckoutReport:
    """One checkout the check reports: leaked, held past the budget, or held right now.

    ``how`` is ``"open"`` (still checked out), ``"gc"`` (returned only by the garbage
    collector) or ``"held"`` (returned by code, but held past the hold budget).
    ``stack`` lists ``(frame, source line)`` pairs, outermost first, ending at ``site``.
    """

    how: str
    site: str
    thread: str
    held_s: float
    stack: tuple[tuple[str, str], ...]


class PoolLeaks:
    """What the ``pool_leaks`` fixture returns: the check of the running test."""

    def __init__(self, check: _LeakCheck) -> None:
        self._check = check

    def open_checkouts(self) -> list[CheckoutReport]:
        """Connections checked out during this test and still checked out now, oldest first."""
        return self._check.still_open()

    @property
    def checkouts(self) -> int:
        """Connections checked out so far during this test."""
        return self._check.checkouts_so_far()


class _LeakCheck:
    """Watches every SQLAlchemy pool of the process and judges the tests it is asked to.

    Why class-level ``PoolEvents`` listeners (``event.listen(Pool, "checkout", ...)``)
    rather than attaching a :class:`instrument.Monitor` to each engine:

    - Listeners on the ``Pool`` class reach every pool, on SQLAlchemy 2.0 and 2.1:
      those created before the check started, those created during it, and the
      fresh pool ``engine.dispose()`` puts in place. No engine-creation hook does as
      much: a ``CreateEnginePlugin`` loads only when the URL or ``create_engine(plugins=)``
      names it; ``engine_connect`` and a class-level ``checkout`` fire only after the
      checkout that would reveal a new engine, so the first (often the leaking) one is
      missed; ``first_connect`` gives the pool, but a bare-pool monitor's listeners are
      copied to the pool that ``dispose()`` creates, which would record it twice.
    - ``attach()`` keeps one monitor per engine: a monitor of ours would be handed to
      the suite's own ``attach()`` calls, and its events sent to our store.
    - The verdict is needed synchronously after each test; bookkeeping in memory avoids
      a store round trip per test.

    What is shared with the recorder: stack capture and resolution (``StackTable``), so
    sites read the same as in ``poolscope report``, and the rule for telling a leak
    (at checkin, the proxy the checkout handed out is already garbage; on async
    dialects the garbage collector detaches the connection instead).
    """

    def __init__(self, config: pytest.Config, everywhere: bool) -> None:
        from sqlalchemy.pool import Pool

        from ._stacks import StackTable

        self.config = config
        self.everywhere = everywhere
        self.max_hold: float | None = config.getoption("pool_max_hold")
        self.stacks = StackTable()
        self.open: dict[Any, tuple[Any, ...]] = {}
        self.returned: list[tuple[tuple[Any, ...], float, bool]] = []
        self.budget = [float("inf")]  # hold budget of the running test, read by _on_checkin
        self._pool_class = Pool
        self._next_seq = itertools.count(1).__next__
        self._listeners = self._make_listeners()
        self._installed = False
        self._item: pytest.Item | None = None
        self._start = 0
        self._marks = 0
        self._exempt: list[tuple[int, int]] = []
        self._wide: dict[int, Any] = {}  # live values of module/class/session fixtures
        # The session's counts, printed by pytest_terminal_summary (or, on a pytest-xdist
        # worker, sent to the controller, which adds them up in pytest_testnodedown).
        self.totals = config.stash.setdefault(_TOTALS_KEY, dict.fromkeys(_TOTAL_FIELDS, 0))
        if everywhere:
            self._install()

    @classmethod
    def ensure(cls, config: pytest.Config, everywhere: bool) -> _LeakCheck:
        """Return the session's check, creating and registering it on first use."""
        check = config.stash.get(_CHECK_KEY, None)
        if check is None:
            check = config.stash[_CHECK_KEY] = cls(config, everywhere)
            config.pluginmanager.register(check, _PLUGIN_NAME)
        return check

    # -- listeners -------------------------------------------------------------------

    def _make_listeners(self) -> dict[str, Callable[..., None]]:
        open_ = self.open
        returned = self.returned
        budget = self.budget
        capture = self.stacks.capture
        capture_async = self.stacks.capture_async
        modules = sys.modules
        next_seq = self._next_seq
        now = time.time
        current_thread = threading.current_thread
        ref = weakref.ref

        def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            """``PoolEvents.checkout``: remember who took ``record``, and from where."""
            # Async engines run this inside a greenlet: the caller's frames are in its parent.
            greenlet = modules.get("greenlet")
            if greenlet is not None and greenlet.getcurrent().parent is not None:
                sid = capture_async()
            else:
                sid = capture()
            open_[record] = (next_seq(), now(), current_thread().name, sid, ref(proxy), None)

        def _on_checkin(dbapi_connection: Any, record: Any) -> None:
            """``PoolEvents.checkin``: by code if the proxy still exists, else by the GC."""
            entry = open_.pop(record, None)
            if entry is None:
                return
            held = now() - entry[_AT]
            by_code = not returned_by_gc(entry)
            if not by_code or held > budget[0]:
                returned.append((entry, held, by_code))

        def _on_detach(dbapi_connection: Any, record: Any) -> None:
            """``PoolEvents.detach``: on async dialects the GC detaches a leaked connection."""
            entry = open_.pop(record, None)
            if entry is not None and returned_by_gc(entry):
                returned.append((entry, now() - entry[_AT], False))

        from ._failures import guarded  # their own failure never reaches the test

        listeners = {"checkout": _on_checkout, "checkin": _on_checkin, "detach": _on_detach}
        return {name: guarded(fn) for name, fn in listeners.items()}

    def _install(self) -> None:
        """Listen on ``Pool``; put back any listener something removed since (idempotent).

        A suite may clear every class-level pool listener (SQLAlchemy's own
        ``PoolEventsTest`` calls ``Pool.dispatch._clear()`` after each test), which takes
        ours too: this runs at each test's setup and end, so the check is blind at most
        until then. Three ``event.contains`` look-ups per test; nothing on the hot path.
        """
        from sqlalchemy import event

        lost = False
        for name, fn in self._listeners.items():
            if not event.contains(self._pool_class, name, fn):
                event.listen(self._pool_class, name, fn)
                lost = self._installed
        self._installed = True
        if lost:
            self._forget_unseen()

    def _forget_unseen(self) -> None:
        """Drop the checkouts whose return the listeners, while removed, may have missed.

        An entry is kept only if its connection is still checked out to the same proxy
        (``_ConnectionRecord.fairy_ref``); the others were returned unseen (or their
        proxy is gone and nothing can tell how): they are neither leaks nor kept alive.
        """
        for record, entry in list(self.open.items()):
            proxy = entry[_PROXY]()
            fairy_ref = getattr(record, "fairy_ref", None)
            if proxy is None or fairy_ref is None or fairy_ref() is not proxy:
                self.open.pop(record, None)

    def _uninstall(self) -> None:
        if self._installed:
            from sqlalchemy import event

            for name, fn in self._listeners.items():
                if event.contains(self._pool_class, name, fn):
                    event.remove(self._pool_class, name, fn)
            self._installed = False
        self.open.clear()
        del self.returned[:]

    # -- one test --------------------------------------------------------------------

    def wants(self, item: pytest.Item) -> bool:
        return self.everywhere or _asks_for_check(item)

    def begin(self, item: pytest.Item) -> str | None:
        """Start the window of ``item``: checkouts from now on are its own (idempotent).

        :returns: an error message if the test's ``pool_leaks`` marker is malformed.
        """
        if self._item is item:
            return None
        self._install()
        self._item = item
        self._start = self._mark()
        self._marks = 0
        self._exempt = []
        del self.returned[:]
        default = self.max_hold if self.max_hold is not None else float("inf")
        marker = item.get_closest_marker("pool_leaks")
        value: Any = marker.kwargs.get("max_hold") if marker is not None else None
        self.budget[0] = default
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"pool_leaks(max_hold=...) takes a number of seconds above 0, not {value!r}"
        self.budget[0] = float(value)
        return None

    def _mark(self) -> int:
        """Take a sequence number to mark a point in time (checkouts take the others)."""
        self._marks += 1
        return self._next_seq()

    def _mine(self, seq: int) -> bool:
        return seq > self._start and not any(lo < seq < hi for lo, hi in self._exempt)

    def _open_entries(self) -> list[tuple[Any, ...]]:
        while True:
            try:
                entries = list(self.open.values())
            except RuntimeError:  # a GC callback returned a connection meanwhile
                continue
            return sorted((e for e in entries if self._mine(e[_SEQ])), key=lambda e: e[_SEQ])

    def still_open(self) -> list[CheckoutReport]:
        if self._item is None:
            return []
        t = time.time()
        return [self._describe("open", e, t - e[_AT]) for e in self._open_entries()]

    def checkouts_so_far(self) -> int:
        return self._mark() - self._start - self._marks if self._item is not None else 0

    def finish(self) -> tuple[list[CheckoutReport], list[CheckoutReport]]:
        """End the window: return (leaks, connections held past the budget)."""
        item = self._item
        if item is None:
            return [], []
        self._install()  # listeners removed during the test: judge only what is still out
        if self._open_entries():
            gc.collect()  # a Session or Connection in a reference cycle goes back only now
        t = time.time()
        still_open = self._open_entries()
        if still_open and self._wide:
            # A module- or session-scoped Session checks out lazily, during the first test
            # that queries it; the connection is that fixture's, not the test's.
            owned = _reachable(list(self._wide.values()), still_open, self._pool_class)
            still_open = [e for e in still_open if id(e[_PROXY]()) not in owned]
        leaks = [self._describe("open", e, t - e[_AT]) for e in still_open]
        held = []
        for entry, hold_s, by_code in list(self.returned):
            if self._mine(entry[_SEQ]):
                if by_code:
                    held.append(self._describe("held", entry, hold_s))
                else:
                    leaks.append(self._describe("gc", entry, hold_s))
        checkouts = self.checkouts_so_far()
        self._item = None
        del self.returned[:]
        self.budget[0] = float("inf")
        if not self.everywhere:
            self._uninstall()
        allowed = item.get_closest_marker("allow_pool_leak") is not None
        self.totals["tests"] += 1
        self.totals["checkouts"] += max(checkouts, 0)
        self.totals["leaks"] += len(leaks)
        self.totals["allowed"] += len(leaks) if allowed else 0
        self.totals["over_budget"] += len(held)
        return ([] if allowed else leaks), held

    def _describe(self, how: str, entry: tuple[Any, ...], held_s: float) -> CheckoutReport:
        site, stack = _render_stack(self.stacks, entry[_STACK])
        return CheckoutReport(how, site, entry[_THREAD], held_s, stack)

    # -- hooks -----------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        error = self.begin(item) if self.wants(item) else None
        result = yield
        if error:  # raised only now: the other plugins' setup must have run
            pytest.fail(error, pytrace=False)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Iterator[Any]:
        # A connection taken while a wider-scoped fixture is set up is that fixture's.
        if fixturedef.scope == "function":
            return (yield)
        lo = self._mark() if self._item is not None else None
        try:
            value = yield
        finally:
            if lo is not None and self._item is not None:
                self._exempt.append((lo, self._mark()))
        if not getattr(fixturedef.func, "__module__", "").startswith(_HARNESS_MODULES):
            self._wide[id(fixturedef)] = value
        return value

    def pytest_fixture_post_finalizer(self, fixturedef: Any, request: Any) -> None:
        self._wide.pop(id(fixturedef), None)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: Any) -> Iterator[None]:
        try:
            result = yield
        except BaseException:
            leaks, held = self.finish()
            if leaks or held:
                item.stash[_PENDING_KEY] = _message(item, leaks, held, self.budget_text(item))
            raise
        leaks, held = self.finish()
        if leaks or held:
            pytest.fail(_message(item, leaks, held, self.budget_text(item)), pytrace=False)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Iterator[Any]:
        report = yield
        if call.when == "teardown":
            text = item.stash.get(_PENDING_KEY, None)
            if text is not None:
                report.sections.append(("poolscope", text))
        return report

    def budget_text(self, item: pytest.Item) -> str:
        marker = item.get_closest_marker("pool_leaks")
        if marker is not None and marker.kwargs.get("max_hold") is not None:
            return f"pool_leaks(max_hold={marker.kwargs['max_hold']})"
        return f"--pool-max-hold={self.max_hold:g}" if self.max_hold is not None else ""

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # a pytest-xdist worker: the controller prints the line
            workeroutput["poolscope"] = dict(self.totals)
        self._uninstall()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._uninstall()


def _reachable(roots: list[Any], entries: list[tuple[Any, ...]], pool_class: type) -> set[int]:
    """Return the ids of the entries' proxies that ``roots`` reach through references.

    The walk does not enter modules, classes, functions or pools (a fixture holding an
    engine does not own every connection of its pool), nor pytest's own objects (from
    the config and the session every test and its function-scoped fixture values are
    reachable), and stops after 200,000 objects.
    """
    targets = {id(p) for p in (e[_PROXY]() for e in entries) if p is not None}
    found: set[int] = set()
    seen: set[int] = set()
    stop = (
        types.ModuleType,
        type,
        types.FunctionType,
        types.MethodType,
        pool_class,
        pytest.Config,
        pytest.Item,
        pytest.Collector,
        pytest.FixtureRequest,
        _LeakCheck,
    )
    todo = list(roots)
    while todo and len(seen) < 200_000:
        obj = todo.pop()
        key = id(obj)
        if key in seen:
            continue
        seen.add(key)
        if key in targets:
            found.add(key)
            if found == targets:
                break
            continue
        if not isinstance(obj, stop):
            todo.extend(gc.get_referents(obj))
    return found


# ---- rendering ----------------------------------------------------------------------------


def _harness_dirs() -> tuple[str, ...]:
    import _pytest
    import pluggy

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (_pytest, pluggy))


def _render_stack(stacks: Any, sid: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Return the site and the ``(frame, source line)`` pairs, outermost first.

    The frames stop where pytest's own machinery begins, and start at the site:
    the innermost frame that is application code (see ``instrument._stacks``).
    """
    from ._stacks import is_application_file, line_of, resolve_frames

    harness = _harness_dirs()
    frames = stacks.frames.get(sid, [])
    for i, (code, _) in enumerate(frames):
        if os.path.abspath(code.co_filename).startswith(harness):
            frames = frames[:i]
            break
    resolved = resolve_frames(frames)
    # resolved.frames is the text of the frames from the site outwards.
    shown = list(zip(frames[len(frames) - len(resolved.frames) :], resolved.frames, strict=True))
    # Thread and event-loop plumbing (the standard library) says nothing about the leak.
    shown = [f for f in shown if is_application_file(f[0][0].co_filename)] or shown
    pairs = []
    for (code, offset), text in reversed(shown):
        pairs.append((text, linecache.getline(code.co_filename, line_of(code, offset)).strip()))
    return resolved.site, tuple(pairs)


_HOW = {
    "open": "still checked out after the test",
    "gc": "never closed: only the garbage collector returned it",
    "held": "held too long",
}


def _message(
    item: pytest.Item, leaks: list[CheckoutReport], held: list[CheckoutReport], budget: str
) -> str:
    """The failure text: a headline naming the first site, then one block per problem."""
    problems = leaks + held
    first = problems[0]
    name = item.name
    if leaks:
        count = f"{len(leaks)} connection{'s' if len(leaks) > 1 else ''}"
        head = (
            f"poolscope: {name} leaked {count}; checked out at {first.site} "
            f"(thread {first.thread}), {_HOW[first.how]}"
        )
    else:
        head = (
            f"poolscope: {name} held a connection {first.held_s:.2f} s, over {budget}; "
            f"checked out at {first.site} (thread {first.thread})"
        )
    lines = [head]
    for n, problem in enumerate(problems, 1):
        if problem.how == "held":
            what = f"held {problem.held_s:.2f} s, over {budget}"
        elif problem.how == "open":
            what = f"{_HOW['open']}, held {problem.held_s:.2f} s so far"
        else:
            what = f"{_HOW['gc']} after {problem.held_s:.2f} s"
        lines += [
            "",
            f"[{n}] connection {what}",
            f"    checked out at {problem.site}, thread {problem.thread}",
            "    stack (most recent call last):",
        ]
        for frame, source in problem.stack:
            lines.append(f"      {frame}")
            if source:
                lines.append(f"        {source}")
    if leaks:
        lines += [
            "",
            "Close the connection or session (a `with` block does it), or mark the test "
            '@pytest.mark.allow_pool_leak(reason="...") if the leak is known.',
        ]
    return "\n".join(lines)
