"""Which outbox messages a send run attempts: pure DataFrame functions (no storage, no clock).

:func:`with_send_status` gives every ``rendered`` outbox message (of one campaign, or all) its
``send_status`` now, from its latest ``deliveries`` row and its ``send_at``:

- ``not_yet_due``: ``send_at`` is after now (its planned slot has not come);
- ``done``: its latest attempt was ``sent``, ``bounced`` or ``failed`` (never sent again);
- ``unknown``: its latest attempt is ``unknown`` (not sent again unless ``resend_unknown``);
- ``waiting``: ``deferred``, and its ``next_attempt_at`` is after now;
- ``due``: the rest, with ``attempt`` (its last attempt + 1).

:func:`with_skip_reason` then checks the due messages' mail permission at send time
(:func:`inboxlift.consent.with_mail_permission`, the one rule plan, render and export use too) for
the ``to_email`` each was rendered for, and their age: ``skip_reason`` is the permission's reason
(``address_changed`` when ``to_email`` is no longer the user's current address), else ``expired``
(first attempt more than ``max_delay`` after ``send_at``), else null (send it).
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.consent import with_mail_permission
from inboxlift.delivery import states as S
from inboxlift.schemas import require_columns

STATUS_RENDERED = "rendered"
NOT_YET_DUE, DONE, HELD_UNKNOWN, WAITING, DUE = "not_yet_due", "done", "unknown", "waiting", "due"
# The outbox columns selection reads (the bodies are joined in only for the messages sent).
LIGHT_COLUMNS = ("message_id", "campaign_id", "campaign_type", "user_id", "to_email", "send_at", "status")


def latest_deliveries(deliveries: DataFrame) -> DataFrame:
    """``message_id, last_attempt, last_state, next_attempt_at, untried_attempts``: each message's latest
    attempt, and how many of its attempts were deferred without reaching the relay (they keep their
    ``deliveries`` rows but do not count towards ``max_attempts``)."""
    require_columns(deliveries, ["message_id", "attempt", "state", "reason", "next_attempt_at"],
                    step="latest_deliveries")
    untried = (F.col("state") == F.lit(S.DEFERRED)) & F.col("reason").isin(*S.UNTRIED_REASONS)
    # (message_id, attempt) is the table's key: max_by over attempt is one row, no tie.
    return deliveries.groupBy("message_id").agg(
        F.max("attempt").alias("last_attempt"),
        F.max_by("state", "attempt").alias("last_state"),
        F.max_by("next_attempt_at", "attempt").alias("next_attempt_at"),
        F.count_if(untried).cast("int").alias("untried_attempts"),
    )


def with_send_status(outbox: DataFrame, *, latest: DataFrame | None, now: dt.datetime,
                     campaign_id: str | None = None, resend_unknown: bool = False) -> DataFrame:
    """The ``rendered`` outbox messages' light columns with ``send_status``, ``attempt``,
    ``is_first_attempt`` and ``untried_attempts`` (see the module docstring and :func:`latest_deliveries`)."""
    require_columns(outbox, list(LIGHT_COLUMNS), step="with_send_status")
    rendered = outbox.where(F.col("status") == F.lit(STATUS_RENDERED))
    if campaign_id is not None:
        rendered = rendered.where(F.col("campaign_id") == F.lit(campaign_id))
    light = rendered.select(*LIGHT_COLUMNS)
    if latest is None:
        frame = light.select("*", F.lit(None).cast("int").alias("last_attempt"),
                             F.lit(None).cast("string").alias("last_state"),
                             F.lit(None).cast("timestamp").alias("next_attempt_at"),
                             F.lit(None).cast("int").alias("untried_attempts"))
    else:
        # latest holds one row per message: the join keeps one row per outbox message.
        frame = light.join(latest, "message_id", how="left")
    state = F.col("last_state")
    is_final = F.coalesce(state.isin(*S.FINAL_STATES), F.lit(False))
    is_unknown = F.coalesce(state == F.lit(S.UNKNOWN), F.lit(False)) & F.lit(not resend_unknown)
    is_waiting = F.coalesce((state == F.lit(S.DEFERRED)) & (F.col("next_attempt_at") > F.lit(now)), F.lit(False))
    not_yet = F.coalesce(F.col("send_at") > F.lit(now), F.lit(False))
    status = (F.when(is_final, F.lit(DONE)).when(is_unknown, F.lit(HELD_UNKNOWN)).when(is_waiting, F.lit(WAITING))
              .when(not_yet, F.lit(NOT_YET_DUE)).otherwise(F.lit(DUE)))
    # A message skipped earlier (consent) and rendered again counts as never attempted.
    first: Column = F.col("last_state").isNull() | (F.col("last_state") == F.lit(S.SKIPPED))
    return frame.select(
        *LIGHT_COLUMNS, status.alias("send_status"),
        (F.coalesce(F.col("last_attempt"), F.lit(0)) + 1).cast("int").alias("attempt"),
        first.alias("is_first_attempt"),
        F.coalesce(F.col("untried_attempts"), F.lit(0)).alias("untried_attempts"),
    )


def with_skip_reason(due: DataFrame, *, users: DataFrame, suppressions: DataFrame | None, now: dt.datetime,
                     max_delay: dt.timedelta | None) -> DataFrame:
    """``due`` (from :func:`with_send_status`) with ``skip_reason``: the mail permission's reason now,
    else ``expired``, else null."""
    require_columns(due, ["message_id", "user_id", "campaign_type", "to_email", "send_at", "is_first_attempt"],
                    step="with_skip_reason")
    # The relay gets to_email: that address, not only the user's current one, must be mailable.
    checked = due.transform(with_mail_permission, users=users, suppressions=suppressions, now=now,
                            address="to_email")
    expired = F.lit(False) if max_delay is None else (
        F.col("is_first_attempt") & F.coalesce(F.col("send_at") < F.lit(now - max_delay), F.lit(False)))
    reason = F.coalesce(F.col("blocked_reason"), F.when(expired, F.lit(S.EXPIRED)))
    return checked.withColumn("skip_reason", reason).drop("blocked_reason")
