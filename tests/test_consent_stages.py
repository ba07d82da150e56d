"""Consent at every step that can lead to a message leaving: ingest keeps ``suppressions``, plan
excludes, render withdraws outbox messages, export re-checks (issue 16, item 1)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from inboxlift.delivery.states import DELIVERIES_SCHEMA
from inboxlift.stages.features import run_features
from inboxlift.stages.ingest import IngestInterrupted, run_ingest
from inboxlift.stages.plan import run_plan
from inboxlift.stages.render import export_eml, run_render

CORPUS = Path(__file__).resolve().parent / "data" / "hostile" / "consent"
DAY = dt.date(2026, 11, 20)
NOW = dt.datetime(2026, 11, 20, 12, 0)   # the ctx fixture's clock, as Spark shows it (session time zone UTC)
SUPPRESSION_COLUMNS = ("user_id string, email_hash string, scope string, reason string, source string, "
                       "since timestamp, lifted_at timestamp, updated_at timestamp")
USERS = ("user_id string, email string, first_name string, locale string, timezone string, country string, "
         "birthday date, email_consent boolean")
PRODUCTS = ("item_id string, name string, brand string, price decimal(12,2), currency string, image_url string, "
            "url string, in_stock boolean")
PLAN = ("campaign_id string, campaign_type string, plan_date date, user_id string, variant string, template string, "
        "locale string, subject_template string, send_at timestamp, reason string, item_ids array<string>, "
        "item_sources array<string>, context map<string,string>, plan_run_id string, planned_at timestamp")


@pytest.fixture(autouse=True)
def utc_session(spark):
    spark.conf.set("spark.sql.session.timeZone", "UTC")


def sha(address: str) -> str:
    return hashlib.sha256(address.encode("utf-8")).hexdigest()


def land(ctx, kind: str, name: str, text: str | None = None) -> None:
    folder = Path(ctx.settings.paths.landing_dir) / kind
    folder.mkdir(parents=True, exist_ok=True)
    if text is None:
        shutil.copy(CORPUS / name, folder / name)
    else:
        (folder / name).write_text(text, encoding="utf-8")


def outbox_state(ctx) -> dict[str, tuple[str, str | None]]:
    return {r.user_id: (r.status, r.status_reason)
            for r in ctx.lake.read("outbox").select("user_id", "status", "status_reason").collect()}


def eml_users(ctx, folder: Path) -> set[str]:
    """Users whose message has a .eml file in ``folder`` (file names are the Message-ID's local part)."""
    names = {p.name for p in folder.glob("*.eml")}
    rows = ctx.lake.read("outbox").select("user_id", "message_id").collect()
    return {r.user_id for r in rows if r.message_id.split("@")[0] + ".eml" in names}


# ---- the scenario, end to end -------------------------------------------------------------

@pytest.fixture
def browse_ctx(ctx, tmp_path):
    campaigns = tmp_path / "campaigns.yml"
    campaigns.write_text(
        "campaigns:\n  browse:\n    type: browse_abandonment\n    template: browse_abandonment\n"
        "    subjects: {A: {en: 'Still interested, {{ first_name }}?'}}\n    split: {A: 1.0}\n"
        "    holdout: 0.0\n    min_products: 1\n")
    paths = dataclasses.replace(ctx.settings.paths, campaigns_file=str(campaigns))
    return dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, paths=paths))


def cycle(ctx):
    run_ingest(ctx, echo=lambda _: None)
    run_features(ctx)
    run_plan(ctx, all_campaigns=True)
    return run_render(ctx)


