"""The shop's request handlers, written correctly: every connection goes back to the pool.

Catalogue reads use SQLAlchemy Core; order placement runs in an ORM session
transaction; the sales report is a slow aggregate; the export streams rows to a
slow client and so legitimately holds its connection for a while.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .db import Order, OrderLine, Product, categories, order_lines, orders, products


class OutOfStock(Exception):
    """A product in the basket has fewer items left than ordered."""


def browse_category(engine: sa.Engine, category_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """Return one page of a category's products, cheapest first (Core)."""
    query = (
        sa.select(products.c.id, products.c.name, products.c.price_cents)
        .where(products.c.category_id == category_id, products.c.stock > 0)
        .order_by(products.c.price_cents)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def product_detail(engine: sa.Engine, product_id: int) -> dict[str, Any] | None:
    """Return one product with its category name and units sold (Core)."""
    sold = (
        sa.select(sa.func.coalesce(sa.func.sum(order_lines.c.quantity), 0))
        .where(order_lines.c.product_id == products.c.id)
        .scalar_subquery()
    )
    query = (
        sa.select(products, categories.c.name.label("category"), sold.label("sold"))
        .join(categories, categories.c.id == products.c.category_id)
        .where(products.c.id == product_id)
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row is not None else None


def search_products(engine: sa.Engine, term: str, limit: int = 20) -> list[str]:
    """Return the names of products whose name contains ``term`` (Core)."""
    query = (
        sa.select(products.c.name)
        .where(products.c.name.ilike(f"%{term}%"))
        .order_by(products.c.name)
        .limit(limit)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def place_order(
    session_factory: Callable[[], Session],
    customer_id: int,
    basket: Sequence[tuple[int, int]],
    percent_off: int = 0,
    coupon_code: str | None = None,
) -> int:
    """Place an order in one ORM transaction; return its id.

    Locks nothing longer than the transaction: reads the products, decrements
    their stock, writes the order and its lines, commits.

    :param basket: ``(product_id, quantity)`` pairs.
    :param percent_off: discount already validated by the caller.
    :raises OutOfStock: if a product has fewer items left than ordered.
    """
    with session_factory() as session, session.begin():
        order = Order(
            customer_id=customer_id,
            created_at=dt.datetime.now(),
            status="new",
            total_cents=0,
            coupon_code=coupon_code,
        )
        total = 0
        for product_id, quantity in basket:
            product = session.get(Product, product_id)
            if product is None or product.stock < quantity:
                raise OutOfStock(f"product {product_id}")
            product.stock -= quantity
            total += quantity * product.price_cents
            order.lines.append(
                OrderLine(
                    product_id=product_id,
                    quantity=quantity,
                    unit_price_cents=product.price_cents,
                )
            )
        order.total_cents = total * (100 - percent_off) // 100
        session.add(order)
        session.flush()
        return order.id


def sales_report(engine: sa.Engine, days: int = 90) -> list[dict[str, Any]]:
    """Revenue, orders and best seller per category over the last ``days`` (slow).

    The aggregate scans the whole order history and runs a correlated subquery per
    category, which is what makes it the slowest read in the shop.
    """
    since = dt.datetime.now() - dt.timedelta(days=days)
    revenue = sa.func.sum(order_lines.c.quantity * order_lines.c.unit_price_cents)
    inner_lines = order_lines.alias("inner_lines")
    inner_products = products.alias("inner_products")
    best_seller = (
        sa.select(inner_products.c.name)
        .join(inner_lines, inner_lines.c.product_id == inner_products.c.id)
        .where(inner_products.c.category_id == categories.c.id)
        .group_by(inner_products.c.id, inner_products.c.name)
        .order_by(sa.func.sum(inner_lines.c.quantity).desc(), inner_products.c.id)
        .limit(1)
        .scalar_subquery()
    )
    query = (
        sa.select(
            categories.c.name.label("category"),
            sa.func.count(sa.distinct(orders.c.id)).label("orders"),
            revenue.label("revenue_cents"),
            best_seller.label("best_seller"),
        )
        .select_from(categories)
        .join(products, products.c.category_id == categories.c.id)
        .join(order_lines, order_lines.c.product_id == products.c.id)
        .join(orders, orders.c.id == order_lines.c.order_id)
        .where(orders.c.created_at >= since)
        .group_by(categories.c.id, categories.c.name)
        .order_by(revenue.desc())
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def export_orders_csv(
    engine: sa.Engine, sink: io.TextIOBase, *, rows: int = 1000, chunk_pause_s: float = 0.05
) -> int:
    """Stream the latest ``rows`` orders as CSV to a slow client; return rows written.

    Holds its connection for the whole export, on purpose: the rows are streamed
    (``yield_per``) rather than loaded at once, and each chunk waits for the client.
    That is a long hold, but not a leak.

    :param chunk_pause_s: seconds the client takes to accept each chunk of 100 rows.
    """
    query = (
        sa.select(
            orders.c.id,
            orders.c.customer_id,
            orders.c.created_at,
            orders.c.status,
            orders.c.total_cents,
        )
        .order_by(orders.c.id.desc())
        .limit(rows)
    )
    writer = csv.writer(sink)
    writer.writerow(["id", "customer_id", "created_at", "status", "total_cents"])
    written = 0
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=100).execute(query)
        for chunk in result.partitions():
            writer.writerows(chunk)
            written += len(chunk)
            time.sleep(chunk_pause_s)
    return written
