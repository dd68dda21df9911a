"""Waits & timeouts: how long checkouts waited, and who held the pool when one gave up."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from instrument.dashboard import charts, data, ui

MAX_TIMEOUTS_SHOWN = 50

view = data.current_view()
rollups = data.from_rollups(view)
checkouts, percentiles, overall, timeouts, diagnosed = data.load_together(
    # On rollups, the distribution comes from their histograms, not from every checkout.
    lambda: data.weighted(data.load_histograms(view.store, view.token, view.filters), "wait",
                          "wait_s")
    if rollups
    else data.checkouts(view),
    lambda: data.load_percentiles(view.store, view.token, view.filters, "pool"),
    lambda: data.load_percentiles(view.store, view.token, view.filters, None).iloc[0],
    lambda: data.timeouts(view),
    lambda: data.diagnoses(view),
)  # fmt: skip
over_time = (
    data.load_wait_percentiles_over_time(view.store, view.token, view.filters)
    if rollups
    else data.wait_percentiles_over_time(checkouts)
)

st.title("Waits & timeouts")
st.caption("Wait = time a checkout spent waiting for the pool, not counting connect time.")
if rollups:
    st.caption(ui.FROM_ROLLUPS)

cols = st.columns(4)
cols[0].metric("p50 wait", ui.fmt_duration(overall["wait_p50_s"]))
cols[1].metric("p95 wait", ui.fmt_duration(overall["wait_p95_s"]))
cols[2].metric("Max wait", ui.fmt_duration(overall["wait_max_s"]))
cols[3].metric("Timeouts", len(timeouts))

if not percentiles.empty:
    table = percentiles[["pool", "count", "wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s"]]
    st.dataframe(
        table.assign(**{c: table[c] * 1000.0 for c in table.columns if c.endswith("_s")}),
        hide_index=True,
        column_config={
            "pool": "pool",
            "count": st.column_config.NumberColumn("checkouts", format="%d"),
            "wait_p50_s": st.column_config.NumberColumn("p50 wait (ms)", format="%.2f"),
            "wait_p95_s": st.column_config.NumberColumn("p95 wait (ms)", format="%.2f"),
            "wait_p99_s": st.column_config.NumberColumn("p99 wait (ms)", format="%.2f"),
            "wait_max_s": st.column_config.NumberColumn("max wait (ms)", format="%.2f"),
        },
    )

left, right = st.columns(2)
left.plotly_chart(charts.wait_histogram_chart(checkouts))
right.plotly_chart(charts.wait_percentiles_chart(over_time))

st.header(f"Timeouts ({len(timeouts)})")
if timeouts.empty:
    st.success("No checkout timed out in the chosen window.")
else:
    st.plotly_chart(charts.timeouts_chart(timeouts))
    st.subheader("Who held the pool when callers timed out")
    st.dataframe(
        data.holders_by_site(timeouts),
        hide_index=True,
        column_config={
            "site": "holder site",
            "timeouts": st.column_config.NumberColumn("timeouts it held through", format="%d"),
            "most_held": st.column_config.NumberColumn("most connections at once", format="%d"),
            "max_held_s": st.column_config.NumberColumn("longest hold (s)", format="%.3f"),
        },
    )
    st.caption(
        "For each timeout, the connections checked out at that moment: who was holding the pool."
    )
    latest = timeouts.sort_values("at", ascending=False).head(MAX_TIMEOUTS_SHOWN)
    if len(timeouts) > MAX_TIMEOUTS_SHOWN:
        st.caption(f"Showing the latest {MAX_TIMEOUTS_SHOWN} of {len(timeouts)} timeouts.")
    for number, row in enumerate(latest.itertuples(index=False)):
        holders = pd.DataFrame(
            list(row.holders or []), columns=["site", "thread", "task", "held_s", "checkout_id"]
        )
        title = (
            f"{ui.fmt_time(row.at)} · pool {row.pool} · {row.site} (thread {row.thread}) "
            f"waited {ui.fmt_duration(row.waited_s)} · {len(holders)} holders"
        )
        holders["why"] = data.why_of_holders(
            diagnosed, int(row.process_id), [int(c) for c in holders["checkout_id"]]
        )
        with st.expander(title, expanded=number == 0):
            shown = ["site", "thread", "task", "held_s", "checkout_id", "why"]
            if not holders["why"].any():
                shown.remove("why")
            if holders["task"].isna().all():
                shown.remove("task")
            st.dataframe(
                holders[shown],
                hide_index=True,
                column_config={
                    "held_s": st.column_config.NumberColumn("held (s)", format="%.3f"),
                    "checkout_id": st.column_config.NumberColumn("checkout", format="%d"),
                },
            )
            if number == 0:
                st.plotly_chart(charts.holders_chart(holders), key=f"holders-{number}")
