"""Rendering at scale: Spark's mapInArrow path against plain Jinja2 in one Python process, same run.

One plan (N recipients x P products each), a user table and a catalogue are generated once (fixed
seed) and written as Parquet. Each peer then turns those files into rendered messages:

- **Spark**: read the Parquet files -> ``inboxlift.render.frames.render_plan``, as the render stage
  calls it (repartition by user, join users, join the planned products map-side or, with
  ``--spark-join``, explode/join/re-aggregate them in Spark, then ``mapInArrow`` with one sandboxed
  environment per Python worker) -> a count and a checksum of every HTML body (so every message is
  really rendered and nothing is written out).
- **plain**: read the same files with pyarrow, join users and products through Python dicts, and
  call the same row function (``inboxlift.render.message.render_row``: same templates, same Jinja2
  environment, same Babel formatting) for every recipient, summing the same checksum.

Both produce the same messages (the checksums must match). The rate per core is messages/s divided
by the cores doing the work: Spark's ``local[N]`` N, and 1 for the plain process.

The default is 1M messages (the issue asks for at least 200k). Each Spark run pays some fixed costs:
the driver's planning and the catalogue fetch, the shuffle stage's start, and the JIT still compiling
per-batch and per-query code (3.4 s of C2 CPU in the first timed run, 0.9 s by the fourth). At 200k
(a 42 s run) these weigh 4-5% and the ratio varied from 0.81 to 0.87. At 1M (a 200 s run) they weigh
under 1%, as in a job over millions of customers.

    .venv/bin/python bench/bench_render.py [--messages 1000000] [--products 10] [--catalogue 5000]
        [--cores N] [--repeat 2] [--warmup 40000] [--batch-rows 10000] [--spark-join] [--breakdown]
        [--conf KEY=VALUE ...] [--keep]

Goal from issue 7: Spark's per-core rate >= 0.85 x the plain rate; the script exits 1 when missed.
Data lives under ``.bench/render`` and is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import sys
import time
import zlib
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".bench" / "render"
GOAL = 0.85
KEY = b"bench-signing-key-0123456789abcdef"
RENDERED_AT = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc)
SUBJECTS = {"A": "{{ first_name or 'Hi there' }}, your picks for this week",
            "B": "This week's picks for you{% if first_name %}, {{ first_name }}{% endif %}"}
FIRST_NAMES = ["Ann", "Bob", "Chen", "Dara", "Eve", "Femi", "Gus", "Hana", "李雷", "Zoë", None]
SEGMENTS = ["VIP loyal", "bargain hunters", "browsers", "loyal regulars", "occasional shoppers"]


def generate(folder: Path, *, messages: int, products: int, catalogue: int, files: int, seed: int = 7) -> None:
    """Users, products and a plan of ``messages`` weekly-picks rows, as Parquet files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    item_ids = np.array([f"item-{i:06d}" for i in range(catalogue)])
    cents = rng.integers(199, 250_000, size=catalogue)
    pq.write_table(pa.table({
        "item_id": item_ids,
        "name": [f"Product {i} {'Deluxe ' * int(i % 3)}edition" for i in range(catalogue)],
        "brand": [f"Brand {i % 40}" if i % 5 else None for i in range(catalogue)],
        "category": [f"Category {i % 25}" for i in range(catalogue)],
        "price": pa.array([Decimal(int(c)).scaleb(-2) for c in cents], pa.decimal128(12, 2)),
        "currency": ["USD"] * catalogue,
        "image_url": [f"https://img.shop.example/{i}.jpg" for i in item_ids],
        "url": [f"https://shop.example/p/{i}" for i in item_ids],
        "in_stock": [True] * catalogue,
    }), folder / "products.parquet")

    user_ids = np.array([f"user-{i:08d}" for i in range(messages)])
    names = [FIRST_NAMES[i % len(FIRST_NAMES)] for i in range(messages)]
    zh = rng.random(messages) < 0.2
    (folder / "users").mkdir(exist_ok=True)
    (folder / "plan").mkdir(exist_ok=True)
    # Items drawn with replacement: a repeated item in one email is rare and harmless here.
    picks = rng.integers(0, catalogue, size=(messages, products))
    send_hours = rng.integers(6, 21, size=messages)
    for f, part in enumerate(np.array_split(np.arange(messages), files)):
        pq.write_table(pa.table({
            "user_id": user_ids[part],
            "email": [f"{u}@mail.example" for u in user_ids[part]],
            "first_name": [names[i] for i in part],
            "locale": ["zh-CN" if zh[i] else "en" for i in part],
            "timezone": ["Asia/Shanghai" if zh[i] else "Europe/London" for i in part],
            "email_consent": [True] * len(part),
        }), folder / "users" / f"part-{f:03d}.parquet")
        variants = ["A" if i % 2 == 0 else "B" for i in part]
        pq.write_table(pa.table({
            "campaign_id": ["weekly-2026-47"] * len(part),
            "campaign_type": ["weekly_picks"] * len(part),
            "user_id": user_ids[part],
            "variant": variants,
            "template": ["weekly_picks"] * len(part),
            "locale": ["zh-CN" if zh[i] else "en" for i in part],
            "subject_template": [SUBJECTS[v] for v in variants],
            "send_at": pa.array([dt.datetime(2026, 11, 21, int(send_hours[i]), tzinfo=dt.timezone.utc) for i in part],
                                pa.timestamp("us", tz="UTC")),
            "item_ids": [item_ids[picks[i]].tolist() for i in part],
            "item_sources": [["als"] * (products - 2) + ["content"] * 2 for _ in part],
            "context": pa.array([[("segment_name", SEGMENTS[i % len(SEGMENTS)])] for i in part],
                                pa.map_(pa.string(), pa.string())),
            "plan_run_id": ["bench"] * len(part),
        }), folder / "plan" / f"part-{f:03d}.parquet")


