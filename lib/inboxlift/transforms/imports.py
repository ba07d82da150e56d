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
- **customers** and **catalogue**: one row per customer or product, mapped
  column by column onto the landing files' ``users`` and ``products`` fields
  (a field the export lacks is unknown, not an error).

Stock codes are upper-cased (``ingest.imports.item_id_case``): ``85123a`` and
``85123A`` are one product; each code as written is kept in ``item_aliases``.

Exports carry no event ids: an event's id is a hash of the export's own
values, so importing an overlapping export again finds the same events as
duplicates. The mapped records then go through the same validation as landing
files (:mod:`inboxlift.transforms.ingest`).
"""

from __future__ import annotations

from typing import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.schemas import EVENTS_LANDING, PRODUCTS_LANDING, USERS_LANDING
from inboxlift.settings import CatalogueImport, ClickstreamImport, CustomersImport, InvoiceLinesImport
from inboxlift.transforms.fields import strip_unsafe_text
from inboxlift.transforms.ingest import (
    PRODUCT_FIELDS,
    RECORD_COLUMNS,
    USER_FIELDS,
    clean_text,
)
from inboxlift.schemas import require_columns

# Event types that only imports produce; landing files use schemas.EVENT_TYPES.
IMPORT_EVENT_TYPES = ("return",)

INVOICE_COLUMNS = ("invoice", "stock_code", "description", "quantity", "invoice_date", "unit_price",
                   "customer_id", "country")
CLICKSTREAM_COLUMNS = ("timestamp", "visitor_id", "event", "item_id", "transaction_id")

CUSTOMER_COLUMNS = tuple(USERS_LANDING.fieldNames())
CATALOGUE_COLUMNS = tuple(PRODUCTS_LANDING.fieldNames())
# The column of each shape holding a stock code (normalised by item_id_case).
ITEM_COLUMNS = {"invoice_lines": "stock_code", "clickstream": "item_id", "catalogue": "item_id"}
ALIASES_TABLE = "item_aliases"

# A separator that cannot occur in CSV text, so hashed fields cannot run into each other.
_UNIT_SEPARATOR = "\u001f"

Mapping = InvoiceLinesImport | ClickstreamImport | CustomersImport | CatalogueImport


def export_columns(mapping: Mapping) -> dict[str, str]:
    """Our name for each mapped column -> the export's header name (columns mapped to "" left out)."""
    if isinstance(mapping, InvoiceLinesImport):
        names = INVOICE_COLUMNS
    elif isinstance(mapping, ClickstreamImport):
        names = CLICKSTREAM_COLUMNS
    elif isinstance(mapping, CustomersImport):
        names = CUSTOMER_COLUMNS
    else:
        names = CATALOGUE_COLUMNS
    return {name: getattr(mapping, name) for name in names if getattr(mapping, name, "")}


def normalise_item_id(code: Column, *, case: str) -> Column:
    """A stock code as stored: upper-cased unless ``case`` is ``keep``."""
    return F.upper(code) if case == "upper" else code


def customer_id(text: Column) -> Column:
    """A customer number as stored: spreadsheet round-trips turn customer 17850 into "17850.0"."""
    return F.regexp_replace(text, r"^(\d+)\.0+$", "$1")


def _hash_id(prefix: str, values: Sequence[Column]) -> Column:
    """A stable event id from an export's values (null stands apart from the empty string)."""
    joined = F.concat_ws(_UNIT_SEPARATOR, *[F.coalesce(v, F.lit("\u0000")) for v in values])
    return F.concat(F.lit(prefix), F.substring(F.sha2(joined, 256), 1, 32))


def _landing_event(**values: Column) -> list[Column]:
    """All EVENTS_LANDING columns, the given ones set and the rest null."""
    return [values.get(f.name, F.lit(None).cast("string")).alias(f.name) for f in EVENTS_LANDING.fields]


def map_invoice_lines(records: DataFrame, *, mapping: InvoiceLinesImport, item_case: str = "upper") -> DataFrame:
    """Parsed invoice lines (text, our column names) -> landing-shaped events plus ``country``, ``description``.

    Returns ``source_file, pos, line, parse_error``, the EVENTS_LANDING columns, ``country``,
    ``description``, ``item_alias`` (the stock code as written).
    """
    require_columns(records, [*RECORD_COLUMNS, *INVOICE_COLUMNS], step="map_invoice_lines")
    value = {c: clean_text(F.col(c)) for c in INVOICE_COLUMNS}
    is_cancellation = (F.upper(value["invoice"]).startswith(mapping.cancel_prefix.upper())
                       | value["quantity"].startswith("-"))
    customer = customer_id(value["customer_id"])
    parsed = F.col("parse_error").isNull()
    return records.select(
        *RECORD_COLUMNS,
        *_landing_event(
            event_id=F.when(parsed, _hash_id("inv-", [value[c] for c in INVOICE_COLUMNS])),
            event_type=F.when(parsed, F.when(is_cancellation, F.lit("return")).otherwise(F.lit("purchase"))),
            event_ts=value["invoice_date"],
            user_id=customer,
            item_id=normalise_item_id(value["stock_code"], case=item_case),
            order_id=value["invoice"],
            quantity=F.regexp_replace(value["quantity"], r"^-", ""),
            price=value["unit_price"],
            currency=F.when(parsed, F.lit(mapping.currency)),
        ),
        value["country"].alias("country"),
        # The description becomes the product's name, which reaches subjects: no control or bidi characters.
        clean_text(strip_unsafe_text(F.col("description"))).alias("description"),
        value["stock_code"].alias("item_alias"),
    )


