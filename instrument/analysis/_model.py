"""The vocabulary of the analysis: leak classes and certainties, the columns of each frame,
:class:`Filters`, the times a store and a filter may name, and the report's typed shape."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal, TypedDict

REPORT_SCHEMA = "poolscope.report/1"
"""The ``schema`` value of the JSON report this module builds."""

STALE_HEARTBEAT_S = 10.0
"""A process without a clean exit whose heartbeat is older than this many seconds has died."""

WAITED_THRESHOLD_S = 0.001
"""A checkout that waited longer than this for the pool counts as having waited."""

LEAK_CLASSES = ("never_returned", "gc_reclaimed", "open_at_crash", "held_too_long", "open_now")
"""The leak classes, in the order the report lists them."""


CERTAINTY = {
    "never_returned": "confirmed",
    "gc_reclaimed": "confirmed",
    "open_at_crash": "unknown",
    "held_too_long": "suspected",
    "open_now": "suspected",
}
"""How sure each leak class is: ``confirmed``, ``unknown`` or ``suspected``."""


_MAX_TIME = 253402300799.0
"""The latest time a store or a filter may name: 9999-12-31T23:59:59Z, in unix seconds. Times
range from 0 (1970-01-01T00:00:00Z) to this; an event outside it is ignored."""


_DEFAULT_LEAK_AFTER_S = 30.0
"""``attach()``'s default leak_after (not imported: the report runs without SQLAlchemy)."""


_CERTAINTY_ORDER = {"confirmed": 0, "unknown": 1, "suspected": 2}


_RETURN_KINDS = ("checkin", "gc_checkin", "detach", "unwatched")
"""Event kinds that end a checkout's watch: its returns, and ``unwatched`` (``detach()``
stopped watching it while it was out; whether it came back is not known)."""


_PROCESS_COLUMNS = [
    "id", "pid", "host", "argv", "started_at", "heartbeat_at", "ended_at", "end_reason",
    "state", "seen_until_at",
]  # fmt: skip


_POOL_COLUMNS = [
    "id", "process_id", "name", "url", "dialect", "pool_class", "pool_size", "max_overflow",
    "timeout_s", "recycle_s", "leak_after_s", "capacity",
]  # fmt: skip


_CHECKOUT_COLUMNS = [
    "process_id", "pool_id", "pool", "checkout_id", "connection_id", "site", "stack_id",
    "fingerprint", "thread", "task", "checked_out_at", "returned_at", "wait_s", "connect_s",
    "hold_s", "outcome", "leak_after_s", "leak_class", "in_use", "waiters",
]  # fmt: skip


_CORE_COLUMNS = [
    "process_id", "pool_id", "pool", "checkout_id", "site", "stack_id", "fingerprint",
    "checked_out_at", "returned_at", "wait_s", "hold_s", "outcome", "leak_after_s",
    "leak_class", "in_use", "waiters",
]  # fmt: skip


_UTILIZATION_COLUMNS = [
    "at", "pool", "in_use", "idle", "overflow", "waiters", "pool_size", "capacity", "processes",
]  # fmt: skip


_PERCENTILE_COLUMNS = [
    "count", "wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s",
    "hold_p50_s", "hold_p95_s", "hold_p99_s", "hold_max_s",
]  # fmt: skip


_TIMEOUT_COLUMNS = [
    "at", "pool", "process_id", "waited_s", "waiters", "site", "thread", "task", "holders",
    "fingerprint", "stack", "in_use",
]  # fmt: skip


_LEAK_COLUMNS = [
    "leak_class", "certainty", "site", "fingerprint", "pool", "count", "first_seen_at",
    "last_seen_at", "max_held_s", "threads", "stack", "processes", "leak_after_s",
]  # fmt: skip


_SITE_COLUMNS = [
    "site", "fingerprint", "checkouts", "total_hold_s", "hold_p95_s", "hold_max_s",
    "wait_p95_s", "pool_time_share", "stack", "pool", "hold_mean_s", "open", "leaks",
]  # fmt: skip


@dataclass(frozen=True)
class Filters:
    """What part of a store to analyse. Every field may be ``None`` for "no restriction".

    :param pools: pool names to keep.
    :param processes: ``processes.id`` values to keep.
    :param since: keep what happened at or after this unix time (a checkout counts when
        it was still held at ``since``).
    :param until: keep what happened at or before this unix time.
    :param leak_after: seconds after which a hold is a suspected leak; ``None`` uses
        each pool's own ``leak_after_s`` (the value it was attached with).
    """

    pools: tuple[str, ...] | None = None
    processes: tuple[int, ...] | None = None
    since: float | None = None
    until: float | None = None
    leak_after: float | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            at = getattr(self, name)
            if at is not None and not 0 <= at <= _MAX_TIME:  # NaN fails every comparison
                raise ValueError(
                    f"{name} must be unix seconds from 0 to {_MAX_TIME:.0f}, not {at!r}."
                )
        if self.leak_after is not None and not self.leak_after > 0:
            raise ValueError(f"leak_after must be more than 0 seconds, not {self.leak_after!r}.")
        if self.leak_after is not None and math.isinf(self.leak_after):
            raise ValueError("leak_after must be a finite number of seconds, not inf.")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since must not be later than until.")