def tree_cpu_seconds(root_pid: int) -> float | None:
    """CPU seconds (user + system, with reaped children) of a process and all its descendants, from
    /proc (Linux); None elsewhere. On a shared machine this measures the work itself, not the wait."""
    proc = Path("/proc")
    if not (proc / str(root_pid)).exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = sum(int(x) for x in fields[11:15]) / tick
    total, stack = 0.0, [root_pid]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack += [child for child, parent in parents.items() if parent == pid]
    return total


def config():
    from inboxlift.render.message import RenderConfig
    from inboxlift.settings import RenderSettings

    return RenderConfig.from_settings(RenderSettings(), signing_key=KEY, rendered_at=RENDERED_AT)


def run_spark(spark, folder: Path, *, task_catalogue_max_items: int) -> tuple[float, float | None, int, int]:
    from pyspark.sql import functions as F

    from inboxlift.render.frames import render_partitions, render_plan

    jvm = spark.sparkContext._gateway.proc.pid  # type: ignore[union-attr]
    cpu_before = tree_cpu_seconds(jvm)
    started = time.perf_counter()
    plan = spark.read.parquet(str(folder / "plan"))
    users = spark.read.parquet(str(folder / "users"))
    products = spark.read.parquet(str(folder / "products.parquet"))
    rendered = render_plan(plan, users=users, products=products, config=config(),
                           partitions=render_partitions(spark), task_catalogue_max_items=task_catalogue_max_items)
    row = rendered.agg(F.count(F.col("message_id")).alias("n"),
                       F.sum(F.crc32(F.col("html"))).alias("checksum")).collect()[0]
    seconds = time.perf_counter() - started
    cpu_after = tree_cpu_seconds(jvm)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return seconds, cpu, row["n"], int(row["checksum"] or 0)


def _no_render(batches):
    import pyarrow as pa

    for batch in batches:
        yield pa.RecordBatch.from_arrays([pa.array([batch.num_rows], pa.int64())], names=["rows"])


