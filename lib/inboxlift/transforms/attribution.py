"""What each email did, one row per recipient: delivery, human opens and clicks, attributed orders.

All steps are Spark built-ins over whole tables (README "Results and experiments"). The rules:

- **recipients**: the plan rows of every campaign day that sent something (treated *and* holdout
  users), merged with that day's sent outbox messages by (campaign, day, user), so a message whose
  plan row was replaced after it left still counts;
- **delivery**: ``is_sent`` (the relay answered about the recipient: accepted or bounced),
  ``is_bounced`` (a 5xx or a later DSN), ``is_delivered`` (accepted, never bounced);
- **engagement**, per message: human opens (a click counts as an open; opens the tracking service
  flagged ``is_machine_open`` do not), human clicks, unsubscribes, complaints — all by the
  ``message_id`` the event carries; the touch is the recipient's, whoever's browser fired it;
- :func:`orders_of`: purchase lines grouped into orders (``order_id``, else the event alone);
- **last touch across campaigns**: an order is credited to one message: of the human clicks in the
  ``click_through_days`` before it, the latest; with none, of the human opens in the
  ``view_through_days`` before it, the latest (a click is stronger evidence than an open, so any
  qualifying click beats a later open). Ties break by message id;
- **uplift windows**: every recipient's orders within ``uplift_window_days`` of the planned send
  time, whether a message touched them or not: the same measure for treated and holdout users,
  which is what the holdout uplift compares.

How :func:`recipient_outcomes` runs it: the large inputs are shuffled twice, once by message and
once by user, and no join or aggregation after that moves rows again.

1. **Per message** (partitioned by ``message_id``): the sent outbox rows, their delivery attempts
   and the events that name them, in one window per message. The outbox row gets the message's
   delivery and engagement flags (as the bits of one int, for narrower rows through the next
   exchange and sort); each human touch gets its recipient (user, campaign, day).
2. **Per user** (partitioned by ``user_id``): the plan rows, the message rows, the touches and the
   user's orders, sorted once by (campaign, day, kind), and one window per user over that order. A
   recipient's touches, plan row and message row are neighbours, so the message row takes its plan
   row's values by a running ``last`` and the plan row stands alone only when no message row
   follows it (``lead``): the full join of plan and outbox without a join or a group by. The same
   window collects the user's orders and touches as two lists (whole-partition frames, computed
   once per user; empty for most users), and each recipient row then counts, with higher-order
   functions on those short lists, the orders of its uplift window and the orders whose credited
   touch (:func:`_credit`: the latest click at or before the order, else the latest open) belongs to
   its campaign day.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.campaigns.definitions import HOLDOUT
from inboxlift.delivery.outbox import STATUS_SENT as SENT_STATUS
from inboxlift.schemas import require_columns

# Event property flags the tracking service writes (lib/inboxlift/service/app.py).
MACHINE_OPEN, MACHINE_CLICK = "is_machine_open", "is_machine_click"

RECIPIENT_COLUMNS = ["campaign_id", "variant", "send_date", "user_id", "message_id", "send_at", "is_treated"]


# Row kinds of the two timelines. Touches sort before orders at the same instant: a touch at the
# order's instant counts (the window is [touch, touch + days)).
_CLICK, _OPEN, _ORDER, _PLAN, _MESSAGE, _ATTEMPT, _UNSUBSCRIBE, _COMPLAINT = range(8)
_WHOLE = (Window.unboundedPreceding, Window.unboundedFollowing)


def _micros(days: float) -> int:
    return int(round(float(days) * 86400 * 1_000_000))


def _is_flagged(name: str) -> Column:
    """Whether the event's property ``name`` says "true", in any case ("True", "TRUE", ...).

    ASCII case folding by ``translate``, not ``lower``: the first ``lower`` in a JVM starts Spark 4's
    collation-aware case mapping (ICU), a cost every fresh ``run report`` JVM would pay (measured in
    bench/README.md). No non-ASCII letter lower-cases to t, r, u or e, so both agree on every value.
    """
    value = F.element_at(F.col("properties"), F.lit(name))
    return F.coalesce(F.translate(value, "TRUE", "true") == F.lit("true"), F.lit(False))


def _touch_kind() -> Column:
    """``_CLICK`` / ``_OPEN`` for a human click / open event, else null."""
    return (F.when((F.col("event_type") == "email_click") & ~_is_flagged(MACHINE_CLICK), F.lit(_CLICK))
            .when((F.col("event_type") == "email_open") & ~_is_flagged(MACHINE_OPEN), F.lit(_OPEN)))


def human_touches(events: DataFrame) -> DataFrame:
    """``message_id, event_type, event_ts``: human opens and clicks that name a message."""
    require_columns(events, ["event_type", "event_ts", "message_id", "properties"], step="human_touches")
    return (events.where(F.col("message_id").isNotNull() & _touch_kind().isNotNull())
            .select("message_id", "event_type", "event_ts"))


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


def _order_rows(orders: DataFrame) -> DataFrame:
    """Orders as timeline rows; an order without a time can be neither credited nor windowed."""
    return orders.where(F.col("order_ts").isNotNull()).select(
        "user_id", F.lit(_ORDER).alias("kind"), F.col("order_ts").alias("ts"), "revenue")


_TOUCH = "struct<t:bigint,is_click:boolean,message_id:string,campaign_id:string,plan_date:date>"


def _touch_struct() -> Column:
    """A touch row as an element of a user's touches (``_TOUCH``)."""
    return F.struct(F.col("t").cast("bigint").alias("t"), (F.col("kind") == _CLICK).alias("is_click"),
                    F.col("message_id").cast("string").alias("message_id"),
                    F.col("campaign_id").cast("string").alias("campaign_id"),
                    F.col("plan_date").cast("date").alias("plan_date"))


