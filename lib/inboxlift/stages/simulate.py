"""The simulate-responses stage: the generated shop answers its delivered emails, as landing events.

For the generated shop only: the answers come from the generator's planted truth. The units are the
messages ``send`` delivered (``deliveries`` state ``sent``, none later bounced by a DSN) and the
holdout rows of ``campaign_plan``, of the last ``days`` UTC days (today included) up to the clock's
now; :mod:`inboxlift.generate.responses` decides what each one does and when.

Written:

- landing files ``<paths.landing_dir>/events/simulated/responses-<send day>-part-NNNNN.jsonl``:
  the events whose time has come by the clock (a later run adds the rest), JSON lines as the
  tracking service writes them, sorted by event id. A day's files are rewritten only when their
  bytes change, so a re-run at the same clock leaves them untouched (ingest reads a file once) and
  a later one replaces them with a superset (ingest drops the events it has as duplicates);
- planted truth under ``<generate.truth_dir>/responses/``: ``units/`` (one row per unit:
  probabilities, outcomes, times, among them ``sent_at`` and ``planned_at``, the plan's send time
  that organic purchases are timed from) and ``rates/`` (per send day, campaign and variant), Parquet
  partitioned by ``send_date``, each run replacing the days it simulated. No stage reads it.
"""

from __future__ import annotations

import datetime as dt
import filecmp
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, Observation, Window
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import HOLDOUT
from inboxlift.context import RunContext
from inboxlift.delivery.states import BOUNCED, DELIVERIES_TABLE, SENT
from inboxlift.generate import responses as R
from inboxlift.generate.shop import GENERATOR_SQL_CONF, session_conf
from inboxlift.schemas import EVENT_TYPES
from inboxlift.session import materialize

RESPONSES_FOLDER = "simulated"
FILE_PREFIX = "responses-"
PLAN_TABLE, OUTBOX_TABLE = "campaign_plan", "outbox"


class NoGeneratedShopError(FileNotFoundError):
    """There is no planted truth to answer from: the shop was not generated here."""


@dataclass(frozen=True)
class SimulateReport:
    first_day: dt.date
    now: dt.datetime
    truth_batch: str
    messages: int
    holdout: int
    without_truth: int
    # event type -> events written (due by now); events still to come
    events: dict[str, int]
    pending: int
    files_written: list[str] = field(default_factory=list)
    files_unchanged: int = 0
    files_removed: int = 0
    truth_paths: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        written = ", ".join(f"{t}={n:,}" for t, n in self.events.items() if n) or "none"
        return "\n".join([
            f"simulate-responses {self.first_day} .. {self.now:%Y-%m-%d %H:%M} UTC (truth batch {self.truth_batch}): "
            f"{self.messages:,} delivered messages and {self.holdout:,} holdout rows "
            f"({self.without_truth:,} of users without planted truth skipped)",
            f"events due by now: {written}; {self.pending:,} still to come (a later run writes them)",
            f"files: {len(self.files_written)} written, {self.files_unchanged} unchanged, "
            f"{self.files_removed} removed; "
            f"truth under {self.truth_paths.get('units', '-')}",
        ])


def latest_truth_batch(truth_dir: str) -> str:
    """The newest generator batch with planted users (batch ids start with their end instant)."""
    folder = Path(truth_dir) / "users"
    batches = sorted(p.name.split("=", 1)[1] for p in folder.glob("batch=*") if p.is_dir()) if folder.is_dir() else []
    if not batches:
        raise NoGeneratedShopError(
            f"simulate-responses answers for the generated shop only, and there is no planted truth under "
            f"{folder} (run `inboxlift generate`, or run-all on an empty local lake, first)")
    return batches[-1]


def sent_messages(deliveries: DataFrame, *, from_s: int, until_s: int) -> DataFrame:
    """``message_id, user_id, sent_s``: each message sent in [from_s, until_s] once, unless a DSN bounced it later."""
    sent = (deliveries.where(F.col("state") == SENT)
            .groupBy("message_id").agg(F.min(F.unix_seconds("attempted_at")).alias("sent_s"),
                                       F.first("user_id").alias("user_id")))
    bounced = deliveries.where(F.col("state") == BOUNCED).select("message_id").distinct()
    return (sent.where(F.col("sent_s").between(from_s, until_s))
            .join(bounced, "message_id", "left_anti"))


