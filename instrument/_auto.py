"""Attach every SQLAlchemy engine a process makes, from its creation (``POOLSCOPE_AUTO=1``).

:func:`install` is what ``poolscope run``'s ``sitecustomize`` and the ``poolscope-auto.pth``
file call. It imports nothing but the standard library: a program that never imports
SQLAlchemy gets one entry on ``sys.meta_path``, which answers ``None`` to every import
but ``sqlalchemy``. Once SQLAlchemy is imported, the finder takes itself off and
``Engine.__init__`` is wrapped (on the class, with its exact parameters): each engine is
attached as soon as it is built, before it can hand out a connection.

Why ``Engine.__init__`` and not an event: SQLAlchemy fires no event when an engine or a
pool is made. ``engine_connect`` and a class-level ``checkout`` fire after the checkout
that would reveal a new engine (often the leaking one); ``first_connect`` gives a pool
but not its engine, hence neither the URL the pool is named after nor the first
connect's timings; a ``CreateEnginePlugin`` loads only when the URL names it. Every
engine ``create_engine()`` and ``create_async_engine()`` make goes through
``Engine.__init__`` (engines made by ``execution_options()`` share their parent's
pool and do not). The pool that ``engine.dispose()`` puts in place gets its own monitor
from the recorder. Pools made without an engine are attached at their first
connection, by a class-level ``first_connect`` listener (it fires once per pool).

Nothing is stored on SQLAlchemy's objects: the monitors are the recorder's own.
Failures are logged once on the ``instrument`` logger and never raised.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

AUTO_ENV = "POOLSCOPE_AUTO"
"""``POOLSCOPE_AUTO=1``: attach every engine of every Python process of this environment."""

LEAK_AFTER_ENV = "POOLSCOPE_LEAK_AFTER"
"""Seconds a checkout may be held before it is a suspected leak, for auto-attached pools."""

DIAGNOSE_ENV = "POOLSCOPE_DIAGNOSE"
"""``off``, ``server`` (the default) or ``on``: ``attach(diagnose=False | "server" | True)``
for auto-attached pools."""

METRICS_ENV = "POOLSCOPE_METRICS"
"""Set (and not ``0`` or ``false``): auto-attached pools report OpenTelemetry's pool metrics
to the global ``MeterProvider`` (``attach(meter_provider=True)``)."""

DIAGNOSE_WORDS: dict[str, bool | str] = {
    "off": False, "false": False, "0": False, "no": False,
    "server": "server",
    "on": True, "true": True, "1": True, "yes": True,
}  # fmt: skip
"""What ``$POOLSCOPE_DIAGNOSE`` (and ``poolscope run --diagnose``) may say, and what it means."""

_OFF_WORDS = ("", "0", "false", "no", "off")

_lock = threading.Lock()
_installed = False
_hooked = False
_warned: set[str] = set()


def _lock_afresh_in_child() -> None:
    """In a forked child: a new lock (a fork may copy one held by another thread)."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_lock_afresh_in_child)


def wanted(environ: Any = os.environ) -> bool:
    """Whether ``$POOLSCOPE_AUTO`` asks for auto-attach (set, and not ``0`` or ``false``)."""
    return environ.get(AUTO_ENV, "").strip().lower() not in _OFF_WORDS


def install() -> None:
    """Attach every SQLAlchemy engine this process makes from now on; idempotent, never raises.

    If SQLAlchemy is already imported the hook goes in at once (engines made before
    then are not attached; their pools are, at their first connection); otherwise at
    the end of its import.
    """
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    try:
        if "sqlalchemy.engine.base" in sys.modules:
            _hook_sqlalchemy()
        else:
            sys.meta_path.insert(0, _SQLAlchemyFinder())
        _handle_sigterm_from_the_start()
    except Exception:
        _warn_once("install", "poolscope: could not watch this process's engines")


# ---- SIGTERM ---------------------------------------------------------------------------------


