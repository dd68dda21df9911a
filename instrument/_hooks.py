"""The pool listeners and the :class:`Monitor` that ``attach()`` returns."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.event.registry import _EventKey
from sqlalchemy.pool import Pool, QueuePool

from ._clock import REAL
from ._failures import listener_failed as _listener_failed
from ._record import (
    CO_AT,
    CO_ID,
    CO_STACK,
    CO_TASK,
    CO_THREAD,
    MAX_QUEUE_VALUES,
    NO_SIZE,
    NULL,
    returned_by_gc,
)
from ._retention import keep_raw_setting, max_store_setting
from ._secrets import is_secret_name
from ._stacks import MAX_FRAMES, HotPath, TimedGet, stack_key
from ._store import resolve_store_path, valid_text
from ._text import visible
from ._writer import Writer, get_writer, retire

logger = logging.getLogger("poolscope")

DEFAULT_LEAK_AFTER_SECONDS = 30.0

_MASK = "POOLSCOPE_MASKED"  # survives URL quoting unchanged

# Per-process counters; a (process, pool, checkout id) triple identifies a checkout.
_checkout_ids = itertools.count(1)
_connection_ids = itertools.count(1)
_pool_keys = itertools.count(1)

# Monitor._open maps a connection record to its open checkout's entry: a tuple laid out
# as _record.ENTRY_FIELDS (CO_ID ... CO_TASK).


class OpenCheckout(NamedTuple):
    """A connection checked out right now, as :meth:`Monitor.open_checkouts` reports it."""

    checkout_id: int
    site: str
    thread: str
    task: str | None
    held_s: float
    checked_out_at: float
    stack: list[str]


def mask_url(url: Any) -> str:
    """Render a SQLAlchemy URL with its password (and secret-looking query values) as ``***``."""
    query = getattr(url, "query", None) or {}
    secret = {
        key: (_MASK,) * len(value) if isinstance(value, tuple) else _MASK
        for key, value in query.items()
        if is_secret_name(key)
    }
    if secret:
        # Replace the values before rendering: rendered values are URL-quoted, so a
        # search for the raw value would miss one holding '/', '&' or a space.
        url = url.update_query_dict(secret)
    try:
        text = url.render_as_string(hide_password=True)
    except UnicodeEncodeError:  # a lone surrogate (a file name's undecodable byte) to quote
        url = url.set(
            **{
                part: valid_text(value)
                for part in ("username", "host", "database")
                if isinstance(value := getattr(url, part), str)
            },
            query={
                valid_text(k): tuple(map(valid_text, v)) if isinstance(v, tuple) else valid_text(v)
                for k, v in url.query.items()
            },
        )
        text = url.render_as_string(hide_password=True)
    return text.replace(f"={_MASK}", "=***") if secret else text


def _task_name() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return task.get_name() if task is not None else None


class Monitor:
    """Records every event of one pool into a store. Made by :func:`instrument.attach`.

    :param target: an ``Engine``, an ``AsyncEngine`` or a bare ``Pool``.
    :param store: the SQLite store path. May be ``None`` for ``$POOLSCOPE_STORE``,
        else ``./poolscope.db``.
    :param leak_after: seconds a checkout may be held before the watchdog reports
        it as a suspected leak.
    :param name: the pool's name in reports. May be ``None`` for the database name.
    """

    def __init__(
        self,
        target: Any,
        *,
        store: str | os.PathLike[str] | None = None,
        leak_after: float = DEFAULT_LEAK_AFTER_SECONDS,
        name: str | None = None,
        _origin: Monitor | None = None,
    ) -> None:
        engine, pool = _engine_and_pool(target)
        _check_arguments(store, leak_after, name)
        self.leak_after = float(leak_after)
        self.store: Path = resolve_store_path(store)
        self._state: list[Any] = _pool_state(pool)
        # The pools this monitor hooked, each with weak references to the wrappers it set
        # on it: detach() removes a wrapper only while it is still in place.
        self._wrapped_pools: weakref.WeakKeyDictionary[Pool, tuple[tuple[str, Any], ...]] = (
            weakref.WeakKeyDictionary()
        )
        dialect = engine.dialect if engine is not None else getattr(pool, "_dialect", None)
        self._is_async = bool(getattr(dialect, "is_async", False))
        self.name = name or _default_name(engine, pool)
        self.pool_key = next(_pool_keys)
        self._created_at = REAL.wall()
        self._url = mask_url(engine.url) if engine is not None else f"<{type(pool).__name__}>"
        self._dialect_name = engine.dialect.name if engine is not None else None
        # The monitors of the pools that recreate() made from this one (engine.dispose()),
        # each recording its own pool; one set shared by the whole line. Held weakly: a
        # pool holds its monitor through its listeners, for as long as the pool lives.
        self._successors: weakref.WeakSet[Monitor] = weakref.WeakSet()
        if _origin is not None:
            self._url = _origin._url
            self._dialect_name = _origin._dialect_name
            self._successors = _origin._successors

        self._open: dict[Any, tuple[Any, ...]] = {}
        # Older checkouts of a record checked out again before its return: a StaticPool
        # hands its one record to overlapping checkouts, and SQLAlchemy fires a single
        # checkin for them all; that checkin returns each of them.
        self._shared: dict[Any, list[tuple[Any, ...]]] = {}
        self._waits: dict[Any, float] = {}
        self._connect_times: dict[Any, float] = {}
        self._connect_starts: dict[Any, float] = {}
        self._connection_ids: dict[Any, int] = {}
        self._detached_ids: dict[int, int] = {}
        self._suspected: dict[int, float] = {}
        self._notices: deque[tuple[str, tuple[Any, ...], float]] = deque()
        self._attached = False
        # The engine (or bare pool) is held weakly: attaching must not keep it, its pool
        # or its connections alive. The pool's listeners and wrappers hold the monitor
        # instead. When the engine is gone its checkouts and connection records are
        # forgotten: a monitor the application keeps holds nothing of a pool that is gone.
        tables = (
            self._open,
            self._shared,
            self._waits,
            self._connect_times,
            self._connect_starts,
            self._connection_ids,
            self._suspected,
        )
        self._target_ref = weakref.ref(
            engine if engine is not None else pool, lambda _: [t.clear() for t in tables]
        )

        # A successor writes through its origin's writer: a dispose() after the writers
        # were shut down (at exit) must not start a new one.
        self._writer: Writer = _origin._writer if _origin is not None else get_writer(self.store)
        self._listeners = self._make_listeners()
        self._install()

    # -- public ---------------------------------------------------------------------

    def open_checkouts(self) -> list[OpenCheckout]:
        """Return the connections checked out right now, longest held first.

        Each gives the site, thread, asyncio task, seconds held and stack.
        """
        now = REAL.wall()
        result = []
        entries = self._open_entries()
        for successor in list(self._successors):
            if successor is not self:
                entries += successor._open_entries()
        for entry in entries:
            resolved = self._writer.stacks.resolve(entry[CO_STACK])
            result.append(
                OpenCheckout(
                    checkout_id=entry[CO_ID],
                    site=resolved.site,
                    thread=entry[CO_THREAD],
                    task=entry[CO_TASK],
                    held_s=now - entry[CO_AT],
                    checked_out_at=entry[CO_AT],
                    stack=list(resolved.frames),
                )
            )
        result.sort(key=lambda c: c.held_s, reverse=True)
        return result

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until everything recorded so far is on disk (or counted as dropped).

        :param timeout: seconds to wait at most. May be ``None`` to wait without limit.
        :returns: ``False`` if the timeout passed first.
        """
        return self._writer.flush(timeout)

    def detach(self) -> None:
        """Remove every listener and hook from the engine or pool; idempotent.

        What was recorded stays queued and is still written. Connections checked out
        at that moment are no longer followed: each gets an ``unwatched`` event, so that
        no report counts it as never returned, and the watchdog does not report it.
        """
        if not self._attached:
            return
        self._attached = False
        for successor in list(self._successors):
            if successor is not self:
                successor.detach()
        target = self._event_target
        for name, fn in self._listeners.items() if target is not None else ():
            try:
                if event.contains(target, name, fn):
                    event.remove(target, name, fn)
            except Exception:  # an engine already gone has no listeners left to remove
                logger.debug("poolscope: could not remove listener %s", name, exc_info=True)
        for pool, wrappers in list(self._wrapped_pools.items()):
            _unwrap_pool(pool, wrappers)
        self._wrapped_pools = weakref.WeakKeyDictionary()
        # The returns of connections still checked out can no longer be seen: say so in
        # the store, then forget them, or the watchdog would report them as leaks once
        # leak_after has passed.
        self._unwatch_open_checkouts()
        self._forget_checkouts()
        with _registry_lock:
            if target is not None and _monitors.get(target) is self:
                del _monitors[target]

    @property
    def store_ids(self) -> tuple[int, int] | None:
        """``(process_id, pool_id)``: this process's and this pool's ids in the store, as
        ``events`` rows carry them; ``None`` until the writer has written both rows.

        .. versionadded:: 0.2
        """
        process_id = self._writer.process_id
        pool_id = self._writer.pool_id(self.pool_key)
        if process_id is None or pool_id is None:
            return None
        return process_id, pool_id

    def close(self, timeout: float = 10.0) -> None:
        """Detach, write everything queued, and stop the store's background writer if no
        other attached monitor of this process writes to that store; idempotent.

        For a store that lives only as long as this monitor (a test's, a short tool's).

        :param timeout: seconds to wait at most for the queued records to be written.

        .. versionadded:: 0.2
        """
        self.detach()
        self._writer.flush(timeout)
        retire(self._writer, timeout)

    @property
    def attached(self) -> bool:
        """Whether the listeners are installed (never once the engine or pool is gone)."""
        return self._attached and self._target_ref() is not None

    @property
    def dropped(self) -> int:
        """Records this process's writer for this store has dropped so far."""
        return self._writer.dropped_total + len(self._writer.drops)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<Monitor {self.name!r} {state} store={str(self.store)!r}>"

    # -- used by the writer -----------------------------------------------------------

    @property
    def _event_target(self) -> Any:
        """The engine or bare pool attached, or ``None`` once the garbage collector took it."""
        return self._target_ref()

    @property
    def _pool(self) -> Pool | None:
        """The pool recorded now (``engine.dispose()`` replaces it), or ``None`` once gone."""
        return self._state[0]()  # type: ignore[no-any-return]

    def pool_info(self) -> dict[str, Any]:
        pool = self._pool
        is_queue = isinstance(pool, QueuePool)
        return {
            "name": self.name,
            "url": self._url,
            "dialect": self._dialect_name,
            "pool_class": type(pool).__name__,
            "pool_size": pool.size() if is_queue else None,
            "max_overflow": getattr(pool, "_max_overflow", None) if is_queue else None,
            "timeout_s": pool.timeout() if is_queue else None,
            "recycle_s": _recycle_seconds(pool),
            "pre_ping": bool(getattr(pool, "_pre_ping", False)),
            "leak_after_s": self.leak_after,
            "created_at": self._created_at,
        }

    def watch(self, now: float) -> None:
        """Writer-thread duty: flag checkouts held past ``leak_after``; log notices.

        Sites, frames and thread names are logged with their control characters as
        escapes: a thread may name itself anything, terminal escapes included.
        """
        notices = self._notices
        while notices:
            kind, entry, held = notices.popleft()
            resolved = self._writer.stacks.resolve(entry[CO_STACK])
            if kind == "leak_cleared":
                logger.info(
                    "connection checked out at %s (thread %s) returned after %.1f s, "
                    "past leak_after=%.1f s",
                    visible(resolved.site),
                    visible(entry[CO_THREAD]),
                    held,
                    self.leak_after,
                )
            else:
                logger.warning(
                    "connection checked out at %s (thread %s) was never closed: the garbage "
                    "collector returned it after %.1f s. Close it, or use a with block.\n"
                    "  checked out at:\n    %s",
                    visible(resolved.site),
                    visible(entry[CO_THREAD]),
                    held,
                    "\n    ".join(map(visible, resolved.frames)),
                )
        limit = self.leak_after
        suspected = self._suspected
        for entry in self._open_entries():
            held = now - entry[CO_AT]
            if held > limit and entry[CO_ID] not in suspected:
                suspected[entry[CO_ID]] = now
                self._emit(
                    "leak_suspected",
                    entry=entry,
                    thread=entry[CO_THREAD],
                    task=entry[CO_TASK],
                    hold_s=held,
                    at=now,
                )
                resolved = self._writer.stacks.resolve(entry[CO_STACK])
                logger.warning(
                    "connection checked out at %s (thread %s) held for %.1f s, past "
                    "leak_after=%.1f s; suspected leak\n  checked out at:\n    %s",
                    visible(resolved.site),
                    visible(entry[CO_THREAD]),
                    held,
                    limit,
                    "\n    ".join(map(visible, resolved.frames)),
                )

    def _emit(
        self,
        kind: str,
        *,
        entry: tuple[Any, ...] | None = None,
        connection_id: int | None = None,
        thread: str | None = None,
        task: str | None = None,
        stack_id: int | None = None,
        wait_s: float | None = None,
        connect_s: float | None = None,
        hold_s: float | None = None,
        count: int | None = None,
        at: float | None = None,
    ) -> None:
        """Queue one event of a rarely fired kind, with the pool's counts right now.

        The hot listeners (checkout, checkin) build their records inline instead.
        ``entry`` is the open checkout the event is about, if any: it gives the
        checkout id and, unless ``stack_id`` is given, the stack.
        """
        in_use = len(self._open)
        _, idle, waiters, size = self._state
        if stack_id is None and entry is not None:
            stack_id = entry[CO_STACK]
        self._writer.emit(
            (at if at is not None else REAL.wall(), self.pool_key, kind, connection_id,
             entry[CO_ID] if entry is not None else None, thread, task, in_use, len(idle),
             in_use - size if in_use > size else 0, len(waiters), stack_id, wait_s, connect_s,
             hold_s, count)
        )  # fmt: skip

    def reinit_after_fork(self) -> None:
        """In a forked child: the parent's checkouts and waiters are not ours."""
        self._forget_checkouts()
        self._notices.clear()

    def _open_entries(self) -> list[tuple[Any, ...]]:
        """Every open checkout's entry, those sharing a record with a later one included."""
        entries = list(self._open.values())
        for shared in list(self._shared.values()):
            entries += shared
        return entries

    def _unwatch_open_checkouts(self) -> None:
        """Queue an ``unwatched`` event for each checkout open now, with its hold so far."""
        try:
            now = REAL.wall()
            open_ = list(self._open.items())
            open_ += [(r, e) for r, entries in list(self._shared.items()) for e in entries]
            for record, entry in open_:
                self._emit(
                    "unwatched",
                    entry=entry,
                    connection_id=self._connection_ids.get(record),
                    thread=entry[CO_THREAD],
                    task=entry[CO_TASK],
                    hold_s=now - entry[CO_AT],
                    at=now,
                )
        except Exception:  # detach() never raises into the application
            _listener_failed("_unwatch_open_checkouts")

    def _forget_checkouts(self) -> None:
        for table in (
            self._open,
            self._shared,
            self._waits,
            self._connect_times,
            self._connect_starts,
            self._suspected,
        ):
            table.clear()

    # -- installation -------------------------------------------------------------------

    def _install(self) -> None:
        target = self._event_target
        for name, fn in self._listeners.items():
            event.listen(target, name, fn)
        self._wrap(self._pool)
        self._attached = True
        self._writer.pools[self.pool_key] = self.pool_info()
        self._writer.on_tick(self.watch, self.reinit_after_fork)  # the watchdog

    def _wrap(self, pool: Pool) -> None:
        """Hook the pool's ``_do_get`` (waits, timeouts), creator (connect time) and ``recreate``.

        SQLAlchemy fires no event while a caller waits for the pool or times out,
        so these instance attributes are wrapped; ``_unwrap_pool`` restores them.
        ``recreate`` is how ``engine.dispose()`` replaces the pool: the new pool is
        hooked too. (A ``ConnectionEvents.engine_disposed`` listener would do it,
        but any engine-level listener slows every statement the engine runs.)
        """
        if "_do_get" in vars(pool):  # already ours (or someone else's): leave it
            return
        # Only these three names, which the pool class already has, are set on the pool;
        # each wrapper keeps what it replaced (``__wrapped__``), nothing else is stored.
        do_get = pool._do_get = self._make_do_get(pool._do_get)  # type: ignore[method-assign]
        creator = pool._invoke_creator = self._make_creator(pool._invoke_creator)
        recreate = pool.recreate

        def _recreate() -> Pool:
            new_pool = recreate()
            if self._attached:
                self._hand_over(new_pool)
            return new_pool

        _recreate.__wrapped__ = recreate  # type: ignore[attr-defined]
        pool.recreate = _recreate  # type: ignore[method-assign]
        self._wrapped_pools[pool] = (
            ("_do_get", weakref.ref(do_get)),
            ("_invoke_creator", weakref.ref(creator)),
            ("recreate", weakref.ref(_recreate)),
        )

    def _hand_over(self, new_pool: Pool) -> None:
        """Give ``new_pool``, which ``recreate()`` made from this monitor's pool, a monitor
        of its own: its own pool row, counts, checkout table and listeners.

        ``Pool.recreate()`` hands the new pool the old one's listeners (``_dispatch=``),
        ours included; left there, they would record both pools under one pool row with
        one set of counts. ``copy.copy(engine).dispose()`` leaves both pools in use, and
        after a plain ``engine.dispose()`` connections still out go back to the old pool.
        So ours are taken off the new pool (the application's stay) and a successor
        monitor attaches fresh ones; this monitor goes on recording the old pool.
        """
        try:
            for name, fn in self._listeners.items():
                collection = getattr(new_pool.dispatch, name)
                if fn in getattr(collection, "listeners", ()):
                    # Inherited under this monitor's registration (its target's key):
                    # removed from the new pool's collection only.
                    key = _EventKey(self._event_target, name, fn, new_pool)
                    collection.for_modify(new_pool.dispatch).remove(key)
            successor = Monitor(
                new_pool,
                store=self.store,
                leak_after=self.leak_after,
                name=self.name,
                _origin=self,
            )
            self._successors.add(successor)
            # attach(engine) after dispose() finds the monitor of the engine's new pool,
            # even once the old pool and its monitor are gone.
            with _registry_lock:
                _monitors[new_pool] = successor
        except Exception:  # engine.dispose() goes on, recorded or not
            _listener_failed("_recreate")

    def _make_do_get(self, do_get: Callable[[], Any]) -> Callable[[], Any]:
        if TimedGet is not None:  # the same, in C: one Python call less per checkout
            return TimedGet(  # type: ignore[no-any-return]
                wrapped=do_get,
                perf=REAL.perf,
                waits=self._waits,
                connect_starts=self._connect_starts,
                connect_times=self._connect_times,
                on_timeout=self._on_timeout,
                timeout_error=exc.TimeoutError,
                failed=_listener_failed,
            )
        perf = REAL.perf
        waits = self._waits
        connect_times = self._connect_times
        connect_starts = self._connect_starts
        on_timeout = self._on_timeout

        def _do_get() -> Any:
            t0 = perf()
            try:
                record = do_get()
            except exc.TimeoutError:
                try:
                    on_timeout(perf() - t0)
                except Exception:  # the application gets its own error, not ours
                    _listener_failed("_on_timeout")
                raise
            try:
                t1 = perf()
                started = connect_starts.pop(record, None)
                if started is not None and started >= t0:
                    # A new connection was opened in do_get(): the DBAPI connect, the
                    # dialect's first-connect setup and the app's connect listeners are
                    # connect time.
                    connect_times[record] = t1 - started
                    waits[record] = started - t0
                else:
                    waits[record] = t1 - t0
            except Exception:  # the connection is the application's all the same
                _listener_failed("_do_get")
            return record

        _do_get.__wrapped__ = do_get  # type: ignore[attr-defined]
        return _do_get

    def _make_creator(self, creator: Callable[[Any], Any]) -> Callable[[Any], Any]:
        perf = REAL.perf
        connect_times = self._connect_times
        connect_starts = self._connect_starts

        def _invoke_creator(record: Any) -> Any:
            t0 = connect_starts[record] = perf()
            try:
                connection = creator(record)
            except BaseException:  # a failed connect: its record is dropped, forget it too
                connect_starts.pop(record, None)
                raise
            connect_times[record] = perf() - t0
            return connection

        _invoke_creator.__wrapped__ = creator  # type: ignore[attr-defined]
        return _invoke_creator

    def _on_timeout(self, waited: float) -> None:
        """Record a ``timeout``: the pool raised ``TimeoutError`` to a caller after ``waited`` s."""
        stacks = self._writer.stacks
        self._emit(
            "timeout",
            thread=threading.current_thread().name,
            task=_task_name() if self._is_async else None,
            stack_id=stacks.capture_async() if self._is_async else stacks.capture(),
            wait_s=waited,
            count=len(self._state[2]) + 1,  # the waiters, and the caller that gave up
        )

    def _make_listeners(self) -> dict[str, Callable[..., None]]:
        """Build the listener closures; everything they touch is bound to a local.

        The pool-dependent parts (idle queue, waiter list, size) live in ``state``; a pool
        that ``engine.dispose()`` puts in place gets a monitor of its own (``_hand_over``).
        """
        writer = self._writer
        queue = writer.queue
        append = queue.extend  # flat queue: a record is _record.RECORD_WIDTH values
        drop = writer.drops.append
        max_queue = MAX_QUEUE_VALUES
        key = self.pool_key
        open_ = self._open
        shared = self._shared
        waits = self._waits
        connect_times = self._connect_times
        connection_ids = self._connection_ids
        detached_ids = self._detached_ids
        suspected = self._suspected
        notices = self._notices
        state = self._state
        now = REAL.wall
        ref = weakref.ref
        next_checkout = _checkout_ids.__next__
        next_connection = _connection_ids.__next__
        stacks = writer.stacks
        stack_ids = stacks.ids
        intern = stacks.intern
        getframe = sys._getframe
        capture_async = stacks.capture_async
        is_async = self._is_async
        task_name = _task_name if is_async else None
        local = _thread_names

        def _thread() -> str:
            try:
                return local.thread._name  # type: ignore[no-any-return]
            except AttributeError:
                thread = local.thread = threading.current_thread()
                return thread.name

        emit = self._emit

        def _record(
            kind: str,
            connection_id: int | None,
            entry: tuple[Any, ...] | None = None,
            connect_s: float | None = None,
        ) -> None:
            """Queue one event of a rarely fired kind (connect, invalidate, close, ...),
            tied to the open checkout ``entry`` when there is one."""
            emit(
                kind,
                entry=entry,
                connection_id=connection_id,
                thread=_thread(),
                task=task_name() if task_name else None,
                connect_s=connect_s,
            )

        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            """``PoolEvents.connect``: a new DBAPI connection was opened for ``record``."""
            try:
                cid = connection_ids[record] = next_connection()
                _record("connect", cid, None, connect_times.get(record))
            except Exception:  # never raise into the application
                _listener_failed("_on_connect")

        def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            """``PoolEvents.checkout``: ``record`` was handed to the application."""
            try:
                t = now()
                if is_async:
                    sid = capture_async()
                else:
                    k = stack_key(1, MAX_FRAMES)
                    sid = stack_ids.get(k)
                    if sid is None:
                        sid = intern(k, getframe(1))
                checkout_id = next_checkout()
                try:
                    thread = local.thread._name
                except AttributeError:
                    thread = _thread()
                task = task_name() if task_name else None
                previous = open_.get(record)
                if previous is not None:  # a StaticPool's one record, checked out again
                    shared.setdefault(record, []).append(previous)
                open_[record] = (checkout_id, t, thread, sid, ref(proxy), task)  # ENTRY_FIELDS
                if len(queue) < max_queue:
                    in_use = len(open_)
                    _, idle, waiters, size = state
                    append(
                        (
                            t,
                            key,
                            "checkout",
                            connection_ids.get(record, NULL),
                            checkout_id,
                            thread,
                            task or NULL,
                            in_use,
                            len(idle),
                            in_use - size if in_use > size else 0,
                            len(waiters),
                            sid,
                            waits.pop(record, NULL),
                            connect_times.pop(record, NULL),
                            NULL,
                            NULL,
                        )
                    )
                else:
                    waits.pop(record, None)
                    connect_times.pop(record, None)
                    drop(1)
            except Exception:  # never raise into the application
                _listener_failed("_on_checkout")

        def _returned(record: Any, returning: bool | None) -> None:
            t = now()
            entry = open_.pop(record, None)
            if entry is None:  # checked out before attach, or by the parent before a fork
                return
            _close(record, entry, t, returning)
            if shared:
                for older in shared.pop(record, ()):
                    _close(record, older, t, returning)

        def _close(record: Any, entry: tuple[Any, ...], t: float, returning: bool | None) -> None:
            """Record the return of the checkout ``entry`` of ``record`` at ``t``."""
            held = t - entry[CO_AT]
            if suspected and suspected.pop(entry[CO_ID], None) is not None:
                notices.append(("leak_cleared", entry, held))
                emit(
                    "leak_cleared",
                    entry=entry,
                    connection_id=connection_ids.get(record),
                    thread=entry[CO_THREAD],
                    task=entry[CO_TASK],
                    hold_s=held,
                    at=t,
                )
            if returned_by_gc(entry):
                kind = "gc_checkin"
                notices.append((kind, entry, held))
            else:
                kind = "detach" if returning is False else "checkin"
            if len(queue) < max_queue:
                in_use = len(open_)
                _, idle, waiters, size = state
                # A QueuePool puts the returned connection in its idle queue (capped at
                # its size: past it, the connection is closed); other pools keep none.
                n_idle = len(idle) + 1 if returning and size != NO_SIZE else len(idle)
                try:
                    thread = local.thread._name
                except AttributeError:
                    thread = _thread()
                # The checkout's task: AsyncConnection.close() runs in a shielded task of
                # its own, so the current task at checkin names nothing the user wrote.
                append(
                    (
                        t,
                        key,
                        kind,
                        connection_ids.get(record, NULL),
                        entry[CO_ID],
                        thread,
                        entry[CO_TASK] or NULL,
                        in_use,
                        n_idle if n_idle < size else size,
                        in_use - size if in_use > size else 0,
                        len(waiters),
                        entry[CO_STACK],
                        NULL,
                        NULL,
                        held,
                        NULL,
                    )
                )
            else:
                drop(1)

        def _on_checkin(dbapi_connection: Any, record: Any) -> None:
            """``PoolEvents.checkin``: ``record`` went back to the pool (by code or by the GC)."""
            try:
                _returned(record, True)
            except Exception:  # never raise into the application
                _listener_failed("_on_checkin")

        def _on_detach(dbapi_connection: Any, record: Any) -> None:
            """``PoolEvents.detach``: a connection left the pool for good; on async dialects
            this is how the garbage collector returns a leaked checkout."""
            try:
                cid = connection_ids.get(record)
                if record in open_:
                    _returned(record, False)
                connection_ids.pop(record, None)
                if cid is not None:
                    detached_ids[id(dbapi_connection)] = cid
            except Exception:  # never raise into the application
                _listener_failed("_on_detach")

        def _simple(kind: str) -> Callable[..., None]:
            def _on_event(dbapi_connection: Any, record: Any, *args: Any) -> None:
                try:
                    _record(kind, connection_ids.get(record), open_.get(record))
                    if kind == "close":
                        connection_ids.pop(record, None)
                except Exception:  # never raise into the application
                    _listener_failed(f"_on_{kind}")

            _on_event.__name__ = f"_on_{kind}"
            _on_event.__doc__ = f"``PoolEvents.{kind}``: recorded with its checkout, if any."
            return _on_event

        disconnection = exc.DisconnectionError

        def _on_invalidate(dbapi_connection: Any, record: Any, exception: Any = None) -> None:
            """``PoolEvents.invalidate``: recorded with its checkout, if any, and in ``count``
            whether it was a disconnect (1), another error (0) or had no exception (NULL).

            A ``DisconnectionError`` while ``record`` is checked out means a checkout
            listener refused the connection and SQLAlchemy retries the checkout with a
            new one, firing ``checkout`` again. The refused checkout never reached the
            application: it is closed here as a ``checkin``, or it would stay open forever.
            """
            try:
                emit(
                    "invalidate",
                    entry=open_.get(record),
                    connection_id=connection_ids.get(record),
                    thread=_thread(),
                    task=task_name() if task_name else None,
                    count=_disconnect_flag(state[0](), dbapi_connection, exception),
                )
                if isinstance(exception, disconnection) and record in open_:
                    _returned(record, None)
            except Exception:  # never raise into the application
                _listener_failed("_on_invalidate")

        def _on_close_detached(dbapi_connection: Any) -> None:
            """``PoolEvents.close_detached``: a detached DBAPI connection was closed."""
            try:
                _record("close_detached", detached_ids.pop(id(dbapi_connection), None))
            except Exception:  # never raise into the application
                _listener_failed("_on_close_detached")

        # The C helper is the checkout and checkin listener itself where it is built: it
        # records the common case (a stack seen before, a thread threading knows, no
        # watchdog flag, not the GC) and hands everything else to the Python listeners
        # above. Registered directly, it spares SQLAlchemy's dispatch a Python call.
        hot = (
            HotPath(
                queue=queue,
                max_queue=max_queue,
                drops=writer.drops,
                pool_key=key,
                open=open_,
                shared=shared,
                waits=waits,
                connect_times=connect_times,
                connection_ids=connection_ids,
                suspected=suspected,
                state=state,
                stack_ids=stack_ids,
                next_checkout=next_checkout,
                now=now,
                threads=threading._active,  # type: ignore[attr-defined]
                max_frames=MAX_FRAMES,
                fallback_checkout=_on_checkout,
                fallback_checkin=_on_checkin,
                failed=_listener_failed,
            )
            if HotPath is not None and not is_async
            else None
        )
        listeners: dict[str, Callable[..., None]] = {
            "connect": _on_connect,
            "checkout": hot.on_checkout if hot is not None else _on_checkout,
            "checkin": hot.on_checkin if hot is not None else _on_checkin,
            "invalidate": _on_invalidate,
            "soft_invalidate": _simple("soft_invalidate"),
            "close": _simple("close"),
            "detach": _on_detach,
            "close_detached": _on_close_detached,
        }
        return listeners