def _credit(order: Column, touches: Column, *, click_through_days: float, view_through_days: float) -> Column:
    """The touch (``_TOUCH``) an ``order`` (a struct with ``t``, its time in microseconds) is
    credited to, of its user's ``touches``; null if none qualifies.

    The latest click at or before the order (the smaller message id on a tie) if the order falls in
    its window, else the latest open likewise: with one window length per kind, the latest touch of
    a kind qualifies if any of that kind does.
    """
    def latest(is_click: bool) -> Column:
        def better(best: Column, x: Column) -> Column:
            counts = (x["is_click"] == F.lit(is_click)) & (x["t"] <= order["t"])
            is_tie = (x["t"] == best["t"]) & (x["message_id"] < best["message_id"])
            wins = best.isNull() | (x["t"] > best["t"]) | is_tie
            return F.when(counts & wins, x).otherwise(best)
        return F.aggregate(touches, F.lit(None).cast(_TOUCH), better)

    click, view = latest(True), latest(False)
    return (F.when(click.isNotNull() & (order["t"] < click["t"] + F.lit(_micros(click_through_days))), click)
            .when(view.isNotNull() & (order["t"] < view["t"] + F.lit(_micros(view_through_days))), view))


def attribute_orders(orders: DataFrame, touches: DataFrame, messages: DataFrame, *, click_through_days: float,
                     view_through_days: float) -> DataFrame:
    """``message_id, attributed_orders, attributed_revenue``: last touch across campaigns (module
    docstring), on its own; :func:`recipient_outcomes` applies the same rule (:func:`_credit`).

    ``touches`` are :func:`human_touches`; ``messages`` maps ``message_id`` to its recipient
    ``user_id`` (the touch is the recipient's, whoever's browser fired it).
    """
    require_columns(orders, ["user_id", "order_key", "order_ts", "revenue"], step="attribute_orders")
    # messages is keyed by message_id: one user per touch.
    owned = (touches.join(messages.select("message_id", "user_id"), "message_id", how="inner")
             .where(F.col("event_ts").isNotNull())
             .select("user_id", "message_id", _touch_kind_of_type().alias("kind"),
                     F.unix_micros("event_ts").alias("t"), F.lit(None).cast("string").alias("campaign_id"),
                     F.lit(None).cast("date").alias("plan_date")))
    per_user = owned.groupBy("user_id").agg(F.collect_list(_touch_struct()).alias("touches"))
    timed = orders.where(F.col("order_ts").isNotNull()).select(
        "user_id", "revenue", F.struct(F.unix_micros("order_ts").alias("t")).alias("order"))
    # per_user is grouped by user_id: one row per order.
    credited = timed.join(per_user, "user_id", how="inner").select(
        "revenue", _credit(F.col("order"), F.col("touches"), click_through_days=click_through_days,
                           view_through_days=view_through_days).alias("credit"))
    return (credited.where(F.col("credit").isNotNull())
            .groupBy(F.col("credit.message_id").alias("message_id"))
            .agg(F.count("*").cast("int").alias("attributed_orders"), F.sum("revenue").alias("attributed_revenue")))


