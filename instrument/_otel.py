"""OpenTelemetry's database client connection metrics (``db.client.connection.*``) of pools.

Imported only when ``attach(meter_provider=...)`` asks for it: poolscope without it never
imports OpenTelemetry. Two sources, neither on the hot path:

- **records** (the histograms and the timeout counter): the writer thread hands each batch
  it takes from the queue to :class:`RecordFeed` before writing it, so every checkout's wait,
  every return's hold, every new connection's connect time and every timeout the store gets
  is recorded once, whether or not the store can be written. Records the queue had to drop
  (it was full) reach neither the store nor the metrics.
- **the pool itself, at collection time** (connection counts, limits, pending requests):
  observable instruments whose callbacks read lengths (``len()`` of the monitor's open
  checkouts, of the pool's idle queue and of its waiters) and the limits read at attach.
  They take none of the pool's locks and call nothing on it: collecting changes nothing.

Names, units and instrument kinds follow OpenTelemetry's semantic conventions for database
client metrics; every point carries ``db.client.connection.pool.name``, the pool's name as
poolscope reports it.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation

from ._record import CONNECT_S, HOLD_S, KIND, POOL, RECORD_WIDTH, WAIT_S

_global_provider: Any = None
"""What ``meter_provider=True`` means in this process, once asked (see ``meter_provider_of``)."""

SCOPE = "poolscope"
"""The instrumentation scope (meter name) of every instrument."""

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

DURATION_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
"""Bucket boundaries advised for the three duration histograms, in seconds: 100 µs to five
minutes (a wait past the pool's timeout, a hold past ``leak_after``). The conventions give
none for these metrics, and the SDK's default boundaries are made for milliseconds. A
``View`` of the application's ``MeterProvider`` overrides them."""

YIELD_EVERY_RECORDS = 8
"""Histogram measurements between two releases of the GIL by the writer thread.

Each measurement costs the SDK several microseconds of Python; a batch's worth in one go
would hold the GIL for milliseconds, and the application, back from its database, would
wait for it (up to Python's 5 ms switch interval). Released this often, it waits at most
about a hundred microseconds."""

RETURNS = frozenset(("checkin", "gc_checkin", "detach"))
"""The record kinds that end a checkout, with its hold time: ``use_time``."""

_NO_CONTEXT = trace.set_span_in_context(trace.INVALID_SPAN, Context())
"""Passed with every measurement where the API takes a context: the writer thread's context
is no request's, so a measurement carries no span (an exemplar filter finds none). Not an
empty ``Context``: the SDK takes an empty one (it is falsy) as none given, and reads the
thread's current context instead."""


def meter_provider_of(meter_provider: Any) -> Any:
    """The ``MeterProvider`` ``attach(meter_provider=...)`` means: ``None`` for ``None`` or
    ``False``, OpenTelemetry's global one for ``True``, else ``meter_provider`` itself.

    :raises ValueError: for anything that has no ``get_meter()``.
    """
    global _global_provider
    if meter_provider is None or meter_provider is False:
        return None
    if meter_provider is True:
        # The first answer, kept: before the application sets its provider, that is the
        # API's proxy, which then forwards to it. Asking again afterwards would give the
        # SDK's provider itself, and a second set of instruments of the same names there.
        with _instruments_lock:
            if _global_provider is None:
                _global_provider = metrics.get_meter_provider()
            return _global_provider
    if not callable(getattr(meter_provider, "get_meter", None)):
        raise ValueError(
            "meter_provider must be an OpenTelemetry MeterProvider, True for the global one, "
            f"or None, not {meter_provider!r}."
        )
    return meter_provider


class Instruments:
    """The ``db.client.connection.*`` instruments of one ``MeterProvider``, made once, and
    the pools that report through them.

    The observable instruments' callbacks report each attached pool once per collection,
    by name: the counts of pools sharing a name (a pool ``engine.dispose()`` replaced and
    its successor, which share the monitor's name) are added up, their limits are the
    largest.
    """

    def __init__(self, provider: Any) -> None:
        from . import __version__

        meter = provider.get_meter(SCOPE, __version__)
        # Added to by attach() while a collection may be reading it: both under the lock.
        self._pools: weakref.WeakSet[PoolMetrics] = weakref.WeakSet()
        self._lock = threading.Lock()

        def histogram(name: str, description: str) -> Any:
            try:
                return meter.create_histogram(
                    name,
                    unit="s",
                    description=description,
                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
                )
            except TypeError:  # an API older than 1.23 takes no advice: the SDK's buckets
                return meter.create_histogram(name, unit="s", description=description)

        self.create_time = histogram(
            "db.client.connection.create_time", "The time it took to create a new connection."
        )
        self.wait_time = histogram(
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool.",
        )
        self.use_time = histogram(
            "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool.",
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        # An API older than 1.27 takes no context with a measurement (record(amount,
        # attributes)): passed one, every call would fail.
        self.takes_context = _takes_context(self.use_time.record) and _takes_context(
            self.timeouts.add
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_count],
            unit="{connection}",
            description="The number of connections that are currently in state described "
            "by the `state` attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._observe_max],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max",
            callbacks=[self._observe_idle_max],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observe_pending],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )

    # -- collection time: read lengths, nothing else -------------------------------------

    def add(self, pool: PoolMetrics) -> None:
        """Observe ``pool`` from the next collection on, for as long as it lives."""
        with self._lock:
            self._pools.add(pool)

    def _by_name(self) -> dict[str, list[PoolMetrics]]:
        with self._lock:
            snapshot = list(self._pools)
        pools: dict[str, list[PoolMetrics]] = {}
        for pool in snapshot:
            if pool.reporting():
                pools.setdefault(pool.name, []).append(pool)
        return pools

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, pools in self._by_name().items():
            counts = [pool.counts() for pool in pools]
            used = sum(c[0] for c in counts)
            idle = sum(c[1] for c in counts)
            yield Observation(used, {POOL_NAME: name, STATE: "used"})
            yield Observation(idle, {POOL_NAME: name, STATE: "idle"})

    def _observe_max(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, pools in self._by_name().items():
            limits = [pool.max for pool in pools if pool.max is not None]
            if limits:
                yield Observation(max(limits), {POOL_NAME: name})

    def _observe_idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, pools in self._by_name().items():
            limits = [pool.idle_max for pool in pools if pool.idle_max is not None]
            if limits:
                yield Observation(max(limits), {POOL_NAME: name})

    def _observe_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, pools in self._by_name().items():
            yield Observation(sum(pool.pending() for pool in pools), {POOL_NAME: name})


def _takes_context(method: Any) -> bool:
    """Whether the instrument method ``method`` takes a ``context`` argument."""
    import inspect

    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "context" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


_instruments: weakref.WeakKeyDictionary[Any, Instruments] = weakref.WeakKeyDictionary()
_instruments_lock = threading.Lock()


def _locks_afresh_in_child() -> None:
    """In a forked child: new locks, as a fork may have copied one held by another thread
    (a collection under way in the reader's thread would leave it held for good)."""
    global _instruments_lock
    _instruments_lock = threading.Lock()
    for made in list(_instruments.values()):
        made._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_locks_afresh_in_child)


