"""The what-if panel: sliders for pool_size, max_overflow and pool_timeout re-running the
replay of a pool's recorded demand, with the predicted waits and timeouts against the
recorded ones."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from instrument import analysis
from instrument.dashboard import charts, ui


def _ms(seconds: Any) -> float | None:
    return None if seconds is None or pd.isna(seconds) else round(float(seconds) * 1000, 3)


def recorded_figures(advice: dict[str, Any] | None, stats: pd.DataFrame) -> dict[str, Any]:
    """The recorded waits (ms), timeouts and peak of one pool, keyed as a replay's."""
    row = stats.iloc[0] if not stats.empty else {}
    return {
        "wait_p50_ms": _ms(row.get("wait_p50_s")),
        "wait_p95_ms": _ms(row.get("wait_p95_s")),
        "wait_p99_ms": _ms(row.get("wait_p99_s")),
        "wait_max_ms": _ms(row.get("wait_max_s")),
        "timeouts": (advice or {}).get("timeouts", 0),
        "peak": (advice or {}).get("peak_in_use", 0),
    }


def render_what_if(
    pool: str, demands: list[Any], advice: dict[str, Any] | None, stats: pd.DataFrame
) -> None:
    """Draw the panel for ``pool``: three sliders starting at the recorded settings, the
    replay's prediction for the chosen ones, and a chart against what was recorded."""
    replayed = (advice or {}).get("replay") or {}
    current = replayed.get("current")
    if not current:  # a pool without a limit: nothing to vary
        return
    recommended = replayed.get("recommended") or current
    top = max(2 * (current["pool_size"] + current["max_overflow"]),
              replayed.get("peak_demand", 0) + 2, 10)  # fmt: skip
    longest = max(2 * current["pool_timeout_s"], 1.0)
    with st.expander(f"What if: replay pool {pool} with other settings", expanded=True):
        st.caption(
            "The recorded checkouts and timed-out requests replayed on QueuePool's rules "
            f"(per process). Recommended: {analysis_settings(recommended)}."
        )
        cols = st.columns(3)
        size = cols[0].slider("pool_size", 1, top, current["pool_size"], key=f"wi_size_{pool}")
        overflow = cols[1].slider(
            "max_overflow", 0, top, current["max_overflow"], key=f"wi_overflow_{pool}"
        )
        timeout = cols[2].slider(
            "pool_timeout (s)", 0.0, float(longest), float(current["pool_timeout_s"]),
            step=0.05, key=f"wi_timeout_{pool}",
        )  # fmt: skip
        predicted = analysis.what_if(demands, size, overflow, timeout)
        recorded = recorded_figures(advice, stats)
        metrics = st.columns(3)
        metrics[0].metric(
            "Predicted timeouts",
            predicted["timeouts"],
            delta=predicted["timeouts"] - int(recorded["timeouts"] or 0),
            delta_color="inverse",
        )
        p99 = predicted["wait_p99_ms"]
        metrics[1].metric("Predicted p99 wait", ui.fmt_duration(p99 / 1000) if p99 else "0")
        metrics[2].metric("Predicted peak", predicted["peak"])
        st.plotly_chart(
            charts.what_if_chart(recorded, predicted, title=f"What if: pool {pool}"),
            key=f"wi_chart_{pool}",
        )


def analysis_settings(outcome: dict[str, Any]) -> str:
    """``pool_size=…, max_overflow=…, pool_timeout=…`` of a replay outcome."""
    return (
        f"pool_size={outcome['pool_size']}, max_overflow={outcome['max_overflow']}, "
        f"pool_timeout={outcome['pool_timeout_s']:g}"
    )
