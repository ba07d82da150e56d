"""The report stage's aggregation: inboxlift's Spark transforms against DuckDB on the same Parquet files.

Synthetic ``campaign_plan``, ``outbox``, ``deliveries`` and ``events`` are generated once with Spark
built-ins and saved as Parquet under ``.bench/report``: ``--messages`` sent messages over 4
campaigns x 7 days (10% of each audience held out, variants A/B), 2% bounced, human and machine
opens, clicks (B's 15% more), purchases after clicks and in the background, unsubscribes,
complaints, and ``--views`` product views that the report must read past. Then, alternating,
``--repeat`` times each:

- Spark, as the stage runs it: :func:`inboxlift.transforms.attribution.recipient_outcomes`
  (recipients, delivery outcomes, human engagement, last-touch attribution, uplift windows; one
  shuffle by message, one by user), their summary
  (:func:`inboxlift.transforms.campaign_results.summarise_outcomes`) kept as a local checkpoint as
  the stage keeps it (``--no-keep-outcomes``: not kept), and
  :func:`inboxlift.transforms.campaign_results.aggregate_results` (counts, rates, Wilson intervals)
  over ``spark.read.parquet`` of the files, materialised (``noop`` sink): the per-recipient work of
  ``inboxlift run report``, everything but the Delta write, the driver statistics and the plots;
- DuckDB: the same rows in one SQL query over ``read_parquet`` of the same files, materialised as a
  temporary table, with as many threads as Spark has cores.

The best time of each counts; the CPU seconds of each run (this process and the JVM, from /proc)
are printed beside it. Every count column is summed over all rows in both results and compared.
The Poisson bootstrap of the revenue uplift (Spark) is timed once, as information, over the
summary kept first, as the stage reads it. ``--explain``
prints Spark's plan; ``--breakdown`` times the plan's parts after the timed runs.

    .venv/bin/python bench/bench_report.py [--messages 1000000] [--views 5000000] [--repeat 2] [--keep]
                                           [--no-keep-outcomes] [--explain] [--breakdown]
    .venv/bin/python bench/bench_report.py --example var/report-example --messages 40000 --users 40000 --views 40000
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench_render import tree_cpu_seconds
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".bench" / "report"
FIRST_DAY = dt.date(2026, 11, 2)
CAMPAIGNS, DAYS, HOLDOUT_SHARE = 4, 7, 0.1
NOW = dt.datetime(2026, 11, 20, 12, tzinfo=dt.timezone.utc)
GOAL = 2.0  # Spark's time at most twice DuckDB's
COUNT_COLUMNS = ["recipients", "sent", "delivered", "bounced", "opens", "clicks", "unique_clicks", "conversions",
                 "orders", "unsubscribes", "complaints", "window_conversions", "window_orders"]


def _u(seed: str, column: str = "id") -> Column:
    """A uniform number in [0, 1) per row, different per ``seed``."""
    return (F.abs(F.xxhash64(F.lit(seed), F.col(column))) % F.lit(1_000_000)) / F.lit(1_000_000.0)


def plan_frame(spark: SparkSession, *, messages: int, users: int) -> DataFrame:
    rows = int(messages / (1 - HOLDOUT_SHARE))
    campaign = F.col("id") % CAMPAIGNS
    day = (F.col("id") / CAMPAIGNS).cast("long") % DAYS
    # For one campaign day, k -> (k + offset) % users is one-to-one: no user twice in a day's plan.
    k = (F.col("id") / (CAMPAIGNS * DAYS)).cast("long")
    user = (k + campaign * 7919 + day * 104729) % users
    first = dt.datetime.combine(FIRST_DAY, dt.time(), tzinfo=dt.timezone.utc)
    send_at = F.timestamp_seconds(F.lit(int(first.timestamp())) + day * 86_400 + 6 * 3600
                                  + (_u("hour") * 14 * 3600).cast("long"))
    variant = (F.when(_u("holdout") < HOLDOUT_SHARE, F.lit("holdout"))
               .when(_u("variant") < 0.5, F.lit("A")).otherwise(F.lit("B")))
    return spark.range(rows).select(
        "id", F.concat(F.lit("c"), campaign.cast("string")).alias("campaign_id"),
        F.date_add(F.lit(FIRST_DAY), day.cast("int")).alias("plan_date"),
        F.concat(F.lit("u"), user.cast("string")).alias("user_id"), variant.alias("variant"),
        send_at.alias("send_at"))


def outbox_frame(plan: DataFrame) -> DataFrame:
    return plan.where(F.col("variant") != "holdout").select(
        F.concat(F.lit("m"), F.col("id").cast("string")).alias("message_id"), "campaign_id", "plan_date", "user_id",
        "variant", F.when(_u("unsent") < 0.01, F.lit("rendered")).otherwise(F.lit("sent")).alias("status"), "send_at")


def deliveries_frame(outbox: DataFrame) -> DataFrame:
    sent = outbox.where(F.col("status") == "sent")
    return sent.select("message_id", F.lit(1).alias("attempt"),
                       F.when(_u("bounce", "message_id") < 0.02, F.lit("bounced")).otherwise(F.lit("sent")).alias("state"),
                       (F.col("send_at") + F.make_interval(secs=F.lit(3))).alias("attempted_at"))


def events_frame(spark: SparkSession, outbox: DataFrame, deliveries: DataFrame, *, users: int,
                 views: int) -> DataFrame:
    delivered = (outbox.join(deliveries.where(F.col("state") == "sent").select("message_id"), "message_id")
                 .select("message_id", "user_id", "variant", "send_at"))
    later = lambda seed, hours: F.col("send_at") + F.make_interval(  # noqa: E731
        secs=(_u(seed, "message_id") * hours * 3600).cast("int"))
    is_b = F.col("variant") == "B"
    props = lambda key, value: F.create_map(F.lit(key), F.lit(value))  # noqa: E731
    none = F.lit(None)

    def event(kind: str, ts: Column, *, props_col: Column | None = None, order: Column | None = None) -> list[Column]:
        return [F.lit(kind).alias("event_type"), ts.alias("event_ts"),
                (order if order is not None else none.cast("string")).alias("order_id"),
                F.when(order.isNotNull(), F.lit(1)).cast("int").alias("quantity") if order is not None
                else none.cast("int").alias("quantity"),
                F.when(order.isNotNull(), F.lit(25.0) + _u("price", "message_id") * 100).cast("decimal(12,2)")
                .alias("price") if order is not None else none.cast("decimal(12,2)").alias("price"),
                (props_col if props_col is not None else none.cast("map<string,string>")).alias("properties")]

    mail = lambda: delivered.select("user_id", "message_id", "send_at", "variant")  # noqa: E731
    opens = mail().where(_u("open", "message_id") < 0.30).select(
        "user_id", "message_id", *event("email_open", later("open_at", 40), props_col=props("is_machine_open", "false")))
    machine = mail().where(_u("machine", "message_id") < 0.10).select(
        "user_id", "message_id", *event("email_open", later("m_at", 0.002), props_col=props("is_machine_open", "true")))
    click_p = F.when(is_b, F.lit(0.046)).otherwise(F.lit(0.04))
    clickers = mail().where(_u("click", "message_id") < click_p)
    clicks = clickers.select("user_id", "message_id", *event("email_click", later("click_at", 40)))
    bought = clickers.where(_u("buy", "message_id") < 0.15).select(
        "user_id", F.lit(None).cast("string").alias("message_id"),
        *event("purchase", later("buy_at", 100), order=F.concat(F.lit("o"), F.col("message_id"))))
    other = mail().select("user_id", "message_id", F.when(_u("leave", "message_id") < 0.002, F.lit("unsubscribe"))
                          .when(_u("leave", "message_id") < 0.0025, F.lit("complaint")).alias("kind"), "send_at")
    leaving = other.where(F.col("kind").isNotNull()).select(
        "user_id", "message_id", F.col("kind").alias("event_type"), later("leave_at", 20).alias("event_ts"),
        *[c for c in event("x", F.col("send_at"))[2:]])
    first = int(dt.datetime.combine(FIRST_DAY, dt.time(), tzinfo=dt.timezone.utc).timestamp())
    span = (DAYS + 10) * 86_400
    background = spark.range(views + users // 20).select(
        F.concat(F.lit("u"), (F.abs(F.xxhash64(F.lit("bg_user"), "id")) % users).cast("string")).alias("user_id"),
        F.lit(None).cast("string").alias("message_id"),
        F.when(F.col("id") < users // 20, F.lit("purchase")).otherwise(F.lit("view")).alias("event_type"),
        F.timestamp_seconds(F.lit(first) + (_u("bg_ts") * span).cast("long")).alias("event_ts"),
        F.when(F.col("id") < users // 20, F.concat(F.lit("b"), F.col("id").cast("string"))).alias("order_id"),
        F.when(F.col("id") < users // 20, F.lit(2)).cast("int").alias("quantity"),
        F.when(F.col("id") < users // 20, F.lit(30.0)).cast("decimal(12,2)").alias("price"),
        F.lit(None).cast("map<string,string>").alias("properties"))
    rows = opens.unionByName(machine).unionByName(clicks).unionByName(bought).unionByName(leaving) \
        .unionByName(background)
    return rows.select(F.concat(F.lit("e"), F.monotonically_increasing_id().cast("string")).alias("event_id"),
                       "user_id", F.lit(None).cast("string").alias("item_id"), "event_type", "event_ts",
                       "order_id", "quantity", "price", "message_id", "properties")


def duckdb_sql(data: Path, *, click_days: float, view_days: float, uplift_days: float, z: float,
               closed_before: str) -> str:
    """campaign_results in one DuckDB query, the same rules as the Spark transforms."""
    t = {name: f"read_parquet('{data / name}/*.parquet')" for name in ("plan", "outbox", "deliveries", "events")}
    wilson = []
    rates = {"delivery_rate": ("delivered", "sent"), "bounce_rate": ("bounced", "sent"),
             "open_rate": ("opens", "delivered"), "click_rate": ("unique_clicks", "delivered"),
             "conversion_rate": ("conversions", "delivered"), "unsubscribe_rate": ("unsubscribes", "delivered"),
             "complaint_rate": ("complaints", "delivered"),
             "window_conversion_rate": ("window_conversions", "recipients")}
    for rate, (k, n) in rates.items():
        p = f"({k}::DOUBLE / NULLIF({n}, 0))"
        centre = f"(({p} + {z * z} / (2 * {n})) / (1 + {z * z} / {n}))"
        half = f"({z} * sqrt({p} * (1 - {p}) / {n} + {z * z} / (4 * {n} * {n})) / (1 + {z * z} / {n}))"
        wilson.append(f"{p} AS {rate}, CASE WHEN {n} > 0 THEN greatest({centre} - {half}, 0) END AS {rate}_low, "
                      f"CASE WHEN {n} > 0 THEN least({centre} + {half}, 1) END AS {rate}_high")
    return f"""