_thread_names = threading.local()
"""Per-thread cache of the ``Thread`` object: ``current_thread()`` costs a lookup per event.

Its name is read at each event (``_name``, the attribute behind ``Thread.name``), not
cached, so a thread renamed after its first checkout is recorded under its new name.
"""


def _pool_state(pool: Pool) -> list[Any]:
    """Return ``[ref(pool), idle_queue, waiter_list, size]``; the listeners read the
    middle two with ``len()``.

    For a ``QueuePool`` these are the pool's own deques (no lock taken to read a
    length); other pool classes have no idle queue or waiters worth counting. The
    pool itself is held weakly (none of these refers to it).
    """
    ref = weakref.ref(pool)
    if isinstance(pool, QueuePool):
        inner = pool._pool
        if hasattr(inner, "not_empty"):  # threading queue
            return [ref, inner.queue, inner.not_empty._waiters, pool.size()]  # type: ignore[attr-defined]
        aio = inner._queue  # type: ignore[attr-defined]  # AsyncAdaptedQueue
        return [ref, aio._queue, aio._getters, pool.size()]
    return [ref, (), (), NO_SIZE]


def _disconnect_flag(pool: Pool | None, dbapi_connection: Any, exception: Any) -> int | None:
    """Whether an invalidation's ``exception`` was a disconnect: 1, 0, or ``None`` for none.

    A disconnect is a ``DisconnectionError`` (a failed ``pool_pre_ping``, or a checkout
    listener's refusal), a ``DBAPIError`` that says it invalidated the connection, or a
    raw DBAPI error the pool's dialect judges one (what ``Connection`` passes on a
    disconnect). Only this judgement is recorded, never the exception's text, which can
    hold a statement's parameters. Runs on an invalidation, never on a checkout.
    """
    if exception is None:
        return None
    if isinstance(exception, exc.DisconnectionError):
        return 1
    if isinstance(exception, exc.DBAPIError):
        return 1 if exception.connection_invalidated else 0
    dialect = getattr(pool, "_dialect", None)
    error = getattr(getattr(dialect, "dbapi", None), "Error", None)
    if not isinstance(error, type) or not isinstance(exception, error):
        return 0
    try:
        return 1 if dialect.is_disconnect(exception, dbapi_connection, None) else 0  # type: ignore[union-attr]
    except Exception:  # a dialect that cannot tell: not counted as a disconnect
        return 0


