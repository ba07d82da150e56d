"""user_features: one row per user — RFM, activity, affinities, email engagement, abandonment, send hour,
lifecycle stage, review sentiment and replenishment timing. Every column is described in the README's Feature reference.

Defaults: counts, sums, rates, scores and "days since" values are never null. A "days since" value of
something that never happened is the user's tenure (it has not happened for at least that long); the
average order value without orders is 0. Only averages no number can stand in for are null, next to a
count of 0: days between orders (fewer than 2 orders) and review sentiment (no scored review).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import FeatureSettings
from inboxlift.transforms.features_activity import MONEY, WINDOW_COUNTS, aggregate_user_activity
from inboxlift.transforms.features_common import (
    ACTIVITY_TYPES, BRAND, CATEGORY, EMAIL_OPEN, EVENT_TS, EVENT_TYPE, ITEM_ID, PRICE, SIGNUP_TS, TIMEZONE,
    UPDATED_AT, USER_ID, count_if, cutoff_lit, days_since, filter_events_as_of, latest_row_per_key, product_dims,
    require_columns, sorted_ids, window_start, window_suffix,
)
from inboxlift.transforms.features_interactions import USER_ITEM_COLUMNS, aggregate_user_items
from inboxlift.transforms.features_reviews import aggregate_user_reviews

USER_INPUT = [USER_ID, SIGNUP_TS, TIMEZONE, UPDATED_AT]

# The usual RFM segment map on (recency score, frequency score), each 1..5. It is a published
# convention rather than a tunable, so it lives here and not in settings; every (r, f) pair is covered.
RFM_GROUPS = [
    ("champions", (5,), (4, 5)),
    ("loyal_customers", (3, 4), (4, 5)),
    ("potential_loyalists", (4, 5), (2, 3)),
    ("new_customers", (5,), (1,)),
    ("promising", (4,), (1,)),
    ("need_attention", (3,), (3,)),
    ("about_to_sleep", (3,), (1, 2)),
    ("cant_lose_them", (1, 2), (5,)),
    ("at_risk", (1, 2), (3, 4)),
    ("hibernating", (1, 2), (1, 2)),
]
NO_PURCHASE = "no_purchase"
RFM_QUANTILES = (0.2, 0.4, 0.6, 0.8)
NEW, ACTIVE, LAPSING, LAPSED, CHURNED = "new", "active", "lapsing", "lapsed", "churned"
UNKNOWN_BAND = "unknown"
# Send-hour evidence is bucketed to 15 minutes before time zones are applied: every zone offset in
# use is a multiple of 15 minutes, so a bucket never straddles a local hour (Asia/Kolkata is +05:30).
SEND_BUCKET_SECONDS = 900



def empty_ids() -> Column:
    return F.array().cast("array<string>")


def empty_shares() -> Column:
    return F.create_map().cast("map<string,double>")


def item_signal_columns(windows: list[int]) -> list[str]:
    return [
        USER_ID, *[f"{name}{window_suffix(d)}" for d in windows for name in ("items", "categories")],
        "category_shares", "brand_shares", "top_categories", "preferred_price_band",
        "open_cart_item_ids", "open_cart_item_count", "open_cart_added_at", "browsed_not_bought_item_ids",
    ]


def user_feature_columns(windows: list[int]) -> list[str]:
    """The columns of ``user_features``, in order: the table's contract."""
    per_window = [f"{name}{window_suffix(d)}" for d in windows
                  for name in [*WINDOW_COUNTS, "sessions", "items", "categories"]]
    return [
        USER_ID, "as_of_date", "tenure_days", "lifecycle_stage",
        "days_since_last_purchase", "orders", "monetary", "avg_order_value",
        "r_score", "f_score", "m_score", "rfm_group",
        *per_window, "days_since_last_activity",
        "category_shares", "brand_shares", "top_categories", "preferred_price_band",
        "emails_delivered", "emails_opened", "emails_clicked", "open_rate", "click_rate",
        "days_since_last_open", "days_since_last_click", "is_unsubscribed", "is_bounced",
        "open_cart_item_ids", "open_cart_item_count", "open_cart_added_at", "browsed_not_bought_item_ids",
        "preferred_send_hour", "send_hour_source",
        "reviews_written", "avg_review_sentiment", "negatively_reviewed_item_ids",
        "avg_days_between_orders", "expected_next_order_date",
    ]