WITH sent AS (SELECT * FROM {t['outbox']} WHERE status = 'sent'),
days AS (SELECT DISTINCT campaign_id, plan_date FROM sent),
planned AS (SELECT p.campaign_id, p.plan_date, p.user_id, p.variant AS plan_variant, p.send_at AS plan_send_at
            FROM {t['plan']} p SEMI JOIN days d ON p.campaign_id = d.campaign_id AND p.plan_date = d.plan_date),
rec AS (SELECT campaign_id, plan_date AS send_date, user_id, s.message_id,
               coalesce(s.variant, plan_variant) AS variant, coalesce(plan_send_at, s.send_at) AS send_at
        FROM planned FULL JOIN sent s USING (campaign_id, plan_date, user_id)),
deliv AS (SELECT message_id, bool_or(state = 'sent') AS accepted, bool_or(state = 'bounced') AS is_bounced
          FROM {t['deliveries']} GROUP BY message_id),
ev AS (SELECT * FROM {t['events']}),
touches AS (SELECT message_id, event_type, event_ts FROM ev WHERE message_id IS NOT NULL AND (
              (event_type = 'email_open' AND coalesce(lower(properties['is_machine_open']) = 'true', false) = false)
           OR (event_type = 'email_click' AND coalesce(lower(properties['is_machine_click']) = 'true', false) = false))),
