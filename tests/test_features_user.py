"""user_features end to end on a hand-written shop, every expected value worked out by hand.

As of 2026-11-20; the cut-off is 2026-11-21T00:00Z. ``at(-N)`` is N days before the cut-off, which is
UTC day 2026-11-20 minus (N - 1) days: something at ``at(-N)`` happened N - 1 days ago.

Who is who:
- u1, u2, u3: the activity events of test_features_activity (orders, email, bounces);
- shanghai (UTC+8), la (UTC-8 in November), kolkata (UTC+5:30), badtz (an invalid zone -> UTC): opens
  at hours that cross midnight or a half hour, for the preferred send hour;
- carter: adds to cart at the edges of the open-cart window; browser: views at the edges of the
  browse window; fan: interactions for category / brand / price-band affinities and reviews
  (carter, browser and fan are in Asia/Tokyo, UTC+9);
- ghost: no events at all; nulls: a profile of nulls and one event of nulls; later: signs up after the cut-off.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.types import MapType

from inboxlift.transforms.features import REVIEW_SCORE_SCHEMA, user_feature_columns, user_features
from test_features_data import (
    AS_OF, CUTOFF, activity_events, at, ev, events, product, products, settings, user, users, utc,
)

TOKYO = "Asia/Tokyo"


def shop_events() -> list[tuple]:
    rows = activity_events()
    # Send hours: two opens each (weight 3 + 3 = 6, the minimum evidence).
    rows += [
        ev("email_open", "shanghai", utc("2026-11-19T16:30:00"), message="ms1"),  # 00:30 on the 20th in Shanghai
        ev("email_open", "shanghai", utc("2026-11-18T16:30:00"), message="ms2"),
        ev("view", "shanghai", utc("2026-11-19T10:00:00"), item="p1", session="ss1"),  # 18:00 local, weight 1
        ev("email_open", "la", utc("2026-11-18T03:15:00"), message="ml1"),  # 19:15 on the 17th in Los Angeles
        ev("email_open", "la", utc("2026-11-17T03:15:00"), message="ml2"),
        ev("email_open", "kolkata", utc("2026-11-18T12:40:00"), message="mk1"),  # 18:10 in Kolkata
        ev("email_open", "kolkata", utc("2026-11-17T12:40:00"), message="mk2"),
        ev("view", "kolkata", utc("2026-11-16T12:20:00"), item="p1"),  # 17:50 in Kolkata (hour 17), weight 1
        ev("email_open", "badtz", utc("2026-11-18T19:00:00"), message="mb1"),
        ev("email_open", "badtz", utc("2026-11-17T19:00:00"), message="mb2"),
    ]
    # Open cart (window 7 days, minimum age 60 minutes).
    rows += [
        ev("add_to_cart", "carter", at(-7), item="c1"),                    # exactly 7 days old: open
        ev("add_to_cart", "carter", at(-7, seconds=-1), item="c2"),        # a second older: stale
        ev("add_to_cart", "carter", at(0, minutes=-60), item="c3"),        # exactly 60 minutes old: open
        ev("add_to_cart", "carter", at(0, minutes=-59), item="c4"),        # 59 minutes: still shopping
        ev("add_to_cart", "carter", at(-2), item="c5"),
        ev("remove_from_cart", "carter", at(-1), item="c5"),               # removed: closed
        ev("add_to_cart", "carter", at(-3), item="c6"),
        ev("purchase", "carter", at(-2), item="c6", order="oc6", quantity=1, price="9.00"),  # bought: closed
        ev("add_to_cart", "carter", at(-5), item="c7"),
        ev("remove_from_cart", "carter", at(-4), item="c7"),
        ev("add_to_cart", "carter", at(-3), item="c7"),                    # added again: open
    ]
    # Browsed-not-bought (window 3 days).
    rows += [
        ev("view", "browser", at(-1), item="b1"),
        ev("view", "browser", at(-1), item="b7"),                          # same time as b1: by id
        ev("view", "browser", at(-3), item="b2"),                          # exactly 3 days: in
        ev("view", "browser", at(-3, seconds=-1), item="b3"),              # a second older: out
        ev("view", "browser", at(-2), item="b4"),
        ev("purchase", "browser", at(-1), item="b4", order="ob4", quantity=1, price="1.00"),  # bought: out
        ev("view", "browser", at(-2), item="b5"),
        ev("purchase", "browser", at(-10), item="b5", order="ob5", quantity=1, price="1.00"),  # bought before: in
        ev("view", "browser", at(-1), item="b6"),
        ev("add_to_cart", "browser", at(-1, hours=1), item="b6"),         # in the open cart instead
    ]
    # Affinities (90 days) and reviews.
    rows += [
        ev("view", "fan", at(-10), item="p1"), ev("view", "fan", at(-11), item="p1"),
        ev("view", "fan", at(-12), item="p2"),
        ev("view", "fan", at(-13), item="p3"), ev("view", "fan", at(-14), item="p3"),
        ev("view", "fan", at(-15), item="p5"),
        ev("view", "fan", at(-100), item="p4"),                            # outside every window
        ev("review", "fan", at(-7), item="p1", rating=5, text="love it", event_id="rv1"),
        ev("review", "fan", at(-6), item="p2", rating=2, text="meh", event_id="rv2"),
        ev("review", "fan", at(-5), item="p3", rating=1, text="bad", event_id="rv3"),
        ev("review", "fan", at(-4), item="p3", rating=2, text="still bad", event_id="rv4"),
    ]
    rows += [ev("view", "nulls", at(-50))]
    return rows


def future_events() -> list[tuple]:
    """Events at or after the cut-off: none of them may change anything."""
    return [
        ev("email_open", "shanghai", at(0, hours=1), message="ms3"),
        ev("purchase", "carter", at(0), item="c3", order="oc3", quantity=1, price="5.00"),
        ev("view", "fan", at(1), item="p4"),
        ev("view", "ghost", at(2), item="p1"),
        ev("view", "later", at(0, hours=3), item="p1"),
    ]


def shop_users(spark):
    return users(spark, [
        user("u1"), user("u2"), user("u3"),
        user("shanghai", timezone="Asia/Shanghai"),
        # an older version of la's profile: the latest one wins
        user("la", timezone="Europe/Paris", updated=utc("2025-06-01T00:00:00")),
        user("la", timezone="America/Los_Angeles", updated=utc("2026-01-01T00:00:00")),
        user("kolkata", timezone="Asia/Kolkata"), user("badtz", timezone="Mars/Olympus_Mons"),
        user("carter", timezone=TOKYO), user("browser", timezone=TOKYO), user("fan", timezone=TOKYO),
        user("ghost", signup=utc("2026-11-10T08:00:00")),
        ("nulls", None, None, None, None, None, None, None, None, None, None),
        user("later", signup=at(0, hours=1)),
    ])


def shop_products(spark):
    return products(spark, [
        product("p1", category="Sports", brand="Acme", price="10.00"),
        # an older version of p1: must neither win nor double p1's rows
        product("p1", category="Old", brand="Old", price="999.00", updated=utc("2024-01-01T00:00:00")),
        product("p2", category="Sports", brand="Zest", price="30.00"),
        product("p3", category="Home", brand="Acme", price="80.00"),
        product("p4", category="Books", brand="Nova", price="250.00"),
        product("p5", category="Home", brand="Zest", price="24.99"),
    ])


def shop_review_scores(spark):
    return spark.createDataFrame([
        ("rv1", "fan", "p1", at(-7), 5, 0.9, 1, False, "run", AS_OF),
        ("rv2", "fan", "p2", at(-6), 2, 0.3, 0, True, "run", AS_OF),
        ("rv3", "fan", "p3", at(-5), 1, 0.2, 0, True, "run", AS_OF),
        ("rv4", "fan", "p3", at(-4), 2, 0.1, 0, True, "run", AS_OF),
        # scored, but written after the cut-off
        ("rv5", "fan", "p1", at(0, hours=1), 1, 0.0, 0, True, "run", AS_OF),
    ], REVIEW_SCORE_SCHEMA)


def compute(spark, rows):
    return events(spark, rows).transform(
        user_features, users=shop_users(spark), products=shop_products(spark),
        review_scores=shop_review_scores(spark), as_of=AS_OF, settings=settings())


@pytest.fixture(scope="module")
def features(spark):
    return compute(spark, shop_events() + future_events()).cache()


def comparable(df):
    """Maps as sorted arrays of entries: chispa sorts rows by every column, and Spark cannot sort maps."""
    return df.select(*[F.array_sort(F.map_entries(f.name)).alias(f.name) if isinstance(f.dataType, MapType)
                       else F.col(f.name) for f in df.schema.fields])


def pick(features, expected, *, precision: float | None = None):
    ids = [r[0] for r in expected.select("user_id").collect()]
    actual = comparable(features.select(*expected.columns).where(F.col("user_id").isin(ids)))
    expected = comparable(expected)
    if precision is None:
        assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    else:
        assert_approx_df_equality(actual, expected, precision, ignore_row_order=True, ignore_nullable=True)


def test_one_row_per_user_known_before_the_cut_off(features):
    expected = {"u1", "u2", "u3", "shanghai", "la", "kolkata", "badtz", "carter", "browser", "fan", "ghost", "nulls"}
    ids = [r["user_id"] for r in features.select("user_id").collect()]
    assert sorted(ids) == sorted(expected)  # one row each: duplicated profiles and products did not multiply
    assert features.columns == user_feature_columns([7, 30, 90])


def test_events_after_the_cut_off_change_nothing(spark, features):
    without_future = compute(spark, shop_events())
    assert_df_equality(comparable(features), comparable(without_future), ignore_row_order=True)


def test_rfm_raw_values_and_replenishment(spark, features):
    pick(features, spark.createDataFrame([
        # u1: last purchase at -40d (39 days ago), 2 orders, 125.00; orders 60 days apart -> next on 2026-12-11
        ("u1", 39, 2, Decimal("125.00"), Decimal("62.50"), 60.0, dt.date(2026, 12, 11)),
        # one order: no gap to average
        ("carter", 1, 1, Decimal("9.00"), Decimal("9.00"), None, None),
        # never bought: "days since" is the tenure (signed up 2025-01-01 -> 688 days), order value 0, no gaps
        ("u2", 688, 0, Decimal("0.00"), Decimal("0.00"), None, None),
    ], "user_id string, days_since_last_purchase int, orders int, monetary decimal(18,2), "
       "avg_order_value decimal(18,2), avg_days_between_orders double, expected_next_order_date date"))


def test_email_rates_are_smoothed_by_the_prior(spark, features):
    pick(features, spark.createDataFrame([
        # (opened + 0.2 * 5) / (delivered + 5); (clicked + 0.03 * 5) / (delivered + 5)
        ("u1", 4, 2, 1, 3 / 9, 1.15 / 9, 1, 17, False, False),
        # two emails, both opened: 3/7, not 100%
        ("shanghai", 2, 2, 0, 3 / 7, 0.15 / 7, 1, 688, False, False),
        ("u2", 1, 0, 0, 1 / 6, 0.15 / 6, 688, 688, True, True),
        # no email at all: the priors
        ("ghost", 0, 0, 0, 0.2, 0.03, 10, 10, False, False),
    ], "user_id string, emails_delivered int, emails_opened int, emails_clicked int, open_rate double, "
       "click_rate double, days_since_last_open int, days_since_last_click int, is_unsubscribed boolean, "
       "is_bounced boolean"), precision=1e-12)


def test_preferred_send_hour_in_local_time(spark, features):
    pick(features, spark.createDataFrame([
        ("shanghai", 0, "user"),   # opens at 16:30 UTC are 00:30 the next day in Shanghai
        ("la", 19, "user"),        # opens at 03:15 UTC are 19:15 the day before in Los Angeles
        ("kolkata", 18, "user"),   # 12:40 UTC is 18:10 at +05:30
        ("badtz", 19, "user"),     # an invalid zone is read as UTC
        ("fan", 9, "user"),        # 00:00 UTC views and reviews are 09:00 in Tokyo
        # too little evidence: the hour most users prefer (9: fan, carter, browser; 0: shanghai, u1;
        # 19: la, badtz; 18: kolkata)
        ("nulls", 9, "population"),
        ("ghost", 9, "population"),
    ], "user_id string, preferred_send_hour int, send_hour_source string"))


def test_open_cart_at_the_window_edges(spark, features):
    pick(features, spark.createDataFrame([
        # c3 (60 minutes old), c7 (re-added after a removal), c1 (exactly 7 days old); latest add first
        ("carter", ["c3", "c7", "c1"], 3, at(0, minutes=-60)),
        ("browser", ["b6"], 1, at(-1, hours=1)),
        ("u1", ["i1"], 1, at(-1, hours=1)),
        ("ghost", [], 0, None),
    ], "user_id string, open_cart_item_ids array<string>, open_cart_item_count int, open_cart_added_at timestamp"))


def test_browsed_not_bought_at_the_window_edge(spark, features):
    pick(features, spark.createDataFrame([
        # latest view first, ties by id; b3 too old, b4 bought, b6 is in the open cart
        ("browser", ["b1", "b7", "b5", "b2"]),
        ("carter", []),
        ("ghost", []),
    ], "user_id string, browsed_not_bought_item_ids array<string>"))


def test_affinities(spark, features):
    pick(features, spark.createDataFrame([
        # Sports: p1 x2 + p2 = 3, Home: p3 x2 + p5 = 3 (p4 is older than 90 days); a tie goes by name
        ("fan", {"Sports": 0.5, "Home": 0.5}, {"Acme": 4 / 6, "Zest": 2 / 6}, ["Home", "Sports"], "budget"),
        ("ghost", {}, {}, [], "unknown"),
        # items outside the catalogue have no category, brand or price
        ("carter", {}, {}, [], "unknown"),
    ], "user_id string, category_shares map<string,double>, brand_shares map<string,double>, "
       "top_categories array<string>, preferred_price_band string"), precision=1e-12)


def test_distinct_items_and_categories_per_window(spark, features):
    pick(features, spark.createDataFrame([
        ("fan", 0, 0, 4, 2, 4, 2, 6, 6),
        # u1: i1 (-1d), i2 (-10d) are not in the catalogue: items but no categories
        ("u1", 1, 0, 2, 0, 2, 0, 2, 2),
        ("ghost", 0, 0, 0, 0, 0, 0, 0, 0),
    ], "user_id string, items_7d int, categories_7d int, items_30d int, categories_30d int, items_90d int, "
       "categories_90d int, views_30d int, views_90d int"))


def test_review_sentiment(spark, features):
    pick(features, spark.createDataFrame([
        # (0.9 + 0.3 + 0.2 + 0.1) / 4; negatives by latest negative review: p3 (-4d), p2 (-6d)
        ("fan", 4, 0.375, ["p3", "p2"]),
        ("ghost", 0, None, []),
    ], "user_id string, reviews_written int, avg_review_sentiment double, negatively_reviewed_item_ids array<string>"),
        precision=1e-12)


def test_tenure_recency_and_lifecycle(spark, features):
    pick(features, spark.createDataFrame([
        ("u1", 688, 0, "active"),
        ("fan", 688, 3, "active"),
        ("ghost", 10, 10, "new"),               # signed up 2026-11-10
        ("nulls", 49, 49, "lapsing"),            # known since its one event at -50d
        ("u2", 688, 688, "churned"),             # deliveries and bounces are not activity
    ], "user_id string, tenure_days int, days_since_last_activity int, lifecycle_stage string"))


def test_a_user_without_events_has_numbers_not_nulls(features):
    ghost = features.where("user_id = 'ghost'").first().asDict()
    may_be_null = {"avg_review_sentiment", "avg_days_between_orders", "expected_next_order_date",
                   "open_cart_added_at"}
    assert [k for k, v in ghost.items() if v is None] == sorted(may_be_null, key=list(ghost).index)
    assert ghost["r_score"] == ghost["f_score"] == ghost["m_score"] == 0 and ghost["rfm_group"] == "no_purchase"


def test_empty_input_gives_no_rows(spark):
    empty = events(spark, []).transform(
        user_features, users=users(spark, []), products=products(spark, []),
        review_scores=spark.createDataFrame([], REVIEW_SCORE_SCHEMA), as_of=AS_OF, settings=settings())
    assert empty.isEmpty() and empty.columns == user_feature_columns([7, 30, 90])


def test_cutoff_is_the_next_utc_midnight():
    assert CUTOFF == dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)
