"""The shop's deliberate pool bugs, one function each, the way they turn up in real code.

Each function carries a ``BUG`` comment on the line at fault; the report names
the line where the connection was checked out. What poolscope reports for each:

- ``price_with_coupon_leaking_on_error``: ``gc_reclaimed`` - the error path drops
  its connection without closing it.
- ``featured_products_keeping_session``: ``never_returned`` (``open_now`` while the
  app runs) - a Session with an open transaction kept in a process-wide cache.
- ``iter_order_history_unclosed``: ``gc_reclaimed`` - a generator abandoned after
  the first page, kept alive by a reference cycle until the garbage collector runs.
- ``reprice_product_in_burst``: ``timeout`` - a fan-out wider than the pool.
- ``charge_card_inside_transaction``: ``held_too_long`` - a slow external API call
  made while holding the connection; its diagnosis: idle in transaction.
- ``restock_product_slowly``: ``held_too_long`` - a row updated, then a slow supplier call
  inside the same transaction; ``buy_product_now`` on that product waits on the row lock
  (its diagnosis on PostgreSQL: ``lock_wait``, blocked by ``restock_product_slowly``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .db import FEATURED_CATEGORY, Product, coupons, orders, products


class InvalidCoupon(Exception):
    """The coupon code does not exist or has expired."""


# -- 1. a connection not closed on an error path ---------------------------------------------


def price_with_coupon_leaking_on_error(engine: sa.Engine, code: str) -> int:
    """Return the percentage a coupon takes off; raise :class:`InvalidCoupon` if it is bad.

    The happy path closes its connection. The error path raises before
    ``conn.close()`` and drops the connection; only the garbage collector gives it
    back to the pool (poolscope: ``gc_reclaimed``). Fix: ``with engine.connect() as conn:``.
    """
    conn = engine.connect()
    row = conn.execute(
        sa.select(coupons.c.percent_off, coupons.c.expires_at).where(coupons.c.code == code)
    ).first()
    if row is None or row.expires_at < dt.datetime.now():
        raise InvalidCoupon(code)  # BUG: conn is never closed on this path
    conn.close()
    return int(row.percent_off)


# -- 2. a session stored in a long-lived object ---------------------------------------------


class RecommendationCache:
    """Process-wide cache of the front page's recommended products.

    Keeps the ``Session`` that loaded them "so that lazy attributes still work
    later" - and with it the session's transaction and pooled connection.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Session, list[Product]]] = {}

    def get(self, key: str) -> list[Product] | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def put(self, key: str, session: Session, items: list[Product]) -> None:
        self._entries[key] = (session, items)

    @property
    def lock(self) -> threading.Lock:
        return self._lock


RECOMMENDATIONS = RecommendationCache()
"""Lives as long as the process, and so does every session put into it."""


def featured_products_keeping_session(session_factory: Callable[[], Session]) -> list[str]:
    """Return the names of the front page's featured products, cached for the process.

    The first call loads them and stores the session in :data:`RECOMMENDATIONS`,
    transaction still open: its connection is checked out until the process exits
    (poolscope: ``open_now`` while it runs, ``never_returned`` after). Fix: close the
    session and cache plain values (or ``session.expunge_all()`` first).
    """
    cached = RECOMMENDATIONS.get("featured")
    if cached is None:
        with RECOMMENDATIONS.lock:
            cached = RECOMMENDATIONS.get("featured")
            if cached is None:
                session = session_factory()
                cached = list(
                    session.scalars(
                        sa.select(Product)
                        .where(Product.category_id == FEATURED_CATEGORY)
                        .order_by(Product.price_cents.desc())
                        .limit(8)
                    )
                )
                RECOMMENDATIONS.put("featured", session, cached)  # BUG: session kept open
    return [product.name for product in cached]


# -- 3. a generator that holds a connection and is abandoned ---------------------------------


class OrderHistoryPager:
    """Pages through a customer's order history, one page per request.

    ``self._rows`` is a generator whose frame refers back to ``self``: a
    reference cycle, so only the cyclic garbage collector frees an abandoned pager.
    """

    def __init__(self, engine: sa.Engine, customer_id: int, page_size: int = 5) -> None:
        self.engine = engine
        self.customer_id = customer_id
        self.page_size = page_size
        self._rows = self.iter_order_history_unclosed()

    def iter_order_history_unclosed(self) -> Iterator[Any]:
        """Yield the customer's orders, newest first, fetched a page at a time (keyset).

        Closes its connection only after the last page. A caller that stops early
        abandons the generator with the connection checked out; the garbage
        collector returns it (poolscope: ``gc_reclaimed``). Fix: ``with engine.connect()``
        inside the generator, and ``contextlib.closing()`` around its use.
        """
        conn = self.engine.connect()
        query = (
            sa.select(orders.c.id, orders.c.created_at, orders.c.status, orders.c.total_cents)
            .where(orders.c.customer_id == self.customer_id)
            .order_by(orders.c.id.desc())
            .limit(self.page_size)
        )
        before = None
        while True:
            page = query if before is None else query.where(orders.c.id < before)
            rows = conn.execute(page).all()
            yield from rows
            if len(rows) < self.page_size:
                break
            before = rows[-1].id
        conn.close()  # BUG: never reached when the caller stops early

    def next_page(self) -> list[Any]:
        """Return the next ``page_size`` rows."""
        return list(itertools.islice(self._rows, self.page_size))


