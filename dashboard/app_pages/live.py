"""Live: the connections checked out right now and recent utilization, refreshed every few s."""

from __future__ import annotations

import time
from dataclasses import replace

import streamlit as st

from instrument import analysis
from instrument.dashboard import charts, data, ui

view = data.current_view()

st.title("Live")
paused = st.toggle("Pause", key="live_paused", help="Stop refreshing to look at one moment.")
st.caption(
    f"Refreshes every {data.LIVE_REFRESH_S:g} s while a process writes the store; shows the "
    f"last {data.LIVE_WINDOW_S / 60:g} minutes."
)


def render_live() -> None:
    """Draw the open checkouts and the recent utilization from the store as it is now."""
    now_view = data.refreshed(view)
    processes = data.load_processes(now_view.store, now_view.token)
    first, last = data.time_span(processes)
    chosen = analysis.Filters(pools=view.filters.pools, processes=view.filters.processes)
    open_rows = data.open_now(
        data.load_open_checkouts(now_view.store, now_view.token, chosen, last), processes
    )
    # The last few minutes of the recording: right now while a process is writing it.
    recent = replace(chosen, since=max(first, last - data.LIVE_WINDOW_S))
    util = data.load_utilization(now_view.store, now_view.token, recent)
    running = int((processes["state"] == "running").sum())

    cols = st.columns(3)
    cols[0].metric("Running processes", running)
    cols[1].metric("Checked out now", len(open_rows))
    cols[2].metric(
        "Longest held now", ui.fmt_duration(open_rows["hold_s"].max()) if len(open_rows) else "—"
    )
    if running == 0:
        st.info(
            "No process is writing this store right now: start your app with poolscope "
            "attached to watch it live. The chart shows the end of the recording."
        )
    st.plotly_chart(charts.timeline_chart(util, title="Connections in use, recent"))
    st.plotly_chart(charts.open_checkouts_chart(open_rows))
    if len(open_rows):
        shown = ["pool", "site", "thread", "task", "checked_out_at", "hold_s", "checkout_id"]
        if open_rows["task"].isna().all():
            shown.remove("task")
        st.dataframe(
            ui.with_times(open_rows, ["checked_out_at"])[shown],
            hide_index=True,
            column_config={"hold_s": st.column_config.NumberColumn("held (s)", format="%.2f")},
        )
    st.caption(f"As of {ui.fmt_time(time.time())}" + (" · paused" if paused else ""))


st.fragment(run_every=None if paused else data.LIVE_REFRESH_S)(render_live)()
