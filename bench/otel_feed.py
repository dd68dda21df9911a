"""What the OpenTelemetry record feed costs the writer thread, and what its GIL hand-offs
leave to an application that waits on its database meanwhile.

A batch of checkout and checkin records (as the writer takes them) goes through the feed of
a monitor attached with ``meter_provider=`` an SDK ``MeterProvider``, once per value of
``YIELD_EVERY_RECORDS`` (how many measurements the feed records between two releases of
the GIL), while another thread plays an application bound by I/O: a little Python, then a
short sleep that releases the GIL, as a database call does. Prints the writer thread's CPU
time per measurement and the application's iterations per second during the batch, against
its rate alone.

    python bench/otel_feed.py [--records 20000] [--yields 1000000,64,16,8,4,1]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time

import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import instrument
from instrument import _otel, _record, _writer

APP_PYTHON_LOOP = 300  # additions per application iteration (about 10 µs of Python)
APP_IO_SECONDS = 0.0002  # the "database call": a sleep, GIL released


def _batch(pool_key: int, records: int) -> list:
    """``records`` records, checkouts and checkins alternately, as a flat list queue holds them."""
    rng = random.Random(0)
    flat: list = []
    for i in range(records):
        record = [_writer.NULL] * _record.RECORD_WIDTH
        record[_record.AT] = time.time()
        record[_record.POOL] = pool_key
        record[_record.THREAD] = "MainThread"
        if i % 2 == 0:
            record[_record.KIND] = "checkout"
            record[_record.WAIT_S] = rng.random() * 1e-4
        else:
            record[_record.KIND] = "checkin"
            record[_record.HOLD_S] = rng.random() * 1e-3
        flat += record
    return flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--yields", default="1000000,64,16,8,4,1")
    args = parser.parse_args()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/app.db")
        monitor = instrument.attach(
            engine, store=f"{tmp}/store.db", name="bench", meter_provider=provider
        )
        feed = _otel.feed_of(monitor._writer)
        batch = _batch(monitor.pool_key, args.records)

        iterations = [0]
        stop = threading.Event()

        def application() -> None:
            while not stop.is_set():
                x = 0
                for i in range(APP_PYTHON_LOOP):
                    x += i
                time.sleep(APP_IO_SECONDS)
                iterations[0] += 1

        app = threading.Thread(target=application, name="application")
        app.start()
        time.sleep(0.5)
        before = iterations[0]
        time.sleep(1.0)
        alone = iterations[0] - before
        print(f"application alone: {alone:,} it/s")
        default = _otel.YIELD_EVERY_RECORDS
        try:
            for every in [int(y) for y in args.yields.split(",")]:
                _otel.YIELD_EVERY_RECORDS = every
                before, wall0, cpu0 = iterations[0], time.perf_counter(), time.thread_time()
                feed(list(batch))
                cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
                rate = (iterations[0] - before) / wall
                print(
                    f"yield every {every:>7}: writer {cpu / args.records * 1e6:5.2f} µs CPU "
                    f"per measurement; application {rate:,.0f} it/s during the batch "
                    f"({rate / alone:.2f} of alone)"
                )
                time.sleep(0.3)
        finally:
            _otel.YIELD_EVERY_RECORDS = default
            stop.set()
            app.join()
        monitor.close()
        engine.dispose()
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