def _touch_kind_of_type() -> Column:
    """The kind of a :func:`human_touches` row (already known to be human)."""
    return F.when(F.col("event_type") == "email_click", F.lit(_CLICK)).otherwise(F.lit(_OPEN))


def _message_rows(outbox: DataFrame, deliveries: DataFrame, events: DataFrame) -> DataFrame:
    """Step 1 (module docstring): one ``_MESSAGE`` row per sent message with its delivery and
    engagement flags, and one ``_CLICK`` / ``_OPEN`` row per timed human touch of a sent message,
    carrying the message's user, campaign and day."""
    require_columns(outbox, ["message_id", "campaign_id", "plan_date", "user_id", "variant", "status", "send_at"],
                    step="recipient_outcomes")
    require_columns(deliveries, ["message_id", "state"], step="recipient_outcomes")
    require_columns(events, ["event_type", "event_ts", "message_id", "properties"], step="recipient_outcomes")
    sent = outbox.where(F.col("status") == SENT_STATUS).select(
        "message_id", F.lit(_MESSAGE).alias("kind"), "user_id", "campaign_id", "plan_date", "variant",
        F.col("send_at").alias("ts"))
    attempts = deliveries.select("message_id", F.lit(_ATTEMPT).alias("kind"), "state")
    kind = (F.coalesce(_touch_kind(), F.when(F.col("event_type") == "unsubscribe", F.lit(_UNSUBSCRIBE))
                       .when(F.col("event_type") == "complaint", F.lit(_COMPLAINT))))
    named = (events.where(F.col("message_id").isNotNull()
                          & F.col("event_type").isin("email_click", "email_open", "unsubscribe", "complaint"))
             .select("message_id", kind.alias("kind"), F.col("event_ts").alias("ts"))
             .where(F.col("kind").isNotNull()))
    rows = sent.unionByName(attempts, allowMissingColumns=True).unionByName(named, allowMissingColumns=True)

    message = Window.partitionBy("message_id").rowsBetween(*_WHOLE)
    of_message = lambda column: F.max(F.when(F.col("kind") == _MESSAGE, F.col(column))).over(message)  # noqa: E731
    of_kind = lambda kinds: F.col("kind").isin(*kinds)  # noqa: E731
    is_event = of_kind([_CLICK, _OPEN, _UNSUBSCRIBE, _COMPLAINT])
    accepted = F.max(F.when(of_kind([_ATTEMPT]), F.col("state") == F.lit("sent"))).over(message)
    bounced = F.max(F.when(of_kind([_ATTEMPT]), F.col("state") == F.lit("bounced"))).over(message)
    clicks = F.count(F.when(of_kind([_CLICK]), F.lit(1))).over(message)
    flags = {
        "is_sent": accepted | bounced, "is_bounced": bounced, "is_delivered": accepted & ~bounced,
        "is_opened": F.max(F.when(is_event, of_kind([_CLICK, _OPEN]))).over(message), "is_clicked": clicks > 0,
        "is_unsubscribed": F.max(F.when(is_event, of_kind([_UNSUBSCRIBE]))).over(message),
        "is_complained": F.max(F.when(is_event, of_kind([_COMPLAINT]))).over(message),
    }
    # outbox is keyed by message_id: one _MESSAGE row per message, the others take its values.
    flagged = rows.select(
        "message_id", "kind", "ts",
        of_message("user_id").alias("user_id"), of_message("campaign_id").alias("campaign_id"),
        of_message("plan_date").alias("plan_date"),
        F.when(of_kind([_MESSAGE]), F.col("variant")).alias("variant"),
        F.max(of_kind([_MESSAGE])).over(message).alias("_is_sent_message"),
        # The flags travel to the per-user step as one int (narrower rows through its exchange and sort).
        F.when(of_kind([_MESSAGE]), _packed(flags)).alias("outcome"),
        F.when(of_kind([_MESSAGE]), clicks.cast("int")).alias("clicks"))
    is_timed_touch = of_kind([_CLICK, _OPEN]) & F.col("ts").isNotNull()
    return flagged.where(F.col("_is_sent_message") & (of_kind([_MESSAGE]) | is_timed_touch)).drop("_is_sent_message")