engage AS (SELECT message_id, count(*) > 0 AS is_opened, count(*) FILTER (event_type = 'email_click') AS clicks
           FROM touches GROUP BY message_id),
leave AS (SELECT message_id, bool_or(event_type = 'unsubscribe') AS is_unsubscribed,
                 bool_or(event_type = 'complaint') AS is_complained
          FROM ev WHERE message_id IS NOT NULL AND event_type IN ('unsubscribe', 'complaint') GROUP BY message_id),
orders AS (SELECT user_id, coalesce('o:' || order_id, 'e:' || event_id) AS order_key, min(event_ts) AS order_ts,
                  sum(coalesce(quantity, 1) * coalesce(price, 0))::DOUBLE AS revenue
           FROM ev WHERE event_type = 'purchase' AND user_id IS NOT NULL GROUP BY ALL),
owned AS (SELECT r.user_id, t.message_id, t.event_ts AS touch_ts,
                 CASE WHEN t.event_type = 'email_click' THEN 1 ELSE 0 END AS is_click
          FROM touches t JOIN (SELECT message_id, user_id FROM rec WHERE message_id IS NOT NULL) r USING (message_id)),
credited AS (SELECT o.order_key, o.user_id, w.message_id, o.revenue FROM orders o JOIN owned w USING (user_id)
             WHERE w.touch_ts <= o.order_ts AND o.order_ts < w.touch_ts + CASE WHEN w.is_click = 1
                   THEN INTERVAL '{click_days * 86400} seconds' ELSE INTERVAL '{view_days * 86400} seconds' END
             QUALIFY row_number() OVER (PARTITION BY o.user_id, o.order_key
                                        ORDER BY w.is_click DESC, w.touch_ts DESC, w.message_id) = 1),
