"""poolscope: who holds your SQLAlchemy pool's connections, for how long, and which never come back.

Attach it to an engine with one line::

    import instrument
    monitor = instrument.attach(engine, store="poolscope.db", leak_after=30.0, name="orders")

then read the store with ``poolscope report`` or ``poolscope dashboard``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._hooks import DEFAULT_LEAK_AFTER_SECONDS, Monitor, OpenCheckout, attach
from .exceptions import (
    ForeignStoreError,
    PoolscopeError,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
)

__all__ = [
    "DEFAULT_LEAK_AFTER_SECONDS",
    "ForeignStoreError",
    "Monitor",
    "OpenCheckout",
    "PoolscopeError",
    "StoreCorruptError",
    "StoreError",
    "StoreNotFoundError",
    "StoreVersionError",
    "__version__",
    "attach",
]