def test_withdrawn_consent_and_an_unsubscribe_withdraw_earlier_messages_and_export_skips_them(browse_ctx, spark,
                                                                                           tmp_path):
    ctx = browse_ctx
    land(ctx, "users", "users_day1.csv")
    land(ctx, "products", "products.csv")
    land(ctx, "events", "events_day1_views.jsonl")
    first = cycle(ctx)
    assert first.rendered == (("browse", "A", 3),)
    assert outbox_state(ctx) == {u: ("rendered", None) for u in ("u1", "u2", "u3")}
    out = tmp_path / "eml"
    assert export_eml(ctx, campaign_id="browse", to_dir=out).written == 3

    # u1 withdraws consent in a later users file; u2 sends an unsubscribe event.
    land(ctx, "users", "users_day2_consent_withdrawn.csv")
    land(ctx, "events", "events_day2_unsubscribe.jsonl")
    second = cycle(ctx)

    assert_df_equality(ctx.lake.read("suppressions"), spark.createDataFrame([
        ("u2", sha("bo@mail.example"), "all", "unsubscribed", "x1", dt.datetime(2026, 11, 20, 9, 30), None, NOW),
    ], SUPPRESSION_COLUMNS), ignore_nullable=True)
    excluded = {r.user_id: r.reason for r in ctx.lake.read("campaign_exclusions").collect()}
    assert excluded == {"u1": "no_consent", "u2": "unsubscribed"}
    # Never deleted, never left "rendered": withdrawn, with the reason.
    assert outbox_state(ctx) == {"u1": ("withdrawn", "no_consent"), "u2": ("withdrawn", "unsubscribed"),
                                 "u3": ("rendered", None)}
    assert second.withdrawn == (("browse", "no_consent", 1), ("browse", "unsubscribed", 1))
    assert "2 earlier messages withdrawn" in second.summary()

    again = export_eml(ctx, campaign_id="browse", to_dir=out)
    assert (again.written, again.skipped, again.removed) == (1, {"withdrawn": 2}, 2)
    assert eml_users(ctx, out) == {"u3"}
    fresh = export_eml(ctx, campaign_id="browse", to_dir=tmp_path / "fresh")
    assert (fresh.written, fresh.removed) == (1, 0) and eml_users(ctx, tmp_path / "fresh") == {"u3"}

    # The stage run twice leaves the same outbox.
    before = ctx.lake.read("outbox").select("message_id", "status", "status_reason", "subject", "rendered_at")
    before = spark.createDataFrame(before.collect(), before.schema)
    third = run_render(ctx)
    assert third.withdrawn == ()
    assert_df_equality(ctx.lake.read("outbox").select(*before.columns), before, ignore_row_order=True)


# ---- render and export on hand-written tables --------------------------------------------------

def users(spark, consent: dict[str, bool | None]):
    return spark.createDataFrame([(u, f"{u}@mail.example", u.upper(), "en", "UTC", "GB", None, c)
                                  for u, c in consent.items()], USERS)


def plan(spark, rows, day=DAY):
    return spark.createDataFrame([
        (c, t, day, u, "A", t, "en", "Hi {{ first_name }}", dt.datetime(2026, 11, 21, 9), "test", ["i1"], ["als"],
         {}, "plan-1", dt.datetime(2026, 11, 20, 6)) for c, t, u in rows], PLAN)


def catalogue(spark):
    return spark.createDataFrame([("i1", "Lamp", "Lumo", Decimal("12.00"), "USD", "https://img.shop.example/i1.jpg",
                                   "https://shop.example/p/i1", True)], PRODUCTS)


def add_suppression(ctx, spark, user_id, scope, reason):
    ctx.lake.append("suppressions", spark.createDataFrame(
        [(user_id, None, scope, reason, "test", dt.datetime(2026, 11, 20, 11), None, NOW)], SUPPRESSION_COLUMNS))


def set_status(ctx, user_id, status):
    row = ctx.lake.read("outbox").where(F.col("user_id") == user_id).withColumn("status", F.lit(status))
    ctx.lake.merge("outbox", row, keys=["message_id"])


def test_consent_withdrawn_after_render_is_caught_at_export_then_withdrawn_by_the_next_render(ctx, spark, tmp_path):
    ctx.lake.append("users", users(spark, {u: True for u in ("u1", "u2", "u3", "u4", "u5")}))
    ctx.lake.append("products", catalogue(spark))
    ctx.lake.append("campaign_plan", plan(spark, [("c1", "weekly_picks", u) for u in ("u1", "u2", "u3", "u4", "u5")]))
    assert run_render(ctx).messages == 5

    # After render, before export: u1 withdraws consent, u2 unsubscribes from weekly picks, u3 is
    # deleted, u4's message was sent; u5 may still be mailed.
    ctx.lake.overwrite("users", users(spark, {"u1": False, "u2": True, "u4": True, "u5": True}))
    add_suppression(ctx, spark, "u2", "weekly_picks", "unsubscribed")
    set_status(ctx, "u4", "sent")
    report = export_eml(ctx, campaign_id="c1", to_dir=tmp_path / "eml")
    assert (report.written, report.skipped) == (1, {"no_consent": 1, "unsubscribed": 1, "unknown_user": 1, "sent": 1})
    assert eml_users(ctx, tmp_path / "eml") == {"u5"}
    assert "skipped no_consent=1, sent=1, unknown_user=1, unsubscribed=1" in report.summary()
    # Export reads the outbox; it does not change it.
    assert outbox_state(ctx) == {"u1": ("rendered", None), "u2": ("rendered", None), "u3": ("rendered", None),
                                 "u4": ("sent", None), "u5": ("rendered", None)}

    again = run_render(ctx)
    assert outbox_state(ctx) == {"u1": ("withdrawn", "no_consent"), "u2": ("withdrawn", "unsubscribed"),
                                 "u3": ("withdrawn", "unknown_user"), "u4": ("sent", None), "u5": ("rendered", None)}
    assert again.withdrawn == (("c1", "no_consent", 1), ("c1", "unknown_user", 1), ("c1", "unsubscribed", 1))
    errors = {r.user_id: r.reason for r in ctx.lake.read("render_errors").collect()}
    assert errors == {"u1": "no_consent", "u2": "unsubscribed", "u3": "unknown_user"}

    # Consent given again: the next render brings the message back.
    ctx.lake.overwrite("users", users(spark, {"u1": True, "u2": True, "u4": True, "u5": True}))
    run_render(ctx)
    assert outbox_state(ctx)["u1"] == ("rendered", None)