attributed AS (SELECT message_id, count(*) AS attributed_orders, sum(revenue) AS attributed_revenue
               FROM credited GROUP BY message_id),
windowed AS (SELECT r.campaign_id, r.send_date, r.user_id, count(*) AS window_orders, sum(o.revenue) AS window_revenue
             FROM rec r JOIN orders o USING (user_id)
             WHERE o.order_ts >= r.send_at AND o.order_ts < r.send_at + INTERVAL '{uplift_days * 86400} seconds'
             GROUP BY ALL),
outcomes AS (
  SELECT r.campaign_id, r.variant, r.send_date, r.send_at,
         coalesce(d.accepted OR d.is_bounced, false) AS is_sent, coalesce(d.is_bounced, false) AS is_bounced,
         coalesce(d.accepted AND NOT d.is_bounced, false) AS is_delivered, coalesce(e.is_opened, false) AS is_opened,
         coalesce(e.clicks, 0) AS clicks, coalesce(l.is_unsubscribed, false) AS is_unsubscribed,
         coalesce(l.is_complained, false) AS is_complained, coalesce(a.attributed_orders, 0) AS attributed_orders,
         coalesce(a.attributed_revenue, 0) AS attributed_revenue, coalesce(w.window_orders, 0) AS window_orders,
         coalesce(w.window_revenue, 0) AS window_revenue
  FROM rec r LEFT JOIN deliv d USING (message_id) LEFT JOIN engage e USING (message_id)
  LEFT JOIN leave l USING (message_id) LEFT JOIN attributed a USING (message_id)
  LEFT JOIN windowed w USING (campaign_id, send_date, user_id)),
grouped AS (
  SELECT campaign_id, variant, send_date, count(*) AS recipients, count(*) FILTER (is_sent) AS sent,
         count(*) FILTER (is_delivered) AS delivered, count(*) FILTER (is_bounced) AS bounced,
         count(*) FILTER (is_opened) AS opens, sum(clicks) AS clicks, count(*) FILTER (clicks > 0) AS unique_clicks,
         count(*) FILTER (attributed_orders > 0) AS conversions, sum(attributed_orders) AS orders,
         round(sum(attributed_revenue), 2) AS revenue, count(*) FILTER (is_unsubscribed) AS unsubscribes,
         count(*) FILTER (is_complained) AS complaints, count(*) FILTER (window_orders > 0) AS window_conversions,
         sum(window_orders) AS window_orders, round(sum(window_revenue), 2) AS window_revenue,
         max(send_at) AS last_send_at
  FROM outcomes GROUP BY campaign_id, variant, send_date)
SELECT campaign_id, variant, send_date, recipients, sent, delivered, bounced, opens, clicks, unique_clicks,
       conversions, orders, revenue, unsubscribes, complaints, window_conversions, window_orders, window_revenue,
       {', '.join(wilson)},
       max(last_send_at) OVER (PARTITION BY campaign_id, send_date) < TIMESTAMPTZ '{closed_before}' AS is_window_closed
