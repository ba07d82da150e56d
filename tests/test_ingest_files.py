"""Files that break ingest: huge fields, unreadable, vanished or replaced files, moved folders, retention."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from conftest import settings_in
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.pipeline import STAGES
from inboxlift.stages.ingest import FILES_SCHEMA, EntityCounts, IngestInterrupted, run_import, run_ingest
from inboxlift.storage import Lake
from test_ingest_stage import PRODUCTS_CSV, USERS_CSV, view

CLOCK = FixedClock.at("2026-11-20T12:00:00")


def context(spark, spark_info, base_settings, folder: Path, clock=CLOCK, **ingest) -> RunContext:
    settings = settings_in(base_settings, folder)
    settings = dataclasses.replace(settings, ingest=dataclasses.replace(settings.ingest, **ingest))
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    return RunContext(spark=spark, settings=settings, lake=lake, clock=clock)


def write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return f"file:{path}"


def events_lines(*events: dict) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


def base_landing(landing: Path) -> None:
    """Users u1, u2 and products i1, i2 (as in test_ingest_stage), so events can reference them."""
    write(landing / "users" / "users.csv", USERS_CSV)
    write(landing / "products" / "products.csv", PRODUCTS_CSV)


def quiet(_: str) -> None:
    return None


def test_a_10_mb_field_and_quoted_newlines_go_through_the_csv_reader(spark, spark_info, base_settings, tmp_path):
    # The line-based check this replaced overflowed the JVM's stack at 3,000 characters and
    # killed the JVM at 10 MB. The file is made here, never committed.
    ctx = context(spark, spark_info, base_settings, tmp_path)
    header = PRODUCTS_CSV.splitlines()[0]
    big_record = f'i1,Pan,"{"y" * (10 * 1024 * 1024)}",Home,Acme,10,EUR,,,1,,2024-01-01T00:00:00Z'
    write(Path(ctx.settings.paths.landing_dir) / "products" / "big.csv", "\n".join([
        header,
        big_record,
        'i2,"Mat\nfor yoga","Two\nlines, and ""quotes""",Sports,Zen,5,EUR,,,1,,2024-01-01T00:00:00Z',
        "i3,too,few",
    ]) + "\n")

    report = run_ingest(ctx, echo=quiet)

    assert report.counts("products") == EntityCounts(
        "products", files=1, read=3, accepted=1, quarantined=2,
        quarantined_by_reason={"malformed_csv": 1, "string_too_long": 1})
    product = ctx.lake.read("products").first()
    assert (product.item_id, product.name, product.description) == ("i2", "Mat for yoga", 'Two\nlines, and "quotes"')
    too_long = ctx.lake.read("products_quarantine").where(F.col("reason") == "string_too_long").first()
    assert (too_long.record_id, too_long.line) == ("i1", big_record)


