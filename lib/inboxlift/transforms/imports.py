"""Real retailers' exports -> landing-shaped records, and the users and products they imply.

Two shapes are supported, their column names taken from settings
(``ingest.imports``), so another retailer's export needs a settings change, not
code:

- **invoice lines** (one row per line of an invoice, as in the UCI "Online
  Retail" data): a line is a ``purchase``, or a ``return`` when its invoice
  number starts with the cancellation prefix or its quantity is negative (the
  quantity is then stored as a positive number of units returned). A line
  without a customer id is an anonymous event (``user_id`` null), not an error.
  Lines for charges and adjustments (postage, bank charges...) are quarantined
  as ``excluded_item``.
- **clickstream** (one row per visitor event, as in the RetailRocket data):
  epoch-millisecond timestamps, the export's event names mapped to ours,
  transaction ids as order ids.

Exports carry no event ids: an event's id is a hash of the export's own
values, so importing an overlapping export again finds the same events as
duplicates. The mapped records then go through the same validation as landing
files (:mod:`inboxlift.transforms.ingest`).
"""

from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.schemas import EVENTS_LANDING
from inboxlift.settings import ClickstreamImport, InvoiceLinesImport
from inboxlift.transforms.fields import strip_unsafe_text
from inboxlift.transforms.ingest import (
    PRODUCT_FIELDS,
    RECORD_COLUMNS,
    USER_FIELDS,
    clean_text,
    require_columns,
)

# Event types that only imports produce; landing files use schemas.EVENT_TYPES.
IMPORT_EVENT_TYPES = ("return",)

INVOICE_COLUMNS = ("invoice", "stock_code", "description", "quantity", "invoice_date", "unit_price",
                   "customer_id", "country")
CLICKSTREAM_COLUMNS = ("timestamp", "visitor_id", "event", "item_id", "transaction_id")

# A separator that cannot occur in CSV text, so hashed fields cannot run into each other.
_UNIT_SEPARATOR = "\u001f"


def export_columns(mapping: InvoiceLinesImport | ClickstreamImport) -> dict[str, str]:
    """Our name for each mapped column -> the export's header name."""
    names = INVOICE_COLUMNS if isinstance(mapping, InvoiceLinesImport) else CLICKSTREAM_COLUMNS
    return {name: getattr(mapping, name) for name in names}


def _hash_id(prefix: str, values: Sequence[Column]) -> Column:
    """A stable event id from an export's values (null stands apart from the empty string)."""
    joined = F.concat_ws(_UNIT_SEPARATOR, *[F.coalesce(v, F.lit("\u0000")) for v in values])
    return F.concat(F.lit(prefix), F.substring(F.sha2(joined, 256), 1, 32))


def _landing_event(**values: Column) -> list[Column]:
    """All EVENTS_LANDING columns, the given ones set and the rest null."""
    return [values.get(f.name, F.lit(None).cast("string")).alias(f.name) for f in EVENTS_LANDING.fields]


def map_invoice_lines(records: DataFrame, *, mapping: InvoiceLinesImport) -> DataFrame:
    """Parsed invoice lines (text, our column names) -> landing-shaped events plus ``country``, ``description``.

    Returns ``source_file, pos, line, parse_error``, the EVENTS_LANDING columns, ``country``, ``description``.
    """
    require_columns(records, [*RECORD_COLUMNS, *INVOICE_COLUMNS], step="map_invoice_lines")
    value = {c: clean_text(F.col(c)) for c in INVOICE_COLUMNS}
    is_cancellation = (F.upper(value["invoice"]).startswith(mapping.cancel_prefix.upper())
                       | value["quantity"].startswith("-"))
    # Spreadsheet round-trips turn customer 17850 into "17850.0".
    customer = F.regexp_replace(value["customer_id"], r"^(\d+)\.0+$", "$1")
    parsed = F.col("parse_error").isNull()
    return records.select(
        *RECORD_COLUMNS,
        *_landing_event(
            event_id=F.when(parsed, _hash_id("inv-", [value[c] for c in INVOICE_COLUMNS])),
            event_type=F.when(parsed, F.when(is_cancellation, F.lit("return")).otherwise(F.lit("purchase"))),
            event_ts=value["invoice_date"],
            user_id=customer,
            item_id=value["stock_code"],
            order_id=value["invoice"],
            quantity=F.regexp_replace(value["quantity"], r"^-", ""),
            price=value["unit_price"],
            currency=F.when(parsed, F.lit(mapping.currency)),
        ),
        value["country"].alias("country"),
        # The description becomes the product's name, which reaches subjects: no control or bidi characters.
        clean_text(strip_unsafe_text(F.col("description"))).alias("description"),
    )


