"""The send stage through Spark against a real scripted SMTP server on loopback (tests/smtp_server.py):
what arrives, the tables it leaves, consent at send time, bad rows, retries across runs, soft and
hard bounces, a relay that refuses TLS or AUTH. The kill test is tests/test_send_kill.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import parse_campaigns
from inboxlift.campaigns.planning import PlanInputs, plan_campaign
from inboxlift.clock import FixedClock
from inboxlift.delivery import states as S
from inboxlift.delivery.journal import LeaseLostError, SendLockedError, runs_dir
from inboxlift.delivery.outbox import read_outbox, with_delivered_status
from inboxlift.render.eml import message_bytes
from inboxlift.service.app import event_line
from inboxlift.stages.send import DeliveryError, _consent_watch, run_send

from smtp_server import ScriptedHandler, smtp_server

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)   # the ctx fixture's clock
OUTBOX = ("message_id string, campaign_id string, campaign_type string, user_id string, variant string, "
          "to_email string, from_email string, subject string, html string, text string, "
          "headers map<string,string>, send_at timestamp, status string, rendered_at timestamp, plan_run_id string, "
          "plan_date date, status_reason string")
USERS = "user_id string, email string, email_consent boolean, locale string, timezone string, birthday date"
SUPPRESSIONS = ("user_id string, email_hash string, scope string, reason string, source string, since timestamp, "
                "lifted_at timestamp, updated_at timestamp")
DELIVERY_COLUMNS = ["message_id", "attempt", "state", "reason", "smtp_code"]


@pytest.fixture(autouse=True)
def utc_session(spark):
    spark.conf.set("spark.sql.session.timeZone", "UTC")


def sha(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()


def mid(user: str, campaign: str = "c1") -> str:
    return f"{campaign}-{user}@shop.example"


def message(user: str, *, campaign: str = "c1", email: str | None = None, send_at=dt.datetime(2026, 11, 20, 9, 0),
            status: str = "rendered", subject: str | None = None, headers: dict | None = None) -> tuple:
    unsubscribe = f"https://t.shop.example/u/{user}-{campaign}-token"
    head = {"From": "Example Shop <news@shop.example>", "Message-ID": f"<{mid(user, campaign)}>",
            "List-Unsubscribe": f"<{unsubscribe}>, <mailto:unsubscribe@shop.example?subject=unsubscribe>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click", "X-Inboxlift-Campaign": campaign}
    return (mid(user, campaign), campaign, "weekly_picks", user, "A", email or f"{user}@mail.example",
            "news@shop.example", subject or f"Picks for {user}", f"<p>Hello {user}</p>", f"Hello {user}\n",
            headers if headers is not None else head, send_at, status, dt.datetime(2026, 11, 20, 6, 0), "plan-1",
            dt.date(2026, 11, 20), None)


def user(user_id: str, consent: bool | None = True, email: str | None = None) -> tuple:
    return (user_id, email or f"{user_id}@mail.example", consent, "en", "UTC", None)


def sending_ctx(ctx, port: int, **delivery):
    options = dict(relay_host="127.0.0.1", relay_port=port, security="none", connections=2, messages_per_second=0.0,
                   domain_messages_per_second=0.0, throttle_backoff_seconds=0.01, throttle_retries=1,
                   command_timeout_seconds=5.0, connect_timeout_seconds=2.0, helo_name="localhost",
                   lock_lease_seconds=30.0)
    settings = dataclasses.replace(ctx.settings, delivery=dataclasses.replace(
        ctx.settings.delivery, **{**options, **delivery}))
    return dataclasses.replace(ctx, settings=settings)


def deliveries(ctx, spark):
    return ctx.lake.read("deliveries").select(*DELIVERY_COLUMNS)


def outbox_statuses(ctx) -> dict[str, tuple[str, str | None]]:
    """The statuses the outbox's readers see (sent from deliveries: inboxlift.delivery.outbox)."""
    return {r.user_id + ("" if r.campaign_id == "c1" else "/" + r.campaign_id): (r.status, r.status_reason)
            for r in read_outbox(ctx.lake).select("user_id", "campaign_id", "status", "status_reason").collect()}


