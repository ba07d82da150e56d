"""Per-user event aggregates: activity over windows, orders (RFM's raw values), email engagement.

Distinct counts (sessions, orders, emails) are counted as groups, not with ``count(distinct)``: events
are first grouped by (user, kind, key) — a session, an order, an email message — and then by user.
Counting "sessions in the last 7 days" is then "session groups whose last event is in the window",
and one pass serves every window; Spark's own plan for several ``count(distinct ...)`` would copy
each event once per distinct expression.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import FeatureSettings
from inboxlift.transforms.features_common import (
    ACTIVITY_TYPES, ADD_TO_CART, BOUNCE, EMAIL_CLICK, EMAIL_OPEN, EMAIL_TYPES, EVENT_ID, EVENT_TS, EVENT_TYPE,
    MESSAGE_ID, ORDER_ID, PRICE, PURCHASE, QUANTITY, REVIEW, SESSION_ID, UNSUBSCRIBE, USER_ID, VIEW,
    count_if, filter_events_as_of, require_columns, window_start, window_suffix,
)

ACTIVITY_INPUT = [EVENT_ID, USER_ID, EVENT_TYPE, EVENT_TS, SESSION_ID, ORDER_ID, MESSAGE_ID, QUANTITY, PRICE]
# The per-window event counts: output name -> event type.
WINDOW_COUNTS = {"views": VIEW, "carts": ADD_TO_CART, "purchases": PURCHASE}
MONEY = "decimal(18,2)"


def activity_columns(windows: list[int]) -> list[str]:
    """The output columns of :func:`aggregate_user_activity` for these windows."""
    per_window = [f"{name}{window_suffix(d)}" for d in windows for name in [*WINDOW_COUNTS, "sessions"]]
    return [
        USER_ID, "first_event_ts", "last_activity_ts", *per_window,
        "orders", "monetary", "first_order_ts", "last_order_ts", "last_purchase_ts", "reviews_written",
        "emails_delivered", "emails_opened", "emails_clicked", "last_open_ts", "last_click_ts",
        "is_unsubscribed", "is_bounced",
    ]


# Event types the aggregation tells apart, as small codes: the per-group conditions compare bytes,
# not strings, on every row (and the shuffle carries one byte instead of the type's name).
TYPE_CODES = {VIEW: 1, ADD_TO_CART: 2, PURCHASE: 3, REVIEW: 4, EMAIL_OPEN: 5, EMAIL_CLICK: 6, UNSUBSCRIBE: 7,
              BOUNCE: 8}
# Group kinds, also as codes.
SESSION, ORDER, MESSAGE = 0, 1, 2


def _type_code() -> Column:
    code = F.lit(0)
    for name, value in TYPE_CODES.items():
        code = F.when(F.col(EVENT_TYPE) == name, F.lit(value)).otherwise(code)
    return code.cast("tinyint")


def _event_groups() -> Column:
    """The groups an event belongs to: one *home* group where it is counted, plus, for a purchase, its session.

    Home: an email event's message, a purchase's order, any other event's session. A missing message
    or order id makes the event its own group (one email, one order); a missing session id puts the
    event in a null-keyed group that is counted but is not a session.
    """
    event_type = F.col(EVENT_TYPE)
    is_email, is_purchase = event_type.isin(*EMAIL_TYPES), event_type == PURCHASE
    home = F.struct(
        F.when(is_email, F.lit(MESSAGE)).when(is_purchase, F.lit(ORDER)).otherwise(F.lit(SESSION))
        .cast("tinyint").alias("kind"),
        F.when(is_email, F.coalesce(F.col(MESSAGE_ID), F.col(EVENT_ID)))
        .when(is_purchase, F.coalesce(F.col(ORDER_ID), F.col(EVENT_ID)))
        .otherwise(F.col(SESSION_ID)).alias("key"),
        F.lit(True).alias("is_home"),
    )
    # So that a session in which the user only bought still counts as a session in its window.
    purchase_session = F.struct(F.lit(SESSION).cast("tinyint").alias("kind"), F.col(SESSION_ID).alias("key"),
                                F.lit(False).alias("is_home"))
    return F.when(is_purchase & F.col(SESSION_ID).isNotNull(), F.array(home, purchase_session)).otherwise(F.array(home))


def aggregate_user_activity(events: DataFrame, *, as_of: dt.date, settings: FeatureSettings) -> DataFrame:
    """Events -> one row per user with any event before the cut-off.

    Returns the columns of :func:`activity_columns`: counts per window (``views_7d``...), orders and
    money spent (quantity x unit price, a missing quantity read as 1), email messages delivered /
    opened / clicked, and the timestamps the user features derive "days since" values from.
    """
    require_columns(events, ACTIVITY_INPUT, step="aggregate_user_activity")
    windows = settings.activity_windows_days
    line_value = F.when(F.col(EVENT_TYPE) == PURCHASE, F.coalesce(F.col(QUANTITY), F.lit(1)) * F.col(PRICE))
    grouped = (
        events.transform(filter_events_as_of, as_of=as_of)
        .select(USER_ID, EVENT_TS, _type_code().alias("type"), F.col(EVENT_TYPE).isin(*ACTIVITY_TYPES).alias("active"),
                line_value.alias("value"), F.explode(_event_groups()).alias("g"))
        .select(USER_ID, EVENT_TS, "type", "active", "value", "g.kind", "g.key", "g.is_home")
        # One shuffle of these narrow rows by user serves both aggregations below: (user, kind, key)
        # groups are then already clustered by user, so neither needs an exchange of its own. Without
        # it Spark shuffles the wide partial aggregates twice, and they barely shrink (most sessions
        # and messages have only a few events).
        .repartition(USER_ID)
    )
    home, ts, code = F.col("is_home"), F.col(EVENT_TS), F.col("type")

    def of_type(*names: str) -> Column:
        return home & code.isin(*[TYPE_CODES[n] for n in names])

    per_group = grouped.groupBy(USER_ID, "kind", "key").agg(
        F.min(ts).alias("first_ts"),
        F.max(ts).alias("last_ts"),
        F.min(F.when(home, ts)).alias("first_home_ts"),
        *[count_if(of_type(kind) & (ts >= window_start(as_of, d))).alias(f"{name}{window_suffix(d)}")
          for d in windows for name, kind in WINDOW_COUNTS.items()],
        F.sum(F.when(home, F.col("value"))).alias("value"),
        count_if(of_type(REVIEW)).alias("reviews"),
        count_if(of_type(EMAIL_OPEN, EMAIL_CLICK)).alias("opens"),
        count_if(of_type(EMAIL_CLICK)).alias("clicks"),
        F.max(F.when(of_type(EMAIL_OPEN, EMAIL_CLICK), ts)).alias("last_open_ts"),
        F.max(F.when(of_type(EMAIL_CLICK), ts)).alias("last_click_ts"),
        F.max(F.when(home & F.col("active"), ts)).alias("last_activity_ts"),
        count_if(of_type(UNSUBSCRIBE)).alias("unsubscribes"),
        count_if(of_type(BOUNCE)).alias("bounces"),
    )
    kind = F.col("kind")
    is_session, is_order, is_message = (kind == SESSION) & F.col("key").isNotNull(), kind == ORDER, kind == MESSAGE
    per_user = per_group.groupBy(USER_ID).agg(
        F.min("first_ts").alias("first_event_ts"),
        F.max("last_activity_ts").alias("last_activity_ts"),
        *[F.sum(f"{name}{window_suffix(d)}").cast("int").alias(f"{name}{window_suffix(d)}")
          for d in windows for name in WINDOW_COUNTS],
        *[count_if(is_session & (F.col("last_ts") >= window_start(as_of, d))).cast("int")
          .alias(f"sessions{window_suffix(d)}") for d in windows],
        count_if(is_order).cast("int").alias("orders"),
        F.coalesce(F.sum(F.when(is_order, F.col("value"))), F.lit(0)).cast(MONEY).alias("monetary"),
        # An order's time is its first line's.
        F.min(F.when(is_order, F.col("first_home_ts"))).alias("first_order_ts"),
        F.max(F.when(is_order, F.col("first_home_ts"))).alias("last_order_ts"),
        F.max(F.when(is_order, F.col("last_ts"))).alias("last_purchase_ts"),
        F.sum("reviews").cast("int").alias("reviews_written"),
        # An opened or clicked message was delivered even when its delivery event is missing.
        count_if(is_message).cast("int").alias("emails_delivered"),
        count_if(is_message & (F.col("opens") > 0)).cast("int").alias("emails_opened"),
        count_if(is_message & (F.col("clicks") > 0)).cast("int").alias("emails_clicked"),
        F.max("last_open_ts").alias("last_open_ts"),
        F.max("last_click_ts").alias("last_click_ts"),
        (F.sum("unsubscribes") > 0).alias("is_unsubscribed"),
        (F.sum("bounces") > 0).alias("is_bounced"),
    )
    return per_user.select(*activity_columns(windows))
