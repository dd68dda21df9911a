"""Time the dashboard's first render of the Overview on a store of 1,000,000 events.

The store comes from ``bench/report.py``'s recorder, through the real writer (8 processes ×
3 pools, 30 sites, timeouts and leaks of every class, rollups written as in production;
``--direct`` for its rows-inserted first-release store). Each run starts cold, with
nothing cached:

- **AppTest**: a fresh Python process runs ``dashboard/app.py`` once with
  ``streamlit.testing.v1.AppTest``; the time is that first script run (sidebar + Overview).
- **browser**: a fresh ``streamlit run dashboard/app.py`` server; headless Chromium opens
  the Overview and the time runs from navigation until the script has finished and every
  chart has drawn (what a user waits for; server start-up not included).

Usage::

    .venv/bin/python bench/dashboard.py [--events 1000000] [--store PATH] [--runs 3]
        [--no-browser] [--direct]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard import screenshots  # noqa: E402

TARGET_S = 5.0
"""The first Overview render should take less than this."""

_APPTEST_RUN = """
import json, os, sys, time
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=600)
t, cpu = time.perf_counter(), time.process_time()
at.run()
elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
print(json.dumps({
    "seconds": elapsed,
    "cpu_seconds": cpu,
    "exceptions": [e.value for e in at.exception],
    "errors": [e.value for e in at.error],
    "metrics": {m.label: m.value for m in at.metric},
}))
"""


def _generator():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apptest_first_run(store: Path) -> dict:
    """Run the Overview once in a fresh process with AppTest; return its timing and KPIs."""
    proc = subprocess.run(
        [sys.executable, "-c", _APPTEST_RUN, str(ROOT / "dashboard" / "app.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "POOLSCOPE_STORE": str(store)},
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["exceptions"] or result["errors"]:
        raise SystemExit(f"the Overview failed: {result['exceptions'] or result['errors']}")
    return result


def browser_first_render(store: Path) -> float:
    """Serve the dashboard cold and time the Overview in headless Chromium, in seconds."""
    with screenshots.serve(store) as url, screenshots.chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # Includes loading the app's scripts into a fresh browser: a real first visit.
        t = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector('[data-testid="stMetric"]', timeout=600_000)
        screenshots.wait_until_idle(page, timeout_ms=600_000)
        elapsed = time.perf_counter() - t
        charts = page.locator('[data-testid="stPlotlyChart"]').count()
        metrics = page.locator('[data-testid="stMetric"]').count()
        if page.locator('[data-testid="stException"]').count() or not charts or metrics < 8:
            raise SystemExit("the Overview did not render its metrics and chart")
        return elapsed


def _load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--store", type=Path, default=None, help="reuse or keep this store")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument(
        "--direct", action="store_true", help="a first-release store of inserted rows (no rollups)"
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="poolscope-bench-")
    store = args.store or Path(tmp.name) / "bench.db"
    if not store.exists():
        t = time.perf_counter()
        bench = _generator()
        if args.direct:
            bench.generate(store, args.events)
        else:
            bench.record(store, args.events)
        print(f"generated the store in {time.perf_counter() - t:.1f} s")
    print(f"store {store} ({store.stat().st_size / 1e6:.0f} MB); cpus {os.cpu_count()}")

    timings = []
    for _ in range(args.runs):
        result = apptest_first_run(store)
        timings.append(result["seconds"])
        print(f"  AppTest first run of the Overview: {result['seconds']:.2f} s, "
              f"CPU {result['cpu_seconds']:.2f} s (load average {_load_average()})")  # fmt: skip
    print("  KPIs: " + ", ".join(f"{k} {v}" for k, v in result["metrics"].items()))
    summary = [f"AppTest median {statistics.median(timings):.2f} s (best {min(timings):.2f} s)"]

    if not args.no_browser:
        timings = []
        for _ in range(args.runs):
            seconds = browser_first_render(store)
            timings.append(seconds)
            print(f"  Chromium first render of the Overview: {seconds:.2f} s "
                  f"(load average {_load_average()})")  # fmt: skip
        summary.append(
            f"Chromium median {statistics.median(timings):.2f} s (best {min(timings):.2f} s)"
        )
    print(f"first Overview render on {args.events:,} events: " + "; ".join(summary))
    print(f"target < {TARGET_S:g} s")
    tmp.cleanup()


if __name__ == "__main__":
    main()
