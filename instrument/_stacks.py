"""Cheap stack capture on the hot path, and resolution to text once per distinct stack."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import sys
import sysconfig
from collections import deque
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

from . import _native
from ._store import valid_text

MAX_FRAMES = 48
"""Frames kept per stack, counted from the innermost; deeper callers are cut."""

MAX_STACKS = 100_000
"""Distinct stacks kept per process; past it, new stacks share one placeholder."""

_OVERFLOW_KEY = ("too-many-stacks",)

Frame = tuple[CodeType, int]
"""A captured frame: its code object and the byte offset of the instruction running."""


class ResolvedStack:
    """A stack turned into text: its application site, its frames and a fingerprint."""

    __slots__ = ("fingerprint", "frames", "site")

    def __init__(self, site: str, frames: list[str], fingerprint: str) -> None:
        self.site = site
        self.frames = frames
        self.fingerprint = fingerprint


class StackTable:
    """Interns captured stacks to small integer ids.

    ``capture()`` runs in the application's thread: it walks frames, keys them by
    code identity and instruction offset, and looks the key up in a dict. Only a
    stack seen for the first time costs more: its code objects are kept (so their
    ids stay unique) and queued for the writer, which resolves them to text.

    ``capture_async()`` also walks the parent greenlet's frames: async SQLAlchemy
    runs sync code inside a greenlet, and the caller's coroutine frames live in
    the parent.
    """

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self._next_id = itertools.count(1)
        self.frames: dict[int, list[Frame]] = {}
        self.pending: deque[int] = deque()
        self._resolved: dict[int, ResolvedStack] = {}

    def capture(self) -> int:
        """Return the id of the calling thread's current stack (hot path).

        The listeners inline this (``stack_key`` then ``ids.get``) to save a call.
        """
        key = stack_key(1, MAX_FRAMES)
        sid = self.ids.get(key)
        if sid is None:
            sid = self.intern(key, sys._getframe(1))
        return sid

    def capture_async(self) -> int:
        """Like :meth:`capture`, continuing into the parent greenlet (hot path)."""
        frame, parent = sys._getframe(1), _parent_greenlet_frame()
        key = tuple(x for f in _walk(frame, parent) for x in (id(f.f_code), f.f_lasti))
        sid = self.ids.get(key)
        if sid is None:
            sid = self.intern(key, frame, parent)
        return sid

    def intern(
        self, key: int | tuple[int, ...], frame: FrameType | None, parent: FrameType | None = None
    ) -> int:
        """Give a new id to the stack ``key`` starting at ``frame``; queue it for the writer.

        Past ``MAX_STACKS`` distinct stacks (generated code, say), new ones share one
        "too many stacks" id instead of keeping ever more code objects alive.
        """
        if len(self.frames) >= MAX_STACKS:
            return self._overflow_id()
        frames = [(f.f_code, f.f_lasti) for f in _walk(frame, parent)]
        sid = next(self._next_id)
        self.frames[sid] = frames
        self.ids[key] = sid
        self.pending.append(sid)
        return sid

    def _overflow_id(self) -> int:
        sid = self.ids.get(_OVERFLOW_KEY)
        if sid is None:
            sid = self.ids[_OVERFLOW_KEY] = next(self._next_id)
            self._resolved[sid] = ResolvedStack(
                f"<more than {MAX_STACKS:,} distinct stacks>", [], "too-many-stacks"
            )
            self.pending.append(sid)
        return sid

    def pend_all(self) -> None:
        """Queue every stack known to be written again: the store that had their rows is
        not this writer's any more (a forked child, a store deleted or replaced)."""
        self.pending = deque(sorted(set(self.frames) | set(self._resolved)))

    def resolve(self, sid: int) -> ResolvedStack:
        """Return the text form of stack ``sid``; computed once, then cached."""
        resolved = self._resolved.get(sid)
        if resolved is None:
            resolved = self._resolved[sid] = resolve_frames(self.frames.get(sid, []))
        return resolved


def _walk(frame: FrameType | None, parent: FrameType | None = None) -> Iterator[FrameType]:
    """Yield up to ``MAX_FRAMES`` frames from ``frame`` outwards, then from ``parent``
    (a parent greenlet's frame) when the first chain ends."""
    n = 0
    for f in (frame, parent):
        while f is not None and n < MAX_FRAMES:
            yield f
            f = f.f_back
            n += 1


def _py_stack_key(skip: int, max_frames: int) -> int:
    """Pure-Python ``stack_key``: a hash of ``(id(code), lasti)`` per frame, innermost
    first, starting ``skip`` frames above the caller."""
    f: FrameType | None = sys._getframe(skip + 1)
    key: list[int] = []
    append = key.append
    n = 0
    while f is not None and n < max_frames:
        append(id(f.f_code))
        append(f.f_lasti)
        f = f.f_back
        n += 1
    return hash(tuple(key))


