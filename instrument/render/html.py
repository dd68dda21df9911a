"""The report as one self-contained HTML page (inline CSS, no scripts, no external assets).

Every value reaches the page through :func:`~._escape.h` or :func:`~._escape.join`, which
escape it unless it is markup built here (:class:`~._escape.Html`): nothing depends on
remembering to escape at each call.
"""

from __future__ import annotations

from typing import Any

from ..analysis import parse_time
from ._common import _headline, _ms, _opt, _quartet, _site_labels
from ._escape import Html, h, join
from .words import diagnosis, duration, plural, when

_CSS = Html("""
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;
padding:0 1rem;color:#1d2733;background:#fff}
h1{font-size:1.5rem;margin-bottom:.25rem}h2{margin-top:2rem;border-bottom:1px solid #dde3ea;
padding-bottom:.25rem}code,pre{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f5f7fa;padding:.6rem .8rem;border-radius:6px;overflow-x:auto;margin:.3rem 0}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #eef1f5;vertical-align:top}th{background:#f5f7fa;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#5b6775}
.cards{display:flex;flex-wrap:wrap;gap:.75rem;margin:1rem 0}.card{border:1px solid #dde3ea;
border-radius:8px;padding:.6rem .9rem;min-width:8rem}.card b{display:block;font-size:1.4rem}
.confirmed{color:#b42318}.suspected{color:#b54708}.unknown{color:#475467}
.bar{background:#e4e9f0;border-radius:3px;height:.6rem;width:8rem;display:inline-block}
.bar i{display:block;height:100%;background:#2e6fd8;border-radius:3px}details{margin:.2rem 0}
.warn{background:#fff4e5;border:1px solid #f5c07a;border-radius:6px;padding:.5rem .8rem}
""")


def _table(head: list[str], rows: list[list[Any]], numeric: set[int]) -> Html:
    """A table; each cell is escaped unless it is :class:`Html`."""

    def cell(tag: str, i: int, value: Any) -> Html:
        return h(f'<{tag} class="n">{{}}</{tag}>' if i in numeric else f"<{tag}>{{}}</{tag}>",
                 value)  # fmt: skip

    th = join(cell("th", i, v) for i, v in enumerate(head))
    body = join(h("<tr>{}</tr>", join(cell("td", i, c) for i, c in enumerate(row))) for row in rows)
    return h("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", th, body)


def _utilization_svg(series: dict[str, Any], timeouts: list[dict[str, Any]]) -> Html:
    """An inline SVG chart of one pool: in use (blue), waiting (orange), capacity (dashed)
    and timeouts (red ticks)."""
    width, height, pad = 1000, 160, 34
    offsets = series["at_offsets_s"] or [0.0]
    span = max(offsets[-1] + series["interval_s"], 1e-9)
    top = max([*series["in_use"], *(a + b for a, b in zip(series["in_use"], series["waiters"],
              strict=True)), series["capacity"] or 0, 1])  # fmt: skip

    def x(offset: float) -> str:
        return f"{pad + (width - 2 * pad) * offset / span:.1f}"

    def y(value: float) -> str:
        return f"{height - pad + (2 * pad - height) * value / top:.1f}"

    def line(values: list[int], color: str) -> Html:
        points = []
        for offset, value in zip(offsets, values, strict=True):
            points.append(f"{x(offset)},{y(value)}")
            points.append(f"{x(offset + series['interval_s'])},{y(value)}")
        return h('<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>',
                 color, " ".join(points))  # fmt: skip

    stacked = [a + b for a, b in zip(series["in_use"], series["waiters"], strict=True)]
    parts = [
        h('<svg viewBox="0 0 {} {}" width="100%" '
          'role="img" aria-label="connections in use over time, pool {}">',
          width, height, series["pool"]),
        h('<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#98a2b3"/>',
          pad, height - pad, width - pad, height - pad),
    ]  # fmt: skip
    if series["capacity"]:
        cy = height - pad + (2 * pad - height) * series["capacity"] / top
        parts.append(
            h(
                '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#b42318" stroke-dasharray="6 4"/>',
                pad,
                f"{cy:.1f}",
                width - pad,
                f"{cy:.1f}",
            )
        )
        parts.append(
            h(
                '<text x="{}" y="{}" text-anchor="end" '
                'font-size="11" fill="#b42318">capacity {}</text>',
                width - pad,
                f"{cy - 4:.1f}",
                series["capacity"],
            )
        )
    parts += [line(stacked, "#e07b00"), line(series["in_use"], "#2e6fd8")]
    start = series["start_at"]
    start_unix = parse_time(start) if start else 0.0
    for t in timeouts:
        if t["pool"] != series["pool"] or not t["at"]:
            continue
        tx = x(parse_time(t["at"]) - start_unix)
        parts.append(
            h(
                '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#d92d20" stroke-width="1"/>',
                tx,
                pad / 2,
                tx,
                height - pad,
            )
        )
    parts.append(
        h(
            '<text x="{}" y="{}" font-size="11" fill="#5b6775">{}</text>',
            pad,
            height - 8,
            when(start),
        )
    )
    parts.append(
        h(
            '<text x="{}" y="{}" font-size="11" fill="#5b6775" text-anchor="end">+{}</text>',
            width - pad,
            height - 8,
            duration(span),
        )
    )
    parts.append(h('<text x="{}" y="14" font-size="12" fill="#1d2733">'
                   "{}: in use (blue), in use + waiting (orange), timeouts (red)</text>",
                   pad, series["pool"]))  # fmt: skip
    parts.append(Html("</svg>"))
    return join(parts)