def with_recent_emails(sent: DataFrame, *, fatigue_s: int) -> DataFrame:
    """``recent_emails``: the messages sent to the same user in the ``fatigue_s`` seconds before each one."""
    before = (Window.partitionBy("user_id").orderBy("sent_s").rangeBetween(-fatigue_s, -1))
    return sent.withColumn("recent_emails", F.count("message_id").over(before).cast("int"))


def message_units(sent: DataFrame, *, outbox: DataFrame, plan: DataFrame | None) -> DataFrame:
    """``UNIT_COLUMNS`` of the sent messages: campaign, variant and plan day from the outbox, items and
    planned send time from the plan.

    ``planned_s`` is the plan row's ``send_at``; a message whose plan row is gone (replaced after it
    left) or that has no plan table takes the outbox's ``send_at`` (render copies the plan's), as the
    report does for its uplift window; with neither, the time it left.
    """
    mail = outbox.select("message_id", "campaign_id", "campaign_type", F.col("user_id").alias("_outbox_user"),
                         "variant", "plan_date", F.unix_seconds("rendered_at").alias("issued_s"),
                         F.unix_seconds("send_at").alias("_outbox_planned_s"))
    # The outbox is keyed by message_id: the join keeps one row per message.
    units = sent.join(mail, "message_id", "inner").drop("user_id").withColumnRenamed("_outbox_user", "user_id")
    if plan is not None:
        # One plan row per campaign, user and day (a re-plan of the day replaces its rows).
        planned = plan.select(*R.UNIT_KEY, "item_ids", F.unix_seconds("send_at").alias("_plan_planned_s"))
        units = units.join(planned, R.UNIT_KEY, "left")
    else:
        units = units.withColumns({"item_ids": F.lit(None).cast("array<string>"),
                                   "_plan_planned_s": F.lit(None).cast("long")})
    return units.select(*R.UNIT_KEY, "campaign_type", "variant", "message_id", F.lit(False).alias("is_holdout"),
                        "sent_s", F.coalesce("_plan_planned_s", "_outbox_planned_s", "sent_s").alias("planned_s"),
                        F.coalesce("issued_s", "sent_s").alias("issued_s"),
                        F.coalesce("item_ids", F.array().cast("array<string>")).alias("item_ids"), "recent_emails")


def holdout_units(plan: DataFrame, *, from_s: int, until_s: int) -> DataFrame:
    """``UNIT_COLUMNS`` of the plan's holdout rows whose planned send time is in [from_s, until_s]."""
    send_s = F.unix_seconds("send_at")
    return plan.where((F.col("variant") == HOLDOUT) & send_s.between(from_s, until_s)).select(
        *R.UNIT_KEY, "campaign_type", "variant", F.lit(None).cast("string").alias("message_id"),
        F.lit(True).alias("is_holdout"), send_s.alias("sent_s"), send_s.alias("planned_s"),
        F.lit(None).cast("long").alias("issued_s"),
        F.coalesce("item_ids", F.array().cast("array<string>")).alias("item_ids"), F.lit(0).alias("recent_emails"))


def priced_catalogue(products: DataFrame, items_truth: DataFrame) -> DataFrame:
    """``CATALOGUE_COLUMNS``: the shop's products with a price, ranked 0.. by planted popularity."""
    # Global and small: one row per item, a window over the whole catalogue (products, not users).
    by_popularity = Window.orderBy("popularity_rank", "item_id")
    return (products.where(F.col("price").isNotNull())
            .join(items_truth.select("item_id", "popularity_rank"), "item_id", "inner")
            .select((F.row_number().over(by_popularity) - 1).cast("int").alias("rank"), "item_id", "category_path",
                    "price", "currency"))


def _timestamps(outcomes: DataFrame) -> DataFrame:
    """The truth as people read it: every ``*_s`` epoch column as a ``*_at`` UTC timestamp."""
    return outcomes.select(*[F.timestamp_seconds(c).alias(c[:-2] + "_at") if c.endswith("_s") else F.col(c)
                             for c in outcomes.columns])


