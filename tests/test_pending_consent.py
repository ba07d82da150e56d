"""Suppressions with the consent events the tracking service wrote since ingest's last batch
(inboxlift.pending_consent): what plan, render, export and send read is what ingest will write."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest

from inboxlift.consent import with_mail_permission
from inboxlift.pending_consent import suppressions_now
from inboxlift.service.app import event_line
from inboxlift.stages.ingest import run_ingest

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)   # the ctx fixture's clock
USERS = "user_id string, email string, email_consent boolean"
SUPPRESSIONS = ("user_id string, email_hash string, scope string, reason string, source string, since timestamp, "
                "lifted_at timestamp, updated_at timestamp")
COLUMNS = ["user_id", "email_hash", "scope", "reason", "source", "since", "lifted_at"]


@pytest.fixture(autouse=True)
def utc_session(spark):
    spark.conf.set("spark.sql.session.timeZone", "UTC")


def line(kind: str, user: str, minutes_ago: int, scope: str | None = "all") -> bytes:
    return event_line(event_type=kind, at=NOW - dt.timedelta(minutes=minutes_ago), user_id=user, campaign_id="c0",
                      message_id=f"{user}-m0", properties={"scope": scope} if scope else {})


def permissions(ctx, spark, suppressions) -> dict[tuple[str, str], str | None]:
    people = [(u, t) for u in ("u1", "u2", "u3", "u4", "u5") for t in ("weekly_picks", "cross_sell")]
    rows = spark.createDataFrame(people, "user_id string, campaign_type string")
    checked = rows.transform(with_mail_permission, users=ctx.lake.read("users"), suppressions=suppressions, now=NOW)
    return {(r.user_id, r.campaign_type): r.blocked_reason for r in checked.collect()}


def test_plan_render_and_send_see_the_service_events_ingest_has_not_read_and_ingest_then_writes_the_same(
        ctx, spark):
    ctx.lake.append("users", spark.createDataFrame(
        [(u, f"{u}@mail.example", True) for u in ("u1", "u2", "u3", "u4", "u5")], USERS))
    ctx.lake.append("suppressions", spark.createDataFrame([
        ("u1", hashlib.sha256(b"u1@mail.example").hexdigest(), "all", "unsubscribed", "e0",
         dt.datetime(2026, 11, 19, 8, 0), None, dt.datetime(2026, 11, 19, 9, 0))], SUPPRESSIONS))
    before = permissions(ctx, spark, ctx.lake.read("suppressions"))
    assert suppressions_now(ctx) is not None and permissions(ctx, spark, suppressions_now(ctx)) == before

    serve = Path(ctx.settings.service_events_dir)
    serve.mkdir(parents=True)
    (serve / "serve-1.jsonl").write_bytes(
        line("resubscribe", "u1", 50)                                   # lifts the table's opt-out
        + line("unsubscribe", "u2", 40)                                 # from everything
        + line("preference_change", "u3", 30, scope="weekly_picks")     # only weekly picks from now on
        + line("unsubscribe", "u4", 20, scope="cross_sell")             # from one type
        + line("click", "u5", 10, scope=None)
        + b"{not json\n")
    # The file in progress is ingest's to skip: so does the selection (the send tasks watch it).
    (serve / ".serve-2.jsonl").write_bytes(line("unsubscribe", "u5", 5))

    expected = {("u1", "weekly_picks"): None, ("u1", "cross_sell"): None,
                ("u2", "weekly_picks"): "unsubscribed", ("u2", "cross_sell"): "unsubscribed",
                ("u3", "weekly_picks"): None, ("u3", "cross_sell"): "unsubscribed",
                ("u4", "weekly_picks"): None, ("u4", "cross_sell"): "unsubscribed",
                ("u5", "weekly_picks"): None, ("u5", "cross_sell"): None}
    assert before[("u1", "weekly_picks")] == "unsubscribed"
    predicted = suppressions_now(ctx)
    assert permissions(ctx, spark, predicted) == expected
    assert ctx.lake.read("suppressions").count() == 1      # nothing written

    run_ingest(ctx, echo=lambda _: None)
    written = ctx.lake.read("suppressions")
    assert sorted(map(tuple, written.select(*COLUMNS).collect())) == sorted(map(tuple, predicted.select(*COLUMNS)
                                                                               .collect()))
    # Ingest logged the file: nothing is pending any more, the table alone answers.
    assert permissions(ctx, spark, suppressions_now(ctx)) == expected
    assert sorted(map(tuple, suppressions_now(ctx).select(*COLUMNS).collect())) == sorted(
        map(tuple, written.select(*COLUMNS).collect()))
