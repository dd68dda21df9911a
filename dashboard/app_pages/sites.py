"""Call sites: which code holds the pool, how often and how long; one site's stack in detail."""

from __future__ import annotations

import streamlit as st

from instrument.dashboard import charts, data, ui

view = data.current_view()
rollups = data.from_rollups(view)
sites, checkouts = data.load_together(
    lambda: data.sites(view),
    # On rollups, each site's hold times come from their histograms, not every checkout.
    lambda: data.weighted(data.load_histograms(view.store, view.token, view.filters), "hold",
                          "hold_s")
    if rollups
    else data.checkouts(view),
)  # fmt: skip

st.title("Call sites")
st.caption(
    "A site is the innermost line of your code that asked for a connection. Share of pool "
    "time = its connection-seconds over all connection-seconds in the window."
    + (f" {ui.FROM_ROLLUPS}" if rollups else "")
)
if sites.empty:
    st.info("No checkouts in the chosen window and filters.")
    st.stop()

sites = sites.sort_values("total_hold_s", ascending=False).reset_index(drop=True)
keys = [f"{pool}|{fp}" for pool, fp in zip(sites["pool"], sites["fingerprint"], strict=True)]
labels = dict(zip(keys, charts.site_labels(sites), strict=True))


def _select_row() -> None:
    """A click on a table row chooses that site in the selectbox below."""
    rows = st.session_state["sites_table"].selection.rows
    if rows:
        st.session_state["site"] = keys[rows[0]]


st.plotly_chart(charts.sites_chart(sites))
st.dataframe(
    sites[
        [
            "site",
            "pool",
            "checkouts",
            "pool_time_share",
            "total_hold_s",
            "hold_p95_s",
            "hold_max_s",
            "wait_p95_s",
            "fingerprint",
        ]
    ],
    hide_index=True,
    key="sites_table",
    on_select=_select_row,
    selection_mode="single-row",
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

if st.session_state.get("site") not in labels:
    st.session_state.pop("site", None)  # chosen under other filters: start from the top
choice = st.selectbox(
    "Site (or click a row above)", keys, format_func=labels.__getitem__, key="site"
)
site = sites.iloc[keys.index(choice)]

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
