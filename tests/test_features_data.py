"""Hand-written input rows for the feature tests: the events / users / products tables as ingest writes them.

Everything is pinned to the as-of date 2026-11-20, whose cut-off is 2026-11-21T00:00Z. ``at(days, hours)``
builds an instant relative to that cut-off, so "exactly 30 days before the cut-off" reads as ``at(-30)``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import (
    BooleanType, DateType, DecimalType, IntegerType, StringType, StructField, StructType, TimestampType,
)

from inboxlift.settings import FeatureSettings

AS_OF = dt.date(2026, 11, 20)
CUTOFF = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)

EVENTS_SCHEMA = StructType([
    StructField("event_id", StringType()), StructField("event_type", StringType()),
    StructField("event_ts", TimestampType()), StructField("user_id", StringType()),
    StructField("item_id", StringType()), StructField("session_id", StringType()),
    StructField("order_id", StringType()), StructField("quantity", IntegerType()),
    StructField("price", DecimalType(12, 2)), StructField("currency", StringType()),
    StructField("query", StringType()), StructField("rating", IntegerType()),
    StructField("review_text", StringType()), StructField("campaign_id", StringType()),
    StructField("message_id", StringType()), StructField("source_file", StringType()),
    StructField("ingested_at", TimestampType()), StructField("event_date", DateType()),
])
USERS_SCHEMA = StructType([
    StructField("user_id", StringType()), StructField("email", StringType()),
    StructField("first_name", StringType()), StructField("locale", StringType()),
    StructField("timezone", StringType()), StructField("country", StringType()),
    StructField("birthday", DateType()), StructField("signup_ts", TimestampType()),
    StructField("email_consent", BooleanType()), StructField("consent_ts", TimestampType()),
    StructField("updated_at", TimestampType()),
])
PRODUCTS_SCHEMA = StructType([
    StructField("item_id", StringType()), StructField("name", StringType()),
    StructField("description", StringType()), StructField("category_path", StringType()),
    StructField("category", StringType()), StructField("brand", StringType()),
    StructField("price", DecimalType(12, 2)), StructField("currency", StringType()),
    StructField("image_url", StringType()), StructField("url", StringType()),
    StructField("stock", IntegerType()), StructField("in_stock", BooleanType()),
    StructField("launched_at", DateType()), StructField("updated_at", TimestampType()),
])


def at(days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0) -> dt.datetime:
    """An instant relative to the cut-off (negative = before it)."""
    return CUTOFF + dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def utc(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.timezone.utc)


_counter = iter(range(1, 10**9))


def ev(event_type: str, user_id: str | None, ts: dt.datetime, *, item: str | None = None,
       session: str | None = None, order: str | None = None, quantity: int | None = None,
       price: str | None = None, rating: int | None = None, text: str | None = None,
       message: str | None = None, event_id: str | None = None) -> tuple:
    """One events row; unspecified columns are null, ``event_date`` is the UTC date of ``ts``."""
    eid = event_id or f"e{next(_counter):06d}"
    return (eid, event_type, ts, user_id, item, session, order, quantity,
            Decimal(price) if price is not None else None, "EUR" if price is not None else None,
            None, rating, text, None, message, "test.jsonl", ts, ts.astimezone(dt.timezone.utc).date())


def events(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    return spark.createDataFrame(rows, EVENTS_SCHEMA)


def user(user_id: str, *, timezone: str | None = "UTC", signup: dt.datetime | None = None,
         updated: dt.datetime | None = None) -> tuple:
    signup = signup or utc("2025-01-01T00:00:00")
    return (user_id, f"{user_id}@example.com", "Name", "en-GB", timezone, "GB", None, signup, True, signup,
            updated or signup)


def users(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    return spark.createDataFrame(rows, USERS_SCHEMA)


def product(item_id: str, *, category: str | None = "Sports", brand: str | None = "Acme", price: str | None = "10.00",
            in_stock: bool | None = True, launched: dt.date | None = dt.date(2025, 1, 1),
            updated: dt.datetime | None = None) -> tuple:
    return (item_id, f"Item {item_id}", "desc", f"{category} > X" if category else None, category, brand,
            Decimal(price) if price is not None else None, "EUR", "http://img", "http://url", 5, in_stock, launched,
            updated or utc("2025-01-01T00:00:00"))


def products(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    return spark.createDataFrame(rows, PRODUCTS_SCHEMA)


def settings(**changes) -> FeatureSettings:
    return dataclasses.replace(FeatureSettings(), **changes)


def no_reviews(spark: SparkSession) -> DataFrame:
    from inboxlift.transforms.features import REVIEW_SCORE_SCHEMA

    return spark.createDataFrame([], REVIEW_SCORE_SCHEMA)


def activity_events() -> list[tuple]:
    """u1 browses, buys twice and reads email; u2 only gets email, bounces and unsubscribes; u3 views once.

    Worked out by hand in test_features_activity.py (and reused by the user-features tests).
    """
    return [
        ev("view", "u1", at(-1), item="i1", session="s1"),
        ev("add_to_cart", "u1", at(-1, hours=1), item="i1", session="s1"),
        ev("search", "u1", at(-1, hours=2), session="s1"),
        ev("view", "u1", at(-10), item="i2", session="s2"),
        # order o1: two lines in a session where the user only bought
        ev("purchase", "u1", at(-40), item="i1", session="s3", order="o1", quantity=2, price="10.00"),
        ev("purchase", "u1", at(-40, minutes=1), item="i2", session="s3", order="o1", price="5.00"),
        ev("view", "u1", at(-100, hours=-1), item="i1", session="s4"),
        ev("purchase", "u1", at(-100), item="i1", session="s4", order="o2", quantity=1, price="100.00"),
        ev("email_delivered", "u1", at(-20), message="m1"),
        ev("email_open", "u1", at(-19), message="m1"),
        ev("email_open", "u1", at(-18), message="m1"),
        ev("email_click", "u1", at(-18, hours=1), message="m1"),
        ev("email_delivered", "u1", at(-5), message="m2"),
        # opened, but its delivery event is missing
        ev("email_open", "u1", at(-2), message="m3"),
        ev("email_delivered", "u1", at(-200), message="m4"),
        ev("review", "u1", at(-30), item="i1", rating=5, text="great"),
        # at the cut-off and later: not seen as of the 20th
        ev("purchase", "u1", at(0), item="i1", session="s9", order="o9", quantity=1, price="50.00"),
        ev("view", "u1", at(2), item="i1", session="s9"),
        ev("email_delivered", "u2", at(-3), message="m5"),
        ev("bounce", "u2", at(-3, hours=1)),
        ev("unsubscribe", "u2", at(-2)),
        ev("view", "u3", at(-2)),
        ev(None, "u3", at(-1)),
        ev("view", None, at(-1), item="i1", session="s1"),
    ]
