"""Turns a store into answers: pandas frames of checkouts, utilization, percentiles, timeouts,
leaks and call sites, plus pool sizing advice and the JSON report built from them.

The report and the dashboard both read the store only through this module, so they agree.
Times are unix seconds (float) in columns named ``*_at``; durations are seconds in ``*_s``.

Heavy lifting happens in SQLite (pairing, bucketing) and in vectorised pandas on a few
selected columns: no Python object is built per event row, so a store of a million events
reports in seconds. Past 250,000 checkouts in the window, or before ``raw_since`` (raw
events pruned), counts and distributions come from the store's rollups and only the
checkouts shown one by one are paired (see ``_aggregate`` and ``source`` in the report).

One module per question, all private; this package is the public face:

- ``_model``: the vocabulary (leak classes, columns, :class:`Filters`, times) and the typed
  shape of the JSON report (:class:`Report`, matching ``report_schema.json``);
- ``_load``: opening a store, its processes and pools, checkouts paired and classified,
  and where the figures come from (raw events or rollups);
- ``_aggregate``: the rollups of a window, their histograms, the notable checkouts;
- ``_usage``: utilization, percentiles and peaks; ``_timeouts``; ``_leaks``; ``_sites``;
  ``_sizing``; ``_summary``; ``_diagnosis`` (why long holds were held);
- ``_build``: the JSON report from all of them.
"""

from __future__ import annotations

from ._build import build_report
from ._diagnosis import DIAGNOSIS_KINDS, diagnoses
from ._leaks import leaks
from ._load import checkouts, open_store, pools, processes
from ._model import (
    CERTAINTY,
    LEAK_CLASSES,
    REPORT_SCHEMA,
    STALE_HEARTBEAT_S,
    WAITED_THRESHOLD_S,
    Filters,
    Report,
    iso,
    parse_time,
)
from ._sites import sites
from ._sizing import replay_demands, sizing_advice, what_if
from ._summary import summary
from ._timeouts import timeouts
from ._usage import (
    histograms,
    percentiles,
    source,
    utilization,
    wait_percentiles_over_time,
)

__all__ = [
    "CERTAINTY",
    "DIAGNOSIS_KINDS",
    "LEAK_CLASSES",
    "REPORT_SCHEMA",
    "STALE_HEARTBEAT_S",
    "WAITED_THRESHOLD_S",
    "Filters",
    "Report",
    "build_report",
    "checkouts",
    "diagnoses",
    "histograms",
    "leaks",
    "iso",
    "open_store",
    "parse_time",
    "percentiles",
    "pools",
    "processes",
    "sites",
    "replay_demands",
    "sizing_advice",
    "source",
    "summary",
    "timeouts",
    "utilization",
    "wait_percentiles_over_time",
    "what_if",
]