def price_band(price: Column, *, edges: list[float], labels: list[str]) -> Column:
    """The label of the band ``price`` falls in: below ``edges[0]`` the first, at or above the last edge the last."""
    index = sum((F.when(price >= F.lit(edge), F.lit(1)).otherwise(F.lit(0)) for edge in edges), F.lit(0))
    return F.when(price.isNotNull(), F.element_at(F.array(*[F.lit(label) for label in labels]), index + 1))


def _shares(entries: Column) -> Column:
    """``array<struct(n, value)>`` -> ``map<value, n / sum(n)>``, entries ordered by count then value."""
    total = F.aggregate(entries, F.lit(0).cast("bigint"), lambda acc, e: acc + e["n"])
    ordered = sorted_pairs(entries)
    return F.map_from_entries(F.transform(ordered, lambda e: F.struct(e["value"], e["n"] / total)))


def sorted_pairs(entries: Column) -> Column:
    return F.array_sort(entries, lambda a, b: F.when(a["n"] > b["n"], -1).when(a["n"] < b["n"], 1)
                        .when(a["value"] < b["value"], -1).when(a["value"] > b["value"], 1).otherwise(0))


def aggregate_user_item_signals(user_items: DataFrame, *, products: DataFrame, as_of: dt.date,
                                settings: FeatureSettings) -> DataFrame:
    """Per-user facts from the (user, item) aggregates: distinct items and categories per window,
    category / brand shares, top categories, preferred price band, open cart, browsed-not-bought items.
    """
    require_columns(user_items, USER_ITEM_COLUMNS, step="aggregate_user_item_signals")
    windows = settings.activity_windows_days
    pairs = user_items.join(product_dims(products).select(ITEM_ID, CATEGORY, BRAND, PRICE), on=ITEM_ID, how="left")

    last_add, last_exit = F.col("last_add_ts"), F.col("last_cart_exit_ts")
    cart_still_holds = last_add.isNotNull() & (last_exit.isNull() | (last_exit < last_add))
    cart_is_recent = last_add >= window_start(as_of, settings.cart_window_days)
    cart_is_settled = last_add <= cutoff_lit(as_of) - F.expr(f"INTERVAL {settings.cart_min_age_minutes} MINUTES")
    is_open = cart_still_holds & cart_is_recent & cart_is_settled
    browse_start = window_start(as_of, settings.browse_window_days)
    not_bought_since = F.col("last_purchase_ts").isNull() | (F.col("last_purchase_ts") < browse_start)
    is_browsed = (F.col("last_view_ts") >= browse_start) & not_bought_since & ~is_open

    def listed(condition: Column, sort_ts: str) -> Column:
        pair = F.struct(F.col(sort_ts).alias("k"), F.col(ITEM_ID).alias("id"))
        return sorted_ids(F.collect_list(F.when(condition, pair)), limit=settings.max_listed_items)

    per_item = pairs.groupBy(USER_ID).agg(
        *[count_if(F.col("last_interaction_ts") >= window_start(as_of, d)).cast("int").alias(f"items{window_suffix(d)}")
          for d in windows],
        listed(is_open, "last_add_ts").alias("open_cart_item_ids"),
        count_if(is_open).cast("int").alias("open_cart_item_count"),
        F.max(F.when(is_open, last_add)).alias("open_cart_added_at"),
        listed(is_browsed, "last_view_ts").alias("browsed_not_bought_item_ids"),
    )

    # Category, brand and price band in one pass: a row per (user, dimension, value).
    band = price_band(F.col(PRICE), edges=settings.price_band_edges, labels=settings.price_band_labels)
    dims = F.array(*[F.struct(F.lit(kind).alias("kind"), value.alias("value"))
                     for kind, value in (("category", F.col(CATEGORY)), ("brand", F.col(BRAND)), ("band", band))])
    per_value = (
        pairs.select(USER_ID, "last_interaction_ts", "affinity_interactions", F.explode(dims).alias("d"))
        .where(F.col("d.value").isNotNull())
        .groupBy(USER_ID, F.col("d.kind").alias("kind"), F.col("d.value").alias("value"))
        .agg(F.max("last_interaction_ts").alias("last_ts"), F.sum("affinity_interactions").alias("n"))
    )
    kind, n = F.col("kind"), F.col("n")

    def entries(of_kind: str) -> Column:
        return F.collect_list(F.when((kind == of_kind) & (n > 0), F.struct(n.alias("n"), F.col("value").alias("value"))))

    labels = F.array(*[F.lit(label) for label in settings.price_band_labels])
    # Most interactions wins; on a tie the cheaper band (smaller position in the labels).
    best_band = F.max(F.when((kind == "band") & (n > 0),
                             F.struct(n.alias("n"), (-F.array_position(labels, F.col("value"))).alias("cheaper"),
                                      F.col("value").alias("value"))))
    per_dim = per_value.groupBy(USER_ID).agg(
        *[count_if((kind == "category") & (F.col("last_ts") >= window_start(as_of, d))).cast("int")
          .alias(f"categories{window_suffix(d)}") for d in windows],
        entries("category").alias("category_entries"),
        entries("brand").alias("brand_entries"),
        best_band.alias("best_band"),
    )
    return per_item.join(per_dim, on=USER_ID, how="left").select(
        USER_ID,
        *[F.col(f"items{window_suffix(d)}") for d in windows],
        # Users whose items have no known category have no per-dimension row.
        *[F.coalesce(F.col(f"categories{window_suffix(d)}"), F.lit(0)).alias(f"categories{window_suffix(d)}")
          for d in windows],
        F.coalesce(_shares(F.col("category_entries")), empty_shares()).alias("category_shares"),
        F.coalesce(_shares(F.col("brand_entries")), empty_shares()).alias("brand_shares"),
        F.coalesce(F.transform(F.slice(sorted_pairs(F.col("category_entries")), 1, settings.top_categories),
                               lambda e: e["value"]), empty_ids()).alias("top_categories"),
        F.coalesce(F.col("best_band.value"), F.lit(UNKNOWN_BAND)).alias("preferred_price_band"),
        "open_cart_item_ids", "open_cart_item_count", "open_cart_added_at", "browsed_not_bought_item_ids",
    ).select(*item_signal_columns(windows))


