"""The dashboard in a real headless Chromium: every page finishes running and draws its
charts and metrics, with no exception box. Screenshots land in test-artifacts/browser/."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from instrument import analysis
from instrument.dashboard import data, screenshots

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "test-artifacts" / "browser"

EXPECTED_CHARTS = {
    "overview": 1,
    "utilization": 5,  # a utilization chart and a what-if replay chart per pool; by host
    "waits": 4,
    "sites": 2,
    "leaks": 1,
    "live": 2,
}
"""Charts each page draws on the workload's store (two pools, one timeout, three leak classes)."""


def _require_chromium() -> None:
    """Skip without Chromium or Playwright; under CI (``CI=true``) fail instead."""
    missing = []
    if not os.access(screenshots.CHROMIUM, os.X_OK):
        missing.append(f"Chromium at {screenshots.CHROMIUM}")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI requires it", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store recorded by the real workload of the AppTest suite."""
    _require_chromium()
    from test_dashboard import WORKLOAD, _run_workload

    return _run_workload(tmp_path_factory.mktemp("browser"), WORKLOAD, "work")


@pytest.fixture(scope="module")
def base_url(store: Path) -> Iterator[str]:
    """The dashboard served by ``streamlit run`` on a free port."""
    with screenshots.serve(store) as url:
        yield url


@pytest.fixture(scope="module")
def browser(base_url: str) -> Iterator[object]:
    """A context of headless Chromium driven by Playwright: its tabs share one HTTP cache."""
    with screenshots.chromium() as chromium:
        context = chromium.new_context()
        yield context
        context.close()


def _new_page(browser: object, width: int, height: int) -> object:
    page = browser.new_page()
    page.set_viewport_size({"width": width, "height": height})
    return page


@pytest.mark.parametrize("page", list(screenshots.PAGES))
def test_page_renders_charts_and_metrics(browser, base_url, page):
    """The page finishes running, draws every chart and metric, and shows no exception."""
    (result,) = screenshots.visit(
        browser, base_url, ARTIFACTS, pages={page: screenshots.PAGES[page]}
    )
    assert result.screenshot is not None and result.screenshot.stat().st_size > 0
    assert result.exceptions == []
    assert result.errors == []
    assert result.charts == EXPECTED_CHARTS[page]
    assert result.metrics >= 3


def test_filters_travel_in_the_url(browser, base_url):
    """A shared link with ?pool=billing opens the page for that pool, and keeps the filter."""
    (result,) = screenshots.visit(
        browser, base_url, None, pages={"utilization": "utilization?pool=billing&leak_after=5"}
    )
    assert result.exceptions == [] and result.errors == []
    # billing only: its utilization chart and its what-if chart; the by-host chart
    assert result.charts == 3
    assert "pool=billing" in result.final_url and "leak_after=5" in result.final_url


def test_report_downloads_from_the_leaks_page(browser, base_url):
    """The Leaks page's buttons download the JSON and HTML report, built on click."""
    page = _new_page(browser, 1400, 1000)
    try:
        page.goto(f"{base_url}/leaks", wait_until="domcontentloaded")
        screenshots.wait_until_idle(page)
        texts = {}
        for fmt in ("JSON", "HTML"):
            with page.expect_download(timeout=60_000) as download:
                page.get_by_role("button", name=f"Download {fmt} report").click()
            texts[fmt] = Path(download.value.path()).read_text()
    finally:
        page.close()
    assert json.loads(texts["JSON"])["schema"] == "poolscope.report/1"
    assert "<html" in texts["HTML"].lower() and "in keep_forever" in texts["HTML"]


def test_clicking_a_site_row_shows_that_site(browser, base_url, store):
    """On Call sites, clicking the third row of the table shows that site's details."""
    conn = analysis.open_store(store)
    try:
        sites = analysis.sites(conn).sort_values("total_hold_s", ascending=False)
    finally:
        conn.close()
    page = _new_page(browser, 1400, 1400)
    try:
        page.goto(f"{base_url}/sites", wait_until="domcontentloaded")
        screenshots.wait_until_idle(page)
        assert page.locator("h3").first.inner_text() == sites["site"].iloc[0]
        box = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
        row_px = 35  # the table's header and row height
        page.mouse.click(box["x"] + 15, box["y"] + row_px * 3 + row_px / 2)
        page.wait_for_function(
            "site => document.querySelector('h3')?.innerText === site",
            arg=sites["site"].iloc[2],
            timeout=30_000,
        )
        screenshots.wait_until_idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
    finally:
        page.close()


def test_missing_store_shows_one_error_not_a_traceback(browser, tmp_path):
    """Served on a path with no store, the page shows one error saying what to do."""
    with screenshots.serve(tmp_path / "missing.db") as url:
        page = _new_page(browser, 1400, 800)
        try:
            page.goto(url, wait_until="domcontentloaded")
            screenshots.wait_until_idle(page)
            errors = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
            assert page.locator('[data-testid="stException"]').count() == 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "missing-store.png"))
        finally:
            page.close()
    assert len(errors) == 1
    assert "no store at" in errors[0] and "--store PATH" in errors[0]


def test_live_page_refreshes_until_paused(browser, tmp_path):
    """With a process writing the store, Live refreshes by itself; Pause stops it."""
    from test_dashboard import running_live_app

    with running_live_app(tmp_path) as live_store, screenshots.serve(live_store) as url:
        page = _new_page(browser, 1400, 1000)
        try:
            page.goto(f"{url}/live", wait_until="domcontentloaded")
            screenshots.wait_until_idle(page)
            stamp = page.get_by_text("As of ")
            first = stamp.inner_text()
            page.wait_for_function(
                "old => [...document.querySelectorAll('p')].some("
                "p => p.innerText.startsWith('As of ') && p.innerText !== old)",
                arg=first,
                timeout=30_000,
            )
            assert page.locator('[data-testid="stMetricValue"]').nth(1).inner_text() == "1"
            page.get_by_text("Pause").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('p')].some("
                "p => p.innerText.startsWith('As of ') && p.innerText.endsWith('paused'))",
                timeout=30_000,
            )
            paused = stamp.inner_text()
            page.wait_for_timeout(1_000 * (data.LIVE_REFRESH_S + 2))
            assert stamp.inner_text() == paused
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            page.close()
