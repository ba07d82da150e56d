"""simulate-responses on a hand-built delivered shop: planted rates computed by hand, the planted
variant effect and holdout base rate visible in the drawn outcomes, delays within bounds, machine
opens flagged, determinism, the events through ingest (clean, exactly once across re-runs), and the
report on them scored against the planted truth: the planted click lift inside the reported interval
with B named the winner, the holdout uplift's interval covering the planted incremental conversions.

The report adds one run of the stage to the shop fixture (simulate and ingest three times each): on the
shared machine of 2026-12-07 (load 9-14) the report took 29 s of a fixture that took 136-279 s."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.generate import responses as R
from inboxlift.stages.ingest import run_ingest
from inboxlift.stages.report import EXPERIMENTS_TABLE, run_report
from inboxlift.stages.simulate import NoGeneratedShopError, run_simulate
from inboxlift.storage import Lake

from conftest import settings_in

N_USERS = 12_000
PLAN_DAY = dt.date(2026, 11, 19)
WIN_BACK_AT = dt.datetime(2026, 11, 19, 9, 0)     # UTC: users with active hour 9 get it in their hour
PICKS_AT = dt.datetime(2026, 11, 19, 7, 0)
EARLY = "2026-11-19T12:00:00"                    # 3 hours after the win-back send
LATE = "2026-11-25T12:00:00"                     # every response has come
# Planted for these tests through the simulator's settings: subject B lifts win-back's clicks per open by
# +60 %, and a win-back click buys at 0.2 (x1.5 for the campaign's products, all in the users' taste group).
B_CLICK_LIFT = 1.6
CLICK_PURCHASE_RATE = 0.2
PLANTED = {"simulate.variant_click_lift": {"win-back": {"B": B_CLICK_LIFT}},
           "simulate.campaign_click_purchase_rate": {"win-back": CLICK_PURCHASE_RATE}}
ALPHA = 0.05
CAMPAIGN = "win-back"
RUNNING = ("Sports > Running > Shoes", "Sports > Running > Apparel")   # taste group 0 ("runners")
AUDIO = "Electronics > Audio > Headphones"
ITEMS = [("i1", RUNNING[0]), ("i2", RUNNING[1]), ("i3", RUNNING[0]), ("i4", AUDIO), ("i5", AUDIO)]


def uid(i: int) -> str:
    return f"u{i:05d}"


def arm(i: int) -> str:
    """The win-back arm of user i: 20% holdout, the rest A or B, independent of the active hour (parity)."""
    if i % 5 == 1:
        return "holdout"
    return "A" if (i // 2) % 2 == 0 else "B"


def write_shop(ctx: RunContext) -> None:
    """The users and products tables as ingest would leave them (only what the stages here read)."""
    ctx.lake.append("users", ctx.spark.range(N_USERS).select(
        F.format_string("u%05d", F.col("id")).alias("user_id"),
        F.format_string("u%05d@mail.example.org", F.col("id")).alias("email"), F.lit(True).alias("email_consent"),
        F.lit("en").alias("locale"), F.lit("UTC").alias("timezone")))
    ctx.lake.append("products", ctx.spark.createDataFrame(
        [(item, f"Item {item}", path, Decimal("10.00"), "EUR") for item, path in ITEMS],
        "item_id string, name string, category_path string, price decimal(12,2), currency string"))


def write_truth(spark, truth: Path) -> None:
    """Planted traits: engagement 0.5 for all; even users active at 09:00, odd ones at 20:00 (UTC);
    every 100th user a bad address."""
    users = spark.range(N_USERS).select(
        F.format_string("u%05d", F.col("id")).alias("user_id"), F.lit(0.5).alias("engagement"),
        F.lit(0).alias("taste_group"), F.when(F.col("id") % 2 == 0, 9).otherwise(20).alias("active_hour_local"),
        F.lit("UTC").alias("timezone"), F.lit(False).alias("is_lapsed"),
        F.lit(None).cast("timestamp").alias("lapsed_at"), (F.col("id") % 100 == 7).alias("is_bad_address"))
    users.write.parquet(str(truth / "users" / "batch=20261118T000000Z-seed1"))
    spark.createDataFrame([(item, rank) for rank, (item, _) in enumerate(ITEMS)],
                          "item_id string, popularity_rank long").write.parquet(
        str(truth / "items" / "batch=20261118T000000Z-seed1"))


def build_tables(ctx: RunContext) -> None:
    """The win-back (A/B + holdout, running items) to everyone at 09:00; weekly picks (audio items) to the
    first 600 users at 07:00, so those have one email in the week before the win-back."""
    spark = ctx.spark
    ids = spark.range(N_USERS).withColumn("user_id", F.format_string("u%05d", F.col("id")))
    arm_col = (F.when(F.col("id") % 5 == 1, "holdout")
               .when(F.floor(F.col("id") / 2) % 2 == 0, "A").otherwise("B"))
    win_back = ids.select(
        F.lit("win-back").alias("campaign_id"), F.lit("win_back").alias("campaign_type"), "user_id", "id",
        arm_col.alias("variant"), F.lit(WIN_BACK_AT).alias("send_at"),
        F.array(F.lit("i1"), F.lit("i2"), F.lit("i3")).alias("item_ids"))
    picks = ids.where(F.col("id") < 600).select(
        F.lit("weekly-picks").alias("campaign_id"), F.lit("weekly_picks").alias("campaign_type"), "user_id", "id",
        F.lit("A").alias("variant"), F.lit(PICKS_AT).alias("send_at"),
        F.array(F.lit("i4"), F.lit("i5")).alias("item_ids"))
    planned = win_back.unionByName(picks).withColumn("plan_date", F.lit(PLAN_DAY))
    ctx.lake.append("campaign_plan", planned.drop("id"))
    mailed = planned.where(F.col("variant") != "holdout").withColumn(
        "message_id", F.concat_ws("-", "campaign_id", "user_id", F.lit("m@shop.example")))
    ctx.lake.append("outbox", mailed.select(
        "message_id", "campaign_id", "campaign_type", "user_id", "variant", "send_at", "plan_date",
        F.lit("sent").alias("status"), (F.col("send_at") - F.expr("INTERVAL 2 HOURS")).alias("rendered_at")))
    # Every 50th win-back message was deferred once, then sent on the second attempt 10 minutes later.
    deferred = (F.col("campaign_id") == "win-back") & (F.col("id") % 50 == 0)
    first = mailed.select("message_id", F.lit(1).alias("attempt"),
                          F.when(deferred, "deferred").otherwise("sent").alias("state"),
                          F.col("send_at").alias("attempted_at"), "campaign_id", "user_id")
    second = mailed.where(deferred).select("message_id", F.lit(2).alias("attempt"), F.lit("sent").alias("state"),
                                           (F.col("send_at") + F.expr("INTERVAL 10 MINUTES")).alias("attempted_at"),
                                           "campaign_id", "user_id")
    ctx.lake.append("deliveries", first.unionByName(second))


def at(ctx: RunContext, iso: str) -> RunContext:
    return dataclasses.replace(ctx, clock=FixedClock.at(iso))


@pytest.fixture(scope="module")
def shop(spark, spark_info, base_settings, tmp_path_factory):
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    work = tmp_path_factory.mktemp("simulate")
    campaigns = work / "campaigns.yml"
    # The report's view of win-back: one send day of A/B test, which reads on 19 Nov + 1 + 3 (click-through)
    # = 23 Nov, before LATE.
    campaigns.write_text(
        "campaigns:\n  win-back:\n    type: win_back\n    template: win_back\n"
        "    subjects: {A: {en: a}, B: {en: b}}\n    split: {A: 0.5, B: 0.5}\n    holdout: 0.2\n"
        "    experiment: {horizon_days: 1}\n", encoding="utf-8")
    settings = settings_in(base_settings, work).with_overrides({
        **PLANTED,
        "paths.campaigns_file": str(campaigns),
        # The revenue interval is not scored here: fewer bootstrap replicates than the default 400.
        "report.bootstrap_replicates": 50,
    })
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at(EARLY))
    write_shop(ctx)
    write_truth(spark, Path(settings.generate.truth_dir))
    build_tables(ctx)

    early = run_simulate(at(ctx, EARLY))
    early_ingest = run_ingest(at(ctx, EARLY), echo=lambda text: None)
    late = run_simulate(at(ctx, LATE))
    late_files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
                  for p in (work / "landing" / "events" / "simulated").iterdir()}
    late_ingest = run_ingest(at(ctx, LATE), echo=lambda text: None)
    again = run_simulate(at(ctx, LATE))
    again_ingest = run_ingest(at(ctx, LATE), echo=lambda text: None)
    # The report on what the shop answered (every response has come, every window has closed).
    run_report(at(ctx, LATE))
    experiments = ctx.lake.read(EXPERIMENTS_TABLE).toPandas()
    truth = pd.read_parquet(work / "truth" / "responses" / "units")
    return dict(ctx=ctx, work=work, early=early, early_ingest=early_ingest, late=late,
                late_files=late_files, late_ingest=late_ingest, again=again, again_ingest=again_ingest, truth=truth,
                experiments=experiments)


def landed_events(work: Path) -> pd.DataFrame:
    rows = [json.loads(line) for path in sorted((work / "landing" / "events" / "simulated").iterdir())
            for line in path.read_text().splitlines()]
    frame = pd.DataFrame(rows)
    props = frame["properties"].apply(lambda p: p if isinstance(p, dict) else {})
    for key in ("variant", "ua_class", "is_machine_open", "is_machine_click", "link_position"):
        frame[key] = props.apply(lambda p, k=key: p.get(k))
    return frame


def test_units_reconcile_with_the_plan_and_deliveries(shop):
    late = shop["late"]
    holdout = sum(1 for i in range(N_USERS) if arm(i) == "holdout")
    assert late.holdout == holdout
    assert late.messages == (N_USERS - holdout) + 600 and late.without_truth == 0
    truth = shop["truth"]
    assert len(truth) == late.messages + late.holdout
    assert not truth.duplicated(["campaign_id", "user_id", "plan_date"]).any()
    # The deferred-then-sent message counts once, from its sent attempt.
    deferred = truth[(truth.campaign_id == "win-back") & (truth.user_id == uid(0))].iloc[0]
    assert deferred.sent_at == pd.Timestamp("2026-11-19 09:10:00")


def test_planted_probabilities_are_the_hand_computed_ones(shop):
    truth = shop["truth"].set_index(["campaign_id", "user_id"])
    p_open_active, p_open_other = (0.04 + 0.6 * 0.5) * 1.3, 0.04 + 0.6 * 0.5
    click_relevant = 0.08 + 0.35 * 0.5   # per open, before the relevance and variant lifts
    cases = {
        # user: (campaign, p_open, p_click_given_open, p_unsubscribe_given_open)
        uid(2000): ("win-back", p_open_active, click_relevant * 1.5, 0.01),                 # A, even: active hour
        uid(2003): ("win-back", p_open_other, click_relevant * 1.5 * B_CLICK_LIFT, 0.01),   # B, odd
        uid(4): ("win-back", p_open_active, click_relevant * 1.5, 0.01 * 1.5),              # A, one email before
        uid(10): ("weekly-picks", p_open_other, click_relevant * 1.0, 0.01),                # audio items: no lift
    }
    for user, (campaign, p_open, p_click, p_unsub) in cases.items():
        row = truth.loc[(campaign, user)]
        assert row.p_open == pytest.approx(p_open)
        assert row.p_click_given_open == pytest.approx(p_click)
        assert row.p_unsubscribe_given_open == pytest.approx(p_unsub)
        assert row.p_click == pytest.approx(p_open * p_click)
        assert row.p_organic_purchase == pytest.approx(0.01 + 0.05 * 0.5)
    bad = truth.loc[("win-back", uid(7))]           # a bad address: bounced, nothing else from the mail
    assert bad.is_bounce and not bad.is_delivered and bad.p_open == 0 and not bad.is_open
    holdout = truth.loc[("win-back", uid(1))]
    assert holdout.is_holdout and holdout.p_open == 0 and holdout.p_any_purchase == pytest.approx(0.035)
    # Clicked products from the taste group (all win-back items) buy at 0.2 * 1.5.
    clicked = shop["truth"][(shop["truth"].campaign_id == "win-back") & shop["truth"].is_click]
    assert np.allclose(clicked.p_purchase_given_click, 0.3) and clicked.is_clicked_relevant.all()


def _within(observed: float, expected: float, n: int, *, sigmas: float = 4.0) -> bool:
    return abs(observed - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n)


def test_the_planted_variant_effect_shows_in_the_drawn_clicks(shop):
    truth = shop["truth"]
    mailed = truth[(truth.campaign_id == "win-back") & truth.is_delivered]
    rates = {}
    for variant in ("A", "B"):
        arm_rows = mailed[mailed.variant == variant]
        # Hand-computed: half the arm in its active hour (opens x1.3), clicks per open 0.3825 (x1.6 for B).
        share_active = (arm_rows.user_id.str[1:].astype(int) % 2 == 0).mean()
        expected = (share_active * 0.442 + (1 - share_active) * 0.34) * 0.3825 * (B_CLICK_LIFT if variant == "B" else 1.0)
        assert arm_rows.p_click.mean() == pytest.approx(expected)
        rates[variant] = arm_rows.is_click.mean()
        assert _within(rates[variant], expected, len(arm_rows))
    lift = rates["B"] / rates["A"] - 1
    # Planted +60 %: clicks per message about 0.150 (A) and 0.239 (B) of 4,800 each, so the log ratio's
    # standard error is sqrt(1/711 - 1/4800 + 1/1137 - 1/4800) = 0.043; 3 of them either side of ln 1.6.
    assert 0.40 < lift < 0.82, lift
    # Opens do not depend on the variant.
    opens = mailed.groupby("variant").is_open.mean()
    assert abs(opens["A"] - opens["B"]) < 0.03


def test_the_send_hour_effect_shows_in_the_drawn_opens(shop):
    truth = shop["truth"]
    mailed = truth[(truth.campaign_id == "win-back") & truth.is_delivered]
    in_hour = mailed.user_id.str[1:].astype(int) % 2 == 0
    assert _within(mailed[in_hour].is_open.mean(), 0.442, int(in_hour.sum()))
    assert _within(mailed[~in_hour].is_open.mean(), 0.34, int((~in_hour).sum()))
    assert mailed[in_hour].is_active_hour.all() and not mailed[~in_hour].is_active_hour.any()


def test_holdout_users_buy_at_the_base_rate_without_campaign_ids(shop):
    truth, work = shop["truth"], shop["work"]
    holdout = truth[truth.is_holdout]
    assert _within(holdout.is_organic_purchase.mean(), 0.035, len(holdout))
    assert not holdout.is_click_purchase.any() and not holdout.is_open.any()
    events = landed_events(work)
    # Users from 600 on got no weekly picks: as win-back holdouts they got no email at all.
    holdout_users = {u for u in holdout.user_id if int(u[1:]) >= 600}
    theirs = events[events.user_id.isin(holdout_users)]
    assert set(theirs.event_type) == {"purchase"}
    assert theirs.campaign_id.isna().all() and theirs.message_id.isna().all()
    assert len(theirs) == holdout[holdout.user_id.isin(holdout_users)].is_organic_purchase.sum() > 0
    # Mailed users buy through their clicks on top: more buyers per unit than the holdout.
    mailed = truth[(truth.campaign_id == "win-back") & ~truth.is_holdout]
    treated = (mailed.is_click_purchase | mailed.is_organic_purchase).mean()
    assert treated - holdout.is_organic_purchase.mean() > 0.01
    assert mailed.p_incremental_purchase.mean() == pytest.approx(
        (mailed.p_click_purchase * (1 - mailed.p_organic_purchase)).mean())


def test_delays_are_within_their_bounds(shop):
    truth = shop["truth"]
    sec = pd.Timedelta(seconds=1)
    delivered = truth[truth.is_delivered]
    assert ((delivered.delivered_at - delivered.sent_at) / sec).between(1, 30).all()
    opened = truth[truth.is_open]
    assert ((opened.open_at - opened.delivered_at) / sec).between(60, 72 * 3600 - 1).all()
    clicked = truth[truth.is_click]
    assert ((clicked.click_at - clicked.open_at) / sec).between(5, 304).all()
    bought = truth[truth.is_click_purchase]
    assert len(bought) > 50
    assert ((bought.purchase_at - bought.click_at) / sec).between(60, 48 * 3600 - 1).all()
    organic = truth[truth.is_organic_purchase]
    # Organic purchases count from the planned send time (the plan's send_at), not from when the mail left.
    assert ((organic.organic_at - organic.planned_at) / sec).between(0, 3 * 86400 - 1).all()
    planned = {"win-back": pd.Timestamp(WIN_BACK_AT), "weekly-picks": pd.Timestamp(PICKS_AT)}
    assert (truth.planned_at == truth.campaign_id.map(planned)).all()
    deferred = truth[(truth.campaign_id == "win-back") & (truth.user_id == uid(0))].iloc[0]
    assert (deferred.sent_at, deferred.planned_at) == (pd.Timestamp("2026-11-19 09:10:00"), pd.Timestamp(WIN_BACK_AT))
    # Opens within the active hour come sooner (mean wait 20 minutes against 4 hours).
    waits = (opened.open_at - opened.delivered_at) / sec
    assert waits[opened.is_active_hour].median() < 3600 < waits[~opened.is_active_hour].median()


def test_machine_opens_are_flagged_as_the_service_flags_them(shop):
    truth, events = shop["truth"], landed_events(shop["work"])
    opens = events[events.event_type == "email_open"]
    proxy = opens[opens.ua_class == "apple_proxy"]
    scanner = opens[opens.ua_class == "scanner"]
    human = opens[~opens.ua_class.isin(["apple_proxy", "scanner"])]
    assert (proxy.is_machine_open == "true").all() and (scanner.is_machine_open == "true").all()
    assert (human.is_machine_open == "false").all() and set(human.ua_class) == {"mobile", "desktop", "webmail_proxy"}
    assert len(proxy) == truth.is_proxy_open.sum() and len(human) == truth.is_open.sum()
    proxy_users = truth[truth.is_proxy_open].user_id.nunique() / truth[truth.is_delivered].user_id.nunique()
    assert 0.17 < proxy_users < 0.23
    clicks = events[events.event_type == "email_click"]
    assert (clicks[clicks.ua_class == "scanner"].is_machine_click == "true").all()
    assert (clicks[clicks.ua_class != "scanner"].is_machine_click == "false").all()
    assert len(clicks[clicks.ua_class == "scanner"]) == truth.is_scanner_open.sum()   # every message has items
    # Every email event names its message, campaign and variant.
    mail = events[events.event_type.isin(["email_open", "email_click", "email_delivered", "bounce", "unsubscribe",
                                          "complaint"])]
    assert mail.message_id.notna().all() and mail.campaign_id.notna().all() and mail.variant.notna().all()


def test_fatigue_raises_unsubscribes_and_every_outcome_becomes_its_event(shop):
    truth, events = shop["truth"], landed_events(shop["work"])
    wb = truth[truth.campaign_id == "win-back"]
    assert (wb[wb.recent_emails == 1].user_id.str[1:].astype(int) < 600).all()
    assert (wb.recent_emails == 1).sum() == sum(1 for i in range(600) if arm(i) != "holdout")
    counts = events.groupby("event_type").size().to_dict()
    assert counts == {
        "email_delivered": truth.is_delivered.sum(), "bounce": truth.is_bounce.sum(),
        "email_open": truth.is_open.sum() + truth.is_proxy_open.sum() + truth.is_scanner_open.sum(),
        "email_click": truth.is_click.sum() + truth.is_scanner_click.sum(),
        "purchase": truth.is_click_purchase.sum() + truth.is_organic_purchase.sum(),
        **({"unsubscribe": truth.is_unsubscribe.sum()} if truth.is_unsubscribe.any() else {}),
        **({"complaint": truth.is_complaint.sum()} if truth.is_complaint.any() else {}),
    }
    led = events[(events.event_type == "purchase") & events.campaign_id.notna()]
    assert len(led) == truth.is_click_purchase.sum() and led.message_id.notna().all()


def test_responses_arrive_over_time_and_ingest_takes_each_event_once(shop):
    early, late, again = shop["early"], shop["late"], shop["again"]
    # At 12:00 on the send day only the first hours' events have come; the rest come later.
    assert early.pending > 0 and early.events["email_delivered"] == late.events["email_delivered"]
    assert early.events["email_open"] < late.events["email_open"] and late.pending == 0
    assert sum(late.events.values()) == sum(early.events.values()) + early.pending
    for report, run in (("early_ingest", early), ("late_ingest", late)):
        counts = shop[report].counts("events")
        assert counts.quarantined == 0 and counts.conflicting_duplicates == 0, counts
    assert shop["early_ingest"].counts("events").accepted == sum(early.events.values())
    # The later run rewrote the day's file with a superset: what was there is a duplicate, the rest is new.
    late_counts = shop["late_ingest"].counts("events")
    assert late_counts.duplicates == sum(early.events.values())
    assert late_counts.accepted == sum(late.events.values()) - sum(early.events.values())
    # A re-run at the same clock writes nothing new: the files keep their bytes and times, ingest finds nothing.
    assert again.files_written == [] and again.files_unchanged == len(shop["late_files"])
    assert shop["again_ingest"].counts("events").read == 0
    events = shop["ctx"].lake.read("events").where(F.col("event_id").startswith("e"))
    assert events.count() == sum(late.events.values()) == events.select("event_id").distinct().count()
    props = events.where(F.col("event_type") == "email_click").select(F.col("properties")["variant"]).distinct()
    assert {r[0] for r in props.collect()} == {"A", "B"}


def test_same_inputs_give_byte_identical_files_and_truth(shop, spark, spark_info, base_settings, tmp_path):
    # A second lake from the same inputs and planted effects, simulated once, straight at the late clock.
    settings = settings_in(base_settings, tmp_path).with_overrides(PLANTED)
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at(LATE))
    for table in ("campaign_plan", "outbox", "deliveries", "products"):
        lake.append(table, shop["ctx"].lake.read(table))
    write_truth(spark, Path(settings.generate.truth_dir))
    # ... and partitioned otherwise: adaptive execution on, three shuffle partitions.
    saved = {key: spark.conf.get(key) for key in ("spark.sql.adaptive.enabled", "spark.sql.shuffle.partitions")}
    spark.conf.set("spark.sql.adaptive.enabled", "true")
    spark.conf.set("spark.sql.shuffle.partitions", "3")
    try:
        run_simulate(ctx)
    finally:
        for key, value in saved.items():
            spark.conf.set(key, value)
    files = {p.name: p.read_bytes() for p in (tmp_path / "landing" / "events" / "simulated").iterdir()}
    ids = [json.loads(line)["event_id"] for data in files.values() for line in data.decode().splitlines()]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert files == {name: data for name, (data, _) in shop["late_files"].items()}
    truth = pd.read_parquet(tmp_path / "truth" / "responses" / "units")
    key = ["campaign_id", "user_id"]
    pd.testing.assert_frame_equal(truth.sort_values(key).reset_index(drop=True),
                                  shop["truth"].sort_values(key).reset_index(drop=True))


def test_without_a_generated_shop_it_says_so(ctx):
    with pytest.raises(NoGeneratedShopError, match="generated shop only"):
        run_simulate(ctx)


def test_the_command_and_the_stage_take_days():
    from inboxlift.cli import build_parser
    from inboxlift.pipeline import RUN_ALL

    assert build_parser({}).parse_args(["simulate-responses", "--days", "3"]).days == 3
    assert build_parser({}).parse_args(["run", "simulate-responses"]).days is None
    assert RUN_ALL.index("simulate-responses") == RUN_ALL.index("send") + 1


def test_nothing_sent_or_planned_writes_no_events(ctx, spark):
    write_truth(spark, Path(ctx.settings.generate.truth_dir))
    write_shop(ctx)
    report = run_simulate(ctx)
    assert (report.messages, report.holdout, report.without_truth, report.pending) == (0, 0, 0, 0)
    assert sum(report.events.values()) == 0 and report.files_written == []
    assert not any((Path(ctx.settings.paths.landing_dir) / "events" / "simulated").iterdir())
    assert "0 delivered messages and 0 holdout rows" in report.summary()


def test_simulate_settings_are_checked_on_load():
    from inboxlift.settings import SettingsError, load_settings

    conf = Path(__file__).resolve().parents[1] / "conf"
    loaded = load_settings("local", conf_dir=conf, overrides={
        "simulate.variant_click_lift": {"weekly-picks": {"B": 0.9}}, "simulate.days": 3}, environ={})
    assert loaded.simulate.variant_click_lift == {"weekly-picks": {"B": 0.9}} and loaded.simulate.days == 3
    for key, value, message in (("simulate.days", 0, "simulate.days' must be 1 or more"),
                                ("simulate.open_base", 1.5, "simulate.open_base' must be a probability"),
                                ("simulate.variant_click_lift", {"win-back": {"B": -1.0}},
                                 "simulate.variant_click_lift.win-back.B' must be 0 or more")):
        with pytest.raises(SettingsError, match=message):
            load_settings("local", conf_dir=conf, overrides={key: value}, environ={})


# ---- organic purchases are timed alike in both arms -------------------------------------------------

UTC = dt.timezone.utc
SLOT = dt.datetime(2026, 11, 19, 9, 0, tzinfo=UTC)        # the planned send time
LEFT = SLOT + dt.timedelta(hours=10)                     # when the mail actually left


def test_message_units_take_the_planned_send_time_from_the_plan_else_the_outbox(spark):
    from inboxlift.stages.simulate import message_units

    sent = spark.createDataFrame(
        [("m1", "u1", int(LEFT.timestamp()), 0), ("m2", "u2", int(LEFT.timestamp()), 0)],
        "message_id string, user_id string, sent_s long, recent_emails int")
    outbox = spark.createDataFrame([
        ("m1", "win-back", "win_back", "u1", "A", PLAN_DAY, SLOT - dt.timedelta(hours=2), SLOT),
        # Its plan row was replaced after it left: the outbox keeps the send time render copied.
        ("m2", "win-back", "win_back", "u2", "A", PLAN_DAY, SLOT - dt.timedelta(hours=2), SLOT - dt.timedelta(hours=1)),
    ], "message_id string, campaign_id string, campaign_type string, user_id string, variant string, plan_date date, "
       "rendered_at timestamp, send_at timestamp")
    plan = spark.createDataFrame([("win-back", "u1", PLAN_DAY, ["i1"], SLOT)],
                                 "campaign_id string, user_id string, plan_date date, item_ids array<string>, "
                                 "send_at timestamp")

    def planned(plan_table):
        units = message_units(sent, outbox=outbox, plan=plan_table)
        return {r.user_id: (r.sent_s, r.planned_s) for r in units.collect()}

    left, slot = int(LEFT.timestamp()), int(SLOT.timestamp())
    assert planned(plan) == {"u1": (left, slot), "u2": (left, slot - 3600)}
    assert planned(None) == {"u1": (left, slot), "u2": (left, slot - 3600)}


def test_organic_purchases_are_timed_from_the_planned_send_in_both_arms(spark, base_settings):
    """The same units mailed 10 hours after their slot and held out: the same organic purchases at the
    same times, all inside [planned, planned + organic window), the report's uplift window."""
    from inboxlift.generate import responses as R

    n = 400
    params = dataclasses.replace(base_settings.simulate, organic_purchase_base=0.9)
    slot, left = int(SLOT.timestamp()), int(LEFT.timestamp())
    ids = spark.range(n).withColumn("user_id", F.format_string("u%05d", F.col("id")))
    # Every third user lapsed between the slot and the actual send: organic buying must not see it.
    users_truth = ids.select(
        "user_id", F.lit(0.5).alias("engagement"), F.lit(0).alias("taste_group"),
        F.lit(9).alias("active_hour_local"), F.lit("UTC").alias("timezone"), (F.col("id") % 3 == 0).alias("is_lapsed"),
        F.lit(SLOT + dt.timedelta(hours=5)).alias("lapsed_at"), F.lit(False).alias("is_bad_address"))
    traits = R.user_traits(users_truth, seed=params.seed, params=params)
    categories = spark.createDataFrame(ITEMS, "item_id string, category_path string")
    catalogue = spark.createDataFrame(
        [(rank, item, path, Decimal("10.00"), "EUR") for rank, (item, path) in enumerate(ITEMS)],
        "rank int, item_id string, category_path string, price decimal(12,2), currency string")

    def units(*, is_holdout: bool):
        return ids.select(
            F.lit("win-back").alias("campaign_id"), "user_id", F.lit(PLAN_DAY).alias("plan_date"),
            F.lit("win_back").alias("campaign_type"), F.lit("holdout" if is_holdout else "A").alias("variant"),
            (F.lit(None).cast("string") if is_holdout else F.concat(F.lit("m-"), "user_id")).alias("message_id"),
            F.lit(is_holdout).alias("is_holdout"), F.lit(slot if is_holdout else left).cast("long").alias("sent_s"),
            F.lit(slot).cast("long").alias("planned_s"),
            F.lit(None if is_holdout else slot - 7200).cast("long").alias("issued_s"),
            F.array(F.lit("i1")).alias("item_ids"), F.lit(0).alias("recent_emails"))

    def organic(*, is_holdout: bool) -> pd.DataFrame:
        outcomes = R.planted_outcomes(units(is_holdout=is_holdout), traits=traits, categories=categories,
                                      catalogue=catalogue, catalogue_size=len(ITEMS), seed=params.seed, params=params)
        return (outcomes.select("user_id", "p_organic_purchase", "is_organic_purchase", "organic_s",
                                "organic_item_id").toPandas().set_index("user_id").sort_index())

    mailed, held = organic(is_holdout=False), organic(is_holdout=True)
    bought = mailed[mailed.is_organic_purchase]
    assert len(bought) > 300
    window = params.organic_window_days * 86_400
    assert bought.organic_s.between(slot, slot + window - 1).all()
    # The organic draw of a unit is the same whether it was mailed or held out: probability, outcome,
    # time and item.
    pd.testing.assert_frame_equal(mailed, held)