def valid_timezone(zone: Column) -> Column:
    """``zone`` when the JVM knows it, else UTC: one bad zone id must not fail the run (Spark raises on it)."""
    known = F.try_reflect(F.lit("java.time.ZoneId"), F.lit("of"), zone).isNotNull()
    return F.when(zone.isNotNull() & known, zone).otherwise(F.lit("UTC"))


def aggregate_send_hours(events: DataFrame, *, users: DataFrame, as_of: dt.date,
                         settings: FeatureSettings) -> DataFrame:
    """Per user with recent activity: the local hour with the most weighted evidence and the evidence's weight.

    Evidence is each email open (``send_hour_open_weight``) and each other activity event
    (``send_hour_activity_weight``) of the last ``send_hour_window_days``, at its hour in the user's
    time zone (UTC when the zone is unknown or not valid). Ties go to the earlier hour.
    """
    require_columns(events, [USER_ID, EVENT_TYPE, EVENT_TS], step="aggregate_send_hours")
    require_columns(users, USER_INPUT, step="aggregate_send_hours")
    event_type, ts = F.col(EVENT_TYPE), F.col(EVENT_TS)
    weight = F.when(event_type == EMAIL_OPEN, F.lit(settings.send_hour_open_weight)) \
        .otherwise(F.lit(settings.send_hour_activity_weight))
    bucket = F.timestamp_seconds(F.floor(F.unix_seconds(ts) / SEND_BUCKET_SECONDS) * SEND_BUCKET_SECONDS)
    per_bucket = (
        events.transform(filter_events_as_of, as_of=as_of)
        .where(ts >= window_start(as_of, settings.send_hour_window_days))
        .where(event_type.isin(*ACTIVITY_TYPES))
        .groupBy(USER_ID, bucket.alias("bucket"))
        .agg(F.sum(weight).alias("weight"))
    )
    zones = users.transform(latest_row_per_key, key=USER_ID, order_by=UPDATED_AT, columns=[TIMEZONE]) \
        .select(USER_ID, valid_timezone(F.col(TIMEZONE)).alias("zone"))
    local_hour = F.hour(F.from_utc_timestamp(F.col("bucket"), F.coalesce(F.col("zone"), F.lit("UTC"))))
    return (
        per_bucket.join(zones, on=USER_ID, how="left")
        .groupBy(USER_ID, local_hour.alias("local_hour"))
        .agg(F.sum("weight").alias("weight"))
        .groupBy(USER_ID)
        .agg(F.sum("weight").alias("send_hour_weight"),
             F.max(F.struct(F.col("weight"), (-F.col("local_hour")).alias("earlier"))).alias("best"))
        .select(USER_ID, (-F.col("best.earlier")).alias("user_send_hour"), "send_hour_weight")
    )