def map_clickstream(records: DataFrame, *, mapping: ClickstreamImport) -> DataFrame:
    """Parsed clickstream rows (text, our column names) -> landing-shaped events.

    An export event name missing from ``mapping.event_types`` is kept as written, so validation
    quarantines it as ``unknown_event_type``.
    """
    require_columns(records, [*RECORD_COLUMNS, *CLICKSTREAM_COLUMNS], step="map_clickstream")
    value = {c: clean_text(F.col(c)) for c in CLICKSTREAM_COLUMNS}
    names = F.create_map(*[F.lit(x) for pair in sorted(mapping.event_types.items()) for x in pair]) \
        if mapping.event_types else F.create_map().cast("map<string,string>")
    export_event = F.lower(value["event"])
    parsed = F.col("parse_error").isNull()
    return records.select(
        *RECORD_COLUMNS,
        *_landing_event(
            event_id=F.when(parsed, _hash_id("cs-", [value[c] for c in CLICKSTREAM_COLUMNS])),
            event_type=F.coalesce(F.try_element_at(names, export_event), export_event),
            event_ts=value["timestamp"],
            user_id=value["visitor_id"],
            item_id=value["item_id"],
            order_id=value["transaction_id"],
        ),
    )


def _valid(events: DataFrame) -> DataFrame:
    return events.where(F.size(F.col("reasons")) == 0)


def _user_records(users: DataFrame) -> DataFrame:
    """Derived users in the shape validate_users returns (no reasons, no raw line)."""
    return users.select(
        "source_file", "pos", F.lit(None).cast("string").alias("line"),
        *[(F.col(f.name) if f.name in users.columns else F.lit(None)).cast(f.dataType).alias(f.name)
          for f in USER_FIELDS.fields],
        F.array().cast("array<string>").alias("reasons"),
        F.xxhash64(*[F.col(c) for c in users.columns if c in USER_FIELDS.fieldNames()]).alias("payload_hash"),
    )


def _product_records(products: DataFrame) -> DataFrame:
    """Derived products in the shape validate_products returns (no reasons, no raw line)."""
    return products.select(
        "source_file", "pos", F.lit(None).cast("string").alias("line"),
        *[(F.col(f.name) if f.name in products.columns else F.lit(None)).cast(f.dataType).alias(f.name)
          for f in PRODUCT_FIELDS.fields],
        F.array().cast("array<string>").alias("reasons"),
        F.xxhash64(*[F.col(c) for c in products.columns if c in PRODUCT_FIELDS.fieldNames()]).alias("payload_hash"),
    )


def derive_users(events: DataFrame, *, with_country: bool = False) -> DataFrame:
    """The users that valid export events imply: first seen as ``signup_ts``, last seen as ``updated_at``.

    E-mail and consent are unknown (null), so merging never grants consent and never erases an
    address a shop already has. With ``with_country``, the country of the user's latest line.
    """
    require_columns(events, ("user_id", "event_ts", "source_file", "pos", "reasons"), step="derive_users")
    order = F.struct("event_ts", "source_file", "pos")
    extra = [F.max_by("country", F.when(F.col("country").isNotNull(), order)).alias("country")] if with_country else []
    users = _valid(events).where(F.col("user_id").isNotNull()).groupBy("user_id").agg(
        *extra,
        F.min("event_ts").alias("signup_ts"),
        F.max("event_ts").alias("updated_at"),
        F.max_by(F.struct("source_file", "pos"), order).alias("_last"),
    )
    return _user_records(users.select("*", "_last.source_file", "_last.pos").drop("_last"))


def derive_products(events: DataFrame, *, sale_types: Sequence[str] = ("purchase",),
                    with_details: bool = False) -> DataFrame:
    """The products that valid export events imply.

    With ``with_details`` (invoice lines): the name is the latest description and the price the
    latest unit price of a sale line with a price above zero (free lines and adjustments carry
    placeholders like "?" or "damaged").
    """
    require_columns(events, ("item_id", "event_type", "event_ts", "price", "currency", "source_file", "pos",
                             "reasons"), step="derive_products")
    order = F.struct("event_ts", "source_file", "pos")
    is_priced_sale = F.col("event_type").isin(*sale_types) & (F.col("price") > 0)
    details = [
        F.max_by("description", F.when(is_priced_sale & F.col("description").isNotNull(), order)).alias("name"),
        F.max_by(F.struct("price", "currency"), F.when(is_priced_sale, order)).alias("_money"),
    ] if with_details else []
    products = _valid(events).where(F.col("item_id").isNotNull()).groupBy("item_id").agg(
        *details,
        F.max("event_ts").alias("updated_at"),
        F.max_by(F.struct("source_file", "pos"), order).alias("_last"),
    )
    columns = ["item_id", "updated_at", F.col("_last.source_file").alias("source_file"), F.col("_last.pos").alias("pos")]
    if with_details:
        columns += ["name", F.col("_money.price").alias("price"), F.col("_money.currency").alias("currency")]
    return _product_records(products.select(*columns))
