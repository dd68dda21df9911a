"""Why a long hold was held: the per-checkout breakdown (SQL, idle in a transaction, idle)
and PostgreSQL's own view of the connection (``pg_stat_activity``, ``pg_blocking_pids``).

``attach(engine, diagnose=...)`` picks what runs (see :data:`DIAGNOSE_VALUES`):

- ``False``: nothing; no diagnosis is written.
- ``"server"`` (the default): nothing on the hot path. When the watchdog flags a checkout
  past ``leak_after``, and for every holder at a pool timeout, a thread of poolscope's own
  samples ``pg_stat_activity`` for those connections over its own connection (PostgreSQL
  only). The backend pid is read from the driver's connection object, where the driver
  keeps it without a round trip (psycopg 3, psycopg2, asyncpg).
- ``True``: ``"server"``, plus ``ConnectionEvents`` listeners that count statements and time
  them, and note when a transaction begins and ends: every checkout pays a few
  microseconds per statement (see BENCHMARKS.md), and SQLAlchemy takes its slower
  statement path while any such listener is installed.

Nothing is set on SQLAlchemy objects: breakdowns are kept by ``id()`` of the DBAPI
connection while it is checked out. SQL parameters are never read; a statement's text is
stored only as the server reports it, with every literal masked (:func:`mask_sql`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from ._clock import REAL
from ._failures import listener_failed as _listener_failed
from ._record import CO_AT, CO_ID, CO_STACK, returned_by_gc

logger = logging.getLogger("poolscope")

DIAGNOSE_VALUES = (False, "server", True)
"""What ``attach(diagnose=...)`` accepts: off, the server's view only, or both."""

DEFAULT_DIAGNOSE = "server"
"""The server's view costs nothing on the hot path; the breakdown costs per statement."""

MAX_PENDING = 10_000
"""Diagnoses queued for the writer at most; past it they are dropped and counted."""

MAX_REQUESTS = 100

EXIT_SETTLE_S = 2.0
"""At interpreter exit, how long the samples asked for may still take before the writers
write their last batch (a hold flagged just before exit is diagnosed, not lost)."""

_sampling: weakref.WeakSet[Diagnoser] = weakref.WeakSet()
"""The diagnosers whose sampler thread has started (see :func:`settle_all`)."""
"""Samples waiting for the server at most; past it (a server slow to answer during a
storm of timeouts) new ones are dropped and counted."""

MAX_QUERY_CHARS = 200
"""A masked statement is cut to this many characters."""

SAMPLE_TIMEOUT_MS = 2000
"""poolscope's own connection gives up on a sample after this long (``statement_timeout``)."""


def check_diagnose(value: Any) -> None:
    """Raise ``ValueError`` (one sentence) unless ``value`` is one of :data:`DIAGNOSE_VALUES`."""
    if not any(value is v or (isinstance(value, str) and value == v) for v in DIAGNOSE_VALUES):
        raise ValueError(f"diagnose must be False, True or 'server', not {value!r}.")


_LITERALS = re.compile(
    r"""
    (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?(?:\$(?P=tag)?\$|\Z))
    |(?P<string>[EeBbXxNn]?'(?:[^']|'')*(?:'|\Z))
    |(?P<ident>"(?:[^"]|"")*(?:"|\Z)|[A-Za-z_][A-Za-z_0-9$]*|\$\d+)
    |(?P<number>(?:0[xX][0-9A-Fa-f_]+|(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))
    """,
    re.VERBOSE | re.DOTALL,
)


def mask_sql(text: str | None, limit: int = MAX_QUERY_CHARS) -> str | None:
    """``text`` with every literal value replaced: strings (quoted, escaped, dollar-quoted)
    by ``'?'``, numbers by ``?``, comments dropped; identifiers, keywords and ``$1``
    placeholders kept. A literal cut off by the server's own limit is masked to the end.
    The result is cut to ``limit`` characters (``...`` marks the cut).
    """
    if text is None:
        return None

    def _one(m: re.Match[str]) -> str:
        if m.group("comment") is not None:
            return " "
        if m.group("dollar") is not None or m.group("string") is not None:
            return "'?'"
        if m.group("number") is not None:
            return "?"
        return m.group(0)

    masked = " ".join(_LITERALS.sub(_one, text).split())
    return masked if len(masked) <= limit else masked[: limit - 3].rstrip() + "..."


