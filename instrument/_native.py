"""The optional C helpers: imported once, checked against the record contract, or left off.

``_speedups`` (the checkout and checkin listeners' common case) and ``_sqlite_rows`` (the
writer's queue and inserts) do what pure Python does, faster. Each is used only if

- ``POOLSCOPE_NO_CEXT`` is not set (``POOLSCOPE_NO_CEXT=1`` turns both off);
- the interpreter runs with the GIL: they rely on it, and importing them into a
  free-threaded interpreter would turn the GIL back on for the whole application;
- it is built and imports, and its ``layout()`` equals ``_record.LAYOUT`` (a helper built
  against another record contract would write wrong rows);
- for ``_sqlite_rows``: SQLite's functions are found in the sqlite3 module's own library.

Otherwise the pure-Python path runs, and a helper that is built but refused says why
once (a WARNING on logger ``poolscope``). ``POOLSCOPE_REQUIRE_CEXT=1`` makes any of these
an ``ImportError`` instead (CI, and packagers checking their build).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sqlite3
import sys
from typing import Any

from . import _record

logger = logging.getLogger("poolscope")

HELPERS = ("_speedups", "_sqlite_rows")

status: dict[str, str] = {}
"""Each helper asked for so far: ``"loaded"``, or ``"off (why)"``."""

_loaded: dict[str, Any] = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def disabled() -> bool:
    """Whether ``POOLSCOPE_NO_CEXT`` turns the helpers off."""
    return _flag("POOLSCOPE_NO_CEXT")


def required() -> bool:
    """Whether ``POOLSCOPE_REQUIRE_CEXT`` makes a missing helper an error."""
    return _flag("POOLSCOPE_REQUIRE_CEXT") and not disabled()


def gil_disabled() -> bool:
    """Whether this is a free-threaded interpreter running without the GIL."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


def load(name: str) -> Any:
    """The helper ``instrument.<name>``, checked; ``None`` where it is off (see above)."""
    if name in status:
        return _loaded.get(name)
    module, why, warn = _try(name)
    if module is not None:
        _loaded[name] = module
        status[name] = "loaded"
        return module
    status[name] = f"off ({why})"
    if required():
        raise ImportError(f"poolscope's C helper {name} is required but off: {why}")
    if warn:
        logger.warning(
            "poolscope's C helper %s is off (%s); the pure-Python path is used.", name, why
        )
    return None


def _try(name: str) -> tuple[Any, str, bool]:
    """(module, "", False), or (None, why it is off, whether to warn)."""
    if disabled():
        return None, "POOLSCOPE_NO_CEXT is set", False
    if gil_disabled():
        return None, "the interpreter runs without the GIL, which the helpers need", False
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ImportError as exc:
        return None, f"not built ({exc})", False
    try:
        layout = module.layout()
    except Exception as exc:  # an older build without layout(), or a broken one
        return None, f"built without the record contract ({exc!r})", True
    if layout != _record.LAYOUT:
        return None, f"built for another record layout ({layout!r})", True
    if name == "_sqlite_rows" and not _find_sqlite(module):
        return None, "SQLite's functions were not found in the sqlite3 module's library", True
    return module, "", False


def _find_sqlite(module: Any) -> bool:
    try:
        import _sqlite3
    except ImportError:
        return False
    major, minor, patch = sqlite3.sqlite_version_info
    try:
        return bool(module.load(_sqlite3.__file__, major * 1_000_000 + minor * 1000 + patch))
    except (AttributeError, TypeError):  # a built-in module has no file to look in
        return False


def describe() -> str:
    """One line per helper: loaded, or why not (``poolscope --version``)."""
    for name in HELPERS:
        with contextlib.suppress(ImportError):  # REQUIRE_CEXT: the status says why
            load(name)
    return "\n".join(f"{name}: {status[name]}" for name in HELPERS)