def _recycle_seconds(pool: Pool) -> float | None:
    recycle = getattr(pool, "_recycle", -1)
    return float(recycle) if recycle is not None and recycle >= 0 else None


def _unwrap_pool(pool: Pool, wrappers: tuple[tuple[str, Any], ...]) -> None:
    """Put back what each of ``wrappers`` (name, weak reference) replaced on ``pool``.

    A wrapper no longer in place was replaced by the application since (setting
    ``pool._creator`` sets ``_invoke_creator``): what it put there stays.
    """
    attrs = vars(pool)
    for name, ref in wrappers:
        wrapper = ref()
        if wrapper is None or attrs.get(name) is not wrapper:
            continue
        if name == "_invoke_creator":  # the pool's own attribute: the original goes back
            attrs[name] = wrapper.__wrapped__
        else:  # a method of the pool's class, shadowed
            del attrs[name]


def _check_arguments(store: Any, leak_after: Any, name: Any) -> None:
    """Raise ``ValueError`` (one sentence) for an argument ``attach()`` cannot use."""
    if isinstance(leak_after, bool) or not isinstance(leak_after, (int, float)):
        raise ValueError(f"leak_after must be a number of seconds, not {leak_after!r}.")
    if not leak_after > 0:
        raise ValueError(f"leak_after must be more than 0 seconds, not {leak_after!r}.")
    if store is not None and (not isinstance(store, (str, os.PathLike)) or not os.fspath(store)):
        raise ValueError(f"store must be a file path, not {store!r}.")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string, not {name!r}.")


