"""The real clocks, bound when poolscope is imported.

An application's tests often fake the time: ``mock.patch("time.time")`` replaces the
``time`` module's attribute, and freezegun also replaces every module attribute that
is the real ``time.time`` (or ``perf_counter``, ``monotonic``). Recording must not
follow them: timestamps, waits and hold times come from the clocks below, kept in a
private container that neither reaches, so a checkout stamped while a test freezes
the time is still stamped now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


class Clocks(NamedTuple):
    """The real clock functions, bound once."""

    wall: Callable[[], float]
    """Unix time (``time.time``): event timestamps, heartbeats, the watchdog."""
    perf: Callable[[], float]
    """A monotonic high-resolution clock (``time.perf_counter``): waits and connect times."""


REAL = Clocks(wall=time.time, perf=time.perf_counter)
"""The clocks as they were when poolscope was imported (a tuple: patchers that scan
modules for the real functions replace module attributes, not a tuple's items)."""
