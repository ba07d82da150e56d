"""interactions: weighted, half-life-decayed confidence per (user, item), the ALS input."""

from __future__ import annotations

import math

from chispa import assert_approx_df_equality

from inboxlift.transforms.features import aggregate_user_items, interactions_from_user_items
from test_features_data import AS_OF, at, ev, events, settings

SCHEMA = ("user_id string, item_id string, confidence double, view_count int, cart_count int, purchase_count int, "
          "last_interaction_ts timestamp, has_purchased boolean")


def interactions(spark, rows, **changes):
    feature_settings = settings(**changes)
    return (events(spark, rows)
            .transform(aggregate_user_items, as_of=AS_OF, settings=feature_settings)
            .transform(interactions_from_user_items, as_of=AS_OF)
            .drop("as_of_date"))


def test_confidence_is_weighted_and_halves_every_half_life(spark):
    rows = [
        # 1 view 30 days before the cut-off (one half-life): 1 * 0.5
        ev("view", "u1", at(-30), item="i1"),
        # a cart 60 days before: 3 * 0.25
        ev("add_to_cart", "u1", at(-60), item="i1"),
        # a purchase 90 days before: 8 * 0.125
        ev("purchase", "u1", at(-90), item="i1", order="o1", quantity=1, price="5.00"),
        # removals and reviews carry no weight
        ev("remove_from_cart", "u1", at(-1), item="i1"),
        ev("review", "u1", at(-1), item="i1", rating=5, text="good"),
        # half a half-life: sqrt(0.5)
        ev("view", "u1", at(-15), item="i2"),
        ev("view", "u2", at(-30), item="i3"),
        # at the cut-off and after: not seen as of the 20th
        ev("purchase", "u2", at(0), item="i3", order="o2", quantity=1, price="5.00"),
        ev("view", "u2", at(2), item="i3"),
        # no user, no item, or only a removal: no pair
        ev("view", None, at(-1), item="i1"),
        ev("view", "u3", at(-1)),
        ev("remove_from_cart", "u4", at(-1), item="i1"),
    ]
    expected = spark.createDataFrame([
        ("u1", "i1", 0.5 + 0.75 + 1.0, 1, 1, 1, at(-30), True),
        ("u1", "i2", math.sqrt(0.5), 1, 0, 0, at(-15), False),
        ("u2", "i3", 0.5, 1, 0, 0, at(-30), False),
    ], SCHEMA)
    assert_approx_df_equality(interactions(spark, rows), expected, precision=1e-9, ignore_row_order=True,
                              ignore_nullable=True)


def test_weights_and_half_life_come_from_settings(spark):
    rows = [ev("view", "u1", at(-60), item="i1"), ev("add_to_cart", "u1", at(-60), item="i1")]
    # half-life 60 days: each weight halves once; weights 2 and 10
    expected = spark.createDataFrame([("u1", "i1", 1.0 + 5.0, 1, 1, 0, at(-60), False)], SCHEMA)
    assert_approx_df_equality(interactions(spark, rows, view_weight=2.0, cart_weight=10.0, half_life_days=60.0),
                              expected, precision=1e-9, ignore_row_order=True, ignore_nullable=True)


def test_a_pair_has_one_row_and_the_empty_input_none(spark):
    rows = [ev("view", "u1", at(-d), item="i1") for d in (1, 2, 3)]
    result = interactions(spark, rows)
    assert result.count() == 1 and result.first()["view_count"] == 3
    assert interactions(spark, []).isEmpty()


def test_a_row_with_nulls_is_skipped_or_counted_but_never_fails(spark):
    # A purchase with no price, quantity, session or order still counts as a purchase.
    rows = [ev("purchase", "u1", at(-30), item="i1"), ev(None, "u1", at(-1), item="i1")]
    expected = spark.createDataFrame([("u1", "i1", 4.0, 0, 0, 1, at(-30), True)], SCHEMA)
    assert_approx_df_equality(interactions(spark, rows), expected, precision=1e-9, ignore_row_order=True,
                              ignore_nullable=True)