def test_export_checks_the_address_each_message_goes_to_and_leaves_out_what_may_have_arrived(ctx, spark, tmp_path):
    people = ("u1", "u2", "u3", "u4", "u5", "u6", "u7")
    ctx.lake.append("users", users(spark, {u: True for u in people}))
    ctx.lake.append("products", catalogue(spark))
    ctx.lake.append("campaign_plan", plan(spark, [("c1", "weekly_picks", u) for u in people]))
    assert run_render(ctx).messages == 7

    # After render: u1 moves to a new address and u2 now holds u1's old one, from which u2 complained;
    # u3 moves too, nothing suppressed; u4 to u7 keep their addresses.
    moved = {"u1": "u1.new@mail.example", "u2": "u1@mail.example", "u3": "u3.new@mail.example",
             **{u: f"{u}@mail.example" for u in ("u4", "u5", "u6", "u7")}}
    ctx.lake.overwrite("users", spark.createDataFrame(
        [(u, e, u.upper(), "en", "UTC", "GB", None, True) for u, e in moved.items()], USERS))
    ctx.lake.append("suppressions", spark.createDataFrame(
        [("u2", sha("u1@mail.example"), "all", "complained", "test", dt.datetime(2026, 11, 20, 11), None, NOW)],
        SUPPRESSION_COLUMNS))
    # Sent before: u5 got no reply after the content (unknown: it may have arrived); u6 failed for good;
    # u7 was deferred and is still to be tried; u4 was never attempted.
    ids = {r.user_id: r.message_id for r in ctx.lake.read("outbox").collect()}
    attempts = [("u5", "unknown", "no_reply"), ("u6", "failed", "retries_exhausted"), ("u7", "deferred", "temporary")]
    ctx.lake.append("deliveries", spark.createDataFrame(
        [(ids[u], 1, "send-1", state, reason, None, "", "127.0.0.1:25", NOW, None, "c1", u, None, "smtp", None)
         for u, state, reason in attempts], DELIVERIES_SCHEMA))
    report = export_eml(ctx, campaign_id="c1", to_dir=tmp_path / "eml")
    # u1's message still goes to u1@: the complaint about that mailbox holds (u2's too: u2's address now).
    assert (report.written, report.skipped) == (
        2, {"complained": 2, "address_changed": 1, "delivery_unknown": 1, "delivery_failed": 1})
    assert eml_users(ctx, tmp_path / "eml") == {"u4", "u7"}


def test_render_withdraws_a_message_of_another_campaign_still_addressed_to_a_users_old_address(ctx, spark):
    ctx.lake.append("users", users(spark, {"u1": True, "u2": True}))
    ctx.lake.append("products", catalogue(spark))
    ctx.lake.append("campaign_plan", plan(spark, [("c1", "weekly_picks", "u1"), ("c2", "win_back", "u1"),
                                                  ("c2", "win_back", "u2")]))
    assert run_render(ctx).messages == 3
    # u1 moves after render. Rendering c1 again writes u1's c1 message to the new address; u1's c2
    # message, not rendered this run, still names the old one: withdrawn. u2 is untouched.
    ctx.lake.overwrite("users", spark.createDataFrame(
        [(u, e, u.upper(), "en", "UTC", "GB", None, True)
         for u, e in {"u1": "u1.new@mail.example", "u2": "u2@mail.example"}.items()], USERS))
    report = run_render(ctx, campaign_id="c1")
    assert report.withdrawn == (("c2", "address_changed", 1),)
    rows = {(r.campaign_id, r.user_id): (r.status, r.status_reason, r.to_email)
            for r in ctx.lake.read("outbox").collect()}
    assert rows == {("c1", "u1"): ("rendered", None, "u1.new@mail.example"),
                    ("c2", "u1"): ("withdrawn", "address_changed", "u1@mail.example"),
                    ("c2", "u2"): ("rendered", None, "u2@mail.example")}