def instruments_of(provider: Any) -> Instruments:
    """The instruments of ``provider``, made on its first use (one set per provider: an
    instrument made twice would report every pool twice)."""
    with _instruments_lock:
        made = _instruments.get(provider)
        if made is None:
            made = _instruments[provider] = Instruments(provider)
        return made


class PoolMetrics:
    """One attached pool as one provider's instruments see it: its name and limits, and
    lengths read from its monitor at collection time.

    :param monitor: the pool's monitor, held weakly.
    :param info: the monitor's ``pool_info()``.
    :param state: the monitor's ``[ref(pool), idle queue, waiters, size]``.
    """

    __slots__ = (
        "__weakref__",
        "args",
        "attributes",
        "idle_max",
        "instruments",
        "max",
        "name",
        "_monitor",
        "_open",
        "_state",
    )

    def __init__(
        self, instruments: Instruments, monitor: Any, info: dict[str, Any], state: list[Any]
    ) -> None:
        self.instruments = instruments
        self.name: str = info["name"]
        self.attributes = {POOL_NAME: self.name}
        # What follows the value in every measurement: the attributes, and the context
        # where the API takes one.
        self.args: tuple[Any, ...] = (
            (self.attributes, _NO_CONTEXT) if instruments.takes_context else (self.attributes,)
        )
        size, overflow = info["pool_size"], info["max_overflow"]
        # A QueuePool keeps at most pool_size idle connections (one returned past that is
        # closed), and opens at most pool_size + max_overflow (-1: no limit, none reported).
        # Other pool classes have neither limit; SQLAlchemy has no minimum of idle ones.
        self.idle_max: int | None = size if size is not None else None
        self.max: int | None = (
            size + overflow if size is not None and overflow is not None and overflow >= 0 else None
        )
        self._monitor = weakref.ref(monitor)
        self._open = monitor._open
        self._state = state

    def reporting(self) -> bool:
        """Whether the pool's monitor is still attached (after ``detach()`` or once the
        engine is gone, the observable instruments leave it out)."""
        monitor = self._monitor()
        return monitor is not None and monitor.attached

    def counts(self) -> tuple[int, int]:
        """``(used, idle)`` now: connections checked out, as the monitor followed them (not
        those checked out before attach), and those in the pool's idle queue."""
        return len(self._open), len(self._state[1])

    def pending(self) -> int:
        """Callers waiting for a connection now: the length of the pool's waiter list."""
        return len(self._state[2])


