"""The poolscope dashboard's router: page config, the shared sidebar, then the chosen page.

Run it with ``streamlit run dashboard/app.py [-- --store PATH [--allow-any-store]]``. The
store comes from ``--store``, else ``$POOLSCOPE_STORE``, else ``./poolscope.db``, and can be
changed in the sidebar to another store of its directory (any store with
``--allow-any-store``); a PostgreSQL store's URL (best given in ``$POOLSCOPE_STORE``, which
no process list shows) is shown with its password masked. The page shows nothing to a
request for another host name (see :mod:`dashboard.access`). The sidebar filters (host,
process, pool, time window, leak threshold)
apply to every page and are mirrored in the URL's query parameters, so a view can be shared
as a link.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import streamlit as st

# Streamlit runs this file as a script, so it imports its package by its installed name
# (a clone's editable install maps dashboard/ to it), as the pages do.
from instrument import analysis
from instrument.dashboard import access, data, filters, ui
from instrument.exceptions import StoreError

_PAGES = Path(__file__).resolve().parent / "app_pages"


def _to_datetime(at: float) -> datetime:
    return datetime.fromtimestamp(at, tz=timezone.utc).replace(tzinfo=None)


def _to_unix(moment: datetime) -> float:
    return moment.replace(tzinfo=timezone.utc).timestamp()


def render_store_picker(policy: access.StorePolicy) -> str:
    """Draw the store input (seeded from ``--store`` / ``$POOLSCOPE_STORE``); return the path
    or URL. A URL is shown with its password as ``***``; left as shown, it means the
    started store, password included."""
    started_shown = data.shown(policy.started)
    if "store" not in st.session_state:
        st.session_state["store"] = started_shown
    path = st.sidebar.text_input(
        "Store",
        key="store",
        help="Path of the SQLite file poolscope recorded into, or a PostgreSQL store's URL.",
    ).strip()
    if path == started_shown:
        return policy.started
    return path or "poolscope.db"


def _seed_from_query(first: float, last: float) -> None:
    """On a session's first run, put the URL's filters into the sidebar widgets."""
    if st.session_state.get("_seeded"):
        return
    st.session_state["_seeded"] = True
    state = filters.from_query(st.query_params.to_dict() | _repeated_params())
    if state.pools:
        st.session_state["pools"] = list(state.pools)
    if state.processes:
        st.session_state["processes"] = list(state.processes)
    if state.hosts:
        st.session_state["hosts"] = list(state.hosts)
    if state.since is not None or state.until is not None:
        since = first if state.since is None else state.since
        until = last if state.until is None else state.until
        st.session_state["window"] = (_to_datetime(since), _to_datetime(until))
    if state.leak_after is not None:
        st.session_state["leak_after"] = state.leak_after


def _repeated_params() -> dict[str, list[str]]:
    return {name: st.query_params.get_all(name) for name in ("pool", "process", "host")}


def _window_bounds(first: float, last: float) -> tuple[datetime, datetime]:
    start = _to_datetime(first).replace(microsecond=0)
    end = _to_datetime(last).replace(microsecond=0) + timedelta(seconds=1)
    return start, max(end, start + timedelta(seconds=1))


def render_filters(store: str) -> data.View:
    """Draw the filters for ``store`` and return the view they select.

    :raises StoreError: the store cannot be read.
    """
    if st.session_state.get("_filters_store") != store:
        # Another store: the old choices of pools, processes and window mean nothing there.
        for key in ("pools", "processes", "hosts", "window", "_window_end", "site"):
            st.session_state.pop(key, None)
        st.session_state["_filters_store"] = store
    token = data.store_token(store)
    processes = data.load_processes(store, token)
    pools = data.load_pools(store, token)
    start, end = _window_bounds(*data.time_span(processes))
    first, last = _to_unix(start), _to_unix(end)
    _seed_from_query(first, last)

    sidebar = st.sidebar
    host_names = sorted(set(processes["host"]))
    kept_hosts = [h for h in st.session_state.get("hosts", []) if h in host_names]
    if "hosts" in st.session_state:
        st.session_state["hosts"] = kept_hosts
    chosen_hosts = sidebar.multiselect("Hosts", host_names, key="hosts", placeholder="all hosts")
    on_hosts = processes[processes["host"].isin(chosen_hosts)] if chosen_hosts else processes
    process_ids = [int(p) for p in on_hosts["id"]]
    if "processes" in st.session_state:  # a process of a host no longer chosen goes
        st.session_state["processes"] = [
            p for p in st.session_state["processes"] if p in process_ids
        ]
    labels = {
        int(row.id): f"#{row.id} · pid {row.pid} · {row.state}" for row in processes.itertuples()
    }
    chosen_processes = sidebar.multiselect(
        "Processes",
        process_ids,
        key="processes",
        format_func=lambda pid: labels.get(pid, f"#{pid}"),
        placeholder="all processes",
    )
    pool_names = sorted(set(pools["name"]))
    chosen_pools = sidebar.multiselect("Pools", pool_names, key="pools", placeholder="all pools")

    # Keep the chosen window inside the store's span; a window reaching the end follows a
    # live store as it grows.
    previous_end = st.session_state.get("_window_end")
    window = st.session_state.get("window")
    if window is not None:
        lo, hi = window
        if previous_end is not None and hi >= previous_end:
            hi = end
        lo = min(max(lo, start), end)
        hi = min(max(hi, lo), end)
        st.session_state["window"] = (lo, hi)
    st.session_state["_window_end"] = end
    lo, hi = sidebar.slider(
        "Time window (UTC)",
        min_value=start,
        max_value=end,
        value=None if window is not None else (start, end),
        key="window",
        step=timedelta(seconds=1),
        format="HH:mm:ss" if end - start < timedelta(hours=20) else "MM-DD HH:mm",
    )
    leak_after = sidebar.number_input(
        "Leak threshold (s)",
        min_value=0.001,
        value=None,
        key="leak_after",
        placeholder="each pool's leak_after",
        help="Checkouts held longer than this count as suspected leaks. Empty: each pool "
        "uses the leak_after it was attached with.",
    )

    since = None if lo <= start else _to_unix(lo)
    until = None if hi >= end else _to_unix(hi)
    state = filters.FilterState(
        pools=tuple(chosen_pools),
        processes=tuple(chosen_processes),
        hosts=tuple(chosen_hosts),
        since=since,
        until=until,
        leak_after=leak_after,
    )
    st.query_params.from_dict(filters.to_query(state))
    # A host is the set of its processes: the analysis filters by process.
    scope = state.processes or (tuple(process_ids) if chosen_hosts else ())
    view_filters = analysis.Filters(
        pools=state.pools or None,
        processes=scope or None,
        since=since,
        until=until,
        leak_after=leak_after,
    )
    if not data.load_has_events(store, token):
        raise _EmptyStore(
            f"{data.shown(store)} holds no pool events yet: the app that attached poolscope "
            "has not checked out a connection. Run it, then reload this page"
        )
    return data.View(store=store, token=token, filters=view_filters)


class _EmptyStore(StoreError):
    """A valid store in which nothing was recorded yet."""


def _require_own_host() -> None:
    """Stop the run, showing nothing of any store, when the request's ``Host`` names
    neither this server nor a name it was told to answer under (DNS rebinding)."""
    host = st.context.headers.get("Host")
    port = int(st.get_option("server.port"))
    if access.host_allowed(
        host, st.get_option("server.address"), port, access.allowed_hosts_from()
    ):
        return
    st.error(
        "**poolscope does not answer under this host name.** Open the dashboard at "
        f"http://127.0.0.1:{port} or http://localhost:{port}; to serve it under another "
        f"name, list that name in ${access.ALLOWED_HOSTS_ENV}.",
        icon=":material/block:",
    )
    st.stop()


st.set_page_config(page_title="poolscope", page_icon=":material/database:", layout="wide")
_require_own_host()
navigation = st.navigation(
    [
        st.Page(
            _PAGES / "overview.py", title="Overview", icon=":material/dashboard:", default=True
        ),
        st.Page(
            _PAGES / "utilization.py", title="Utilization", icon=":material/stacked_line_chart:"
        ),
        st.Page(_PAGES / "waits.py", title="Waits & timeouts", icon=":material/hourglass_top:"),
        st.Page(_PAGES / "sites.py", title="Call sites", icon=":material/location_on:"),
        st.Page(_PAGES / "leaks.py", title="Leaks", icon=":material/water_drop:"),
        st.Page(_PAGES / "live.py", title="Live", icon=":material/sensors:"),
    ]
)
st.sidebar.title("poolscope")
store_policy = access.store_policy(sys.argv[1:])
store_path = render_store_picker(store_policy)
try:
    store_policy.check(store_path)
    view = render_filters(store_path)
except StoreError as error:
    ui.render_store_error(error)
    st.stop()
data.set_view(view)
try:
    navigation.run()
except StoreError as error:  # the store went bad after the sidebar read it
    ui.render_store_error(error)
