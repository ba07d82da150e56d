"""Campaign planning: definitions, audiences, exclusions, product filters, assignment, send time."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import CAMPAIGN_TYPES, load_campaigns, parse_campaigns
from inboxlift.campaigns.planning import (
    PlanInputs,
    assign_variant,
    next_birthday,
    plan_campaign,
    send_hour,
    send_time_utc,
)
from inboxlift.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]
DAY = dt.date(2026, 11, 20)   # a Friday
NOW = dt.datetime(2026, 11, 20, 6, 0, tzinfo=dt.timezone.utc)
UTC = dt.timezone.utc

USERS = "user_id string, email string, email_consent boolean, locale string, timezone string, birthday date"
SUPPRESSIONS = ("user_id string, email_hash string, scope string, reason string, source string, since timestamp, "
                "lifted_at timestamp, updated_at timestamp")
FEATURES = ("user_id string, is_unsubscribed boolean, is_bounced boolean, preferred_send_hour int, "
            "open_cart_item_ids array<string>, open_cart_item_count int, open_cart_added_at timestamp, "
            "browsed_not_bought_item_ids array<string>, lifecycle_stage string, days_since_last_activity int, "
            "top_categories array<string>, negatively_reviewed_item_ids array<string>")
ITEMS = ("item_id string, category string, is_in_stock boolean, is_new_arrival boolean, days_since_launch int, "
         "trending_score double, purchases_90d long, views_90d long")


def campaign(kind: str = "weekly_picks", **overrides):
    spec = {"type": kind, "template": kind, "subjects": {"A": {"en": "Hello {{ first_name }}", "zh-CN": "你好"}},
            "split": {"A": 1.0}, "holdout": 0.0, "min_products": 1, "max_products": 3, **overrides}
    return parse_campaigns({"campaigns": {"c1": spec}}, source="test")["c1"]


def user(user_id, consent=True, locale="en", tz="UTC", birthday=None, email=None):
    return (user_id, email or f"{user_id}@mail.example", consent, locale, tz, birthday)


def suppression(user_id, reason, scope="all", lifted_at=None, email=None):
    digest = hashlib.sha256(email.encode()).hexdigest() if email else None
    return (user_id, digest, scope, reason, "e-" + user_id, dt.datetime(2026, 11, 1, tzinfo=UTC), lifted_at, NOW)


def features(user_id, *, unsub=False, bounced=False, hour=10, cart=(), cart_at=None, browsed=(), stage="active",
             inactive=3, top=(), negative=()):
    return (user_id, unsub, bounced, hour, list(cart), len(cart), cart_at, list(browsed), stage, inactive, list(top),
            list(negative))


def item(item_id, category="Sports", stock=True, new=False, launched_days=100, trend=1.0, bought=0, views=0):
    return (item_id, category, stock, new, launched_days, trend, bought, views)


def inputs(spark, *, users, feats, items, recs=(), similar=(), purchases=(), history=(), suppressed=(),
           segments=None):
    return PlanInputs(
        users=spark.createDataFrame(users, USERS),
        user_features=spark.createDataFrame(feats, FEATURES),
        item_features=spark.createDataFrame(items, ITEMS),
        history=spark.createDataFrame(list(history), "campaign_id string, user_id string, plan_date date"),
        purchases=spark.createDataFrame(list(purchases), "user_id string, item_id string, event_ts timestamp"),
        recommendations=spark.createDataFrame(list(recs), "user_id string, rank int, item_id string, source string"),
        similar_items=spark.createDataFrame(list(similar), "item_id string, rank int, similar_item_id string"),
        content_similar_items=None,
        user_segments=(spark.createDataFrame(segments, "user_id string, segment_name string")
                       if segments is not None else None),
        suppressions=spark.createDataFrame(list(suppressed), SUPPRESSIONS) if suppressed else None,
    )


def run(data, camp):
    plan, excluded = plan_campaign(data, camp, plan_date=DAY, plan_run_id="r1", planned_at=NOW)
    plan_rows = {r.user_id: r for r in plan.collect()}
    return plan_rows, {r.user_id: r.reason for r in excluded.collect()}


# ---- definitions ---------------------------------------------------------------------------------

def test_the_shipped_campaigns_load_and_cover_every_type():
    campaigns = load_campaigns(ROOT / "conf" / "campaigns.yml")
    assert sorted({c.type for c in campaigns.values()}) == sorted(CAMPAIGN_TYPES)
    assert all(abs(sum(c.split.values()) - 1.0) < 1e-9 for c in campaigns.values())


@pytest.mark.parametrize("change, message", [
    ({"split": {"A": 0.5, "B": 0.4}}, "'split' shares must be positive and add up to 1"),
    ({"subjects": {"A": {"zh-CN": "你好"}}}, "'subjects.A' needs an 'en' subject"),
    ({"holdout": 1.0}, "'holdout' must be in [0, 1)"),
    ({"schedule": ["monday"]}, "'schedule' has unknown weekdays ['monday']"),
    ({"quiet_hours": {"start": 25, "end": 8}}, "'quiet_hours.start' must be an hour 0-23"),
    ({"colour": "red"}, "unknown setting 'campaigns.c1.colour'"),
    ({"holdout": "a lot"}, "setting 'campaigns.c1.holdout' expected a number"),
])
def test_bad_definitions_name_the_campaign_and_key(change, message):
    spec = {"type": "weekly_picks", "template": "weekly_picks", "subjects": {"A": {"en": "x"}}, "split": {"A": 1.0}}
    with pytest.raises(SettingsError) as error:
        parse_campaigns({"campaigns": {"c1": {**spec, **change}}}, source="conf/campaigns.yml")
    assert message in str(error.value) and "conf/campaigns.yml" in str(error.value)


# ---- exclusions and products ---------------------------------------------------------------------

def test_exclusions_first_reason_wins_and_products_are_filtered(spark):
    plain = ("ok", "unsub", "bounced", "suppressed", "complained", "same_type", "again", "capped", "nothing",
             "other_type", "lifted", "daily")
    users = [user(u) for u in plain]
    users += [user("noconsent", consent=False), user("unsub_and_noconsent", consent=False),
              user("null_consent", consent=None), user("bounced_twin", email="twin@mail.example"),
              user("shares_address", email=" Twin@Mail.example")]
    # "gone" has features but no row in users any more (deleted).
    everyone = (*plain, "shares_address", "noconsent", "unsub_and_noconsent", "null_consent", "gone")
    feats = [features(u) for u in everyone]
    items = [item("i1"), item("i2", stock=False), item("i3"), item("i4"), item("i5"), item("i6"), item("i7")]
    recs = [("ok", r, i, "als") for r, i in enumerate(["i2", "i3", "i1", "i4", "i5", "i6", "i7"], start=1)]
    recs += [(u, 1, "i1", "als") for u in everyone if u not in ("ok", "nothing")]
    recs += [("nothing", 1, "i2", "als")]   # out of stock: nothing left
    history = [("c1", "again", DAY - dt.timedelta(days=3)),            # inside the 6-day cool-down
               ("other", "capped", DAY - dt.timedelta(days=1)), ("x", "capped", DAY - dt.timedelta(days=6)),
               ("other", "ok", DAY - dt.timedelta(days=7)), ("x", "ok", DAY - dt.timedelta(days=8)),  # cap: 7 days
               ("c1", "ok", DAY),                                      # today's own plan is being replaced
               ("other", "daily", DAY)]                                # one e-mail today already: daily cap
    suppressed = [suppression("unsub", "unsubscribed"), suppression("unsub_and_noconsent", "unsubscribed"),
                  suppression("bounced", "bounced"), suppression("suppressed", "manual"),
                  suppression("complained", "complained"),
                  suppression("same_type", "unsubscribed", scope="weekly_picks"),
                  suppression("other_type", "unsubscribed", scope="win_back"),      # another type: still mailed
                  suppression("lifted", "unsubscribed", lifted_at=dt.datetime(2026, 11, 10, tzinfo=UTC)),
                  # A bounce is a fact about the mailbox: it holds for another user with that address.
                  suppression("bounced_twin", "bounced", email="twin@mail.example")]
    data = inputs(spark, users=users, feats=feats, items=items, recs=recs, history=history,
                  purchases=[("ok", "i3", dt.datetime(2026, 10, 1, tzinfo=UTC))], suppressed=suppressed)
    data = dataclasses.replace(data, user_features=data.user_features.withColumn(
        "negatively_reviewed_item_ids",
        F.when(F.col("user_id") == "ok", F.array(F.lit("i4"))).otherwise(F.col("negatively_reviewed_item_ids"))))
    plan, excluded = run(data, campaign(max_products=3))
    assert excluded == {"noconsent": "no_consent", "unsub_and_noconsent": "no_consent", "null_consent": "no_consent",
                        "gone": "unknown_user", "unsub": "unsubscribed", "same_type": "unsubscribed",
                        "bounced": "bounced", "shares_address": "bounced", "complained": "complained",
                        "suppressed": "suppressed", "again": "already_received", "capped": "frequency_cap",
                        "daily": "daily_cap", "nothing": "too_few_products"}
    assert set(plan) == {"ok", "other_type", "lifted"}
    # i2 out of stock, i3 bought before, i4 reviewed negatively; the first three left, in rank order.
    assert plan["ok"].item_ids == ["i1", "i5", "i6"]
    assert plan["ok"].item_sources == ["als", "als", "als"]
    assert plan["ok"].variant == "A" and plan["ok"].subject_template == "Hello {{ first_name }}"


def test_abandoned_cart_keeps_cart_items_first_then_similar_ones(spark):
    cart_at = dt.datetime(2026, 11, 19, 15, 30, tzinfo=UTC)
    feats = [features("u", cart=["c2", "c1"], cart_at=cart_at), features("empty")]
    items = [item(i) for i in ("c1", "c2", "s1", "s2", "s3", "s4")]
    similar = [("c2", 1, "s1"), ("c2", 2, "s2"), ("c2", 3, "c1"), ("c2", 4, "s4"), ("c1", 1, "s3")]
    data = inputs(spark, users=[user("u"), user("empty")], feats=feats, items=items, similar=similar,
                  purchases=[("u", "c1", dt.datetime(2026, 9, 1, tzinfo=UTC))])   # bought before, back in the cart
    plan, excluded = run(data, campaign("abandoned_cart", max_products=5))
    assert excluded == {}
    assert set(plan) == {"u"}
    # Cart items in cart order; then neighbours of c2 (priority 1000+0*10+rank) before those of c1 (1010+rank);
    # c1 appears once, as a cart item; s4 is c2's 4th neighbour (only 3 are taken).
    assert plan["u"].item_ids == ["c2", "c1", "s1", "s2", "s3"]
    assert plan["u"].item_sources == ["cart", "cart", "similar", "similar", "similar"]
    assert plan["u"].reason == "open cart of 2 items since 2026-11-19 15:30"
    assert plan["u"].context["cart_added_at"] == "2026-11-19T15:30:00Z"


def test_win_back_takes_best_sellers_of_favourite_categories_then_popular(spark):
    feats = [features("lapsed", stage="lapsed", inactive=120, top=["Home"]), features("active", stage="active")]
    items = [item("h1", "Home", bought=5), item("h2", "Home", bought=9), item("h3", "Home", stock=False, bought=50),
             item("s1", "Sports", bought=100)]
    data = inputs(spark, users=[user("lapsed"), user("active")], feats=feats, items=items)
    plan, excluded = run(data, campaign("win_back", max_products=3))
    assert set(plan) == {"lapsed"} and excluded == {}
    assert plan["lapsed"].item_ids == ["h2", "h1", "s1"]
    assert plan["lapsed"].item_sources == ["popular_in_category", "popular_in_category", "popular"]
    assert plan["lapsed"].reason == "lifecycle stage lapsed, last active 120 days ago"


def test_new_arrivals_only_new_in_stock_items_of_favourite_categories(spark):
    feats = [features("u", top=["Sports", "Home"]), features("no_favourites")]
    items = [item("n1", "Sports", new=True, launched_days=5), item("n2", "Sports", new=True, launched_days=1),
             item("n3", "Home", new=True, launched_days=2), item("old", "Sports"),
             item("gone", "Sports", new=True, stock=False, launched_days=0), item("n4", "Toys", new=True)]
    data = inputs(spark, users=[user("u"), user("no_favourites")], feats=feats, items=items)
    plan, _ = run(data, campaign("new_arrivals", max_products=5))
    assert set(plan) == {"u"}
    assert plan["u"].item_ids == ["n2", "n1", "n3"]   # Sports first (newest first), then Home


def test_browse_abandonment_leaves_users_with_an_open_cart_to_the_cart_email(spark):
    feats = [features("browser", browsed=["b1", "b2"]), features("carter", browsed=["b1"], cart=["b2"],
                                                                  cart_at=dt.datetime(2026, 11, 19, tzinfo=UTC))]
    data = inputs(spark, users=[user("browser"), user("carter")], feats=feats, items=[item("b1"), item("b2")])
    plan, _ = run(data, campaign("browse_abandonment"))
    assert set(plan) == {"browser"} and plan["browser"].item_ids == ["b1", "b2"]
    assert plan["browser"].reason == "viewed 2 items without buying"


def test_cross_sell_suggests_neighbours_of_recent_purchases_not_bought(spark):
    recent, old = dt.datetime(2026, 11, 15, tzinfo=UTC), dt.datetime(2026, 10, 1, tzinfo=UTC)
    purchases = [("u", "p1", recent), ("u", "x1", old), ("old_buyer", "p1", old)]
    similar = [("p1", 1, "x1"), ("p1", 2, "x2"), ("p1", 3, "x3")]
    data = inputs(spark, users=[user("u"), user("old_buyer")], feats=[features("u"), features("old_buyer")],
                  items=[item(i) for i in ("p1", "x1", "x2", "x3")], similar=similar, purchases=purchases)
    plan, _ = run(data, campaign("cross_sell", audience={"purchase_lookback_days": 14}))
    assert set(plan) == {"u"}
    assert plan["u"].item_ids == ["x2", "x3"]           # x1 was bought before
    assert plan["u"].reason == "bought 1 items in the last 14 days"


def test_birthday_week_including_29_february(spark):
    users = [user("in_week", birthday=dt.date(1990, 11, 25)), user("today", birthday=dt.date(1985, 11, 20)),
             user("next_month", birthday=dt.date(1990, 12, 27)), user("yesterday", birthday=dt.date(1990, 11, 19)),
             user("no_birthday")]
    feats = [features(u[0]) for u in users]
    data = inputs(spark, users=users, feats=feats, items=[item("i1")], recs=[(u[0], 1, "i1", "als") for u in users])
    plan, _ = run(data, campaign("birthday", audience={"birthday_window_days": 7}))
    assert set(plan) == {"in_week", "today"}
    assert plan["in_week"].context["birthday"] == "2026-11-25"
    leap = spark.createDataFrame([(dt.date(2000, 2, 29),), (dt.date(1999, 3, 1),), (dt.date(1999, 1, 10),)], "b date")
    got = [r.n for r in leap.select(next_birthday(F.col("b"), dt.date(2027, 2, 1)).alias("n")).collect()]
    assert got == [dt.date(2027, 3, 1), dt.date(2027, 3, 1), dt.date(2028, 1, 10)]


# ---- assignment and send time --------------------------------------------------------------------

def test_assignment_is_deterministic_and_close_to_the_shares(spark):
    camp = campaign(split={"A": 0.5, "B": 0.5}, subjects={"A": {"en": "a"}, "B": {"en": "b"}}, holdout=0.1)
    users = spark.range(10_000).select(F.concat(F.lit("user-"), F.col("id").cast("string")).alias("user_id"))
    first = users.select("user_id", assign_variant(camp, F.col("user_id")).alias("v"))
    shares = {r.v: r["count"] / 10_000 for r in first.groupBy("v").count().collect()}
    # Expected 0.1 / 0.45 / 0.45; binomial sd on 10k users is at most 0.005, so 0.02 is 4 sd.
    assert shares["holdout"] == pytest.approx(0.10, abs=0.02)
    assert shares["A"] == pytest.approx(0.45, abs=0.02) and shares["B"] == pytest.approx(0.45, abs=0.02)
    again = users.select("user_id", assign_variant(camp, F.col("user_id")).alias("v2"))
    assert first.join(again, "user_id").where(F.col("v") != F.col("v2")).count() == 0
    # Another campaign draws independently: about half of its arms differ.
    other = dataclasses.replace(camp, id="c2")
    moved = first.join(users.select("user_id", assign_variant(other, F.col("user_id")).alias("v3")), "user_id") \
        .where(F.col("v") != F.col("v3")).count() / 10_000
    assert 0.4 < moved < 0.7


def test_send_time_in_the_users_zone_out_of_quiet_hours(spark):
    rows = [("Asia/Shanghai", 9), ("America/New_York", 22), ("America/New_York", 6), ("UTC", 12),
            ("Europe/Berlin", 20), ("Not/AZone", 12)]
    frame = spark.createDataFrame(rows, "tz string, hour int")
    from inboxlift.transforms.features_user import valid_timezone

    hour = send_hour(F.col("hour"), quiet_start=21, quiet_end=8)
    got = [r.at for r in frame.select(send_time_utc(DAY, hour, valid_timezone(F.col("tz"))).alias("at")).collect()]
    assert got == [
        dt.datetime(2026, 11, 20, 1, 0),    # 09:00 in Shanghai (UTC+8)
        dt.datetime(2026, 11, 21, 1, 0),    # 22:00 is quiet: 20:00 in New York (UTC-5 in November)
        dt.datetime(2026, 11, 20, 13, 0),   # 06:00 is quiet: 08:00 in New York
        dt.datetime(2026, 11, 20, 12, 0),
        dt.datetime(2026, 11, 20, 19, 0),   # 20:00 in Berlin (UTC+1)
        dt.datetime(2026, 11, 20, 12, 0),   # an unknown zone is UTC
    ]
    # A daytime quiet window splits at its middle.
    midday = spark.createDataFrame([(12,), (13,), (14,), (11,)], "hour int")
    got = [r.h for r in midday.select(send_hour(F.col("hour"), quiet_start=12, quiet_end=14).alias("h")).collect()]
    assert got == [11, 14, 14, 11]


def test_locale_falls_back_to_english_and_picks_the_variant_subject(spark):
    users = [user("zh", locale="zh-CN"), user("fr", locale="fr")]
    data = inputs(spark, users=users, feats=[features("zh"), features("fr")], items=[item("i1")],
                  recs=[("zh", 1, "i1", "als"), ("fr", 1, "i1", "als")])
    plan, _ = run(data, campaign())
    assert (plan["zh"].locale, plan["zh"].subject_template) == ("zh-CN", "你好")
    assert (plan["fr"].locale, plan["fr"].subject_template) == ("en", "Hello {{ first_name }}")


# ---- the stage -----------------------------------------------------------------------------------

def with_campaigns(ctx, tmp_path, campaigns: list[tuple[str, str, int]], *, common: str):
    """``ctx`` reading a campaigns file of ``(id, type, priority)`` campaigns, one variant A, no holdout,
    one product enough, and the ``common`` YAML lines (indented as keys of a campaign)."""
    path = tmp_path / "campaigns.yml"
    shared = f"subjects: {{A: {{en: hi}}}}\n    split: {{A: 1.0}}\n    holdout: 0.0\n    min_products: 1\n    {common}"
    path.write_text("campaigns:\n" + "".join(
        f"  {name}:\n    type: {kind}\n    template: {kind}\n    priority: {priority}\n    {shared}\n"
        for name, kind, priority in campaigns))
    settings = dataclasses.replace(ctx.settings, paths=dataclasses.replace(ctx.settings.paths, campaigns_file=str(path)))
    return dataclasses.replace(ctx, settings=settings)


def test_stage_plans_by_priority_with_a_shared_cap_and_a_rerun_gives_the_same_plan(spark, ctx, tmp_path):
    from inboxlift.stages.plan import run_plan

    ctx = with_campaigns(ctx, tmp_path, [("picks", "weekly_picks", 50), ("cart", "abandoned_cart", 10)],
                         common="frequency_cap: {max_emails: 1, days: 7}")
    cart_at = dt.datetime(2026, 11, 19, 9, 0, tzinfo=UTC)
    ctx.lake.append("users", spark.createDataFrame([user("a"), user("b")], USERS))
    ctx.lake.append("user_features", spark.createDataFrame(
        [features("a", cart=["i1"], cart_at=cart_at), features("b")], FEATURES))
    ctx.lake.append("item_features", spark.createDataFrame([item("i1"), item("i2")], ITEMS))
    ctx.lake.append("events", spark.createDataFrame([], "event_id string, user_id string, item_id string, "
                                                        "event_type string, quantity int, event_ts timestamp"))
    ctx.lake.append("recommendations", spark.createDataFrame(
        [("a", 1, "i2", "als"), ("b", 1, "i2", "als")], "user_id string, rank int, item_id string, source string"))
    ctx.lake.append("similar_items", spark.createDataFrame([], "item_id string, rank int, similar_item_id string"))

    report = run_plan(ctx, all_campaigns=True, plan_date=DAY)
    assert [c.campaign_id for c in report.campaigns] == ["cart", "picks"]
    # "a" got the cart email first, so the cap of 1 email a day keeps picks from "a".
    assert report.campaigns[0].variants == {"A": 1}
    assert report.campaigns[1].variants == {"A": 1} and report.campaigns[1].excluded == {"daily_cap": 1}
    assert "daily_cap=1" in report.summary()

    def plan_rows():
        return sorted((r.campaign_id, r.user_id, r.variant, tuple(r.item_ids), r.send_at)
                      for r in ctx.lake.read("campaign_plan").collect())

    first = plan_rows()
    assert first == [("cart", "a", "A", ("i1",), dt.datetime(2026, 11, 20, 10, 0)),
                     ("picks", "b", "A", ("i2",), dt.datetime(2026, 11, 20, 10, 0))]
    run_plan(ctx, all_campaigns=True, plan_date=DAY)
    assert plan_rows() == first
    assert ctx.lake.read("campaign_exclusions").count() == 1


PLAN_ROW = ("campaign_id string, campaign_type string, plan_date date, user_id string, variant string, "
            "template string, locale string, subject_template string, send_at timestamp, reason string, "
            "item_ids array<string>, item_sources array<string>, context map<string,string>, plan_run_id string, "
            "planned_at timestamp")


def test_replanning_a_day_gives_the_same_rows_and_the_cap_counts_earlier_priorities_and_days(spark, ctx, tmp_path):
    from inboxlift.stages.plan import run_plan

    ctx = with_campaigns(ctx, tmp_path, [("picks", "weekly_picks", 50), ("cart", "abandoned_cart", 10)],
                         common="frequency_cap: {max_emails: 1, days: 7}")
    cart_at = dt.datetime(2026, 11, 19, 9, 0, tzinfo=UTC)
    ctx.lake.append("users", spark.createDataFrame([user(u) for u in ("a", "x", "b", "y")], USERS))
    ctx.lake.append("user_features", spark.createDataFrame([
        features("a", cart=["i1"], cart_at=cart_at),
        features("x", cart=["i3"], cart_at=cart_at),    # its cart item is out of stock: too few products
        features("b"),
        features("y", cart=["i1"], cart_at=cart_at),    # got picks yesterday
    ], FEATURES))
    ctx.lake.append("item_features", spark.createDataFrame([item("i1"), item("i2"), item("i3", stock=False)], ITEMS))
    ctx.lake.append("events", spark.createDataFrame([], "event_id string, user_id string, item_id string, "
                                                        "event_type string, quantity int, event_ts timestamp"))
    ctx.lake.append("recommendations", spark.createDataFrame(
        [(u, 1, "i2", "als") for u in ("a", "x", "b", "y")], "user_id string, rank int, item_id string, source string"))
    ctx.lake.append("similar_items", spark.createDataFrame([], "item_id string, rank int, similar_item_id string"))
    yesterday = DAY - dt.timedelta(days=1)
    ctx.lake.append("campaign_plan", spark.createDataFrame([
        ("picks", "weekly_picks", yesterday, "y", "A", "weekly_picks", "en", "hi",
         dt.datetime(2026, 11, 19, 10, 0), "r", ["i2"], ["als"], {}, "plan-0", dt.datetime(2026, 11, 19, 6, 0)),
    ], PLAN_ROW))

    run_plan(ctx, all_campaigns=True, plan_date=DAY)

    plan = ctx.lake.read("campaign_plan").select("campaign_id", "plan_date", "user_id", "variant", "item_ids")
    assert_df_equality(plan, spark.createDataFrame([
        ("picks", yesterday, "y", "A", ["i2"]),
        ("cart", DAY, "a", "A", ["i1"]),
        ("picks", DAY, "x", "A", ["i2"]),
        ("picks", DAY, "b", "A", ["i2"]),
    ], "campaign_id string, plan_date date, user_id string, variant string, item_ids array<string>"),
        ignore_row_order=True, ignore_nullable=True)
    exclusions = ctx.lake.read("campaign_exclusions").select("campaign_id", "plan_date", "user_id", "reason")
    assert_df_equality(exclusions, spark.createDataFrame([
        ("cart", DAY, "x", "too_few_products"),
        ("cart", DAY, "y", "frequency_cap"),       # yesterday's picks count, though picks comes after cart
        ("picks", DAY, "a", "daily_cap"),          # cart comes first and planned "a" today
        ("picks", DAY, "y", "already_received"),   # picks yesterday, inside its cool-down
    ], "campaign_id string, plan_date date, user_id string, reason string"),
        ignore_row_order=True, ignore_nullable=True)

    versions = {t: ctx.lake.version(t) for t in ("campaign_plan", "campaign_exclusions")}

    def comparable(frame):
        # plan_run_id names the run; everything else must be equal, row for row (a map cannot be sorted).
        frame = frame.drop("plan_run_id")
        return frame.withColumn("context", F.array_sort(F.map_entries("context"))) if "context" in frame.columns \
            else frame

    def unchanged_since_first_run() -> None:
        for table, version in versions.items():
            assert_df_equality(comparable(ctx.lake.read(table)), comparable(ctx.lake.read(table, version=version)),
                               ignore_row_order=True, ignore_nullable=True)

    # Before the fix the re-run counted today's picks of "x" against cart: frequency_cap, not too_few_products.
    run_plan(ctx, all_campaigns=True, plan_date=DAY)
    unchanged_since_first_run()
    run_plan(ctx, campaign_id="cart", plan_date=DAY)
    unchanged_since_first_run()
    run_plan(ctx, campaign_id="picks", plan_date=DAY)
    unchanged_since_first_run()


OUTBOX_ROW = "message_id string, campaign_id string, user_id string, variant string, plan_date date, status string"


def test_a_holdout_row_counts_as_a_send_for_the_caps_and_the_cool_down_as_a_mailed_one_does(spark, ctx, tmp_path):
    """Intent to treat: held out of cart today, a user may not get picks today, as a mailed user may not."""
    from inboxlift.stages.plan import run_plan

    ctx = with_campaigns(ctx, tmp_path, [("cart", "abandoned_cart", 10), ("picks", "weekly_picks", 50)],
                         common="cooldown_days: 6\n    frequency_cap: {max_emails: 2, days: 7, max_per_day: 1}")
    people = ("held_today", "mailed_today", "held_before", "mailed_before", "held_capped", "mailed_capped",
              "mailed_once", "replaced", "withdrawn", "fresh")
    ctx.lake.append("users", spark.createDataFrame([user(u) for u in people], USERS))
    ctx.lake.append("user_features", spark.createDataFrame([features(u) for u in people], FEATURES))
    ctx.lake.append("item_features", spark.createDataFrame([item("i1")], ITEMS))
    ctx.lake.append("events", spark.createDataFrame([], "event_id string, user_id string, item_id string, "
                                                        "event_type string, quantity int, event_ts timestamp"))
    ctx.lake.append("recommendations", spark.createDataFrame(
        [(u, 1, "i1", "als") for u in people], "user_id string, rank int, item_id string, source string"))

    def ago(days):
        return DAY - dt.timedelta(days=days)

    def plan_row(campaign_id, user_id, variant, day):
        kind = "abandoned_cart" if campaign_id == "cart" else "weekly_picks"
        at = dt.datetime.combine(day, dt.time(10))
        return (campaign_id, kind, day, user_id, variant, kind, "en", None if variant == "holdout" else "hi", at,
                "r", ["i1"], ["cart"], {}, "plan-0", at - dt.timedelta(hours=4))

    ctx.lake.append("campaign_plan", spark.createDataFrame([
        plan_row("cart", "held_today", "holdout", DAY), plan_row("cart", "mailed_today", "A", DAY),
        plan_row("picks", "held_before", "holdout", ago(2)), plan_row("picks", "mailed_before", "A", ago(2)),
        plan_row("cart", "held_capped", "holdout", ago(3)), plan_row("cart", "held_capped", "holdout", ago(5)),
        plan_row("cart", "mailed_capped", "A", ago(3)), plan_row("cart", "mailed_capped", "A", ago(5)),
        plan_row("cart", "mailed_once", "A", ago(3)),
        plan_row("cart", "replaced", "A", ago(5)),
        plan_row("cart", "withdrawn", "A", ago(5)),
    ], PLAN_ROW))
    ctx.lake.append("outbox", spark.createDataFrame([
        ("m-today", "cart", "mailed_today", "A", DAY, "sent"),
        # Sent per deliveries (the row still says rendered): one email with its plan row, not two.
        ("m-once", "cart", "mailed_once", "A", ago(3), "rendered"),
        # Sent, then its plan row was replaced: the message alone counts.
        ("m-replaced", "cart", "replaced", "A", ago(4), "sent"),
        # Withdrawn before it left and its plan row replaced: no email.
        ("m-withdrawn", "cart", "withdrawn", "A", ago(4), "withdrawn"),
    ], OUTBOX_ROW))
    ctx.lake.append("deliveries", spark.createDataFrame(
        [("m-once", 1, "sent", dt.datetime.combine(ago(3), dt.time(10, 5)))],
        "message_id string, attempt int, state string, attempted_at timestamp"))

    run_plan(ctx, campaign_id="picks", plan_date=DAY)

    planned = ctx.lake.read("campaign_plan").where(F.col("plan_date") == DAY).where(F.col("campaign_id") == "picks")
    assert sorted(r.user_id for r in planned.collect()) == ["fresh", "mailed_once", "withdrawn"]
    exclusions = ctx.lake.read("campaign_exclusions").select("campaign_id", "plan_date", "user_id", "reason")
    assert_df_equality(exclusions, spark.createDataFrame([
        ("picks", DAY, "held_today", "daily_cap"),           # held out of cart today, as...
        ("picks", DAY, "mailed_today", "daily_cap"),         # ... mailed cart today
        ("picks", DAY, "held_before", "already_received"),   # held out of picks two days ago, as...
        ("picks", DAY, "mailed_before", "already_received"),
        ("picks", DAY, "held_capped", "frequency_cap"),      # two holdout rows in the week, as...
        ("picks", DAY, "mailed_capped", "frequency_cap"),    # ... two emails
        ("picks", DAY, "replaced", "frequency_cap"),         # a sent message and another day's plan: two
    ], "campaign_id string, plan_date date, user_id string, reason string"),
        ignore_row_order=True, ignore_nullable=True)
