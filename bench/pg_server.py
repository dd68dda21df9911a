"""What a PostgreSQL store's server process spends on each checkout the writer sends it.

Checkouts of a SQLite engine attached with a PostgreSQL store (a new schema each run,
dropped after), as fast as they come, with a short pause every 2,000 so the writer takes
them in batches as in production. Prints the CPU time (Linux's schedstat of the
writer's server process, found in ``pg_stat_activity``) per checkout: two events, a
checkout and its return. Variants: ``normal``; ``nokeeper`` (the writer's rollups,
marks and prunes left out: the events' ``COPY`` and the heartbeat only); ``noindex``
(the returns' partial index dropped). The server must run on this machine.

    python bench/pg_server.py [--checkouts 40000] [--variants normal,nokeeper,noindex]
                              [--url postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import psycopg
import sqlalchemy as sa

import instrument
from instrument import _writer

PAUSE_EVERY = 2_000
PAUSE_S = 0.05


def _server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def run(url: str, variant: str, checkouts: int) -> float:
    """The writer's server process CPU per checkout, in µs, for ``variant``."""
    schema = f"bench_server_{uuid.uuid4().hex[:8]}"
    store = f"{url}?schema={schema}"
    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=1)
    monitor = instrument.attach(engine, store=store, name="bench")
    with psycopg.connect(conninfo, autocommit=True) as admin:
        try:
            for _ in range(10):
                with engine.connect():
                    pass
            if not monitor.flush():
                raise SystemExit(f"the store {store} cannot be written")
            (pid,) = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (f"poolscope {schema}",),
            ).fetchone()
            if variant == "noindex":
                admin.execute(f'DROP INDEX "{schema}".events_returns')
            elif variant == "nokeeper":
                monitor._writer.keeper.after_batch = lambda *args, **kwargs: None
            before = _server_cpu_s(pid)
            for i in range(checkouts):
                with engine.connect():
                    pass
                if i % PAUSE_EVERY == 0:
                    time.sleep(PAUSE_S)
            monitor.flush()
            return (_server_cpu_s(pid) - before) / checkouts * 1e6
        finally:
            _writer.shutdown_all(timeout=5)
            engine.dispose()
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", type=int, default=40_000)
    parser.add_argument("--variants", default="normal,nokeeper,noindex")
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        if variant not in ("normal", "nokeeper", "noindex"):
            parser.error(f"unknown variant {variant!r}")
    for variant in args.variants.split(","):
        per = run(args.url, variant, args.checkouts)
        print(f"{variant:>9}: the store's server process {per:.2f} µs per checkout (2 events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