def parse_time(text: str) -> float:
    """Read a time given on the command line: unix seconds (``1764246000.5``) or ISO 8601
    (``2026-11-27T13:00:00``, ``2026-11-27 13:00:00+01:00``, ``...Z``); without an offset,
    UTC.

    :raises ValueError: neither form, or not a time from 1970 to 9999 (``nan``, ``inf``,
        ``1e400``, ``-5``).
    """
    value = text.strip()
    try:
        at = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"cannot read {text!r} as a time; give unix seconds or an ISO 8601 time such "
                "as 2026-11-27T13:00:00"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        at = moment.timestamp()
    if not 0 <= at <= _MAX_TIME:  # NaN fails every comparison
        raise ValueError(
            f"{text!r} is not a time between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z "
            f"(unix seconds 0 to {_MAX_TIME:.0f})"
        )
    return at


def iso(at: float | None) -> str | None:
    """Write unix seconds as an ISO 8601 UTC time with milliseconds, e.g. ``...T12:00:01.250Z``.

    ``None`` for ``None``, NaN and a time outside 0 to :data:`_MAX_TIME`, which has no such
    writing (a tampered row)."""
    if at is None:
        return None
    at = float(at)
    if not 0 <= at <= _MAX_TIME:
        return None
    moment = datetime.fromtimestamp(at, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- the JSON report, as types ---------------------------------------------------------------
# One TypedDict per object of instrument/report_schema.json, with the same keys (a test
# holds them together). Times are ISO 8601 UTC strings; ``*_ms`` hold milliseconds.

LeakClass = Literal["never_returned", "gc_reclaimed", "open_at_crash", "held_too_long", "open_now"]
Certainty = Literal["confirmed", "unknown", "suspected"]
ProcessState = Literal["running", "exited", "terminated", "crashed"]


class ReportFilters(TypedDict):
    """The filters the report was built with (``None``: no restriction)."""

    pools: list[str] | None
    processes: list[int] | None
    since: str | None
    until: str | None
    leak_after_s: float | None


class Summary(TypedDict):
    """Headline numbers (:func:`instrument.analysis.summary`)."""

    processes: int
    crashed_processes: int
    terminated_processes: int
    running_processes: int
    pools: int
    events: int
    first_event_at: str | None
    last_event_at: str | None
    checkouts: int
    open_checkouts: int
    peak_in_use: int
    capacity: int | None
    wait_p95_s: float | None
    timeouts: int
    confirmed_leaks: int
    suspected_leaks: int
    unknown_leaks: int
    dropped: int
    ignored_events: int


class ProcessEntry(TypedDict):
    """One recording process."""

    id: int
    pid: int
    host: str
    argv: list[str]
    started_at: str
    last_seen_at: str
    state: ProcessState


class MsStats(TypedDict):
    """p50 / p95 / p99 / max in milliseconds."""

    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class ReplayOutcome(TypedDict):
    """What the recorded demand met on QueuePool with one set of settings."""

    pool_size: int
    max_overflow: int
    pool_timeout_s: float
    requests: int
    timeouts: int
    wait_p50_ms: float | None
    wait_p95_ms: float | None
    wait_p99_ms: float | None
    wait_max_ms: float | None
    peak: int
    peak_total: int


class Replay(TypedDict):
    """The recorded demand of one pool name replayed (:mod:`instrument._replay`)."""

    source: Literal["raw_events"]
    checkouts: int
    timeouts: int
    leaks_removed: int
    leak_sites: list[str]
    timed_out_hold: Literal["site_median"]
    max_wait_p99_ms: float
    peak_demand: int
    current: ReplayOutcome
    recommended: ReplayOutcome
    total_connections: int


class PrePingCost(TypedDict):
    """What each remedy for dropped connections would have cost on the window's checkouts."""

    pings: int
    recycle_reconnects: int | None


class Recycle(TypedDict):
    """Invalidated connections of one pool name and the recycle / pre-ping advice."""

    invalidations: int
    disconnects: int
    median_idle_s_at_disconnect: float | None
    min_idle_s_at_disconnect: float | None
    max_age_s: float | None
    pool_recycle_s: float | None
    pre_ping: bool | None
    recommended_pool_recycle_s: int | None
    pre_ping_cost: PrePingCost


class _SizingByReplay(TypedDict, total=False):
    """The keys a sizing entry has when its pool's demand was replayed (and, from the same
    version on, its invalidations were read)."""

    recommended_pool_timeout_s: float | None
    replay: Replay | None
    recycle: Recycle | None


class Sizing(_SizingByReplay):
    """Sizing advice for one pool name (:func:`instrument.analysis.sizing_advice`)."""

    pool: str
    processes: int
    checkouts: int
    observed_s: float
    arrival_rate_per_s: float | None
    mean_hold_s: float | None
    mean_in_use: float | None
    peak_in_use: int
    peak_waiting: int
    peak_demand: int
    waited_checkouts: int
    timeouts: int
    confirmed_leaks: int
    pool_size: int | None
    max_overflow: int | None
    capacity: int | None
    recommended_pool_size: int | None
    recommended_max_overflow: int | None
    verdict: Literal["ok", "too_small", "unbounded"]
    advice: str


class PoolEntry(TypedDict):
    """One pool name, over every process that attached it."""

    name: str
    url: str
    dialect: str | None
    pool_class: str
    pool_size: int | None
    max_overflow: int | None
    capacity: int | None
    timeout_s: float | None
    leak_after_s: float
    processes: list[int]
    checkouts: int
    peak_in_use: int
    timeouts: int
    wait_ms: MsStats
    hold_ms: MsStats
    sizing: Sizing | None


class ServerView(TypedDict):
    """PostgreSQL's ``pg_stat_activity`` row for a hold's backend, when it was flagged."""

    at: str
    pid: int | None
    state: str | None
    xact_start: str | None
    state_change: str | None
    wait_event_type: str | None
    wait_event: str | None
    query: str | None


class Blocker(TypedDict):
    """A backend holding the lock a hold waited on; ``site`` where it is our checkout."""

    site: str | None
    pid: int


class Diagnosis(TypedDict):
    """Why a hold was held (``attach(diagnose=...)``); see ``report_schema.json``."""

    kind: Literal["slow_sql", "idle_in_transaction", "idle", "lock_wait"] | None
    held_s: float | None
    complete: bool
    statements: int | None
    sql_s: float | None
    idle_in_transaction_s: float | None
    idle_s: float | None
    server: ServerView | None
    blocked_by: list[Blocker]


# "class" is a keyword: this one is spelt the functional way.
LeakEntry = TypedDict(
    "LeakEntry",
    {
        "class": LeakClass,
        "certainty": Certainty,
        "site": str,
        "fingerprint": str,
        "pool": str,
        "count": int,
        "first_seen_at": str,
        "last_seen_at": str,
        "max_held_s": float,
        "leak_after_s": float | None,
        "threads": list[str],
        "processes": list[int],
        "stack": list[str],
        "diagnosis": Diagnosis | None,
    },
)
"""Leaked checkouts of one class, pool and stack."""


class Holder(TypedDict):
    """A checkout that held the pool when a caller timed out."""

    site: str
    thread: str | None
    task: str | None
    held_s: float
    checkout_id: int
    checked_out_at: str
    diagnosis: Diagnosis | None


class TimeoutEntry(TypedDict):
    """One pool timeout and who held the pool at that moment."""

    at: str
    pool: str
    process_id: int
    waited_s: float | None
    waiters: int | None
    in_use: int | None
    site: str
    thread: str | None
    task: str | None
    stack: list[str]
    holders: list[Holder]


class SiteHoldMs(TypedDict):
    """A site's hold times in milliseconds."""

    mean: float | None
    p95: float | None
    max: float | None


class SiteWaitMs(TypedDict):
    """A site's p95 wait in milliseconds."""

    p95: float | None


class SiteEntry(TypedDict):
    """One call site (pool and stack fingerprint)."""

    site: str
    fingerprint: str
    pool: str
    checkouts: int
    open: int
    leaks: int
    total_hold_s: float
    hold_ms: SiteHoldMs
    wait_ms: SiteWaitMs
    pool_time_share: float
    stack: list[str]


class UtilizationSeries(TypedDict):
    """One pool's in-use and waiting series (``with_utilization=True``)."""

    pool: str
    start_at: str
    interval_s: float
    at_offsets_s: list[float]
    in_use: list[int]
    waiters: list[int]
    capacity: int | None


class Source(TypedDict):
    """Where the report's figures come from (see docs/report-json.md, ``source``)."""

    figures: Literal["raw_events", "rollups"]
    percentiles: Literal["raw_events", "histograms"]
    percentile_relative_error: float
    findings: Literal["raw_events"]
    replay: Literal["raw_events"] | None
    raw_since: str | None
    notable_dropped: int


class _ReportRequired(TypedDict):
    schema: Literal["poolscope.report/1"]
    generated_at: str
    poolscope: str
    store: str
    filters: ReportFilters
    summary: Summary
    processes: list[ProcessEntry]
    pools: list[PoolEntry]
    leaks: list[LeakEntry]
    timeouts: list[TimeoutEntry]
    sites: list[SiteEntry]


class Report(_ReportRequired, total=False):
    """The JSON report (:func:`instrument.analysis.build_report`), as the plain dict it is."""

    utilization: list[UtilizationSeries]
    source: Source
