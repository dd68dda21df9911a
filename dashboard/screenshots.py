"""Serve the dashboard on a free local port and visit every page in headless Chromium.

Used by the browser test and to make the README's screenshots::

    python -m dashboard.screenshots STORE OUT_DIR [--chromium PATH]
    python -m dashboard.screenshots --sample-app docs/screenshots

Needs the ``playwright`` package and a Chromium binary (``/usr/bin/chromium`` by default).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"

CHROMIUM = os.environ.get("POOLSCOPE_CHROMIUM", "/usr/bin/chromium")
"""The Chromium binary Playwright drives; override with ``$POOLSCOPE_CHROMIUM``."""

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PAGES = {
    "overview": "",
    "utilization": "utilization",
    "waits": "waits",
    "sites": "sites",
    "leaks": "leaks",
    "live": "live",
}
"""Each page's name and its URL path (the Overview is the default page at ``/``)."""


@dataclass
class PageResult:
    """What one page showed once it had finished running."""

    name: str
    url: str
    charts: int
    metrics: int
    exceptions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    final_url: str = ""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(store: str | os.PathLike[str], port: int | None = None, timeout_s: float = 60.0):
    """Run ``streamlit run dashboard/app.py -- --store STORE`` headless on 127.0.0.1.

    Yields the base URL once the server answers its health check; stops the server after.
    """
    port = port or free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--", "--store", str(store),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield _wait_for_health(proc, log, f"http://127.0.0.1:{port}", timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_health(proc: subprocess.Popen, log: IO[bytes], url: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"streamlit exited early:\n{log.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not answer on {url} within {timeout_s:g} s")
        time.sleep(0.2)


@contextmanager
def chromium(executable: str = CHROMIUM) -> Iterator[object]:
    """Launch headless Chromium through Playwright; yield the browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_until_idle(page: object, timeout_ms: float = 60_000) -> None:
    """Wait until the app is connected, its script (this page) has finished running, and
    every lazily loaded element (charts, tables) has drawn."""
    page.wait_for_selector(
        '[data-testid="stApp"][data-test-connection-state="CONNECTED"]', timeout=timeout_ms
    )
    page.wait_for_selector(
        '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms
    )
    # Charts and tables load lazily: a skeleton stands in until their code has arrived.
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stSkeleton"]')
                 && [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
                    .every(c => c.querySelector('.main-svg'))""",
        timeout=timeout_ms,
    )
    page.wait_for_load_state("networkidle", timeout=timeout_ms)


def _fit_to_content(page: object, width: int, height: int, max_height: int = 4000) -> None:
    """Grow the viewport to the page's content: Streamlit scrolls inside its main area, so a
    full-page screenshot alone would stop at the first screen."""
    content = page.evaluate(
        """() => Math.max(...['stMain', 'stMainBlockContainer'].map(id => {
                 const el = document.querySelector(`[data-testid="${id}"]`);
                 return el ? el.scrollHeight : 0; }))"""
    )
    tall = min(max(int(content) + 40, height), max_height)
    if tall > height:
        page.set_viewport_size({"width": width, "height": tall})
        page.wait_for_timeout(800)  # let charts re-lay out at the new size
        wait_until_idle(page)


def visit(
    browser: object,
    base_url: str,
    out_dir: Path | None,
    pages: dict[str, str] = PAGES,
    width: int = 1400,
    height: int = 1000,
) -> list[PageResult]:
    """Open each page in a fresh tab, wait for it to finish, count what it shows and
    (with ``out_dir``) save a full-page screenshot as ``<name>.png``.

    :param browser: a Playwright ``Browser``, or a ``BrowserContext`` whose tabs share
        one HTTP cache.
    """
    results = []
    for name, path in pages.items():
        page = browser.new_page()
        page.set_viewport_size({"width": width, "height": height})
        try:
            url = f"{base_url}/{path}"
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("h1", timeout=60_000)
            wait_until_idle(page)
            result = PageResult(
                name=name,
                url=url,
                charts=page.locator('[data-testid="stPlotlyChart"]').count(),
                metrics=page.locator('[data-testid="stMetric"]').count(),
                exceptions=page.locator('[data-testid="stException"]').all_inner_texts(),
                errors=page.locator('[data-testid="stAlertContentError"]').all_inner_texts(),
                final_url=page.url,
            )
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                result.screenshot = out_dir / f"{name}.png"
                _fit_to_content(page, width, height)
                page.screenshot(path=str(result.screenshot), full_page=True)
            results.append(result)
        finally:
            page.close()
    return results


def _report(results: list[PageResult]) -> None:
    for result in results:
        print(
            f"{result.name}: {result.charts} charts, {result.metrics} metrics, "
            f"{len(result.exceptions)} exceptions -> {result.screenshot}"
        )


def sample_app_screenshots(
    out_dir: Path, seconds: float = 20.0, executable: str = CHROMIUM
) -> None:
    """The README's screenshots: five pages on a finished run of ``sample_app``, and the
    Live page while a second run is writing its store (both stores in the repository root,
    named relatively so no machine path shows, and removed afterwards)."""
    stores = ("sample-shop.db", "sample-shop-live.db")
    try:
        record = [sys.executable, "-m", "sample_app", "--duration", f"{seconds:g}"]
        subprocess.run([*record, "--store", stores[0]], cwd=ROOT, check=True, capture_output=True)
        finished = {name: path for name, path in PAGES.items() if name != "live"}
        with serve(stores[0]) as url, chromium(executable) as browser:
            _report(visit(browser, url, out_dir, pages=finished))
        live = subprocess.Popen(
            [sys.executable, "-m", "sample_app", "--duration", f"{seconds * 3:g}",
             "--store", stores[1]],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(seconds / 2)
            with serve(stores[1]) as url, chromium(executable) as browser:
                _report(visit(browser, url, out_dir, pages={"live": PAGES["live"]}))
        finally:
            live.terminate()
            live.wait(timeout=30)
    finally:
        for store in stores:
            for suffix in ("", "-wal", "-shm"):
                (ROOT / (store + suffix)).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Screenshot every page of the dashboard on a store into a directory (or, with
    --sample-app, on runs of the sample app, as the README shows them)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("store", nargs="?", help="the store; leave out with --sample-app")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sample-app", action="store_true", help="record the sample app first")
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args(argv)
    if args.sample_app:
        sample_app_screenshots(args.out_dir, executable=args.chromium)
        return 0
    if args.store is None:
        parser.error("give a store, or --sample-app")
    with serve(args.store) as url, chromium(args.chromium) as browser:
        _report(visit(browser, url, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
