"""Rendering a report (the dict of :func:`instrument.analysis.build_report`) for people.

- :mod:`.words`: how durations, times and leak classes are written, once, for every format
  and for the dashboard;
- :mod:`.text`, :mod:`.markdown`, :mod:`.html`: one renderer each;
- ``_escape``: escaping, applied once per format (HTML through a builder that escapes every
  value it is given).

:mod:`instrument.report` opens a store and picks the renderer; import from there.
"""