def test_every_due_message_arrives_once_with_the_outbox_headers_and_the_tables_reconcile(ctx, spark):
    rows = [
        message("u1"), message("u2"),
        message("u3"),                                                   # consent withdrawn after render
        message("u4"),                                                   # unsubscribed after render
        message("u5", send_at=dt.datetime(2026, 11, 20, 18, 0)),        # its slot is later today
        message("u6", status="withdrawn"),                               # render withdrew it
        message("u7", email="u7@@mail.example"),                         # the address fails validation again
        message("u8", subject="Hi\r\nBcc: everyone@mail.example"),       # a header with CR/LF
        message("u9", email="u9@bücher.example"),                        # an internationalised domain
        message("u10", send_at=dt.datetime(2026, 11, 18, 9, 0)),         # two days late: expired
        message("u11"),                                                  # the relay refuses the mailbox
    ]
    ctx.lake.append("outbox", spark.createDataFrame(rows, OUTBOX))
    ctx.lake.append("users", spark.createDataFrame(
        [user(f"u{i}") for i in (1, 2, 4, 5, 6, 8, 10, 11)]
        # The outbox holds each user's address at render time: send skips a message to another one.
        + [user("u3", consent=False), user("u7", email="u7@@mail.example"), user("u9", email="u9@bücher.example")],
        USERS))
    ctx.lake.append("suppressions", spark.createDataFrame([
        ("u4", sha("u4@mail.example"), "all", "unsubscribed", "e1", dt.datetime(2026, 11, 20, 7, 0), None,
         dt.datetime(2026, 11, 20, 7, 0))], SUPPRESSIONS))
    handler = ScriptedHandler(script={"u11@mail.example": ["rcpt550"]})

    with smtp_server(handler) as port:
        sending = sending_ctx(ctx, port)
        report = run_send(sending)
        tables = {name: ctx.lake.read(name).collect() for name in ("deliveries", "outbox", "suppressions")}
        again = run_send(sending)

    assert report.states == {"sent": 3, "bounced": 1, "failed": 2}
    assert report.skipped == {"no_consent": 1, "unsubscribed": 1, "expired": 1}
    assert report.due == 9 == 3 + 1 + 2 + 3          # sent + bounced + failed + skipped (no deferred, unknown)
    assert (report.not_yet_due, report.connections, report.suppressed_bounced) == (1, 2, 1)
    summary = report.summary()
    assert "due 9 = sent 3 + deferred 0 + bounced 1 + failed 2 + skipped 3 + unknown 0" in summary
    assert "skipped: expired=1, no_consent=1, unsubscribed=1" in summary and "messages/s" in summary

    # Each due message once, byte for byte what the outbox row makes (Message-ID, List-Unsubscribe...).
    by_id = {r.message_id: r for r in handler.received}
    assert sorted(by_id) == sorted(f"<{mid(u)}>" for u in ("u1", "u2", "u9")) and len(handler.received) == 3
    outbox = {r.message_id: r.asDict() for r in ctx.lake.read("outbox").collect()}
    for user_id in ("u1", "u2", "u9"):
        expected = message_bytes({**outbox[mid(user_id)], "send_at": outbox[mid(user_id)]["send_at"]
                                  .replace(tzinfo=UTC)})
        received = by_id[f"<{mid(user_id)}>"].content
        assert received.split(b"\r\n\r\n", 1)[0] == expected.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nList-Unsubscribe: <https://t.shop.example/u/" + user_id.encode() in received
    assert by_id[f"<{mid('u9')}>"].rcpt == "u9@xn--bcher-kva.example"
    assert handler.transactions["u11@mail.example"] == 1

    assert_df_equality(deliveries(ctx, spark), spark.createDataFrame([
        (mid("u1"), 1, "sent", None, 250), (mid("u2"), 1, "sent", None, 250), (mid("u9"), 1, "sent", None, 250),
        (mid("u3"), 1, "skipped", "no_consent", None), (mid("u4"), 1, "skipped", "unsubscribed", None),
        (mid("u10"), 1, "skipped", "expired", None),
        (mid("u7"), 1, "failed", "invalid_address", None), (mid("u8"), 1, "failed", "header_line_break", None),
        (mid("u11"), 1, "bounced", "rejected", 550),
    ], "message_id string, attempt int, state string, reason string, smtp_code int"),
        ignore_row_order=True, ignore_nullable=True)
    u1 = ctx.lake.read("deliveries").where(F.col("message_id") == mid("u1")).collect()[0]
    assert (u1.user_id, u1.campaign_id, u1.email_hash, u1.relay, u1.origin) == (
        "u1", "c1", sha("u1@mail.example"), f"127.0.0.1:{port}", "smtp")
    assert u1.attempted_at == NOW.replace(tzinfo=None) and u1.run_id == report.run_id
    assert outbox_statuses(ctx) == {
        "u1": ("sent", None), "u2": ("sent", None), "u9": ("sent", None),
        "u3": ("withdrawn", "no_consent"), "u4": ("withdrawn", "unsubscribed"), "u10": ("withdrawn", "expired"),
        "u5": ("rendered", None), "u6": ("withdrawn", None), "u7": ("rendered", None), "u8": ("rendered", None),
        "u11": ("rendered", None)}
    bounce = ctx.lake.read("suppressions").where("user_id = 'u11'").collect()
    assert [(r.scope, r.reason, r.source, r.email_hash, r.lifted_at) for r in bounce] == [
        ("all", "bounced", mid("u11"), sha("u11@mail.example"), None)]
    assert not list(runs_dir(sending.settings.delivery.journal_dir).iterdir())   # committed and removed

    # A second run sends nothing and leaves every table as it was.
    assert (again.due, again.attempted, again.not_yet_due) == (0, 0, 1) and len(handler.received) == 3
    for name, before in tables.items():
        assert sorted(map(str, ctx.lake.read(name).collect())) == sorted(map(str, before)), name

    # The bounced address is excluded from the next plan (the plan reads the same suppressions).
    spec = {"type": "weekly_picks", "template": "weekly_picks", "subjects": {"A": {"en": "Hi"}}, "split": {"A": 1.0},
            "holdout": 0.0, "min_products": 1, "cooldown_days": 0}
    camp = parse_campaigns({"campaigns": {"c2": spec}}, source="test")["c2"]
    people = ("u1", "u11")
    inputs = PlanInputs(
        users=ctx.lake.read("users"),
        user_features=spark.createDataFrame(
            [(u, False, False, 10, [], 0, None, [], "active", 1, [], []) for u in people],
            "user_id string, is_unsubscribed boolean, is_bounced boolean, preferred_send_hour int, "
            "open_cart_item_ids array<string>, open_cart_item_count int, open_cart_added_at timestamp, "
            "browsed_not_bought_item_ids array<string>, lifecycle_stage string, days_since_last_activity int, "
            "top_categories array<string>, negatively_reviewed_item_ids array<string>"),
        item_features=spark.createDataFrame([("i1", "Home", True, False, 100, 1.0, 0, 0)],
                                            "item_id string, category string, is_in_stock boolean, "
                                            "is_new_arrival boolean, days_since_launch int, trending_score double, "
                                            "purchases_90d long, views_90d long"),
        history=spark.createDataFrame([], "campaign_id string, user_id string, plan_date date"),
        purchases=spark.createDataFrame([], "user_id string, item_id string, event_ts timestamp"),
        recommendations=spark.createDataFrame([(u, 1, "i1", "als") for u in people],
                                              "user_id string, rank int, item_id string, source string"),
        similar_items=None, content_similar_items=None, user_segments=None,
        suppressions=ctx.lake.read("suppressions"))
    plan, excluded = plan_campaign(inputs, camp, plan_date=dt.date(2026, 11, 21), plan_run_id="r2", planned_at=NOW)
    assert [r.user_id for r in plan.collect()] == ["u1"]
    assert {r.user_id: r.reason for r in excluded.collect()} == {"u11": "bounced"}