def run_spark_pipeline_only(spark, folder: Path, *, task_catalogue_max_items: int) -> float:
    """The Spark peer without rendering (the same joins, a mapInArrow that only counts): its overhead."""
    from pyspark.sql import functions as F

    from inboxlift.render.frames import render_partitions, task_catalogue, with_addresses, with_planned_products

    started = time.perf_counter()
    plan = spark.read.parquet(str(folder / "plan"))
    products = spark.read.parquet(str(folder / "products.parquet"))
    recipients = with_addresses(plan, users=spark.read.parquet(str(folder / "users")),
                                partitions=render_partitions(spark))
    if task_catalogue(plan, products, max_items=task_catalogue_max_items) is None:
        recipients = with_planned_products(recipients, products=products)
    recipients.mapInArrow(_no_render, "rows long").agg(F.sum("rows")).collect()
    return time.perf_counter() - started


def run_plain(folder: Path) -> tuple[float, float | None, int, int]:
    from inboxlift.render.message import render_row

    started, cpu_started = time.perf_counter(), time.process_time()
    cfg = config()
    catalogue = {p["item_id"]: p for p in pq.read_table(folder / "products.parquet").to_pylist()}
    users = {u["user_id"]: u for u in pq.read_table(folder / "users").to_pylist()}
    count = checksum = 0
    for batch in pq.read_table(folder / "plan").to_batches(max_chunksize=10_000):
        for plan in batch.to_pylist():
            user = users.get(plan["user_id"])
            row = {**plan, **(user or {}), "locale": plan["locale"], "has_user": user is not None}
            row["products"] = [
                {"position": pos, "item_id": item, "source": source, **catalogue.get(item, {}),
                 "is_found": True if item in catalogue else None}
                for pos, (item, source) in enumerate(zip(plan["item_ids"], plan["item_sources"]))
            ]
            out = render_row(row, cfg)
            if out["reason"] is None:
                count += 1
                checksum += zlib.crc32(out["html"].encode("utf-8"))
    return time.perf_counter() - started, time.process_time() - cpu_started, count, checksum


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000,
                        help="recipients (default 1,000,000; the issue asks for at least 200,000)")
    parser.add_argument("--products", type=int, default=10, help="products per message (default 10)")
    parser.add_argument("--catalogue", type=int, default=5000, help="products in the catalogue (default 5,000)")
    parser.add_argument("--cores", type=int, default=0, help="Spark's local[N] (default: every core)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="timed runs per peer, alternating; the best counts (default 2)")
    parser.add_argument("--warmup", type=int, default=40_000,
                        help="messages of the untimed warm-up run of each peer (default 40,000, at most --messages)")
    parser.add_argument("--batch-rows", type=int, default=10_000,
                        help="spark.sql.execution.arrow.maxRecordsPerBatch (default 10,000, Spark's default)")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark configuration (repeatable)")
    parser.add_argument("--spark-join", action="store_true",
                        help="join the products in Spark (explode, join, re-aggregate) instead of map-side, as "
                             "render.task_catalogue_max_items = 0 does")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the Spark peer without rendering (joins and Arrow transfer only)")
    parser.add_argument("--keep", action="store_true", help="keep .bench/render afterwards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    os.chdir(ROOT)
    from inboxlift.session import build_session
    from inboxlift.settings import RenderSettings, load_settings

    cores = args.cores or os.cpu_count() or 1
    extra_conf = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(args.batch_rows),
                  **dict(item.split("=", 1) for item in args.conf)}
    settings = load_settings("local", conf_dir="conf", overrides={
        "spark.master": f"local[{cores}]",
        "spark.checkpoint_dir": str(WORK_DIR / "ck"),
        "spark.ui_enabled": False,
        "spark.extra_conf": extra_conf,
    })
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    data = WORK_DIR / "data"
    started = time.perf_counter()
    generate(data, messages=args.messages, products=args.products, catalogue=args.catalogue, files=cores)
    print(f"data: {args.messages:,d} messages x {args.products} products, catalogue {args.catalogue:,d}, "
          f"generated in {time.perf_counter() - started:.1f} s", flush=True)
    info = build_session(settings.spark, environ=os.environ, app_name="inboxlift-bench-render")
    spark = info.spark
    print(info.describe(), flush=True)
    best: dict[str, tuple[float, float | None, int, int]] = {}
    try:
        # A warm-up run of each peer on data of its own: the JVM's JIT, Python workers and template
        # compilation are not what is measured. 5,000 messages left the JVM compiling through the first
        # timed run (46.4 s against 41.9 s for the second at 200k); 40,000 leave both timed runs warm.
        warm = WORK_DIR / "warm"
        generate(warm, messages=max(200, min(args.messages, args.warmup)), products=args.products,
                 catalogue=min(args.catalogue, 1000), files=cores)
        max_items = 0 if args.spark_join else RenderSettings().task_catalogue_max_items
        print(f"products joined {'in Spark' if args.spark_join else 'map-side'}", flush=True)
        run_spark(spark, warm, task_catalogue_max_items=max_items)
        run_plain(warm)
        for attempt in range(args.repeat):
            order = [("spark", lambda: run_spark(spark, data, task_catalogue_max_items=max_items)), ("plain", lambda: run_plain(data))]
            for name, run in (order if attempt % 2 == 0 else order[::-1]):
                seconds, cpu, count, checksum = run()
                cpu_text = f"{cpu:8.1f} s CPU" if cpu is not None else "CPU n/a"
                print(f"  {name:<6} run {attempt + 1}: {seconds:8.1f} s wall  {cpu_text}  {count:,d} messages",
                      flush=True)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, cpu, count, checksum)
        if args.breakdown:
            seconds = run_spark_pipeline_only(spark, data, task_catalogue_max_items=max_items)
            print(f"  spark without rendering (joins, Arrow transfer): {seconds:8.1f} s", flush=True)
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(WORK_DIR, ignore_errors=True)

    spark_s, spark_cpu, spark_n, spark_sum = best["spark"]
    plain_s, plain_cpu, plain_n, plain_sum = best["plain"]
    spark_rate = spark_n / spark_s / cores
    plain_rate = plain_n / plain_s
    ratio = spark_rate / plain_rate
    same = (spark_n, spark_sum) == (plain_n, plain_sum)
    print(f"\n{command}")
    print(f"{'peer':<8}{'cores':>6}{'seconds':>10}{'messages':>12}{'msg/s':>10}{'msg/s/core':>12}"
          f"{'CPU s':>10}{'msg/CPU s':>11}")

    def cpu_columns(cpu: float | None, n: int) -> str:
        return f"{cpu:>10.1f}{n / cpu:>11.0f}" if cpu else f"{'n/a':>10}{'n/a':>11}"

    print(f"{'spark':<8}{cores:>6}{spark_s:>10.1f}{spark_n:>12,d}{spark_n / spark_s:>10.0f}{spark_rate:>12.0f}"
          f"{cpu_columns(spark_cpu, spark_n)}")
    print(f"{'plain':<8}{1:>6}{plain_s:>10.1f}{plain_n:>12,d}{plain_rate:>10.0f}{plain_rate:>12.0f}"
          f"{cpu_columns(plain_cpu, plain_n)}")
    print(f"ratio (spark msg/s per core / plain msg/s): {ratio:.3f}  goal >= {GOAL}  {'PASS' if ratio >= GOAL else 'MISS'}")
    if spark_cpu and plain_cpu:
        print(f"ratio by CPU time (plain CPU s / spark CPU s, same messages): {plain_cpu / spark_cpu:.3f}  "
              "(not the goal's measure; robust when other work shares the cores)")
    print(f"same messages (count and HTML checksum): {'yes' if same else 'NO'}")
    return 0 if ratio >= GOAL and same and spark_n == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
