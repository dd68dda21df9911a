"""Escaping, done once per format and never per call site.

Names, paths and sites come from the application (a thread may name itself anything). The
text and markdown renderers escape every string of the report once, before they lay anything
out (:func:`escaped`); the HTML renderer builds its page with :func:`h`, which escapes every
value it is given unless it is already :class:`Html`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from typing import Any

from .._text import VISIBLE as _VISIBLE
from .._text import visible as visible  # re-exported for the renderers

_MARKDOWN = {
    **{c: v.replace("\\", "\\\\") for c, v in _VISIBLE.items()},
    **{ord(c): "\\" + c for c in "\\`*_[]<>|~#&"},
}
"""Also backslash-escaped in markdown: what starts code, emphasis, links, raw HTML, table
cells, headings and entities."""


def md(text: str) -> str:
    """``text`` as literal markdown: controls visible, markup characters backslash-escaped."""
    return text.translate(_MARKDOWN)


def escaped(value: Any, escape: Callable[[str], str]) -> Any:
    """A copy of the report ``value`` with ``escape`` applied to every string in it."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: escaped(v, escape) for k, v in value.items()}
    if isinstance(value, list):
        return [escaped(v, escape) for v in value]
    return value


class Html(str):
    """Markup that is safe as it is: :func:`h` and :func:`join` leave it alone."""

    __slots__ = ()


def escape_html(value: Any) -> Html:
    """``value`` as HTML text (``None`` as nothing), unless it is :class:`Html` already."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value)))


def h(template: str, *values: Any) -> Html:
    """Fill the ``{}`` slots of ``template`` (markup written in this package, never a value)
    with ``values``, each escaped unless it is :class:`Html`."""
    return Html(template.format(*(escape_html(v) for v in values)))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    """``parts`` one after another, each escaped unless it is :class:`Html`."""
    return Html(sep.join(escape_html(p) for p in parts))
