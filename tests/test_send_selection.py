"""Which due messages a send run skips, on hand-written rows (inboxlift.delivery.selection)."""

from __future__ import annotations

import datetime as dt
import hashlib

from inboxlift.consent import SUPPRESSIONS_SCHEMA
from inboxlift.delivery.selection import with_skip_reason

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
USERS = "user_id string, email string, email_consent boolean"
DUE = ("message_id string, campaign_type string, user_id string, to_email string, send_at timestamp, "
       "is_first_attempt boolean")


def sha(address: str) -> str:
    return hashlib.sha256(address.encode("utf-8")).hexdigest()


def skip_reasons(spark, due, users, suppressions=None, max_delay=None):
    frame = with_skip_reason(
        spark.createDataFrame(due, DUE), users=spark.createDataFrame(users, USERS),
        suppressions=spark.createDataFrame(suppressions, SUPPRESSIONS_SCHEMA) if suppressions is not None else None,
        now=NOW, max_delay=max_delay)
    return {r.message_id: r.skip_reason for r in frame.collect()}


def test_a_message_rendered_for_an_address_the_user_no_longer_has_is_skipped(spark):
    # u1's message was rendered to old@; ingest then changed u1's address to new@, and u2, who holds
    # old@ now, complained from it.
    users = [("u1", "new@x.example", True), ("u2", "old@x.example", True), ("u3", "c@x.example", True)]
    complaint = ("u2", sha("old@x.example"), "all", "complained", "e1", NOW - dt.timedelta(days=1), None, NOW)
    due = [("m1", "weekly_picks", "u1", "old@x.example", NOW, True),
           ("m2", "weekly_picks", "u3", "C@x.example", NOW, True),
           ("m3", "weekly_picks", "u3", "gone@x.example", NOW - dt.timedelta(days=3), True)]
    assert skip_reasons(spark, due, users, [complaint]) == {"m1": "complained", "m2": None,
                                                            "m3": "address_changed"}
    # Without the complaint the old address is still not the user's: skipped all the same, before expiry.
    assert skip_reasons(spark, due, users, max_delay=dt.timedelta(hours=1)) == {
        "m1": "address_changed", "m2": None, "m3": "address_changed"}


def test_no_due_messages_no_rows(spark):
    assert skip_reasons(spark, [], [("u1", "a@x.example", True)]) == {}
