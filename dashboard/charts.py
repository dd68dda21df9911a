"""Figure builders: pure functions from analysis frames to plotly figures (no Streamlit calls).

Times arrive as unix seconds in ``*_at`` columns and are drawn as UTC; durations arrive in
seconds in ``*_s`` columns and are drawn in milliseconds where they are usually short.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

IN_USE_COLOR = "#1f77b4"
OVERFLOW_COLOR = "#ff7f0e"
IDLE_COLOR = "#c7d7e8"
LIMIT_COLOR = "#444444"
TIMEOUT_COLOR = "#d62728"
CERTAINTY_COLORS = {"confirmed": "#d62728", "suspected": "#ff7f0e", "unknown": "#7f7f7f"}
"""Leak colours by certainty: confirmed leaks stand out, unknown ones recede."""

_MARGIN = {"l": 10, "r": 10, "t": 40, "b": 10}


def to_datetime(at: pd.Series | Iterable[float]) -> pd.Series:
    """Turn unix seconds into naive UTC timestamps, the x values of every time axis."""
    return pd.to_datetime(pd.Series(at, dtype="float64"), unit="s")


def _empty(title: str, message: str, height: int = 260) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, height=height, margin=_MARGIN)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def loading_chart(title: str, height: int = 260) -> go.Figure:
    """A blank chart saying "loading…", drawn while the real one is computed."""
    return _empty(title, "loading…", height=height)


def utilization_chart(
    util: pd.DataFrame, timeouts: pd.DataFrame | None = None, *, title: str = "Utilization"
) -> go.Figure:
    """Draw one pool's connections over time, with its waiters and timeouts underneath.

    The top panel stacks *in use within pool_size*, *overflow* and *idle*, with the
    ``pool_size`` and ``pool_size + max_overflow`` limits as lines; the bottom panel shows
    waiters and marks each timeout (height: waiters at that moment). Both panels share
    one time axis with a range slider for zooming.

    :param util: rows of :func:`instrument.analysis.utilization` for a single pool.
    :param timeouts: rows of :func:`instrument.analysis.timeouts` for the same pool.
        May be ``None``.
    """
    if util.empty:
        return _empty(title, "no pool activity in this window", height=420)
    util = util.sort_values("at")
    x = to_datetime(util["at"])
    in_use = util["in_use"].fillna(0)
    overflow = util["overflow"].fillna(0)
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06
    )
    stacked = {"mode": "lines", "stackgroup": "conns", "line": {"width": 0.5, "shape": "hv"}}
    fig.add_trace(
        go.Scatter(
            x=x,
            y=in_use - overflow,
            name="in use",
            fillcolor=IN_USE_COLOR,
            line_color=IN_USE_COLOR,
            **stacked,
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=overflow,
            name="overflow",
            fillcolor=OVERFLOW_COLOR,
            line_color=OVERFLOW_COLOR,
            **stacked,
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=util["idle"].fillna(0),
            name="idle",
            fillcolor=IDLE_COLOR,
            line_color=IDLE_COLOR,
            **stacked,
        ),
        row=1,
        col=1,
    )
    if util["pool_size"].notna().any():
        fig.add_trace(
            go.Scatter(
                x=x,
                y=util["pool_size"],
                name="pool_size",
                mode="lines",
                line={"color": LIMIT_COLOR, "dash": "dash", "width": 1.5},
            ),
            row=1,
            col=1,
        )
    if util["capacity"].notna().any():
        fig.add_trace(
            go.Scatter(
                x=x,
                y=util["capacity"],
                name="pool_size + max_overflow",
                mode="lines",
                line={"color": TIMEOUT_COLOR, "dash": "dot", "width": 1.5},
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=util["waiters"].fillna(0),
            name="waiters",
            mode="lines",
            line={"color": "#9467bd", "shape": "hv"},
            fill="tozeroy",
        ),
        row=2,
        col=1,
    )
    if timeouts is not None and not timeouts.empty:
        fig.add_trace(
            go.Scatter(
                x=to_datetime(timeouts["at"]),
                y=timeouts["waiters"],
                name="timeout",
                mode="markers",
                marker={"color": TIMEOUT_COLOR, "symbol": "x", "size": 11},
                customdata=timeouts[["site", "waited_s"]].to_numpy(),
                hovertemplate="timeout at %{x}<br>%{customdata[0]}<br>waited %{customdata[1]:.2f} s"
                "<extra></extra>",
            ),
            row=2,
            col=1,
        )
    fig.update_yaxes(title_text="connections", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="waiters", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(rangeslider={"visible": True, "thickness": 0.06}, row=2, col=1)
    fig.update_layout(
        title={"text": title, "y": 0.98, "yanchor": "top"},
        height=540,
        margin={**_MARGIN, "t": 80},
        hovermode="x unified",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.01, "x": 0, "traceorder": "normal"},
    )
    return fig


def hosts_chart(usage: pd.DataFrame, *, title: str = "In use by host") -> go.Figure:
    """Draw each host's connections in use (its pools summed) against its capacity.

    :param usage: rows of :func:`dashboard.data.host_utilization`: ``host``, ``at``,
        ``in_use``, ``capacity`` (NaN where a pool has no bound).
    """
    if usage.empty:
        return _empty(title, "no pool activity in this window")
    fig = go.Figure()
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for i, (host, rows) in enumerate(usage.sort_values("at").groupby("host", sort=True)):
        color = palette[i % len(palette)]
        x = to_datetime(rows["at"])
        fig.add_trace(
            go.Scatter(x=x, y=rows["in_use"].fillna(0), name=f"{host} in use", mode="lines",
                       line={"color": color, "shape": "hv"})
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(x=x, y=rows["capacity"], name=f"{host} capacity", mode="lines",
                       line={"color": color, "dash": "dash", "shape": "hv"})
        )  # fmt: skip
    fig.update_layout(title=title, height=320, margin=_MARGIN, yaxis_title="connections")
    return fig


def timeline_chart(util: pd.DataFrame, *, title: str = "Connections in use") -> go.Figure:
    """Draw a compact timeline: connections in use per pool, with each pool's capacity dotted.

    :param util: rows of :func:`instrument.analysis.utilization`, any number of pools.
    """
    if util.empty:
        return _empty(title, "no pool activity in this window", height=240)
    fig = go.Figure()
    for pool, rows in util.sort_values("at").groupby("pool", sort=True):
        x = to_datetime(rows["at"])
        fig.add_trace(
            go.Scatter(
                x=x, y=rows["in_use"], name=f"{pool} in use", mode="lines", line={"shape": "hv"}
            )
        )
        if rows["capacity"].notna().any():
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=rows["capacity"],
                    name=f"{pool} capacity",
                    mode="lines",
                    line={"dash": "dot", "width": 1},
                )
            )
    fig.update_yaxes(title_text="connections", rangemode="tozero")
    fig.update_layout(title=title, height=260, margin=_MARGIN, hovermode="x unified")
    return fig


def _histogram_ms(
    checkouts: pd.DataFrame, column: str, by: str, title: str, empty: str, bins: int
) -> go.Figure:
    """One histogram of ``column`` (seconds, drawn in ms) per value of ``by``, counting
    checkouts (a row with a ``weight`` column counts that many); a blank chart saying
    ``empty`` when no row has a value (it has no traces)."""
    values = checkouts.dropna(subset=[column]) if not checkouts.empty else checkouts
    if values.empty:
        return _empty(title, empty)
    fig = go.Figure()
    for key, rows in values.groupby(by, sort=True):
        if "weight" in rows:  # histogram buckets (rollups): each value counts ``weight`` times
            fig.add_trace(
                go.Histogram(
                    x=rows[column] * 1000.0, y=rows["weight"], histfunc="sum", name=str(key),
                    nbinsx=bins,
                )
            )  # fmt: skip
            continue
        fig.add_trace(go.Histogram(x=rows[column] * 1000.0, name=str(key), nbinsx=bins))
    fig.update_layout(title=title, margin=_MARGIN, yaxis_title="checkouts")
    return fig


def wait_histogram_chart(
    checkouts: pd.DataFrame, *, title: str = "Wait for a connection"
) -> go.Figure:
    """Draw the distribution of checkout waits in milliseconds, one colour per pool.

    :param checkouts: rows of :func:`instrument.analysis.checkouts`.
    """
    fig = _histogram_ms(checkouts, "wait_s", "pool", title, "no checkouts in this window", 60)
    if fig.data:
        fig.update_layout(height=320, barmode="overlay", xaxis_title="wait (ms)")
        fig.update_traces(opacity=0.75)
        fig.update_yaxes(type="log")  # the tail is the story: a few slow waits among many instant
    return fig


def wait_percentiles_chart(
    frame: pd.DataFrame, *, title: str = "Wait percentiles over time"
) -> go.Figure:
    """Draw p50 / p95 / p99 / max wait per time bucket, in milliseconds.

    :param frame: columns ``at, pool, wait_p50_s, wait_p95_s, wait_p99_s, wait_max_s``
        (see ``dashboard.data.wait_percentiles_over_time``).
    """
    if frame.empty:
        return _empty(title, "no checkouts in this window")
    fig = go.Figure()
    several = frame["pool"].nunique() > 1
    for pool, rows in frame.sort_values("at").groupby("pool", sort=True):
        x = to_datetime(rows["at"])
        for column, label, dash in (
            ("wait_p50_s", "p50", "solid"),
            ("wait_p95_s", "p95", "dash"),
            ("wait_p99_s", "p99", "dot"),
            ("wait_max_s", "max", "longdashdot"),
        ):
            name = f"{pool} {label}" if several else label
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=rows[column] * 1000.0,
                    name=name,
                    mode="lines+markers",
                    line={"dash": dash},
                    marker={"size": 4},
                )
            )
    fig.update_layout(
        title=title, height=320, margin=_MARGIN, yaxis_title="wait (ms)", hovermode="x unified"
    )
    fig.update_yaxes(rangemode="tozero")
    return fig


def holders_chart(holders: pd.DataFrame, *, title: str = "Holders at the timeout") -> go.Figure:
    """Draw who held the pool at one moment: one bar per checkout, longest held on top.

    :param holders: columns ``site, thread, held_s`` (one timeout's ``holders`` list).
    """
    if holders.empty:
        return _empty(title, "nobody held a connection")
    rows = holders.sort_values("held_s")
    labels = [
        f"{site} · {thread}" for site, thread in zip(rows["site"], rows["thread"], strict=True)
    ]
    fig = go.Figure(
        go.Bar(
            x=rows["held_s"],
            y=labels,
            orientation="h",
            name="held",
            marker_color=IN_USE_COLOR,
            hovertemplate="%{y}<br>held %{x:.2f} s<extra></extra>",
        )
    )
    fig.update_layout(
        title=title, height=120 + 32 * len(rows), margin=_MARGIN, xaxis_title="held (s)"
    )
    return fig


def timeouts_chart(timeouts: pd.DataFrame, *, title: str = "Timeouts") -> go.Figure:
    """Draw each timeout as a marker: when it happened and how long the caller waited.

    :param timeouts: rows of :func:`instrument.analysis.timeouts`.
    """
    if timeouts.empty:
        return _empty(title, "no timeouts in this window", height=220)
    fig = go.Figure()
    for pool, rows in timeouts.groupby("pool", sort=True):
        fig.add_trace(
            go.Scatter(
                x=to_datetime(rows["at"]),
                y=rows["waited_s"],
                name=str(pool),
                mode="markers",
                marker={"color": TIMEOUT_COLOR, "symbol": "x", "size": 11},
                customdata=rows[["site", "waiters"]].to_numpy(),
                hovertemplate="%{x}<br>%{customdata[0]}<br>waited %{y:.2f} s, "
                "%{customdata[1]} waiting<extra></extra>",
            )
        )
    fig.update_layout(title=title, height=240, margin=_MARGIN, yaxis_title="waited (s)")
    fig.update_yaxes(rangemode="tozero")
    return fig


def sites_chart(
    sites: pd.DataFrame, *, top: int = 15, title: str = "Share of pool time"
) -> go.Figure:
    """Draw the sites holding the pool longest, as a share of all connection-seconds.

    :param sites: rows of :func:`instrument.analysis.sites`.
    :param top: how many sites to show.
    """
    if sites.empty:
        return _empty(title, "no checkouts in this window")
    sites = sites.assign(label=site_labels(sites))
    rows = sites.sort_values("pool_time_share", ascending=False).head(top).iloc[::-1]
    fig = go.Figure(
        go.Bar(
            x=rows["pool_time_share"] * 100.0,
            y=rows["label"],
            orientation="h",
            name="pool time",
            marker_color=IN_USE_COLOR,
            customdata=rows[["checkouts", "total_hold_s"]].to_numpy(),
            hovertemplate="%{y}<br>%{x:.1f}% of pool time<br>%{customdata[0]} checkouts, "
            "%{customdata[1]:.2f} s held<extra></extra>",
        )
    )
    fig.update_layout(
        title=title, height=140 + 26 * len(rows), margin=_MARGIN, xaxis_title="% of pool time"
    )
    return fig


def hold_histogram_chart(checkouts: pd.DataFrame, *, title: str = "Hold time") -> go.Figure:
    """Draw the distribution of hold times (ms) of some checkouts, e.g. one site's.

    :param checkouts: rows of :func:`instrument.analysis.checkouts`.
    """
    fig = _histogram_ms(checkouts, "hold_s", "outcome", title, "no checkouts", 50)
    if fig.data:
        fig.update_layout(height=300, barmode="stack", xaxis_title="held (ms)")
    return fig


def leaks_chart(leaks: pd.DataFrame, *, title: str = "Leaks by class") -> go.Figure:
    """Draw leaked checkouts per class, coloured by certainty.

    :param leaks: rows of :func:`instrument.analysis.leaks`.
    """
    if leaks.empty:
        return _empty(title, "no leaks in this window", height=220)
    totals = leaks.groupby(["certainty", "leak_class"], as_index=False)["count"].sum()
    fig = go.Figure()
    for certainty, rows in totals.groupby("certainty", sort=True):
        fig.add_trace(
            go.Bar(
                x=rows["leak_class"],
                y=rows["count"],
                name=str(certainty),
                marker_color=CERTAINTY_COLORS.get(str(certainty), LIMIT_COLOR),
            )
        )
    fig.update_layout(
        title=title, height=280, margin=_MARGIN, barmode="stack", yaxis_title="checkouts"
    )
    return fig


def open_checkouts_chart(open_now: pd.DataFrame, *, title: str = "Open checkouts") -> go.Figure:
    """Draw the connections checked out right now, longest held on top.

    :param open_now: rows of :func:`instrument.analysis.checkouts` whose outcome is ``open``.
    """
    if open_now.empty:
        return _empty(title, "no connection is checked out", height=200)
    rows = open_now.sort_values("hold_s").tail(25)
    labels = [
        f"#{cid} {site} · {thread}"
        for cid, site, thread in zip(rows["checkout_id"], rows["site"], rows["thread"], strict=True)
    ]
    fig = go.Figure(
        go.Bar(
            x=rows["hold_s"],
            y=labels,
            orientation="h",
            name="held so far",
            marker_color=OVERFLOW_COLOR,
        )
    )
    fig.update_layout(
        title=title, height=120 + 28 * len(rows), margin=_MARGIN, xaxis_title="held so far (s)"
    )
    return fig


def site_labels(sites: pd.DataFrame) -> list[str]:
    """Name each row of a sites frame (one row per pool and stack): the site, with its pool
    when there are several pools, and the start of its fingerprint when one site is reached
    through several stacks, so the choices stay distinct."""
    several_pools = sites["pool"].nunique() > 1
    repeated = sites.duplicated(["pool", "site"], keep=False)
    labels = []
    for site, pool, fp, twice in zip(
        sites["site"], sites["pool"], sites["fingerprint"], repeated, strict=True
    ):
        label = f"{site} · pool {pool}" if several_pools else str(site)
        labels.append(f"{label} [{str(fp)[:8]}]" if twice else label)
    return labels


def what_if_chart(
    recorded: dict[str, float | None],
    predicted: dict[str, float | None],
    *,
    title: str = "What if: waits and timeouts",
) -> go.Figure:
    """Recorded against predicted wait percentiles (ms), with both timeout counts in the
    legend: ``recorded`` and ``predicted`` map ``wait_p50_ms`` ... ``wait_max_ms`` and
    ``timeouts`` to numbers (``None`` for none)."""
    keys = ["wait_p50_ms", "wait_p95_ms", "wait_p99_ms", "wait_max_ms"]
    labels = ["p50", "p95", "p99", "max"]
    fig = go.Figure()
    for name, values, color in (
        ("recorded", recorded, LIMIT_COLOR),
        ("predicted", predicted, IN_USE_COLOR),
    ):
        timeouts = values.get("timeouts") or 0
        fig.add_bar(
            x=labels,
            y=[values.get(k) or 0.0 for k in keys],
            name=f"{name} ({int(timeouts)} timeout{'' if timeouts == 1 else 's'})",
            marker_color=color,
        )
    fig.update_layout(
        title=title, barmode="group", height=260, margin=_MARGIN, yaxis_title="wait (ms)"
    )
    return fig
