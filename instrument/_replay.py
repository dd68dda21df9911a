"""A discrete-event replay of QueuePool's semantics on recorded demand, and the pool settings
it recommends.

Pure functions over numpy arrays: no pandas, no store. :mod:`instrument.analysis` turns a
store into :class:`Demand` (one per process and pool: pools are per process) and calls
:func:`replay` and :func:`recommend`.

The model is SQLAlchemy's ``QueuePool._do_get`` (``sqlalchemy/pool/impl.py``) on its
``util.queue.Queue``:

- a checkout takes an idle connection if there is one; else it opens a new one while
  ``overflow < max_overflow`` (``overflow`` starts at ``-pool_size``, so at most
  ``pool_size + max_overflow`` connections exist); else it waits on the queue's condition
  (woken first come, first served) for at most ``timeout`` seconds, then raises
  ``TimeoutError``;
- a return puts the connection back in the idle queue (capped at ``pool_size``; past it the
  connection is closed and ``overflow`` drops), which hands it to the oldest waiter.

So a caller is served at once exactly when fewer than ``pool_size + max_overflow``
connections are checked out (an idle one exists, or one may be opened); whether it was
idle or new only changes how many connections are opened and closed, not waits or
timeouts. The replay is therefore a first-come-first-served queue with
``pool_size + max_overflow`` servers whose callers give up after ``timeout``: the caller
arriving at ``a`` starts at ``max(a, f)``, ``f`` the earliest time a connection is free
after every earlier caller that was served took one, and times out if that is later than
``a + timeout``. One heap of free times, one step per checkout. The most connections open
at once equals the most checked out at once (a connection is opened only when none is
idle), which is the ``peak`` reported. ``pool_size == 0`` or ``max_overflow == -1`` means
no limit, as in SQLAlchemy.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_WAIT_P99_S = 0.1
"""The p99 wait the recommended capacity keeps under (seconds)."""

_NICE_TIMEOUTS_S = (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0)


@dataclass(frozen=True)
class Demand:
    """The recorded demand on one pool in one process.

    :param arrivals: when each checkout was asked for (unix seconds): its checkout time
        minus its wait and its connect time, or a timeout's time minus its wait.
    :param holds: how long each held its connection once it had it (seconds).
    :param connects: how long opening its connection took, when it opened one (seconds;
        0 otherwise). Counted as time the connection was taken but not yet checked out.
    """

    arrivals: np.ndarray
    holds: np.ndarray
    connects: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.arrivals) != len(self.holds):
            raise ValueError("arrivals and holds must have the same length.")
        order = np.argsort(self.arrivals, kind="stable")
        object.__setattr__(self, "arrivals", np.asarray(self.arrivals, "float64")[order])
        object.__setattr__(self, "holds", np.maximum(np.asarray(self.holds, "float64")[order], 0))
        connects = (
            np.zeros(len(order))
            if self.connects is None
            else np.nan_to_num(np.asarray(self.connects, "float64")[order])
        )
        object.__setattr__(self, "connects", np.maximum(connects, 0.0))

    def __len__(self) -> int:
        return len(self.arrivals)


@dataclass(frozen=True)
class Outcome:
    """What a replay predicts for one setting of the pool, over every process.

    ``waits_s`` are the waits of the callers that got a connection (what the recorded
    ``wait_ms`` percentiles are over); ``peak`` is the most connections checked out (and
    so open) at once in one process; ``peak_total`` the most at once summed over processes.
    """

    pool_size: int | None
    max_overflow: int | None
    timeout_s: float | None
    checkouts: int
    timeouts: int
    peak: int
    peak_total: int
    waits_s: np.ndarray = field(repr=False)

    def wait_ms(self, q: float) -> float | None:
        """The ``q``-th percentile of the waits, in milliseconds (``None`` without any)."""
        if not len(self.waits_s):
            return None
        return round(float(np.percentile(self.waits_s, q)) * 1000, 3)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: settings, ``timeouts``, ``wait_p50_ms``/``p95``/``p99``/``max``,
        ``peak`` and ``peak_total``."""
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout_s": self.timeout_s,
            "requests": self.checkouts,
            "timeouts": self.timeouts,
            "wait_p50_ms": self.wait_ms(50),
            "wait_p95_ms": self.wait_ms(95),
            "wait_p99_ms": self.wait_ms(99),
            "wait_max_ms": self.wait_ms(100),
            "peak": self.peak,
            "peak_total": self.peak_total,
        }


def capacity_of(pool_size: int, max_overflow: int) -> int | None:
    """``pool_size + max_overflow``, or ``None`` for no limit (SQLAlchemy's ``pool_size=0``
    or ``max_overflow=-1``)."""
    if pool_size <= 0 or max_overflow < 0:
        return None
    return pool_size + max_overflow


def _serve(demand: Demand, capacity: int | None, timeout_s: float) -> np.ndarray:
    """When each caller got its connection (NaN: it timed out), first come, first served."""
    arrivals = demand.arrivals
    n = len(arrivals)
    if capacity is None or capacity >= n or _unconstrained_peak(demand) <= capacity:
        return arrivals.copy()  # nobody ever waits: the common case, vectorised
    if capacity <= 0:
        return np.full(n, math.nan)
    free = [-math.inf] * capacity  # a heap: when each connection is next free
    replace = heapq.heapreplace
    nan = math.nan
    starts = []
    append = starts.append
    occupancy = (demand.connects + demand.holds).tolist()
    for a, h in zip(arrivals.tolist(), occupancy, strict=True):
        f = free[0]
        if f <= a:
            replace(free, a + h)
            append(a)
        elif f - a > timeout_s:  # still none free when its timeout ran out
            append(nan)
        else:
            replace(free, f + h)
            append(f)
    return np.array(starts, dtype="float64")