def test_an_unreadable_file_is_quarantined_whole_and_the_batch_goes_on(spark, spark_info, base_settings, tmp_path):
    ctx = context(spark, spark_info, base_settings, tmp_path)
    landing = Path(ctx.settings.paths.landing_dir)
    base_landing(landing)
    good = write(landing / "events" / "good.jsonl", events_lines(view("e1"), view("e2")))
    full = gzip.compress(events_lines(*[view(f"t{i}") for i in range(100)]).encode())
    truncated = write(landing / "events" / "cut.jsonl.gz", full[: len(full) // 2])
    # A CSV beside a broken one: its header is still found (the good files are read together again).
    users = gzip.compress((USERS_CSV + "".join(f"x{i},x{i}@example.com,X,,,,,,,,2024-01-01\n"
                                                for i in range(200))).encode())
    truncated_users = write(landing / "users" / "more.csv.gz", users[: len(users) // 2])

    report = run_ingest(ctx, echo=quiet)

    assert report.batches == (1,)
    assert report.counts("events") == EntityCounts("events", files=2, read=2, accepted=2, failed_files=1)
    assert report.counts("users") == EntityCounts("users", files=2, read=5, accepted=3, quarantined=2,
                                                  quarantined_by_reason={"bad_email": 1, "missing_user_id": 1},
                                                  failed_files=1)
    assert sorted((f.path, f.reason) for f in report.failed_files) == [(truncated, "unreadable"),
                                                                        (truncated_users, "unreadable")]
    assert all("Unexpected end of input stream" in f.detail for f in report.failed_files)
    logged = {r.path: (r.state, r.reason) for r in ctx.lake.read("ingest_files").collect()}
    assert logged[truncated] == ("failed", "unreadable") and logged[good] == ("planned", None)
    assert [(r.source_file, r.reason) for r in ctx.lake.read("users_quarantine").where("line is null").collect()] \
        == [(truncated_users, "unreadable")]
    quarantined = [(r.source_file, r.reason, r.line) for r in ctx.lake.read("events_quarantine").collect()]
    assert quarantined == [(truncated, "unreadable", None)]
    assert sorted(r.event_id for r in ctx.lake.read("events").collect()) == ["e1", "e2"]
    runs = {r.entity: r.failed_files for r in ctx.lake.read("ingest_runs").collect()}
    assert runs == {"users": 1, "products": 0, "events": 1}

    # Nothing changed: nothing is read again, and the failed file does not fail the next run.
    assert run_ingest(ctx, echo=quiet).batches == ()
    # Fixed (a new file: other size and time), it is read.
    write(landing / "events" / "cut.jsonl.gz", full)
    again = run_ingest(ctx, echo=quiet)
    assert again.counts("events") == EntityCounts("events", files=1, read=100, accepted=100)


def test_a_file_that_vanished_before_the_redo_is_reported_not_fatal(spark, spark_info, base_settings, tmp_path):
    ctx = context(spark, spark_info, base_settings, tmp_path)
    landing = Path(ctx.settings.paths.landing_dir)
    base_landing(landing)
    write(landing / "events" / "a.jsonl", events_lines(view("e1")))
    gone = write(landing / "events" / "b.jsonl", events_lines(view("e2")))
    with pytest.raises(IngestInterrupted):
        run_ingest(ctx, fail_after_files=1, fail_at="planned", echo=quiet)
    os.remove(landing / "events" / "b.jsonl")

    report = run_ingest(ctx, echo=quiet)

    assert report.recovered_batch == 1 and report.batches == (1,)
    assert [(f.path, f.reason) for f in report.failed_files] == [(gone, "vanished")]
    assert report.counts("events") == EntityCounts("events", files=2, read=1, accepted=1, failed_files=1)
    logged = {r.path: (r.state, r.reason) for r in ctx.lake.read("ingest_files").collect()}
    assert logged[gone] == ("failed", "vanished")
    assert [(r.source_file, r.reason) for r in ctx.lake.read("events_quarantine").collect()] == [(gone, "vanished")]
    # The batch is committed: the next run has nothing to redo and nothing fails.
    assert run_ingest(ctx, echo=quiet).batches == ()


def test_a_file_replaced_after_planning_is_refused_not_read_as_other_bytes(spark, spark_info, base_settings,
                                                                           tmp_path):
    ctx = context(spark, spark_info, base_settings, tmp_path)
    landing = Path(ctx.settings.paths.landing_dir)
    base_landing(landing)
    write(landing / "events" / "a.jsonl", events_lines(view("e1")))
    same_size = landing / "events" / "b.jsonl"
    replaced = write(same_size, events_lines(view("e2")))
    grown = write(landing / "events" / "c.jsonl", events_lines(view("e3")))
    with pytest.raises(IngestInterrupted):
        run_ingest(ctx, fail_after_files=1, fail_at="planned", echo=quiet)
    # Other bytes, same size and modification time: only the content hash tells.
    stamp = same_size.stat()
    same_size.write_text(events_lines(view("e9")))
    os.utime(same_size, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert same_size.stat().st_size == stamp.st_size
    (landing / "events" / "c.jsonl").write_text(events_lines(view("e3"), view("e4")))

    report = run_ingest(ctx, echo=quiet)

    assert sorted((f.path, f.reason) for f in report.failed_files) == [(replaced, "changed"), (grown, "changed")]
    assert "sha256" in {f.path: f.detail for f in report.failed_files}[replaced]
    # Batch 1 read a.jsonl only. The grown c.jsonl is, now, a file not read before: batch 2 takes it
    # up as it is. b.jsonl kept its size and time, so it stays refused until it is touched.
    assert report.batches == (1, 2)
    assert sorted(r.event_id for r in ctx.lake.read("events").collect()) == ["e1", "e3", "e4"]
    assert report.counts("events") == EntityCounts("events", files=4, read=3, accepted=3, failed_files=2)


def test_a_moved_lake_and_landing_folder_read_nothing_again(spark, spark_info, base_settings, tmp_path):
    first = context(spark, spark_info, base_settings, tmp_path / "a")
    landing = Path(first.settings.paths.landing_dir)
    base_landing(landing)
    write(landing / "events" / "day1.jsonl", events_lines(view("e1"), view("e2")))
    # The batch is planned, then interrupted before its writes: pending when the folders move.
    with pytest.raises(IngestInterrupted):
        run_ingest(first, fail_after_files=3, fail_at="planned", echo=quiet)

    os.rename(tmp_path / "a", tmp_path / "b")
    moved = context(spark, spark_info, base_settings, tmp_path / "b")
    report = run_ingest(moved, echo=quiet)
    # The pending batch is redone from the new place (its files are found there); no file is new.
    assert report.recovered_batch == 1 and report.batches == (1,)
    assert report.counts("events").accepted == 2 and not report.failed_files
    assert {r.source_file for r in moved.lake.read("events").collect()} == {f"file:{tmp_path}/b/landing/events/day1.jsonl"}
    assert run_ingest(moved, echo=quiet).batches == ()

    # Reached through another absolute path: nothing is new either.
    os.symlink(tmp_path / "b", tmp_path / "link")
    linked = context(spark, spark_info, base_settings, tmp_path / "link")
    assert run_ingest(linked, echo=quiet).batches == ()

    # A file log as code before relative paths wrote it here (absolute paths only) is still recognised.
    lake = moved.lake
    old_columns = [f.name for f in FILES_SCHEMA.fields][:8]
    absolute = F.concat(F.lit(f"file:{tmp_path}/b/landing/"), F.col("rel_path")).alias("path")
    lake.overwrite("ingest_files", lake.read("ingest_files").select(
        *[absolute if c == "path" else c for c in old_columns]), overwrite_schema=True)
    assert "rel_path" not in lake.read("ingest_files").columns
    assert run_ingest(moved, echo=quiet).batches == ()
    assert lake.read("events").count() == 2
    assert lake.read("events").groupBy("event_id").count().where("count > 1").isEmpty()


def test_an_export_split_over_batches_is_read_batch_by_batch(spark, spark_info, base_settings, tmp_path):
    ctx = context(spark, spark_info, base_settings, tmp_path, files_per_batch=2, shop_opened="2010-01-01")
    folder = tmp_path / "exports"
    header = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    for n in range(3):
        write(folder / f"part-{n}.csv", header + "".join(
            f"5{n}{i:04d},85123A,HEART,1,12/1/2010 8:26,2.55,17850,United Kingdom\n" for i in range(n + 1)))

    report = run_import(ctx, shape="invoice_lines", path=str(folder), echo=quiet)

    assert report.batches == (1, 2)
    assert report.counts("invoice_lines") == EntityCounts("invoice_lines", files=3, read=6, accepted=6)


def test_a_fully_quarantined_import_ends_with_its_report(spark, ctx, tmp_path):
    # Issue 17: with every line quarantined (here: before ingest.shop_opened), Spark's observation
    # of the lines read failed with java.lang.AssertionError under adaptive execution, which is on
    # by default (the test session turns it off, so this test turns it back on).
    export = tmp_path / "exports" / "old.csv"
    write(export, "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
                  "536365,85123A,HEART,6,12/1/2010 8:26,2.55,17850,United Kingdom\n"
                  "536366,22633,HAND WARMER,6,12/1/2010 8:28,1.85,17850,United Kingdom\n")
    printed: list[str] = []
    previous = spark.conf.get("spark.sql.adaptive.enabled")
    spark.conf.set("spark.sql.adaptive.enabled", "true")
    try:
        report = run_import(ctx, shape="invoice_lines", path=str(export), echo=printed.append)
    finally:
        spark.conf.set("spark.sql.adaptive.enabled", previous)

    assert report.counts("invoice_lines") == EntityCounts(
        "invoice_lines", files=1, read=2, quarantined=2, quarantined_by_reason={"before_shop_opened": 2})
    assert "invoice_lines quarantined by reason: before_shop_opened=2" in printed[0]
    assert not ctx.lake.exists("events")


def test_maintain_deletes_quarantine_rows_past_their_retention(spark, spark_info, base_settings, tmp_path):
    landing = tmp_path / "landing"
    write(landing / "users" / "users.csv", USERS_CSV)
    day0 = context(spark, spark_info, base_settings, tmp_path, clock=FixedClock.at("2026-06-01T00:00:00"))
    run_ingest(day0, echo=quiet)
    write(landing / "users" / "later.csv", USERS_CSV.splitlines()[0] + "\n,x@example.com,X,,,,,,,,2026-07-01\n")
    day60 = context(spark, spark_info, base_settings, tmp_path, clock=FixedClock.at("2026-07-31T00:00:00"))
    run_ingest(day60, echo=quiet)
    assert day60.lake.read("users_quarantine").count() == 3

    # 91 days after the first ingest: its two rows go, the later one stays.
    day91 = context(spark, spark_info, base_settings, tmp_path, clock=FixedClock.at("2026-08-31T00:00:00"))
    lines = STAGES["maintain"].run(day91, argparse.Namespace(retention_hours=None))

    kept = [(r.record_id, r.reason) for r in day91.lake.read("users_quarantine").collect()]
    assert kept == [(None, "missing_user_id")] and len(kept) == 1
    assert "users_quarantine: 2 rows quarantined before 2026-06-02 deleted (ingest.quarantine_retention_days = 90)" \
        in lines
    # Run again: nothing more to delete.
    assert "users_quarantine: 0 rows" in " ".join(STAGES["maintain"].run(day91, argparse.Namespace(retention_hours=None)))