FROM grouped
"""


def breakdown(spark: SparkSession, read: dict[str, DataFrame], r: Any) -> None:
    """Time the parts of the outcomes' plan (each to the ``noop`` sink, twice, the better one; wall
    and CPU seconds): the events' scan, the per-message step, the orders, the plan rows, then the
    whole outcomes. What the last adds to the others is the per-user step."""
    from inboxlift.transforms import attribution as a

    def noop(frame: DataFrame) -> Callable[[], None]:
        return lambda: frame.write.format("noop").mode("overwrite").save()

    events = read["events"]
    steps = {
        "scan events (the columns read)": noop(events.select("event_id", "user_id", "event_type", "event_ts",
                                                             "order_id", "quantity", "price", "message_id",
                                                             "properties")),
        "per message (window by message_id)": noop(a._message_rows(read["outbox"], read["deliveries"], events)),
        "orders (grouped purchases)": noop(a.orders_of(events)),
        "plan rows (broadcast semi join)": noop(a._plan_rows(read["plan"], read["outbox"])),
        "outcomes (per-user sort and window)": noop(a.recipient_outcomes(
            read["plan"], read["outbox"], read["deliveries"], events, click_through_days=r.click_through_days,
            view_through_days=r.view_through_days, uplift_window_days=r.uplift_window_days)),
    }
    for name, action in steps.items():
        wall, cpu = min(timed_cpu(action), timed_cpu(action))
        print(f"  breakdown {name:<45} {wall:7.2f} s  CPU {cpu:6.2f} s", flush=True)


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def timed_cpu(action: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process and its children (the JVM, DuckDB's threads):
    on a shared machine the CPU says what the work costs, the wall time also counts the waiting."""
    cpu = tree_cpu_seconds(os.getpid()) or 0.0
    wall = timed(action)
    return wall, (tree_cpu_seconds(os.getpid()) or 0.0) - cpu


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="sent messages (default 1M)")
    parser.add_argument("--users", type=int, default=1_000_000, help="distinct users (default 1M)")
    parser.add_argument("--views", type=int, default=5_000_000, help="product views among the events (default 5M)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per engine; the best counts (default 2)")
    parser.add_argument("--keep-outcomes", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the outcomes' summary (a local checkpoint) before aggregating it, as the stage does "
                        "(default: yes)")
    parser.add_argument("--explain", action="store_true", help="print the Spark plan (explain('formatted'))")
    parser.add_argument("--breakdown", action="store_true",
                        help="before the timed runs, time the Spark plan's steps one prefix at a time")
    parser.add_argument("--keep", action="store_true", help="keep .bench/report (and reuse it next time)")
    parser.add_argument("--example", metavar="DIR", help="instead of timing: write the generated tables into a lake "
                        "under DIR and run the report stage on them (the README's example output)")
    return parser.parse_args(argv)


EXAMPLE_CAMPAIGNS = """
campaigns:
  c0: {type: weekly_picks, template: weekly_picks, subjects: {A: {en: a}, B: {en: b}}, split: {A: 0.5, B: 0.5},
       experiment: {horizon_days: 7}}
  c1: {type: win_back, template: win_back, subjects: {A: {en: a}, B: {en: b}}, split: {A: 0.5, B: 0.5},
       experiment: {horizon_days: 21}}
  c2: {type: cross_sell, template: cross_sell, subjects: {A: {en: a}}, split: {A: 1.0}}
  c3: {type: new_arrivals, template: new_arrivals, subjects: {A: {en: a}, B: {en: b}}, split: {A: 0.5, B: 0.5},
       experiment: {horizon_days: 7}}
"""


