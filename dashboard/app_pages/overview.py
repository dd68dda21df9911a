"""Overview: the headline numbers of the store and a compact utilization timeline."""

from __future__ import annotations

import streamlit as st

from instrument.dashboard import charts, data, ui

view = data.current_view()
util_loading = data.in_background(lambda: data.utilization(view))

st.title("Overview")
st.caption(f"Store `{data.shown(view.store)}` — times in UTC")
kpis = st.container()
timeline = st.empty()
# A blank chart right away lets the browser fetch the chart code while the store is read.
timeline.plotly_chart(charts.loading_chart("Connections in use"))

with kpis:
    summary = data.summary(view)
    ui.render_dropped(summary)

    row = st.columns(4)
    row[0].metric("Processes", summary["processes"])
    row[1].metric("Pools", summary["pools"])
    row[2].metric("Checkouts", f"{summary['checkouts']:,}")
    row[3].metric(
        "Peak in use / capacity",
        ui.fmt_peak(summary["peak_in_use"], summary["capacity"]),
        help="Most connections checked out at once, against pool_size + max_overflow.",
    )
    row = st.columns(4)
    row[0].metric("p95 wait", ui.fmt_duration(summary["wait_p95_s"]))
    row[1].metric("Timeouts", summary["timeouts"])
    row[2].metric(
        "Confirmed leaks",
        summary["confirmed_leaks"],
        help="never_returned and gc_reclaimed checkouts: certainly not closed by code.",
    )
    row[3].metric(
        "Suspected leaks",
        summary["suspected_leaks"],
        help="held_too_long and open_now checkouts: held past the leak threshold.",
    )
    if summary.get("unknown_leaks"):
        st.info(
            f"{summary['unknown_leaks']} checkouts were still open when their process died "
            "without a clean exit (open_at_crash): see the Leaks page."
        )

timeline.plotly_chart(charts.timeline_chart(util_loading.result()))

st.page_link(
    "app_pages/utilization.py",
    label="Was the pool too small? Sizing advice per pool on Utilization",
    icon=":material/arrow_forward:",
)

processes = data.load_processes(view.store, view.token)
st.subheader("Processes")
st.dataframe(
    ui.process_table(processes),
    hide_index=True,
    column_config={
        "started_at": st.column_config.DatetimeColumn("started (UTC)"),
        "seen_until_at": st.column_config.DatetimeColumn("last seen (UTC)"),
    },
)
