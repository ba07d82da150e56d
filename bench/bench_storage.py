"""Storage throughput: the delta-rs backend against Spark's plain Parquet writer and reader.

One events-shaped DataFrame is generated once and written to a plain Parquet
source, so generation cost is left out; every timed write then reads that same
source (same files, same task count). Each case is timed for both peers in the
same run, in alternating order, ``--repeat`` times; the best time counts.

    .venv/bin/python bench/bench_storage.py [--rows N] [--repeat N] [--partitioned | --no-partitioned]

Writes go into a fresh table (or folder) each time. Reads are a full scan that
materialises every column (the ``noop`` sink). Data lives under ``.bench/storage``
and is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".bench" / "storage"
TABLE = "bench_events"
PARTITION_COLUMN = "event_date"
EVENT_DAYS = 30
# Goals from the issue: delta-rs throughput as a share of plain Parquet's.
WRITE_GOAL = 0.85
READ_GOAL = 0.95

EVENT_TYPES = ["view", "click", "add_to_cart", "purchase", "search", "wishlist", "email_open"]
USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "okhttp/4.12.0",
    "InboxliftApp/3.2 (Android 14)",
]


@dataclass(frozen=True)
class Timing:
    case: str
    layout: str
    engine: str
    rows: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def _pick(values: list[str], index: Column) -> Column:
    return F.element_at(F.array(*[F.lit(v) for v in values]), (index % len(values) + 1).cast("int"))


def events_frame(spark: SparkSession, rows: int) -> DataFrame:
    """Events-like rows from ``spark.range``: string ids, a timestamp, a date, ints, a decimal, strings."""
    ids = spark.range(rows)
    # A multiplicative scramble so every task holds every date, as landed events do.
    scrambled = (F.col("id") * 2_654_435_761) % 1_000_003
    event_ts = F.timestamp_seconds(F.lit(1_717_200_000) + (F.col("id") * 104_729) % (EVENT_DAYS * 86_400))
    is_purchase = (F.col("id") % len(EVENT_TYPES)) == EVENT_TYPES.index("purchase")
    return ids.select(
        F.concat(F.lit("evt-"), F.lpad(F.hex("id"), 12, "0")).alias("event_id"),
        F.concat(F.lit("u"), (scrambled % 250_000).cast("string")).alias("user_id"),
        F.substring(F.sha1(F.col("id").cast("string")), 1, 20).alias("session_id"),
        event_ts.alias("event_ts"),
        F.to_date(event_ts).alias(PARTITION_COLUMN),
        _pick(EVENT_TYPES, F.col("id")).alias("event_type"),
        (scrambled % 5_000).cast("int").alias("product_id"),
        (F.col("id") % 5 + 1).cast("int").alias("quantity"),
        F.when(is_purchase, (scrambled / 100).cast("decimal(12,2)")).alias("amount"),
        F.concat(F.lit("https://shop.example/p/"), (scrambled % 5_000).cast("string"),
                 F.lit("?ref="), F.repeat(F.lit("x"), (F.col("id") % 40).cast("int"))).alias("url"),
        _pick(USER_AGENTS, scrambled).alias("user_agent"),
        F.when(F.col("id") % 3 == 0, F.lit(None)).otherwise(_pick(["fr", "de", "es", "it", "nl"], scrambled))
        .alias("country"),
    )


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def full_scan(frame: DataFrame) -> None:
    """Materialise every column of every row without keeping the result."""
    frame.write.format("noop").mode("overwrite").save()


def run_layout(spark: SparkSession, lake, source: DataFrame, *, rows: int, repeat: int,
               partitioned: bool) -> list[Timing]:
    layout = f"partitioned by {PARTITION_COLUMN}" if partitioned else "unpartitioned"
    parquet_dir = WORK_DIR / ("parquet_partitioned" if partitioned else "parquet")
    table_dir = Path(lake.location(TABLE))
    partition_by = [PARTITION_COLUMN] if partitioned else None

    def write_parquet() -> None:
        writer = source.write.mode("overwrite")
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(str(parquet_dir))

    def write_deltars() -> None:
        lake.append(TABLE, source, partition_by=partition_by)

    def fresh(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    peers = {
        "write": [("parquet", lambda: fresh(parquet_dir), write_parquet),
                  ("delta-rs", lambda: fresh(table_dir), write_deltars)],
        "read": [("parquet", lambda: None, lambda: full_scan(spark.read.parquet(str(parquet_dir)))),
                 ("delta-rs", lambda: None, lambda: full_scan(lake.read(TABLE)))],
    }
    timings: list[Timing] = []
    for case, engines in peers.items():
        if case == "read":
            check_rows(spark, lake, parquet_dir, rows)
        for attempt in range(repeat):
            # Alternate which peer goes first, so neither always runs on a warmer (or busier) machine.
            order = engines if attempt % 2 == 0 else engines[::-1]
            for engine, prepare, action in order:
                prepare()
                seconds = timed(action)
                timings.append(Timing(case, layout, engine, rows, seconds))
                print(f"  {case:5s} {layout:26s} {engine:8s} try {attempt + 1}: {seconds:7.2f} s", flush=True)
    return timings


def check_rows(spark: SparkSession, lake, parquet_dir: Path, rows: int) -> None:
    """Both peers hold every row before their reads are timed (row counts from metadata, not a scan)."""
    counts = {"parquet": spark.read.parquet(str(parquet_dir)).count(), "delta-rs": lake.info(TABLE).rows}
    wrong = {engine: n for engine, n in counts.items() if n != rows}
    if wrong:
        raise RuntimeError(f"expected {rows:,d} rows after the writes, found {wrong}")


def report(timings: list[Timing], command: str, repeat: int) -> bool:
    """Print the best time of each case and peer, with the ratio to Parquet; True when all goals pass."""
    best: dict[tuple[str, str, str], Timing] = {}
    for t in timings:
        key = (t.case, t.layout, t.engine)
        if key not in best or t.seconds < best[key].seconds:
            best[key] = t
    header = f"{'case':6s} {'layout':26s} {'engine':9s} {'rows':>11s} {'seconds':>8s} {'rows/s':>12s} " \
             f"{'ratio':>6s} {'goal':>6s} result"
    print("\n" + header + "\n" + "-" * len(header))
    all_pass = True
    for (case, layout, engine), t in best.items():
        baseline = best[(case, layout, "parquet")]
        ratio = t.rows_per_second / baseline.rows_per_second
        if engine == "parquet":
            goal, verdict = "", ""
        else:
            goal_value = WRITE_GOAL if case == "write" else READ_GOAL
            passed = ratio >= goal_value
            all_pass &= passed
            goal, verdict = f"{goal_value:.2f}", "PASS" if passed else "FAIL"
        print(f"{case:6s} {layout:26s} {engine:9s} {t.rows:>11,d} {t.seconds:>8.2f} {t.rows_per_second:>12,.0f} "
              f"{ratio:>6.2f} {goal:>6s} {verdict}")
    print(f"\nbest of {repeat} per peer, peers alternating; ratio = delta-rs rows/s ÷ Parquet rows/s")
    print(f"command: {command}")
    return all_pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in the DataFrame (default 10,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per peer; the best counts (default 3)")
    parser.add_argument("--partitioned", action=argparse.BooleanOptionalAction, default=None,
                        help=f"only the layout partitioned by {PARTITION_COLUMN} (--no-partitioned: only the "
                             "unpartitioned one); both by default")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark configuration for the session, for both peers (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep .bench/storage afterwards, to inspect it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])

    # Built like a job builds it; the storage backend is pinned so the bench never measures native Delta.
    os.chdir(ROOT)
    from inboxlift.session import build_session
    from inboxlift.settings import load_settings
    from inboxlift.storage import Lake

    extra_conf = dict(item.split("=", 1) for item in args.conf)
    settings = load_settings("local", conf_dir="conf", overrides={
        "storage.backend": "deltars",
        "storage.lake_dir": str(WORK_DIR / "lake"),
        "spark.checkpoint_dir": str(WORK_DIR / "ck"),
        "spark.ui_enabled": False,
        **({"spark.extra_conf": extra_conf} if extra_conf else {}),
    })
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    info = build_session(settings.spark, environ=os.environ, app_name="inboxlift-bench-storage")
    spark = info.spark
    lake = Lake.open(spark, settings.storage, has_delta_jars=info.has_delta_jars)
    print(info.describe(), f"backend {lake.backend.name}", flush=True)

    layouts = [False, True] if args.partitioned is None else [args.partitioned]
    try:
        source_dir = WORK_DIR / "source"
        seconds = timed(lambda: events_frame(spark, args.rows).write.mode("overwrite").parquet(str(source_dir)))
        source = spark.read.parquet(str(source_dir))
        tasks = source.rdd.getNumPartitions()
        print(f"source: {args.rows:,d} rows, {tasks} read tasks, generated in {seconds:.1f} s", flush=True)
        timings: list[Timing] = []
        for partitioned in layouts:
            timings += run_layout(spark, lake, source, rows=args.rows, repeat=args.repeat, partitioned=partitioned)
        all_pass = report(timings, command, args.repeat)
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(WORK_DIR, ignore_errors=True)
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
