"""Consent changes the tracking service recorded that ingest has not read yet (README "Sending").

The preference page and the one-click unsubscribe (``inboxlift serve``) write their events to the
service's event files (``serve.events_dir``); ``ingest`` applies them to ``suppressions`` in its next
batch. A message must not leave on the strength of a table that is behind the person's last click, so
every step that can lead to a message leaving (plan, render, export, send) reads the suppressions
through :func:`suppressions_now`: the table, with the consent events of the service's files that
ingest has not logged yet (``ingest_files``) applied by the rule ingest applies
(:func:`inboxlift.consent.suppression_updates`). Nothing is written: ingest still records the events
and merges them. The file in progress (a hidden ``.serve-*.jsonl``, at most ``serve.rotate_seconds``
old) is not listed here, as ingest does not list it; a send run's tasks read it
(:mod:`inboxlift.delivery.consent_watch`).

Spark's file listing and text reader, as ingest uses them: any file system Spark reads.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.consent import (
    CONSENT_EVENT_TYPES,
    SUPPRESSION_KEY,
    SUPPRESSIONS_SCHEMA,
    SUPPRESSIONS_TABLE,
    suppression_updates,
)
from inboxlift.context import RunContext
from inboxlift.schemas import EVENTS_LANDING
from inboxlift.session import materialize
from inboxlift.stages.ingest_plan import new_files
from inboxlift.stages.ingest_sources import LANDING_SUFFIXES, list_files, read_text_lines, root_uri
from inboxlift.transforms.ingest import parse_json_lines, parse_timestamp

EVENTS_KIND = "events"


def pending_consent_events(ctx: RunContext) -> DataFrame | None:
    """``event_id, event_type, event_ts, user_id, campaign_type``: the consent events of the service's
    finished event files that ingest has not logged; None when there is no such file.

    Files are matched with ``ingest_files`` as ingest matches them (kind, path relative to the landing
    folder, size, modification time). A line that is not a JSON object, or names no user or time, is
    left out here; ingest quarantines it.
    """
    root = root_uri(ctx.settings.paths.landing_dir)
    listing = list_files(ctx.spark, ctx.settings.service_events_dir, root=root, kind=EVENTS_KIND,
                         suffixes=LANDING_SUFFIXES[EVENTS_KIND])
    if listing is None:
        return None
    # File metadata, one row per file ingest has not logged (those written since its last batch).
    files = new_files(ctx, [listing], roots={EVENTS_KIND: root})
    if not files:
        return None
    records = parse_json_lines(read_text_lines(ctx.spark, [f.path for f in files]), fields=EVENTS_LANDING)
    return (records.where(F.col("parse_error").isNull() & F.col("event_type").isin(*CONSENT_EVENT_TYPES))
            .select("event_id", "event_type", parse_timestamp(F.col("event_ts")).alias("event_ts"), "user_id",
                    "campaign_type"))


def suppressions_now(ctx: RunContext, *, users: DataFrame | None = None) -> DataFrame | None:
    """The ``suppressions`` table as it will stand once ingest has read the service's pending consent
    events (:func:`pending_consent_events`); None when there is neither a table nor such an event file.

    Args:
        users: ``user_id, email`` (a new suppression row hashes the user's address); default the
            ``users`` table.
    """
    lake = ctx.lake
    table = lake.read(SUPPRESSIONS_TABLE) if lake.exists(SUPPRESSIONS_TABLE) else None
    events = pending_consent_events(ctx)
    # Most of the service's lines are opens and clicks: without a consent event the table answers.
    if events is None or events.isEmpty():
        return table
    current = table if table is not None else ctx.spark.createDataFrame([], SUPPRESSIONS_SCHEMA)
    if users is None:
        users = (lake.read("users") if lake.exists("users")
                 else ctx.spark.createDataFrame([], "user_id string, email string"))
    updates = suppression_updates(events, current=current, users=users.select("user_id", "email"),
                                  updated_at=ctx.clock.now())
    # Each key the events touch, as it stands after them; the others as the table has them.
    kept = current.join(updates.select(*SUPPRESSION_KEY), SUPPRESSION_KEY, how="left_anti")
    # Computed once, its plan cut: with_mail_permission reads the suppressions up to four times, and
    # the events' parsing and ordering under each read made a plan Catalyst took seconds to optimise.
    return materialize(kept.unionByName(updates.select(*SUPPRESSIONS_SCHEMA.fieldNames())))
