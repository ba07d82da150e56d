"""User-level feature aggregation: inboxlift's Spark transform against DuckDB on the same Parquet files.

Synthetic events (browsing sessions, orders, newsletters) are generated once with Spark built-ins and
saved as Parquet under ``.bench/features``. Then, in one run and alternating, ``--repeat`` times each:

- Spark: ``inboxlift.transforms.features.aggregate_user_activity`` — RFM raw values (orders, money,
  first / last order, last purchase), views / carts / purchases / distinct sessions over 7, 30 and
  90 days, email delivered / opened / clicked (distinct messages), last open / click, flags, first
  event and last activity — over ``spark.read.parquet`` of the files, materialised (``noop`` sink);
- DuckDB: the same aggregates in SQL over ``read_parquet`` of the same files, materialised as a
  temporary table, with as many threads as Spark has cores — written twice: with COUNT(DISTINCT ...)
  FILTER, as one would first write it, and two-level like the Spark transform (by session / order /
  message, then by user), which is several times faster in DuckDB.

The best time of each counts; the ratio is against the faster DuckDB query. A few users' rows are
compared value by value across all three.

    .venv/bin/python bench/bench_features.py [--events 20000000] [--users 1000000] [--repeat 2] [--keep]
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
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".bench" / "features"
AS_OF = dt.date(2026, 11, 20)
HISTORY_DAYS = 120
GOAL = 2.0  # Spark's time at most twice DuckDB's
# Event mix, in thousandths; the rest are views.
MIX = [("add_to_cart", 100), ("remove_from_cart", 20), ("purchase", 40), ("search", 100), ("review", 10),
       ("email_delivered", 100), ("email_open", 50), ("email_click", 15), ("unsubscribe", 2), ("bounce", 3)]
EMAIL = ("email_delivered", "email_open", "email_click")
ACTIVITY = ("view", "add_to_cart", "remove_from_cart", "purchase", "search", "review", "email_open", "email_click")


def _hash(seed: str, column: str = "id") -> Column:
    """A uniform non-negative 62-bit draw per row, different per ``seed``."""
    return F.abs(F.xxhash64(F.lit(seed), F.col(column))) % F.lit(2**62)


def events_frame(spark: SparkSession, *, events: int, users: int, items: int) -> DataFrame:
    """Events-shaped rows: users, sessions per user-day, orders per user-day, weekly newsletters; 1% after the cut-off."""
    cutoff_s = int(dt.datetime.combine(AS_OF + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc).timestamp())
    kind = _hash("type") % 1000
    event_type = F.lit("view")
    upper = 0
    for name, share in MIX:
        event_type = F.when((kind >= upper) & (kind < upper + share), F.lit(name)).otherwise(event_type)
        upper += share
    age_s = _hash("age") % (HISTORY_DAYS * 86_400)
    future = (_hash("future") % 100) == 0
    ts_s = F.when(future, F.lit(cutoff_s) + _hash("later") % 86_400).otherwise(F.lit(cutoff_s) - 1 - age_s)
    user = F.concat(F.lit("u"), (_hash("user") % users).cast("string"))
    day = F.floor(F.col("ts_s") / 86_400).cast("string")
    week = F.floor(F.col("ts_s") / (7 * 86_400)).cast("string")
    is_email = F.col("event_type").isin(*EMAIL)
    has_item = F.col("event_type").isin("view", "add_to_cart", "remove_from_cart", "purchase", "review")
    is_purchase = F.col("event_type") == "purchase"
    # Popular items are drawn more often: the square of a uniform draw leans towards small ids.
    item_rank = F.floor(F.pow((_hash("item") % 1_000_000) / 1_000_000.0, 2) * items).cast("long")
    base = spark.range(events).select("id", event_type.alias("event_type"), ts_s.alias("ts_s"), user.alias("user_id"))
    return base.select(
        F.concat(F.lit("e"), F.col("id").cast("string")).alias("event_id"),
        "event_type",
        F.timestamp_seconds("ts_s").alias("event_ts"),
        "user_id",
        F.when(has_item, F.concat(F.lit("i"), item_rank.cast("string"))).alias("item_id"),
        F.when(~is_email, F.concat_ws("-", "user_id", day, (_hash("session") % 2).cast("string"))).alias("session_id"),
        F.when(is_purchase, F.concat_ws("-", "user_id", day)).alias("order_id"),
        F.when(is_purchase, (1 + _hash("qty") % 3).cast("int")).alias("quantity"),
        F.when(is_purchase, ((100 + _hash("price") % 19_900) / 100).cast("decimal(12,2)")).alias("price"),
        F.when(F.col("event_type") == "review", (1 + _hash("rating") % 5).cast("int")).alias("rating"),
        F.when(is_email, F.concat_ws("-", "user_id", week)).alias("message_id"),
        F.to_date(F.timestamp_seconds("ts_s")).alias("event_date"),
    )


def _duck_window_starts(windows: list[int]) -> tuple[str, dict[int, str]]:
    cutoff = dt.datetime.combine(AS_OF + dt.timedelta(days=1), dt.time())
    return (f"TIMESTAMP '{cutoff.isoformat(sep=' ')}'",
            {d: f"TIMESTAMP '{(cutoff - dt.timedelta(days=d)).isoformat(sep=' ')}'" for d in windows})


def _duck_events(path: str, cutoff: str) -> str:
    return f"SELECT * FROM read_parquet('{path}/*.parquet') WHERE event_ts < {cutoff} AND user_id IS NOT NULL"


def duckdb_sql(path: str, windows: list[int]) -> str:
    """The aggregates of ``aggregate_user_activity`` as one would first write them: COUNT(DISTINCT ...) FILTER."""
    cutoff, start = _duck_window_starts(windows)
    emails = ", ".join(f"'{t}'" for t in EMAIL)
    activity = ", ".join(f"'{t}'" for t in ACTIVITY)
    per_window = []
    for d in windows:
        since = f"event_ts >= {start[d]}"
        per_window += [
            f"count(*) FILTER (WHERE event_type = 'view' AND {since}) AS views_{d}d",
            f"count(*) FILTER (WHERE event_type = 'add_to_cart' AND {since}) AS carts_{d}d",
            f"count(*) FILTER (WHERE event_type = 'purchase' AND {since}) AS purchases_{d}d",
            f"count(DISTINCT session_id) FILTER (WHERE event_type NOT IN ({emails}) AND {since}) AS sessions_{d}d",
        ]
    return f"""
    WITH ev AS ({_duck_events(path, cutoff)}),
    orders AS (
        SELECT user_id, min(event_ts) AS order_ts
        FROM ev WHERE event_type = 'purchase' GROUP BY user_id, coalesce(order_id, event_id)
    ),
    order_times AS (
        SELECT user_id, min(order_ts) AS first_order_ts, max(order_ts) AS last_order_ts FROM orders GROUP BY user_id
    ),
    per_user AS (
        SELECT user_id,
            min(event_ts) AS first_event_ts,
            max(event_ts) FILTER (WHERE event_type IN ({activity})) AS last_activity_ts,
            {", ".join(per_window)},
            count(DISTINCT coalesce(order_id, event_id)) FILTER (WHERE event_type = 'purchase') AS orders,
            CAST(coalesce(sum(coalesce(quantity, 1) * price) FILTER (WHERE event_type = 'purchase'), 0)
                 AS DECIMAL(18, 2)) AS monetary,
            max(event_ts) FILTER (WHERE event_type = 'purchase') AS last_purchase_ts,
            count(*) FILTER (WHERE event_type = 'review') AS reviews_written,
            count(DISTINCT coalesce(message_id, event_id)) FILTER (WHERE event_type IN ({emails})) AS emails_delivered,
            count(DISTINCT coalesce(message_id, event_id))
                FILTER (WHERE event_type IN ('email_open', 'email_click')) AS emails_opened,
            count(DISTINCT coalesce(message_id, event_id)) FILTER (WHERE event_type = 'email_click') AS emails_clicked,
            max(event_ts) FILTER (WHERE event_type IN ('email_open', 'email_click')) AS last_open_ts,
            max(event_ts) FILTER (WHERE event_type = 'email_click') AS last_click_ts,
            coalesce(bool_or(event_type = 'unsubscribe'), false) AS is_unsubscribed,
            coalesce(bool_or(event_type = 'bounce'), false) AS is_bounced
        FROM ev GROUP BY user_id
    )
    SELECT per_user.*, order_times.first_order_ts, order_times.last_order_ts
    FROM per_user LEFT JOIN order_times USING (user_id)
    """


def duckdb_two_level_sql(path: str, windows: list[int]) -> str:
    """The same aggregates the way the Spark transform computes them: by (user, session / order / message)
    first, then by user. Much faster in DuckDB than several COUNT(DISTINCT ...), so it is the fair peer."""
    cutoff, start = _duck_window_starts(windows)
    emails = ", ".join(f"'{t}'" for t in EMAIL)
    activity = ", ".join(f"'{t}'" for t in ACTIVITY)
    is_email = f"event_type IN ({emails})"
    counts = [f"count(*) FILTER (WHERE is_home AND event_type = '{kind}' AND event_ts >= {start[d]}) AS {name}_{d}d"
              for d in windows for name, kind in (("views", "view"), ("carts", "add_to_cart"),
                                                  ("purchases", "purchase"))]
    sums = [f"CAST(sum({name}_{d}d) AS BIGINT) AS {name}_{d}d" for d in windows for name in ("views", "carts", "purchases")]
    sessions = [f"count(*) FILTER (WHERE kind = 's' AND key IS NOT NULL AND last_ts >= {start[d]}) AS sessions_{d}d"
                for d in windows]
    return f"""
    WITH ev AS ({_duck_events(path, cutoff)}),
    keyed AS (
        SELECT user_id, event_type, event_ts, quantity, price, TRUE AS is_home,
            CASE WHEN {is_email} THEN 'm' WHEN event_type = 'purchase' THEN 'o' ELSE 's' END AS kind,
            CASE WHEN {is_email} THEN coalesce(message_id, event_id)
                 WHEN event_type = 'purchase' THEN coalesce(order_id, event_id) ELSE session_id END AS key
        FROM ev
        UNION ALL
        SELECT user_id, event_type, event_ts, quantity, price, FALSE, 's', session_id
        FROM ev WHERE event_type = 'purchase' AND session_id IS NOT NULL
    ),
    groups AS (
        SELECT user_id, kind, key, min(event_ts) AS first_ts, max(event_ts) AS last_ts,
            min(event_ts) FILTER (WHERE is_home) AS first_home_ts,
            {", ".join(counts)},
            sum(coalesce(quantity, 1) * price) FILTER (WHERE is_home AND event_type = 'purchase') AS value,
            count(*) FILTER (WHERE is_home AND event_type = 'review') AS reviews,
            count(*) FILTER (WHERE is_home AND event_type IN ('email_open', 'email_click')) AS opens,
            count(*) FILTER (WHERE is_home AND event_type = 'email_click') AS clicks,
            max(event_ts) FILTER (WHERE is_home AND event_type IN ('email_open', 'email_click')) AS last_open_ts,
            max(event_ts) FILTER (WHERE is_home AND event_type = 'email_click') AS last_click_ts,
            max(event_ts) FILTER (WHERE is_home AND event_type IN ({activity})) AS last_activity_ts,
            count(*) FILTER (WHERE is_home AND event_type = 'unsubscribe') AS unsubscribes,
            count(*) FILTER (WHERE is_home AND event_type = 'bounce') AS bounces
        FROM keyed GROUP BY user_id, kind, key
    )
    SELECT user_id, min(first_ts) AS first_event_ts, max(last_activity_ts) AS last_activity_ts,
        {", ".join(sums)}, {", ".join(sessions)},
        count(*) FILTER (WHERE kind = 'o') AS orders,
        CAST(coalesce(sum(value) FILTER (WHERE kind = 'o'), 0) AS DECIMAL(18, 2)) AS monetary,
        min(first_home_ts) FILTER (WHERE kind = 'o') AS first_order_ts,
        max(first_home_ts) FILTER (WHERE kind = 'o') AS last_order_ts,
        max(last_ts) FILTER (WHERE kind = 'o') AS last_purchase_ts,
        CAST(sum(reviews) AS BIGINT) AS reviews_written,
        count(*) FILTER (WHERE kind = 'm') AS emails_delivered,
        count(*) FILTER (WHERE kind = 'm' AND opens > 0) AS emails_opened,
        count(*) FILTER (WHERE kind = 'm' AND clicks > 0) AS emails_clicked,
        max(last_open_ts) AS last_open_ts, max(last_click_ts) AS last_click_ts,
        sum(unsubscribes) > 0 AS is_unsubscribed, sum(bounces) > 0 AS is_bounced
    FROM groups GROUP BY user_id
    """


def _table(query_name: str) -> str:
    return "activity_" + query_name.replace("-", "_")


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _normalise(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, Decimal):
        return value.quantize(Decimal("0.01"))
    return value


def compare_sample(spark_rows: list[dict], duck_rows: list[dict]) -> list[str]:
    """Differences between the two engines' rows for the sampled users (empty when they agree)."""
    problems = []
    duck = {r["user_id"]: r for r in duck_rows}
    for row in spark_rows:
        other = duck.get(row["user_id"])
        if other is None:
            problems.append(f"{row['user_id']}: missing from DuckDB")
            continue
        for name, value in row.items():
            if _normalise(value) != _normalise(other[name]):
                problems.append(f"{row['user_id']}.{name}: Spark {value!r}, DuckDB {other[name]!r}")
    return problems


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000_000, help="events to generate (default 20M)")
    parser.add_argument("--users", type=int, default=1_000_000, help="distinct users (default 1M)")
    parser.add_argument("--items", type=int, default=20_000, help="distinct items (default 20k)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per engine; the best counts (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep .bench/features (and reuse it next time)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    os.chdir(ROOT)
    import duckdb

    from inboxlift.session import build_session
    from inboxlift.settings import load_settings
    from inboxlift.transforms.features import aggregate_user_activity

    settings = load_settings("local", conf_dir="conf", overrides={
        "spark.checkpoint_dir": str(WORK_DIR / "ck"),
        "spark.ui_enabled": False,
    })
    info = build_session(settings.spark, environ=os.environ, app_name="inboxlift-bench-features")
    spark = info.spark
    cores = os.cpu_count() or 2  # local[*]: one Spark task slot per core, one DuckDB thread per core
    print(info.describe(), flush=True)
    data_dir = WORK_DIR / f"events-{args.events}-{args.users}-{args.items}"
    try:
        if not (data_dir / "_SUCCESS").exists():
            shutil.rmtree(WORK_DIR, ignore_errors=True)
            frame = events_frame(spark, events=args.events, users=args.users, items=args.items)
            seconds = timed(lambda: frame.write.mode("overwrite").parquet(str(data_dir)))
            print(f"generated {args.events:,d} events for {args.users:,d} users in {seconds:.1f} s", flush=True)
        size_mb = sum(p.stat().st_size for p in data_dir.glob("*.parquet")) / 2**20
        print(f"data: {data_dir.relative_to(ROOT)} ({size_mb:,.0f} MiB Parquet)", flush=True)

        feature_settings = settings.features
        windows = list(feature_settings.activity_windows_days)
        events = spark.read.parquet(str(data_dir))
        spark_result = events.transform(aggregate_user_activity, as_of=AS_OF, settings=feature_settings)
        con = duckdb.connect()
        con.execute(f"SET threads = {cores}")
        con.execute("SET TimeZone = 'UTC'")
        queries = {"distinct": duckdb_sql(str(data_dir), windows), "two-level": duckdb_two_level_sql(str(data_dir), windows)}

        spark_times: list[float] = []
        duck_times: dict[str, list[float]] = {name: [] for name in queries}
        for attempt in range(args.repeat):
            spark_times.append(timed(lambda: spark_result.write.format("noop").mode("overwrite").save()))
            for name, sql in queries.items():
                duck_times[name].append(timed(lambda: con.execute(f"CREATE OR REPLACE TEMP TABLE {_table(name)} AS {sql}")))
            print(f"  try {attempt + 1}: Spark {spark_times[-1]:7.2f} s   "
                  + "   ".join(f"DuckDB {name} {times[-1]:7.2f} s" for name, times in duck_times.items()), flush=True)

        reference = _table("two-level")
        users_out = con.execute(f"SELECT count(*) FROM {reference}").fetchone()[0]
        sample = [r[0] for r in con.execute(
            f"SELECT user_id FROM {reference} WHERE orders >= 2 AND emails_opened >= 1 ORDER BY user_id LIMIT 3").fetchall()]
        sample += [r[0] for r in con.execute(
            f"SELECT user_id FROM {reference} WHERE orders = 0 ORDER BY user_id LIMIT 2").fetchall()]
        spark_rows = [r.asDict() for r in spark_result.where(F.col("user_id").isin(sample)).collect()]
        problems = []
        for name in queries:
            cursor = con.execute(f"SELECT * FROM {_table(name)} WHERE user_id IN (SELECT unnest(?))", [sample])
            names = [d[0] for d in cursor.description]
            problems += [f"[{name}] {p}" for p in compare_sample(spark_rows, [dict(zip(names, r)) for r in cursor.fetchall()])]
            problems += [f"[{name}] {n} users" for (n,) in con.execute(
                f"SELECT count(*) FROM {_table(name)}").fetchall() if n != users_out]
        spark_users = spark_result.count()

        best_spark = min(spark_times)
        best_duck = {name: min(times) for name, times in duck_times.items()}
        fastest = min(best_duck, key=best_duck.get)
        ratio = best_spark / best_duck[fastest]
        print()
        print(f"events: {args.events:,d} ({size_mb:,.0f} MiB), users with events: {users_out:,d} "
              f"(Spark {spark_users:,d}), cores: {cores}")
        print(f"Spark  aggregate_user_activity:          {best_spark:8.2f} s (best of {args.repeat})")
        for name, seconds in best_duck.items():
            print(f"DuckDB same aggregates, {name + ' SQL:':15s} {seconds:8.2f} s (best of {args.repeat}, {cores} threads)")
        print(f"ratio Spark / fastest DuckDB ({fastest}): {ratio:.2f}x   goal: <= {GOAL:.0f}x   "
              f"{'met' if ratio <= GOAL else 'NOT met'}")
        agree = not problems and users_out == spark_users
        print(f"sampled users {sample}: {'same values in all three' if agree else 'DIFFERENT'}")
        for problem in problems[:20]:
            print("  " + problem)
        print(f"command: {command}")
        return 0 if agree and ratio <= GOAL and not math.isnan(ratio) else 1
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(WORK_DIR, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
