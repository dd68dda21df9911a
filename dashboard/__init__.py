"""The poolscope dashboard: ``streamlit run dashboard/app.py [-- --store PATH]``.

``app.py`` is the router, pages live in ``app_pages/``, cached loaders over
:mod:`instrument.analysis` in ``data.py``, pure figure builders in ``charts.py``.
Installed, this folder is the package ``instrument.dashboard`` (``pyproject.toml`` maps
it); its modules import each other by that name, in a clone as in a wheel.
"""

from pathlib import Path

APP = Path(__file__).resolve().with_name("app.py")
"""The Streamlit script, wherever the package lives: what ``poolscope dashboard`` runs."""
