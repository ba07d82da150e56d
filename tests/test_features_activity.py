"""Per-user activity: windows, sessions, orders and money, email engagement, as worked out by hand.

The events are ``activity_events()``; the as-of date is 2026-11-20 and the 7 / 30 / 90-day windows
start at 2026-11-14, 2026-10-22 and 2026-08-23 (00:00 UTC).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from chispa import assert_df_equality

from inboxlift.transforms.features import activity_columns, aggregate_user_activity
from test_features_data import AS_OF, activity_events, at, events, settings


@pytest.fixture(scope="module")
def activity(spark):
    result = events(spark, activity_events()).transform(aggregate_user_activity, as_of=AS_OF, settings=settings())
    return result.cache()


def test_columns_are_the_contract(activity):
    assert activity.columns == activity_columns([7, 30, 90])


def test_counts_per_window(spark, activity):
    columns = "user_id string, " + ", ".join(
        f"{name}_{d}d int" for d in (7, 30, 90) for name in ("views", "carts", "purchases", "sessions"))
    expected = spark.createDataFrame([
        # u1: views at -1d / -10d (s1, s2), a cart at -1d, two order lines at -40d (s3, a buying-only
        # session), the -100d session and order are outside every window.
        ("u1", 1, 1, 0, 1, 2, 1, 0, 2, 2, 1, 2, 3),
        ("u2", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        # u3's view has no session id: it counts as a view, not as a session
        ("u3", 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0),
    ], columns)
    assert_df_equality(activity.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_orders_money_and_their_times(spark, activity):
    expected = spark.createDataFrame([
        # o1 = 2 x 10.00 + 1 (missing quantity) x 5.00; o2 = 100.00; an order's time is its first line's
        ("u1", 2, Decimal("125.00"), at(-100), at(-40), at(-40, minutes=1), 1),
        ("u2", 0, Decimal("0.00"), None, None, None, 0),
        ("u3", 0, Decimal("0.00"), None, None, None, 0),
    ], "user_id string, orders int, monetary decimal(18,2), first_order_ts timestamp, last_order_ts timestamp, "
       "last_purchase_ts timestamp, reviews_written int")
    assert_df_equality(activity.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_email_engagement_counts_messages_not_events(spark, activity):
    expected = spark.createDataFrame([
        # m1 delivered, opened twice, clicked; m2 delivered; m3 opened without a delivery event; m4 delivered
        ("u1", 4, 2, 1, at(-2), at(-18, hours=1), False, False),
        ("u2", 1, 0, 0, None, None, True, True),
        ("u3", 0, 0, 0, None, None, False, False),
    ], "user_id string, emails_delivered int, emails_opened int, emails_clicked int, last_open_ts timestamp, "
       "last_click_ts timestamp, is_unsubscribed boolean, is_bounced boolean")
    assert_df_equality(activity.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_first_event_and_last_activity(spark, activity):
    expected = spark.createDataFrame([
        ("u1", at(-200), at(-1, hours=2)),
        # deliveries, bounces and unsubscribes are not activity
        ("u2", at(-3), None),
        ("u3", at(-2), at(-2)),
    ], "user_id string, first_event_ts timestamp, last_activity_ts timestamp")
    assert_df_equality(activity.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_windows_come_from_settings(spark):
    result = events(spark, activity_events()).transform(aggregate_user_activity, as_of=AS_OF,
                                                        settings=settings(activity_windows_days=[2, 11]))
    expected = spark.createDataFrame([("u1", 1, 1, 2, 2), ("u2", 0, 0, 0, 0), ("u3", 1, 0, 1, 0)],
                                     "user_id string, views_2d int, sessions_2d int, views_11d int, sessions_11d int")
    assert_df_equality(result.select(*expected.columns), expected, ignore_row_order=True, ignore_nullable=True)


def test_empty_input_gives_no_rows(spark):
    result = events(spark, []).transform(aggregate_user_activity, as_of=AS_OF, settings=settings())
    assert result.isEmpty() and result.columns == activity_columns([7, 30, 90])


def test_missing_columns_are_named(spark):
    with pytest.raises(ValueError, match=r"lacks columns \['session_id'\]"):
        events(spark, []).drop("session_id").transform(aggregate_user_activity, as_of=AS_OF, settings=settings())
