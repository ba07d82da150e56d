"""Hand-built plan, outbox, deliveries and events for the report tests, with the counts they must give.

Two campaigns, all windows closed by the clock (2026-11-20 12:00 UTC); attribution 3 days click-through,
1 day view-through, uplift window 3 days:

- ``wb`` (variants A/B, holdout), campaign day 2026-11-10, sends at 10:00:
  - u1 (A, m1): human click 11-10 11:00, order o1 11-12 09:00 (2 x 10.00) -> click-through, m1;
  - u2 (A, m2): deferred then sent; click 11-10 12:00, order o2 11-14 09:00: outside both the click
    window (ends 11-13 12:00) and the uplift window (ends 11-13 10:00); unsubscribes from m2;
  - u3 (B, m3): human open 11-10 10:30, order o3 11-11 09:00 (30.00) -> view-through, m3; complains;
  - u4 (B, m4): only a machine open (Apple's proxy), order o4 11-10 20:00 (15.00): credited to no
    message, yet inside u4's uplift window;
  - u5 (B, m5): bounced (5xx);
  - u8 (A, m8): click 11-10 10:30, an open 11-11 12:00 — and see ``cs``;
  - u10 (A, m10): failed before the relay (invalid address): a recipient, never sent;
  - u6 (holdout): order 11-11 10:00 (40.00), inside the window; u7 (holdout): order 11-14, outside;
  - a machine click (a link scanner) on m1 counts neither as a click nor as an open.
- ``cs`` (variant A, holdout), campaign day 2026-11-11, sends at 09:00:
  - u8 (A, m9): click 11-11 09:30; order o8 11-11 18:00 (50.00). Two campaigns touched it: wb's click
    at 11-10 10:30 and open at 11-11 12:00, cs's click at 09:30. Clicks beat opens, the latest click
    wins: cs (m9). The order is inside both campaigns' uplift windows.
  - u9 (holdout): no order.
- u11 has an order but no email: it counts nowhere.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from pyspark.sql import SparkSession

from inboxlift.storage import Lake

CAMPAIGNS_YAML = """
campaigns:
  wb:
    type: win_back
    template: win_back
    subjects: {A: {en: "a"}, B: {en: "b"}}
    split: {A: 0.5, B: 0.5}
    holdout: 0.2
    experiment: {horizon_days: 1}
  cs:
    type: cross_sell
    template: cross_sell
    subjects: {A: {en: "a"}}
    split: {A: 1.0}
    holdout: 0.1