def first_page_of_order_history(engine: sa.Engine, customer_id: int) -> int:
    """The "my orders" page: show the first page, then drop the pager."""
    return len(OrderHistoryPager(engine, customer_id).next_page())


# -- 4. a burst that exhausts the pool -------------------------------------------------------


def reprice_product_in_burst(engine: sa.Engine, product_id: int, hold_s: float) -> None:
    """Recompute one product's price; holds a connection for ``hold_s`` (a slow query)."""
    with engine.begin() as conn:
        price = conn.execute(
            sa.select(products.c.price_cents).where(products.c.id == product_id)
        ).scalar_one()
        time.sleep(hold_s)  # stands in for the slow pricing query
        conn.execute(
            products.update()
            .where(products.c.id == product_id)
            .values(price_cents=max(99, price + (1 if product_id % 2 else -1)))
        )


def reprice_burst(engine: sa.Engine, product_ids: Sequence[int], hold_s: float) -> tuple[int, int]:
    """Reprice many products at once, one thread per product; return (done, timed out).

    BUG: the fan-out is as wide as the product list, wider than the pool. The
    first ``pool_size + max_overflow`` threads take every connection; the rest
    (and every other request meanwhile) wait ``pool_timeout`` and get
    ``TimeoutError`` (poolscope: ``timeout``, with who held the pool). Fix: bound
    the executor to fewer workers than the pool has connections.
    """
    done = timed_out = 0
    with ThreadPoolExecutor(max_workers=len(product_ids), thread_name_prefix="burst") as pool:
        futures = [
            pool.submit(reprice_product_in_burst, engine, pid, hold_s) for pid in product_ids
        ]
        for future in futures:
            try:
                future.result()
                done += 1
            except sa.exc.TimeoutError:
                timed_out += 1
    return done, timed_out


# -- 5. a slow path holding a connection while it calls an external API ------------------


class PaymentProvider:
    """The card payment service: usually fast, now and then very slow.

    :param fast_s: seconds a normal call takes.
    :param slow_s: seconds a slow call takes.
    :param slow_every: every this many calls one is slow, starting with the first.
    """

    def __init__(self, fast_s: float, slow_s: float, slow_every: int = 6) -> None:
        self.fast_s = fast_s
        self.slow_s = slow_s
        self.slow_every = slow_every
        self._calls = itertools.count()

    def charge(self, amount_cents: int) -> str:
        """Charge the card; return a payment reference."""
        n = next(self._calls)
        time.sleep(self.slow_s if n % self.slow_every == 0 else self.fast_s)
        return f"pay-{n:06d}-{amount_cents}"


def charge_card_inside_transaction(
    engine: sa.Engine, order_id: int, provider: PaymentProvider
) -> str:
    """Charge the card for an order and mark it paid.

    BUG: calls the payment provider inside the transaction, so the connection is
    held for as long as the provider takes; when it is slow, past ``leak_after``
    (poolscope: ``held_too_long``). Fix: read the total, release the connection,
    call the provider, then open a short transaction to mark the order paid.
    """
    with engine.begin() as conn:
        total = conn.execute(
            sa.select(orders.c.total_cents).where(orders.c.id == order_id)
        ).scalar_one()
        reference = provider.charge(total)  # BUG: external call while holding the connection
        conn.execute(orders.update().where(orders.c.id == order_id).values(status="paid"))
    return reference


# -- 6. a row lock held across a slow call, and the handler that waits on it -----------------


def restock_product_slowly(
    engine: sa.Engine, product_id: int, supplier_s: float, locked: threading.Event
) -> None:
    """Restock a product: add the delivery to its stock, confirm with the supplier.

    BUG: updates the product's row first, then calls the supplier inside the same
    transaction, so the row stays locked for as long as the supplier takes; every
    handler that writes that row waits (poolscope: ``held_too_long``, diagnosed idle in
    transaction; the waiter's diagnosis is ``lock_wait``, blocked by this function).
    Fix: call the supplier first, then update in a short transaction.
    """
    with engine.begin() as conn:
        conn.execute(
            products.update().where(products.c.id == product_id).values(stock=products.c.stock + 10)
        )
        locked.set()
        time.sleep(supplier_s)  # BUG: the supplier's API, called while the row is locked


def buy_product_now(engine: sa.Engine, product_id: int) -> None:
    """The "buy now" button: take one off the product's stock (waits on a restock's lock)."""
    with engine.begin() as conn:
        conn.execute(
            products.update().where(products.c.id == product_id).values(stock=products.c.stock - 1)
        )


def restock_while_buying(engine: sa.Engine, product_id: int, supplier_s: float) -> None:
    """A restock and a purchase of one product at once, the purchase second.

    On SQLite a writer locks the whole file, not a row: there the shop skips this pair
    (see ``traffic.handle``).
    """
    locked = threading.Event()
    restock = threading.Thread(
        target=restock_product_slowly,
        args=(engine, product_id, supplier_s, locked),
        name=f"{threading.current_thread().name}-restock",
    )
    restock.start()
    try:
        if locked.wait(10 * supplier_s + 5):
            buy_product_now(engine, product_id)
    finally:
        restock.join()
