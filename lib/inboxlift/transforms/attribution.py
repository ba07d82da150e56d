"""What each email did, one row per recipient: delivery, human opens and clicks, attributed orders.

All steps are Spark built-ins over whole tables (README "Results and experiments"):

- :func:`recipients`: the plan rows of every campaign day that sent something (treated *and*
  holdout users), outer-joined with that day's outbox messages, so a message whose plan row was
  replaced after it left still counts;
- :func:`with_delivery`: ``is_sent`` (the relay answered about the recipient: accepted or
  bounced), ``is_bounced`` (a 5xx or a later DSN), ``is_delivered`` (accepted, never bounced);
- :func:`message_engagement`: per message, human opens (a click counts as an open; opens the
  tracking service flagged ``is_machine_open`` do not), human clicks, unsubscribes, complaints —
  all by the ``message_id`` the event carries;
- :func:`orders_of`: purchase lines grouped into orders (``order_id``, else the event alone);
- :func:`attribute_orders`: **last touch across campaigns**. An order is credited to one message:
  of the human clicks in the ``click_through_days`` before it, the latest; with none, of the human
  opens in the ``view_through_days`` before it, the latest (a click is stronger evidence than an
  open, so any qualifying click beats a later open). Ties break by message id;
- :func:`window_orders`: every recipient's orders within ``uplift_window_days`` of the planned
  send time, whether a message touched them or not: the same measure for treated and holdout
  users, which is what the holdout uplift compares.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import HOLDOUT
from inboxlift.transforms.features_common import require_columns

SENT_STATUS = "sent"
CLICK, VIEW = "click", "view"
# Event property flags the tracking service writes (lib/inboxlift/service/app.py).
MACHINE_OPEN, MACHINE_CLICK = "is_machine_open", "is_machine_click"

RECIPIENT_COLUMNS = ["campaign_id", "variant", "send_date", "user_id", "message_id", "send_at", "is_treated"]


def _seconds(days: float) -> Column:
    return F.make_dt_interval(F.lit(0), F.lit(0), F.lit(0), F.lit(float(days) * 86400.0))


def recipients(plan: DataFrame, outbox: DataFrame) -> DataFrame:
    """One row per (campaign, campaign day, user) of the days with at least one sent message.

    ``send_date`` is the campaign day (``plan_date``), so holdout users and their treated peers
    share one; ``send_at`` is the planned send time (the outbox's when the plan row is gone);
    ``message_id`` is null for holdout users and for treated users whose message never left.
    """
    require_columns(plan, ["campaign_id", "plan_date", "user_id", "variant", "send_at"], step="recipients")
    require_columns(outbox, ["message_id", "campaign_id", "plan_date", "user_id", "variant", "status", "send_at"],
                    step="recipients")
    sent = outbox.where(F.col("status") == SENT_STATUS)
    days = sent.select("campaign_id", "plan_date").distinct()
    planned = plan.join(days, ["campaign_id", "plan_date"], how="left_semi").select(
        "campaign_id", "plan_date", "user_id", F.col("variant").alias("plan_variant"),
        F.col("send_at").alias("plan_send_at"))
    # outbox is keyed by message_id, a hash of (campaign, user, day): one row per key below.
    messages = sent.select("campaign_id", "plan_date", "user_id", "message_id",
                           F.col("variant").alias("message_variant"), F.col("send_at").alias("message_send_at"))
    joined = planned.join(messages, ["campaign_id", "plan_date", "user_id"], how="full")
    variant = F.coalesce(F.col("message_variant"), F.col("plan_variant"))
    return joined.select(
        "campaign_id", variant.alias("variant"), F.col("plan_date").alias("send_date"), "user_id", "message_id",
        F.coalesce(F.col("plan_send_at"), F.col("message_send_at")).alias("send_at"),
        (variant != F.lit(HOLDOUT)).alias("is_treated"))


def delivery_outcomes(deliveries: DataFrame) -> DataFrame:
    """``message_id, is_sent, is_bounced, is_delivered, sent_at``: one row per message with attempts."""
    require_columns(deliveries, ["message_id", "state", "attempted_at"], step="delivery_outcomes")
    accepted = F.col("state") == F.lit("sent")
    bounced = F.col("state") == F.lit("bounced")
    per_message = deliveries.groupBy("message_id").agg(
        F.max(accepted).alias("_accepted"), F.max(bounced).alias("is_bounced"),
        F.min(F.when(accepted, F.col("attempted_at"))).alias("sent_at"))
    return per_message.select(
        "message_id", (F.col("_accepted") | F.col("is_bounced")).alias("is_sent"), "is_bounced",
        (F.col("_accepted") & ~F.col("is_bounced")).alias("is_delivered"), "sent_at")


def _is_flagged(name: str) -> Column:
    return F.coalesce(F.lower(F.element_at(F.col("properties"), F.lit(name))) == F.lit("true"), F.lit(False))


def human_touches(events: DataFrame) -> DataFrame:
    """``message_id, event_type, event_ts``: human opens and clicks that name a message."""
    require_columns(events, ["event_type", "event_ts", "message_id", "properties"], step="human_touches")
    is_open = (F.col("event_type") == "email_open") & ~_is_flagged(MACHINE_OPEN)
    is_click = (F.col("event_type") == "email_click") & ~_is_flagged(MACHINE_CLICK)
    return (events.where(F.col("message_id").isNotNull() & (is_open | is_click))
            .select("message_id", "event_type", "event_ts"))


def message_engagement(events: DataFrame) -> DataFrame:
    """``message_id, is_opened, clicks, is_clicked, is_unsubscribed, is_complained``, per message named by an event."""
    touches = human_touches(events).select("message_id", "event_type", F.lit(None).cast("string").alias("other"))
    others = (events.where(F.col("message_id").isNotNull() & F.col("event_type").isin("unsubscribe", "complaint"))
              .select("message_id", F.lit(None).cast("string").alias("event_type"), F.col("event_type").alias("other")))
    rows = touches.unionByName(others)
    clicks = F.count_if(F.col("event_type") == "email_click")
    return rows.groupBy("message_id").agg(
        (F.count(F.col("event_type")) > 0).alias("is_opened"),
        clicks.cast("int").alias("clicks"),
        (clicks > 0).alias("is_clicked"),
        F.max(F.col("other") == "unsubscribe").alias("is_unsubscribed"),
        F.max(F.col("other") == "complaint").alias("is_complained"))


def orders_of(events: DataFrame) -> DataFrame:
    """``user_id, order_key, order_ts, revenue``: purchase lines grouped by order (a line without an
    order id is an order of its own); revenue is quantity x price, a missing quantity read as 1."""
    require_columns(events, ["event_id", "user_id", "event_type", "event_ts", "order_id", "quantity", "price"],
                    step="orders_of")
    lines = events.where((F.col("event_type") == "purchase") & F.col("user_id").isNotNull())
    key = F.coalesce(F.concat(F.lit("o:"), F.col("order_id")), F.concat(F.lit("e:"), F.col("event_id")))
    value = F.coalesce(F.col("quantity"), F.lit(1)) * F.coalesce(F.col("price"), F.lit(0))
    return (lines.groupBy("user_id", key.alias("order_key"))
            .agg(F.min("event_ts").alias("order_ts"), F.sum(value).cast("double").alias("revenue")))


def attribute_orders(orders: DataFrame, touches: DataFrame, messages: DataFrame, *, click_through_days: float,
                     view_through_days: float) -> DataFrame:
    """``message_id, attributed_orders, attributed_revenue``: last touch across campaigns (module docstring).

    ``touches`` are :func:`human_touches`; ``messages`` maps ``message_id`` to its recipient
    ``user_id`` (the touch is the recipient's, whoever's browser fired it).
    """
    require_columns(orders, ["user_id", "order_key", "order_ts", "revenue"], step="attribute_orders")
    # messages is keyed by message_id: one user per touch.
    owned = touches.join(messages.select("message_id", "user_id"), "message_id", how="inner").select(
        "user_id", "message_id", F.col("event_ts").alias("touch_ts"),
        F.when(F.col("event_type") == "email_click", F.lit(CLICK)).otherwise(F.lit(VIEW)).alias("kind"))
    window = F.when(F.col("kind") == CLICK, _seconds(click_through_days)).otherwise(_seconds(view_through_days))
    candidates = (orders.join(owned, "user_id", how="inner")
                  .where((F.col("touch_ts") <= F.col("order_ts")) & (F.col("order_ts") < F.col("touch_ts") + window)))
    best_first = Window.partitionBy("user_id", "order_key").orderBy(
        (F.col("kind") == CLICK).desc(), F.col("touch_ts").desc(), F.col("message_id"))
    credited = (candidates.withColumn("_rank", F.row_number().over(best_first))
                .where(F.col("_rank") == 1))
    return credited.groupBy("message_id").agg(
        F.count("*").cast("int").alias("attributed_orders"),
        F.sum("revenue").alias("attributed_revenue"))


def window_orders(recipient_rows: DataFrame, orders: DataFrame, *, uplift_window_days: float) -> DataFrame:
    """``campaign_id, send_date, user_id, window_orders, window_revenue``: each recipient's orders in
    ``[send_at, send_at + uplift_window_days)``, touched by an email or not."""
    keys = recipient_rows.select("campaign_id", "send_date", "user_id", "send_at")
    inside = (keys.join(orders, "user_id", how="inner")
              .where((F.col("order_ts") >= F.col("send_at"))
                     & (F.col("order_ts") < F.col("send_at") + _seconds(uplift_window_days))))
    return inside.groupBy("campaign_id", "send_date", "user_id").agg(
        F.count("*").cast("int").alias("window_orders"), F.sum("revenue").alias("window_revenue"))


def recipient_outcomes(rows: DataFrame, deliveries: DataFrame, events: DataFrame, *, click_through_days: float,
                       view_through_days: float, uplift_window_days: float) -> DataFrame:
    """One row per recipient of ``rows`` (:func:`recipients`) with every outcome the report counts
    (``OUTCOME_COLUMNS``). ``rows`` is read three times: a caller persists it."""
    orders = orders_of(events)
    # rows is keyed by (campaign, day, user) and message ids are unique: one user per message.
    messages = rows.where(F.col("message_id").isNotNull()).select("message_id", "user_id")
    attributed = attribute_orders(orders, human_touches(events), messages, click_through_days=click_through_days,
                                  view_through_days=view_through_days)
    in_window = window_orders(rows, orders, uplift_window_days=uplift_window_days)
    # Each right-hand side is keyed by what it is joined on: no row multiplies.
    out = (rows
           .join(delivery_outcomes(deliveries), "message_id", how="left")
           .join(message_engagement(events), "message_id", how="left")
           .join(attributed, "message_id", how="left")
           .join(in_window, ["campaign_id", "send_date", "user_id"], how="left"))
    false = F.lit(False)
    return out.select(
        *RECIPIENT_COLUMNS,
        *[F.coalesce(F.col(c), false).alias(c) for c in ("is_sent", "is_bounced", "is_delivered", "is_opened",
                                                          "is_clicked", "is_unsubscribed", "is_complained")],
        F.coalesce(F.col("clicks"), F.lit(0)).alias("clicks"),
        F.coalesce(F.col("attributed_orders"), F.lit(0)).alias("attributed_orders"),
        F.coalesce(F.col("attributed_revenue"), F.lit(0.0)).alias("attributed_revenue"),
        F.coalesce(F.col("window_orders"), F.lit(0)).alias("window_orders"),
        F.coalesce(F.col("window_revenue"), F.lit(0.0)).alias("window_revenue"))


OUTCOME_COLUMNS = [*RECIPIENT_COLUMNS, "is_sent", "is_bounced", "is_delivered", "is_opened", "is_clicked",
                   "is_unsubscribed", "is_complained", "clicks", "attributed_orders", "attributed_revenue",
                   "window_orders", "window_revenue"]
