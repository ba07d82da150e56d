"""Ingest rate at scale: ``run_ingest`` on generated landing files, against a plain JSON -> Parquet copy.

The landing data is made here with Spark (no dependency on the generator):
``--events`` JSON lines over ``--days`` days, ``--users`` users and
``--items`` products as CSV, with about 1.5% dirty lines (malformed JSON,
duplicated event ids with another payload, unknown users). Then, in one
session:

1. ``run_ingest`` into a fresh lake (validation, dedupe, quarantine, Delta writes);
2. the peer: ``spark.read.json(events).write.parquet(...)``, the least any ingest does.

Both rates are printed in events/s, with their ratio and the command that produced them.

    .venv/bin/python bench/bench_ingest.py --events 10000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from inboxlift.clock import SystemClock
from inboxlift.context import RunContext
from inboxlift.session import build_session
from inboxlift.settings import load_settings
from inboxlift.stages.ingest import run_ingest
from inboxlift.storage import Lake

# Event mix per 100 events (by a hash of the event number).
_MIX = [("view", 70), ("add_to_cart", 15), ("remove_from_cart", 3), ("purchase", 5), ("search", 3), ("review", 1),
        ("email_open", 3)]


def _bucket(seed: str, key: str, n: int):
    return F.pmod(F.xxhash64(F.lit(seed), F.col(key)), F.lit(n))


def _iso(seconds):
    return F.date_format(F.timestamp_seconds(seconds), "yyyy-MM-dd'T'HH:mm:ss'Z'")


def event_lines(spark: SparkSession, *, events: int, users: int, items: int, days: int, end: dt.datetime) -> DataFrame:
    """One JSON line per event; ~0.5% malformed, ~0.5% repeated ids with another payload, ~0.5% unknown users."""
    start_s = int(end.timestamp()) - days * 86_400
    base = spark.range(events).withColumnRenamed("id", "n")
    kind = _bucket("kind", "n", 100)
    # Cumulative edges of the mix, first match wins.
    cases = None
    upper = 0
    for name, share in _MIX:
        upper += share
        cases = (F.when(kind < upper, F.lit(name)) if cases is None else cases.when(kind < upper, F.lit(name)))
    event_type = cases.otherwise(F.lit("view"))
    dirty = _bucket("dirty", "n", 200)
    user = F.concat(F.lit("u"), F.lpad(_bucket("user", "n", users).cast("string"), 8, "0"))
    item = F.concat(F.lit("i"), F.lpad(_bucket("item", "n", items).cast("string"), 6, "0"))
    has_item = ~event_type.isin("search", "email_open")
    is_purchase = event_type == "purchase"
    is_review = event_type == "review"
    fields = F.struct(
        F.concat(F.lit("e"), F.when(dirty == 1, F.col("n") - 1).otherwise(F.col("n")).cast("string")).alias("event_id"),
        event_type.alias("event_type"),
        _iso(F.lit(start_s) + (F.col("n") * (days * 86_400) / events).cast("long")).alias("event_ts"),
        F.when(dirty == 2, F.lit("u-ghost")).otherwise(user).alias("user_id"),
        F.when(has_item, item).alias("item_id"),
        F.concat(F.lit("s"), (F.col("n") / 7).cast("long").cast("string")).alias("session_id"),
        F.when(is_purchase, F.concat(F.lit("o"), F.col("n").cast("string"))).alias("order_id"),
        F.when(is_purchase, (_bucket("qty", "n", 3) + 1).cast("string")).alias("quantity"),
        F.when(is_purchase, F.format_string("%.2f", _bucket("price", "n", 20000) / 100 + 1)).alias("price"),
        F.when(is_purchase, F.lit("EUR")).alias("currency"),
        F.when(event_type == "search", F.lit("running shoes")).alias("query"),
        F.when(is_review, (_bucket("rating", "n", 5) + 1).cast("string")).alias("rating"),
        F.when(is_review, F.lit("Comfortable and light, true to size.")).alias("review_text"),
        F.when(event_type == "email_open", F.lit("c-weekly")).alias("campaign_id"),
        F.when(event_type == "email_open", F.concat(F.lit("m"), F.col("n").cast("string"))).alias("message_id"),
    )
    line = F.to_json(fields)
    return base.select(F.when(dirty == 0, F.substring(line, 1, 40)).otherwise(line).alias("value"))


def users_frame(spark: SparkSession, *, users: int) -> DataFrame:
    uid = F.concat(F.lit("u"), F.lpad(F.col("id").cast("string"), 8, "0"))
    return spark.range(users).select(
        uid.alias("user_id"),
        F.concat(uid, F.lit("@example.com")).alias("email"),
        F.lit("Alex").alias("first_name"),
        F.lit("en-GB").alias("locale"),
        F.lit("Europe/London").alias("timezone"),
        F.lit("GB").alias("country"),
        F.lit("1990-04-17").alias("birthday"),
        F.lit("2024-01-05T10:00:00Z").alias("signup_ts"),
        F.when(F.col("id") % 3 == 0, F.lit("false")).otherwise(F.lit("true")).alias("email_consent"),
        F.lit("2024-01-05T10:00:00Z").alias("consent_ts"),
        F.lit("2024-01-05T10:00:00Z").alias("updated_at"),
    )


def products_frame(spark: SparkSession, *, items: int) -> DataFrame:
    iid = F.concat(F.lit("i"), F.lpad(F.col("id").cast("string"), 6, "0"))
    return spark.range(items).select(
        iid.alias("item_id"),
        F.concat(F.lit("Product "), F.col("id").cast("string")).alias("name"),
        F.lit("A fine thing").alias("description"),
        F.lit("Home > Kitchen > Cookware").alias("category_path"),
        F.lit("Acme").alias("brand"),
        F.format_string("%.2f", (F.col("id") % 500) + 9.99).alias("price"),
        F.lit("EUR").alias("currency"),
        F.concat(F.lit("https://img.example/"), iid, F.lit(".png")).alias("image_url"),
        F.concat(F.lit("https://shop.example/"), iid).alias("url"),
        (F.col("id") % 40).cast("string").alias("stock"),
        F.lit("2024-01-01").alias("launched_at"),
        F.lit("2024-01-01T00:00:00Z").alias("updated_at"),
    )


def generate(spark: SparkSession, landing: Path, *, events: int, users: int, items: int, days: int, files: int) -> None:
    shutil.rmtree(landing, ignore_errors=True)
    end = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    events_dir = landing / "events"
    event_lines(spark, events=events, users=users, items=items, days=days, end=end) \
        .repartition(files).write.mode("overwrite").option("compression", "none").text(str(events_dir))
    for part in events_dir.glob("part-*.txt"):
        part.rename(part.with_suffix(".jsonl"))
    users_frame(spark, users=users).coalesce(1).write.mode("overwrite").option("header", True) \
        .csv(str(landing / "users"))
    products_frame(spark, items=items).coalesce(1).write.mode("overwrite").option("header", True) \
        .csv(str(landing / "products"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--files", type=int, default=40, help="landing files the events are spread over")
    parser.add_argument("--work-dir", default=".bench/ingest")
    parser.add_argument("--reuse-landing", action="store_true", help="keep landing files from an earlier run")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else " ".join(argv)

    work = Path(args.work_dir).absolute()
    landing, lake_dir, peer_dir = work / "landing", work / "lake", work / "peer"
    settings = load_settings("local", conf_dir="conf", overrides={
        "storage.lake_dir": str(lake_dir), "paths.landing_dir": str(landing),
        "spark.checkpoint_dir": str(work / "checkpoints"), "spark.ui_enabled": False,
    })
    info = build_session(settings.spark, environ=os.environ, app_name="bench-ingest")
    spark = info.spark
    print(info.describe())

    if not (args.reuse_landing and (landing / "events").is_dir()):
        started = time.perf_counter()
        generate(spark, landing, events=args.events, users=args.users, items=args.items, days=args.days,
                 files=args.files)
        print(f"generated {args.events:,} event lines, {args.users:,} users, {args.items:,} products "
              f"in {time.perf_counter() - started:.1f}s")
    size_mb = sum(p.stat().st_size for p in (landing / "events").glob("*.jsonl")) / 2**20

    shutil.rmtree(lake_dir, ignore_errors=True)
    lake = Lake.open(spark, settings.storage, has_delta_jars=info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=SystemClock())
    load_before = os.getloadavg()
    started = time.perf_counter()
    report = run_ingest(ctx)
    ingest_s = time.perf_counter() - started
    events_read = report.counts("events").read
    events_info = lake.info("events")

    shutil.rmtree(peer_dir, ignore_errors=True)
    started = time.perf_counter()
    spark.read.json(str(landing / "events")).write.mode("overwrite").parquet(str(peer_dir))
    peer_s = time.perf_counter() - started
    load_after = os.getloadavg()

    ingest_rate, peer_rate = events_read / ingest_s, events_read / peer_s
    print()
    print(f"command:   {command}")
    print(f"machine:   {os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          f"(shared with other work)")
    print(f"input:     {events_read:,} event lines ({size_mb:,.0f} MiB JSON) in {args.files} files, "
          f"{args.users:,} users, {args.items:,} products")
    print(f"ingest:    {ingest_s:8.1f}s  {ingest_rate:12,.0f} events/s  (run_ingest: validate, dedupe, "
          f"quarantine, Delta writes of users, products, events)")
    print(f"events:    {events_info.rows:,} rows in {events_info.files:,} files "
          f"({len(set(events_info.partition_by))} partition column: {', '.join(events_info.partition_by)})")
    print(f"peer:      {peer_s:8.1f}s  {peer_rate:12,.0f} events/s  (spark.read.json -> write.parquet)")
    print(f"ratio:     ingest takes {ingest_s / peer_s:.2f}x the peer's time")
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
