"""poolscope: who holds your SQLAlchemy pool's connections, for how long, and which never come back.

Attach it to an engine with one line::

    import instrument
    monitor = instrument.attach(engine, store="poolscope.db", leak_after=30.0, name="orders")

then read the store with ``poolscope report`` or ``poolscope dashboard``.
"""

from __future__ import annotations

import typing as _typing

__version__ = "0.1.0"

from .exceptions import (
    ForeignStoreError,
    PoolscopeError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreUnreachableError,
    StoreVersionError,
)

if _typing.TYPE_CHECKING:
    from ._hooks import DEFAULT_LEAK_AFTER_SECONDS, Monitor, OpenCheckout, attach, monitor_of

# The recorder (and SQLAlchemy with it) is imported on first use, so that merely
# loading poolscope (the pytest plugin's entry point does) costs and changes nothing.
_LAZY = {"DEFAULT_LEAK_AFTER_SECONDS", "Monitor", "OpenCheckout", "attach", "monitor_of"}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        from . import _hooks

        value = getattr(_hooks, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'instrument' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


__all__ = [
    "DEFAULT_LEAK_AFTER_SECONDS",
    "ForeignStoreError",
    "Monitor",
    "OpenCheckout",
    "PoolscopeError",
    "StoreCorruptError",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreUnreachableError",
    "StoreVersionError",
    "__version__",
    "attach",
    "monitor_of",
]
