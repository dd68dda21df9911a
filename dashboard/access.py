"""Who may see what: which stores the dashboard opens, and under which Host it answers.

Anyone who can reach the page can type a path in the sidebar. By default the dashboard
opens only the store it was started on and the other files of that store's directory;
``--allow-any-store`` (``poolscope dashboard --allow-any-store``, or after ``--`` on the
``streamlit run`` command line) or ``$POOLSCOPE_ALLOW_ANY_STORE=1`` lifts that. A refused
path gets one message whether or not a file is there, so the picker tells nothing about
the rest of the disk. A PostgreSQL store (a URL) opens only where it is the store the
dashboard was started on, or with ``--allow-any-store``; a URL of another database is
refused.

A page on another site can make a browser send requests to 127.0.0.1 under its own name
(DNS rebinding): the ``Host`` header then carries that name. The dashboard shows nothing
unless ``Host`` names the address it is bound to, ``localhost``, ``127.0.0.1`` or ``::1``
on its port (any IP address when bound to every interface: an address cannot be
rebound), or a name listed in ``$POOLSCOPE_ALLOWED_HOSTS`` (comma-separated, any port:
for a reverse proxy). A request without ``Host`` comes from no browser and is answered.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from instrument._store import PostgresStore, parse_store
from instrument.exceptions import StoreError

from . import data

ALLOW_ANY_STORE_ENV = "POOLSCOPE_ALLOW_ANY_STORE"
"""Set to ``1`` to let the sidebar open a store in any directory."""

ALLOWED_HOSTS_ENV = "POOLSCOPE_ALLOWED_HOSTS"
"""Comma-separated host names the dashboard also answers under (on any port)."""

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_EVERY_INTERFACE = frozenset({"", "0.0.0.0", "::"})
_TRUE = frozenset({"1", "true", "yes", "on"})


class StoreRefusedError(StoreError):
    """A store outside the directory the dashboard was started on."""


@dataclass(frozen=True)
class StorePolicy:
    """Which stores the sidebar may open."""

    started: str
    """The store the dashboard was started on."""
    allow_any: bool
    """Whether any readable store may be opened."""

    @property
    def directory(self) -> str:
        """The directory whose stores may be opened."""
        return os.path.dirname(os.path.abspath(self.started))

    def check(self, path: str) -> None:
        """Refuse ``path`` unless this policy lets the sidebar open it.

        The answer for a path outside the directory does not depend on what is on disk.

        :raises StoreRefusedError: the path is outside the allowed directory, or a URL of
            another store than the started one (or of another database than PostgreSQL).
        """
        try:
            target = parse_store(path)
        except ValueError as exc:
            raise StoreRefusedError(str(exc)) from None
        if self.allow_any:
            return
        try:
            started = parse_store(self.started)
        except ValueError:
            started = None
        if isinstance(target, PostgresStore) or not isinstance(started, os.PathLike):
            if (
                isinstance(target, PostgresStore)
                and isinstance(started, PostgresStore)
                and (target.conninfo, target.schema) == (started.conninfo, started.schema)
            ):
                return
            raise StoreRefusedError(
                "this dashboard opens only the store it was started on; to open other "
                f"stores, start it with --allow-any-store (or ${ALLOW_ANY_STORE_ENV}=1)"
            )
        allowed = {os.path.normpath(self.directory), os.path.realpath(self.directory)}
        # Decide on the path as written first, touching nothing outside the directory;
        # then make sure a symbolic link inside it does not lead out.
        written = os.path.normpath(os.path.abspath(path))
        if os.path.dirname(written) in allowed:
            try:
                real = os.path.realpath(written)
            except (OSError, ValueError):  # a NUL in the path, say: no store either
                real = ""
            if os.path.dirname(real) in allowed or real == os.path.realpath(self.started):
                return
        raise StoreRefusedError(
            f"this dashboard opens only the stores in {self.directory}, the directory of "
            f"the store it was started on; to open stores elsewhere, start it with "
            f"--allow-any-store (or ${ALLOW_ANY_STORE_ENV}=1)"
        )


def store_policy(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> StorePolicy:
    """Read the policy from the script's arguments and the environment.

    :param argv: the script's arguments (after ``--``). May be ``None`` for none.
    :param environ: the environment. May be ``None`` for ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--allow-any-store", action="store_true")
    known, _ = parser.parse_known_args(list(argv or []))
    allow_any = known.allow_any_store or (
        environ.get(ALLOW_ANY_STORE_ENV, "").strip().lower() in _TRUE
    )
    return StorePolicy(started=data.resolve_store(argv, dict(environ)), allow_any=allow_any)


def host_allowed(
    host: str | None, address: str | None, port: int, also: Iterable[str] = ()
) -> bool:
    """Whether a request whose ``Host`` header is ``host`` may see the dashboard.

    :param host: the ``Host`` header. May be ``None`` when the request had none.
    :param address: the address the server is bound to. May be ``None`` for every
        interface.
    :param port: the port the server is bound to.
    :param also: more host names to answer under, on any port.
    """
    if host is None:
        return True
    try:
        parts = urlsplit(f"//{host.strip()}")
        name, given_port = parts.hostname, parts.port
    except ValueError:
        return False
    if not name or parts.username is not None or parts.path or parts.query:
        return False
    name = name.rstrip(".")
    if name in {h.strip().lower().rstrip(".") for h in also if h.strip()}:
        return True
    if (80 if given_port is None else given_port) != port:
        return False
    bound = (address or "").strip().lower().strip("[]")
    if name in _LOCAL_HOSTS or name == bound:
        return True
    if bound in _EVERY_INTERFACE:
        return _is_ip_address(name) or name == socket.gethostname().lower()
    return False


def allowed_hosts_from(environ: Mapping[str, str] | None = None) -> list[str]:
    """The extra host names of ``$POOLSCOPE_ALLOWED_HOSTS``."""
    environ = os.environ if environ is None else environ
    return [h for h in environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