def _write_truth(frame: DataFrame, path: str) -> None:
    # Dynamic overwrite: the run replaces the send days it simulated and keeps the others.
    (frame.write.mode("overwrite").option("partitionOverwriteMode", "dynamic").partitionBy("send_date")
     .parquet(path))


def run_simulate(ctx: RunContext, *, days: int | None = None) -> SimulateReport:
    """Simulate the responses to the messages sent (and the holdouts planned) on the last ``days`` days."""
    # The outcomes are a deep stack of projections like the generator's: plan them as it does.
    with session_conf(ctx.spark, GENERATOR_SQL_CONF):
        return _simulate(ctx, days=days)


def _simulate(ctx: RunContext, *, days: int | None) -> SimulateReport:
    params = ctx.settings.simulate
    days = params.days if days is None else days
    if days < 1:
        raise ValueError(f"days must be 1 or more, got {days}")
    now = ctx.clock.now().astimezone(dt.timezone.utc)
    now_s = int(now.timestamp())
    first_day = now.date() - dt.timedelta(days=days - 1)
    from_s = int(dt.datetime.combine(first_day, dt.time(), dt.timezone.utc).timestamp())
    truth_root = Path(ctx.settings.generate.truth_dir)
    batch = latest_truth_batch(str(truth_root))
    spark, lake = ctx.spark, ctx.lake

    users_truth = spark.read.parquet(str(truth_root / "users" / f"batch={batch}"))
    items_truth = spark.read.parquet(str(truth_root / "items" / f"batch={batch}"))
    plan = lake.read(PLAN_TABLE) if lake.exists(PLAN_TABLE) else None
    parts = []
    if lake.exists(DELIVERIES_TABLE) and lake.exists(OUTBOX_TABLE):
        fatigue_s = params.fatigue_days * 86_400
        sent = with_recent_emails(sent_messages(lake.read(DELIVERIES_TABLE), from_s=from_s - fatigue_s, until_s=now_s),
                                  fatigue_s=fatigue_s).where(F.col("sent_s") >= from_s)
        parts.append(message_units(sent, outbox=lake.read(OUTBOX_TABLE), plan=plan))
    if plan is not None:
        parts.append(holdout_units(plan, from_s=from_s, until_s=now_s))
    if not parts:
        parts.append(holdout_units(spark.createDataFrame(
            [], "campaign_id string, campaign_type string, user_id string, plan_date date, variant string, "
                "send_at timestamp, item_ids array<string>"), from_s=from_s, until_s=now_s))
    units = materialize(parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1]))

    traits = R.user_traits(users_truth, seed=params.seed, params=params)
    products = lake.read_required("products", needed_by="simulate-responses", hint="run ingest first")
    catalogue = materialize(priced_catalogue(products, items_truth))
    outcomes = None
    try:
        catalogue_size = catalogue.count()  # the catalogue's size, not the users'
        all_units = units.count()
        outcomes = materialize(R.planted_outcomes(
            units, traits=traits, categories=products.select("item_id", "category_path"), catalogue=catalogue,
            catalogue_size=catalogue_size, seed=params.seed, params=params))
        counts = outcomes.agg(F.count_if(~F.col("is_holdout")).alias("messages"),
                              F.count_if(F.col("is_holdout")).alias("holdout")).first()
        truth_paths = {"units": str(truth_root / "responses" / "units"),
                       "rates": str(truth_root / "responses" / "rates")}
        if counts["messages"] + counts["holdout"]:
            _write_truth(_timestamps(outcomes), truth_paths["units"])
            _write_truth(R.planted_rates(outcomes), truth_paths["rates"])
        events, pending, files = _write_events(ctx, outcomes, now_s=now_s, first_day=first_day, last_day=now.date())
    finally:
        units.unpersist()
        catalogue.unpersist()
        if outcomes is not None:
            outcomes.unpersist()
    return SimulateReport(
        first_day=first_day, now=now, truth_batch=batch, messages=counts["messages"], holdout=counts["holdout"],
        without_truth=all_units - counts["messages"] - counts["holdout"], events=events, pending=pending,
        files_written=files[0], files_unchanged=files[1], files_removed=files[2], truth_paths=truth_paths)