def _engine_and_pool(target: Any) -> tuple[Engine | None, Pool]:
    sync_engine = getattr(target, "sync_engine", None)  # AsyncEngine
    if isinstance(sync_engine, Engine):
        target = sync_engine
    if isinstance(target, Engine):
        return target, target.pool
    if isinstance(target, Pool):
        return None, target
    raise TypeError(
        f"attach() takes an Engine, an AsyncEngine or a Pool, not {type(target).__name__}."
    )


def _default_name(engine: Engine | None, pool: Pool) -> str:
    if engine is None:
        return type(pool).__name__
    database = engine.url.database
    if database and engine.dialect.name == "sqlite":
        database = os.path.basename(database)
    return database or engine.dialect.name


class _Registry:
    """The attached monitors by engine (or bare pool), both held weakly.

    A monitor lives as long as the listeners and wrappers on its pool hold it (or
    the application does): the registry keeps neither an engine nor a monitor alive,
    and an entry goes with its engine.
    """

    def __init__(self) -> None:
        self._refs: weakref.WeakKeyDictionary[Any, weakref.ref[Monitor]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, key: Any) -> Monitor | None:
        try:
            ref = self._refs.get(key)
        except TypeError:  # not weakly referenceable: never attached
            return None
        return ref() if ref is not None else None

    def __setitem__(self, key: Any, monitor: Monitor) -> None:
        self._refs[key] = weakref.ref(monitor)

    def __delitem__(self, key: Any) -> None:
        del self._refs[key]

    def values(self) -> list[Monitor]:
        monitors = (ref() for ref in list(self._refs.values()))
        return [monitor for monitor in monitors if monitor is not None]


