"""The post-mortem report: one store read into text, markdown, JSON or a self-contained HTML page.

Every format is rendered from the same JSON report that
:func:`instrument.analysis.build_report` builds (schema ``poolscope.report/1``), so they
never disagree::

    from instrument.report import make_report
    text, report = make_report("poolscope.db", fmt="text")
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from typing import Any

import pandas as pd

from . import analysis
from ._store import read_error, resolve_store_path
from .render.html import render_html
from .render.markdown import render_markdown
from .render.text import render_text
from .render.words import duration

__all__ = [
    "FORMATS",
    "duration",
    "make_report",
    "render",
    "render_html",
    "render_json",
    "render_markdown",
    "render_text",
]

FORMATS = ("text", "markdown", "json", "html")
"""The formats :func:`render` writes."""


def make_report(
    store: str | os.PathLike[str] | None,
    filters: analysis.Filters | None = None,
    fmt: str = "text",
) -> tuple[str, dict[str, Any]]:
    """Open ``store``, build its report and render it; return ``(rendered text, report)``.

    :param store: the store path. May be ``None`` for ``$POOLSCOPE_STORE``, else
        ``./poolscope.db``.
    :param filters: what part of the store to report. May be ``None`` for everything.
    :param fmt: one of :data:`FORMATS`.
    :raises StoreError: the store cannot be read (missing, not SQLite, foreign, newer, damaged).
    :raises ValueError: ``fmt`` is unknown, or ``filters`` names a pool the store lacks.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    filters = filters or analysis.Filters()
    conn = analysis.open_store(store)
    try:
        if filters.pools is not None:
            known = set(analysis.pools(conn)["name"])  # as reported: orders, orders#2, ...
            unknown = [name for name in filters.pools if name not in known]
            if unknown:
                choices = ", ".join(sorted(known)) or "none recorded"
                raise ValueError(f"no pool named {unknown[0]!r} in the store (pools: {choices})")
        report = analysis.build_report(conn, filters, with_utilization=fmt == "html")
        report["store"] = str(resolve_store_path(store))  # as the user named it
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as exc:
        raise read_error(resolve_store_path(store), exc) from None
    finally:
        conn.close()
    return render(report, fmt), report


def render(report: dict[str, Any], fmt: str = "text") -> str:
    """Render a report dict (from :func:`instrument.analysis.build_report`) as ``fmt``."""
    renderers: dict[str, Callable[[dict[str, Any]], str]] = {
        "text": render_text,
        "markdown": render_markdown,
        "json": render_json,
        "html": render_html,
    }
    try:
        return renderers[fmt](report)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def render_json(report: dict[str, Any]) -> str:
    """The report as indented JSON (schema ``poolscope.report/1``), ending with a newline."""
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"
