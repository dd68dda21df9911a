"""A listener's own failure: counted, the first one logged, never raised into the application.

Shared by the recorder's listeners and the pytest plugin's; it imports nothing else of
poolscope, so the plugin can use it without loading the recorder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("poolscope")

failures: list[str] = []
"""Names of the listeners that failed in this process, one entry per failure."""


def listener_failed(name: str) -> None:
    """Count a listener's own failure and log the first one; call it inside ``except``."""
    failures.append(name)
    if len(failures) == 1:
        logger.exception("poolscope listener %s failed; recording continues without it", name)


def guarded(listener: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``listener`` so that its own failure goes to :func:`listener_failed`.

    The recorder's hot listeners catch inline instead, which saves this extra call.
    """

    def guarded_listener(*args: Any) -> None:
        try:
            listener(*args)
        except Exception:
            listener_failed(listener.__name__)

    guarded_listener.__name__ = listener.__name__
    guarded_listener.__doc__ = listener.__doc__
    return guarded_listener