def test_a_message_rendered_again_after_the_relay_took_it_is_counted_as_already_sent_not_as_written(ctx, spark):
    ctx.lake.append("users", users(spark, {"u1": True, "u2": True}))
    ctx.lake.append("products", catalogue(spark))
    ctx.lake.append("campaign_plan", plan(spark, [("c1", "weekly_picks", "u1"), ("c1", "weekly_picks", "u2")]))
    assert run_render(ctx).messages == 2
    # The relay accepted u1's message: deliveries says so, the outbox row still says rendered.
    (sent_id,) = [r.message_id for r in ctx.lake.read("outbox").where(F.col("user_id") == "u1").collect()]
    ctx.lake.append("deliveries", spark.createDataFrame(
        [(sent_id, 1, "send-1", "sent", None, 250, "2.0.0 ok", "127.0.0.1:25", NOW, None, "c1", "u1",
          sha("u1@mail.example"), "smtp", None)], DELIVERIES_SCHEMA))
    again = run_render(ctx)
    # Both rendered again; only u2's is written (a sent message's row is never rewritten).
    assert sum(n for _, _, n in again.rendered) == 2 and again.already_sent == (("c1", 1),)
    assert again.messages == 1
    assert again.summary().startswith(
        "render (every planned campaign): 1 messages into outbox, 0 rows into render_errors, 0 holdout rows "
        "skipped (no email), 1 rendered again but already sent (left as they were)")


def test_render_withdraws_what_the_latest_plan_no_longer_holds_and_never_touches_a_sent_message(ctx, spark):
    ctx.lake.append("users", users(spark, {u: True for u in ("u1", "u2", "u3", "u4", "u9")}))
    ctx.lake.append("products", catalogue(spark))
    week_ago = DAY - dt.timedelta(days=7)
    ctx.lake.append("campaign_plan", plan(spark, [("c1", "weekly_picks", "u9")], day=week_ago).unionByName(
        plan(spark, [("c1", "weekly_picks", "u1"), ("c1", "weekly_picks", "u2"), ("c2", "win_back", "u4")])))
    run_render(ctx)
    assert set(outbox_state(ctx)) == {"u1", "u2", "u4"}     # c1's latest day only

    # Re-planned: u2 no longer planned, u3 now is; u4 withdraws consent (rendering c1 only withdraws
    # c2's message too: consent is about the user).
    ctx.lake.overwrite("campaign_plan", plan(spark, [("c1", "weekly_picks", "u1"), ("c1", "weekly_picks", "u3")]),
                       where=f"campaign_id = 'c1' AND plan_date = DATE'{DAY}'")
    ctx.lake.overwrite("users", users(spark, {"u1": True, "u2": True, "u3": True, "u4": False, "u9": True}))
    report = run_render(ctx, campaign_id="c1")
    assert report.withdrawn == (("c1", "not_planned", 1), ("c2", "no_consent", 1))
    assert outbox_state(ctx) == {"u1": ("rendered", None), "u2": ("withdrawn", "not_planned"),
                                 "u3": ("rendered", None), "u4": ("withdrawn", "no_consent")}

    # u1's message is sent; a re-plan of the day excludes everyone (no plan rows, only exclusions).
    set_status(ctx, "u1", "sent")
    ctx.lake.overwrite("campaign_plan", plan(spark, []), where=f"campaign_id = 'c1' AND plan_date = DATE'{DAY}'")
    ctx.lake.append("campaign_exclusions", spark.createDataFrame(
        [("c1", DAY, "u1", "frequency_cap", "plan-2"), ("c1", DAY, "u3", "frequency_cap", "plan-2")],
        "campaign_id string, plan_date date, user_id string, reason string, plan_run_id string"))
    report = run_render(ctx)
    # The latest day is the excluding one: last week's plan (u9) is not rendered again.
    assert report.messages == 0 and report.withdrawn == (("c1", "not_planned", 1),)
    assert outbox_state(ctx) == {"u1": ("sent", None), "u2": ("withdrawn", "not_planned"),
                                 "u3": ("withdrawn", "not_planned"), "u4": ("withdrawn", "no_consent")}