_monitors = _Registry()
_registry_lock = threading.Lock()


def _existing_monitor(target: Any) -> Monitor | None:
    """The attached monitor recording ``target``: attached to it, or to the same pool
    (an engine and its own pool are one pool, recorded once)."""
    try:
        engine, pool = _engine_and_pool(target)
    except TypeError:
        return None
    existing = _monitors.get(engine if engine is not None else pool)
    if existing is not None and existing.attached and existing._pool is pool:
        return existing
    # The engine's or pool's own monitor, the one of the pool that engine.dispose() put in
    # its place (registered under that pool), or the monitor of the engine a pool is of.
    for monitor in _monitors.values():
        if monitor.attached and monitor._pool is pool:
            return monitor
    return existing if existing is not None and existing.attached else None


def monitor_of(target: Any) -> Monitor | None:
    """The attached monitor recording ``target`` (an ``Engine``, an ``AsyncEngine`` or a
    ``Pool``), or ``None``: what ``attach(target)`` would return without attaching.

    .. versionadded:: 0.2
    """
    with _registry_lock:
        return _existing_monitor(target)


def attach(
    engine: Any,
    store: str | os.PathLike[str] | None = None,
    leak_after: float = DEFAULT_LEAK_AFTER_SECONDS,
    name: str | None = None,
    *,
    keep_raw: float | None = None,
    max_store_mb: float | None = None,
) -> Monitor:
    """Start recording every pool event of ``engine`` into ``store``; return its monitor.

    Attaching the same engine (or pool) again returns the monitor it already has, as
    does attaching an engine's own pool after the engine, or the engine after its pool.
    Recording never raises into the application: a store that cannot be written
    is reported once through ``logging`` and its events are dropped and counted.

    :param engine: an ``Engine``, an ``AsyncEngine`` or a bare ``Pool``.
    :param store: the SQLite store to write. May be ``None`` for ``$POOLSCOPE_STORE``,
        else ``./poolscope.db``.
    :param leak_after: seconds a checkout may be held before it is reported as a
        suspected leak (one ``leak_suspected`` event and one WARNING on logger ``poolscope``).
    :param name: the pool's name in reports. May be ``None`` for the database name.
    :param keep_raw: seconds of raw events the store keeps (at least 60; ``math.inf``: all);
        older ones live on as rollups, and notable checkouts (leaks, timeouts and their
        holders, holds past ``leak_after``) are kept for good. May be ``None`` for
        ``$POOLSCOPE_KEEP_RAW``, else 900.
    :param max_store_mb: the store's budget in MiB (at least 16; ``math.inf``: none): near
        it, raw events are kept for less time, then only rolled up. May be ``None`` for
        ``$POOLSCOPE_MAX_STORE_MB``, else 1024. Where monitors of one process give a store
        different values, the tightest applies.
    :raises ValueError: an argument (or its environment variable) is not valid.
    """
    _check_arguments(store, leak_after, name)
    keep = keep_raw_setting(keep_raw)
    budget = max_store_setting(max_store_mb)
    with _registry_lock:
        existing = _existing_monitor(engine)
        if existing is not None:
            return existing
    monitor = Monitor(engine, store=store, leak_after=leak_after, name=name)
    monitor._writer.keeper.configure(keep, budget)
    with _registry_lock:
        _monitors[monitor._event_target] = monitor
    return monitor


def _reinit_registry_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_registry_after_fork)