def backend_pid(dbapi_connection: Any) -> int | None:
    """The PostgreSQL backend pid of a DBAPI connection, where the driver knows it without
    asking the server (psycopg 3, psycopg2, asyncpg, directly or adapted); else ``None``."""
    driver = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    try:
        info = getattr(driver, "info", None)
        pid = getattr(info, "backend_pid", None)
        if pid is None and hasattr(driver, "get_backend_pid"):
            pid = driver.get_backend_pid()
        if pid is None and hasattr(driver, "get_server_pid"):
            pid = driver.get_server_pid()
    except Exception:  # a closed or broken connection: no pid
        return None
    return int(pid) if pid else None


# A breakdown while checked out: a list (cheaper than an object), laid out as below.
_N, _SQL, _TXN_SQL, _TXN, _TXN_AT, _STMT_AT, _CO_AT = range(7)


def parts(breakdown: list[Any] | None, checked_out_at: float, now: float) -> dict[str, Any]:
    """The hold so far as ``{statements, sql_s, idle_in_transaction_s, idle_s}`` from a
    breakdown (all ``None`` without one)."""
    if breakdown is None:
        return {"statements": None, "sql_s": None, "idle_in_transaction_s": None, "idle_s": None}
    b = list(breakdown)
    perf_now = REAL.perf()
    sql, txn_sql, txn = b[_SQL], b[_TXN_SQL], b[_TXN]
    if b[_STMT_AT] is not None:  # a statement running now
        running = perf_now - b[_STMT_AT]
        sql += running
        if b[_TXN_AT] is not None:
            txn_sql += running
    if b[_TXN_AT] is not None:
        txn += perf_now - b[_TXN_AT]
    hold = max(0.0, now - checked_out_at)
    idle_in_txn = max(0.0, txn - txn_sql)
    idle = max(0.0, hold - sql - idle_in_txn)
    return {
        "statements": int(b[_N]),
        "sql_s": round(sql, 6),
        "idle_in_transaction_s": round(idle_in_txn, 6),
        "idle_s": round(idle, 6),
    }