def test_deferred_messages_wait_then_go_soft_bounces_suppress_and_a_dry_run_writes_nothing(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame(
        [message("u1"), message("u2"), message("u2", campaign="c2"), message("u3")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("u1"), user("u2"), user("u3")], USERS))
    handler = ScriptedHandler(script={"u1@mail.example": ["450", "250"], "u2@mail.example": ["452"]})
    with smtp_server(handler) as port:
        sending = sending_ctx(ctx, port, max_attempts=2, soft_bounce_threshold=2, throttle_retries=0)
        dry = run_send(sending, dry_run=True, limit=1)
        assert (dry.attempted, dry.held_back, dry.skipped) == (1, 3, {})
        assert "to send 1" in dry.summary() and not ctx.lake.exists("deliveries") and handler.transactions == {}

        first = run_send(sending)
        waiting = run_send(sending)
        # 20 minutes later: past the first retry back-off (15 minutes).
        third = run_send(dataclasses.replace(sending, clock=FixedClock(NOW + dt.timedelta(minutes=20))))

    assert first.states == {"sent": 1, "deferred": 3}
    assert first.reasons == {("deferred", "temporary"): 1, ("deferred", "throttled"): 2}
    assert (waiting.due, waiting.waiting) == (0, 3)
    assert third.states == {"sent": 1, "failed": 2} and third.suppressed_soft == 1
    assert_df_equality(deliveries(ctx, spark), spark.createDataFrame([
        (mid("u3"), 1, "sent", None, 250),
        (mid("u1"), 1, "deferred", "temporary", 450), (mid("u1"), 2, "sent", None, 250),
        (mid("u2"), 1, "deferred", "throttled", 452), (mid("u2"), 2, "failed", "retries_exhausted", 452),
        (mid("u2", "c2"), 1, "deferred", "throttled", 452), (mid("u2", "c2"), 2, "failed", "retries_exhausted", 452),
    ], "message_id string, attempt int, state string, reason string, smtp_code int"),
        ignore_row_order=True, ignore_nullable=True)
    deferred = ctx.lake.read("deliveries").where(f"message_id = '{mid('u1')}' AND attempt = 1").collect()[0]
    assert deferred.next_attempt_at == dt.datetime(2026, 11, 20, 12, 15)
    assert [r.rcpt for r in handler.received] == ["u3@mail.example", "u1@mail.example"]
    # Two messages in a row given up on 4xx replies: the address is suppressed (soft_bounced).
    soft = ctx.lake.read("suppressions").collect()
    assert [(r.user_id, r.reason, r.scope, r.email_hash) for r in soft] == [
        ("u2", "soft_bounced", "all", sha("u2@mail.example"))]
    assert outbox_statuses(ctx) == {"u1": ("sent", None), "u2": ("rendered", None), "u2/c2": ("rendered", None),
                                    "u3": ("sent", None)}