def rfm_cut_points(activity: DataFrame, *, as_of: dt.date) -> DataFrame:
    """One row: the quintile cut points (``r_cuts``, ``f_cuts``, ``m_cuts``) of recency, frequency, money over buyers.

    Exact percentiles with linear interpolation. Money is floored to whole units first, which bounds
    the percentile's memory by the spend range rather than by the number of buyers.
    """
    require_columns(activity, ["orders", "monetary", "last_purchase_ts"], step="rfm_cut_points")
    quantiles = F.array(*[F.lit(q) for q in RFM_QUANTILES])
    return activity.where(F.col("orders") > 0).agg(
        F.percentile(days_since(F.col("last_purchase_ts"), as_of=as_of), quantiles).alias("r_cuts"),
        F.percentile(F.col("orders"), quantiles).alias("f_cuts"),
        F.percentile(F.floor(F.col("monetary")).cast("double"), quantiles).alias("m_cuts"),
    )


def with_rfm_scores(features: DataFrame, *, cut_points: DataFrame) -> DataFrame:
    """Add ``r_score``, ``f_score``, ``m_score`` (quintiles 1..5 among buyers, 0 for non-buyers) and ``rfm_group``.

    A value equal to a cut point falls in the lower quintile, so equal values always share a score.
    Recency runs the other way: 5 is the most recent. ``cut_points`` is :func:`rfm_cut_points`'s row.
    """
    require_columns(features, ["days_since_last_purchase", "orders", "monetary"], step="with_rfm_scores")
    require_columns(cut_points, ["r_cuts", "f_cuts", "m_cuts"], step="with_rfm_scores")
    recency, frequency = F.col("days_since_last_purchase"), F.col("orders")
    money_units = F.floor(F.col("monetary")).cast("double")

    def quintile(value: Column, cuts_column: str) -> Column:
        above = [F.when(value > F.col(cuts_column)[i], F.lit(1)).otherwise(F.lit(0)) for i in range(len(RFM_QUANTILES))]
        return sum(above, F.lit(1))

    is_buyer = frequency > 0
    scored = (
        # One row of cut points: the cross join cannot multiply rows.
        features.join(F.broadcast(cut_points.select("r_cuts", "f_cuts", "m_cuts")), how="cross")
        .withColumn("r_score", F.when(is_buyer, 6 - quintile(recency, "r_cuts")).otherwise(0).cast("int"))
        .withColumn("f_score", F.when(is_buyer, quintile(frequency, "f_cuts")).otherwise(0).cast("int"))
        .withColumn("m_score", F.when(is_buyer, quintile(money_units, "m_cuts")).otherwise(0).cast("int"))
    )
    group = F.lit(NO_PURCHASE)
    for label, r_scores, f_scores in reversed(RFM_GROUPS):
        group = F.when(F.col("r_score").isin(*r_scores) & F.col("f_score").isin(*f_scores), F.lit(label)) \
            .otherwise(group)
    return scored.withColumn("rfm_group", group).drop("r_cuts", "f_cuts", "m_cuts")


