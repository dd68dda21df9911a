"""Small UI blocks and number formats shared by the pages."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import pandas as pd
import streamlit as st

from instrument.exceptions import StoreError
from instrument.render import words

LEAK_CLASSES: dict[str, str] = words.LEAK_MEANING
"""Each leak class with the sentence DESIGN.md gives it, in the order pages show them."""

HOW_TO_POINT = (
    "Point the dashboard at a poolscope store: record one with "
    "`instrument.attach(engine, store=PATH)`, then start the dashboard with "
    "`POOLSCOPE_STORE=PATH streamlit run dashboard/app.py`, or "
    "`streamlit run dashboard/app.py -- --store PATH`, or type the path in the sidebar."
)


def fmt_duration(seconds: float | None) -> str:
    """A duration as every poolscope report writes it (``1.50 s``, ``2m 30s``); ``None`` or
    NaN as an em dash."""
    return words.duration(seconds, missing="—")


def fmt_time(at: float | None) -> str:
    """Unix seconds as every poolscope report writes a time (UTC, to the millisecond, with
    its ``Z``); ``None`` or NaN as an em dash."""
    return words.when(at, missing="—")


def with_times(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Return a copy of ``frame`` whose unix-seconds ``columns`` are UTC timestamps."""
    frame = frame.copy()
    for column in columns:
        if column in frame:
            frame[column] = pd.to_datetime(frame[column], unit="s")
    return frame


def render_store_error(error: StoreError | str) -> None:
    """Show one ``st.error`` saying what is wrong with the store and what to do about it."""
    st.error(
        f"**poolscope cannot show this store.** {error}.\n\n{HOW_TO_POINT}", icon=":material/error:"
    )


def render_stack(frames: Sequence[str] | None) -> None:
    """Show a stack, innermost frame first, as a traceback-like code block."""
    if frames is None or len(frames) == 0:
        st.caption("no stack recorded")
        return
    st.code("\n".join(str(f) for f in frames), language="text", wrap_lines=True)


def render_dropped(summary: dict[str, Any]) -> None:
    """Warn when the recorder dropped records, since counts are then lower than reality."""
    dropped = int(summary.get("dropped") or 0)
    if dropped:
        st.warning(
            f"The recorder dropped {dropped:,} records (its queue was full or the store "
            "could not be written); the counts here are lower than what happened."
        )


def fmt_peak(peak: int | None, capacity: int | None) -> str:
    """Write peak use against capacity, e.g. ``15 / 15``; a pool without a size shows ``15``."""
    peak_text = "—" if peak is None else f"{int(peak)}"
    if capacity is None or (isinstance(capacity, float) and math.isnan(capacity)):
        return peak_text
    return f"{peak_text} / {int(capacity)}"


def advice_text(item: dict[str, Any]) -> str:
    """The paragraph of one sizing-advice item (``instrument.analysis.sizing_advice``)."""
    return str(item.get("advice") or "")


def process_table(processes: pd.DataFrame) -> pd.DataFrame:
    """The processes frame as people read it: how each ended, when, and its command line
    (the script's file name, not its full path)."""
    table = with_times(processes, ["started_at", "seen_until_at"])
    table["command"] = [_command(argv) for argv in processes["argv"]]
    columns = ["id", "pid", "host", "state", "end_reason", "started_at", "seen_until_at"]
    return table[[c for c in columns if c in table] + ["command"]]


def _command(argv: Any) -> str:
    try:
        words = json.loads(argv) if isinstance(argv, str) else list(argv)
    except (TypeError, ValueError):
        return str(argv)
    if not words:
        return ""
    return " ".join([PurePath(str(words[0])).name, *(str(w) for w in words[1:])])


FROM_ROLLUPS = (
    "Figures from rollups: counts exact, percentiles and distributions from log-bucket "
    "histograms (within 1 % of the recorded value); leaks and timeouts from the raw events kept."
)
"""The caption of a page whose figures come from rollups."""