def test_an_attempt_deferred_untried_does_not_count_towards_max_attempts(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame([message("u1")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("u1")], USERS))
    # An earlier run's task could not reach the relay: attempt 1 deferred untried.
    ctx.lake.append("deliveries", spark.createDataFrame([
        (mid("u1"), 1, "send-0", S.DEFERRED, S.RELAY_UNAVAILABLE, None, "connection refused", "127.0.0.1:1",
         dt.datetime(2026, 11, 20, 11, 0), dt.datetime(2026, 11, 20, 11, 15), "c1", "u1", sha("u1@mail.example"),
         "smtp", None)], S.DELIVERIES_SCHEMA))
    handler = ScriptedHandler(script={"u1@mail.example": ["450"]})
    with smtp_server(handler) as port:
        report = run_send(sending_ctx(ctx, port, max_attempts=2))
    # Attempt 2 is the relay's first look at it: a 4xx defers it (the last allowed try is still to come).
    assert report.states == {"deferred": 1}
    assert_df_equality(deliveries(ctx, spark), spark.createDataFrame([
        (mid("u1"), 1, "deferred", "relay_unavailable", None), (mid("u1"), 2, "deferred", "temporary", 450),
    ], "message_id string, attempt int, state string, reason string, smtp_code int"),
        ignore_row_order=True, ignore_nullable=True)


def test_an_unsubscribe_ingest_has_not_read_stops_the_message_at_selection_or_in_its_task(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame([message(u) for u in ("u1", "u2", "u3")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user(u) for u in ("u1", "u2", "u3")], USERS))
    serve = Path(ctx.settings.service_events_dir)
    serve.mkdir(parents=True)

    def unsubscribe(user_id: str, at: dt.datetime) -> bytes:
        return event_line(event_type="unsubscribe", at=at, user_id=user_id, campaign_id="c0", message_id="m0",
                          properties={"scope": "all", "method": "one_click"})

    # A finished service file ingest has not read: the selection applies it.
    (serve / "serve-1.jsonl").write_bytes(unsubscribe("u2", NOW - dt.timedelta(hours=1)))
    # The service's file in progress, which the selection does not list: u3 clicks during the run.
    (serve / ".serve-2.jsonl").write_bytes(unsubscribe("u3", NOW + dt.timedelta(seconds=30)))
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        sending = sending_ctx(ctx, port)
        first = run_send(sending)
        # The service finishes its file; the next run's selection reads it.
        (serve / ".serve-2.jsonl").rename(serve / "serve-2.jsonl")
        second = run_send(sending)

    assert [r.rcpt for r in handler.received] == ["u1@mail.example"]
    assert (first.states, first.skipped, first.reasons) == (
        {"sent": 1, "deferred": 1}, {"unsubscribed": 1}, {("deferred", "consent_changed"): 1})
    assert "deferred: consent_changed=1" in first.summary()
    assert (second.states, second.skipped) == ({}, {"unsubscribed": 1})
    assert_df_equality(deliveries(ctx, spark), spark.createDataFrame([
        (mid("u1"), 1, "sent", None, 250), (mid("u2"), 1, "skipped", "unsubscribed", None),
        (mid("u3"), 1, "deferred", "consent_changed", None), (mid("u3"), 2, "skipped", "unsubscribed", None),
    ], "message_id string, attempt int, state string, reason string, smtp_code int"),
        ignore_row_order=True, ignore_nullable=True)
    # Nothing was written to suppressions: ingest records the events when it reads the files.
    assert not ctx.lake.exists("suppressions")


