"""Run the shop under traffic with poolscope attached, printing progress as it goes."""

from __future__ import annotations

import atexit
import gc
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa

import instrument

from . import db, traffic


@dataclass(frozen=True)
class Options:
    """How to run the sample app; the command line fills it in.

    :param url: the shop's database. May be ``None`` for a SQLite file in a temporary directory.
    :param store: the poolscope store. May be ``None`` for ``$POOLSCOPE_STORE`` or
        ``./poolscope.db``.
    :param pool_timeout: may be ``None`` for ``min(1.0, leak_after / 2)``.
    :param burst_width: threads per repricing burst. May be ``None`` for
        ``pool_size + max_overflow + 6`` (wider than the pool).
    """

    url: str | None = None
    duration: float = 30.0
    workers: int = 8
    store: str | None = None
    seed: int = 1
    leak_after: float = 2.0
    pool_size: int = 5
    max_overflow: int = 5
    pool_timeout: float | None = None
    bursts: int = 2
    burst_width: int | None = None
    schema: str = db.DEFAULT_SCHEMA
    name: str = "shop"
    diagnose: str = "server"  # off | server | on: attach(diagnose=False | "server" | True)

    def validate(self) -> None:
        """Raise ``ValueError`` with one sentence for the first option that is unusable."""
        checks = (
            (self.duration > 0, f"--duration must be more than 0 seconds, not {self.duration}"),
            (self.workers >= 1, f"--workers must be at least 1, not {self.workers}"),
            (
                self.leak_after > 0,
                f"--leak-after must be more than 0 seconds, not {self.leak_after}",
            ),
            (self.pool_size >= 1, f"--pool-size must be at least 1, not {self.pool_size}"),
            (self.max_overflow >= 0, f"--max-overflow must be 0 or more, not {self.max_overflow}"),
            (
                self.pool_timeout is None or self.pool_timeout > 0,
                f"--pool-timeout must be more than 0 seconds, not {self.pool_timeout}",
            ),
            (self.bursts >= 0, f"--bursts must be 0 or more, not {self.bursts}"),
            (
                self.diagnose in ("off", "server", "on"),
                f"--diagnose must be off, server or on, not {self.diagnose!r}",
            ),
            (
                self.burst_width is None or self.burst_width >= 1,
                f"--burst-width must be at least 1, not {self.burst_width}",
            ),
            (
                self.schema.replace("_", "").isalnum(),
                f"--schema must be letters, digits and underscores, not {self.schema!r}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.url is not None:
            try:
                sa.make_url(self.url)
            except sa.exc.ArgumentError:
                raise ValueError(f"--url {self.url!r} is not a database URL") from None

    @property
    def effective_pool_timeout(self) -> float:
        """``pool_timeout``, or half of ``leak_after`` capped at one second."""
        if self.pool_timeout is not None:
            return self.pool_timeout
        return min(1.0, self.leak_after / 2)


class _FirstWarningPerSite(logging.Filter):
    """Let through the first poolscope warning of each kind and site, first line only."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        site = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        key = (str(record.msg)[:30], site)
        if key in self._seen:
            return False
        self._seen.add(key)
        record.msg = record.getMessage().splitlines()[0]
        record.args = ()
        return True


def show_poolscope_warnings(out: TextIO) -> None:
    """Print poolscope's live warnings to ``out``: the first of each kind per site, one line.

    Changes process-wide logging and warning filters, so the command line calls it,
    not :func:`run`.
    """
    handler = logging.StreamHandler(out)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("  poolscope %(levelname)s: %(message)s"))
    handler.addFilter(_FirstWarningPerSite())
    logger = logging.getLogger("poolscope")
    logger.addHandler(handler)
    logger.propagate = False
    # SQLAlchemy warns about each garbage-collected connection, one line each; poolscope's
    # own warning above names the site once instead.
    warnings.filterwarnings(
        "ignore", message="The garbage collector is trying to clean up", category=sa.exc.SAWarning
    )


def _default_url() -> str:
    directory = Path(tempfile.mkdtemp(prefix="poolscope-shop-"))
    atexit.register(shutil.rmtree, directory, True)
    return f"sqlite:///{directory / 'shop.db'}"


def _burst_times(duration: float, bursts: int) -> list[float]:
    return [duration * (k + 0.5) / bursts for k in range(bursts)]


def run(options: Options, out: TextIO = sys.stdout) -> int:
    """Create the shop, attach poolscope, drive traffic for ``options.duration`` seconds.

    Leaves the deliberate leaks in place when it returns: the process must exit for
    poolscope to record the leaked session as ``never_returned``.

    :returns: the process exit code (0).
    """

    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:  # workers report errors while the main thread prints progress
            out.write(text + "\n")
            out.flush()

    url = options.url or _default_url()
    pool_timeout = options.effective_pool_timeout
    engine, bound = db.make_engine(
        url,
        pool_size=options.pool_size,
        max_overflow=options.max_overflow,
        pool_timeout=pool_timeout,
        schema=options.schema,
    )
    monitor = instrument.attach(
        engine,
        store=options.store,
        leak_after=options.leak_after,
        name=options.name,
        diagnose={"off": False, "server": "server", "on": True}[options.diagnose],
    )
    store = monitor.store.resolve()
    capacity = options.pool_size + options.max_overflow
    width = options.burst_width or capacity + 6
    say(f"sample_app: a shop on {engine.url.render_as_string(hide_password=True)}")
    say(
        f"  pool: size {options.pool_size}, overflow {options.max_overflow}, timeout "
        f"{pool_timeout:g} s; poolscope leak_after {options.leak_after:g} s; store {store}"
    )
    db.create_schema(engine, bound, options.schema)
    rows = db.seed(bound, random.Random(options.seed))
    say(
        f"  seeded {rows['products']} products, {rows['customers']} customers, "
        f"{rows['orders']} orders"
    )
    say(
        f"  traffic: {options.workers} workers for {options.duration:g} s, "
        f"{options.bursts} burst(s) of {width} parallel repricings"
    )

    stats = traffic.Stats()
    sa.event.listen(engine, "checkout", lambda *_: stats.add("checkouts"))
    shop_ = traffic.Shop(bound, db.make_session_factory(bound), hold_unit_s=options.leak_after)
    stop = threading.Event()
    workers = [
        threading.Thread(
            target=traffic.worker,
            args=(i, shop_, options.seed, stop, stats, lambda m: say(f"  error: {m}")),
            name=f"worker-{i + 1}",
        )
        for i in range(options.workers)
    ]
    started = time.monotonic()
    for thread in workers:
        thread.start()

    rng = random.Random(options.seed)
    burst_at = _burst_times(options.duration, options.bursts)
    bursts: list[threading.Thread] = []
    tick_s = 3.0 if options.duration >= 15 else 1.0
    next_tick = tick_s
    try:
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= options.duration:
                break
            if burst_at and elapsed >= burst_at[0]:
                burst_at.pop(0)
                say(f"[{elapsed:5.1f}s] burst: {width} repricing threads at once")
                thread = threading.Thread(
                    target=traffic.burst,
                    args=(shop_, width, 1.5 * pool_timeout, rng, stats),
                    name=f"reprice-{len(bursts) + 1}",
                )
                thread.start()
                bursts.append(thread)
            if elapsed >= next_tick:
                next_tick += tick_s
                gc.collect()  # the service's periodic housekeeping
                say(_progress_line(elapsed, stats, monitor, capacity))
            wake = min([options.duration, next_tick, *burst_at[:1]])
            time.sleep(max(0.0, min(0.2, wake - elapsed)))
    finally:
        stop.set()
        for thread in workers + bursts:
            thread.join()
    elapsed = time.monotonic() - started
    monitor.flush()
    counts = stats.snapshot()
    say(
        f"done after {elapsed:.1f} s: {counts['requests']} requests served, "
        f"{counts['timeouts']} pool timeouts (answered 503), {counts['coupon_rejected']} "
        f"coupons rejected, {counts['errors']} errors"
    )
    say("")
    say(f"poolscope store: {store}")
    say(f"  report:    poolscope report {store}")
    say(f"  dashboard: poolscope dashboard {store}")
    say("  (or python -m instrument report|dashboard ... without the console script)")
    # Deliberately no cleanup of RECOMMENDATIONS: its session is the never_returned leak.
    return 0


def _progress_line(
    elapsed: float, stats: traffic.Stats, monitor: instrument.Monitor, capacity: int
) -> str:
    counts = stats.snapshot()
    held = monitor.open_checkouts()
    line = (
        f"[{elapsed:5.1f}s] requests {counts['requests']:6d}  checkouts {counts['checkouts']:6d}"
        f"  timeouts {counts['timeouts']:4d}  errors {counts['errors']:3d}"
        f"  in use {len(held):2d}/{capacity}"
    )
    if held:
        line += f"  longest {held[0].held_s:.1f} s at {held[0].site}"
    return line
