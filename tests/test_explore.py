"""The notebooks' summaries on hand-written users: histograms and the RFM grid."""

from __future__ import annotations

import math

from inboxlift.explore.features import NO_PURCHASE, feature_histograms, rfm_grid

SCHEMA = "user_id string, orders int, days_since_last_purchase int, monetary double"
USERS = [
    ("nobuy", 0, 100, 0.0),       # recency is tenure for a user without an order
    ("a", 1, 50, 10.0), ("b", 1, 10, 20.0), ("c", 2, 5, 30.0), ("d", 3, 30, 40.0), ("e", 5, 1, 50.0),
    ("nulls", None, None, None),
]


def test_rfm_grid_scores_buyers_by_quantile_and_keeps_non_buyers_apart(spark):
    users = spark.createDataFrame(USERS, SCHEMA)
    grid = rfm_grid(users, recency="days_since_last_purchase", frequency="orders", monetary="monetary", quantiles=2)
    got = {(r.r_score, r.f_score): (r.users, r.mean_monetary) for r in grid.itertuples()}
    # Buyers' medians: recency 10 (1, 5, 10, 30, 50), orders 2 (1, 1, 2, 3, 5). Recency at or below
    # the median scores 2 (recent), above it 1; orders above the median score 2.
    assert got == {("1", "1"): (1, 10.0), ("2", "1"): (2, 25.0), ("1", "2"): (1, 40.0), ("2", "2"): (1, 50.0),
                   (NO_PURCHASE, NO_PURCHASE): (2, 0.0)}
    empty = rfm_grid(spark.createDataFrame([], SCHEMA), recency="days_since_last_purchase", frequency="orders",
                     monetary="monetary")
    assert len(empty) == 0


def test_feature_histograms_count_every_user_once_per_feature(spark):
    users = spark.createDataFrame(USERS, SCHEMA)
    hist = feature_histograms(users, ["orders", "monetary"], bins=5)
    orders = hist["orders"]
    # Width 1 between 0 and 5; the maximum falls in the last bin; the null user in a row of its own.
    assert orders["bin_low"].tolist()[:5] == [0.0, 1.0, 2.0, 3.0, 4.0] and math.isnan(orders["bin_low"].tolist()[5])
    assert orders["users"].tolist() == [1, 2, 1, 1, 1, 1]
    assert hist["monetary"]["users"].sum() == len(USERS)
    empty = feature_histograms(spark.createDataFrame([], SCHEMA), ["orders"])
    assert empty["orders"]["users"].sum() == 0