def test_the_tasks_watch_the_service_folder_unless_the_recheck_is_off_or_it_is_not_a_local_path(ctx):
    watch = _consent_watch(ctx, NOW)
    margin = dt.timedelta(seconds=ctx.settings.serve.rotate_seconds + 60)
    assert (watch.folder, watch.since, watch.every_seconds) == (
        os.path.abspath(ctx.settings.service_events_dir), NOW - margin, 60.0)
    assert time.time() - margin.total_seconds() - 5 < watch.since_file_time <= time.time() - margin.total_seconds()
    assert watch.opened_before == watch.since_file_time - margin.total_seconds()
    assert _consent_watch(sending_ctx(ctx, 25, consent_recheck_seconds=0), NOW) is None
    remote = dataclasses.replace(ctx.settings, serve=dataclasses.replace(ctx.settings.serve,
                                                                         events_dir="s3://shop/landing/serve"))
    assert _consent_watch(dataclasses.replace(ctx, settings=remote), NOW) is None


def test_a_run_whose_folder_is_still_leased_is_left_alone_and_nothing_is_sent(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame([message("u1"), message("u2")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("u1"), user("u2")], USERS))
    live = runs_dir(ctx.settings.delivery.journal_dir) / "send-20261120T115900Z-0a1b2c3d"
    live.mkdir(parents=True)
    lease = {"run_id": live.name, "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + 600}
    (live / "lease.json").write_text(json.dumps(lease))
    # That run is still going (its lock lost to a fault) and has sent u1.
    lines = [{"k": "start", "m": mid("u1"), "a": 1, "t": NOW.isoformat()},
             {"k": "end", "m": mid("u1"), "a": 1, "t": NOW.isoformat(), "s": "sent", "c": 250}]
    (live / "part-00000-0-0a1b2c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        sending = sending_ctx(ctx, port)
        with pytest.raises(SendLockedError, match="still sending"):
            run_send(sending)
        assert live.is_dir() and handler.transactions == {} and not ctx.lake.exists("deliveries")
        # Its run ended (lease released): the next run commits its folder, then sends the rest.
        (live / "lease.json").write_text(json.dumps({**lease, "expires": 0}))
        report = run_send(sending)
    assert report.recovered_runs == (live.name,) and report.recovered == {"sent": 1}
    assert report.states == {"sent": 1} and [r.rcpt for r in handler.received] == ["u2@mail.example"]
    assert not live.exists()


class TakeoverHandler(ScriptedHandler):
    """Another run takes the send lock over while the first message is with the relay."""

    lock_path = None

    async def handle_DATA(self, server, session, envelope):
        if not self.received:
            self.lock_path.write_text(json.dumps({"run_id": "send-other", "host": "elsewhere.example", "pid": 1,
                                                  "expires": time.time() + 600}))
        return await super().handle_DATA(server, session, envelope)


def test_a_run_that_loses_its_lock_stops_sending_and_commits_nothing(ctx, spark):
    users = ("u1", "u2", "u3")
    ctx.lake.append("outbox", spark.createDataFrame([message(u) for u in users], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user(u) for u in users], USERS))
    journal_dir = ctx.settings.delivery.journal_dir
    # Each message 2.5 s with the relay: the lock (renewed every second) is found lost meanwhile.
    handler = TakeoverHandler(default="slow", slow_seconds=2.5)
    handler.lock_path = Path(journal_dir) / "send.lock"
    with smtp_server(handler) as port:
        sending = sending_ctx(ctx, port, connections=1, lock_lease_seconds=3.0)
        with pytest.raises(LeaseLostError, match="lost the send lock"):
            run_send(sending)
        assert len(handler.received) == 1 and not ctx.lake.exists("deliveries")
        assert json.loads(handler.lock_path.read_text())["run_id"] == "send-other"   # left to its owner
        (folder,) = runs_dir(journal_dir).iterdir()                                  # not committed
        # The other run ends; the next one commits the stopped run's journal and sends the rest.
        handler.lock_path.unlink()
        handler.slow_seconds = 0.0
        report = run_send(sending)
    assert report.recovered_runs == (folder.name,) and report.recovered == {"sent": 1}
    assert report.states == {"sent": 2} and len(handler.received) == 3
    assert sorted(r.rcpt for r in handler.received) == [f"{u}@mail.example" for u in users]


def test_a_relay_that_refuses_tls_or_auth_stops_the_run_before_anything_is_touched(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame([message("u1"), message("u2")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("u1"), user("u2")], USERS))
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        refused = sending_ctx(ctx, port)
        refused = dataclasses.replace(refused, settings=dataclasses.replace(refused.settings, delivery=dataclasses.replace(
            refused.settings.delivery, security="starttls", username="shop")))
        with pytest.raises(DeliveryError, match="does not offer STARTTLS.*nothing was sent"):
            run_send(refused, environ={"INBOXLIFT_SMTP_PASSWORD": "s3cret"})
        assert handler.transactions == {} and not ctx.lake.exists("deliveries")
        assert outbox_statuses(ctx) == {"u1": ("rendered", None), "u2": ("rendered", None)}
        # Nothing was lost: with the relay fixed, the same messages go.
        report = run_send(sending_ctx(ctx, port))
    assert report.states == {"sent": 2} and len(handler.received) == 2


def test_sending_does_not_rewrite_the_outbox_rows_the_readers_see_them_sent(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame([message("u1"), message("u2")], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([user("u1"), user("u2")], USERS))
    version = ctx.lake.version("outbox")
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        report = run_send(sending_ctx(ctx, port))
        again = run_send(sending_ctx(ctx, port))
    assert report.states == {"sent": 2} and again.due == 0 and len(handler.received) == 2
    # The table is as render left it (no commit, bodies not rewritten); its readers see the 250s.
    assert ctx.lake.version("outbox") == version
    assert {r.status for r in ctx.lake.read("outbox").collect()} == {"rendered"}
    assert outbox_statuses(ctx) == {"u1": ("sent", None), "u2": ("sent", None)}


def test_the_outbox_reads_sent_for_the_messages_deliveries_records_sent(spark):
    outbox = spark.createDataFrame([
        ("m1", "rendered", None),            # delivered: sent
        ("m2", "withdrawn", "unsubscribed"),  # withdrawn while it was leaving: the 250 wins
        ("m3", "rendered", None),            # deferred, then bounced: not sent
        ("m4", "sent", None),                # written sent by an earlier release
        ("m5", "withdrawn", "no_consent"),   # skipped
        ("m6", None, None),
    ], "message_id string, status string, status_reason string")
    deliveries = spark.createDataFrame([
        ("m1", 1, "sent"), ("m2", 1, "deferred"), ("m2", 2, "sent"), ("m3", 1, "deferred"), ("m3", 2, "bounced"),
        ("m5", 1, "skipped"), ("m9", 1, "sent"),   # m9: no outbox row, adds none
    ], "message_id string, attempt int, state string")
    expected = [("m1", "sent", None), ("m2", "sent", None), ("m3", "rendered", None), ("m4", "sent", None),
                ("m5", "withdrawn", "no_consent"), ("m6", None, None)]
    assert_df_equality(with_delivered_status(outbox, deliveries=deliveries),
                       spark.createDataFrame(expected, "message_id string, status string, status_reason string"),
                       ignore_row_order=True, ignore_nullable=True)
    assert with_delivered_status(outbox, deliveries=None) is outbox
    empty = deliveries.limit(0)
    assert sorted(with_delivered_status(outbox, deliveries=empty).collect()) == sorted(outbox.collect())


def test_an_empty_outbox_sends_nothing(ctx, spark):
    ctx.lake.append("outbox", spark.createDataFrame([], OUTBOX))
    ctx.lake.append("users", spark.createDataFrame([], USERS))
    report = run_send(sending_ctx(ctx, 1))
    assert (report.due, report.attempted, report.not_yet_due) == (0, 0, 0)
    assert not ctx.lake.exists("deliveries")
