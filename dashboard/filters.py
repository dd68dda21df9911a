"""The sidebar filters as URL query parameters, so that a view can be shared as a link.

Query parameters (all optional)::

    ?pool=orders&pool=billing      pool names
    &host=web-1&host=web-2         host names (their processes)
    &process=1&process=3           process ids of the store
    &since=2026-11-27T13:05:00Z    time window, UTC
    &until=2026-11-27T13:06:30Z
    &leak_after=5                  leak threshold in seconds

Values that do not parse are ignored: a stale or hand-edited link still opens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from instrument import analysis


@dataclass(frozen=True)
class FilterState:
    """What the sidebar filters hold, before the store's bounds are applied."""

    pools: tuple[str, ...] = ()
    processes: tuple[int, ...] = ()
    hosts: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    leak_after: float | None = None


def _values(params: Mapping[str, Any], name: str) -> list[str]:
    value = params.get(name)
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def parse_time(text: str) -> float | None:
    """Read a time from a query value the way ``poolscope report --since`` does (see
    :func:`instrument.analysis.parse_time`). Returns unix seconds, or ``None`` if it does
    not parse or is not finite."""
    try:
        at = analysis.parse_time(text)
    except ValueError:
        return None
    return at if math.isfinite(at) else None


def format_time(at: float) -> str:
    """Write unix seconds as an ISO 8601 UTC time with a ``Z``, to the second."""
    moment = datetime.fromtimestamp(at, tz=timezone.utc).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def from_query(params: Mapping[str, Any]) -> FilterState:
    """Read the filters from query parameters (a ``st.query_params``-like mapping).

    A repeated key may arrive as a list; unknown keys and unparsable values are ignored.
    """
    processes = []
    for value in _values(params, "process"):
        if value.strip().isdigit():
            processes.append(int(value))
    since = until = leak_after = None
    if values := _values(params, "since"):
        since = parse_time(values[-1])
    if values := _values(params, "until"):
        until = parse_time(values[-1])
    if values := _values(params, "leak_after"):
        try:
            number = float(values[-1])
        except ValueError:
            number = math.nan
        leak_after = number if math.isfinite(number) and number > 0 else None
    return FilterState(
        pools=tuple(dict.fromkeys(v for v in _values(params, "pool") if v)),
        processes=tuple(dict.fromkeys(processes)),
        hosts=tuple(dict.fromkeys(v for v in _values(params, "host") if v)),
        since=since,
        until=until,
        leak_after=leak_after,
    )


def to_query(state: FilterState) -> dict[str, str | list[str]]:
    """Write the filters as query parameters, leaving out the ones at their default."""
    query: dict[str, str | list[str]] = {}
    if state.pools:
        query["pool"] = list(state.pools)
    if state.hosts:
        query["host"] = list(state.hosts)
    if state.processes:
        query["process"] = [str(p) for p in state.processes]
    if state.since is not None:
        query["since"] = format_time(state.since)
    if state.until is not None:
        query["until"] = format_time(state.until)
    if state.leak_after is not None:
        query["leak_after"] = f"{state.leak_after:g}"
    return query
