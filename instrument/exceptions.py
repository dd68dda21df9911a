"""Errors poolscope raises to its callers.

Hierarchy::

    PoolscopeError
    └── StoreError                 the store file cannot be used
        ├── StoreNotFoundError     no file at that path
        ├── StoreCorruptError      not a SQLite file, or a damaged one
        ├── ForeignStoreError      a SQLite file of another application (or empty)
        ├── StoreLockedError       another process holds the store locked
        ├── StoreUnreachableError  a PostgreSQL store's server cannot be reached
        └── StoreVersionError      written by a newer poolscope

Recording never raises: the listeners and the writer log and count their own
failures instead. These errors come only from reading a store.
"""

from __future__ import annotations

__all__ = [
    "ForeignStoreError",
    "PoolscopeError",
    "StoreCorruptError",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreUnreachableError",
    "StoreVersionError",
]


class PoolscopeError(Exception):
    """Base class of every error poolscope raises."""


class StoreError(PoolscopeError):
    """The store file cannot be read as a poolscope store."""


class StoreNotFoundError(StoreError):
    """No store file exists at the given path."""


class StoreCorruptError(StoreError):
    """The file is not a SQLite database, or it is damaged."""


class ForeignStoreError(StoreError):
    """The file is a SQLite database, but not one poolscope wrote."""


class StoreLockedError(StoreError):
    """Another process holds the store locked (an exclusive lock): try again later."""


class StoreUnreachableError(StoreError):
    """A PostgreSQL store's server cannot be reached, or refuses the connection.

    .. versionadded:: 0.2
    """


class StoreVersionError(StoreError):
    """The store was written by a newer poolscope with a newer schema."""
