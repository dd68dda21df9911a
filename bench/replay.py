"""Time the replay of recorded demand (``instrument._replay``) on 1,000,000 checkouts.

Synthetic demand, one process: Poisson arrivals at 100 per second, lognormal holds (median
20 ms), so that a pool of capacity 3 queues and times out often and one of 10 rarely does.
Prints the seconds each replay takes, and the seconds :func:`recommend` takes (a binary
search of a few replays). Never a timed test: figures go to BENCHMARKS.md.

Usage::

    .venv/bin/python bench/replay.py [--checkouts 1000000] [--seed 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from instrument import _replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.checkouts
    arrivals = np.cumsum(rng.exponential(0.01, n))
    holds = rng.lognormal(np.log(0.02), 1.0, n)
    demand = _replay.Demand(arrivals, holds)
    for size, overflow in ((3, 0), (5, 5), (50, 0)):
        t0 = time.perf_counter()
        outcome = _replay.replay([demand], size, overflow, 0.3)
        took = time.perf_counter() - t0
        print(
            f"replay pool_size={size} max_overflow={overflow}: {took:.2f} s for {n:,} "
            f"checkouts ({outcome.timeouts:,} timeouts, p99 wait {outcome.wait_ms(99)} ms, "
            f"peak {outcome.peak})"
        )
    t0 = time.perf_counter()
    advice = _replay.recommend([demand], 3, 0, 0.3, mean_in_use=float(holds.mean() * 100))
    took = time.perf_counter() - t0
    assert advice is not None
    print(
        f"recommend: {took:.2f} s -> pool_size={advice.pool_size} "
        f"max_overflow={advice.max_overflow} pool_timeout={advice.timeout_s}"
    )


if __name__ == "__main__":
    main()
