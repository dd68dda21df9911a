"""Leaks: checkouts that never came back or were held too long, by class and call site."""

from __future__ import annotations

import streamlit as st

from instrument.dashboard import charts, data, ui

view = data.current_view()
leaks, summary, diagnosed = data.load_together(
    lambda: data.leaks(view), lambda: data.summary(view), lambda: data.diagnoses(view)
)

st.title("Leaks")
threshold = view.filters.leak_after
st.caption(
    "Leak threshold: "
    + (f"{threshold:g} s (sidebar)" if threshold else "each pool's own leak_after")
    + ". Confirmed leaks were certainly never closed by code; suspected ones were held past "
    "the threshold; unknown ones were open when their process died."
)
cols = st.columns(3)
cols[0].metric("Confirmed leaks", summary["confirmed_leaks"])
cols[1].metric("Suspected leaks", summary["suspected_leaks"])
cols[2].metric("Unknown (process died)", summary.get("unknown_leaks", 0))

# The report is built only when a button is clicked: on a big store it takes seconds.
buttons = st.columns(4)
buttons[0].download_button(
    "Download HTML report",
    lambda: data.render_report(view, "html"),
    file_name="poolscope-report.html",
    mime="text/html",
    on_click="ignore",
)
buttons[1].download_button(
    "Download JSON report",
    lambda: data.render_report(view, "json"),
    file_name="poolscope-report.json",
    mime="application/json",
    on_click="ignore",
)

if leaks.empty:
    st.success("No leaks in the chosen window and filters.")
    st.stop()

st.plotly_chart(charts.leaks_chart(leaks))

for leak_class, meaning in ui.LEAK_CLASSES.items():
    rows = leaks[leaks["leak_class"] == leak_class].sort_values("count", ascending=False)
    if rows.empty:
        continue
    certainty = rows["certainty"].iloc[0]
    st.header(f"{leak_class} · {certainty}")
    st.caption(f"{meaning}. {int(rows['count'].sum())} checkouts at {len(rows)} sites.")
    table = ui.with_times(rows, ["first_seen_at", "last_seen_at"])
    st.dataframe(
        table[["site", "pool", "count", "first_seen_at", "last_seen_at", "max_held_s", "threads"]],
        hide_index=True,
        column_config={
            "count": st.column_config.NumberColumn("count", format="%d"),
            "first_seen_at": st.column_config.DatetimeColumn("first seen (UTC)"),
            "last_seen_at": st.column_config.DatetimeColumn("last seen (UTC)"),
            "max_held_s": st.column_config.NumberColumn("max held (s)", format="%.3f"),
        },
        key=f"leaks-{leak_class}",
    )
    for row in rows.itertuples(index=False):
        why = data.why_of_leak(diagnosed, row.leak_class, row.pool, row.fingerprint)
        with st.expander(f"{row.site} · pool {row.pool} · {row.count}×"):
            if why:
                st.text(f"Why: {why}")  # plain text: a site or statement is never markup
            ui.render_stack(row.stack)
