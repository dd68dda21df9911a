"""A small shop with deliberate pool bugs: poolscope's first user, its demo and its e2e test.

Run it with ``python -m sample_app --help``. It uses only poolscope's public API
(``instrument.attach``); :mod:`sample_app.bugs` holds the five bugs it should find.
"""

from __future__ import annotations

from .app import Options, run

__all__ = ["Options", "run"]
