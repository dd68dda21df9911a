"""Utilization: in use / idle / overflow over time against the pool's limits, per pool."""

from __future__ import annotations

import streamlit as st

from instrument.dashboard import charts, data, ui, what_if

view = data.current_view()
util, timeouts, percentiles, sizing, demands = data.load_together(
    lambda: data.utilization(view),
    lambda: data.timeouts(view),
    lambda: data.load_percentiles(view.store, view.token, view.filters, "pool"),
    lambda: data.load_sizing_advice(view.store, view.token, view.filters),
    lambda: data.load_replay_demands(view.store, view.token, view.filters),
)
advice = {a["pool"]: a for a in sizing}
processes = data.load_processes(view.store, view.token)

st.title("Utilization")
st.caption(
    "Connections checked out (within pool_size, then overflow) and idle, against pool_size "
    "and pool_size + max_overflow; waiters and timeouts below on the same time axis. Drag "
    "on a chart or use its range slider to zoom; the sidebar's time window narrows every page."
)

if util.empty:
    st.info("No pool activity in the chosen window and filters.")
for pool, rows in util.groupby("pool", sort=True):
    pool_timeouts = timeouts[timeouts["pool"] == pool] if not timeouts.empty else timeouts
    st.plotly_chart(charts.utilization_chart(rows, pool_timeouts, title=f"Pool {pool}"))
    stats = percentiles[percentiles["pool"] == pool] if not percentiles.empty else percentiles
    cols = st.columns(4)
    cols[0].metric("Peak in use", int(rows["in_use"].max()))
    capacity = rows["capacity"].dropna()
    cols[1].metric("Capacity", int(capacity.max()) if not capacity.empty else "unbounded")
    cols[2].metric("Most waiters", int(rows["waiters"].fillna(0).max()))
    cols[3].metric(
        "p95 hold", ui.fmt_duration(stats["hold_p95_s"].iloc[0]) if not stats.empty else "—"
    )
    if pool in advice:
        text = ui.advice_text(advice[pool])
        (st.warning if advice[pool].get("verdict") == "too_small" else st.info)(text)
    if pool in demands:
        what_if.render_what_if(pool, demands[pool], advice.get(pool), stats)
    elif data.from_rollups(view):
        st.caption(
            "No replay or what-if here: they replay every recorded checkout, and this window's "
            "figures come from rollups. Narrow the time window to where raw events are kept."
        )

st.header("By host")
st.caption(
    "Each host's pools summed: connections in use against their capacity (pool_size + "
    "max_overflow), for the processes the sidebar selects."
)
st.plotly_chart(charts.hosts_chart(data.host_utilization(view, processes)))