def with_lifecycle_stage(features: DataFrame, *, settings: FeatureSettings) -> DataFrame:
    """Add ``lifecycle_stage``: new by tenure, then active / lapsing / lapsed / churned by days since activity."""
    require_columns(features, ["tenure_days", "days_since_last_activity"], step="with_lifecycle_stage")
    idle = F.col("days_since_last_activity")
    stage = (
        F.when(F.col("tenure_days") <= settings.new_user_days, F.lit(NEW))
        .when(idle <= settings.active_days, F.lit(ACTIVE))
        .when(idle <= settings.lapsing_days, F.lit(LAPSING))
        .when(idle <= settings.lapsed_days, F.lit(LAPSED))
        .otherwise(F.lit(CHURNED))
    )
    return features.withColumn("lifecycle_stage", stage)


def population_send_hour(send_hours: DataFrame, *, settings: FeatureSettings) -> DataFrame:
    """One row: the hour most users with enough evidence prefer (earlier on a tie); null when there are none.

    Each user counts once, so a few very active users do not set everyone else's hour.
    """
    require_columns(send_hours, ["user_send_hour", "send_hour_weight"], step="population_send_hour")
    return (
        send_hours.where(F.col("send_hour_weight") >= settings.send_hour_min_weight)
        .groupBy("user_send_hour").count()
        .agg(F.max(F.struct(F.col("count"), (-F.col("user_send_hour")).alias("earlier"))).alias("best"))
        .select((-F.col("best.earlier")).cast("int").alias("population_send_hour"))
    )


def with_send_hour(features: DataFrame, *, population: DataFrame, settings: FeatureSettings) -> DataFrame:
    """Add ``preferred_send_hour`` and ``send_hour_source`` from ``user_send_hour`` / ``send_hour_weight``.

    With at least ``send_hour_min_weight`` of evidence the user's own hour (source ``user``); otherwise
    the population's (``population``, :func:`population_send_hour`); with nobody to learn from,
    ``default_send_hour`` (``default``).
    """
    require_columns(features, ["user_send_hour", "send_hour_weight"], step="with_send_hour")
    require_columns(population, ["population_send_hour"], step="with_send_hour")
    has_evidence = F.coalesce(F.col("send_hour_weight"), F.lit(0.0)) >= settings.send_hour_min_weight
    has_population = F.col("population_send_hour").isNotNull()
    return (
        # One row (an aggregate without grouping): the cross join cannot multiply rows.
        features.join(F.broadcast(population.select("population_send_hour")), how="cross")
        .withColumn("preferred_send_hour", F.when(has_evidence, F.col("user_send_hour"))
                    .when(has_population, F.col("population_send_hour"))
                    .otherwise(F.lit(settings.default_send_hour)).cast("int"))
        .withColumn("send_hour_source", F.when(has_evidence, F.lit("user"))
                    .when(has_population, F.lit("population")).otherwise(F.lit("default")))
        .drop("population_send_hour")
    )


def _smoothed_rate(hits: Column, trials: Column, *, prior: float, weight: float) -> Column:
    """``(hits + prior * weight) / (trials + weight)``: a user with one email is not at 0% or 100%."""
    rate = F.try_divide(hits + F.lit(prior * weight), trials + F.lit(weight))
    return F.coalesce(rate, F.lit(prior)).cast("double")