def _packed(flags: dict[str, Column]) -> Column:
    """The ``_FLAGS`` as the bits of one int (a null flag is a clear bit); :func:`_unpacked` reads one."""
    bits = [F.when(F.coalesce(flags[name], F.lit(False)), F.lit(1 << i)).otherwise(F.lit(0))
            for i, name in enumerate(_FLAGS)]
    return sum(bits[1:], bits[0])


def _unpacked(packed: Column, name: str) -> Column:
    return packed.bitwiseAND(F.lit(1 << _FLAGS.index(name))) != F.lit(0)


def _plan_rows(plan: DataFrame, outbox: DataFrame) -> DataFrame:
    """The plan rows of the campaign days with a sent message, as per-user timeline rows."""
    require_columns(plan, ["campaign_id", "plan_date", "user_id", "variant", "send_at"], step="recipient_outcomes")
    # A few rows per campaign and day: broadcast, so the plan is filtered where it is read.
    days = outbox.where(F.col("status") == SENT_STATUS).select("campaign_id", "plan_date").distinct()
    return plan.join(F.broadcast(days), ["campaign_id", "plan_date"], how="left_semi").select(
        "user_id", F.lit(_PLAN).alias("kind"), "campaign_id", "plan_date", "variant", F.col("send_at").alias("ts"))


