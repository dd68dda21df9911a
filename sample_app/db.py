"""The shop's database: engine, ORM models, schema set-up and seed data."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

DEFAULT_SCHEMA = "poolscope_shop"
"""PostgreSQL schema the shop's tables live in (SQLite ignores it)."""

CATEGORIES = (
    "books",
    "coffee",
    "garden",
    "kitchen",
    "music",
    "outdoor",
    "stationery",
    "toys",
)
FEATURED_CATEGORY = 2
"""The category whose products the front page recommends (``coffee``)."""

VALID_COUPONS = ("WELCOME10", "SPRING15", "LOYAL20", "FREESHIP5")
INVALID_COUPONS = ("SUMMER2019", "EXPIRED50", "TYPO10")
"""Codes customers still type in: two expired, one that never existed."""

PRODUCTS_PER_CATEGORY = 30
CUSTOMERS = 200
HISTORIC_ORDERS = 4000


class Base(DeclarativeBase):
    """Declarative base of the shop's models."""


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(40), unique=True)


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(20), unique=True)
    name: Mapped[str] = mapped_column(sa.String(80))
    category_id: Mapped[int] = mapped_column(sa.ForeignKey("categories.id"), index=True)
    price_cents: Mapped[int]
    stock: Mapped[int]


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(80), unique=True)
    name: Mapped[str] = mapped_column(sa.String(80))


class Coupon(Base):
    __tablename__ = "coupons"

    code: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    percent_off: Mapped[int]
    expires_at: Mapped[dt.datetime]


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customers.id"), index=True)
    created_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(sa.String(20))
    total_cents: Mapped[int]
    coupon_code: Mapped[str | None] = mapped_column(sa.String(20))
    lines: Mapped[list[OrderLine]] = relationship()


class OrderLine(Base):
    __tablename__ = "order_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(sa.ForeignKey("products.id"), index=True)
    quantity: Mapped[int]
    unit_price_cents: Mapped[int]


categories = Category.__table__
products = Product.__table__
customers = Customer.__table__
coupons = Coupon.__table__
orders = Order.__table__
order_lines = OrderLine.__table__


def make_engine(
    url: str,
    *,
    pool_size: int,
    max_overflow: int,
    pool_timeout: float,
    schema: str = DEFAULT_SCHEMA,
) -> tuple[sa.Engine, sa.Engine]:
    """Create the shop's engine; return ``(engine, bound)``.

    ``engine`` owns the pool (attach poolscope to it); ``bound`` is the same engine
    with the tables mapped into ``schema`` on PostgreSQL, so parallel runs with
    different schemas never share a table. On SQLite both are the same object.

    :param url: a SQLAlchemy URL.
    :param pool_size: connections the pool keeps.
    :param max_overflow: connections it may open beyond ``pool_size``.
    :param pool_timeout: seconds a caller waits for a connection before ``TimeoutError``.
    :param schema: the PostgreSQL schema of the shop's tables.
    """
    sa_url = sa.make_url(url)
    kwargs: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
        "poolclass": sa.pool.QueuePool,
    }
    if sa_url.get_backend_name() == "sqlite":
        # Writers wait for each other instead of failing with "database is locked".
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = sa.create_engine(sa_url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine, engine
    if engine.dialect.name == "postgresql":
        return engine, engine.execution_options(schema_translate_map={None: schema})
    return engine, engine


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_session_factory(bound: sa.Engine) -> Callable[[], Session]:
    """Return the ``sessionmaker`` the request handlers use."""
    return sessionmaker(bound, expire_on_commit=False)


def create_schema(engine: sa.Engine, bound: sa.Engine, schema: str = DEFAULT_SCHEMA) -> None:
    """Drop and re-create the shop's tables (on PostgreSQL: its whole schema)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    else:
        Base.metadata.drop_all(bound)
    Base.metadata.create_all(bound)


def drop_schema(engine: sa.Engine, bound: sa.Engine, schema: str = DEFAULT_SCHEMA) -> None:
    """Remove the shop's tables again (on PostgreSQL: its schema)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    else:
        Base.metadata.drop_all(bound)


def seed(bound: sa.Engine, rng: random.Random) -> dict[str, int]:
    """Fill the tables with a catalogue, customers, coupons and order history.

    :returns: how many rows each table got.
    """
    now = dt.datetime.now().replace(microsecond=0)
    category_rows = [{"id": i, "name": name} for i, name in enumerate(CATEGORIES, 1)]
    product_rows = []
    for category in category_rows:
        for n in range(PRODUCTS_PER_CATEGORY):
            pid = len(product_rows) + 1
            product_rows.append(
                {
                    "id": pid,
                    "sku": f"{category['name'][:3].upper()}-{n + 1:04d}",
                    "name": f"{category['name'].title()} item {n + 1}",
                    "category_id": category["id"],
                    "price_cents": rng.randrange(199, 9999),
                    "stock": rng.randrange(20, 500),
                }
            )
    customer_rows = [
        {"id": i, "email": f"customer{i}@example.com", "name": f"Customer {i}"}
        for i in range(1, CUSTOMERS + 1)
    ]
    coupon_rows = [
        {
            "code": code,
            "percent_off": rng.choice((5, 10, 15, 20)),
            "expires_at": now + dt.timedelta(days=365),
        }
        for code in VALID_COUPONS
    ] + [
        {"code": code, "percent_off": 50, "expires_at": now - dt.timedelta(days=400)}
        for code in INVALID_COUPONS[:2]
    ]
    order_rows, line_rows = [], []
    for oid in range(1, HISTORIC_ORDERS + 1):
        lines = []
        for _ in range(rng.randrange(1, 5)):
            product = rng.choice(product_rows)
            lines.append(
                {
                    "id": len(line_rows) + len(lines) + 1,
                    "order_id": oid,
                    "product_id": product["id"],
                    "quantity": rng.randrange(1, 4),
                    "unit_price_cents": product["price_cents"],
                }
            )
        line_rows.extend(lines)
        order_rows.append(
            {
                "id": oid,
                "customer_id": rng.randrange(1, CUSTOMERS + 1),
                "created_at": now - dt.timedelta(minutes=rng.randrange(1, 60 * 24 * 90)),
                "status": "paid",
                "total_cents": sum(x["quantity"] * x["unit_price_cents"] for x in lines),
                "coupon_code": None,
            }
        )
    with bound.begin() as conn:
        conn.execute(categories.insert(), category_rows)
        conn.execute(products.insert(), product_rows)
        conn.execute(customers.insert(), customer_rows)
        conn.execute(coupons.insert(), coupon_rows)
        conn.execute(orders.insert(), order_rows)
        conn.execute(order_lines.insert(), line_rows)
    if bound.dialect.name == "postgresql":
        # Explicit ids above leave the sequences behind; new orders must not collide.
        with bound.begin() as conn:
            for table in (orders, order_lines):
                name = _qualified(bound, table)
                conn.execute(
                    sa.text(
                        f"SELECT setval(pg_get_serial_sequence(:name, 'id'), "
                        f"(SELECT max(id) FROM {name}))"
                    ),
                    {"name": name},
                )
    return {
        "categories": len(category_rows),
        "products": len(product_rows),
        "customers": len(customer_rows),
        "coupons": len(coupon_rows),
        "orders": len(order_rows),
        "order_lines": len(line_rows),
    }


def _qualified(bound: sa.Engine, table: sa.Table) -> str:
    schema_map = bound.get_execution_options().get("schema_translate_map") or {}
    schema = schema_map.get(None)
    return f'"{schema}".{table.name}' if schema else table.name
