"""The render stage: ``campaign_plan`` -> one email per recipient in ``outbox`` (docs/render.md).

``run_render`` reads the plan (one campaign, or all), skips and counts the holdout, checks every
recipient's mail permission (:func:`inboxlift.consent.with_mail_permission`), joins users and the
catalogue, renders the permitted recipients with sandboxed Jinja2 per partition (``mapInArrow``) and
writes:

- ``outbox``: merged by ``message_id`` (a hash of campaign, user and plan day), so a re-render
  replaces a message instead of adding one, and the next plan day of a recurring campaign is a new
  message. In the same merge, ``rendered`` messages that must not leave are
  retired (``status = withdrawn``, ``status_reason`` says why): those whose user may not be mailed
  now (any campaign), and those of the rendered campaigns that the latest plan no longer holds or
  whose re-render failed. A sent message (``deliveries`` holds its 250, :mod:`inboxlift.delivery.outbox`)
  is never changed; rows are never deleted;
- ``render_errors``: the rows that could not be rendered (a user not permitted mail included), with
  the reason; replaced for the rendered campaigns on every run, so fixed rows disappear and a
  re-run adds no duplicates.

``export_eml`` writes a campaign's ``rendered`` messages whose users may be mailed at export time
as ``.eml`` files; ``preview`` one message's HTML.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pyspark.sql import DataFrame, Row
from pyspark.sql import functions as F

from inboxlift.consent import with_mail_permission
from inboxlift.context import RunContext
from inboxlift.delivery.outbox import delivered_messages, read_outbox, without_delivered
from inboxlift.delivery.selection import latest_deliveries
from inboxlift.delivery.states import BOUNCED, DELIVERIES_TABLE, FAILED, UNKNOWN
from inboxlift.render.eml import eml_bytes
from inboxlift.render.frames import (
    filter_sendable,
    is_holdout,
    render_partitions,
    render_plan,
)
from inboxlift.keys import signing_key
from inboxlift.pending_consent import suppressions_now
from inboxlift.render.message import STATUS_RENDERED, RenderConfig
from inboxlift.render.partition import OUTBOX_COLUMNS, RENDER_ERROR_COLUMNS
from inboxlift.session import KEEP
from inboxlift.storage import WriteResult

PLAN_TABLE = "campaign_plan"
EXCLUSIONS_TABLE = "campaign_exclusions"
USERS_TABLE = "users"
PRODUCTS_TABLE = "products"
OUTBOX_TABLE = "outbox"
ERRORS_TABLE = "render_errors"
_HEX_ID = re.compile(r"[0-9a-f]{32}")
# Outbox statuses: rendered (may leave), withdrawn (must not; status_reason says why), sent (left).
STATUS_WITHDRAWN = "withdrawn"
STATUS_REASON = "status_reason"
# Why a rendered message of a rendered campaign is withdrawn when its user may still be mailed.
NOT_PLANNED = "not_planned"      # the campaign's latest plan no longer holds the user
SUPERSEDED = "superseded"        # the user's message of the campaign now has another id
_BLOCKED_ERROR = "the user may not be mailed now (consent, suppressions: inboxlift.consent)"


@dataclass(frozen=True)
class RenderReport:
    campaign_id: str | None
    # (campaign_id, variant, messages rendered)
    rendered: tuple[tuple[str, str, int], ...]
    # (campaign_id, holdout rows skipped)
    holdout: tuple[tuple[str, int], ...]
    # (campaign_id, reason, rows sent to render_errors)
    errors: tuple[tuple[str, str, int], ...]
    development_key: bool
    outbox_version: int | None
    errors_version: int | None
    # (campaign_id, status_reason, outbox messages withdrawn by this run)
    withdrawn: tuple[tuple[str, str, int], ...] = ()
    # (campaign_id, rendered messages the relay already accepted: their outbox rows are left as they were)
    already_sent: tuple[tuple[str, int], ...] = ()

    @property
    def messages(self) -> int:
        """Messages written into the outbox: rendered, but those already sent."""
        return sum(n for _, _, n in self.rendered) - sum(n for _, n in self.already_sent)

    @property
    def skipped_holdout(self) -> int:
        return sum(n for _, n in self.holdout)

    @property
    def failed(self) -> int:
        return sum(n for _, _, n in self.errors)

    @property
    def withdrawn_messages(self) -> int:
        return sum(n for _, _, n in self.withdrawn)

    def summary(self) -> str:
        scope = f"campaign {self.campaign_id}" if self.campaign_id else "every planned campaign"
        lines = [f"render ({scope}): {self.messages} messages into {OUTBOX_TABLE}, {self.failed} rows into "
                 f"{ERRORS_TABLE}, {self.skipped_holdout} holdout rows skipped (no email)"]
        holdout = dict(self.holdout)
        errors: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for campaign, reason, n in self.errors:
            errors[campaign].append((reason, n))
        campaigns = sorted({c for c, _, _ in self.rendered} | set(holdout) | set(errors)
                           | {c for c, _, _ in self.withdrawn})
        if self.already_sent:
            lines[0] += (f", {sum(n for _, n in self.already_sent)} rendered again but already sent "
                         "(left as they were)")
        if self.withdrawn:
            lines[0] += f", {self.withdrawn_messages} earlier messages withdrawn"
        if campaigns:
            lines.append(f"  {'campaign':<28}{'variant':<10}{'messages':>10}")
        for campaign in campaigns:
            for c, variant, n in self.rendered:
                if c == campaign:
                    lines.append(f"  {campaign:<28}{variant:<10}{n:>10}")
            if holdout.get(campaign):
                lines.append(f"  {campaign:<28}{'holdout':<10}{holdout[campaign]:>10}  skipped")
            for reason, n in sorted(errors.get(campaign, [])):
                lines.append(f"  {campaign:<28}{'error':<10}{n:>10}  {reason}")
            for c, reason, n in self.withdrawn:
                if c == campaign:
                    lines.append(f"  {campaign:<28}{'withdrawn':<10}{n:>10}  {reason}")
        if self.development_key:
            lines.append("  WARNING: links are signed with the development key (env local and the signing key's "
                         "environment variable unset): anyone can forge them; never send these emails")
        return "\n".join(lines)


def _in_list(column: str, values: list[str]) -> str:
    quoted = ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)
    return f"{column} IN ({quoted})"


def _optional(ctx: RunContext, name: str) -> DataFrame | None:
    return ctx.lake.read(name) if ctx.lake.exists(name) else None


def _latest_plans(ctx: RunContext, campaign_id: str | None) -> tuple[DataFrame, list[str]]:
    """The plan rows of each campaign's latest plan day, and the campaigns being rendered.

    ``campaign_plan`` keeps every day's plans: each campaign renders its latest day only (one message
    per campaign and user, the outbox's key). The latest day counts the day's exclusions too, so a
    day that excluded everyone renders nothing rather than an older day's plan again.
    """
    plan = ctx.lake.read(PLAN_TABLE)
    exclusions = _optional(ctx, EXCLUSIONS_TABLE)
    if campaign_id is not None:
        plan = plan.where(F.col("campaign_id") == F.lit(campaign_id))
        exclusions = exclusions.where(F.col("campaign_id") == F.lit(campaign_id)) if exclusions is not None else None
    if "plan_date" not in plan.columns:
        days = plan.select("campaign_id").distinct()
    else:
        days = plan.select("campaign_id", "plan_date")
        if exclusions is not None:
            days = days.unionByName(exclusions.select("campaign_id", "plan_date"))
        days = days.groupBy("campaign_id").agg(F.max("plan_date").alias("plan_date"))
        plan = plan.join(days, ["campaign_id", "plan_date"], "left_semi")
    # One row per campaign.
    campaigns = {r["campaign_id"] for r in days.select("campaign_id").collect()}
    return plan, sorted(campaigns | ({campaign_id} if campaign_id is not None else set()))


def _blocked_rows(blocked: DataFrame, *, now: dt.datetime) -> DataFrame:
    """Plan rows whose user may not be mailed now, as ``render_errors`` rows (the reason is the permission's)."""
    return blocked.select(
        "campaign_id", "user_id", "template", F.col("blocked_reason").alias("reason"),
        F.lit(_BLOCKED_ERROR).alias("error"), F.lit(now).cast("timestamp").alias("rendered_at"),
    ).select(*RENDER_ERROR_COLUMNS)


def _withdrawals(outbox: DataFrame, *, messages: DataFrame, failures: DataFrame, campaigns: list[str],
                 users: DataFrame, suppressions: DataFrame | None, now: dt.datetime) -> DataFrame:
    """Whole ``outbox`` rows, ``withdrawn`` with their ``status_reason``, of the ``rendered`` messages
    this run does not write that must not leave: the user may not be mailed now (whatever the
    campaign), or, for the rendered ``campaigns``, the latest plan no longer holds the user (or holds
    a message with another id), or the re-render failed (the failure's reason)."""
    candidates = (outbox.where(F.col("status") == F.lit(STATUS_RENDERED))
                  .join(messages.select("message_id"), "message_id", how="left_anti"))
    # Both keyed by (campaign_id, user_id): the latest plan holds each user once per campaign.
    failed = failures.select("campaign_id", "user_id", F.col("reason").alias("_failure"))
    current = messages.select("campaign_id", "user_id", F.lit(True).alias("_superseded"))
    # A message names the address it goes to: still the user's, and not suppressed (consent.py).
    checked = (candidates.transform(with_mail_permission, users=users, suppressions=suppressions, now=now,
                                    address="to_email")
               .join(failed, ["campaign_id", "user_id"], how="left")
               .join(current, ["campaign_id", "user_id"], how="left"))
    rendered_campaign = F.col("campaign_id").isin(*campaigns) if campaigns else F.lit(False)
    reason = F.coalesce(F.col("blocked_reason"), F.when(rendered_campaign, F.coalesce(
        F.col("_failure"), F.when(F.col("_superseded"), F.lit(SUPERSEDED)), F.lit(NOT_PLANNED))))
    return (checked.withColumn("_reason", reason).where(F.col("_reason").isNotNull())
            .withColumn("status", F.lit(STATUS_WITHDRAWN)).withColumn(STATUS_REASON, F.col("_reason"))
            .select(*outbox.columns))


# Outbox columns added after the outbox's first release: older tables get them (null in older rows).
_LATER_COLUMNS = ((STATUS_REASON, "string"), ("plan_date", "date"))


def _with_later_columns(ctx: RunContext) -> None:
    """Add ``status_reason`` and ``plan_date`` to an outbox written before they existed (older rows
    read them as null)."""
    if not ctx.lake.exists(OUTBOX_TABLE):
        return
    columns = ctx.lake.read(OUTBOX_TABLE).columns
    missing = [(name, kind) for name, kind in _LATER_COLUMNS if name not in columns]
    if missing:
        empty = ctx.lake.read(OUTBOX_TABLE).limit(0)
        for name, kind in missing:
            empty = empty.withColumn(name, F.lit(None).cast(kind))
        ctx.lake.append(OUTBOX_TABLE, empty, merge_schema=True)


def _write_outbox(ctx: RunContext, messages: DataFrame, *, failures: DataFrame, campaigns: list[str],
                  users: DataFrame, suppressions: DataFrame | None,
                  now: dt.datetime) -> tuple[WriteResult, tuple[tuple[str, str, int], ...]]:
    """Merge the new messages and the withdrawals (:func:`_withdrawals`) into ``outbox`` in one commit;
    returns the write and the withdrawals per campaign and reason."""
    _with_later_columns(ctx)
    # A sent message is never changed (deliveries records it sent while its row still says rendered:
    # inboxlift.delivery.outbox); a withdrawn one comes back when it is rendered again.
    source, withdrawn = without_delivered(messages, lake=ctx.lake), []
    if ctx.lake.exists(OUTBOX_TABLE):
        retired = _withdrawals(read_outbox(ctx.lake), messages=messages, failures=failures,
                               campaigns=campaigns, users=users, suppressions=suppressions, now=now)
        # One row per campaign and reason; counted before the merge changes the outbox they come from.
        withdrawn = retired.groupBy("campaign_id", STATUS_REASON).count().collect()
        source = source.unionByName(retired)
    result = ctx.lake.merge(OUTBOX_TABLE, source, keys=["message_id"],
                            update_condition=f"t.status IN ('{STATUS_RENDERED}', '{STATUS_WITHDRAWN}')")
    return result, tuple(sorted((r["campaign_id"], r[STATUS_REASON], r["count"]) for r in withdrawn))


def _tallies(rendered: DataFrame, *, blocked: DataFrame, plan: DataFrame,
             delivered: DataFrame | None) -> tuple[list[Row], list[Row], list[Row], list[Row]]:
    """Rendered and failed messages per campaign, variant and reason; refused ones per campaign and
    reason; holdout rows per campaign; rendered messages already sent (``delivered``: their ids) per
    campaign. One Spark job for the four (small: one row per group)."""
    tally = "_tally"
    rows = (
        rendered.groupBy("campaign_id", "variant", "reason").count().withColumn(tally, F.lit("rendered"))
        .unionByName(blocked.groupBy("campaign_id", "reason").count()
                     .withColumn("variant", F.lit(None).cast("string")).withColumn(tally, F.lit("refused")))
        .unionByName(plan.where(is_holdout()).groupBy("campaign_id").count()
                     .withColumn("variant", F.lit(None).cast("string")).withColumn("reason", F.lit(None).cast("string"))
                     .withColumn(tally, F.lit("holdout")))
    )
    if delivered is not None:
        rows = rows.unionByName(
            rendered.where(F.col("reason").isNull()).join(delivered, "message_id", how="left_semi")
            .groupBy("campaign_id").count().withColumn("variant", F.lit(None).cast("string"))
            .withColumn("reason", F.lit(None).cast("string")).withColumn(tally, F.lit("already_sent")))
    by_tally: dict[str, list[Row]] = {"rendered": [], "refused": [], "holdout": [], "already_sent": []}
    for row in rows.collect():
        by_tally[row[tally]].append(row)
    return by_tally["rendered"], by_tally["refused"], by_tally["holdout"], by_tally["already_sent"]


def run_render(ctx: RunContext, *, campaign_id: str | None = None, environ: Mapping[str, str] | None = None,
               dbutils: Any = None) -> RenderReport:
    """Render the plan of one campaign (or of all) into ``outbox`` and ``render_errors``.

    Args:
        campaign_id: the campaign to render; None renders every campaign in the plan.
        environ: the process environment, where ``secrets.signing_key = env:NAME`` is looked up (the
            library reads no environment itself; without it only a local run can render, with the
            development key).
        dbutils: Databricks' dbutils, for ``dbsecret:scope/key`` references.
    """
    key, development_key = signing_key(ctx.settings, environ=environ or {}, dbutils=dbutils)
    now = ctx.clock.now()
    plan, campaigns = _latest_plans(ctx, campaign_id)
    users = ctx.lake.read(USERS_TABLE)
    # The table with the consent events the tracking service wrote since ingest's last batch.
    suppressions = suppressions_now(ctx, users=users)
    # Plan rows with their permission, read by the rendering, the errors, the counts and the withdrawals.
    checked = filter_sendable(plan).transform(
        with_mail_permission, users=users, suppressions=suppressions, now=now).persist(KEEP)
    config = RenderConfig.from_settings(ctx.settings.render, signing_key=key, rendered_at=now)
    try:
        # Rendered once: the counts, the merge (which reads its source more than once) and the errors reuse it.
        rendered = render_plan(
            checked.where(F.col("blocked_reason").isNull()).drop("blocked_reason"), users=users,
            products=ctx.lake.read(PRODUCTS_TABLE), config=config, partitions=render_partitions(ctx.spark),
            task_catalogue_max_items=ctx.settings.render.task_catalogue_max_items,
        ).persist(KEEP)
        try:
            blocked = _blocked_rows(checked.where(F.col("blocked_reason").isNotNull()), now=now)
            deliveries = ctx.lake.read(DELIVERIES_TABLE) if ctx.lake.exists(DELIVERIES_TABLE) else None
            counts, refused, holdout, already_sent = _tallies(
                rendered, blocked=blocked, plan=plan,
                delivered=None if deliveries is None else delivered_messages(deliveries))
            messages = rendered.where(F.col("reason").isNull()).select(
                *OUTBOX_COLUMNS, F.lit(None).cast("string").alias(STATUS_REASON))
            failures = rendered.where(F.col("reason").isNotNull()).select(*RENDER_ERROR_COLUMNS).unionByName(blocked)
            outbox, withdrawn = _write_outbox(ctx, messages, failures=failures, campaigns=campaigns, users=users,
                                              suppressions=suppressions, now=now)
            if ctx.lake.exists(ERRORS_TABLE) and campaigns:
                errors = ctx.lake.overwrite(ERRORS_TABLE, failures, where=_in_list("campaign_id", campaigns))
            else:
                errors = ctx.lake.append(ERRORS_TABLE, failures)
        finally:
            rendered.unpersist()
    finally:
        checked.unpersist()
    return RenderReport(
        campaign_id=campaign_id,
        rendered=tuple(sorted((r["campaign_id"], r["variant"] or "", r["count"]) for r in counts
                              if r["reason"] is None)),
        holdout=tuple(sorted((r["campaign_id"], r["count"]) for r in holdout)),
        errors=tuple(sorted([(r["campaign_id"], r["reason"], r["count"]) for r in counts if r["reason"] is not None]
                            + [(r["campaign_id"], r["reason"], r["count"]) for r in refused])),
        development_key=development_key,
        outbox_version=outbox.version,
        errors_version=errors.version,
        withdrawn=withdrawn,
        already_sent=tuple(sorted((r["campaign_id"], r["count"]) for r in already_sent)),
    )


def _eml_name(message_id: str) -> str:
    local = message_id.split("@", 1)[0]
    return f"{local if _HEX_ID.fullmatch(local) else hashlib.sha256(message_id.encode()).hexdigest()[:32]}.eml"


@dataclass(frozen=True)
class ExportReport:
    campaign_id: str
    folder: Path
    written: int
    # reason -> messages not written: an outbox status other than rendered (withdrawn, sent), or
    # the reason their user may not be mailed at export time (inboxlift.consent.BLOCK_REASONS)
    skipped: dict[str, int] = field(default_factory=dict)
    # .eml files of skipped messages that an earlier export had left in the folder
    removed: int = 0

    def summary(self) -> str:
        line = f"{self.campaign_id}: {self.written} .eml files in {self.folder}"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        if self.removed:
            line += f"; {self.removed} earlier .eml files of skipped messages removed"
        return line


def export_eml(ctx: RunContext, *, campaign_id: str, to_dir: str | Path) -> ExportReport:
    """Write a campaign's outbox messages that may leave to ``to_dir/<message-id>.eml``.

    Only ``rendered`` messages whose user may be mailed *now* are written: the permission is
    checked again here (:func:`inboxlift.consent.with_mail_permission`), not trusted from the outbox,
    since consent may have been withdrawn, or the address changed (``address_changed``), since
    rendering; a mailbox suppression of the message's ``to_email`` holds too. A message whose latest
    delivery attempt may have reached the mailbox (``unknown``) or ended it for good (``bounced``,
    ``failed``) is not written either (``delivery_unknown``, ...): a copy sent from the file could
    reach the person twice, or go where the relay refused it. The others are
    counted by reason, and a file an earlier export wrote for one of them is removed. Messages
    stream to the driver a partition at a time (``toLocalIterator``), never all at once. A file is
    written under a temporary name and renamed, so a reader never sees half a message.
    """
    folder = Path(to_dir)
    folder.mkdir(parents=True, exist_ok=True)
    outbox = read_outbox(ctx.lake).where(F.col("campaign_id") == F.lit(campaign_id))
    users = ctx.lake.read(USERS_TABLE)
    checked = outbox.transform(with_mail_permission, users=users, suppressions=suppressions_now(ctx, users=users),
                               now=ctx.clock.now(), address="to_email")
    if ctx.lake.exists(DELIVERIES_TABLE):
        # One row per message: the join keeps one row per outbox message.
        latest = latest_deliveries(ctx.lake.read(DELIVERIES_TABLE)).select("message_id", "last_state")
        checked = checked.join(latest, "message_id", how="left")
    else:
        checked = checked.withColumn("last_state", F.lit(None).cast("string"))
    held = F.when(F.col("last_state").isin(UNKNOWN, BOUNCED, FAILED), F.concat(F.lit("delivery_"), F.col("last_state")))
    skip = F.when(F.col("status") == F.lit(STATUS_RENDERED), F.coalesce(F.col("blocked_reason"), held)).otherwise(
        F.coalesce(F.col("status"), F.lit("no_status")))
    checked = checked.withColumn("_skip", skip)
    # One row per reason.
    skipped = {r["_skip"]: r["count"] for r in checked.where(F.col("_skip").isNotNull()).groupBy("_skip").count()
               .collect()}
    removed = 0
    if skipped:
        for row in checked.where(F.col("_skip").isNotNull()).select("message_id").toLocalIterator():
            stale = folder / _eml_name(row["message_id"])
            if stale.exists():
                stale.unlink()
                removed += 1
    rows = checked.where(F.col("_skip").isNull()).select(
        "message_id", "to_email", "from_email", "subject", "text", "html", "headers",
        # Microseconds since the epoch: Python's Row would give a naive local-time datetime.
        F.unix_micros("send_at").alias("send_at_us"))
    written = 0
    for row in rows.toLocalIterator():
        message = row.asDict()
        if message["send_at_us"] is not None:
            message["send_at"] = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + \
                dt.timedelta(microseconds=message["send_at_us"])
        path = folder / _eml_name(message["message_id"])
        partial = path.with_suffix(".eml.partial")
        partial.write_bytes(eml_bytes(message))
        os.replace(partial, path)
        written += 1
    return ExportReport(campaign_id=campaign_id, folder=folder, written=written, skipped=skipped, removed=removed)


def preview(ctx: RunContext, *, campaign_id: str, user_id: str, to_path: str | Path) -> Path:
    """Write the HTML of one user's message in a campaign to ``to_path``; returns the path.

    Raises:
        LookupError: the outbox holds no message for that campaign and user.
    """
    found = (
        ctx.lake.read(OUTBOX_TABLE)
        .where((F.col("campaign_id") == F.lit(campaign_id)) & (F.col("user_id") == F.lit(user_id)))
        .select("html").limit(1).collect()  # one row at most
    )
    if not found:
        raise LookupError(f"outbox has no message of campaign {campaign_id!r} for user {user_id!r} "
                          "(run render for the campaign first)")
    path = Path(to_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(found[0]["html"], encoding="utf-8")
    return path
