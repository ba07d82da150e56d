"""Derived user scores on hand-built inputs: RFM quintiles and groups, lifecycle stage, price band, send-hour
fallbacks, and the one-row-per-key dimension tables joins rely on."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from chispa import assert_df_equality
from pyspark.sql import functions as F

from inboxlift.transforms.features import (
    population_send_hour, rfm_cut_points, with_lifecycle_stage, with_rfm_scores, with_send_hour,
)
from inboxlift.transforms.features_common import latest_row_per_key
from inboxlift.transforms.features_user import price_band, valid_timezone
from test_features_data import AS_OF, settings

ACTIVITY = "user_id string, orders int, monetary decimal(18,2), last_purchase_ts timestamp"
FEATURES = "user_id string, days_since_last_purchase int, orders int, monetary decimal(18,2)"
SCORES = "user_id string, r_score int, f_score int, m_score int, rfm_group string"


def _bought(days_ago: int) -> dt.datetime:
    return dt.datetime.combine(AS_OF - dt.timedelta(days=days_ago), dt.time(10), tzinfo=dt.timezone.utc)


def _rfm(spark, rows):
    activity = spark.createDataFrame(
        [(u, o, m, _bought(d) if o else None) for u, d, o, m in rows], ACTIVITY)
    features = spark.createDataFrame(rows, FEATURES)
    return features.transform(with_rfm_scores, cut_points=rfm_cut_points(activity, as_of=AS_OF)) \
        .select("user_id", "r_score", "f_score", "m_score", "rfm_group")


def test_rfm_quintiles_and_groups(spark):
    rows = [
        ("b1", 1, 10, Decimal("1000.00")),
        ("b2", 5, 1, Decimal("20.40")),
        ("b3", 20, 2, Decimal("99.99")),
        ("b4", 60, 1, Decimal("300.00")),
        ("b5", 200, 5, Decimal("50.00")),
        ("none", 30, 0, Decimal("0.00")),
    ]
    # Cut points (linear interpolation at 20/40/60/80 % over the five buyers):
    #   recency 1, 5, 20, 60, 200      -> 4.2, 14, 36, 88       (fewer days = higher score)
    #   orders 1, 1, 2, 5, 10          -> 1, 1.6, 3.2, 6        (b2 and b4 tie and share a score)
    #   money 20, 50, 99, 300, 1000    -> 44, 79.4, 179.4, 440  (floored to whole units)
    expected = spark.createDataFrame([
        ("b1", 5, 5, 5, "champions"),
        ("b2", 4, 1, 1, "promising"),
        ("b3", 3, 3, 3, "need_attention"),
        ("b4", 2, 1, 4, "hibernating"),
        ("b5", 1, 4, 2, "at_risk"),
        ("none", 0, 0, 0, "no_purchase"),
    ], SCORES)
    assert_df_equality(_rfm(spark, rows), expected, ignore_row_order=True, ignore_nullable=True)


def test_rfm_without_buyers_or_rows(spark):
    expected = spark.createDataFrame([("none", 0, 0, 0, "no_purchase")], SCORES)
    assert_df_equality(_rfm(spark, [("none", 3, 0, Decimal("0.00"))]), expected, ignore_row_order=True,
                       ignore_nullable=True)
    assert _rfm(spark, []).isEmpty()


def test_lifecycle_stage_thresholds(spark):
    rows = [("a", 10, 100), ("b", 30, 500), ("c", 31, 30), ("d", 31, 31), ("e", 100, 90), ("f", 100, 91),
            ("g", 200, 180), ("h", 200, 181), ("nulls", None, None)]
    features = spark.createDataFrame(rows, "user_id string, tenure_days int, days_since_last_activity int")
    result = features.transform(with_lifecycle_stage, settings=settings()).select("user_id", "lifecycle_stage")
    expected = spark.createDataFrame([
        ("a", "new"), ("b", "new"), ("c", "active"), ("d", "lapsing"), ("e", "lapsing"), ("f", "lapsed"),
        ("g", "lapsed"), ("h", "churned"),
        # nothing known: nothing says the user is around
        ("nulls", "churned"),
    ], "user_id string, lifecycle_stage string")
    assert_df_equality(result, expected, ignore_row_order=True, ignore_nullable=True)


def test_lifecycle_thresholds_come_from_settings(spark):
    features = spark.createDataFrame([("a", 8, 3)], "user_id string, tenure_days int, days_since_last_activity int")
    result = features.transform(with_lifecycle_stage, settings=settings(new_user_days=7, active_days=2,
                                                                        lapsing_days=5, lapsed_days=6))
    assert result.first()["lifecycle_stage"] == "lapsing"


def test_price_bands(spark):
    prices = spark.createDataFrame([(p,) for p in (None, "0", "24.99", "25", "74.99", "75", "199.99", "200", "1000")],
                                   "p string").select(F.col("p").cast("decimal(12,2)").alias("p"))
    s = settings()
    result = prices.select(F.col("p").cast("string").alias("p"),
                           price_band(F.col("p"), edges=s.price_band_edges, labels=s.price_band_labels).alias("band"))
    expected = spark.createDataFrame([
        (None, None), ("0.00", "budget"), ("24.99", "budget"), ("25.00", "mid"), ("74.99", "mid"),
        ("75.00", "premium"), ("199.99", "premium"), ("200.00", "luxury"), ("1000.00", "luxury"),
    ], "p string, band string")
    assert_df_equality(result, expected, ignore_row_order=True, ignore_nullable=True)


def test_send_hour_fallbacks(spark):
    send_hours = spark.createDataFrame(
        [("a", 7, 6.0), ("b", 7, 9.0), ("c", 21, 6.0), ("d", 3, 5.9)],
        "user_id string, user_send_hour int, send_hour_weight double")
    features = spark.createDataFrame([("a", 7, 6.0), ("d", 3, 5.9), ("z", None, None)],
                                     "user_id string, user_send_hour int, send_hour_weight double")
    s = settings()
    result = features.transform(with_send_hour, population=population_send_hour(send_hours, settings=s), settings=s)
    expected = spark.createDataFrame([("a", 7, "user"), ("d", 7, "population"), ("z", 7, "population")],
                                     "user_id string, preferred_send_hour int, send_hour_source string")
    assert_df_equality(result.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)
    # Nobody with enough evidence: the configured default.
    nobody = features.transform(with_send_hour, population=population_send_hour(send_hours.limit(0), settings=s),
                                settings=settings(default_send_hour=11))
    assert {(r[0], r[1], r[2]) for r in nobody.select(*expected.columns).collect()} == {
        ("a", 7, "user"), ("d", 11, "default"), ("z", 11, "default")}


def test_population_hour_ties_go_to_the_earlier_hour(spark):
    send_hours = spark.createDataFrame([("a", 20, 9.0), ("b", 8, 9.0)],
                                       "user_id string, user_send_hour int, send_hour_weight double")
    assert population_send_hour(send_hours, settings=settings()).first()[0] == 8


def test_invalid_or_missing_time_zones_are_read_as_utc(spark):
    zones = spark.createDataFrame([("Asia/Kolkata",), ("+08:00",), ("Mars/Olympus_Mons",), ("",), (None,)], "z string")
    result = [r[0] for r in zones.select(valid_timezone(F.col("z"))).collect()]
    assert result == ["Asia/Kolkata", "+08:00", "UTC", "UTC", "UTC"]


def test_latest_row_per_key_keeps_one_row_per_key(spark):
    rows = [("p1", dt.datetime(2025, 1, 1), "new"), ("p1", dt.datetime(2024, 1, 1), "old"),
            ("p2", None, "only"), (None, dt.datetime(2025, 1, 1), "no key")]
    df = spark.createDataFrame(rows, "item_id string, updated_at timestamp, name string")
    result = df.transform(latest_row_per_key, key="item_id", order_by="updated_at", columns=["name"])
    expected = spark.createDataFrame([("p1", "new"), ("p2", "only")], "item_id string, name string")
    assert_df_equality(result, expected, ignore_row_order=True, ignore_nullable=True)
