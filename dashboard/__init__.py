"""The poolscope dashboard: ``streamlit run dashboard/app.py [-- --store PATH]``.

``app.py`` is the router, pages live in ``app_pages/``, cached loaders over
:mod:`instrument.analysis` in ``data.py``, pure figure builders in ``charts.py``.
"""
