"""Importing real retailers' exports (invoice lines, clickstream) into events, users and products."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from decimal import Decimal

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from inboxlift.context import RunContext
from inboxlift.settings import ClickstreamImport, InvoiceLinesImport
from inboxlift.stages.ingest import EntityCounts, ImportMappingError, run_import
from inboxlift.stages.ingest_lease import read_lease
from inboxlift.transforms.imports import INVOICE_COLUMNS, map_clickstream, map_invoice_lines
from inboxlift.transforms.ingest import EVENTS_TABLE, PRODUCTS_TABLE, USERS_TABLE

NOW = dt.datetime(2026, 11, 20, 12, 0)

INVOICES_CSV = """\
InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,12/1/2010 8:26,2.55,17850.0,United Kingdom
536365,71053,WHITE METAL LANTERN,6,12/1/2010 8:26,3.39,17850.0,United Kingdom
536366,22633,HAND WARMER UNION JACK,6,12/1/2010 8:28,1.85,17850.0,United Kingdom
536367,84879,ASSORTED COLOUR BIRD ORNAMENT,32,12/1/2010 8:34,1.69,13047,United Kingdom
C536379,85123A,WHITE HANGING HEART T-LIGHT HOLDER,-1,12/1/2010 9:41,2.55,17850,United Kingdom
536381,22139,"RETROSPOT TEA SET, CERAMIC 11 PC",2,12/1/2010 9:41,4.95,,United Kingdom
536382,POST,POSTAGE,1,12/1/2010 9:45,18.00,12583,France
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,12/1/2010 8:26,2.55,17850.0,United Kingdom
536383,22960,JAM MAKING SET WITH JARS,-3,12/1/2010 9:49,4.25,12583,France
A563185,B,Adjust bad debt,1,8/12/2011 14:51,-11062.06,,United Kingdom
536385,21212,PACK OF 72 RETROSPOT CAKE CASES,abc,12/1/2010 9:50,0.55,12583,France
536386,21213,PACK OF 60 CAKE CASES,1,not a date,0.55,12583,France
"""

CLICKS_CSV = """\
timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,view,248676,
1433221999827,111016,addtocart,10572,
1433222276276,483717,transaction,253185,17892
1433221332117,257597,view,355908,
1433223236124,386741,wishlist,133542,
,599528,view,356475,
1433221955914,,view,462702,
"""


def invoice_id(*values: str | None) -> str:
    """The documented event id: sha-256 of the mapped values, joined by U+001F, null as U+0000."""
    text = "\x1f".join("\x00" if v is None else v for v in values)
    return "inv-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def click_id(*values: str | None) -> str:
    text = "\x1f".join("\x00" if v is None else v for v in values)
    return "cs-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).replace(tzinfo=None)


@pytest.fixture
def shop_ctx(ctx) -> RunContext:
    """The test context, for a shop that opened in 2010 (the exports are from 2010 to 2015)."""
    settings = dataclasses.replace(ctx.settings, ingest=dataclasses.replace(ctx.settings.ingest, shop_opened="2010-01-01"))
    return dataclasses.replace(ctx, settings=settings)


# ---- mappings ---------------------------------------------------------------------------------

def test_invoice_lines_map_to_purchases_returns_and_anonymous_events(spark):
    records = spark.createDataFrame([
        ("f", 0, "l0", None, "536365", "85123A", "HEART", "6", "12/1/2010 8:26", "2.55", "17850.0", "United Kingdom"),
        ("f", 1, "l1", None, "C536379", "85123A", "HEART", "-1", "12/1/2010 9:41", "2.55", "17850", "United Kingdom"),
        ("f", 2, "l2", None, "536383", "22960", "JAM", "-3", "12/1/2010 9:49", "4.25", " ", "France"),
        ("f", 3, "l3", "malformed_csv", None, None, None, None, None, None, None, None),
    ], "source_file string, pos bigint, line string, parse_error string, "
       + ", ".join(f"{c} string" for c in INVOICE_COLUMNS))
    out = map_invoice_lines(records, mapping=InvoiceLinesImport()).select(
        "pos", "event_id", "event_type", "event_ts", "user_id", "item_id", "order_id", "quantity", "price", "currency",
        "country", "description")
    expected = spark.createDataFrame([
        (0, invoice_id("536365", "85123A", "HEART", "6", "12/1/2010 8:26", "2.55", "17850.0", "United Kingdom"),
         "purchase", "12/1/2010 8:26", "17850", "85123A", "536365", "6", "2.55", "GBP", "United Kingdom", "HEART"),
        (1, invoice_id("C536379", "85123A", "HEART", "-1", "12/1/2010 9:41", "2.55", "17850", "United Kingdom"),
         "return", "12/1/2010 9:41", "17850", "85123A", "C536379", "1", "2.55", "GBP", "United Kingdom", "HEART"),
        (2, invoice_id("536383", "22960", "JAM", "-3", "12/1/2010 9:49", "4.25", None, "France"),
         "return", "12/1/2010 9:49", None, "22960", "536383", "3", "4.25", "GBP", "France", "JAM"),
        (3, None, None, None, None, None, None, None, None, None, None, None),
    ], "pos bigint, event_id string, event_type string, event_ts string, user_id string, item_id string, "
       "order_id string, quantity string, price string, currency string, country string, description string")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)


def test_clickstream_maps_event_names_from_settings(spark):
    mapping = ClickstreamImport(event_types={"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"})
    records = spark.createDataFrame([
        ("f", 0, "l0", None, "1433222276276", "483717", "Transaction", "253185", "17892"),
        ("f", 1, "l1", None, "1433223236124", "386741", "wishlist", "133542", None),
    ], "source_file string, pos bigint, line string, parse_error string, timestamp string, visitor_id string, "
       "event string, item_id string, transaction_id string")
    out = {r.pos: (r.event_type, r.user_id, r.item_id, r.order_id, r.event_ts)
           for r in map_clickstream(records, mapping=mapping).collect()}
    assert out == {0: ("purchase", "483717", "253185", "17892", "1433222276276"),
                   1: ("wishlist", "386741", "133542", None, "1433223236124")}


# ---- whole imports ----------------------------------------------------------------------------

def test_invoice_lines_import_into_events_users_and_products(shop_ctx, spark, tmp_path):
    export = tmp_path / "exports" / "online_retail.csv"
    export.parent.mkdir()
    export.write_text(INVOICES_CSV, encoding="utf-8")
    src = f"file:{export}"

    report = run_import(shop_ctx, shape="invoice_lines", path=str(export.parent), echo=lambda _: None)

    assert report.counts("invoice_lines") == EntityCounts(
        "invoice_lines", files=1, read=12, accepted=7, duplicates=1, quarantined=4,
        quarantined_by_reason={"bad_quantity": 1, "bad_timestamp": 1, "excluded_item": 1, "negative_price": 1})
    lake = shop_ctx.lake
    uk = "United Kingdom"
    expected_events = spark.createDataFrame([
        (invoice_id("536365", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", "6", "12/1/2010 8:26", "2.55", "17850.0", uk),
         "17850", "85123A", "purchase", utc("2010-12-01 08:26"), dt.date(2010, 12, 1), None, "536365", 6,
         Decimal("2.55"), "GBP", None, None, None, None, None, None, src, NOW),
        (invoice_id("536365", "71053", "WHITE METAL LANTERN", "6", "12/1/2010 8:26", "3.39", "17850.0", uk),
         "17850", "71053", "purchase", utc("2010-12-01 08:26"), dt.date(2010, 12, 1), None, "536365", 6,
         Decimal("3.39"), "GBP", None, None, None, None, None, None, src, NOW),
        (invoice_id("536366", "22633", "HAND WARMER UNION JACK", "6", "12/1/2010 8:28", "1.85", "17850.0", uk),
         "17850", "22633", "purchase", utc("2010-12-01 08:28"), dt.date(2010, 12, 1), None, "536366", 6,
         Decimal("1.85"), "GBP", None, None, None, None, None, None, src, NOW),
        (invoice_id("536367", "84879", "ASSORTED COLOUR BIRD ORNAMENT", "32", "12/1/2010 8:34", "1.69", "13047", uk),
         "13047", "84879", "purchase", utc("2010-12-01 08:34"), dt.date(2010, 12, 1), None, "536367", 32,
         Decimal("1.69"), "GBP", None, None, None, None, None, None, src, NOW),
        (invoice_id("C536379", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", "-1", "12/1/2010 9:41", "2.55", "17850", uk),
         "17850", "85123A", "return", utc("2010-12-01 09:41"), dt.date(2010, 12, 1), None, "C536379", 1,
         Decimal("2.55"), "GBP", None, None, None, None, None, None, src, NOW),
        (invoice_id("536381", "22139", "RETROSPOT TEA SET, CERAMIC 11 PC", "2", "12/1/2010 9:41", "4.95", None, uk),
         None, "22139", "purchase", utc("2010-12-01 09:41"), dt.date(2010, 12, 1), None, "536381", 2,
         Decimal("4.95"), "GBP", None, None, None, None, None, None, src, NOW),
        (invoice_id("536383", "22960", "JAM MAKING SET WITH JARS", "-3", "12/1/2010 9:49", "4.25", "12583", "France"),
         "12583", "22960", "return", utc("2010-12-01 09:49"), dt.date(2010, 12, 1), None, "536383", 3,
         Decimal("4.25"), "GBP", None, None, None, None, None, None, src, NOW),
    ], EVENTS_TABLE)
    # chispa orders rows by every column, and Spark cannot order by a map: properties apart.
    assert lake.read("events").where(F.col("properties").isNotNull()).isEmpty()
    assert_df_equality(lake.read("events").drop("properties"), expected_events.drop("properties"),
                       ignore_row_order=True, ignore_nullable=True)

    expected_users = spark.createDataFrame([
        ("17850", None, None, None, None, uk, None, utc("2010-12-01 08:26"), None, None, utc("2010-12-01 09:41"),
         src, NOW),
        ("13047", None, None, None, None, uk, None, utc("2010-12-01 08:34"), None, None, utc("2010-12-01 08:34"),
         src, NOW),
        ("12583", None, None, None, None, "France", None, utc("2010-12-01 09:49"), None, None,
         utc("2010-12-01 09:49"), src, NOW),
    ], USERS_TABLE)
    assert_df_equality(lake.read("users"), expected_users, ignore_row_order=True, ignore_nullable=True)

    def product(item, name, price, updated):
        return (item, name, None, None, None, None, None if price is None else Decimal(price),
                None if price is None else "GBP", None, None, None, None, None, utc(updated), src, NOW)

    expected_products = spark.createDataFrame([
        product("85123A", "WHITE HANGING HEART T-LIGHT HOLDER", "2.55", "2010-12-01 09:41"),
        product("71053", "WHITE METAL LANTERN", "3.39", "2010-12-01 08:26"),
        product("22633", "HAND WARMER UNION JACK", "1.85", "2010-12-01 08:28"),
        product("84879", "ASSORTED COLOUR BIRD ORNAMENT", "1.69", "2010-12-01 08:34"),
        product("22139", "RETROSPOT TEA SET, CERAMIC 11 PC", "4.95", "2010-12-01 09:41"),
        product("22960", None, None, "2010-12-01 09:49"),   # only returned here: no sale names it
    ], PRODUCTS_TABLE)
    assert_df_equality(lake.read("products"), expected_products, ignore_row_order=True, ignore_nullable=True)

    quarantined = {(r.entity, r.reason) for r in lake.read("events_quarantine").collect()}
    assert quarantined == {("invoice_lines", "excluded_item"), ("invoice_lines", "negative_price"),
                           ("invoice_lines", "bad_quantity"), ("invoice_lines", "bad_timestamp")}

    versions = {n: lake.version(n) for n in ("events", "users", "products", "events_quarantine")}
    again = run_import(shop_ctx, shape="invoice_lines", path=str(export.parent), echo=lambda _: None)
    assert again.batches == () and {n: lake.version(n) for n in versions} == versions


def test_clickstream_import_into_events_users_and_products(shop_ctx, spark, tmp_path):
    export = tmp_path / "events.csv"
    export.write_text(CLICKS_CSV, encoding="utf-8")
    src = f"file:{export}"

    report = run_import(shop_ctx, shape="clickstream", path=str(export), echo=lambda _: None)

    assert report.counts("clickstream") == EntityCounts(
        "clickstream", files=1, read=8, accepted=4, duplicates=1, quarantined=3,
        quarantined_by_reason={"missing_timestamp": 1, "missing_user_id": 1, "unknown_event_type": 1})
    assert report.counts("clickstream/users").accepted == 4
    lake = shop_ctx.lake

    def event(ms, visitor, kind, item, transaction, event_type):
        at = from_ms(ms)
        return (click_id(str(ms), visitor, kind, item, transaction), visitor, item, event_type, at, at.date(), None,
                transaction, None, None, None, None, None, None, None, None, None, src, NOW)

    expected_events = spark.createDataFrame([
        event(1433221332117, "257597", "view", "355908", None, "view"),
        event(1433224214164, "992329", "view", "248676", None, "view"),
        event(1433221999827, "111016", "addtocart", "10572", None, "add_to_cart"),
        event(1433222276276, "483717", "transaction", "253185", "17892", "purchase"),
    ], EVENTS_TABLE)
    # chispa orders rows by every column, and Spark cannot order by a map: properties apart.
    assert lake.read("events").where(F.col("properties").isNotNull()).isEmpty()
    assert_df_equality(lake.read("events").drop("properties"), expected_events.drop("properties"),
                       ignore_row_order=True, ignore_nullable=True)

    def user(visitor, ms):
        return (visitor, None, None, None, None, None, None, from_ms(ms), None, None, from_ms(ms), src, NOW)

    expected_users = spark.createDataFrame([
        user("257597", 1433221332117), user("992329", 1433224214164), user("111016", 1433221999827),
        user("483717", 1433222276276),
    ], USERS_TABLE)
    assert_df_equality(lake.read("users"), expected_users, ignore_row_order=True, ignore_nullable=True)
    products = {r.item_id: (r.name, r.price, r.updated_at) for r in lake.read("products").collect()}
    assert products == {"355908": (None, None, from_ms(1433221332117)), "248676": (None, None, from_ms(1433224214164)),
                        "10572": (None, None, from_ms(1433221999827)), "253185": (None, None, from_ms(1433222276276))}


def test_an_export_lacking_a_mapped_column_is_refused_before_anything_is_written(shop_ctx, tmp_path):
    export = tmp_path / "events.csv"
    export.write_text("ts,visitorid,event,itemid,transactionid\n1433221332117,1,view,2,\n", encoding="utf-8")
    with pytest.raises(ImportMappingError, match=r"timestamp -> 'timestamp'.*it has \['ts'"):
        run_import(shop_ctx, shape="clickstream", path=str(export), echo=lambda _: None)
    # Only the lease was taken (and given back): no data, no plan.
    assert shop_ctx.lake.table_names() == ["ingest_lease"]
    assert read_lease(shop_ctx).released_at is not None
    with pytest.raises(ValueError, match="unknown export shape"):
        run_import(shop_ctx, shape="orders", path=str(export), echo=lambda _: None)