# ---- the report scored against the planted truth (issue 21, section 3) --------------------------
#
# The real report (run_report, at the end of the shop fixture) on what simulate-responses made the shop
# answer, checked against the truth the simulator planted (truth/responses/units), never against the
# report itself. Plan, render and send are not run here (the shop's plan, outbox and deliveries are
# built by hand, build_tables): so neither plan's frequency caps nor send's timing are exercised.
#
# Sizing, from the planted traits (engagement 0.5 for all, half the users in their active hour, every
# win-back product in the user's taste group):
#   p(open) = 0.5 x (0.04 + 0.6 x 0.5) x 1.3 + 0.5 x (0.04 + 0.6 x 0.5) = 0.391;
#   p(click | open) = (0.08 + 0.35 x 0.5) x 1.5 = 0.3825 for A, x 1.6 = 0.612 for B (below the 0.95 cap);
#   so clicks per message with a good address 0.150 (A) and 0.239 (B): about 711 and 1,137 clicks
#   of the 4,800 per arm. The report's log risk-ratio interval: se = 0.043, and ln 1.6 = 0.47 is
#   10.9 se from 0: the power of the 5 % test is 1 - 2e-19 (at a quarter of the shop still z = 5.4),
#   so "B wins" is no lucky seed.
#   Holdout: incremental purchases per treated recipient about 0.195 x 0.3 x (1 - 0.035) = 0.056 over
#   the holdout's 0.035; se of the difference sqrt(0.091 x 0.909 / 9600 + 0.035 x 0.965 / 2400) = 0.0048,
#   z = 11.7. Coverage itself needs no power: a 95 % interval covers the planted value 95 % of the time
#   whatever the size; the fixed seeds (simulate.seed 42) make this draw the same on every run.