class Diagnoser:
    """Breakdowns of one pool's line (a pool and those ``engine.dispose()`` made from it),
    and the sampler thread that asks PostgreSQL about flagged checkouts.

    :param mode: one of :data:`DIAGNOSE_VALUES`.
    :param url: the engine's URL (with its password: kept in memory only, to open
        poolscope's own connection). May be ``None`` where there is no engine.
    :param dialect: the engine's dialect name.
    """

    def __init__(self, mode: Any, url: Any, dialect: str | None) -> None:
        self.mode = mode
        self.breakdown = mode is True
        self.server = mode in (True, "server") and dialect == "postgresql" and url is not None
        self._url = url
        # id(DBAPI connection) -> breakdown, for the checkouts open now (diagnose=True).
        self.breakdowns: dict[int, list[Any]] = {}
        # Checkout ids with a diagnosis written before their return: finished at checkin.
        self.diagnosed: set[int] = set()
        self._requests: deque[tuple[Any, list[tuple[Any, tuple[Any, ...]]], float]] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self.failures = 0
        self.dropped = 0
        _diagnosers.add(self)

    # -- the breakdown's listeners (diagnose=True) -------------------------------------

    def engine_listeners(self) -> dict[str, Callable[..., None]]:
        """``ConnectionEvents`` listeners that time statements and transactions."""
        table = self.breakdowns
        perf = REAL.perf

        def _key(conn: Any) -> int:
            return id(conn.connection.dbapi_connection)

        def _on_before_cursor_execute(conn: Any, *args: Any) -> None:
            """``ConnectionEvents.before_cursor_execute``: a statement starts."""
            try:
                b = table.get(_key(conn))
                if b is not None:
                    b[_STMT_AT] = perf()
            except Exception:  # never raise into the application
                _listener_failed("_on_before_cursor_execute")

        def _on_after_cursor_execute(conn: Any, *args: Any) -> None:
            """``ConnectionEvents.after_cursor_execute``: a statement ran; count and time it."""
            try:
                b = table.get(_key(conn))
                if b is not None and b[_STMT_AT] is not None:
                    spent = perf() - b[_STMT_AT]
                    b[_STMT_AT] = None
                    b[_N] += 1
                    b[_SQL] += spent
                    if b[_TXN_AT] is not None:
                        b[_TXN_SQL] += spent
            except Exception:  # never raise into the application
                _listener_failed("_on_after_cursor_execute")

        def _on_handle_error(context: Any) -> None:
            """``ConnectionEvents.handle_error``: a failed statement ran until now."""
            try:
                conn = context.connection
                b = table.get(_key(conn)) if conn is not None and not conn.closed else None
                if b is not None:
                    _on_after_cursor_execute(conn)
            except Exception:  # never raise into the application
                _listener_failed("_on_handle_error")

        def _on_begin(conn: Any) -> None:
            """``ConnectionEvents.begin``: a transaction begins (also on autobegin)."""
            try:
                b = table.get(_key(conn))
                if b is not None and b[_TXN_AT] is None:
                    b[_TXN_AT] = perf()
            except Exception:  # never raise into the application
                _listener_failed("_on_begin")

        def _on_end(conn: Any) -> None:
            """``ConnectionEvents.commit`` and ``rollback``: the transaction ends."""
            try:
                b = table.get(_key(conn))
                if b is not None and b[_TXN_AT] is not None:
                    b[_TXN] += perf() - b[_TXN_AT]
                    b[_TXN_AT] = None
            except Exception:  # never raise into the application
                _listener_failed("_on_end")

        return {
            "before_cursor_execute": _on_before_cursor_execute,
            "after_cursor_execute": _on_after_cursor_execute,
            "handle_error": _on_handle_error,
            "begin": _on_begin,
            "commit": _on_end,
            "rollback": _on_end,
        }

    def pool_listeners(
        self, monitor: Any, open_: dict[Any, tuple[Any, ...]]
    ) -> dict[str, Callable[..., None]]:
        """``PoolEvents`` checkout/checkin listeners that start and finish a breakdown;
        installed before poolscope's own, so that at checkin the checkout is still open."""
        table = self.breakdowns
        perf = REAL.perf
        wall = REAL.wall
        diagnosed = self.diagnosed
        leak_after = monitor.leak_after
        monitor_ref = weakref.ref(monitor)

        def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            """``PoolEvents.checkout``: a fresh breakdown for this checkout."""
            try:
                table[id(dbapi_connection)] = [0, 0.0, 0.0, 0.0, None, None, perf()]
            except Exception:  # never raise into the application
                _listener_failed("_on_checkout_diagnose")

        def _on_checkin(dbapi_connection: Any, record: Any) -> None:
            """``PoolEvents.checkin``: a hold past ``leak_after``, one diagnosed earlier (at a
            timeout) and one the garbage collector returned (a leak) get their whole
            breakdown written."""
            try:
                b = table.pop(id(dbapi_connection), None)
                entry = open_.get(record)
                if b is None or entry is None:
                    return
                now = wall()
                held = now - entry[CO_AT]
                if held > leak_after or entry[CO_ID] in diagnosed or returned_by_gc(entry):
                    diagnosed.discard(entry[CO_ID])
                    m = monitor_ref()
                    if m is not None:
                        self._emit(m, entry, now, parts(b, entry[CO_AT], now), True, None)
            except Exception:  # never raise into the application
                _listener_failed("_on_checkin_diagnose")

        return {"checkout": _on_checkout, "checkin": _on_checkin}

    # -- long holds and timeouts: sampled off the application's threads -------------------

    def flagged(self, monitor: Any, items: list[tuple[Any, tuple[Any, ...]]]) -> None:
        """Diagnose the open checkouts ``items`` (record, entry) now: on the sampler thread
        when the server is asked, else here (the writer thread)."""
        if not items:
            return
        now = REAL.wall()
        if self.server:
            if len(self._requests) >= MAX_REQUESTS:  # the server is slow to answer: drop
                self.dropped += 1
                return
            self._requests.append((weakref.ref(monitor), items, now))
            self._idle.clear()
            self._start()
            self._wake.set()
        elif self.breakdown:
            self._diagnose(monitor, items, now, None)

    def settle(self, timeout: float | None = 10.0) -> bool:
        """Wait until every sample asked for so far is taken (or has failed)."""
        if self._thread is None or not self._thread.is_alive():
            return True
        return self._idle.wait(timeout)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="poolscope-diagnose", daemon=True
            )
            self._thread.start()
            _sampling.add(self)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._requests:
                ref, items, at = self._requests.popleft()
                monitor = ref()
                if monitor is None:
                    continue
                try:
                    samples = self._sample(items)
                except Exception as exc:  # the server's view is a bonus: count, go on
                    self.failures += 1
                    if self.failures == 1:  # the type only: a driver's text may hold anything
                        logger.warning(
                            "poolscope could not ask PostgreSQL about a long hold (%s); "
                            "diagnoses go on without the server's view",
                            type(exc).__name__,
                        )
                    self._close()
                    samples = None
                try:
                    self._diagnose(monitor, items, at, samples)
                except Exception:
                    _listener_failed("_diagnose")
            if not self._requests:
                # No backend of ours lingers on the server between flagged holds.
                self._close()
                self._idle.set()

    def _diagnose(
        self,
        monitor: Any,
        items: list[tuple[Any, tuple[Any, ...]]],
        at: float,
        samples: dict[int, dict[str, Any]] | None,
    ) -> None:
        for record, entry in items:
            pid = backend_pid(getattr(record, "dbapi_connection", None))
            server = samples.get(pid) if samples is not None and pid is not None else None
            b = self.breakdowns.get(id(getattr(record, "dbapi_connection", None)))
            if self.breakdown and b is None and server is None:
                continue  # returned meanwhile: its checkin wrote the full breakdown
            if b is not None:
                self.diagnosed.add(entry[CO_ID])
            self._emit(monitor, entry, at, parts(b, entry[CO_AT], at), False, server)

    def _emit(
        self,
        monitor: Any,
        entry: tuple[Any, ...],
        at: float,
        breakdown: dict[str, Any],
        complete: bool,
        server: dict[str, Any] | None,
    ) -> None:
        pending = monitor._writer.diagnoses
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
            return
        pending.append(
            (monitor.pool_key, entry[CO_ID], at, round(at - entry[CO_AT], 6), breakdown,
             complete, server)
        )  # fmt: skip

    def _sample(self, items: list[tuple[Any, tuple[Any, ...]]]) -> dict[int, dict[str, Any]]:
        """``pg_stat_activity`` for the backends of ``items``, by pid, over our own
        connection; each blocked one names its blockers (pid, and site where ours)."""
        pids = sorted(
            {p for r, _ in items if (p := backend_pid(getattr(r, "dbapi_connection", None)))}
        )
        if not pids:
            return {}
        conn = self._connection()
        cur = conn.cursor()
        try:
            cur.execute(
                "SELECT pid, state, EXTRACT(EPOCH FROM xact_start)::float8, "
                "EXTRACT(EPOCH FROM state_change)::float8, wait_event_type, wait_event, "
                "query, pg_blocking_pids(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
                (pids,),
            )
            rows = cur.fetchall()
        finally:
            cur.close()
        found: dict[int, dict[str, Any]] = {}
        for pid, state, xact, change, wtype, wevent, query, blockers in rows:
            found[int(pid)] = {
                "pid": int(pid),
                "state": state,
                "xact_start": xact,
                "state_change": change,
                "wait_event_type": wtype,
                "wait_event": wevent,
                "query": mask_sql(query),
                "blocked_by": [_blocker(int(b)) for b in (blockers or ())],
            }
        return found

    def _connection(self) -> Any:
        """poolscope's own connection to the server (autocommit; never the application's
        pool): opened with psycopg 3, else psycopg2, from the engine's URL."""
        if self._conn is not None:
            return self._conn
        url = self._url
        try:
            import psycopg  # noqa: F401

            driver = "postgresql+psycopg"
        except ImportError:
            driver = "postgresql+psycopg2"
        url = url.set(drivername=driver)
        dialect_cls = url.get_dialect()
        dbapi = dialect_cls.import_dbapi()
        dialect = dialect_cls(dbapi=dbapi)
        cargs, cparams = dialect.create_connect_args(url)
        cparams.setdefault("connect_timeout", 5)
        cparams["application_name"] = "poolscope-diagnose"
        conn = dbapi.connect(*cargs, **cparams)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute(f"SET statement_timeout = {int(SAMPLE_TIMEOUT_MS)}")
        cur.close()
        self._conn = conn
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()

    def reinit_after_fork(self) -> None:
        """In a forked child: the parent's thread is gone and its connection is not ours."""
        self._thread = None
        self._conn = None
        self._requests.clear()
        self.breakdowns.clear()
        self.diagnosed.clear()
        # New events, not the copies: the parent's sampler may have been inside one
        # (holding its lock) when the process was copied.
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()


