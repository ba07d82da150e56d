"""Reviews: the texts the sentiment model reads, and per-user / per-item sentiment from its scores."""

from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import FeatureSettings
from inboxlift.transforms.features_common import (
    EVENT_ID, EVENT_TS, EVENT_TYPE, ITEM_ID, RATING, REVIEW, REVIEW_TEXT, USER_ID, cutoff_lit, filter_events_as_of,
    require_columns, sorted_ids, stable,
)

REVIEW_COLUMNS = [EVENT_ID, USER_ID, ITEM_ID, EVENT_TS, RATING, REVIEW_TEXT]
# The review_sentiment table: one row per scored review.
REVIEW_SCORE_COLUMNS = [EVENT_ID, USER_ID, ITEM_ID, EVENT_TS, RATING, "sentiment_score", "sentiment_label",
                        "is_negative", "model_run_id", "as_of_date"]
REVIEW_SCORE_SCHEMA = (
    "event_id string, user_id string, item_id string, event_ts timestamp, rating int, sentiment_score double, "
    "sentiment_label int, is_negative boolean, model_run_id string, as_of_date date"
)
USER_REVIEW_COLUMNS = [USER_ID, "avg_review_sentiment", "negatively_reviewed_item_ids"]


def select_reviews(events: DataFrame, *, as_of: dt.date) -> DataFrame:
    """Review events before the cut-off that have text (a bare star rating has nothing to read)."""
    require_columns(events, [*REVIEW_COLUMNS, EVENT_TYPE], step="select_reviews")
    return (
        events.transform(filter_events_as_of, as_of=as_of)
        .where(F.col(EVENT_TYPE) == REVIEW)
        .where(F.length(F.trim(F.col(REVIEW_TEXT))) > 0)
        .select(*REVIEW_COLUMNS)
    )


def aggregate_user_reviews(review_scores: DataFrame, *, as_of: dt.date, settings: FeatureSettings) -> DataFrame:
    """Scored reviews -> per user: mean positive probability and the items reviewed negatively (latest first)."""
    require_columns(review_scores, [USER_ID, ITEM_ID, EVENT_TS, "sentiment_score", "is_negative"],
                    step="aggregate_user_reviews")
    negative = F.col("is_negative") & F.col(ITEM_ID).isNotNull()
    return (
        review_scores.where(F.col(EVENT_TS) < cutoff_lit(as_of))
        .where(F.col(USER_ID).isNotNull())
        # One item reviewed negatively twice is listed once, at its latest review.
        .groupBy(USER_ID, ITEM_ID)
        .agg(F.sum("sentiment_score").alias("score_sum"), F.count("sentiment_score").alias("scored"),
             F.max(F.when(negative, F.col(EVENT_TS))).alias("last_negative_ts"))
        .groupBy(USER_ID)
        .agg(stable(F.try_divide(F.sum("score_sum"), F.sum("scored"))).alias("avg_review_sentiment"),
             sorted_ids(F.collect_list(F.when(F.col("last_negative_ts").isNotNull(),
                                              F.struct(F.col("last_negative_ts").alias("k"),
                                                       F.col(ITEM_ID).alias("id")))),
                        limit=settings.max_listed_items).alias("negatively_reviewed_item_ids"))
        .select(*USER_REVIEW_COLUMNS)
    )