def _sweep_peak(starts: np.ndarray, ends: np.ndarray) -> int:
    """The most intervals ``[start, end)`` open at once (an end at a start's time comes
    first: the connection is returned before it is taken again)."""
    if not len(starts):
        return 0
    times = np.concatenate([ends, starts])
    deltas = np.concatenate([np.full(len(ends), -1, "int64"), np.ones(len(starts), "int64")])
    order = np.lexsort((deltas, times))
    return int(max(np.cumsum(deltas[order]).max(), 0))


def _unconstrained_peak(demand: Demand) -> int:
    """The most callers that wanted a connection at once: each served on arrival."""
    start = demand.arrivals
    return _sweep_peak(start, start + demand.connects + demand.holds)


def peak_demand(demands: list[Demand]) -> int:
    """The most callers wanting a connection at once in one process, were each served on
    arrival: no capacity beyond it is ever used."""
    return max((_unconstrained_peak(d) for d in demands if len(d)), default=0)


def replay(demands: list[Demand], pool_size: int, max_overflow: int, timeout_s: float) -> Outcome:
    """Replay every process's demand on a QueuePool of these settings.

    :param demands: one :class:`Demand` per process (and pool).
    :param pool_size: ``pool_size`` (0: no limit).
    :param max_overflow: ``max_overflow`` (-1: no limit).
    :param timeout_s: ``pool_timeout``, seconds a caller waits before ``TimeoutError``.
    """
    if timeout_s is None or not timeout_s >= 0:
        raise ValueError(f"timeout_s must be 0 or more seconds, not {timeout_s!r}.")
    capacity = capacity_of(pool_size, max_overflow)
    waits, in_starts, in_ends = [], [], []
    peak = n_timeouts = n = 0
    for demand in demands:
        if not len(demand):
            continue
        starts = _serve(demand, capacity, timeout_s)
        served = ~np.isnan(starts)
        n += len(demand)
        n_timeouts += int((~served).sum())
        waits.append(starts[served] - demand.arrivals[served])
        # In use from the checkout (after the connect) until the return.
        begin = starts[served] + demand.connects[served]
        end = begin + demand.holds[served]
        peak = max(peak, _sweep_peak(begin, end))
        in_starts.append(begin)
        in_ends.append(end)
    total = _sweep_peak(np.concatenate(in_starts), np.concatenate(in_ends)) if in_starts else 0
    return Outcome(
        pool_size=pool_size,
        max_overflow=max_overflow,
        timeout_s=timeout_s,
        checkouts=n,
        timeouts=n_timeouts,
        peak=peak,
        peak_total=total,
        waits_s=np.concatenate(waits) if waits else np.array([], "float64"),
    )


def _meets(outcome: Outcome, max_wait_p99_s: float) -> bool:
    p99 = outcome.wait_ms(99)
    return outcome.timeouts == 0 and (p99 is None or p99 <= max_wait_p99_s * 1000)


@dataclass(frozen=True)
class Advice:
    """The settings :func:`recommend` found, with the replay that supports them."""

    pool_size: int
    max_overflow: int
    timeout_s: float
    outcome: Outcome


def recommend(
    demands: list[Demand],
    pool_size: int,
    max_overflow: int,
    timeout_s: float,
    *,
    mean_in_use: float = math.nan,
    max_wait_p99_s: float = DEFAULT_MAX_WAIT_P99_S,
) -> Advice | None:
    """The smallest ``pool_size + max_overflow`` whose replay has no timeouts and a p99 wait
    of at most ``max_wait_p99_s``, and a ``pool_timeout`` that fails fast.

    The capacity may be smaller than the current one: it is never more than
    :func:`peak_demand`, the most callers that wanted a connection at once. ``pool_size``
    keeps its current value where it fits and covers the mean number in use
    (``mean_in_use``, Little's law), so overflow connections serve bursts rather than
    being opened and closed all the time; the rest is ``max_overflow``. ``pool_timeout``
    shrinks to a round value of at least four times the longest replayed wait when that
    is under half the current one (and 1 s or more): at the advised size a caller
    waiting longer is stuck behind a leak or a surge, better failed fast than queued.
    ``None`` for a pool without a limit.
    """
    current_capacity = capacity_of(pool_size, max_overflow)
    if current_capacity is None:
        return None
    upper = max(peak_demand(demands), 1)
    lo, hi = 1, upper  # replay(hi) never waits: the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if _meets(replay(demands, mid, 0, timeout_s), max_wait_p99_s):
            hi = mid
        else:
            lo = mid + 1
    capacity = lo
    mean_needed = max(1, math.ceil(mean_in_use - 1e-9)) if mean_in_use > 0 else 1
    size = min(max(pool_size, mean_needed), capacity)
    overflow = capacity - size
    outcome = replay(demands, size, overflow, timeout_s)
    timeout = _fail_fast_timeout(outcome, timeout_s)
    if timeout != timeout_s:
        outcome = replay(demands, size, overflow, timeout)
    return Advice(size, overflow, timeout, outcome)


def _fail_fast_timeout(outcome: Outcome, timeout_s: float) -> float:
    longest = float(outcome.waits_s.max()) if len(outcome.waits_s) else 0.0
    wanted = max(4 * longest, 1.0)
    nice = next((t for t in _NICE_TIMEOUTS_S if t >= wanted), None)
    if nice is None or nice > timeout_s / 2:
        return timeout_s
    return nice