def settle_all(timeout: float = EXIT_SETTLE_S) -> None:
    """Wait, ``timeout`` seconds at most in all, until every sampler has taken the samples
    asked for so far: called at exit before the writers' last batch."""
    deadline = REAL.perf() + timeout
    for diagnoser in list(_sampling):
        remaining = deadline - REAL.perf()
        if remaining <= 0 or not diagnoser.settle(remaining):
            return


def restore_has_events(engine: Any) -> None:
    """Put ``engine`` back on SQLAlchemy's fast statement path once no ``ConnectionEvents``
    listener is left on it: listening set its ``_has_events``, and removing does not clear
    it. Left alone where the application's own listeners remain."""
    try:
        dispatch = engine.dispatch
        if not any(getattr(dispatch, name) for name in dispatch._event_names):
            vars(engine).pop("_has_events", None)
    except Exception:  # leave the engine as it is
        _listener_failed("restore_has_events")


def _blocker(pid: int) -> dict[str, Any]:
    """A blocking backend: its pid, and the site of this process's checkout that holds it
    (``None`` where it is not one of ours)."""
    from ._hooks import _monitors  # the attached monitors of this process

    for monitor in _monitors.values():
        for m in [monitor, *list(monitor._successors)]:
            for record, entry in list(m._open.items()):
                if backend_pid(getattr(record, "dbapi_connection", None)) == pid:
                    site = m._writer.stacks.resolve(entry[CO_STACK]).site
                    return {"pid": pid, "site": site, "checkout_id": entry[CO_ID]}
    return {"pid": pid, "site": None, "checkout_id": None}


def diagnosis_row(item: tuple[Any, ...]) -> tuple[Any, ...]:
    """The ``diagnoses`` columns after ``process_id, pool_id`` for one queued diagnosis."""
    _, checkout_id, at, hold_s, b, complete, server = item
    s = server or {}
    blocked = s.get("blocked_by")
    return (
        checkout_id, at, hold_s, int(complete), b["statements"], b["sql_s"],
        b["idle_in_transaction_s"], b["idle_s"], at if server else None, s.get("pid"),
        s.get("state"), s.get("xact_start"), s.get("state_change"), s.get("wait_event_type"),
        s.get("wait_event"), s.get("query"), json.dumps(blocked) if blocked else None,
    )  # fmt: skip


_diagnosers: weakref.WeakSet[Diagnoser] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for d in list(_diagnosers):
        d.reinit_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
