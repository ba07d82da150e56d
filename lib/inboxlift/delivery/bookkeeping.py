"""From run journals to tables: ``deliveries``, the outbox's ``withdrawn``, ``suppressions``.

:func:`commit_runs` is the one path by which a send run's outcomes reach the tables, whether the run
finished (its own folder, plus the rows it skipped) or died (its folder, found by the next run):

1. the journals' lines become one ``deliveries`` row per message and attempt (:func:`journal_rows`:
   the ``end`` line's state, ``unknown`` for a ``start`` without one), merged by
   ``(message_id, attempt)``, so committing a folder twice writes the same rows;
2. the outbox: ``withdrawn`` with the consent reason for a message skipped while still
   ``rendered``. A sent message's row is not rewritten: ``deliveries`` holds its 250, and readers
   see it ``sent`` through :mod:`inboxlift.delivery.outbox`;
3. ``suppressions``: a ``bounced`` row for each hard bounce, and ``soft_bounced`` for an address whose
   last ``soft_bounce_threshold`` messages in a row failed on 4xx replies (no ``sent`` since);
4. the folder is marked committed and removed.

Each step is idempotent, so a crash anywhere in between is repaired by committing again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from inboxlift.consent import (
    BOUNCED,
    REASSERT,
    SOFT_BOUNCED,
    SUPPRESSION_KEY,
    SUPPRESSIONS_SCHEMA,
    SUPPRESSIONS_TABLE,
    email_hash,
    suppressions_from_facts,
)
from inboxlift.delivery import states as S
from inboxlift.delivery.journal import END, JOURNAL_SCHEMA, START, mark_committed, read_manifest
from inboxlift.storage import Lake

OUTBOX_TABLE = "outbox"
STATUS_WITHDRAWN, STATUS_RENDERED = "withdrawn", "rendered"


JOURNAL_GLOB = "part-*.jsonl"


def _journal_folders(folders: list[Path]) -> list[str]:
    return [str(folder) for folder in folders if any(folder.glob(JOURNAL_GLOB))]


def journal_rows(spark: SparkSession, folders: list[Path], *, outbox: DataFrame | None) -> DataFrame | None:
    """One ``deliveries`` row per (message, attempt) the journals of ``folders`` mention; None when
    they hold no line. Read with Spark's JSON reader (a line cut short by a crash reads as null and is
    dropped); campaign, user and address hash come from ``outbox``."""
    paths = _journal_folders(folders)
    if not paths:
        return None
    relays = {folder.name: read_manifest(folder).get("relay") for folder in folders}
    relay_of = F.create_map(*[F.lit(x) for pair in relays.items() for x in pair]) if relays else None
    lines = (spark.read.schema(JOURNAL_SCHEMA).option("pathGlobFilter", JOURNAL_GLOB).json(paths)
             .where(F.col("m").isNotNull() & F.col("a").isNotNull() & F.col("k").isin(START, END))
             .withColumn("run_id", F.element_at(F.split(F.col("_metadata.file_path"), "/"), -2)))
    is_end = F.col("k") == F.lit(END)
    # One row per message and attempt: its last end line (by time, then state), and when it started.
    per_message = lines.groupBy(F.col("m").alias("message_id"), F.col("a").alias("attempt")).agg(
        F.max_by(F.struct("s", "c", "r", "x", "n", "t"), F.when(is_end, F.struct("t", "s"))).alias("end"),
        F.min(F.when(~is_end, F.col("t"))).alias("started"),
        F.max("run_id").alias("run_id"),
    )
    has_end = F.col("end.s").isNotNull()
    rows = per_message.select(
        "message_id", F.col("attempt").cast("int").alias("attempt"), "run_id",
        F.when(has_end, F.col("end.s")).otherwise(F.lit(S.UNKNOWN)).alias("state"),
        F.when(has_end, F.col("end.x")).otherwise(F.lit(S.INTERRUPTED)).alias("reason"),
        F.col("end.c").cast("int").alias("smtp_code"),
        F.when(has_end, F.col("end.r")).otherwise(F.lit("the run ended between the content and the reply"))
        .alias("smtp_reply"),
        (F.element_at(relay_of, F.col("run_id")) if relay_of is not None else F.lit(None).cast("string"))
        .alias("relay"),
        F.coalesce(F.col("end.t"), F.col("started")).cast("timestamp").alias("attempted_at"),
        F.col("end.n").cast("timestamp").alias("next_attempt_at"),
    )
    return with_message_columns(rows, outbox=outbox, origin=S.ORIGIN_SMTP)


def with_message_columns(rows: DataFrame, *, outbox: DataFrame | None, origin: str) -> DataFrame:
    """``rows`` with ``campaign_id, user_id, email_hash`` of their outbox message, ``origin`` and a null
    ``report_id``, in ``DELIVERIES_SCHEMA`` order."""
    if outbox is not None:
        # outbox is keyed by message_id: one row per delivery row.
        messages = outbox.select("message_id", "campaign_id", "user_id", email_hash(F.col("to_email")).alias("email_hash"))
        rows = rows.join(messages, "message_id", how="left")
    else:
        rows = rows.select("*", *[F.lit(None).cast("string").alias(c) for c in ("campaign_id", "user_id", "email_hash")
                                  if c not in rows.columns])
    return rows.select(*[F.col(f.name).cast(f.dataType).alias(f.name) if f.name in rows.columns else
                         (F.lit(origin) if f.name == "origin" else F.lit(None).cast(f.dataType)).alias(f.name)
                         for f in S.DELIVERIES_SCHEMA.fields])


@dataclass(frozen=True)
class Committed:
    """What a commit wrote: (run_id, state, reason, rows) and the suppressions it added."""

    counts: tuple[tuple[str, str, str | None, int], ...]
    bounced_suppressions: int
    soft_bounced_suppressions: int

    def runs(self) -> set[str]:
        return {run for run, _, _, _ in self.counts}

    def states(self, run_id: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for run, state, _, n in self.counts:
            if run_id is None or run == run_id:
                out[state] = out.get(state, 0) + n
        return out


def commit_runs(lake: Lake, folders: list[Path], *, extra: DataFrame | None = None, now: dt.datetime,
                soft_bounce_threshold: int) -> Committed:
    """Commit the journals of ``folders`` (and ``extra`` ``deliveries`` rows, e.g. this run's skipped
    messages) to the tables, then mark the folders committed. See the module docstring."""
    spark = lake.spark
    outbox = lake.read(OUTBOX_TABLE) if lake.exists(OUTBOX_TABLE) else None
    rows = journal_rows(spark, folders, outbox=outbox)
    if extra is not None:
        rows = extra if rows is None else rows.unionByName(extra)
    if rows is None:
        for folder in folders:
            mark_committed(folder)
        return Committed((), 0, 0)
    rows = rows.cache()
    try:
        # One row per run, state and reason.
        counts = tuple(sorted((r["run_id"], r["state"], r["reason"], r["count"])
                              for r in rows.groupBy("run_id", "state", "reason").count().collect()))
        bounced = soft = 0
        if counts:
            lake.merge(S.DELIVERIES_TABLE, rows, keys=S.DELIVERIES_KEY)
            # The counts say which of the next steps have rows to work on; the others cost no job.
            present = {(state, reason) for _, state, reason, _ in counts}
            if outbox is not None and any(state == S.SKIPPED for state, _ in present):
                _update_outbox(lake, outbox, rows)
            if any(state == S.BOUNCED for state, _ in present) or (S.FAILED, S.RETRIES_EXHAUSTED) in present:
                bounced, soft = _suppress(lake, rows, now=now, threshold=soft_bounce_threshold)
    finally:
        rows.unpersist()
    for folder in folders:
        mark_committed(folder)
    return Committed(counts, bounced, soft)


def _update_outbox(lake: Lake, outbox: DataFrame, rows: DataFrame) -> None:
    """``withdrawn`` (the skip reason) for a skipped message still ``rendered``."""
    skipped = rows.where(F.col("state") == F.lit(S.SKIPPED)).select("message_id", F.col("reason").alias("_reason"))
    # skipped holds each message once (the rows are one per message and attempt, and a run attempts
    # a message once).
    updates = (outbox.join(skipped, "message_id", how="inner")
               .withColumn("status", F.lit(STATUS_WITHDRAWN)).withColumn("status_reason", F.col("_reason"))
               .select(*outbox.columns))
    # A skip only withdraws a message still waiting to leave.
    lake.merge(OUTBOX_TABLE, updates, keys=["message_id"], insert_new=False,
               update_condition=f"t.status = '{STATUS_RENDERED}'")


def _suppress(lake: Lake, rows: DataFrame, *, now: dt.datetime, threshold: int) -> tuple[int, int]:
    """Suppressions for this commit's hard bounces and for addresses it pushed past the soft-bounce
    threshold; returns how many rows of each were merged."""
    hard = rows.where(F.col("state") == F.lit(S.BOUNCED)).select(
        "user_id", "email_hash", F.lit(BOUNCED).alias("reason"), F.col("message_id").alias("source"),
        F.col("attempted_at").alias("since"))
    soft = _soft_bounces(lake.read(S.DELIVERIES_TABLE), touched=rows, threshold=threshold)
    facts = hard.unionByName(soft)
    if facts.isEmpty():
        return 0, 0
    new = suppressions_from_facts(facts, updated_at=now).select(*SUPPRESSIONS_SCHEMA.fieldNames()).cache()
    try:
        by_reason = {r["reason"]: r["count"] for r in new.groupBy("reason").count().collect()}  # two rows at most
        lake.merge(SUPPRESSIONS_TABLE, new, keys=SUPPRESSION_KEY, update_condition=REASSERT)
    finally:
        new.unpersist()
    return by_reason.get(BOUNCED, 0), by_reason.get(SOFT_BOUNCED, 0)


def is_soft_bounce() -> "F.Column":
    """A message given up after its 4xx attempts: the mailbox was full, over quota, unavailable..."""
    return ((F.col("state") == F.lit(S.FAILED)) & (F.col("reason") == F.lit(S.RETRIES_EXHAUSTED))
            & F.col("smtp_code").between(400, 499))


def _soft_bounces(deliveries: DataFrame, *, touched: DataFrame, threshold: int) -> DataFrame:
    """Facts (``user_id, email_hash, reason, source, since``) for the addresses among ``touched``'s
    soft bounces whose last ``threshold`` outcomes (sent or given up) are all soft bounces."""
    addresses = touched.where(is_soft_bounce() & F.col("email_hash").isNotNull()).select("email_hash").distinct()
    outcomes = (deliveries.join(addresses, "email_hash", how="left_semi")
                .where((F.col("origin") == F.lit(S.ORIGIN_SMTP)) & F.col("state").isin(S.SENT, S.FAILED)))
    # Newest first per address; message_id and attempt break ties: a total order.
    newest = Window.partitionBy("email_hash").orderBy(F.col("attempted_at").desc(), F.col("message_id").desc(),
                                                      F.col("attempt").desc())
    ranked = outcomes.withColumn("_rank", F.row_number().over(newest)).where(F.col("_rank") <= threshold)
    streak = ranked.groupBy("email_hash").agg(
        F.sum(F.when(is_soft_bounce(), 1).otherwise(0)).alias("_soft"),
        F.min_by(F.struct("message_id", "attempted_at"), "_rank").alias("_newest"),
    ).where(F.col("_soft") >= threshold)
    users = outcomes.select("email_hash", "user_id").where(F.col("user_id").isNotNull()).distinct()
    return streak.join(users, "email_hash", how="inner").select(
        "user_id", "email_hash", F.lit(SOFT_BOUNCED).alias("reason"), F.col("_newest.message_id").alias("source"),
        F.col("_newest.attempted_at").alias("since"))
