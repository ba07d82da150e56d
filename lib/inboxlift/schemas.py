"""Declared schemas: the landing-file contract between `generate` (or a shop's export) and `ingest`.

Landing layout, under ``paths.landing_dir``:

- ``users/*.csv[.gz]`` — one user per line, header row, columns ``USERS_LANDING``;
- ``products/*.csv[.gz]`` — header row, columns ``PRODUCTS_LANDING``;
- ``events/*.jsonl[.gz]`` — one JSON object per line, keys ``EVENTS_LANDING``; ``properties`` is a
  JSON object of event-specific values (the tracking service's variant, link position, scope...),
  read as ``map<string,string>``.

``unsubscribe``, ``resubscribe``, ``bounce`` and ``complaint`` events keep the ``suppressions``
table (:mod:`inboxlift.consent`); ``campaign_type`` names the scope of an unsubscribe or
resubscribe (a campaign type; absent or ``all``: every campaign).

Everything in landing files is text as a shop would export it: timestamps are
ISO-8601 (``2026-11-20T08:15:00Z``), money is a decimal string or number,
booleans are ``true``/``false``. Ingest validates and types it; ``generate``
plants dirty records of every kind in these same files.
"""

from __future__ import annotations

from typing import Iterable

from pyspark.sql import DataFrame
from pyspark.sql.types import StringType, StructField, StructType

# Event types only the tracking service (``inboxlift serve``) writes: choices on its preferences page.
SERVICE_ONLY_EVENT_TYPES = ("resubscribe", "preference_change")
EVENT_TYPES = (
    "view", "add_to_cart", "remove_from_cart", "purchase", "search", "review",
    "email_delivered", "email_open", "email_click", "unsubscribe", "bounce",
    # From a feedback loop (a complaint report, import-bounces) and the tracking service.
    "complaint", *SERVICE_ONLY_EVENT_TYPES,
)


def _text(*names: str) -> StructType:
    return StructType([StructField(n, StringType(), True) for n in names])


USERS_LANDING = _text(
    "user_id", "email", "first_name", "locale", "timezone", "country", "birthday",
    "signup_ts", "email_consent", "consent_ts", "updated_at",
)

PRODUCTS_LANDING = _text(
    "item_id", "name", "description", "category_path", "brand", "price", "currency",
    "image_url", "url", "stock", "launched_at", "updated_at",
)

EVENTS_LANDING = _text(
    "event_id", "event_type", "event_ts", "user_id", "item_id", "session_id",
    "order_id", "quantity", "price", "currency", "query", "rating", "review_text",
    "campaign_id", "message_id", "campaign_type", "properties",
)


def require_columns(df: DataFrame, columns: Iterable[str], *, step: str) -> None:
    """Raise ``ValueError`` naming the missing columns and the ones that are there."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{step}: input lacks columns {missing}; it has {sorted(df.columns)}")
