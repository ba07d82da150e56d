"""The ingest stage end to end on hand-written landing files: tables, counts, re-runs, a crash and its redo."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import json
from decimal import Decimal
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from conftest import settings_in
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.stages.ingest import (
    EntityCounts,
    IngestInterrupted,
    run_ingest,
)
from inboxlift.storage import Lake
from inboxlift.transforms.ingest import EVENTS_TABLE, PRODUCTS_TABLE, USERS_TABLE

CLOCK = FixedClock.at("2026-11-20T12:00:00")
NOW = dt.datetime(2026, 11, 20, 12, 0)
DATA_TABLES = ("events", "users", "products", "events_quarantine", "users_quarantine", "products_quarantine")

USERS_CSV = """\
user_id,email,first_name,locale,timezone,country,birthday,signup_ts,email_consent,consent_ts,updated_at
u1, Ann@Example.COM ,Ann,en-GB,Europe/London,gb,1990-04-17,2024-01-05T10:00:00Z,true,2024-01-05T10:00:00Z,2024-01-05T10:00:00Z
u2,bob@example.com,Bob,en-US,America/New_York,US,,2024-02-01T09:00:00Z,true,2024-02-01T09:00:00Z,2024-02-01T09:00:00Z
u2,bob@example.com,Bob,en-US,America/New_York,US,,2024-02-01T09:00:00Z,false,2024-06-01T09:00:00Z,2024-06-01T09:00:00Z
u3,not-an-email,Cy,de-DE,Europe/Berlin,DE,,2024-03-01T00:00:00Z,true,,2024-03-01T00:00:00Z
,nobody@example.com,No,,,,,,false,,2024-03-01T00:00:00Z
"""
PRODUCTS_CSV = """\
item_id,name,description,category_path,brand,price,currency,image_url,url,stock,launched_at,updated_at
i1,Frying Pan,"Cast iron, 28 cm",Home > Kitchen > Cookware,Acme,59.90,eur,https://img.example/i1.png,https://shop.example/i1,12,2024-01-01T00:00:00Z,2024-01-01T00:00:00Z
i2,Yoga Mat,,Sports > Yoga > Mats,Zen,35,EUR,,,0,2024-02-01,2024-02-01T00:00:00Z
i3,Mystery,,Home,Acme,abc,EUR,,,1,,2024-01-01T00:00:00Z
"""


def view(event_id: str, **extra) -> dict:
    return {"event_id": event_id, "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", "user_id": "u1",
            "item_id": "i1", **extra}


EVENTS_DAY1 = [
    json.dumps(view("e1", event_type=" View ", session_id="s1")),
    json.dumps({"event_id": "e2", "event_type": "purchase", "event_ts": "2026-11-19T11:00:00+01:00", "user_id": "u1",
                "item_id": "i1", "order_id": "o1", "quantity": "2", "price": 59.9, "currency": "eur",
                "session_id": "s1"}),
    json.dumps(view("e1", event_type=" View ", session_id="s1")),                     # duplicate
    json.dumps({"event_id": "e3", "event_type": "email_open", "event_ts": "2026-11-19T12:00:00Z", "user_id": "u2",
                "campaign_id": "c1", "message_id": "m1"}),                          # no item: fine
    json.dumps(view("e4", user_id="u9")),                                            # unknown_user
    json.dumps(view("e5", item_id="i9")),                                            # unknown_item
    json.dumps(view("e6", event_type="teleport")),                                   # unknown_event_type
    json.dumps(view("e7", event_ts="2031-01-01T00:00:00Z")),                         # future_timestamp
    json.dumps(view("e8", event_ts="2019-06-01T00:00:00Z")),                         # before_shop_opened
    json.dumps(view("e9", event_type="purchase", price="-5")),                       # negative_price
    json.dumps(view("e10", event_type="add_to_cart", quantity="abc")),               # bad_quantity
    json.dumps(view("e11", event_type="review", rating="9")),                        # bad_rating
    json.dumps({k: v for k, v in view("x").items() if k != "event_id"}),             # missing_event_id
    "not json at all",                                                               # malformed_json
    json.dumps(view("e12", event_type="review", rating="5", review_text="y" * 60)),  # string_too_long (> 50)
    None,                                                                            # invalid_utf8, below
    json.dumps(view("e14", user_id="u3")),                                           # unknown_user (u3 rejected)
]
INVALID_UTF8 = b'{"event_id": "e13", "event_type": "view", "event_ts": "2026-11-19T10:00:00Z", "user_id": "u\xff1", ' \
               b'"item_id": "i1"}'
EVENTS_DAY2 = [
    json.dumps({"event_id": "e2", "event_type": "purchase", "event_ts": "2026-11-19T11:00:00+01:00", "user_id": "u1",
                "item_id": "i1", "order_id": "o1", "quantity": "3", "price": 59.9, "currency": "eur",
                "session_id": "s1"}),                                               # duplicate, other payload
    json.dumps({"event_id": "e15", "event_type": "add_to_cart", "event_ts": "2026-11-20T08:00:00Z", "user_id": "u2",
                "item_id": "i2"}),
    "",                                                                              # blank_line
]


def write_first_delivery(landing: Path) -> dict[str, str]:
    """The landing files of the first delivery; returns each file's URI as Spark names it."""
    files = {
        "users": landing / "users" / "users-2026-11-19.csv",
        "products": landing / "products" / "products-2026-11-19.csv",
        "day1": landing / "events" / "2026-11-19" / "part-1.jsonl",
        "day2": landing / "events" / "2026-11-20" / "part-2.jsonl.gz",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    files["users"].write_text(USERS_CSV, encoding="utf-8")
    files["products"].write_text(PRODUCTS_CSV, encoding="utf-8")
    files["day1"].write_bytes(b"\n".join(INVALID_UTF8 if line is None else line.encode() for line in EVENTS_DAY1) + b"\n")
    files["day2"].write_bytes(gzip.compress(("\n".join(EVENTS_DAY2) + "\n").encode()))
    return {name: f"file:{path}" for name, path in files.items()}


def make_ctx(spark, spark_info, base_settings, folder: Path, **ingest) -> RunContext:
    settings = settings_in(base_settings, folder)
    settings = dataclasses.replace(settings, ingest=dataclasses.replace(settings.ingest, max_string_length=50, **ingest))
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    return RunContext(spark=spark, settings=settings, lake=lake, clock=CLOCK)


@dataclasses.dataclass
class FirstRun:
    ctx: RunContext
    files: dict[str, str]
    report: object
    versions: dict[str, int]

    def table(self, name: str):
        return self.ctx.lake.read(name, version=self.versions[name])


@pytest.fixture(scope="module")
def first(spark, spark_info, base_settings, tmp_path_factory) -> FirstRun:
    folder = tmp_path_factory.mktemp("ingest-first")
    ctx = make_ctx(spark, spark_info, base_settings, folder)
    files = write_first_delivery(Path(ctx.settings.paths.landing_dir))
    report = run_ingest(ctx, echo=lambda _: None)
    names = (*DATA_TABLES, "ingest_files", "ingest_runs")
    return FirstRun(ctx, files, report, {n: ctx.lake.version(n) for n in names})


def test_counts_reconcile_per_entity_with_reasons(first):
    report = first.report
    assert report.batches == (1,)
    assert report.counts("users") == EntityCounts(
        "users", files=1, read=5, accepted=3, duplicates=0, quarantined=2,
        quarantined_by_reason={"bad_email": 1, "missing_user_id": 1})
    assert report.counts("products") == EntityCounts(
        "products", files=1, read=3, accepted=2, duplicates=0, quarantined=1,
        quarantined_by_reason={"non_numeric_price": 1})
    assert report.counts("events") == EntityCounts(
        "events", files=2, read=20, accepted=4, duplicates=2, quarantined=14,
        quarantined_by_reason={
            "bad_quantity": 1, "bad_rating": 1, "before_shop_opened": 1, "blank_line": 1, "future_timestamp": 1,
            "invalid_utf8": 1, "malformed_json": 1, "missing_event_id": 1, "negative_price": 1,
            "string_too_long": 1, "unknown_event_type": 1, "unknown_item": 1, "unknown_user": 2,
        },
        conflicting_duplicates=1)
    for counts in report.entities:
        assert counts.read == counts.accepted + counts.duplicates + counts.quarantined


def test_events_table_holds_the_accepted_events_partitioned_by_date(first, spark):
    day1, day2 = first.files["day1"], first.files["day2"]
    expected = spark.createDataFrame([
        ("e1", "u1", "i1", "view", dt.datetime(2026, 11, 19, 10), dt.date(2026, 11, 19), "s1", None, None, None,
         None, None, None, None, None, None, None, day1, NOW),
        ("e2", "u1", "i1", "purchase", dt.datetime(2026, 11, 19, 10), dt.date(2026, 11, 19), "s1", "o1", 2,
         Decimal("59.90"), "EUR", None, None, None, None, None, None, day1, NOW),
        ("e3", "u2", None, "email_open", dt.datetime(2026, 11, 19, 12), dt.date(2026, 11, 19), None, None, None,
         None, None, None, None, None, "c1", "m1", None, day1, NOW),
        ("e15", "u2", "i2", "add_to_cart", dt.datetime(2026, 11, 20, 8), dt.date(2026, 11, 20), None, None, None,
         None, None, None, None, None, None, None, None, day2, NOW),
    ], EVENTS_TABLE)
    # chispa orders rows by every column, and Spark cannot order by a map: properties apart.
    events = first.table("events").select(*EVENTS_TABLE.fieldNames())
    assert events.where(F.col("properties").isNotNull()).isEmpty()
    assert_df_equality(events.drop("properties"), expected.drop("properties"),
                       ignore_row_order=True, ignore_nullable=True)
    assert first.ctx.lake.info("events").partition_by == ["event_date"]


def test_users_and_products_are_upserted_latest_record_first(first, spark):
    users = first.files["users"]
    expected_users = spark.createDataFrame([
        ("u1", "ann@example.com", "Ann", "en-GB", "Europe/London", "GB", dt.date(1990, 4, 17),
         dt.datetime(2024, 1, 5, 10), True, dt.datetime(2024, 1, 5, 10), dt.datetime(2024, 1, 5, 10), users, NOW),
        ("u2", "bob@example.com", "Bob", "en-US", "America/New_York", "US", None, dt.datetime(2024, 2, 1, 9), False,
         dt.datetime(2024, 6, 1, 9), dt.datetime(2024, 6, 1, 9), users, NOW),
    ], USERS_TABLE)
    assert_df_equality(first.table("users"), expected_users, ignore_row_order=True, ignore_nullable=True)
    products = first.files["products"]
    expected_products = spark.createDataFrame([
        ("i1", "Frying Pan", "Cast iron, 28 cm", "Home > Kitchen > Cookware", "Home", "Acme", Decimal("59.90"), "EUR",
         "https://img.example/i1.png", "https://shop.example/i1", 12, True, dt.date(2024, 1, 1),
         dt.datetime(2024, 1, 1), products, NOW),
        ("i2", "Yoga Mat", None, "Sports > Yoga > Mats", "Sports", "Zen", Decimal("35.00"), "EUR", None, None, 0, False,
         dt.date(2024, 2, 1), dt.datetime(2024, 2, 1), products, NOW),
    ], PRODUCTS_TABLE)
    assert_df_equality(first.table("products"), expected_products, ignore_row_order=True, ignore_nullable=True)


def test_every_rejected_record_is_in_quarantine_with_its_line_and_reasons(first):
    got = {(r.entity, r.record_id, r.reason, tuple(r.reasons), r.source_file)
           for r in first.table("events_quarantine").collect()
           if r.reason not in ("invalid_utf8", "string_too_long")}
    day1, day2 = first.files["day1"], first.files["day2"]
    assert got == {
        ("events", "e4", "unknown_user", ("unknown_user",), day1),
        ("events", "e5", "unknown_item", ("unknown_item",), day1),
        ("events", "e6", "unknown_event_type", ("unknown_event_type",), day1),
        ("events", "e7", "future_timestamp", ("future_timestamp",), day1),
        ("events", "e8", "before_shop_opened", ("before_shop_opened",), day1),
        ("events", "e9", "negative_price", ("negative_price",), day1),
        ("events", "e10", "bad_quantity", ("bad_quantity",), day1),
        ("events", "e11", "bad_rating", ("bad_rating",), day1),
        ("events", None, "missing_event_id", ("missing_event_id",), day1),
        ("events", None, "malformed_json", ("malformed_json",), day1),
        ("events", "e14", "unknown_user", ("unknown_user",), day1),
        ("events", None, "blank_line", ("blank_line",), day2),
    }
    lines = {r.reason: (r.line, tuple(r.reasons)) for r in first.table("events_quarantine").collect()}
    assert lines["malformed_json"][0] == "not json at all"
    # The undecodable byte is in the user id, which is then no valid id either.
    assert lines["invalid_utf8"] == (INVALID_UTF8.decode("utf-8", errors="replace"),
                                     ("invalid_utf8", "bad_id", "unknown_user"))
    assert lines["string_too_long"][0] == EVENTS_DAY1[14]
    users_q = {(r.record_id, r.reason, r.line) for r in first.table("users_quarantine").collect()}
    assert users_q == {("u3", "bad_email", USERS_CSV.splitlines()[4]),
                       (None, "missing_user_id", USERS_CSV.splitlines()[5])}
    assert {(r.record_id, r.reason) for r in first.table("products_quarantine").collect()} == {("i3", "non_numeric_price")}


def test_run_log_and_file_log(first):
    runs = {r.entity: r for r in first.table("ingest_runs").collect()}
    assert sorted(runs) == ["events", "products", "users"]
    events = runs["events"]
    assert (events.batch, events.files, events.read, events.accepted, events.duplicates, events.quarantined,
            events.conflicting_duplicates) == (1, 2, 20, 4, 2, 14, 1)
    assert events.quarantined_by_reason["unknown_user"] == 2
    assert sum(events.quarantined_by_reason.values()) == events.quarantined
    files = {(r.batch, r.kind, r.path) for r in first.table("ingest_files").collect()}
    assert files == {(1, "users", first.files["users"]), (1, "products", first.files["products"]),
                     (1, "events", first.files["day1"]), (1, "events", first.files["day2"])}


def test_running_again_changes_nothing(first):
    lake = first.ctx.lake
    assert all(lake.version(n) == v for n, v in first.versions.items()), "the first run's tables moved"
    report = run_ingest(first.ctx, echo=lambda _: None)
    assert report.batches == ()
    assert {n: lake.version(n) for n in first.versions} == first.versions


def test_a_second_delivery_updates_users_and_products_and_dedupes_against_the_table(first, spark):
    """Runs after the tests above (they read the first run's versions, so order does not matter to them)."""
    landing = Path(first.ctx.settings.paths.landing_dir)
    (landing / "users" / "users-2026-11-21.csv").write_text(
        USERS_CSV.splitlines()[0] + "\n"
        # Newer e-mail, but a consent older than the withdrawal of 2024-06-01.
        "u2,bob@new.example,,,,,,,true,2024-03-01T00:00:00Z,2025-01-01T00:00:00Z\n"
        "u4,dee@example.com,Dee,fr-FR,Europe/Paris,FR,,2025-01-02T00:00:00Z,true,2025-01-02T00:00:00Z,"
        "2025-01-02T00:00:00Z\n", encoding="utf-8")
    (landing / "products" / "products-2026-11-21.csv").write_text(
        PRODUCTS_CSV.splitlines()[0] + "\n"
        "i1,,,,,49.90,EUR,,,3,,2025-01-01T00:00:00Z\n"
        "i2,,,,,99.00,EUR,,,5,,2023-01-01T00:00:00Z\n", encoding="utf-8")
    day3 = landing / "events" / "2026-11-21" / "part-3.jsonl"
    day3.parent.mkdir(parents=True)
    day3.write_text(json.dumps(view("e1", event_type="view")) + "\n" + json.dumps(view("e16", user_id="u4")) + "\n")

    report = run_ingest(first.ctx, echo=lambda _: None)

    assert report.batches == (2,)
    assert (report.counts("events").accepted, report.counts("events").duplicates) == (1, 1)
    lake = first.ctx.lake
    users = {r.user_id: (r.email, r.email_consent, r.consent_ts) for r in lake.read("users").collect()}
    assert users == {
        "u1": ("ann@example.com", True, dt.datetime(2024, 1, 5, 10)),
        "u2": ("bob@new.example", False, dt.datetime(2024, 6, 1, 9)),
        "u4": ("dee@example.com", True, dt.datetime(2025, 1, 2)),
    }
    prices = {r.item_id: (r.price, r.stock, r.name) for r in lake.read("products").collect()}
    assert prices == {"i1": (Decimal("49.90"), 3, "Frying Pan"), "i2": (Decimal("35.00"), 0, "Yoga Mat")}
    events = lake.read("events").groupBy("event_id").count()
    assert {r.event_id: r["count"] for r in events.collect()} == {"e1": 1, "e2": 1, "e3": 1, "e15": 1, "e16": 1}


def test_a_crash_then_a_rerun_equals_an_uninterrupted_run(first, spark, spark_info, base_settings, tmp_path):
    # Three files per batch: batch 1 is users, products and day 1; batch 2 is day 2.
    ctx = make_ctx(spark, spark_info, base_settings, tmp_path, files_per_batch=3)
    write_first_delivery(Path(ctx.settings.paths.landing_dir))
    # Crash in batch 1 after every data table is written, before its counts are logged.
    with pytest.raises(IngestInterrupted):
        run_ingest(ctx, fail_after_files=1, fail_at="events", echo=lambda _: None)
    assert ctx.lake.exists("events") and not ctx.lake.exists("ingest_runs")

    report = run_ingest(ctx, echo=lambda _: None)

    assert report.recovered_batch == 1 and report.batches == (1, 2)
    assert report.counts("events").read == first.report.counts("events").read
    for name in DATA_TABLES:
        # Files of the other landing folder, batch numbers and run ids differ by design.
        got = ctx.lake.read(name).drop("batch", "run_id").withColumn(
            "source_file", F.regexp_extract("source_file", r"([^/]+)$", 1))
        want = first.table(name).drop("batch", "run_id").withColumn(
            "source_file", F.regexp_extract("source_file", r"([^/]+)$", 1))
        if "properties" in got.columns:  # a map cannot be ordered by; its sorted entries can
            got, want = (t.withColumn("properties", F.sort_array(F.map_entries("properties"))) for t in (got, want))
        # Equal tables also mean nothing was appended twice by the redo.
        assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True)