_speedups = _native.load("_speedups")
HotPath: Any = _speedups.HotPath if _speedups is not None else None
TimedGet: Any = _speedups.TimedGet if _speedups is not None else None
# Without the helper (not built, or off: see _native): same behaviour, a few µs slower.
stack_key = _speedups.stack_key if _speedups is not None else _py_stack_key


def _parent_greenlet_frame() -> FrameType | None:
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return None
    parent = greenlet.getcurrent().parent
    return parent.gr_frame if parent is not None else None


# ---- resolution (writer thread, or on demand) -------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

_DEMO_DIR = os.path.join(_PACKAGE_DIR, "sample_app") + os.sep
"""The demo's shop once installed (``instrument.sample_app``): application code, not poolscope."""


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("stdlib"), paths.get("platstdlib")}
    return tuple(os.path.abspath(d) + os.sep for d in dirs if d)


_STDLIB_DIRS = _stdlib_dirs()


def _sqlalchemy_dir() -> str | None:
    try:
        import sqlalchemy
    except ImportError:  # pragma: no cover - poolscope needs SQLAlchemy anyway
        return None
    return os.path.dirname(os.path.abspath(sqlalchemy.__file__)) + os.sep


_SQLALCHEMY_DIR = _sqlalchemy_dir()


def is_application_file(filename: str) -> bool:
    """Tell whether a frame in ``filename`` counts as application code for the site.

    Not application code: SQLAlchemy, poolscope itself (but for the demo's shop installed
    inside it), the standard library and generated code (``<string>``, ``<frozen ...>``).
    Third-party packages count: the site is where *some* code outside the pool machinery
    asked for a connection.
    """
    if not filename or filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR) and not path.startswith(_DEMO_DIR):
        return False
    if _SQLALCHEMY_DIR and path.startswith(_SQLALCHEMY_DIR):
        return False
    if "site-packages" in path or "dist-packages" in path:
        return True
    return not path.startswith(_STDLIB_DIRS)


def display_path(filename: str) -> str:
    """Write ``filename`` the way a user recognises it, the same in every process.

    A module inside a package is written from its top-level package
    (``sample_app/bugs.py``), wherever the package lives and whatever the working
    directory. Any other file is written relative to the working directory when
    under it, else relative to the ``sys.path`` entry holding it, else in full.
    """
    if filename.startswith("<"):
        return filename
    return _display_path(filename, os.getcwd())


@functools.lru_cache(maxsize=4096)
def _display_path(filename: str, cwd: str) -> str:
    path = os.path.abspath(os.path.join(cwd, filename))
    top = None
    directory = os.path.dirname(path)
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        top = directory
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    if top is not None:
        return os.path.relpath(path, os.path.dirname(top))
    cwd = cwd.rstrip(os.sep) + os.sep
    if path.startswith(cwd):
        return path[len(cwd) :]
    best = ""
    for entry in sys.path:
        entry = os.path.abspath(entry or ".") + os.sep
        if path.startswith(entry) and len(entry) > len(best):
            best = entry
    return path[len(best) :] if best else path


def line_of(code: CodeType, offset: int) -> int:
    """Return the source line of the instruction at byte ``offset`` in ``code``."""
    line = code.co_firstlineno
    for start, end, lineno in code.co_lines():
        if start <= offset < end:
            return lineno if lineno is not None else line
        if lineno is not None:
            line = lineno
    return line


def format_frame(code: CodeType, offset: int) -> str:
    """Write one frame as ``path.py:42 in function``, as valid UTF-8 text (a path's
    undecodable byte as ``\\xff``: see :func:`~instrument._store.valid_text`)."""
    return valid_text(f"{display_path(code.co_filename)}:{line_of(code, offset)} in {code.co_name}")


def resolve_frames(frames: list[Frame]) -> ResolvedStack:
    """Turn captured frames (innermost first) into a :class:`ResolvedStack`.

    The frames kept start at the site (the innermost application frame); the
    SQLAlchemy and poolscope frames above it are dropped. A stack with no
    application frame keeps its innermost non-poolscope frame as site.
    """
    start = None
    for i, (code, _) in enumerate(frames):
        if is_application_file(code.co_filename):
            start = i
            break
    if start is None:
        start = next(
            (
                i
                for i, (code, _) in enumerate(frames)
                if not os.path.abspath(code.co_filename).startswith(_PACKAGE_DIR)
            ),
            0,
        )
    text = [format_frame(code, offset) for code, offset in frames[start:]]
    site = text[0] if text else "<unknown>"
    fingerprint = hashlib.sha1("\n".join(text).encode()).hexdigest()[:16]
    return ResolvedStack(site, text, fingerprint)