@dataclass(frozen=True)
class UserAggregates:
    """The per-user aggregates user features are assembled from (each one row per user)."""

    activity: DataFrame
    item_signals: DataFrame
    send_hours: DataFrame
    reviews: DataFrame

    def persist(self) -> "UserAggregates":
        """Keep them for the assembly, which reads activity and send hours twice (for their one-row summaries)."""
        return UserAggregates(*(df.persist() for df in self._frames()))

    def unpersist(self) -> None:
        for df in self._frames():
            df.unpersist()

    def _frames(self) -> tuple[DataFrame, ...]:
        return self.activity, self.item_signals, self.send_hours, self.reviews


def aggregate_users(events: DataFrame, *, users: DataFrame, products: DataFrame, review_scores: DataFrame,
                    as_of: dt.date, settings: FeatureSettings, user_items: DataFrame | None = None) -> UserAggregates:
    """The per-user aggregates behind ``user_features``; ``user_items`` is :func:`aggregate_user_items`'s output
    when the caller already has it (the stage shares it with ``interactions``)."""
    if user_items is None:
        user_items = events.transform(aggregate_user_items, as_of=as_of, settings=settings)
    return UserAggregates(
        activity=events.transform(aggregate_user_activity, as_of=as_of, settings=settings),
        item_signals=user_items.transform(aggregate_user_item_signals, products=products, as_of=as_of,
                                          settings=settings),
        send_hours=events.transform(aggregate_send_hours, users=users, as_of=as_of, settings=settings),
        reviews=review_scores.transform(aggregate_user_reviews, as_of=as_of, settings=settings),
    )


def user_features(events: DataFrame, *, users: DataFrame, products: DataFrame, review_scores: DataFrame,
                  as_of: dt.date, settings: FeatureSettings, user_items: DataFrame | None = None) -> DataFrame:
    """Events (plus users, products, scored reviews) -> ``user_features`` as of ``as_of``."""
    aggregates = aggregate_users(events, users=users, products=products, review_scores=review_scores,
                                 as_of=as_of, settings=settings, user_items=user_items)
    return users.transform(assemble_user_features, aggregates=aggregates, as_of=as_of, settings=settings)