"""


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


D10, D11 = dt.date(2026, 11, 10), dt.date(2026, 11, 11)
WB_AT, CS_AT = ts("2026-11-10T10:00:00"), ts("2026-11-11T09:00:00")

PLAN = [  # campaign_id, plan_date, user_id, variant, send_at
    ("wb", D10, "u1", "A", WB_AT), ("wb", D10, "u2", "A", WB_AT), ("wb", D10, "u3", "B", WB_AT),
    ("wb", D10, "u4", "B", WB_AT), ("wb", D10, "u5", "B", WB_AT), ("wb", D10, "u6", "holdout", WB_AT),
    ("wb", D10, "u7", "holdout", WB_AT), ("wb", D10, "u8", "A", WB_AT), ("wb", D10, "u10", "A", WB_AT),
    ("cs", D11, "u8", "A", CS_AT), ("cs", D11, "u9", "holdout", CS_AT),
]
OUTBOX = [  # message_id, campaign_id, plan_date, user_id, variant, status, send_at
    ("m1", "wb", D10, "u1", "A", "sent", WB_AT), ("m2", "wb", D10, "u2", "A", "sent", WB_AT),
    ("m3", "wb", D10, "u3", "B", "sent", WB_AT), ("m4", "wb", D10, "u4", "B", "sent", WB_AT),
    ("m5", "wb", D10, "u5", "B", "sent", WB_AT), ("m8", "wb", D10, "u8", "A", "sent", WB_AT),
    ("m10", "wb", D10, "u10", "A", "rendered", WB_AT), ("m9", "cs", D11, "u8", "A", "sent", CS_AT),
]
DELIVERIES = [  # message_id, attempt, state, attempted_at
    ("m1", 1, "sent", ts("2026-11-10T10:00:05")), ("m2", 1, "deferred", ts("2026-11-10T10:00:05")),
    ("m2", 2, "sent", ts("2026-11-10T10:20:00")), ("m3", 1, "sent", ts("2026-11-10T10:00:06")),
    ("m4", 1, "sent", ts("2026-11-10T10:00:06")), ("m5", 1, "bounced", ts("2026-11-10T10:00:07")),
    ("m8", 1, "sent", ts("2026-11-10T10:00:07")), ("m10", 1, "failed", ts("2026-11-10T10:00:07")),
    ("m9", 1, "sent", ts("2026-11-11T09:00:03")),
]
HUMAN = {"is_machine_open": "false"}
EVENTS = [  # event_id, user_id, event_type, event_ts, order_id, quantity, price, message_id, properties
    ("e1", "u1", "email_click", ts("2026-11-10T11:00:00"), None, None, None, "m1", {"is_machine_click": "false"}),
    ("e1m", "u1", "email_click", ts("2026-11-10T10:00:09"), None, None, None, "m1", {"is_machine_click": "true"}),
    ("e2", "u1", "purchase", ts("2026-11-12T09:00:00"), "o1", 2, Decimal("10.00"), None, None),
    ("e3", "u2", "email_click", ts("2026-11-10T12:00:00"), None, None, None, "m2", None),
    ("e4", "u2", "purchase", ts("2026-11-14T09:00:00"), "o2", 1, Decimal("99.00"), None, None),
    ("e5", "u2", "unsubscribe", ts("2026-11-10T12:05:00"), None, None, None, "m2", None),
    ("e6", "u3", "email_open", ts("2026-11-10T10:30:00"), None, None, None, "m3", HUMAN),
    ("e7", "u3", "purchase", ts("2026-11-11T09:00:00"), "o3", 1, Decimal("30.00"), None, None),
    ("e8", "u3", "complaint", ts("2026-11-10T13:00:00"), None, None, None, "m3", None),
    ("e9", "u4", "email_open", ts("2026-11-10T10:00:10"), None, None, None, "m4", {"is_machine_open": "true"}),
    ("e10", "u4", "purchase", ts("2026-11-10T20:00:00"), "o4", 1, Decimal("15.00"), None, None),
    ("e11", "u6", "purchase", ts("2026-11-11T10:00:00"), "o6", 1, Decimal("40.00"), None, None),
    ("e12", "u7", "purchase", ts("2026-11-14T10:00:00"), "o7", 1, Decimal("25.00"), None, None),
    ("e13", "u8", "email_click", ts("2026-11-10T10:30:00"), None, None, None, "m8", None),
    ("e14", "u8", "email_click", ts("2026-11-11T09:30:00"), None, None, None, "m9", None),
    ("e15", "u8", "email_open", ts("2026-11-11T12:00:00"), None, None, None, "m8", HUMAN),
    # One order of two lines: 20.00 + 30.00.
    ("e16", "u8", "purchase", ts("2026-11-11T18:00:00"), "o8", 1, Decimal("20.00"), None, None),
    ("e17", "u8", "purchase", ts("2026-11-11T18:00:01"), "o8", 1, Decimal("30.00"), None, None),
    ("e18", "u11", "purchase", ts("2026-11-11T18:00:00"), "o11", 1, Decimal("5.00"), None, None),
]

# campaign, variant, day -> the counts of campaign_results, worked out by hand from the story above.
_KEYS = ["recipients", "sent", "delivered", "bounced", "opens", "clicks", "unique_clicks", "conversions", "orders",
         "revenue", "unsubscribes", "complaints", "window_conversions", "window_orders", "window_revenue"]
EXPECTED = {
    ("wb", "A", D10): dict(zip(_KEYS, [4, 3, 3, 0, 3, 3, 3, 1, 1, 20.0, 1, 0, 2, 2, 70.0])),
    ("wb", "B", D10): dict(zip(_KEYS, [3, 3, 2, 1, 1, 0, 0, 1, 1, 30.0, 0, 1, 2, 2, 45.0])),
    ("wb", "holdout", D10): dict(zip(_KEYS, [2, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, 1, 1, 40.0])),
    ("cs", "A", D11): dict(zip(_KEYS, [1, 1, 1, 0, 1, 1, 1, 1, 1, 50.0, 0, 0, 1, 1, 50.0])),
    ("cs", "holdout", D11): dict(zip(_KEYS, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0.0])),
}


def write_tables(spark: SparkSession, lake: Lake, *, plan: list = PLAN, outbox: list = OUTBOX,
                 deliveries: list = DELIVERIES, events: list = EVENTS) -> None:
    """The four input tables (by default the story above), with only the columns the report reads."""
    lake.append("campaign_plan", spark.createDataFrame(
        plan, "campaign_id string, plan_date date, user_id string, variant string, send_at timestamp"))
    lake.append("outbox", spark.createDataFrame(
        outbox, "message_id string, campaign_id string, plan_date date, user_id string, variant string, "
                "status string, send_at timestamp"))
    lake.append("deliveries", spark.createDataFrame(
        deliveries, "message_id string, attempt int, state string, attempted_at timestamp"))
    lake.append("events", spark.createDataFrame(
        events, "event_id string, user_id string, event_type string, event_ts timestamp, order_id string, "
                "quantity int, price decimal(12,2), message_id string, properties map<string,string>"))