def _write_events(ctx: RunContext, outcomes: DataFrame, *, now_s: int, first_day: dt.date,
                  last_day: dt.date) -> tuple[dict[str, int], int, tuple[list[str], int, int]]:
    """Write the due events as one file per send day and bucket; returns counts and (written, unchanged, removed)."""
    params = ctx.settings.simulate
    events = R.response_events(outcomes, seed=params.seed, files_per_day=params.files_per_day)
    is_due = F.col("ts") <= now_s
    observation = Observation(f"simulate-responses-{secrets.token_hex(4)}")
    observed = events.observe(observation, *[F.count_if(is_due & (F.col("event_type") == t)).alias(t)
                                             for t in EVENT_TYPES], F.count_if(~is_due).alias("_pending"))
    landing = Path(ctx.settings.paths.landing_dir)
    staging = landing / "_staging" / f"simulate-{secrets.token_hex(6)}"
    # Every row of a (day, bucket) in one task, sorted by event id: each file's bytes depend on nothing
    # but its events. The partition columns are final before the sort, so the sort satisfies the
    # writer's own ordering by them and it adds no second sort (which would not keep the event order).
    lines = (observed.where(is_due)
             .select(F.col("send_date").cast("string").alias("send_date"), "bucket", "event_id",
                     R.landing_line().alias("value"))
             .repartition("send_date", "bucket")
             .sortWithinPartitions("send_date", "bucket", "event_id")
             .select("send_date", "bucket", "value"))
    lines.write.mode("overwrite").partitionBy("send_date", "bucket").text(str(staging))
    metrics = observation.get
    try:
        files = _place_files(staging, landing / "events" / RESPONSES_FOLDER, first_day=first_day, last_day=last_day)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if staging.parent.is_dir() and not any(staging.parent.iterdir()):
            staging.parent.rmdir()
    wanted = [*EVENT_TYPES, "_pending"]
    if not all(key in metrics for key in wanted):
        # Spark Connect returns no observed metrics for a write command: count in one more job.
        metrics = events.agg(*[F.count_if(is_due & (F.col("event_type") == t)).alias(t) for t in EVENT_TYPES],
                             F.count_if(~is_due).alias("_pending")).first().asDict()
    return {t: int(metrics[t]) for t in EVENT_TYPES}, int(metrics["_pending"]), files


def _place_files(staging: Path, target: Path, *, first_day: dt.date,
                 last_day: dt.date) -> tuple[list[str], int, int]:
    """Move staged parts to ``responses-<day>-part-<bucket>.jsonl``; keep a file whose bytes are the same,
    remove the files of a simulated day that no longer has their bucket. Only file names pass the driver."""
    target.mkdir(parents=True, exist_ok=True)
    wanted: dict[Path, Path] = {}
    for day_dir in sorted(staging.glob("send_date=*")):
        day = day_dir.name.split("=", 1)[1]
        for bucket_dir in sorted(day_dir.glob("bucket=*")):
            parts = sorted(p for p in bucket_dir.iterdir() if p.name.startswith("part-") and p.stat().st_size > 0)
            if len(parts) != 1:
                raise RuntimeError(f"expected one part file in {bucket_dir}, found {len(parts)}")
            bucket = int(bucket_dir.name.split("=", 1)[1])
            wanted[target / f"{FILE_PREFIX}{day}-part-{bucket:05d}.jsonl"] = parts[0]
    written, unchanged = [], 0
    for final, part in sorted(wanted.items()):
        if final.is_file() and final.stat().st_size == part.stat().st_size and filecmp.cmp(final, part, shallow=False):
            unchanged += 1
            continue
        os.replace(part, final)
        written.append(str(final))
    removed = 0
    day = first_day
    while day <= last_day:
        for old in target.glob(f"{FILE_PREFIX}{day.isoformat()}-part-*.jsonl"):
            if old not in wanted:
                old.unlink()
                removed += 1
        day += dt.timedelta(days=1)
    return written, unchanged, removed