def _landing_record(fields: Sequence[str], records: DataFrame, **values: Column) -> list[Column]:
    """Each landing field: the given value, else the mapped column, else null (the export lacks it)."""
    def of(name: str) -> Column:
        if name in values:
            return values[name]
        return F.col(name) if name in records.columns else F.lit(None).cast("string")
    return [of(name).alias(name) for name in fields]


def map_customers(records: DataFrame, *, mapping: CustomersImport) -> DataFrame:
    """Parsed customer rows (text, our field names for the mapped columns) -> landing-shaped user records."""
    require_columns(records, [*RECORD_COLUMNS, "user_id"], step="map_customers")
    value = clean_text(F.col("user_id"))
    return records.select(*RECORD_COLUMNS, *_landing_record(CUSTOMER_COLUMNS, records, user_id=customer_id(value)))


def map_catalogue(records: DataFrame, *, mapping: CatalogueImport, item_case: str = "upper") -> DataFrame:
    """Parsed catalogue rows -> landing-shaped product records plus ``item_alias`` (the code as written).

    A catalogue without a currency column is priced in ``mapping.default_currency``.
    """
    require_columns(records, [*RECORD_COLUMNS, "item_id"], step="map_catalogue")
    code = clean_text(F.col("item_id"))
    currency = F.col("currency") if "currency" in records.columns else F.lit(mapping.default_currency)
    parsed = F.col("parse_error").isNull()
    return records.select(
        *RECORD_COLUMNS,
        *_landing_record(CATALOGUE_COLUMNS, records, item_id=normalise_item_id(code, case=item_case),
                         currency=F.when(parsed, currency)),
        code.alias("item_alias"),
    )


def item_aliases(records: DataFrame, *, shape: str, seen_at: Column) -> DataFrame:
    """``alias, item_id, shape, first_seen_at``: each stock code as written that differs from the stored id.

    Only valid records count (an alias of a quarantined line names nothing stored).
    """
    require_columns(records, ("item_id", "item_alias", "reasons"), step="item_aliases")
    return (_valid(records).where(F.col("item_alias").isNotNull() & (F.col("item_alias") != F.col("item_id")))
            .groupBy(F.col("item_alias").alias("alias")).agg(F.min("item_id").alias("item_id"))
            .select("alias", "item_id", F.lit(shape).alias("shape"), seen_at.cast("timestamp").alias("first_seen_at")))


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
                    with_details: bool = False, price_window_days: int = 90) -> DataFrame:
    """The products that valid export events imply.

    With ``with_details`` (invoice lines): the name is the latest description, and the price the
    **median** unit price of the item's customer sale lines (a customer id, a price above zero)
    over the ``price_window_days`` days ending with its latest such line. Not the latest line:
    one odd line (a wholesale price, a line keyed in by hand) would price the item; and not the
    anonymous lines, which some shops price differently (till sales, marketplaces). An item sold
    only anonymously takes the median of those lines. Free lines and adjustments carry
    placeholders like "?" or "damaged" and are left out.
    """
    require_columns(events, ("item_id", "user_id", "event_type", "event_ts", "price", "currency", "source_file",
                             "pos", "reasons"), step="derive_products")
    order = F.struct("event_ts", "source_file", "pos")
    valid = _valid(events).where(F.col("item_id").isNotNull())
    is_priced_sale = F.col("event_type").isin(*sale_types) & (F.col("price") > 0)
    details = [
        F.max_by("description", F.when(is_priced_sale & F.col("description").isNotNull(), order)).alias("name"),
    ] if with_details else []
    products = valid.groupBy("item_id").agg(
        *details,
        F.max("event_ts").alias("updated_at"),
        F.max_by(F.struct("source_file", "pos"), order).alias("_last"),
    )
    columns = ["item_id", "updated_at", F.col("_last.source_file").alias("source_file"), F.col("_last.pos").alias("pos")]
    if with_details:
        columns += ["name", "price", "currency"]
        products = products.join(
            median_prices(valid.where(is_priced_sale), window_days=price_window_days), on="item_id", how="left")
    return _product_records(products.select(*columns))


def median_prices(sales: DataFrame, *, window_days: int) -> DataFrame:
    """``item_id, price, currency``: the median unit price of each item's recent sale lines (one row per item).

    Customer lines when the item has any, else anonymous ones; "recent": the ``window_days`` days
    ending with the latest line of that kind. The currency is the latest line's.
    """
    require_columns(sales, ("item_id", "user_id", "event_ts", "price", "currency"), step="median_prices")
    lines = sales.withColumn("_is_customer", F.col("user_id").isNotNull())
    # Per item: whether customer lines exist, and the latest line of the kind that counts.
    latest = lines.groupBy("item_id").agg(
        F.max("_is_customer").alias("_use_customer"),
        F.max_by("event_ts", F.struct("_is_customer", "event_ts")).alias("_latest"),
    )
    counted = (lines.join(latest, on="item_id", how="inner")
               .where((F.col("_is_customer") == F.col("_use_customer"))
                      & (F.col("event_ts") > F.col("_latest") - F.make_dt_interval(F.lit(window_days)))))
    return counted.groupBy("item_id").agg(
        F.median("price").cast("decimal(12,2)").alias("price"),
        F.max_by("currency", "event_ts").alias("currency"),
    )