def recipient_outcomes(plan: DataFrame, outbox: DataFrame, deliveries: DataFrame, events: DataFrame, *,
                       click_through_days: float, view_through_days: float, uplift_window_days: float) -> DataFrame:
    """One row per recipient (campaign, campaign day, user of a day with at least one sent message)
    with every outcome the report counts (``OUTCOME_COLUMNS``); how, in the module docstring.

    ``send_date`` is the campaign day (``plan_date``), so holdout users and their treated peers
    share one; ``send_at`` is the planned send time (the outbox's when the plan row is gone);
    ``message_id`` is null for holdout users and for treated users whose message never left.
    """
    require_columns(events, ["event_id", "user_id", "event_type", "event_ts", "order_id", "quantity", "price"],
                    step="recipient_outcomes")
    rows = (_plan_rows(plan, outbox)
            .unionByName(_message_rows(outbox, deliveries, events), allowMissingColumns=True)
            .unionByName(_order_rows(orders_of(events)), allowMissingColumns=True)
            .select("user_id", "kind", "campaign_id", "plan_date", "variant", F.unix_micros("ts").alias("t"),
                    "message_id", "outcome", "clicks", "revenue"))
    # One sort: a user's rows by recipient (campaign, day), the recipient's touches, then its plan
    # row, then its message row; the user's orders (no campaign) first, by time and revenue (orders
    # equal in both add up the same in any order, so the sums are the same run to run). The plan and
    # the outbox have one row per (campaign, day, user) (message ids are made from that key), so a
    # message row directly follows its plan row when there is one.
    ordered = Window.partitionBy("user_id").orderBy("campaign_id", "plan_date", "kind", "message_id", "t", "revenue")
    whole = ordered.rowsBetween(*_WHOLE)
    upto = ordered.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    key = ["campaign_id", "plan_date"]
    is_recipient = F.col("kind").isin(_PLAN, _MESSAGE)
    same_key_next = F.lit(True)
    for column in key:
        same_key_next = same_key_next & F.lead(column).over(ordered).eqNullSafe(F.col(column))
    # The last plan or message row of a recipient stands for it; the plan row's values ride along.
    is_last_of_recipient = is_recipient & ~F.coalesce(F.lead("kind").over(ordered).isin(_PLAN, _MESSAGE)
                                                       & same_key_next, F.lit(False))
    plan_row = F.last(F.when(F.col("kind") == _PLAN, F.struct(*key, "variant", "t")), ignorenulls=True).over(upto)
    is_touch = F.col("kind").isin(_CLICK, _OPEN)
    is_order = F.col("kind") == _ORDER
    # Whole-partition frames are computed once per user; most users have neither orders nor touches.
    user_orders = F.collect_list(F.when(is_order & F.col("t").isNotNull(), F.struct("t", "revenue"))).over(whole)
    user_touches = F.collect_list(F.when(is_touch, _touch_struct())).over(whole)
    recipients = rows.select(
        "*", is_last_of_recipient.alias("_is_recipient"), plan_row.alias("_plan"),
        user_orders.alias("_orders"), user_touches.alias("_touches")).where(F.col("_is_recipient"))

    is_message = F.col("kind") == _MESSAGE
    has_plan = F.col("_plan").isNotNull() & F.col("_plan.campaign_id").eqNullSafe(F.col("campaign_id")) \
        & F.col("_plan.plan_date").eqNullSafe(F.col("plan_date"))
    plan_value = lambda field: F.when(has_plan, F.col(f"_plan.{field}"))  # noqa: E731
    variant = F.when(is_message, F.coalesce(F.col("variant"), plan_value("variant"))).otherwise(F.col("variant"))
    send_t = F.when(is_message, F.coalesce(plan_value("t"), F.col("t"))).otherwise(F.col("t"))
    has_orders = F.size("_orders") > 0   # collect_list gives an empty list, never null
    # The recipient's orders in its uplift window, and those credited to its message.
    in_window = F.filter("_orders", lambda o: (o["t"] >= F.col("_send_t"))
                         & (o["t"] < F.col("_send_t") + F.lit(_micros(uplift_window_days))))
    recipient = F.struct(F.col("campaign_id").cast("string").alias("campaign_id"),
                         F.col("plan_date").cast("date").alias("plan_date"))
    credited = F.filter("_orders", lambda o: F.coalesce(
        _credit(o, F.col("_touches"), click_through_days=click_through_days, view_through_days=view_through_days)
        .dropFields("t", "is_click", "message_id") == recipient, F.lit(False)))
    revenue_of = lambda orders: F.aggregate(orders, F.lit(0.0), lambda acc, o: acc + o["revenue"])  # noqa: E731
    with_orders = recipients.select(
        "*", send_t.alias("_send_t"), variant.alias("_variant")).select(
        "*",
        F.when(has_orders & F.col("_send_t").isNotNull(), in_window).alias("_window"),
        F.when(has_orders & is_message, credited).alias("_credited"))
    false = F.lit(False)
    # size(null) is -1 or null depending on the session's settings: not asked.
    size_of = lambda column: F.when(F.col(column).isNotNull(), F.size(column))  # noqa: E731
    message_only = lambda column: F.when(is_message, F.col(column))  # noqa: E731
    return with_orders.select(
        "campaign_id", F.col("_variant").alias("variant"), F.col("plan_date").alias("send_date"), "user_id",
        message_only("message_id").alias("message_id"), F.timestamp_micros("_send_t").alias("send_at"),
        (F.col("_variant") != F.lit(HOLDOUT)).alias("is_treated"),
        *[F.coalesce(F.when(is_message, _unpacked(F.col("outcome"), c)), false).alias(c) for c in _FLAGS],
        F.coalesce(message_only("clicks"), F.lit(0)).alias("clicks"),
        F.coalesce(size_of("_credited"), F.lit(0)).cast("int").alias("attributed_orders"),
        F.coalesce(revenue_of(F.col("_credited")), F.lit(0.0)).alias("attributed_revenue"),
        F.coalesce(size_of("_window"), F.lit(0)).cast("int").alias("window_orders"),
        F.coalesce(revenue_of(F.col("_window")), F.lit(0.0)).alias("window_revenue"))


_FLAGS = ["is_sent", "is_bounced", "is_delivered", "is_opened", "is_clicked", "is_unsubscribed", "is_complained"]
OUTCOME_COLUMNS = [*RECIPIENT_COLUMNS, *_FLAGS, "clicks", "attributed_orders", "attributed_revenue",
                   "window_orders", "window_revenue"]
