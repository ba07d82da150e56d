"""Purchases net of cancellations and returns (transforms.features_returns), worked out by hand."""

from __future__ import annotations

import datetime as dt

from chispa import assert_df_equality

from inboxlift.transforms.features_returns import net_of_returns

SCHEMA = "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, quantity int"


def day(n: int) -> dt.datetime:
    return dt.datetime(2011, 11, n, 9, 0)


ROWS = [
    # u1/i1: 3 then 2 bought, 4 returned afterwards: the later purchase goes first (2), then 2 of the 3.
    ("p1", "u1", "i1", "purchase", day(1), 3),
    ("p2", "u1", "i1", "purchase", day(3), 2),
    ("r1", "u1", "i1", "return", day(4), 4),
    # u1/i2: a return before the purchase undoes something bought before the data: nothing here.
    ("r2", "u1", "i2", "return", day(1), 1),
    ("p3", "u1", "i2", "purchase", day(2), 2),
    # u2/i1: no quantity is one unit, returned in full: gone.
    ("p4", "u2", "i1", "purchase", day(1), None),
    ("r3", "u2", "i1", "return", day(2), 1),
    # u3/i1: more returned than bought in the data: the purchase goes, nothing goes negative.
    ("p5", "u3", "i1", "purchase", day(1), 5),
    ("r4", "u3", "i1", "return", day(2), 10),
    # Anonymous lines are not matched to each other: no customer to net.
    ("p6", None, "i1", "purchase", day(1), 2),
    ("r5", None, "i1", "return", day(2), 2),
    ("v1", "u1", "i1", "view", day(1), None),
]


def test_returns_take_the_latest_eligible_purchases_first(spark):
    netted = net_of_returns(spark.createDataFrame(ROWS, SCHEMA))
    expected = spark.createDataFrame([
        ("p1", "u1", "i1", "purchase", day(1), 1),
        ("r1", "u1", "i1", "return", day(4), 4),
        ("r2", "u1", "i2", "return", day(1), 1),
        ("p3", "u1", "i2", "purchase", day(2), 2),
        ("r3", "u2", "i1", "return", day(2), 1),
        ("r4", "u3", "i1", "return", day(2), 10),
        ("p6", None, "i1", "purchase", day(1), 2),
        ("r5", None, "i1", "return", day(2), 2),
        ("v1", "u1", "i1", "view", day(1), None),
    ], SCHEMA)
    assert_df_equality(netted, expected, ignore_row_order=True, ignore_nullable=True)


def test_without_returns_and_on_empty_input_nothing_changes(spark):
    kept = [r for r in ROWS if r[3] != "return"]
    events = spark.createDataFrame(kept, SCHEMA)
    assert_df_equality(net_of_returns(events), events, ignore_row_order=True, ignore_nullable=True)
    empty = spark.createDataFrame([], SCHEMA)
    assert net_of_returns(empty).isEmpty()
