"""item_features on a hand-written catalogue and event set (as of 2026-11-20, cut-off 2026-11-21T00:00Z)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from chispa import assert_approx_df_equality, assert_df_equality

from inboxlift.transforms.features import REVIEW_SCORE_SCHEMA, item_feature_columns, item_features
from test_features_data import AS_OF, at, ev, events, product, products, settings, utc


def catalogue(spark):
    return products(spark, [
        product("a", category="Sports", brand="Acme", price="10.00", in_stock=True, launched=AS_OF - dt.timedelta(29)),
        # an older version of a: neither wins nor doubles a's row
        product("a", category="Sports", brand="Acme", price="5.00", updated=utc("2024-01-01T00:00:00")),
        product("b", category="Home", brand="Zest", price="99.00", in_stock=False, launched=AS_OF - dt.timedelta(30)),
        product("c", category=None, brand=None, price=None, in_stock=None, launched=None),
        product("d", launched=AS_OF + dt.timedelta(5)),
    ])


def shop_events():
    return [
        ev("view", "u1", at(-1), item="a"),
        ev("view", None, at(-1), item="a"),                # anonymous visitors count for items
        ev("view", "u2", at(-8), item="a"),
        ev("view", "u3", at(-20), item="a"),
        ev("view", "u4", at(-40), item="a"),
        ev("add_to_cart", "u1", at(-2), item="a"),
        ev("purchase", "u1", at(-2, hours=1), item="a", order="o1", quantity=1, price="10.00"),
        ev("purchase", "u3", at(-25), item="a", order="o2", quantity=1, price="10.00"),
        ev("review", "u1", at(-3), item="a", rating=4, text="good"),
        ev("review", "u2", at(-4), item="a", rating=2, text="bad"),
        ev("review", "u3", at(-5), item="a", text="no stars"),
        ev("view", "u1", at(0), item="a"),                 # at the cut-off: not seen
        ev("purchase", "u1", at(1), item="a", order="o9", quantity=1, price="10.00"),
        ev("view", "u5", at(-1), item="c"),
        ev("view", "u5", at(-1), item="z"),                # not in the catalogue
        ev("search", "u5", at(-1)),                        # no item
    ]


def review_scores(spark):
    return spark.createDataFrame([
        ("r1", "u1", "a", at(-3), 4, 0.8, 1, False, "run", AS_OF),
        ("r2", "u2", "a", at(-4), 2, 0.4, 0, True, "run", AS_OF),
        ("r9", "u2", "a", at(0, hours=2), 1, 0.0, 0, True, "run", AS_OF),  # after the cut-off
    ], REVIEW_SCORE_SCHEMA)


@pytest.fixture(scope="module")
def items(spark):
    return events(spark, shop_events()).transform(
        item_features, products=catalogue(spark), review_scores=review_scores(spark), as_of=AS_OF,
        settings=settings()).cache()


def test_one_row_per_item_and_the_contract(items):
    assert sorted(r[0] for r in items.select("item_id").collect()) == ["a", "b", "c", "d", "z"]
    assert items.columns == item_feature_columns([7, 30, 90])


def test_catalogue_facts(spark, items):
    expected = spark.createDataFrame([
        ("a", "Sports", "Acme", Decimal("10.00"), True, True, 29),     # launched 29 days ago: new
        ("b", "Home", "Zest", Decimal("99.00"), False, False, 30),     # 30 days ago: not any more
        # Unknowns: in stock (features.unknown_stock_in_stock), never new (no launch date).
        ("c", None, None, None, True, False, None),
        ("d", "Sports", "Acme", Decimal("10.00"), True, False, -5),    # launches in 5 days: not yet new
        ("z", None, None, None, True, False, None),
    ], "item_id string, category string, brand string, price decimal(12,2), is_in_stock boolean, "
       "is_new_arrival boolean, days_since_launch int")
    assert_df_equality(items.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_demand_over_windows(spark, items):
    columns = "item_id string, " + ", ".join(
        f"{name}_{d}d int" for d in (7, 30, 90) for name in ("views", "carts", "purchases"))
    expected = spark.createDataFrame([
        ("a", 2, 1, 1, 4, 1, 2, 5, 1, 2),
        ("b", 0, 0, 0, 0, 0, 0, 0, 0, 0),
        ("c", 1, 0, 0, 1, 0, 0, 1, 0, 0),
        ("d", 0, 0, 0, 0, 0, 0, 0, 0, 0),
        ("z", 1, 0, 0, 1, 0, 0, 1, 0, 0),
    ], columns)
    assert_df_equality(items.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_conversion_and_trend(spark, items):
    expected = spark.createDataFrame([
        # conversion over 30 days with a prior of 20 views at 2%: (2 + 0.4) / (4 + 20)
        # trend: 4 interactions in the last 7 days, 3 in the 28 before: (4/7 + 1) / (3/28 + 1) = 44/31
        ("a", 2.4 / 24, 4, 3, 44 / 31),
        ("b", 0.4 / 20, 0, 0, 1.0),
        ("c", 0.4 / 21, 1, 0, 8 / 7),
    ], "item_id string, conversion_rate double, recent_interactions int, baseline_interactions int, "
       "trending_score double")
    actual = items.select(*expected.columns).where("item_id in ('a', 'b', 'c')")
    assert_approx_df_equality(actual, expected, 1e-12, ignore_row_order=True, ignore_nullable=True)


def test_ratings_and_sentiment(spark, items):
    expected = spark.createDataFrame([
        ("a", 2, 3.0, 2, 0.6),     # ratings 4 and 2 (the unrated review does not count); scores 0.8, 0.4
        ("b", 0, None, 0, None),
    ], "item_id string, rating_count int, avg_rating double, scored_reviews int, avg_review_sentiment double")
    actual = items.select(*expected.columns).where("item_id in ('a', 'b')")
    assert_approx_df_equality(actual, expected, 1e-12, ignore_row_order=True, ignore_nullable=True)


def test_conversion_prior_and_trend_windows_come_from_settings(spark):
    result = events(spark, shop_events()).transform(
        item_features, products=catalogue(spark), review_scores=review_scores(spark), as_of=AS_OF,
        settings=settings(conversion_prior_views=0.0, conversion_window_days=7, trend_recent_days=1,
                          trend_baseline_days=1, trend_smoothing_per_day=0.0))
    a = result.where("item_id = 'a'").first()
    # 1 purchase / 2 views in 7 days, no prior; 2 views on the as-of day against a cart and a purchase
    # the day before, unsmoothed: 2 / 2
    assert a["conversion_rate"] == 0.5
    assert a["trending_score"] == 1.0
    b = result.where("item_id = 'b'").first()
    # nothing in either window and no smoothing: 0 / 0 reads as steady, and no views at all as the prior rate
    assert b["trending_score"] == 1.0 and b["conversion_rate"] == 0.02


def test_empty_input_gives_no_rows(spark):
    result = events(spark, []).transform(
        item_features, products=products(spark, []), review_scores=spark.createDataFrame([], REVIEW_SCORE_SCHEMA),
        as_of=AS_OF, settings=settings())
    assert result.isEmpty() and result.columns == item_feature_columns([7, 30, 90])
