"""``inboxlift import-bounces PATH``: delivery status notifications and complaint reports -> tables.

The mailbox (a Maildir folder or an mbox file) is read by Spark (``binaryFile``) and each message is
parsed on the executors (:func:`inboxlift.delivery.bounces.report_batches`). Reports are matched to
messages by the reported Message-ID (the outbox), else to users by the address (its hash). Then:

- ``suppressions``: ``bounced`` for a permanent failure, ``complained`` for a complaint (scope ``all``,
  :func:`inboxlift.consent.suppressions_from_facts`, merged with :data:`inboxlift.consent.REASSERT`);
- ``deliveries``: a ``bounced`` row (origin ``dsn``, its ``report_id``) for a bounce that names one of
  our messages, as the message's next attempt;
- ``bounce_quarantine``: every unreadable message (with its bytes and the reason) and every report
  that matches no message and no user (``unmatched``), keyed by ``report_id``.

Temporary failures (``delay``) are counted only. Importing the same mailbox again adds nothing: the
suppressions are in force already, the deliveries rows are found by report id, the quarantine is
merged by report id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.consent import (
    BOUNCED,
    COMPLAINED,
    REASSERT,
    SUPPRESSION_KEY,
    SUPPRESSIONS_SCHEMA,
    SUPPRESSIONS_TABLE,
    email_hash,
    is_in_force,
    suppressions_from_facts,
)
from inboxlift.context import RunContext
from inboxlift.delivery import bounces as B
from inboxlift.delivery import states as S
from inboxlift.session import KEEP

QUARANTINE_TABLE = "bounce_quarantine"
OUTBOX_TABLE = "outbox"
USERS_TABLE = "users"


@dataclass(frozen=True)
class BounceImportReport:
    path: str
    # kind (bounce, delay, complaint, unreadable) -> rows (a DSN has a row per failed recipient)
    kinds: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    matched_by_message_id: int = 0
    matched_by_address: int = 0
    # reason -> reports kept in bounce_quarantine (unreadable ones by reason, and unmatched)
    quarantined: dict[str, int] = field(default_factory=dict)
    suppressions_added: dict[str, int] = field(default_factory=dict)
    deliveries_added: int = 0

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())) or "none"
        lines = [f"import-bounces {self.path}: {self.messages} messages read ({kinds})",
                 f"  matched by Message-ID {self.matched_by_message_id}, by address {self.matched_by_address}"]
        if self.quarantined:
            lines.append("  kept in bounce_quarantine: " + ", ".join(
                f"{r}={n}" for r, n in sorted(self.quarantined.items())))
        added = ", ".join(f"{r}={n}" for r, n in sorted(self.suppressions_added.items())) or "none new"
        lines.append(f"  suppressions added: {added}; deliveries rows added: {self.deliveries_added}")
        return "\n".join(lines)


def _read_reports(ctx: RunContext, path: Path) -> DataFrame:
    kind = B.mailbox_kind(path)
    reader = ctx.spark.read.format("binaryFile")
    if kind == "maildir":
        folders = [str(path / sub) for sub in ("new", "cur") if (path / sub).is_dir() and any((path / sub).iterdir())]
        if not folders:
            return ctx.spark.createDataFrame([], B.REPORT_DDL)
        sources = reader.load(folders).select("path", "content")
    else:
        # Only the path: each task opens its mbox file and splits it with mailbox.mbox.
        sources = reader.load(str(path)).select("path")
    return sources.mapInArrow(functools.partial(B.report_batches, mbox=kind == "mbox"), B.REPORT_DDL)


def _matched(reports: DataFrame, *, outbox: DataFrame | None, users: DataFrame) -> DataFrame:
    """Readable reports with ``user_id`` (null: unmatched), ``outbox_message_id`` (the report's message
    when the outbox has it) and ``matched_by``."""
    readable = reports.where(F.col("kind") != F.lit(B.UNREADABLE))
    if outbox is not None:
        # outbox is keyed by message_id: at most one row per report row.
        messages = outbox.select(F.col("message_id").alias("_mid"), F.col("user_id").alias("_m_user"),
                                 F.col("to_email").alias("_m_to"))
        readable = readable.join(messages, F.col("message_id") == F.col("_mid"), how="left")
        # A complaint naming its message but not the address (no Original-Rcpt-To, no To in the
        # headers it quotes) is about the address that message went to.
        readable = readable.withColumn("recipient", F.coalesce(F.col("recipient"), F.col("_m_to")))
    else:
        readable = readable.select("*", F.lit(None).cast("string").alias("_mid"),
                                   F.lit(None).cast("string").alias("_m_user"))
    # By address: every user with that address (a hash may be shared; a bounce is about the mailbox).
    people = users.select(F.col("user_id").alias("_a_user"), email_hash(F.col("email")).alias("_hash"))
    by_address = readable.withColumn("_hash", email_hash(F.col("recipient"))).join(people, "_hash", how="left")
    user = F.coalesce(F.col("_m_user"), F.col("_a_user"))
    return by_address.select(
        "report_id", "source", "kind", "message_id", "recipient", "status", "diagnostic", "reported_at",
        F.col("_mid").alias("outbox_message_id"),
        F.when(F.col("_m_user").isNotNull(), F.col("_m_user")).otherwise(user).alias("user_id"),
        F.when(F.col("_m_user").isNotNull(), F.lit("message_id"))
        .when(F.col("_a_user").isNotNull(), F.lit("address")).alias("matched_by"),
    ).dropDuplicates(["report_id", "recipient", "kind", "user_id"])


def run_import_bounces(ctx: RunContext, *, path: str | Path) -> BounceImportReport:
    """Import a Maildir or mbox of DSNs and ARF reports (see the module docstring)."""
    now = ctx.clock.now()
    folder = Path(path).absolute()
    reports = _read_reports(ctx, folder).persist(KEEP)
    try:
        outbox = ctx.lake.read(OUTBOX_TABLE) if ctx.lake.exists(OUTBOX_TABLE) else None
        users = ctx.lake.read_required(USERS_TABLE, needed_by="import-bounces", hint="run ingest first")
        matched = _matched(reports, outbox=outbox, users=users).persist(KEEP)
        try:
            # Small: one row per kind, per match, per reason.
            kinds = {r["kind"]: r["count"] for r in reports.groupBy("kind").count().collect()}
            messages = reports.select("report_id", "source").distinct().count()
            by_match = {r["matched_by"]: r["n"] for r in matched.groupBy("matched_by")
                        .agg(F.countDistinct("report_id", "recipient").alias("n")).collect()}
            quarantined = _quarantine(ctx, reports, matched, now=now)
            added = _suppress(ctx, matched, now=now)
            deliveries = _deliveries(ctx, matched, now=now)
        finally:
            matched.unpersist()
    finally:
        reports.unpersist()
    return BounceImportReport(
        path=str(folder), kinds=kinds, messages=messages, matched_by_message_id=by_match.get("message_id", 0),
        matched_by_address=by_match.get("address", 0), quarantined=quarantined, suppressions_added=added,
        deliveries_added=deliveries)


def _quarantine(ctx: RunContext, reports: DataFrame, matched: DataFrame, *, now) -> dict[str, int]:
    """Unreadable messages and reports matching nothing into ``bounce_quarantine``, by report id."""
    unreadable = reports.where(F.col("kind") == F.lit(B.UNREADABLE)).select(
        "report_id", "source", "reason", "diagnostic", "raw")
    matched_ids = matched.where(F.col("user_id").isNotNull()).select("report_id").distinct()
    unmatched = (matched.join(matched_ids, "report_id", how="left_anti")
                 .groupBy("report_id").agg(F.min("source").alias("source"),
                                           F.concat_ws(", ", F.sort_array(F.collect_set("recipient")))
                                           .alias("diagnostic"))
                 .join(reports.groupBy("report_id").agg(F.first("raw").alias("raw")), "report_id", how="left")
                 .select("report_id", "source", F.lit(B.UNMATCHED).alias("reason"), "diagnostic", "raw"))
    kept = (unreadable.unionByName(unmatched)
            .withColumn("imported_at", F.lit(now).cast("timestamp"))
            .dropDuplicates(["report_id"]))
    counts = {r["reason"]: r["count"] for r in kept.groupBy("reason").count().collect()}  # one row per reason
    if counts:
        ctx.lake.merge(QUARANTINE_TABLE, kept, keys=["report_id"], update_condition="false")
    return counts


def _suppress(ctx: RunContext, matched: DataFrame, *, now) -> dict[str, int]:
    reason = F.when(F.col("kind") == F.lit(B.BOUNCE), F.lit(BOUNCED)).when(
        F.col("kind") == F.lit(B.COMPLAINT), F.lit(COMPLAINED))
    facts = matched.where(F.col("user_id").isNotNull()).select(
        "user_id", email_hash(F.col("recipient")).alias("email_hash"), reason.alias("reason"),
        F.coalesce(F.col("outbox_message_id"), F.col("report_id")).alias("source"),
        F.coalesce(F.col("reported_at"), F.lit(now).cast("timestamp")).alias("since"),
    ).where(F.col("reason").isNotNull())
    rows = suppressions_from_facts(facts, updated_at=now).select(*SUPPRESSIONS_SCHEMA.fieldNames())
    if ctx.lake.exists(SUPPRESSIONS_TABLE):
        in_force = ctx.lake.read(SUPPRESSIONS_TABLE).where(is_in_force(now)).select(*SUPPRESSION_KEY)
        rows = rows.join(in_force, SUPPRESSION_KEY, how="left_anti")
    rows = rows.persist(KEEP)
    try:
        added = {r["reason"]: r["count"] for r in rows.groupBy("reason").count().collect()}  # two rows at most
        if added:
            ctx.lake.merge(SUPPRESSIONS_TABLE, rows, keys=SUPPRESSION_KEY, update_condition=REASSERT)
    finally:
        rows.unpersist()
    return added


def _deliveries(ctx: RunContext, matched: DataFrame, *, now) -> int:
    """A ``bounced`` deliveries row (origin dsn) per bounced outbox message and report, not written before."""
    bounces = (matched.where((F.col("kind") == F.lit(B.BOUNCE)) & F.col("outbox_message_id").isNotNull())
               .select(F.col("outbox_message_id").alias("message_id"), "report_id", "recipient", "status",
                       "diagnostic", "reported_at")
               .dropDuplicates(["message_id", "report_id"]))
    if not ctx.lake.exists(OUTBOX_TABLE):
        return 0
    if ctx.lake.exists(S.DELIVERIES_TABLE):
        table = ctx.lake.read(S.DELIVERIES_TABLE)
        bounces = bounces.join(table.where(F.col("report_id").isNotNull()).select("message_id", "report_id"),
                               ["message_id", "report_id"], how="left_anti")
        last = table.groupBy("message_id").agg(F.max("attempt").alias("_last"))
        bounces = bounces.join(last, "message_id", how="left")
    else:
        bounces = bounces.withColumn("_last", F.lit(None).cast("int"))
    # Several new reports of one message: consecutive attempts, in report order (a total order).
    order = Window.partitionBy("message_id").orderBy("report_id").rowsBetween(Window.unboundedPreceding,
                                                                               Window.currentRow)
    outbox = ctx.lake.read(OUTBOX_TABLE)
    messages = outbox.select("message_id", "campaign_id", "user_id", email_hash(F.col("to_email")).alias("email_hash"))
    rows = (bounces.withColumn("attempt", (F.coalesce("_last", F.lit(0)) + F.count(F.lit(1)).over(order)).cast("int"))
            .join(messages, "message_id", how="left")
            .select(
                "message_id", "attempt", F.lit(f"import-bounces-{now:%Y%m%dT%H%M%SZ}").alias("run_id"),
                F.lit(S.BOUNCED).alias("state"), F.lit(S.DSN_BOUNCE).alias("reason"),
                F.lit(None).cast("int").alias("smtp_code"),
                F.concat_ws(" ", "status", "diagnostic").alias("smtp_reply"), F.lit(None).cast("string").alias("relay"),
                F.coalesce("reported_at", F.lit(now).cast("timestamp")).alias("attempted_at"),
                F.lit(None).cast("timestamp").alias("next_attempt_at"), "campaign_id", "user_id", "email_hash",
                F.lit(S.ORIGIN_DSN).alias("origin"), "report_id")
            .persist(KEEP))
    try:
        count = rows.count()
        if count:
            ctx.lake.merge(S.DELIVERIES_TABLE, rows, keys=S.DELIVERIES_KEY)
    finally:
        rows.unpersist()
    return count