@pytest.fixture(scope="module")
def scored(shop):
    """(context at LATE, the planted units with naive UTC times, the campaign_experiments rows)."""
    units = shop["truth"].copy()
    for column in [c for c in units.columns if c.endswith("_at")]:
        units[column] = _utc(units[column])
    return at(shop["ctx"], LATE), units, shop["experiments"]


def _utc(times: pd.Series) -> pd.Series:
    """Timestamps as naive UTC, whether a reader gave them with their zone or without."""
    times = pd.to_datetime(times)
    return times.dt.tz_convert("UTC").dt.tz_localize(None) if times.dt.tz is not None else times


def _test(experiments: pd.DataFrame, test: str, metric: str) -> pd.Series:
    rows = experiments[(experiments.campaign_id == CAMPAIGN) & (experiments.test == test)
                       & (experiments.metric == metric)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_the_planted_click_lift_is_inside_the_reported_interval_and_b_wins(scored):
    ctx, units, experiments = scored
    mailed = units[(units.campaign_id == CAMPAIGN) & ~units.is_holdout]
    # The planted lift, from the truth: B's clicks per open times 1.6, A's times 1 ...
    lifts = mailed.groupby("variant").variant_click_lift.unique()
    assert [list(lifts["A"]), list(lifts["B"])] == [[1.0], [B_CLICK_LIFT]]
    planted = lifts["B"][0] / lifts["A"][0] - 1
    # ... and it is the lift of clicks per delivered message too: opens do not depend on the variant,
    # and no unit's clicks per open reached the 0.95 cap (the planted law, recomputed from the truth's
    # own engagement and relevance, times the lift, is what was drawn against).
    p = ctx.settings.simulate
    delivered = mailed[mailed.is_delivered]
    law = ((p.click_base + p.click_per_engagement * delivered.engagement_at_send)
           * (1 + p.relevance_click_lift * delivered.relevant_share) * delivered.variant_click_lift)
    assert (law < R.PROBABILITY_CAP).all()
    assert delivered.p_click_given_open.to_numpy() == pytest.approx(law.to_numpy())

    clicks = _test(experiments, "ab", "clicks")
    assert (clicks.variant, clicks.control, clicks.status) == ("B", "A", "final")
    # Every message of each arm went out (deliveries say sent), good address or not.
    arms = mailed.groupby("variant").size()
    assert (clicks.n_variant, clicks.n_control) == (arms["B"], arms["A"])
    assert clicks.relative_lift_low < planted < clicks.relative_lift_high, (
        planted, clicks.relative_lift_low, clicks.relative_lift_high)
    assert clicks.is_significant and clicks.winner == "B"
    assert clicks.verdict.startswith("B beats A on clicks: +")


def _exponential_sum_tail(t: float, mean_1: float, mean_2: float) -> float:
    """P(E1 + E2 > t) for independent exponentials with these (different) means."""
    return (mean_1 * math.exp(-t / mean_1) - mean_2 * math.exp(-t / mean_2)) / (mean_1 - mean_2)


def test_the_holdout_uplift_interval_covers_the_planted_incremental_conversions(scored):
    """Conversions per recipient, treated - holdout, over the report's window and population.

    The report: per win-back recipient of 19 Nov (its plan rows: treated, bounced or not, and held
    out), whether the user has any order in [planned send, planned send + 3 days); the holdout test
    compares the treated arm's share with the holdout's. The planted counterpart, per treated user u:

    - a: the planted probability that the email leads to a purchase (``p_click_purchase``), times w,
      the chance that purchase falls in the window;
    - o: the user's organic purchase (``p_organic_purchase``), made anyway, mailed or held out, within
      the organic window (3 days) of the planned send (the simulator times it from the planned slot
      in both arms): always inside the uplift window;
    - r: the user's orders in the window from other units (the weekly picks at 07:00 for users below
      600): its organic purchase with the chance 70/72 that it falls after 09:00, and its click
      purchase with an unknown chance between 0 and 1 (so r is a range);

    the email adds a conversion exactly when it leads to a purchase in the window and nothing else
    did: a w (1 - o)(1 - r). The planted effect is its mean over the treated recipients (the arms are
    a random split of the same users, so the holdout arm's mean without the email is the same).
    """
    ctx, units, experiments = scored
    r = ctx.settings.report
    window_s = r.uplift_window_days * 86_400
    plan = ctx.lake.read("campaign_plan").where(
        (F.col("campaign_id") == CAMPAIGN) & (F.col("plan_date") == F.lit(PLAN_DAY))).toPandas()
    treated_plan = plan[plan.variant != "holdout"].set_index("user_id")
    planned_at = _utc(plan.set_index("user_id").send_at)   # the win-back slot of every recipient

    ours = units[units.campaign_id == CAMPAIGN]
    treated = ours[~ours.is_holdout].set_index("user_id")
    # The report's population is the plan's: every treated plan row has its unit in the truth.
    assert sorted(treated.index) == sorted(treated_plan.index)
    assert (ours.is_holdout.sum(), len(treated)) == ((plan.variant == "holdout").sum(), len(treated_plan))

    # w: a click purchase comes at most 30 + 60 + 305 + 60 s plus two exponential waits (open, then
    # purchase, each truncated, so stochastically below the untruncated ones; the open's mean at most
    # 4 h, the longer of its two) after the message left, which was at most 10 minutes after its slot.
    # Its chance to miss the window is at most:
    late_s = (treated.sent_at - planned_at.reindex(treated.index)).dt.total_seconds()
    assert late_s.between(0, 600).all()
    miss = _exponential_sum_tail(window_s - late_s.max() - 455, float(R.OPEN_MEAN_OTHERWISE),
                                 float(R.PURCHASE_MEAN))
    assert miss < 1e-6

    # r per user, from the other campaigns' units of the same users.
    others = units[units.campaign_id != CAMPAIGN].set_index("user_id")
    # Their organic purchases are timed from their own slot (planned_at; sent_at in a truth without it).
    others_slot = others.planned_at if "planned_at" in others.columns else others.sent_at
    start_s = (planned_at.reindex(others.index) - others_slot).dt.total_seconds()
    organic_window_s = ctx.settings.simulate.organic_window_days * 86_400
    in_window = ((organic_window_s - start_s) / organic_window_s).clip(0, 1)   # their slot is before 09:00
    assert (start_s >= 0).all()
    r_low = others.p_organic_purchase * in_window
    r_high = 1 - (1 - r_low) * (1 - others.p_click_purchase)
    r_low, r_high = (s.groupby(level=0).apply(lambda x: 1 - (1 - x).prod()).reindex(treated.index, fill_value=0.0)
                     for s in (r_low, r_high))

    added = treated.p_click_purchase * (1 - treated.p_organic_purchase)
    n_treated = len(treated_plan)
    planted_high = float((added * (1 - r_low)).sum()) / n_treated
    planted_low = float((added * (1 - miss) * (1 - r_high)).sum()) / n_treated
    assert 0 < planted_high - planted_low < 1e-3

    uplift = _test(experiments, "holdout", "conversions")
    n_holdout = int((plan.variant == "holdout").sum())
    assert (uplift.status, uplift.n_variant, uplift.n_control) == ("final", n_treated, n_holdout)
    assert uplift.alpha == ALPHA
    assert uplift.difference_low <= planted_low and planted_high <= uplift.difference_high, (
        (planted_low, planted_high), (uplift.difference_low, uplift.difference, uplift.difference_high))
    assert uplift.is_significant and uplift.winner == "treated"
