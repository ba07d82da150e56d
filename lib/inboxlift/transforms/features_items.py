"""item_features: one row per item — demand over windows, conversion, trend, ratings, sentiment, catalogue facts.

Items are the catalogue's (``products``) plus any item with an event before the cut-off; an item
missing from the catalogue has null catalogue columns and is not in stock.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import FeatureSettings
from inboxlift.transforms.features_common import (
    ADD_TO_CART, BRAND, CATEGORY, EVENT_TS, EVENT_TYPE, IN_STOCK, INTERACTION_TYPES, ITEM_ID, LAUNCHED_AT, PRICE,
    PURCHASE, RATING, REVIEW, USER_ID, VIEW, count_if, cutoff_lit, filter_events_as_of, product_dims, require_columns,
    stable, window_start, window_suffix,
)

WINDOW_COUNTS = {"views": VIEW, "carts": ADD_TO_CART, "purchases": PURCHASE}


def item_feature_columns(windows: list[int]) -> list[str]:
    """The columns of ``item_features``, in order: the table's contract."""
    return [
        ITEM_ID, "as_of_date", CATEGORY, BRAND, PRICE, "currency", "is_in_stock", "is_new_arrival",
        "days_since_launch",
        *[f"{name}{window_suffix(d)}" for d in windows for name in WINDOW_COUNTS],
        "conversion_rate", "recent_interactions", "baseline_interactions", "trending_score",
        "rating_count", "avg_rating", "scored_reviews", "avg_review_sentiment",
    ]


def _between(ts: Column, start: Column, end: Column) -> Column:
    return (ts >= start) & (ts < end)


def item_features(events: DataFrame, *, products: DataFrame, review_scores: DataFrame, as_of: dt.date,
                  settings: FeatureSettings) -> DataFrame:
    """Events (plus products and scored reviews) -> ``item_features`` as of ``as_of``.

    - ``conversion_rate``: purchases / views over ``conversion_window_days``, smoothed as if the
      item had ``conversion_prior_views`` more views converting at ``conversion_prior_rate``.
    - ``trending_score``: interactions per day in the last ``trend_recent_days`` against the
      ``trend_baseline_days`` before them, each rate plus ``trend_smoothing_per_day``; 1 is steady.
    - ``is_new_arrival``: launched on one of the last ``new_arrival_days`` days (the as-of day included).
    """
    require_columns(events, [ITEM_ID, USER_ID, EVENT_TYPE, EVENT_TS, RATING], step="item_features")
    require_columns(review_scores, [ITEM_ID, EVENT_TS, "sentiment_score"], step="item_features")
    windows = settings.activity_windows_days
    event_type, ts = F.col(EVENT_TYPE), F.col(EVENT_TS)
    recent_start = window_start(as_of, settings.trend_recent_days)
    baseline_start = window_start(as_of, settings.trend_recent_days + settings.trend_baseline_days)
    conversion_start = window_start(as_of, settings.conversion_window_days)
    is_interaction = event_type.isin(*INTERACTION_TYPES)
    demand = (
        # Anonymous visitors' views count towards an item's demand too.
        events.transform(filter_events_as_of, as_of=as_of, with_user=False)
        .where(F.col(ITEM_ID).isNotNull())
        .groupBy(ITEM_ID)
        .agg(
            *[count_if((event_type == kind) & (ts >= window_start(as_of, d))).cast("int")
              .alias(f"{name}{window_suffix(d)}") for d in windows for name, kind in WINDOW_COUNTS.items()],
            count_if((event_type == VIEW) & (ts >= conversion_start)).alias("conversion_views"),
            count_if((event_type == PURCHASE) & (ts >= conversion_start)).alias("conversion_purchases"),
            count_if(is_interaction & (ts >= recent_start)).cast("int").alias("recent_interactions"),
            count_if(is_interaction & _between(ts, baseline_start, recent_start)).cast("int")
            .alias("baseline_interactions"),
            count_if((event_type == REVIEW) & F.col(RATING).isNotNull()).cast("int").alias("rating_count"),
            F.avg(F.when(event_type == REVIEW, F.col(RATING))).alias("avg_rating"),
        )
    )
    sentiment = (
        review_scores.where(F.col(EVENT_TS) < cutoff_lit(as_of))
        .where(F.col(ITEM_ID).isNotNull())
        .groupBy(ITEM_ID)
        .agg(F.count("sentiment_score").cast("int").alias("scored_reviews"),
             stable(F.avg("sentiment_score")).alias("avg_review_sentiment"))
    )
    catalogue = product_dims(products)
    joined = (
        catalogue.join(demand, on=ITEM_ID, how="full")
        .join(sentiment, on=ITEM_ID, how="left")
    )

    def zero(name: str) -> Column:
        return F.coalesce(F.col(name), F.lit(0)).cast("int").alias(name)

    smoothing = settings.trend_smoothing_per_day
    recent_rate = F.coalesce(F.col("recent_interactions"), F.lit(0)) / F.lit(float(settings.trend_recent_days))
    baseline_rate = F.coalesce(F.col("baseline_interactions"), F.lit(0)) / F.lit(float(settings.trend_baseline_days))
    prior_views, prior_rate = settings.conversion_prior_views, settings.conversion_prior_rate
    conversion = F.try_divide(
        F.coalesce(F.col("conversion_purchases"), F.lit(0)) + F.lit(prior_rate * prior_views),
        F.coalesce(F.col("conversion_views"), F.lit(0)) + F.lit(prior_views),
    )
    launch_age = F.datediff(F.lit(as_of), F.col(LAUNCHED_AT))
    return joined.select(
        ITEM_ID,
        F.lit(as_of).alias("as_of_date"),
        CATEGORY, BRAND, PRICE, "currency",
        # Unknown stock (no catalogue, or no stock column) is read as features.unknown_stock_in_stock.
        F.coalesce(F.col(IN_STOCK), F.lit(settings.unknown_stock_in_stock)).alias("is_in_stock"),
        F.coalesce((launch_age >= 0) & (launch_age < settings.new_arrival_days), F.lit(False)).alias("is_new_arrival"),
        launch_age.alias("days_since_launch"),
        *[zero(f"{name}{window_suffix(d)}") for d in windows for name in WINDOW_COUNTS],
        F.coalesce(conversion, F.lit(prior_rate)).cast("double").alias("conversion_rate"),
        zero("recent_interactions"),
        zero("baseline_interactions"),
        # With no smoothing and no interactions at all the ratio is 0/0: call that steady.
        F.coalesce(F.try_divide(recent_rate + F.lit(smoothing), baseline_rate + F.lit(smoothing)), F.lit(1.0))
        .cast("double").alias("trending_score"),
        zero("rating_count"),
        F.col("avg_rating").cast("double").alias("avg_rating"),
        zero("scored_reviews"),
        F.col("avg_review_sentiment").cast("double").alias("avg_review_sentiment"),
    ).select(*item_feature_columns(windows))
