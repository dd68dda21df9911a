"""The traffic generator: worker threads replaying a shuffled mix of requests, plus bursts."""

from __future__ import annotations

import io
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import bugs, shop
from .db import CATEGORIES, CUSTOMERS, INVALID_COUPONS, PRODUCTS_PER_CATEGORY, VALID_COUPONS

DECK: dict[str, int] = {
    "browse": 14,
    "product": 12,
    "search": 4,
    "order": 8,
    "coupon_order": 2,
    "coupon_order_bad_code": 1,
    "order_history": 2,
    "recommendations": 3,
    "sales_report": 1,
    "export": 1,
    "card_checkout": 1,
    "restock": 1,
}
"""How many of each request one worker makes per round; each round is shuffled."""

SEARCH_TERMS = ("item 1", "coffee", "garden item", "toys item 2", "book", "kitchen")

PRODUCTS = len(CATEGORIES) * PRODUCTS_PER_CATEGORY

RESTOCKED = range(PRODUCTS - 3, PRODUCTS + 1)
"""The products the restock bug locks: never in an order basket, so that the correct
``place_order`` never waits on its lock (the purchase that does is in ``bugs.py``)."""


@dataclass
class Shop:
    """What the request handlers need: the engine, sessions and the payment provider.

    :param hold_unit_s: the scale of slow things, ``leak_after``: the export holds
        about a quarter of it, a slow card payment one and a half times it.
    """

    engine: sa.Engine
    session_factory: Callable[[], Session]
    hold_unit_s: float
    provider: bugs.PaymentProvider = field(init=False)

    def __post_init__(self) -> None:
        self.provider = bugs.PaymentProvider(fast_s=0.02, slow_s=1.5 * self.hold_unit_s)


@dataclass
class Stats:
    """Thread-safe counters of what the traffic did."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors_seen: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def error(self, exc: BaseException) -> bool:
        """Count an unexpected error; return True the first time this kind is seen."""
        key = describe(exc)
        with self.lock:
            self.counts["errors"] += 1
            first = key not in self.errors_seen
            self.errors_seen[key] = self.errors_seen.get(key, 0) + 1
        return first


def describe(exc: BaseException) -> str:
    """One line naming an error: the driver's own error for a SQLAlchemy ``DBAPIError``."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _basket(rng: random.Random) -> list[tuple[int, int]]:
    ids = rng.sample(range(1, RESTOCKED.start), rng.randint(1, 3))
    return [(pid, rng.randint(1, 2)) for pid in sorted(ids)]  # sorted: no lock-order deadlocks


def handle(kind: str, shop_: Shop, rng: random.Random, stats: Stats) -> None:
    """Serve one request of ``kind``, the way a web handler would."""
    engine, sessions = shop_.engine, shop_.session_factory
    customer = rng.randint(1, CUSTOMERS)
    if kind == "browse":
        shop.browse_category(engine, rng.randint(1, len(CATEGORIES)))
    elif kind == "product":
        shop.product_detail(engine, rng.randint(1, PRODUCTS))
    elif kind == "search":
        shop.search_products(engine, rng.choice(SEARCH_TERMS))
    elif kind == "order":
        shop.place_order(sessions, customer, _basket(rng))
    elif kind in ("coupon_order", "coupon_order_bad_code"):
        code = rng.choice(VALID_COUPONS if kind == "coupon_order" else INVALID_COUPONS)
        percent_off = bugs.price_with_coupon_leaking_on_error(engine, code)
        shop.place_order(sessions, customer, _basket(rng), percent_off, code)
    elif kind == "order_history":
        bugs.first_page_of_order_history(engine, customer)
    elif kind == "recommendations":
        bugs.featured_products_keeping_session(sessions)
    elif kind == "sales_report":
        shop.sales_report(engine)
    elif kind == "export":
        shop.export_orders_csv(engine, io.StringIO(), chunk_pause_s=0.025 * shop_.hold_unit_s)
    elif kind == "card_checkout":
        order_id = shop.place_order(sessions, customer, _basket(rng))
        bugs.charge_card_inside_transaction(engine, order_id, shop_.provider)
    elif kind == "restock":
        if engine.dialect.name == "postgresql":  # SQLite locks the whole file, not a row
            product = rng.choice(RESTOCKED)
            bugs.restock_while_buying(engine, product, 1.5 * shop_.hold_unit_s)
    else:  # pragma: no cover - DECK and this function are edited together
        raise ValueError(f"unknown request kind {kind!r}")


def worker(
    index: int,
    shop_: Shop,
    seed: int,
    stop: threading.Event,
    stats: Stats,
    report_error: Callable[[str], None],
) -> None:
    """Serve shuffled rounds of :data:`DECK` until ``stop`` is set.

    A pool timeout is answered like a web service would, with a 503, and counted.
    """
    rng = random.Random(seed * 1000 + index)
    deck: list[str] = []
    while not stop.is_set():
        if not deck:
            deck = [kind for kind, n in DECK.items() for _ in range(n)]
            rng.shuffle(deck)
        kind = deck.pop()
        try:
            handle(kind, shop_, rng, stats)
        except sa.exc.TimeoutError:
            stats.add("timeouts")
        except bugs.InvalidCoupon:
            stats.add("coupon_rejected")
        except shop.OutOfStock:
            stats.add("out_of_stock")
        except Exception as exc:  # a real service logs and answers 500; so do we
            if stats.error(exc):
                report_error(f"{kind}: {describe(exc)}")
        else:
            stats.add("requests")
        stop.wait(rng.uniform(0.005, 0.04))


def burst(shop_: Shop, width: int, hold_s: float, rng: random.Random, stats: Stats) -> None:
    """Fire one repricing burst of ``width`` parallel threads and count its timeouts."""
    product_ids = rng.sample(range(1, PRODUCTS + 1), width)
    done, timed_out = bugs.reprice_burst(shop_.engine, product_ids, hold_s)
    stats.add("bursts")
    stats.add("burst_repriced", done)
    stats.add("timeouts", timed_out)
