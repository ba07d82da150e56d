"""Events: browsing sessions (search -> view -> cart -> purchase -> review) and newsletter email.

Users explode into units (a session, or one newsletter sent to one user), units
into events, all with narrow transforms plus one broadcast join with the item
lookup: nothing is shuffled, so each output file holds the events of one slice
of users, in a fixed order.

Planted structure:

- sessions per user follow the user's log-normal activity, stop at a lapse;
- sessions start near the user's peak local hour, lean towards Sundays;
- items come from the user's taste-group pool (``TASTE_SHARE``) or the whole
  catalogue, at Zipf-distributed popularity ranks;
- each viewed item is carted with a probability that grows with engagement;
  some carts are emptied, and only sessions that check out buy (abandonment);
- newsletter opens depend on engagement, collapse after a lapse, and happen at
  the user's peak local hour (the send-time signal); bad addresses bounce once,
  unsubscribers get no more mail.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.generate import draws
from inboxlift.generate.catalog import CURRENCY, GLOBAL_POOL
from inboxlift.generate.text import SECONDS_PER_DAY, iso_utc, local_seconds, utc_seconds
from inboxlift.generate.vocab import LEAVES, REVIEW_PHRASES

# Share of sessions that browse the user's taste pool rather than the whole shop.
TASTE_SHARE = 0.8
ZIPF_EXPONENT = 1.1
MEAN_EXTRA_VIEWS = 2.5
MAX_VIEWS = 20
SEARCH_SHARE = 0.35
CHECKOUT_SHARE = 0.5
REMOVE_SHARE = 0.25
REVIEW_SHARE = 0.12
# Weight of each ISO weekday (Mon..Sun) relative to Sunday, the busiest day.
WEEKDAY_WEIGHTS = (0.85, 0.8, 0.8, 0.85, 0.8, 0.9, 1.0)
# The population's day, local hours 0..23, for sessions away from the user's peak.
DIURNAL_WEIGHTS = (0.3, 0.2, 0.15, 0.1, 0.1, 0.2, 0.5, 0.9, 1.2, 1.2, 1.1, 1.1,
                   1.3, 1.3, 1.1, 1.0, 1.0, 1.1, 1.3, 1.6, 1.8, 1.7, 1.3, 0.7)
# Newsletter: sent to everyone at once at this UTC hour, so open times carry the user's own rhythm.
NEWSLETTER_HOUR_UTC = 8
OPEN_AT_PEAK_SHARE = 0.7

# The event record inside the generator: EVENTS_LANDING's fields, typed, with the
# timestamp as epoch seconds (``ts``) until the line is written.
EVENT_TYPES_BY_FIELD: dict[str, str] = {
    "event_id": "string", "event_type": "string", "ts": "bigint", "user_id": "string", "item_id": "string",
    "session_id": "string", "order_id": "string", "quantity": "int", "price": "decimal(12,2)",
    "currency": "string", "query": "string", "rating": "int", "review_text": "string", "campaign_id": "string",
    "message_id": "string", "campaign_type": "string",
}
EVENT_FIELDS = list(EVENT_TYPES_BY_FIELD)


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    send_s: int


def newsletter_schedule(*, start_s: int, end_s: int, every_days: int) -> list[Campaign]:
    """The weekly (or every ``every_days``) newsletters sent inside the window."""
    first_day = start_s // SECONDS_PER_DAY + 1
    campaigns = []
    day = first_day
    while (send := day * SECONDS_PER_DAY + NEWSLETTER_HOUR_UTC * 3600) + 3600 < end_s:
        date = dt.datetime.fromtimestamp(send, dt.timezone.utc)
        campaigns.append(Campaign(f"nl-{date:%Y%m%d}", send))
        day += every_days
    return campaigns


def event_struct(**values: Column) -> Column:
    """An event with every field of ``EVENT_FIELDS``, null where not given."""
    unknown = set(values) - set(EVENT_FIELDS)
    if unknown:
        raise ValueError(f"unknown event fields {sorted(unknown)}; fields are {EVENT_FIELDS}")
    return F.struct(*[
        (values[name] if name in values else F.lit(None)).cast(EVENT_TYPES_BY_FIELD[name]).alias(name) for name in EVENT_FIELDS
    ])


def _explode_events(frame: DataFrame, events: list[Column], keep: list[str], *, end_s: int) -> DataFrame:
    """One row per non-null event of ``events``, up to ``end_s``.

    The array keeps its nulls until after the explode: dropping them inside the
    array (``filter``, ``array_compact``) is a higher-order function, which Spark
    evaluates row by row without generated code and was the slowest step. And
    ``explode_outer``, because for ``explode`` Spark infers a "non-empty array"
    filter that copies the whole array expression.
    """
    return (frame.select(*keep, F.explode_outer(F.array(*events)).alias("ev"))
            .where(F.col("ev").isNotNull() & (F.col("ev.ts") <= end_s))
            .select(*keep, "ev.*"))


def _explode_range(frame: DataFrame, *, count: Column, name: str) -> DataFrame:
    """One row per value 0..count-1 in column ``name`` (none when count is 0)."""
    numbers = F.when(count > 0, F.sequence(F.lit(0), count - 1))
    return frame.withColumn(name, F.explode_outer(numbers)).where(F.col(name).isNotNull())


def _u(name: str) -> Column:
    return F.col("u_" + name)


_SESSION_DRAWS = ("day", "weekday", "peak", "hour", "second", "views", "taste", "search", "checkout",
                  "checkout_delay", "dirty_unit")


def explode_sessions(users: DataFrame, *, seed: int, start_s: int, end_s: int, sessions_per_user_day: float,
                     dirty_unit_share: float) -> DataFrame:
    """One row per browsing session with its start time ``t0`` (UTC seconds) and shape."""
    tz = F.col("timezone")
    span_days = F.greatest(F.lit(0.0), (F.col("span_end") - F.col("span_start")) / SECONDS_PER_DAY)
    expected = sessions_per_user_day * F.col("activity") * span_days
    # Stochastic rounding keeps the mean exact for users with fewer than one expected session.
    n_sessions = F.floor(expected + F.col("u_sessions")).cast("int")

    day = F.col("day_lo") + draws.below(F.col("day_hi") - F.col("day_lo") + 1, _u("day"))
    weekday = F.pmod(F.col("day0") + 3, 7)  # 1970-01-01 was a Thursday; Monday is 0
    # Thin weekdays by moving some of their sessions to that week's Sunday (or the one
    # before when that Sunday is past the span): a weekly rhythm with no rejection loop.
    next_sunday = F.col("day0") + 6 - F.col("weekday")
    prev_sunday = F.col("day0") - F.col("weekday") - 1
    sunday = F.when(next_sunday <= F.col("day_hi"), next_sunday).when(prev_sunday >= F.col("day_lo"), prev_sunday)
    moves = _u("weekday") >= draws.constant_at(WEEKDAY_WEIGHTS, F.col("weekday"))
    local_day = F.coalesce(F.when(moves, sunday), F.col("day0"))
    at_peak = F.pmod(F.col("active_hour_local") + F.round(F.col("n_hour")), 24)
    hour = F.when(_u("peak") < F.col("peak_share"), at_peak).otherwise(
        draws.weighted_index(DIURNAL_WEIGHTS, _u("hour")))
    wall = F.col("local_day") * SECONDS_PER_DAY + F.col("hour") * 3600 + draws.below(3600, _u("second"))
    n_views = F.least(F.lit(MAX_VIEWS), 1 + F.floor(MEAN_EXTRA_VIEWS * draws.exponential_of(_u("views"))))

    spans = (
        users
        .withColumns({"span_start": F.greatest(F.lit(start_s), F.col("signup_s")),
                      "span_end": F.coalesce(F.col("lapsed_s"), F.lit(end_s)),
                      "u_sessions": draws.uniform(seed, "sessions", "user_idx")})
    )
    sessions = draws.with_uniforms(_explode_range(spans, count=n_sessions, name="session_no"), seed=seed,
                                   prefix="session", keys=["user_idx", "session_no"], names=_SESSION_DRAWS)
    sessions = (
        sessions
        .withColumn("n_hour", draws.normal(seed, "session-hour", "user_idx", "session_no"))
        .withColumns({"day_lo": F.floor(local_seconds(F.col("span_start"), tz) / SECONDS_PER_DAY),
                      "day_hi": F.floor(local_seconds(F.col("span_end") - 1, tz) / SECONDS_PER_DAY)})
        .withColumn("day0", day)
        .withColumn("weekday", weekday)
        .withColumns({"local_day": local_day, "hour": hour})
        .withColumn("t0", utc_seconds(wall, tz))
    )
    in_span = (F.col("t0") >= F.col("span_start")) & (F.col("t0") < F.col("span_end"))
    # A session whose local day falls outside the user's span gets no views, hence no
    # events. (A filter here would be pushed down with t0's whole derivation copied in.)
    return sessions.select(
        "user_idx", "user_id", "taste_group", "engagement", "locale", "session_no", "t0",
        draws.hex_id("s", seed, "session-id", "user_idx", "session_no").alias("session_id"),
        F.when(in_span, n_views).otherwise(F.lit(0)).cast("int").alias("n_views"),
        (_u("taste") < TASTE_SHARE).alias("is_taste_session"),
        (_u("search") < SEARCH_SHARE).alias("has_search"),
        (_u("checkout") < CHECKOUT_SHARE).alias("is_checkout"),
        (F.col("t0") + n_views * 45 + 150 + draws.below(300, _u("checkout_delay"))).alias("checkout_ts"),
        (_u("dirty_unit") < dirty_unit_share).alias("is_dirty_unit"),
    )


def _review_text(rating: Column, locale: Column, u_lang: Column, u1: Column, u2: Column) -> Column:
    sentiment = F.when(rating >= 4, F.lit("positive")).when(rating == 3, F.lit("neutral")).otherwise(F.lit("negative"))
    is_zh = (locale == "zh-CN") & (u_lang < 0.85)

    def phrases(lang: str) -> Column:
        by_sentiment = REVIEW_PHRASES[lang]
        return (F.when(sentiment == "positive", F.array(*map(F.lit, by_sentiment["positive"])))
                .when(sentiment == "neutral", F.array(*map(F.lit, by_sentiment["neutral"])))
                .otherwise(F.array(*map(F.lit, by_sentiment["negative"]))))

    def two(arr: Column) -> tuple[Column, Column]:
        """Two different phrases: the second is drawn among the others."""
        size = F.size(arr)
        first = draws.below(size, u1)
        second = (first + 1 + draws.below(size - 1, u2)) % size
        return F.element_at(arr, first + 1), F.element_at(arr, second + 1)

    zh1, zh2 = two(phrases("zh"))
    en1, en2 = two(phrases("en"))
    english = F.concat(F.upper(F.substring(en1, 1, 1)), F.substring(en1, 2, 200), F.lit(", "), en2, F.lit("."))
    return F.when(is_zh, F.concat(zh1, F.lit("，"), zh2, F.lit("。"))).otherwise(english)


_SLOT_DRAWS = ("item", "view_ts", "cart", "cart_ts", "remove", "remove_ts", "review", "review_ts", "quantity",
               "discount", "query_lang", "query", "query_brand", "review_lang", "review_w1", "review_w2")


def explode_browse_events(sessions: DataFrame, *, seed: int, lookup: DataFrame, pool_sizes: list[int],
                          end_s: int) -> DataFrame:
    """Events of each session: search, views and, per viewed item, cart / remove / purchase / review."""
    slot = ["user_idx", "session_no", "view_no"]
    group = F.col("taste_group")
    use_pool = F.col("is_taste_session") & (draws.constant_at(pool_sizes, group) > 0)
    size = draws.constant_at(pool_sizes, F.col("pool_id"))

    search_offset = F.when(F.col("has_search"), F.lit(20)).otherwise(F.lit(0))
    view_ts = F.col("t0") + search_offset + F.col("view_no") * 45 + draws.below(40, _u("view_ts"))
    cart_ts = F.col("view_ts") + 5 + draws.below(50, _u("cart_ts"))
    p_cart = 0.08 + 0.17 * F.col("engagement")
    is_carted = _u("cart") < p_cart
    is_removed = F.col("is_carted") & (_u("remove") < REMOVE_SHARE)
    is_purchased = F.col("is_carted") & ~F.col("is_removed") & F.col("is_checkout")
    is_reviewed = F.col("is_purchased") & (_u("review") < REVIEW_SHARE)
    review_ts = F.col("checkout_ts") + F.floor((2 + 19 * _u("review_ts")) * SECONDS_PER_DAY)
    quantity = draws.weighted_index([0.85, 0.11, 0.04], _u("quantity")) + 1
    discount = draws.constant_at([0.0, 0.1, 0.2], draws.weighted_index([0.75, 0.15, 0.10], _u("discount")))
    price_paid = F.round(F.col("price").cast("double") * (1 - discount), 2)
    rating = F.greatest(F.lit(1), F.least(F.lit(5), F.round(F.col("quality") + 0.9 * F.col("n_rating")))).cast("int")
    is_zh_query = (F.col("locale") == "zh-CN") & (_u("query_lang") < 0.6)
    en_query = F.element_at(F.element_at(F.array(*[F.array(*map(F.lit, leaf.queries)) for leaf in LEAVES]),
                                         F.col("leaf") + 1), draws.below(2, _u("query")) + 1)
    en_query = F.when(_u("query_brand") < 0.25, F.concat(F.col("brand_query"), F.lit(" "), en_query)).otherwise(
        en_query)
    query = F.when(is_zh_query, draws.constant_at([leaf.query_zh for leaf in LEAVES], F.col("leaf"))).otherwise(en_query)

    def event_id(code: int) -> Column:
        return draws.hex_id("e", seed, "browse-event", *slot, F.lit(code))

    common = dict(user_id=F.col("user_id"), session_id=F.col("session_id"))
    with_item = dict(common, item_id=F.col("item_id"))
    events = [
        F.when((F.col("view_no") == 0) & F.col("has_search"), event_struct(
            event_id=event_id(0), event_type=F.lit("search"), ts=F.col("t0"), query=query, **common)),
        event_struct(event_id=event_id(1), event_type=F.lit("view"), ts=F.col("view_ts"), **with_item),
        F.when(F.col("is_carted"), event_struct(event_id=event_id(2), event_type=F.lit("add_to_cart"),
                                                ts=F.col("cart_ts"), quantity=F.lit(1), **with_item)),
        F.when(F.col("is_removed"), event_struct(
            event_id=event_id(3), event_type=F.lit("remove_from_cart"),
            ts=F.col("cart_ts") + 10 + draws.below(30, _u("remove_ts")), quantity=F.lit(1), **with_item)),
        F.when(F.col("is_purchased"), event_struct(
            event_id=event_id(4), event_type=F.lit("purchase"), ts=F.col("checkout_ts"),
            order_id=draws.hex_id("o", seed, "order", "user_idx", "session_no"),
            quantity=quantity, price=price_paid, currency=F.lit(CURRENCY), **with_item)),
        F.when(F.col("is_reviewed"), event_struct(
            event_id=event_id(5), event_type=F.lit("review"), ts=F.col("review_ts"), rating=F.col("rating"),
            review_text=_review_text(F.col("rating"), F.col("locale"), _u("review_lang"), _u("review_w1"),
                                     _u("review_w2")),
            **with_item)),
    ]

    slots = draws.with_uniforms(_explode_range(sessions, count=F.col("n_views"), name="view_no"), seed=seed,
                                prefix="slot", keys=slot, names=_SLOT_DRAWS)
    slots = (
        slots
        .withColumn("pool_id", F.when(use_pool, group).otherwise(F.lit(GLOBAL_POOL)))
        .withColumn("pool_rank", draws.zipf_rank(_u("item"), size, exponent=ZIPF_EXPONENT))
        # A broadcast join keeps the slots' partitioning and order (no shuffle); the
        # lookup's key is unique, so no slot is multiplied.
        .join(F.broadcast(lookup), on=["pool_id", "pool_rank"], how="inner")
        # Items launched after the session began cannot be seen in it.
        .where(F.col("launched_s") <= F.col("t0"))
        .withColumns({"view_ts": view_ts, "is_carted": is_carted,
                      "n_rating": draws.normal(seed, "slot-rating", *slot)})
        .withColumns({"cart_ts": cart_ts, "is_removed": is_removed, "rating": rating})
        .withColumn("is_purchased", is_purchased)
        .withColumns({"is_reviewed": is_reviewed, "review_ts": review_ts})
    )
    return _explode_events(slots, events, ["user_idx", "is_dirty_unit"], end_s=end_s)


def explode_deliveries(users: DataFrame, *, seed: int, campaigns: list[Campaign], every_days: int,
                       dirty_unit_share: float) -> DataFrame:
    """One row per newsletter sent to a user: consented at send time, not yet unsubscribed or bounced."""
    sends = F.array(*[F.lit(c.send_s) for c in campaigns])
    ids = F.array(*[F.lit(c.campaign_id) for c in campaigns])
    eligible = F.filter(F.sequence(F.lit(0), F.lit(len(campaigns) - 1)),
                        lambda k: F.col("is_consented") & (F.element_at(sends, k + 1) >= F.col("consent_s")))
    unsub_flags = F.transform(F.col("eligible"),
                              lambda k: draws.uniform(seed, "unsubscribe", F.col("user_idx"), k) < F.col("p_unsub"))
    # The shop stops mailing after a hard bounce or an unsubscribe.
    kept_len = (F.when(F.col("is_bad_address"), F.least(F.lit(1), F.size("eligible")))
                .when(F.col("unsub_pos") > 0, F.col("unsub_pos")).otherwise(F.size("eligible")))
    sent = (
        users
        .withColumns({"eligible": eligible, "p_unsub": 0.002 + 0.01 * (1.0 - F.col("engagement"))})
        .withColumn("unsub_pos", F.array_position(unsub_flags, True).cast("int"))
        .withColumn("kept", F.slice(F.col("eligible"), 1, kept_len.cast("int")))
        .select("*", F.posexplode_outer("kept").alias("pos", "campaign_no"))
        .where(F.col("campaign_no").isNotNull())
    )
    return sent.select(
        "user_idx", "user_id", "timezone", "engagement", "active_hour_local", "is_lapsed", "lapsed_s",
        "campaign_no",
        F.element_at(sends, F.col("campaign_no") + 1).alias("send_s"),
        F.element_at(ids, F.col("campaign_no") + 1).alias("campaign_id"),
        F.col("is_bad_address").alias("is_bounce"),
        (~F.col("is_bad_address") & (F.col("pos") + 1 == F.col("unsub_pos"))).alias("is_unsubscribe"),
        (draws.uniform(seed, "delivery-dirty-unit", "user_idx", "campaign_no") < dirty_unit_share).alias(
            "is_dirty_unit"),
        F.lit(min(2 * SECONDS_PER_DAY, every_days * SECONDS_PER_DAY // 2)).alias("unsub_window"),
    )


_MAIL_DRAWS = ("delivered_ts", "open_second", "open_at_peak", "open_delay", "open", "click", "click_ts",
               "unsubscribe_ts", "bounce_ts")


def explode_email_events(deliveries: DataFrame, *, seed: int, end_s: int) -> DataFrame:
    """Delivered / bounce, open, click and unsubscribe events of each newsletter sent."""
    key = ["user_idx", "campaign_no"]
    tz = F.col("timezone")

    lapsed_at_send = F.col("is_lapsed") & (F.col("send_s") > F.col("lapsed_s"))
    engagement = F.col("engagement") * F.when(lapsed_at_send, F.lit(0.1)).otherwise(F.lit(1.0))
    delivered_ts = F.col("send_s") + 5 + draws.below(900, _u("delivered_ts"))
    # Opens wait for the user's peak local hour (the signal send-time optimisation learns).
    peak_today = (F.floor(F.col("local_delivered") / SECONDS_PER_DAY) * SECONDS_PER_DAY
                  + F.col("active_hour_local") * 3600 + draws.below(3600, _u("open_second")))
    next_peak = F.when(peak_today < F.col("local_delivered"), peak_today + SECONDS_PER_DAY).otherwise(peak_today)
    open_ts = F.when(_u("open_at_peak") < OPEN_AT_PEAK_SHARE,
                     F.greatest(utc_seconds(next_peak, tz), F.col("delivered_ts") + 60)).otherwise(
        F.col("delivered_ts") + 60 + F.floor(7200 * draws.exponential_of(_u("open_delay"))))
    is_open = ~F.col("is_bounce") & (_u("open") < 0.04 + 0.6 * F.col("engagement_at_send"))
    is_click = F.col("is_open") & (_u("click") < 0.08 + 0.35 * F.col("engagement_at_send"))

    def event_id(code: int) -> Column:
        return draws.hex_id("e", seed, "email-event", *key, F.lit(code))

    common = dict(user_id=F.col("user_id"), campaign_id=F.col("campaign_id"), message_id=F.col("message_id"))
    events = [
        F.when(F.col("is_bounce"), event_struct(
            event_id=event_id(0), event_type=F.lit("bounce"),
            ts=F.col("send_s") + 5 + draws.below(60, _u("bounce_ts")), **common)),
        F.when(~F.col("is_bounce"), event_struct(
            event_id=event_id(1), event_type=F.lit("email_delivered"), ts=F.col("delivered_ts"), **common)),
        F.when(F.col("is_open"), event_struct(event_id=event_id(2), event_type=F.lit("email_open"),
                                              ts=F.col("open_ts"), **common)),
        F.when(is_click, event_struct(
            event_id=event_id(3), event_type=F.lit("email_click"),
            ts=F.col("open_ts") + 5 + draws.below(300, _u("click_ts")), **common)),
        F.when(F.col("is_unsubscribe"), event_struct(
            event_id=event_id(4), event_type=F.lit("unsubscribe"),
            ts=F.col("delivered_ts") + 60 + draws.below(F.col("unsub_window"), _u("unsubscribe_ts")), **common)),
    ]
    mails = (
        draws.with_uniforms(deliveries, seed=seed, prefix="mail", keys=key, names=_MAIL_DRAWS)
        .withColumns({"delivered_ts": delivered_ts, "engagement_at_send": engagement,
                      "message_id": draws.hex_id("m", seed, "message", *key)})
        .withColumns({"local_delivered": local_seconds(F.col("delivered_ts"), tz), "is_open": is_open})
        .withColumn("open_ts", open_ts)
    )
    return _explode_events(mails, events, ["user_idx", "is_dirty_unit"], end_s=end_s)


def landing_json() -> Column:
    """The landing line of a clean event: one JSON object, keys of EVENTS_LANDING, nulls left out."""
    return F.to_json(F.struct(*[
        (iso_utc(F.col("ts")).alias("event_ts") if name == "ts" else F.col(name)) for name in EVENT_FIELDS
    ]))
