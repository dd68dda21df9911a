"""pytest plugin for SQLAlchemy's own suite: attach a poolscope monitor to every pool.

Loaded by ``run.py`` with ``-p poolscope_attach`` (never by poolscope's own tests).
A pool is attached as soon as it is made: the ``__init__`` of each pool class is
wrapped, on the class, so that the outermost one attaches the pool once it is built
(bare pools, engines' pools, the pool ``dispose()`` puts in place). A pool of a class
defined later with its own ``__init__`` is attached at its first connection instead,
from a class-level ``PoolEvents.first_connect`` listener. The plugin keeps its own
bookkeeping in this module and puts nothing on the pools.

The store is ``$POOLSCOPE_SUITE_STORE``. At the end, one summary line gives the pools
attached and the checkouts recorded, so the runner can tell the attachment worked.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any

import pytest

import instrument
from instrument._auto import same_signature

_STORE = os.environ.get("POOLSCOPE_SUITE_STORE", "poolscope-suite.db")
# POOLSCOPE_SUITE_DRY_RUN=1: every hook of this plugin, but no monitor (checks the plugin
# alone changes no outcome).
_DRY_RUN = os.environ.get("POOLSCOPE_SUITE_DRY_RUN") == "1"
_monitors: weakref.WeakSet[Any] = weakref.WeakSet()  # ours, to spot a pool already watched
_counts = {"pools": 0, "failures": 0}


def _pool_of(record: Any) -> Any:
    """The pool of a ``_ConnectionRecord`` (SQLAlchemy 2.0 and 2.1 keep it private)."""
    return getattr(record, "_ConnectionRecord__pool", None)


def _watched(pool: Any) -> bool:
    """Whether one of our monitors already records ``pool``.

    ``dispose()`` makes the new pool with the old one's listeners, and the monitor
    follows it there: attaching a second monitor would record that pool twice.
    """
    from sqlalchemy import event

    for monitor in list(_monitors):
        listener = getattr(monitor, "_listeners", {}).get("checkout")
        if listener is not None and event.contains(pool, "checkout", listener):
            return True
    return False


def _attach(pool: Any) -> None:
    if _DRY_RUN:
        _counts["pools"] += 1
        return
    try:
        monitor = instrument.attach(pool, store=_STORE)
    except Exception:  # counted: the runner fails when attachment itself fails
        _counts["failures"] += 1
        raise
    _monitors.add(monitor)
    _counts["pools"] += 1


def _on_first_connect(dbapi_connection: Any, record: Any) -> None:
    pool = _pool_of(record)
    if pool is not None and not _watched(pool):
        _attach(pool)


_wrapped: dict[type, Any] = {}  # pool class -> its own __init__, restored at the end


def _outermost_init(cls: type) -> type | None:
    """The class whose ``__init__`` a ``cls()`` call runs first."""
    return next((c for c in cls.__mro__ if "__init__" in vars(c)), None)


def _wrap_init(cls: type) -> None:
    """Wrap ``cls.__init__`` so that the outermost one attaches the pool it built.

    The wrapper has the very parameters of the original (made from its signature):
    ``create_engine()`` reads the pool class's ``__init__`` arguments to route its own
    (``pool_size``, ``pool_pre_ping``...), and a ``*args, **kwargs`` wrapper would hide them.
    """
    original = vars(cls)["__init__"]
    _wrapped[cls] = original
    cls.__init__ = same_signature(original, lambda pool: _built(cls, pool))  # type: ignore[misc]


def _built(cls: type, pool: Any) -> None:
    """After ``cls.__init__``: attach ``pool`` if that was its outermost ``__init__``."""
    if _outermost_init(type(pool)) is cls and not _watched(pool):
        _attach(pool)


def _pool_classes() -> list[type]:
    from sqlalchemy.pool import Pool

    classes, todo = [], [Pool]
    while todo:
        cls = todo.pop()
        if cls not in classes:
            classes.append(cls)
            todo.extend(cls.__subclasses__())
    return classes


def _listen() -> None:
    """Listen on ``Pool`` (again: SQLAlchemy's ``PoolEventsTest`` clears every class listener)."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "first_connect", _on_first_connect):
        event.listen(Pool, "first_connect", _on_first_connect)


def pytest_configure(config: pytest.Config) -> None:
    for cls in _pool_classes():
        if "__init__" in vars(cls):
            _wrap_init(cls)
    _listen()


def pytest_unconfigure(config: pytest.Config) -> None:
    for cls, original in _wrapped.items():
        cls.__init__ = original  # type: ignore[misc]
    _wrapped.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _listen()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line: pools attached, and the checkouts their monitors recorded."""
    import sqlite3

    for monitor in list(_monitors):
        monitor.flush()
    checkouts = 0
    if os.path.exists(_STORE):
        with contextlib.closing(sqlite3.connect(_STORE)) as db:
            query = "SELECT count(*) FROM events WHERE kind = 'checkout'"
            checkouts = db.execute(query).fetchone()[0]
    terminalreporter.write_line(
        f"poolscope-attach: {_counts['pools']} pools attached, {checkouts} checkouts recorded, "
        f"{_counts['failures']} attach failures"
    )