def test_render_adds_status_reason_and_plan_date_to_an_outbox_written_before_them(ctx, spark):
    ctx.lake.append("users", users(spark, {"u1": True}))
    ctx.lake.append("products", catalogue(spark))
    ctx.lake.append("campaign_plan", plan(spark, [("c1", "weekly_picks", "u1")]))
    run_render(ctx)
    old = ctx.lake.read("outbox").drop("status_reason", "plan_date")
    ctx.lake.overwrite("outbox", spark.createDataFrame(old.collect(), old.schema), overwrite_schema=True)
    ctx.lake.overwrite("users", users(spark, {"u1": False}))
    run_render(ctx)
    assert outbox_state(ctx) == {"u1": ("withdrawn", "no_consent")}
    assert [r.plan_date for r in ctx.lake.read("outbox").select("plan_date").collect()] == [None]


# ---- ingest keeps the table, once per batch ----------------------------------------------------

USERS_CSV = """\
user_id,email,first_name,locale,timezone,country,birthday,signup_ts,email_consent,consent_ts,updated_at
u1, Ann@Mail.example,Ann,en,UTC,GB,,2026-01-05T10:00:00Z,true,2026-01-05T10:00:00Z,2026-01-05T10:00:00Z
u2,bo@mail.example,Bo,en,UTC,GB,,2026-01-05T10:00:00Z,true,2026-01-05T10:00:00Z,2026-01-05T10:00:00Z
"""


def event(event_id, kind, ts, user_id, **extra) -> str:
    return json.dumps({"event_id": event_id, "event_type": kind, "event_ts": ts, "user_id": user_id, **extra})


def test_ingest_merges_consent_events_into_suppressions_exactly_once_per_batch(ctx, spark):
    land(ctx, "users", "users.csv", USERS_CSV)
    land(ctx, "events", "day1.jsonl", "\n".join([
        event("a", "unsubscribe", "2026-11-19T08:00:00Z", "u1", campaign_type="weekly_picks", campaign_id="c9"),
        event("b", "complaint", "2026-11-19T09:00:00Z", "u2"),
        event("c", "email_open", "2026-11-19T09:30:00Z", "u2"),
    ]) + "\n")
    with pytest.raises(IngestInterrupted):   # after suppressions is written, before the batch is logged
        run_ingest(ctx, fail_after_files=1, fail_at="suppressions", echo=lambda _: None)
    written = ctx.lake.version("suppressions")
    expected = spark.createDataFrame([
        ("u1", sha("ann@mail.example"), "weekly_picks", "unsubscribed", "a", dt.datetime(2026, 11, 19, 8), None, NOW),
        ("u2", sha("bo@mail.example"), "all", "complained", "b", dt.datetime(2026, 11, 19, 9), None, NOW),
    ], SUPPRESSION_COLUMNS)
    assert_df_equality(ctx.lake.read("suppressions"), expected, ignore_row_order=True, ignore_nullable=True)

    run_ingest(ctx, echo=lambda _: None)     # redoes the batch: the merge is not repeated
    assert ctx.lake.version("suppressions") == written
    assert_df_equality(ctx.lake.read("suppressions"), expected, ignore_row_order=True, ignore_nullable=True)

    land(ctx, "events", "day2.jsonl", event("d", "resubscribe", "2026-11-20T08:00:00Z", "u1",
                                            campaign_type="weekly_picks") + "\n")
    run_ingest(ctx, echo=lambda _: None)
    lifted = {(r.user_id, r.scope): r.lifted_at for r in ctx.lake.read("suppressions").collect()}
    assert lifted == {("u1", "weekly_picks"): dt.datetime(2026, 11, 20, 8), ("u2", "all"): None}
    run_ingest(ctx, echo=lambda _: None)     # nothing new: nothing written
    assert ctx.lake.version("suppressions") == written + 1

    # A lake from before the table: the first batch that writes it takes the opt-outs already in
    # events. The events table does not keep an event's campaign_type, so they count for every
    # campaign, and only opt-outs are taken (no resubscribe can lift more than it named).
    shutil.rmtree(ctx.lake.location("suppressions"))
    land(ctx, "events", "day3.jsonl", event("e", "email_open", "2026-11-20T09:00:00Z", "u1") + "\n")
    run_ingest(ctx, echo=lambda _: None)
    rebuilt = ctx.lake.read("suppressions").select("user_id", "scope", "reason", "source", "lifted_at")
    assert sorted(tuple(r) for r in rebuilt.collect()) == [
        ("u1", "all", "unsubscribed", "a", None), ("u2", "all", "complained", "b", None)]