def _stack(stack: list[str]) -> Html:
    return h("<pre>{}</pre>", "\n".join(stack))


def _why(d: dict[str, Any] | None) -> Html:
    """A hold's diagnosis as one line, or nothing."""
    return h('<div class="why">why: {}</div>', diagnosis(d)) if d else Html("")


def _leaks(leaks: list[dict[str, Any]]) -> Html:
    rows = [
        [
            h("<code>{}</code>", leak["class"]),
            h('<span class="{}">{}</span>', leak["certainty"], leak["certainty"]),
            leak["count"],
            duration(leak["max_held_s"]),
            leak["pool"],
            h(
                '<details><summary><code>{}</code> <span class="muted">threads {}</span>'
                "</summary>{}{}</details>",
                leak["site"],
                ", ".join(leak["threads"]),
                _why(leak.get("diagnosis")),
                _stack(leak["stack"]),
            ),
        ]  # fmt: skip
        for leak in leaks
    ]
    return _table(["class", "certainty", "count", "max held", "pool", "site and stack"], rows,
                  {2, 3})  # fmt: skip


def _timeouts(timeouts: list[dict[str, Any]]) -> Html:
    rows = []
    for t in timeouts:
        holders = join(
            h('<li>{} <code>{}</code> <span class="muted">thread {}</span>{}</li>',
              duration(hd["held_s"]), hd["site"], hd["thread"], _why(hd.get("diagnosis")))
            for hd in t["holders"]
        )  # fmt: skip
        rows.append(
            [
                when(t["at"]),
                t["pool"],
                h(
                    '<code>{}</code><br><span class="muted">thread {}</span>',
                    t["site"],
                    t["thread"],
                ),
                duration(t["waited_s"]),
                h("<ul>{}</ul>", holders) if holders else Html('<span class="muted">none</span>'),
            ]  # fmt: skip
        )
    return _table(["at (UTC)", "pool", "caller", "waited", "held by"], rows, {3})


def _pools(pools: list[dict[str, Any]]) -> Html:
    rows = [
        [
            h("<b>{}</b><br><span class='muted'>{}</span>", p["name"], p["url"]),
            p["pool_class"],
            _opt(p["pool_size"]),
            _opt(p["max_overflow"]),
            p["peak_in_use"],
            p["checkouts"],
            p["timeouts"],
            _quartet(p["wait_ms"]),
            _quartet(p["hold_ms"]),
        ]
        for p in pools
    ]
    head = ["pool", "class", "size", "overflow", "peak", "checkouts", "timeouts",
            "wait p50/p95/p99/max", "hold p50/p95/p99/max"]  # fmt: skip
    return _table(head, rows, {2, 3, 4, 5, 6})


