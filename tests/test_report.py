"""The report stage on hand-built tables (tests/report_data.py): attribution counted by hand, both
tables, idempotence, the figures, the page and the MLflow run; the notebook executed on the result."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
import runpy
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from pyspark.sql import functions as F

from conftest import settings_in
from inboxlift.campaigns.experiments import compare_proportions
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.models.tracking import tracking_client
from inboxlift.reporting.plots import cumulative_figure, rates_figure
from inboxlift.storage import Lake
from inboxlift.stages.report import EXPERIMENTS_TABLE, RESULTS_TABLE, run_report
from inboxlift.transforms.attribution import (
    OUTCOME_COLUMNS,
    attribute_orders,
    human_touches,
    orders_of,
    recipient_outcomes,
)
from inboxlift.transforms.campaign_results import (
    aggregate_results,
    bootstrap_revenue_sums,
    summarise_outcomes,
    user_patterns,
)
from report_data import CAMPAIGNS_YAML, D10, EXPECTED, ts, write_tables

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(spark, spark_info, base_settings, tmp_path_factory):
    """The hand-built tables reported twice: (context, first run, second run, both tables after the first)."""
    tmp_path = tmp_path_factory.mktemp("report")
    campaigns = tmp_path / "campaigns.yml"
    campaigns.write_text(CAMPAIGNS_YAML, encoding="utf-8")
    settings = settings_in(base_settings, tmp_path)
    settings = dataclasses.replace(
        settings, paths=dataclasses.replace(settings.paths, campaigns_file=str(campaigns)),
        report=dataclasses.replace(settings.report, min_recipients_per_arm=1, bootstrap_replicates=50))
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at("2026-11-20T12:00:00"))
    write_tables(spark, lake)
    first = run_report(ctx)
    tables = _results(ctx), _experiments(ctx)
    second = run_report(ctx)
    return ctx, first, second, tables


def _results(ctx: RunContext) -> dict:
    rows = ctx.lake.read(RESULTS_TABLE).collect()
    return {(r.campaign_id, r.variant, r.send_date): r.asDict() for r in rows}


def _experiments(ctx: RunContext) -> list:
    return ctx.lake.read(EXPERIMENTS_TABLE).orderBy("campaign_id", "test", "metric", "variant").collect()


def test_attribution_counts_match_the_hand_worked_story(reported):
    ctx, _, _, (results, _) = reported
    assert set(results) == set(EXPECTED)
    for key, expected in EXPECTED.items():
        got = {k: results[key][k] for k in expected}
        assert got == pytest.approx(expected), key
    # Wilson 95% for 3 of 3 (wb A click rate), by hand: centre (1 + z²/6) / (1 + z²/3) = 0.719252,
    # half-width z * sqrt(z²/36) / (1 + z²/3) = 0.280747 -> [0.4385, 1].
    a = results[("wb", "A", D10)]
    assert a["click_rate"] == 1.0
    assert a["click_rate_low"] == pytest.approx(0.4385, abs=1e-4) and a["click_rate_high"] == 1.0
    # Rates over no trials are null, not 0 or NaN.
    holdout = results[("wb", "holdout", D10)]
    assert holdout["click_rate"] is None and holdout["click_rate_low"] is None
    assert holdout["window_conversion_rate"] == 0.5
    assert all(r["is_window_closed"] for r in results.values())


def test_a_second_run_leaves_the_same_tables(reported):
    ctx, first, second, (results, experiments) = reported
    assert _results(ctx) == results
    assert _experiments(ctx) == experiments
    assert first.result_rows == second.result_rows == len(EXPECTED)


def test_experiments_hold_one_row_per_test(reported):
    _, _, _, (_, experiments) = reported
    # One A/B test per metric for wb (cs has one variant), two holdout tests per campaign.
    tests = {(e.campaign_id, e.test, e.metric): e for e in experiments}
    assert set(tests) == {("wb", "ab", "clicks"), ("wb", "ab", "conversions"), ("wb", "holdout", "conversions"),
                          ("wb", "holdout", "revenue"), ("cs", "holdout", "conversions"), ("cs", "holdout", "revenue")}
    clicks = tests[("wb", "ab", "clicks")]
    assert (clicks.n_variant, clicks.successes_variant, clicks.n_control, clicks.successes_control) == (2, 0, 3, 3)
    assert clicks.status == "final" and clicks.variant == "B" and clicks.control == "A"
    # One message per user in the test: the design effect is 1, and the stage computed it.
    assert (clicks.design_effect_variant, clicks.design_effect_control) == (1.0, 1.0)
    assert "clustered by user" in clicks.method
    # wb holdout conversions: treated 4 of 7 in the window, holdout 1 of 2.
    uplift = tests[("wb", "holdout", "conversions")]
    assert (uplift.successes_variant, uplift.n_variant, uplift.successes_control, uplift.n_control) == (4, 7, 1, 2)
    assert uplift.difference == pytest.approx(4 / 7 - 1 / 2)
    revenue = tests[("wb", "holdout", "revenue")]
    assert revenue.difference == pytest.approx((70 + 45) / 7 - 40 / 2)
    assert revenue.difference_low <= revenue.difference <= revenue.difference_high


def test_figures_page_and_mlflow_run(reported):
    ctx, _, run, _ = reported
    folder = Path(ctx.settings.paths.output_dir) / "report"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["cumulative_by_day.png", "rates_by_variant.png", "uplift_by_campaign.png"]
    assert all((folder / p).read_bytes()[:8] == PNG for p in pngs)
    page = (folder / "report.html").read_text("utf-8")
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "wb" in page and "holdout uplift" in page

    client = tracking_client(ctx.settings.mlflow)
    logged = client.get_run(run.run_id)
    assert logged.data.tags["inboxlift.stage"] == "report"
    assert logged.data.metrics["tests"] == 6
    artifacts = sorted(a.path for a in client.list_artifacts(run.run_id, "report"))
    assert artifacts == ["report/campaign_experiments.csv", "report/cumulative_by_day.png", "report/rates_by_variant.png",
                         "report/report.html", "report/uplift_by_campaign.png"]
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="report/report.html",
                                                          tracking_uri=mlflow.get_tracking_uri()))
    assert downloaded.read_text("utf-8") == page


def test_nothing_sent_yet_gives_empty_tables_and_a_page_saying_so(ctx, tmp_path):
    spark = ctx.spark
    ctx.lake.append("campaign_plan", spark.createDataFrame(
        [("wb", "2026-11-19", "u1", "A")], "campaign_id string, plan_date string, user_id string, variant string")
        .select("campaign_id", F.to_date("plan_date").alias("plan_date"), "user_id", "variant",
                F.lit(None).cast("timestamp").alias("send_at")))
    ctx.lake.append("outbox", spark.createDataFrame(
        [], "message_id string, campaign_id string, plan_date date, user_id string, variant string, status string, "
            "send_at timestamp"))
    ctx.lake.append("events", spark.createDataFrame(
        [], "event_id string, user_id string, event_type string, event_ts timestamp, order_id string, quantity int, "
            "price decimal(12,2), message_id string, properties map<string,string>"))
    run = run_report(ctx)
    assert run.result_rows == 0 and run.verdicts == ()
    assert ctx.lake.read(RESULTS_TABLE).isEmpty() and ctx.lake.read(EXPERIMENTS_TABLE).isEmpty()
    page = (tmp_path / "output" / "report" / "report.html").read_text("utf-8")
    assert "No campaign has sent anything yet." in page


def test_last_touch_prefers_the_latest_click_and_ignores_machine_opens(spark):
    """The attribution transform alone on three orders of one user."""
    events = spark.createDataFrame([
        ("c1", "u", "email_click", "2026-11-01 10:00:00", None, "mA", None),
        ("c2", "u", "email_click", "2026-11-02 10:00:00", None, "mB", None),
        ("v1", "u", "email_open", "2026-11-02 11:00:00", None, "mA", {"is_machine_open": "false"}),
        ("v2", "u", "email_open", "2026-11-06 08:00:00", None, "mA", {"is_machine_open": "true"}),
        # Inside both clicks' windows: the later click (mB) wins over the earlier click and the later open.
        ("p1", "u", "purchase", "2026-11-02 12:00:00", "o1", None, None),
        # Exactly 3 days after mB's click: the window is half-open, so no click; no human open within 1 day.
        ("p2", "u", "purchase", "2026-11-05 10:00:00", "o2", None, None),
        # Only a machine open before it: no touch.
        ("p3", "u", "purchase", "2026-11-06 09:00:00", "o3", None, None),
    ], "event_id string, user_id string, event_type string, ts string, order_id string, message_id string, "
       "properties map<string,string>").select(
        "event_id", "user_id", "event_type", F.to_timestamp("ts").alias("event_ts"), "order_id",
        F.lit(1).alias("quantity"), F.lit(10).cast("decimal(12,2)").alias("price"), "message_id", "properties")
    messages = spark.createDataFrame([("mA", "u"), ("mB", "u")], "message_id string, user_id string")
    credited = attribute_orders(orders_of(events), human_touches(events), messages, click_through_days=3,
                                view_through_days=1)
    assert {r.message_id: (r.attributed_orders, r.attributed_revenue) for r in credited.collect()} == {"mB": (1, 10.0)}


def test_a_machine_flag_counts_in_any_case_and_only_when_it_says_true(spark):
    """The tracking service writes "true"; a file from elsewhere may write "True" or "TRUE". Only the
    opens whose flag is none of those are human touches."""
    flags = {"o1": "true", "o2": "True", "o3": "TRUE", "o4": "false", "o5": "yes", "o6": None, "o7": " true"}
    events = spark.createDataFrame(
        [(e, "email_open", "2026-11-02 11:00:00", f"m-{e}", {"is_machine_open": v} if v is not None else None)
         for e, v in flags.items()]
        + [("c1", "email_click", "2026-11-02 11:00:00", "m-c1", {"is_machine_click": "tRuE"}),
           ("c2", "email_click", "2026-11-02 11:00:00", "m-c2", {"is_machine_open": "true"})],
        "event_id string, event_type string, ts string, message_id string, properties map<string,string>",
    ).withColumn("event_ts", F.to_timestamp("ts"))
    assert {r.message_id for r in human_touches(events).collect()} == {"m-o4", "m-o5", "m-o6", "m-o7", "m-c2"}


def test_last_touch_counts_a_click_at_the_order_instant_and_breaks_ties_by_message_id(spark):
    """The timeline's order: a touch at the order's very instant counts (the window is [touch,
    touch + days)), and of two clicks at one instant the smaller message id is credited."""
    events = spark.createDataFrame([
        ("c1", "u", "email_click", "2026-11-01 10:00:00", None, "mZ"),
        ("c2", "u", "email_click", "2026-11-01 10:00:00", None, "mB"),
        ("p1", "u", "purchase", "2026-11-01 10:00:00", "o1", None),
        # A click one microsecond after an order does not count for it: o2, just inside the 10:00
        # clicks' three days, is mB's again, not mC's.
        ("c3", "u", "email_click", "2026-11-04 09:59:59.999999", None, "mC"),
        ("p2", "u", "purchase", "2026-11-04 09:59:59.999998", "o2", None),
    ], "event_id string, user_id string, event_type string, ts string, order_id string, message_id string").select(
        "event_id", "user_id", "event_type", F.to_timestamp("ts").alias("event_ts"), "order_id",
        F.lit(1).alias("quantity"), F.lit(10).cast("decimal(12,2)").alias("price"), "message_id",
        F.lit(None).cast("map<string,string>").alias("properties"))
    messages = spark.createDataFrame([("mZ", "u"), ("mB", "u"), ("mC", "u")], "message_id string, user_id string")
    credited = attribute_orders(orders_of(events), human_touches(events), messages, click_through_days=3,
                                view_through_days=1)
    assert {r.message_id: r.attributed_orders for r in credited.collect()} == {"mB": 2}


def test_recipient_rows_merge_plan_and_outbox_and_count_their_orders(spark):
    """recipient_outcomes alone: u1 has two campaigns' messages on one day (the second's plan row
    says variant B and 12:00, its message A and 12:05: the message's variant, the plan's time), u2 is
    held out, u3's message lost its plan row (replaced after it left: the outbox's time counts)."""
    d = D10
    plan = spark.createDataFrame([("c1", d, "u1", "A", ts("2026-11-10T10:00:00")),
                                  ("c2", d, "u1", "B", ts("2026-11-10T12:00:00")),
                                  ("c1", d, "u2", "holdout", ts("2026-11-10T10:00:00"))],
                                 "campaign_id string, plan_date date, user_id string, variant string, "
                                 "send_at timestamp")
    outbox = spark.createDataFrame([("m1", "c1", d, "u1", "A", "sent", ts("2026-11-10T10:00:00")),
                                    ("m2", "c2", d, "u1", "A", "sent", ts("2026-11-10T12:05:00")),
                                    ("m3", "c1", d, "u3", "A", "sent", ts("2026-11-10T10:30:00"))],
                                   "message_id string, campaign_id string, plan_date date, user_id string, "
                                   "variant string, status string, send_at timestamp")
    deliveries = spark.createDataFrame([("m1", "sent"), ("m2", "sent"), ("m3", "bounced")],
                                       "message_id string, state string")
    events = spark.createDataFrame([
        # u1 clicks c1's message, then opens c2's; the order after both is c1's (a click beats an open).
        ("e1", "u1", "email_click", ts("2026-11-10T11:00:00"), None, None, None, "m1", None),
        ("e2", "u1", "email_open", ts("2026-11-10T12:30:00"), None, None, None, "m2", {"is_machine_open": "false"}),
        ("e3", "u1", "purchase", ts("2026-11-10T13:00:00"), "o1", 1, 10.0, None, None),
        # Inside u2's uplift window (3 days from 10:00); u3's order is at its window's end, which is open.
        ("e4", "u2", "purchase", ts("2026-11-12T09:00:00"), "o2", 2, 10.0, None, None),
        ("e5", "u3", "purchase", ts("2026-11-13T10:30:00"), "o3", 1, 5.0, None, None),
    ], "event_id string, user_id string, event_type string, event_ts timestamp, order_id string, quantity int, "
       "price double, message_id string, properties map<string,string>")
    outcomes = recipient_outcomes(plan, outbox, deliveries, events, click_through_days=3, view_through_days=1,
                                  uplift_window_days=3)
    assert outcomes.columns == OUTCOME_COLUMNS
    got = {(r.campaign_id, r.user_id): r.asDict() for r in outcomes.collect()}
    # campaign, user -> variant, message, send time, sent, bounced, delivered, opened, clicks,
    # attributed orders and revenue, window orders and revenue (worked out from the story above).
    expected = {
        ("c1", "u1"): ("A", "m1", "2026-11-10T10:00:00", True, False, True, True, 1, 1, 10.0, 1, 10.0),
        ("c2", "u1"): ("A", "m2", "2026-11-10T12:00:00", True, False, True, True, 0, 0, 0.0, 1, 10.0),
        ("c1", "u2"): ("holdout", None, "2026-11-10T10:00:00", False, False, False, False, 0, 0, 0.0, 1, 20.0),
        ("c1", "u3"): ("A", "m3", "2026-11-10T10:30:00", True, True, False, False, 0, 0, 0.0, 0, 0.0),
    }
    assert set(got) == set(expected)
    for key, values in expected.items():
        row = got[key]
        assert (row["variant"], row["message_id"], row["send_at"], row["is_sent"], row["is_bounced"],
                row["is_delivered"], row["is_opened"], row["clicks"], row["attributed_orders"],
                row["attributed_revenue"], row["window_orders"], row["window_revenue"]) == (
            *values[:2], ts(values[2]), *values[3:]), key
        assert row["send_date"] == d and row["is_treated"] == (values[0] != "holdout")


def test_each_flag_and_orders_at_one_instant_reach_their_recipient(spark):
    """recipient_outcomes carries a message's flags to the per-user step as the bits of one int and
    orders a user's orders by time and revenue (not by order key): each flag lands in its own
    column, and two orders at the same instant with the same revenue are both counted."""
    d = D10
    plan = spark.createDataFrame([("c1", d, "u1", "A", ts("2026-11-10T10:00:00")),
                                  ("c1", d, "u2", "A", ts("2026-11-10T10:00:00"))],
                                 "campaign_id string, plan_date date, user_id string, variant string, "
                                 "send_at timestamp")
    outbox = spark.createDataFrame([("m1", "c1", d, "u1", "A", "sent", ts("2026-11-10T10:00:00")),
                                    ("m2", "c1", d, "u2", "A", "sent", ts("2026-11-10T10:00:00"))],
                                   "message_id string, campaign_id string, plan_date date, user_id string, "
                                   "variant string, status string, send_at timestamp")
    # m1 is accepted, then bounced (a later DSN): sent and bounced, not delivered. m2 is accepted.
    deliveries = spark.createDataFrame([("m1", "sent"), ("m1", "bounced"), ("m2", "sent")],
                                       "message_id string, state string")
    events = spark.createDataFrame([
        # m1: a complaint only. m2: two clicks, an unsubscribe.
        ("e1", "u1", "complaint", ts("2026-11-10T11:00:00"), None, None, None, "m1"),
        ("e2", "u2", "email_click", ts("2026-11-10T11:00:00"), None, None, None, "m2"),
        ("e3", "u2", "email_click", ts("2026-11-10T11:30:00"), None, None, None, "m2"),
        ("e4", "u2", "unsubscribe", ts("2026-11-10T12:00:00"), None, None, None, "m2"),
        # Two orders of u2 at one instant, 20.0 each (o9 sorts after o1 by key, before it by nothing):
        # both after the clicks, both credited to m2 and both in its uplift window.
        ("e5", "u2", "purchase", ts("2026-11-10T13:00:00"), "o9", 2, 10.0, None),
        ("e6", "u2", "purchase", ts("2026-11-10T13:00:00"), "o1", 1, 20.0, None),
    ], "event_id string, user_id string, event_type string, event_ts timestamp, order_id string, quantity int, "
       "price double, message_id string").withColumn("properties", F.lit(None).cast("map<string,string>"))
    outcomes = recipient_outcomes(plan, outbox, deliveries, events, click_through_days=3, view_through_days=1,
                                  uplift_window_days=3)
    got = {r.user_id: r.asDict() for r in outcomes.collect()}
    flags = ["is_sent", "is_bounced", "is_delivered", "is_opened", "is_clicked", "is_unsubscribed", "is_complained"]
    assert {u: [got[u][f] for f in flags] for u in got} == {
        "u1": [True, True, False, False, False, False, True],
        "u2": [True, False, True, True, True, True, False],
    }
    assert [got["u1"][c] for c in ("clicks", "attributed_orders", "window_orders")] == [0, 0, 0]
    assert [got["u2"][c] for c in ("clicks", "attributed_orders", "attributed_revenue", "window_orders",
                                   "window_revenue")] == [2, 2, 40.0, 2, 40.0]


def test_the_kept_summary_has_a_row_per_spender_and_one_per_group_and_adds_up(spark):
    """What the report keeps between the results and the bootstrap: the recipients with window revenue
    one row each, the others of a campaign, variant and day summed into one; both readers get from
    it what they got from one row per recipient (worked out by hand below)."""
    d = D10
    at = ts("2026-11-10T10:00:00")
    # user, variant, delivered, clicks, attributed orders and revenue, window orders and revenue
    recipients = [("u1", "A", True, 1, 1, 10.0, 1, 10.0), ("u2", "A", True, 2, 0, 0.0, 0, 0.0),
                  ("u3", "A", False, 0, 0, 0.0, 0, 0.0), ("u4", "B", True, 1, 1, 5.0, 1, 5.0),
                  ("u5", "holdout", False, 0, 0, 0.0, 1, 7.5), ("u6", "holdout", False, 0, 0, 0.0, 0, 0.0),
                  ("u7", "holdout", False, 0, 0, 0.0, 1, -3.0)]   # u7's order was refunded
    rows = [("c1", variant, d, user, at, variant != "holdout", variant != "holdout", delivered, False, clicks > 0,
             clicks > 0, clicks, orders, revenue, False, user == "u2", window_orders, window_revenue)
            for user, variant, delivered, clicks, orders, revenue, window_orders, window_revenue in recipients]
    outcomes = spark.createDataFrame(rows, (
        "campaign_id string, variant string, send_date date, user_id string, send_at timestamp, is_treated boolean, "
        "is_sent boolean, is_delivered boolean, is_bounced boolean, is_opened boolean, is_clicked boolean, "
        "clicks int, attributed_orders int, attributed_revenue double, is_unsubscribed boolean, "
        "is_complained boolean, window_orders int, window_revenue double"))
    summary = summarise_outcomes(outcomes)
    got = {(r.variant, r.user_id): (r.recipients, r.delivered, r.clicks, r.window_revenue) for r in summary.collect()}
    assert got == {("A", "u1"): (1, 1, 1, 10.0), ("A", None): (2, 1, 2, 0.0), ("B", "u4"): (1, 1, 1, 5.0),
                   ("holdout", "u5"): (1, 0, 0, 7.5), ("holdout", None): (2, 0, 0, -3.0)}

    results = {r.variant: r for r in aggregate_results(summary, alpha=0.05).collect()}
    assert {v: (r.recipients, r.sent, r.delivered, r.opens, r.clicks, r.unique_clicks, r.conversions, r.revenue,
                r.complaints, r.window_conversions, r.window_orders, r.window_revenue) for v, r in results.items()} == {
        "A": (3, 3, 2, 2, 3, 2, 1, 10.0, 1, 1, 1, 10.0),
        "B": (1, 1, 1, 1, 1, 1, 1, 5.0, 0, 1, 1, 5.0),
        "holdout": (3, 0, 0, 0, 0, 0, 0, 0.0, 0, 2, 2, 4.5)}
    assert results["A"].click_rate == pytest.approx(2 / 2) and results["holdout"].window_conversion_rate == \
        pytest.approx(2 / 3)

    # The bootstrap: treated 4 recipients, 2 without revenue; held out 3, 2 without (0.0 and -3.0).
    from_summary = bootstrap_revenue_sums(summary, replicates=20, seed=3).orderBy("is_treated", "replicate")
    one_per_recipient = bootstrap_revenue_sums(outcomes.withColumn("recipients", F.lit(1)), replicates=20,
                                               seed=3).orderBy("is_treated", "replicate")
    arms = {(r.is_treated, r.n, r.n_zero) for r in from_summary.collect()}
    assert arms == {(True, 4, 2), (False, 3, 2)}
    assert from_summary.collect() == one_per_recipient.collect()


def test_user_patterns_count_each_users_messages_in_the_test_and_group_users_alike(spark):
    # user, variant, send day, delivered, clicked, orders
    days = {1: dt.date(2026, 11, 2), 2: dt.date(2026, 11, 9), 3: dt.date(2026, 11, 16), 9: dt.date(2026, 11, 30)}
    messages = [("u1", "A", 1, True, True, 1), ("u1", "A", 2, True, True, 0), ("u1", "A", 3, True, False, 0),
                ("u2", "A", 1, True, False, 0), ("u2", "A", 2, True, False, 0), ("u2", "A", 3, False, False, 0),
                ("u3", "A", 1, True, True, 1), ("u3", "A", 2, True, True, 0), ("u3", "A", 3, True, False, 0),
                ("u1", "A", 9, True, True, 1),                       # after the test's last send day
                ("u4", "B", 2, True, False, 0),
                ("u5", "holdout", 1, False, False, 0)]               # held out: no A/B message
    rows = [("wb", variant, days[day], user, variant != "holdout", delivered, clicked, orders, 0)
            for user, variant, day, delivered, clicked, orders in messages]
    rows.append(("cs", "A", days[1], "u1", True, True, True, 1, 0))  # a campaign without a test
    outcomes = spark.createDataFrame(rows, "campaign_id string, variant string, send_date date, user_id string, "
                                           "is_treated boolean, is_delivered boolean, is_clicked boolean, "
                                           "attributed_orders int, window_orders int")
    spans = "campaign_id string, first_send_date date, last_send_date date"
    windows = spark.createDataFrame([("wb", days[1], days[3])], spans)
    patterns = user_patterns(outcomes, ab=windows, holdout=spark.createDataFrame([], spans))
    got = sorted(tuple(r)[1:] for r in patterns.collect())
    # u1 and u3: 3 delivered, 2 clicked, 1 converted; u2: 2 delivered (one bounced), nothing; u4: 1, 0, 0.
    assert got == [("wb", "A", 2, 0, 0, 1), ("wb", "A", 3, 2, 1, 2), ("wb", "B", 1, 0, 0, 1)]


def test_a_test_whose_users_get_several_messages_reads_them_with_their_design_effect(spark, spark_info,
                                                                                       base_settings, tmp_path):
    """Weekly sends, two days in one test: u1 (A) clicks both messages, u2 (A) neither, u3 (B) one of
    two, u4 (B) gets one and does not click. A: p = 2/4, ((2 - 1)^2 + (0 - 1)^2) / (4 * 1/4) = 2.
    B: p = 1/3, ((1 - 2/3)^2 + (0 - 1/3)^2) / (3 * 1/3 * 2/3) = 1/3, read as 1."""
    campaigns = tmp_path / "campaigns.yml"
    campaigns.write_text('campaigns:\n  wk:\n    type: weekly_picks\n    template: weekly_picks\n'
                         '    subjects: {A: {en: "a"}, B: {en: "b"}}\n    split: {A: 0.5, B: 0.5}\n'
                         '    holdout: 0.2\n    experiment: {horizon_days: 14}\n', encoding="utf-8")
    settings = settings_in(base_settings, tmp_path)
    settings = dataclasses.replace(
        settings, paths=dataclasses.replace(settings.paths, campaigns_file=str(campaigns)),
        report=dataclasses.replace(settings.report, min_recipients_per_arm=1, bootstrap_replicates=20))
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    d2, d9 = dt.date(2026, 11, 2), dt.date(2026, 11, 9)
    sends = [("u1", "A", d2), ("u1", "A", d9), ("u2", "A", d2), ("u2", "A", d9), ("u3", "B", d2), ("u3", "B", d9),
             ("u4", "B", d2)]
    at = {day: dt.datetime.combine(day, dt.time(10)) for day in (d2, d9)}
    message = {(u, day): f"{u}-{day:%d}" for u, _, day in sends}
    clicked = [("u1", d2), ("u1", d9), ("u3", d9)]
    # Held out: u5 on both days, u6 on the first. Orders two hours after the planned sends: u1's two
    # (both of its sends convert in their window) and u5's first.
    held = [("u5", "holdout", d2), ("u5", "holdout", d9), ("u6", "holdout", d2)]
    bought = [("u1", d2), ("u1", d9), ("u5", d2)]
    write_tables(
        spark, lake, plan=[("wk", day, u, v, at[day]) for u, v, day in sends + held],
        outbox=[(message[u, day], "wk", day, u, v, "sent", at[day]) for u, v, day in sends],
        deliveries=[(message[u, day], 1, "sent", at[day]) for u, _, day in sends],
        events=[(f"c-{message[key]}", key[0], "email_click", at[key[1]] + dt.timedelta(hours=1), None, None, None,
                 message[key], None) for key in clicked]
        + [(f"o-{u}-{day:%d}", u, "purchase", at[day] + dt.timedelta(hours=2), f"o-{u}-{day:%d}", 1, Decimal("10.00"),
            None, None) for u, day in bought])
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at("2026-11-30T12:00:00"))
    run_report(ctx)
    tests = {(e.test, e.metric): e for e in _experiments(ctx)}
    row = tests[("ab", "clicks")]
    assert (row.n_variant, row.successes_variant, row.n_control, row.successes_control) == (3, 1, 4, 2)
    assert (row.design_effect_variant, row.design_effect_control) == (1.0, pytest.approx(2.0))
    # The interval is that of 1 in 3 against 1 in 2 (A's four messages count as two).
    expected = compare_proportions(1, 3, 1, 2, alpha=0.05)
    assert (row.difference_low, row.difference_high) == (pytest.approx(expected.difference_low),
                                                         pytest.approx(expected.difference_high))
    # The holdout: treated 2 of 7 recipient rows converted, both u1's: p = 2/7,
    # ((2 - 4/7)^2 + 2 (0 - 4/7)^2 + (0 - 2/7)^2) / (7 * 2/7 * 5/7) = (136/49) / (70/49);
    # held out 1 of 3 (u5 once of two, u6 not): 1/3, read as 1.
    uplift = tests[("holdout", "conversions")]
    assert (uplift.n_variant, uplift.successes_variant, uplift.n_control, uplift.successes_control) == (7, 2, 3, 1)
    assert (uplift.design_effect_variant, uplift.design_effect_control) == (pytest.approx(136 / 70), 1.0)
    deff = 136 / 70
    expected = compare_proportions(2 / deff, 7 / deff, 1, 3, alpha=0.05)
    assert (uplift.difference_low, uplift.difference_high) == (pytest.approx(expected.difference_low),
                                                               pytest.approx(expected.difference_high))
    assert "clustered by user" in uplift.method


def test_the_revenue_bootstrap_draws_one_weight_per_user_for_all_their_sends(spark):
    # u1 spent 10 after one send and 20 after the next: one person, resampled whole, so in every
    # replicate both rows have the same weight w: revenue 30 w over 2 w recipients.
    summary = spark.createDataFrame(
        [("c1", dt.date(2026, 11, 2), "u1", True, 10.0, 1), ("c1", dt.date(2026, 11, 9), "u1", True, 20.0, 1)],
        "campaign_id string, send_date date, user_id string, is_treated boolean, window_revenue double, "
        "recipients long")
    rows = bootstrap_revenue_sums(summary, replicates=200, seed=7).collect()
    drawn = [r for r in rows if r.weight]
    assert len(drawn) > 100
    assert all(r.weight % 2 == 0 and r.weighted_revenue == pytest.approx(15.0 * r.weight) for r in drawn)


def test_notebook_runs_on_the_report(reported, capsys, monkeypatch):
    s = reported[0].settings
    overrides = {"storage.lake_dir": s.storage.lake_dir, "mlflow.tracking_uri": s.mlflow.tracking_uri,
                 "mlflow.artifact_location": s.mlflow.artifact_location, "paths.output_dir": s.paths.output_dir,
                 "paths.campaigns_file": s.paths.campaigns_file}
    argv = ["campaign_results.py", "--conf-dir", str(ROOT / "conf"), "--now", "2026-11-20T12:00:00"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    monkeypatch.setattr(sys, "argv", argv)
    namespace = runpy.run_path(str(ROOT / "notebooks" / "campaign_results.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "5 rows in campaign_results" in out
    assert "wb" in out and "holdout" in out
    assert sorted(namespace["figures"]) == ["cumulative_by_day", "rates_by_variant", "uplift_by_campaign"]
    assert len(namespace["experiments"]) == 6


def test_conversion_panels_leave_out_send_days_whose_windows_are_still_open():
    # Day 1 closed: A 10 of 100 recipients converted in the window, holdout 2 of 50. Day 2 still open:
    # nobody has had time to convert yet. Over closed days: A 10%, holdout 4% (not 5% and 2%).
    rows = []
    for day, closed, (a, h) in ((dt.date(2026, 11, 2), True, (10, 2)), (dt.date(2026, 11, 3), False, (0, 0))):
        for variant, recipients, conversions in (("A", 100, a), ("holdout", 50, h)):
            rows.append(dict(campaign_id="c", variant=variant, send_date=day, recipients=recipients,
                             delivered=recipients if variant == "A" else 0, unique_clicks=5 if variant == "A" else 0,
                             window_conversions=conversions, is_window_closed=closed))
    results = pd.DataFrame(rows)
    rates = rates_figure(results, alpha=0.05)
    clicks_ax, window_ax = rates.axes[0], rates.axes[1]
    assert [p.get_height() for p in window_ax.patches] == [pytest.approx(10.0), pytest.approx(4.0)]
    # The click rate still counts every send day: 10 of 200 delivered.
    assert [p.get_height() for p in clicks_ax.patches] == [pytest.approx(5.0)]
    cumulative = cumulative_figure(results)
    lines = {line.get_label(): list(line.get_ydata()) for line in cumulative.axes[1].get_lines()}
    assert lines == {"A": [pytest.approx(10.0)], "holdout": [pytest.approx(4.0)]}