class RecordFeed:
    """The writer's record consumer that feeds the histograms and the timeout counter.

    Called in the writer thread with each batch it takes (a flat list, or the C inserter's
    ``Events``), before the batch is written: so a store that cannot be written loses no
    metric. Only records of pools registered here are read.
    """

    def __init__(self) -> None:
        # Pool key -> the PoolMetrics it reports to (one per provider).
        self.pools: dict[int, tuple[PoolMetrics, ...]] = {}
        # Pool keys whose monitor is gone: forgotten once the batch after it is read (every
        # record of theirs was queued before, so that batch holds the last of them).
        self._gone: list[int] = []

    def add(self, pool_key: int, metrics_: PoolMetrics) -> None:
        self.pools[pool_key] = (*self.pools.get(pool_key, ()), metrics_)

    def forget(self, pool_key: int) -> None:
        """Stop reading ``pool_key``'s records after the next batch."""
        self._gone.append(pool_key)

    def __call__(self, batch: Any) -> None:
        gone = self._gone[:]
        try:
            if self.pools and len(batch):
                self._read(batch if isinstance(batch, list) else batch.tolist())
        finally:
            for key in gone:
                self._gone.remove(key)
                self.pools.pop(key, None)

    def _read(self, values: list[Any]) -> None:
        pools = self.pools
        timeouts: dict[PoolMetrics, int] = {}
        recorded = 0
        sleep = time.sleep
        for key, kind, wait, connect, hold in zip(
            values[POOL::RECORD_WIDTH],
            values[KIND::RECORD_WIDTH],
            values[WAIT_S::RECORD_WIDTH],
            values[CONNECT_S::RECORD_WIDTH],
            values[HOLD_S::RECORD_WIDTH],
            strict=True,
        ):
            targets = pools.get(key)
            if targets is None:
                continue
            # NULL is "" in a list queue and None in an Events: a number or nothing.
            if kind in RETURNS:
                if hold is None or hold == "":
                    continue
                for target in targets:  # a wall-clock step back is not a negative hold
                    target.instruments.use_time.record(hold if hold > 0.0 else 0.0, *target.args)
            elif kind == "checkout":
                if wait is None or wait == "":
                    continue
                for target in targets:
                    target.instruments.wait_time.record(wait, *target.args)
            elif kind == "connect":
                if connect is None or connect == "":
                    continue
                for target in targets:
                    target.instruments.create_time.record(connect, *target.args)
            elif kind == "timeout":
                for target in targets:
                    timeouts[target] = timeouts.get(target, 0) + 1
                continue
            else:
                continue
            recorded += 1
            if recorded % YIELD_EVERY_RECORDS == 0:
                sleep(0)  # let the application have the GIL (see YIELD_EVERY_RECORDS)
        for target, n in timeouts.items():
            target.instruments.timeouts.add(n, *target.args)


def feed_of(writer: Any) -> RecordFeed:
    """The writer's ``RecordFeed``, added to its record consumers on first use."""
    for consumer in writer.consumers:
        if isinstance(consumer, RecordFeed):
            return consumer
    feed = RecordFeed()
    writer.consumers.append(feed)
    # A MeterProvider shuts down (and exports one last time) at exit, from an atexit handler
    # it registered as it was made; this one, registered later, runs before it: what the
    # writer still has queued is measured in time for that export.
    atexit.register(_measure_queued, weakref.ref(writer))
    return feed


def _measure_queued(writer_ref: weakref.ref[Any]) -> None:
    """At exit: let the writer take (and so measure) what it still has queued, briefly."""
    writer = writer_ref()
    thread = writer._thread if writer is not None else None
    if thread is not None and thread.is_alive():  # a writer shut down already is left so
        writer.flush(timeout=EXIT_FLUSH_SECONDS)


EXIT_FLUSH_SECONDS = 2.0
"""The longest the exit waits for the writer to measure what is queued (see ``feed_of``)."""


def report(monitor: Any, meter_provider: Any) -> None:
    """Report ``monitor``'s pool through ``meter_provider``'s instruments (see
    :func:`meter_provider_of`), from its next record on; once per provider."""
    provider = meter_provider_of(meter_provider)
    if provider is None:
        return
    instruments = instruments_of(provider)
    feed = feed_of(monitor._writer)
    key = monitor.pool_key
    if any(target.instruments is instruments for target in feed.pools.get(key, ())):
        return
    pool_metrics = PoolMetrics(instruments, monitor, monitor.pool_info(), monitor._state)
    feed.add(key, pool_metrics)
    instruments.add(pool_metrics)
    # The feed holds the PoolMetrics (and so the instruments' set does) until the monitor
    # is gone and the batch holding its last records is read.
    weakref.finalize(monitor, feed.forget, key)