def _handle_sigterm_from_the_start() -> None:
    """Handle a default SIGTERM from the process's start, as the recorder does once it writes.

    A server may save SIGTERM's disposition before the application makes its engines and,
    at shutdown, put it back and raise SIGTERM again (a uvicorn worker does): saved as the
    default, the worker would die of it before its records are written, and be reported
    as crashed. Installed here, the handler is what such a server saves and raises. Only
    from the main thread and only over ``SIG_DFL``; a program's own handler replaces it.
    """
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return
    import signal

    with contextlib.suppress(ValueError, OSError, RuntimeError):
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM under the default disposition: the recorder's handler writes what is queued
    and marks the end ``terminated``; either way the process then dies of the signal,
    exactly as it would have."""
    writer = sys.modules.get("instrument._writer")
    if writer is not None:
        writer.on_sigterm(signum, frame)
        return
    import signal

    with contextlib.suppress(ValueError):
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# ---- waiting for SQLAlchemy ------------------------------------------------------------------


class _SQLAlchemyFinder:
    """A ``sys.meta_path`` finder that hooks SQLAlchemy once its package is imported.

    It finds nothing itself: for ``sqlalchemy`` it asks the finders after it and hands
    back their spec with a loader that runs the hook after the module. The module keeps
    its own loader (``__loader__``, ``__spec__.loader``).
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "sqlalchemy":
            return None
        try:
            finders = [f for f in sys.meta_path if f is not self]
            for finder in finders:
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _HookingLoader(spec.loader, self)
            return spec
        except Exception:
            _warn_once("finder", "poolscope: could not watch SQLAlchemy's import")
            return None


class _HookingLoader:
    """Runs the module's own loader, then :func:`_hook_sqlalchemy`."""

    def __init__(self, loader: Any, finder: _SQLAlchemyFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)  # SQLAlchemy's own errors are the program's
        with contextlib.suppress(ValueError):  # taken off already
            sys.meta_path.remove(self._finder)
        try:
            _hook_sqlalchemy()
        except Exception:
            _warn_once("install", "poolscope: could not watch this process's engines")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


# ---- the hooks -------------------------------------------------------------------------------


def _hook_sqlalchemy() -> None:
    """Wrap ``Engine.__init__`` and listen for the first connection of every pool."""
    global _hooked
    from sqlalchemy import event
    from sqlalchemy.engine.base import Engine
    from sqlalchemy.pool import Pool

    with _lock:
        if _hooked:
            return
        _hooked = True
    Engine.__init__ = same_signature(vars(Engine)["__init__"], _on_engine_created)  # type: ignore[method-assign]
    event.listen(Pool, "first_connect", _on_first_connect)


def _on_engine_created(engine: Any) -> None:
    """After ``Engine.__init__``: attach the engine (its pool has handed out nothing yet)."""
    try:
        from ._hooks import attach

        attach(engine, name=_configured_name(engine), **_settings())
    except Exception:
        _warn_once("attach", "poolscope: could not attach an engine", exc_info=True)


def _on_first_connect(dbapi_connection: Any, record: Any) -> None:
    """``PoolEvents.first_connect`` (class level): attach a pool no monitor records yet.

    Fires once per pool, at its first connection. The pools of engines are attached
    already (``attach()`` then returns their monitor): this catches pools made without
    an engine, and those of engines made before the hook went in.
    """
    try:
        pool = getattr(record, "_ConnectionRecord__pool", None)  # private in 2.0 and 2.1
        if pool is None:
            return
        from ._hooks import attach

        attach(pool, name=getattr(pool, "_orig_logging_name", None), **_settings())
    except Exception:
        _warn_once("attach", "poolscope: could not attach a pool", exc_info=True)


def _configured_name(engine: Any) -> str | None:
    """The pool's name the program chose: ``create_engine(pool_logging_name=...)``, else
    ``logging_name=...``; ``None`` (the URL's database) when it chose none."""
    name = getattr(engine.pool, "_orig_logging_name", None) or getattr(engine, "logging_name", None)
    return name if isinstance(name, str) and name.strip() else None


