"""What every feature transform shares: the as-of cut-off, input checks, event vocabulary, column names.

As-of rule: features "as of" a date D see the events with ``event_ts < D + 1 day, 00:00 UTC`` — the
whole UTC day D and everything before it — and nothing later. That instant is the *cut-off*; ages
and decay are measured from it. A window of N days is the N whole UTC days ending with D:
``cutoff - N days <= event_ts < cutoff``. "Days since" values are differences of UTC dates
(``D - to_date(ts)``), so something that happened on D is 0 days ago.
"""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.schemas import require_columns

# Column names of the input tables written by ingest, in one place so a rename is one edit here.
EVENT_ID, EVENT_TYPE, EVENT_TS, EVENT_DATE = "event_id", "event_type", "event_ts", "event_date"
USER_ID, ITEM_ID, SESSION_ID, ORDER_ID, MESSAGE_ID = "user_id", "item_id", "session_id", "order_id", "message_id"
QUANTITY, PRICE, RATING, REVIEW_TEXT = "quantity", "price", "rating", "review_text"
TIMEZONE, SIGNUP_TS, UPDATED_AT = "timezone", "signup_ts", "updated_at"
CATEGORY, BRAND, IN_STOCK, LAUNCHED_AT = "category", "brand", "in_stock", "launched_at"

VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE = "view", "add_to_cart", "remove_from_cart", "purchase"
SEARCH, REVIEW = "search", "review"
EMAIL_DELIVERED, EMAIL_OPEN, EMAIL_CLICK = "email_delivered", "email_open", "email_click"
UNSUBSCRIBE, BOUNCE = "unsubscribe", "bounce"

# Events that weigh in the user x item confidence (and count as "interactions" for items and affinities).
INTERACTION_TYPES = (VIEW, ADD_TO_CART, PURCHASE)
EMAIL_TYPES = (EMAIL_DELIVERED, EMAIL_OPEN, EMAIL_CLICK)
# Something the user did: browsing, buying, reviewing, opening or clicking an email. Deliveries and
# bounces happen to the user, and an unsubscribe is not the engagement lifecycle stages are about.
ACTIVITY_TYPES = (VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE, SEARCH, REVIEW, EMAIL_OPEN, EMAIL_CLICK)

SECONDS_PER_DAY = 86_400


def cutoff_of(as_of: dt.date) -> dt.datetime:
    """The first instant not seen by features as of ``as_of``: the next UTC midnight."""
    return dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)


def cutoff_lit(as_of: dt.date) -> Column:
    return F.lit(cutoff_of(as_of)).cast("timestamp")


def window_start(as_of: dt.date, days: int | float) -> Column:
    """The first instant inside the window of ``days`` whole UTC days ending with ``as_of``."""
    return F.lit(cutoff_of(as_of) - dt.timedelta(days=days)).cast("timestamp")


def days_since(ts: Column, *, as_of: dt.date) -> Column:
    """Whole UTC days from ``ts`` to the as-of date (0 for something on the as-of day)."""
    return F.datediff(F.lit(as_of), F.to_date(ts))


def age_days(ts: Column, *, as_of: dt.date) -> Column:
    """Fractional days from ``ts`` to the cut-off (a double; exact for whole days)."""
    return (F.unix_seconds(cutoff_lit(as_of)) - F.unix_seconds(ts)).cast("double") / SECONDS_PER_DAY


def window_suffix(days: int) -> str:
    return f"_{days}d"


# Sums of doubles depend on the order partial sums meet in; rounding keeps re-runs bit-identical.
STABLE_DIGITS = 9


def stable(value: Column) -> Column:
    """A double rounded to :data:`STABLE_DIGITS` decimals, so two runs over the same data give the same bits."""
    return F.round(value, STABLE_DIGITS)


def count_if(condition: Column) -> Column:
    """How many rows satisfy ``condition`` (0, never null, on an empty group)."""
    return F.count(F.when(condition, F.lit(1)))


def filter_events_as_of(events: DataFrame, *, as_of: dt.date, with_user: bool = True) -> DataFrame:
    """Events visible as of ``as_of`` (before the cut-off); only those with a known user unless ``with_user=False``.

    The ``event_date`` bound lets Delta prune partitions; it is one day loose on purpose so that a
    partition date written in another convention can never hide an event the timestamp admits.
    """
    require_columns(events, [EVENT_TS, USER_ID], step="filter_events_as_of")
    scoped = events.where(F.col(EVENT_TS) < cutoff_lit(as_of))
    if with_user:
        scoped = scoped.where(F.col(USER_ID).isNotNull())
    if EVENT_DATE in events.columns:
        scoped = scoped.where(F.col(EVENT_DATE) <= F.lit(as_of + dt.timedelta(days=1)))
    return scoped


def latest_row_per_key(df: DataFrame, *, key: str, order_by: str, columns: Sequence[str]) -> DataFrame:
    """One row per ``key``: the one with the greatest ``order_by`` (then greatest values, for ties).

    Dimension tables are keyed by ingest's merge, but features join them many times and a duplicate
    key would multiply rows silently; this makes uniqueness a property of the features code itself.
    """
    require_columns(df, [key, order_by, *columns], step="latest_row_per_key")
    latest = F.max(F.struct(F.col(order_by).alias("_order"), *[F.col(c) for c in columns])).alias("_latest")
    return (
        df.where(F.col(key).isNotNull())
        .groupBy(key)
        .agg(latest)
        .select(key, *[F.col(f"_latest.{c}").alias(c) for c in columns])
    )


def sorted_ids(pairs: Column, *, limit: int) -> Column:
    """Ids from an array of ``struct(sort_key, id)``, biggest key first, ties by id, at most ``limit``.

    Sorting inside the array (not a window) keeps one user's list on one row, deterministically.
    """
    ordered = F.array_sort(pairs, lambda a, b: F.when(a["k"] > b["k"], -1).when(a["k"] < b["k"], 1)
                           .when(a["id"] < b["id"], -1).when(a["id"] > b["id"], 1).otherwise(0))
    return F.transform(F.slice(ordered, 1, limit), lambda p: p["id"])


PRODUCT_DIM_COLUMNS = [ITEM_ID, CATEGORY, BRAND, PRICE, "currency", IN_STOCK, LAUNCHED_AT]


def product_dims(products: DataFrame) -> DataFrame:
    """The product attributes features use, one row per item (its latest version)."""
    return products.transform(latest_row_per_key, key=ITEM_ID, order_by=UPDATED_AT, columns=PRODUCT_DIM_COLUMNS[1:])