def _sites(sites: list[dict[str, Any]]) -> Html:
    rows = []
    for site, label in zip(sites, _site_labels(sites), strict=True):
        share = f"{site['pool_time_share'] * 100:.1f}"
        rows.append(
            [
                h('<span class="bar"><i style="width:{}%"></i></span> {}%', share, share),
                site["checkouts"],
                duration(site["total_hold_s"]),
                _ms(site["hold_ms"]["p95"]),
                _ms(site["hold_ms"]["max"]),
                site["pool"],
                h(
                    "<details><summary><code>{}</code></summary>{}</details>",
                    label,
                    _stack(site["stack"]),
                ),
            ]  # fmt: skip
        )
    head = ["share of pool time", "checkouts", "held total", "p95 hold", "max hold", "pool",
            "site"]  # fmt: skip
    return _table(head, rows, {1, 2, 3, 4})


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, no scripts, no external
    assets) to attach to an incident ticket."""
    s = report["summary"]
    parts: list[Html] = [
        Html("<!DOCTYPE html>"),
        Html('<html lang="en"><head><meta charset="utf-8">'),
        Html('<meta name="viewport" content="width=device-width, initial-scale=1">'),
        h("<title>poolscope report: {}</title>", report["store"]),
        h("<style>{}</style></head><body>", _CSS),
        Html("<h1>poolscope report</h1>"),
        h('<p class="muted"><code>{}</code> · generated {} by poolscope {}</p>',
          report["store"], when(report["generated_at"]), report["poolscope"]),
        h("<p>{}</p>", join(_headline(report)[:1], "<br>")),
        Html('<div class="cards">'),
    ]  # fmt: skip
    cards = [
        ("confirmed leaks", s["confirmed_leaks"], "confirmed"),
        ("suspected leaks", s["suspected_leaks"], "suspected"),
        ("unknown (crash)", s["unknown_leaks"], "unknown"),
        ("timeouts", s["timeouts"], ""),
        ("p95 wait", duration(s["wait_p95_s"]), ""),
        ("peak in use", f"{s['peak_in_use']}" + (f" / {s['capacity']}" if s["capacity"] else ""),
         ""),
    ]  # fmt: skip
    parts += [h('<div class="card"><b class="{}">{}</b>{}</div>', cls, value, label)
              for label, value, cls in cards]  # fmt: skip
    parts.append(Html("</div>"))
    if s["dropped"]:
        parts.append(h('<p class="warn">The recorder dropped {} records; counts may be low.</p>',
                       s["dropped"]))  # fmt: skip
    if s.get("ignored_events"):
        parts.append(h('<p class="warn">{} left out: a time out of range or not a number where '
                       "one belongs (a damaged or edited store).</p>",
                       plural(s["ignored_events"], "event")))  # fmt: skip

    charts = [_utilization_svg(series, report["timeouts"]) for series in
              report.get("utilization", [])]  # fmt: skip
    if charts:
        parts.append(Html("<h2>Connections in use</h2>"))
        parts += charts

    parts.append(Html("<h2>Leaks</h2>"))
    parts.append(_leaks(report["leaks"]) if report["leaks"] else Html("<p>None found.</p>"))
    parts.append(Html("<h2>Timeouts</h2>"))
    parts.append(_timeouts(report["timeouts"]) if report["timeouts"] else Html("<p>None.</p>"))
    parts.append(Html("<h2>Pools</h2>"))
    parts.append(_pools(report["pools"]) if report["pools"] else Html("<p>None recorded.</p>"))
    parts.append(Html("<h2>Sites</h2>"))
    parts.append(_sites(report["sites"]) if report["sites"] else Html("<p>None.</p>"))

    parts.append(Html("<h2>Sizing</h2>"))
    advice = [p["sizing"]["advice"] for p in report["pools"] if p.get("sizing")]
    parts += [h("<p>{}</p>", a) for a in advice] or [Html("<p>No pool activity to size.</p>")]
    parts.append(Html("</body></html>"))
    return "\n".join(parts) + "\n"