def _settings() -> dict[str, Any]:
    """``attach()``'s arguments from the environment (``$POOLSCOPE_LEAK_AFTER``,
    ``$POOLSCOPE_DIAGNOSE``, ``$POOLSCOPE_METRICS``); a bad value warns once and is left at
    its default."""
    return {
        "leak_after": _leak_after(),
        "diagnose": _diagnose(),
        "meter_provider": True if _metrics() else None,
    }


def _diagnose() -> bool | str:
    from ._diagnose import DEFAULT_DIAGNOSE

    text = os.environ.get(DIAGNOSE_ENV, "").strip()
    if not text:
        return DEFAULT_DIAGNOSE
    value = DIAGNOSE_WORDS.get(text.lower())
    if value is None:
        _warn_once(
            "diagnose",
            f"poolscope: ${DIAGNOSE_ENV}={text!r} is not off, server or on; "
            f"using {DEFAULT_DIAGNOSE}",
        )
        return DEFAULT_DIAGNOSE
    return value


def _metrics() -> bool:
    """Whether ``$POOLSCOPE_METRICS`` asks for metrics and OpenTelemetry's API is there to
    report them (without it: one warning, and the pools are recorded without metrics)."""
    if os.environ.get(METRICS_ENV, "").strip().lower() in _OFF_WORDS:
        return False
    if not otel_api_installed():
        _warn_once(
            "metrics",
            f"poolscope: ${METRICS_ENV} asks for OpenTelemetry metrics, but OpenTelemetry's "
            "API is not installed (pip install 'poolscope[otel]'); recording without them",
        )
        return False
    return True


def otel_api_installed() -> bool:
    """Whether ``opentelemetry.metrics`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("opentelemetry.metrics") is not None
    except (ImportError, ValueError):
        return False


def _leak_after() -> float:
    from ._hooks import DEFAULT_LEAK_AFTER_SECONDS

    text = os.environ.get(LEAK_AFTER_ENV, "").strip()
    if not text:
        return DEFAULT_LEAK_AFTER_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        _warn_once(
            "leak_after",
            f"poolscope: ${LEAK_AFTER_ENV}={text!r} is not a number of seconds above 0; "
            f"using {DEFAULT_LEAK_AFTER_SECONDS:g}",
        )
        return DEFAULT_LEAK_AFTER_SECONDS
    return value


def _warn_once(key: str, message: str, exc_info: bool = False) -> None:
    if key in _warned:
        return
    _warned.add(key)
    with contextlib.suppress(Exception):  # logging itself broken: stay silent
        import logging

        logging.getLogger("poolscope").warning(message, exc_info=exc_info)


def same_signature(original: Callable[..., Any], after: Callable[[Any], None]) -> Any:
    """A function with the very parameters of ``original`` that calls it, then ``after(self)``.

    ``create_engine()`` reads ``Engine.__init__``'s parameter names from its code object
    to route its keyword arguments, so a ``*args, **kwargs`` wrapper would hide them.
    The wrapper keeps ``__wrapped__``, ``__name__``, ``__doc__`` and the rest of ``original``'s.
    """
    import functools
    import inspect

    parameters: Sequence[inspect.Parameter] = list(inspect.signature(original).parameters.values())
    params, call, defaults = [], [], {}
    star = False
    for p in parameters:
        text = p.name
        if p.default is not p.empty:
            defaults[p.name] = p.default
            text += f"=_defaults[{p.name!r}]"
        if p.kind is p.VAR_POSITIONAL:
            star = True
            params.append(f"*{p.name}")
            call.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            params.append(f"**{p.name}")
            call.append(f"**{p.name}")
        elif p.kind is p.KEYWORD_ONLY:
            if not star:
                star = True
                params.append("*")
            params.append(text)
            call.append(f"{p.name}={p.name}")
        else:
            if p.kind is p.POSITIONAL_ONLY:
                raise TypeError("positional-only parameters are not supported")
            params.append(text)
            call.append(p.name)
    self_name = parameters[0].name
    source = (
        f"def {original.__name__}({', '.join(params)}):\n"
        f"    _original({', '.join(call)})\n"
        f"    _after({self_name})\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, {"_original": original, "_after": after, "_defaults": defaults}, namespace)
    return functools.update_wrapper(namespace[original.__name__], original)