def assemble_user_features(users: DataFrame, *, aggregates: UserAggregates, as_of: dt.date,
                           settings: FeatureSettings) -> DataFrame:
    """Users plus their aggregates -> ``user_features``: one row per user, defaults filled, scores derived.

    Users are those in ``users`` who had signed up before the cut-off (or whose sign-up time is
    unknown), and anyone with an event before it.
    """
    require_columns(users, USER_INPUT, step="assemble_user_features")
    windows = settings.activity_windows_days
    profiles = users.transform(latest_row_per_key, key=USER_ID, order_by=UPDATED_AT, columns=[SIGNUP_TS])
    signed_up = F.col(SIGNUP_TS).isNull() | (F.col(SIGNUP_TS) < cutoff_lit(as_of))
    # Every right-hand side is grouped by user_id, so these joins cannot multiply users.
    joined = (
        profiles.join(aggregates.activity, on=USER_ID, how="full")
        .where(F.col("first_event_ts").isNotNull() | signed_up)
        .join(aggregates.item_signals, on=USER_ID, how="left")
        .join(aggregates.send_hours, on=USER_ID, how="left")
        .join(aggregates.reviews, on=USER_ID, how="left")
    )
    first_seen = F.least(F.to_date(F.col(SIGNUP_TS)), F.to_date(F.col("first_event_ts")))
    tenure = F.greatest(F.coalesce(F.datediff(F.lit(as_of), first_seen), F.lit(0)), F.lit(0))

    def days_since_or_tenure(ts: str) -> Column:
        return F.coalesce(days_since(F.col(ts), as_of=as_of), F.col("tenure_days")).cast("int")

    def zero(name: str) -> Column:
        return F.coalesce(F.col(name), F.lit(0)).cast("int").alias(name)

    orders, first_order, last_order = F.col("orders"), F.col("first_order_ts"), F.col("last_order_ts")
    gap_seconds = F.try_divide(F.unix_seconds(last_order) - F.unix_seconds(first_order), orders - 1)
    has_gap = F.coalesce(orders, F.lit(0)) >= 2
    counted = [f"{name}{window_suffix(d)}" for d in windows
               for name in [*WINDOW_COUNTS, "sessions", "items", "categories"]]
    features = joined.select(
        USER_ID,
        F.lit(as_of).alias("as_of_date"),
        tenure.cast("int").alias("tenure_days"),
        *[zero(c) for c in counted],
        zero("orders"),
        F.coalesce(F.col("monetary"), F.lit(0)).cast(MONEY).alias("monetary"),
        "last_purchase_ts", "last_activity_ts", "last_open_ts", "last_click_ts",
        zero("emails_delivered"), zero("emails_opened"), zero("emails_clicked"),
        F.coalesce(F.col("is_unsubscribed"), F.lit(False)).alias("is_unsubscribed"),
        F.coalesce(F.col("is_bounced"), F.lit(False)).alias("is_bounced"),
        F.coalesce(F.col("category_shares"), empty_shares()).alias("category_shares"),
        F.coalesce(F.col("brand_shares"), empty_shares()).alias("brand_shares"),
        F.coalesce(F.col("top_categories"), empty_ids()).alias("top_categories"),
        F.coalesce(F.col("preferred_price_band"), F.lit(UNKNOWN_BAND)).alias("preferred_price_band"),
        F.coalesce(F.col("open_cart_item_ids"), empty_ids()).alias("open_cart_item_ids"),
        zero("open_cart_item_count"),
        "open_cart_added_at",
        F.coalesce(F.col("browsed_not_bought_item_ids"), empty_ids()).alias("browsed_not_bought_item_ids"),
        "user_send_hour", "send_hour_weight",
        zero("reviews_written"),
        "avg_review_sentiment",
        F.coalesce(F.col("negatively_reviewed_item_ids"), empty_ids()).alias("negatively_reviewed_item_ids"),
        F.when(has_gap, gap_seconds / 86_400).cast("double").alias("avg_days_between_orders"),
        F.when(has_gap, F.to_date(F.timestamp_seconds(F.unix_seconds(last_order) + F.round(gap_seconds).cast("long"))))
        .alias("expected_next_order_date"),
    )
    return (
        features
        .withColumn("days_since_last_purchase", days_since_or_tenure("last_purchase_ts"))
        .withColumn("days_since_last_activity", days_since_or_tenure("last_activity_ts"))
        .withColumn("days_since_last_open", days_since_or_tenure("last_open_ts"))
        .withColumn("days_since_last_click", days_since_or_tenure("last_click_ts"))
        # 0 rather than null without orders: segmentation and scoring read it as a number.
        .withColumn("avg_order_value",
                    F.coalesce(F.try_divide(F.col("monetary"), F.col("orders")), F.lit(0)).cast(MONEY))
        .withColumn("open_rate", _smoothed_rate(F.col("emails_opened"), F.col("emails_delivered"),
                                                prior=settings.open_rate_prior, weight=settings.rate_prior_emails))
        .withColumn("click_rate", _smoothed_rate(F.col("emails_clicked"), F.col("emails_delivered"),
                                                 prior=settings.click_rate_prior, weight=settings.rate_prior_emails))
        .transform(with_rfm_scores, cut_points=rfm_cut_points(aggregates.activity, as_of=as_of))
        .transform(with_lifecycle_stage, settings=settings)
        .transform(with_send_hour, population=population_send_hour(aggregates.send_hours, settings=settings),
                   settings=settings)
        .select(*user_feature_columns(windows))
    )