def run_example(spark: SparkSession, settings: Any, has_delta_jars: bool, *, folder: Path, messages: int,
                users: int, views: int) -> None:
    """The generated tables as Delta tables of a lake under ``folder``, then ``run_report`` at NOW."""
    import dataclasses

    from inboxlift.clock import FixedClock
    from inboxlift.context import RunContext
    from inboxlift.stages.report import run_report
    from inboxlift.storage import Lake

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "campaigns.yml").write_text(EXAMPLE_CAMPAIGNS, encoding="utf-8")
    settings = settings.with_overrides({
        "storage.lake_dir": str(folder / "lake"), "mlflow.tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "mlflow.artifact_location": str(folder / "artifacts"), "paths.output_dir": str(folder / "output"),
        "paths.campaigns_file": str(folder / "campaigns.yml")})
    lake = Lake.open(spark, settings.storage, has_delta_jars=has_delta_jars)
    data = folder / "parquet"
    plan_frame(spark, messages=messages, users=users).write.mode("overwrite").parquet(str(data / "plan"))
    plan = spark.read.parquet(str(data / "plan"))
    outbox_frame(plan).write.mode("overwrite").parquet(str(data / "outbox"))
    outbox = spark.read.parquet(str(data / "outbox"))
    deliveries_frame(outbox).write.mode("overwrite").parquet(str(data / "deliveries"))
    deliveries = spark.read.parquet(str(data / "deliveries"))
    events_frame(spark, outbox, deliveries, users=users, views=views).write.mode("overwrite").parquet(
        str(data / "events"))
    for table, name in (("campaign_plan", "plan"), ("outbox", "outbox"), ("deliveries", "deliveries"),
                        ("events", "events")):
        frame = spark.read.parquet(str(data / name))
        if lake.exists(table):
            lake.overwrite(table, frame.drop("id"))
        else:
            lake.append(table, frame.drop("id"))
    ctx = RunContext(spark=spark, settings=dataclasses.replace(settings), lake=lake,
                     clock=FixedClock.at(NOW.strftime("%Y-%m-%dT%H:%M:%S")))
    print(run_report(ctx).summary())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    os.chdir(ROOT)
    import duckdb

    from inboxlift.session import build_session, materialize
    from inboxlift.settings import load_settings

    from inboxlift.transforms.attribution import recipient_outcomes
    from inboxlift.transforms.campaign_results import (
        RESULT_COLUMNS,
        aggregate_results,
        bootstrap_revenue_sums,
        summarise_outcomes,
        z_value,
    )

    settings = load_settings("local", conf_dir="conf", overrides={
        "spark.checkpoint_dir": str(WORK_DIR / "ck"), "spark.ui_enabled": False})
    r = settings.report
    info = build_session(settings.spark, environ=os.environ, app_name="inboxlift-bench-report")
    spark = info.spark
    cores = os.cpu_count() or 2
    print(info.describe(), flush=True)
    data = WORK_DIR / f"data-{args.messages}-{args.users}-{args.views}"
    if args.example:
        try:
            run_example(spark, settings, info.has_delta_jars, folder=Path(args.example).absolute(),
                        messages=args.messages, users=args.users, views=args.views)
        finally:
            spark.stop()
        return 0
    try:
        if not (data / "_DONE").exists():
            shutil.rmtree(WORK_DIR, ignore_errors=True)
            started = time.perf_counter()
            plan_frame(spark, messages=args.messages, users=args.users).write.parquet(str(data / "plan"))
            plan = spark.read.parquet(str(data / "plan"))
            outbox_frame(plan).write.parquet(str(data / "outbox"))
            outbox = spark.read.parquet(str(data / "outbox"))
            deliveries_frame(outbox).write.parquet(str(data / "deliveries"))
            deliveries = spark.read.parquet(str(data / "deliveries"))
            events_frame(spark, outbox, deliveries, users=args.users, views=args.views).write.parquet(
                str(data / "events"))
            (data / "_DONE").touch()
            print(f"generated the tables in {time.perf_counter() - started:.1f} s", flush=True)
        read = {name: spark.read.parquet(str(data / name)) for name in ("plan", "outbox", "deliveries", "events")}
        sizes = {name: frame.count() for name, frame in read.items()}
        size_mb = sum(p.stat().st_size for p in data.rglob("*.parquet")) / 2**20
        print("rows: " + ", ".join(f"{k} {v:,d}" for k, v in sizes.items()) + f" ({size_mb:,.0f} MiB Parquet)",
              flush=True)

        closed = NOW - dt.timedelta(days=max(r.click_through_days, r.view_through_days, r.uplift_window_days))
        def outcomes_of() -> DataFrame:
            return recipient_outcomes(read["plan"], read["outbox"], read["deliveries"], read["events"],
                                      click_through_days=r.click_through_days,
                                      view_through_days=r.view_through_days,
                                      uplift_window_days=r.uplift_window_days)

        def spark_run() -> None:
            # As the stage does: the outcomes' summary kept as a local checkpoint (the stage reads it
            # again for the bootstrap), aggregated from it; --no-keep-outcomes aggregates it straight.
            summary = summarise_outcomes(outcomes_of())
            if args.keep_outcomes:
                summary = materialize(summary)
            result = aggregate_results(summary, alpha=r.alpha, window_closed_before=F.lit(closed))
            result.select(*RESULT_COLUMNS).write.format("noop").mode("overwrite").save()

        outcomes = outcomes_of()
        spark_result = aggregate_results(summarise_outcomes(outcomes), alpha=r.alpha,
                                         window_closed_before=F.lit(closed)).select(*RESULT_COLUMNS)
        if args.explain:
            spark_result.explain("formatted")
        sql = duckdb_sql(data, click_days=r.click_through_days, view_days=r.view_through_days,
                         uplift_days=r.uplift_window_days, z=z_value(r.alpha),
                         closed_before=closed.isoformat())
        con = duckdb.connect()
        con.execute(f"SET threads = {cores}")
        con.execute("SET TimeZone = 'UTC'")

        spark_times, duck_times, spark_cpu, duck_cpu = [], [], [], []
        for attempt in range(args.repeat):
            wall, cpu = timed_cpu(spark_run)
            spark_times.append(wall)
            spark_cpu.append(cpu)
            wall, cpu = timed_cpu(lambda: con.execute(f"CREATE OR REPLACE TEMP TABLE results AS {sql}"))
            duck_times.append(wall)
            duck_cpu.append(cpu)
            print(f"  try {attempt + 1}: Spark {spark_times[-1]:7.2f} s (CPU {spark_cpu[-1]:6.2f} s)   "
                  f"DuckDB {duck_times[-1]:7.2f} s (CPU {duck_cpu[-1]:6.2f} s)   load {os.getloadavg()[0]:.1f}",
                  flush=True)
        if args.breakdown:
            breakdown(spark, read, r)
        # As the stage runs it: over the kept summary (keeping it is part of the timed runs).
        kept = materialize(summarise_outcomes(outcomes_of()))
        boot_seconds, boot_cpu = timed_cpu(lambda: bootstrap_revenue_sums(
            kept, replicates=r.bootstrap_replicates, seed=r.bootstrap_seed).write.format("noop")
            .mode("overwrite").save())
        del kept

        spark_sums = spark_result.agg(F.count("*").alias("rows"),
                                      *[F.sum(c).alias(c) for c in COUNT_COLUMNS]).first().asDict()
        duck_row = con.execute("SELECT count(*), " + ", ".join(f"sum({c})" for c in COUNT_COLUMNS)
                               + " FROM results").fetchone()
        duck_sums = dict(zip(["rows", *COUNT_COLUMNS], duck_row))
        agree = all(int(spark_sums[k] or 0) == int(duck_sums[k] or 0) for k in spark_sums)
        best_spark, best_duck = min(spark_times), min(duck_times)
        ratio = best_spark / best_duck
        print()
        print(f"messages: {args.messages:,d}, users: {args.users:,d}, events: {sizes['events']:,d}, cores: {cores}")
        print(f"Spark  recipient_outcomes + aggregate_results: {best_spark:8.2f} s (best of {args.repeat})")
        print(f"DuckDB the same in SQL:                        {best_duck:8.2f} s (best of {args.repeat}, "
              f"{cores} threads)")
        print(f"ratio Spark / DuckDB: {ratio:.2f}x   goal: <= {GOAL:.0f}x   {'met' if ratio <= GOAL else 'NOT met'}")
        print(f"CPU seconds of those runs: Spark {spark_cpu[spark_times.index(best_spark)]:.2f}, DuckDB "
              f"{duck_cpu[duck_times.index(best_duck)]:.2f} (ratio by CPU "
              f"{spark_cpu[spark_times.index(best_spark)] / max(duck_cpu[duck_times.index(best_duck)], 1e-9):.2f}x); "
              f"load average now {os.getloadavg()[0]:.1f}")
        print(f"Spark Poisson bootstrap sums ({r.bootstrap_replicates} replicates) from the kept summary, "
              f"for information: {boot_seconds:.2f} s (CPU {boot_cpu:.2f} s)")
        print("column sums: " + ("the same in both" if agree else "DIFFERENT"))
        for key in spark_sums:
            print(f"  {key:<20} Spark {int(spark_sums[key] or 0):>12,d}   DuckDB {int(duck_sums[key] or 0):>12,d}")
        print(f"command: {command}")
        return 0 if agree and ratio <= GOAL and not math.isnan(ratio) else 1
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(WORK_DIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
