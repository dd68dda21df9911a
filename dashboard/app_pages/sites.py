"""Call sites: which code holds the pool, how often and how long; one site's stack in detail."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data, ui

view = data.current_view()
sites, checkouts = data.load_together(lambda: data.sites(view), lambda: data.checkouts(view))

st.title("Call sites")
st.caption(
    "A site is the innermost line of your code that asked for a connection. Share of pool "
    "time = its connection-seconds over all connection-seconds in the window."
)
if sites.empty:
    st.info("No checkouts in the chosen window and filters.")
    st.stop()

sites = sites.sort_values("total_hold_s", ascending=False).reset_index(drop=True)
st.plotly_chart(charts.sites_chart(sites))
st.dataframe(
    sites[
        [
            "site",
            "checkouts",
            "total_hold_s",
            "hold_p95_s",
            "hold_max_s",
            "wait_p95_s",
            "pool_time_share",
            "fingerprint",
        ]
    ],
    hide_index=True,
    column_config={
        "checkouts": st.column_config.NumberColumn("checkouts", format="%d"),
        "total_hold_s": st.column_config.NumberColumn("total hold (s)", format="%.3f"),
        "hold_p95_s": st.column_config.NumberColumn("p95 hold (s)", format="%.4f"),
        "hold_max_s": st.column_config.NumberColumn("max hold (s)", format="%.4f"),
        "wait_p95_s": st.column_config.NumberColumn("p95 wait (s)", format="%.4f"),
        "pool_time_share": st.column_config.ProgressColumn(
            "share of pool time", min_value=0.0, max_value=1.0, format="percent"
        ),
    },
)

labels = charts.site_labels(sites)
choice = st.selectbox("Site", range(len(sites)), format_func=labels.__getitem__, key="site")
site = sites.iloc[choice]

st.subheader(site["site"])
cols = st.columns(4)
cols[0].metric("Checkouts", f"{int(site['checkouts']):,}")
cols[1].metric("Total hold", ui.fmt_duration(site["total_hold_s"]))
cols[2].metric("p95 hold", ui.fmt_duration(site["hold_p95_s"]))
cols[3].metric("Share of pool time", f"{site['pool_time_share']:.1%}")
left, right = st.columns([3, 2])
with left:
    mine = checkouts[checkouts["site"] == site["site"]]
    if "fingerprint" in checkouts and (sites["site"] == site["site"]).sum() > 1:
        mine = mine[mine["fingerprint"] == site["fingerprint"]]
    st.plotly_chart(charts.hold_histogram_chart(mine, title="Hold time of this site"))
with right:
    st.markdown("**Stack** (innermost first)")
    ui.render_stack(site["stack"])
