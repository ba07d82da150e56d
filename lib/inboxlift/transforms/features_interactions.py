"""User x item aggregates: the ALS input (``interactions``) and the per-pair facts user features build on."""

from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import FeatureSettings
from inboxlift.transforms.features_common import (
    ADD_TO_CART, EVENT_TS, EVENT_TYPE, INTERACTION_TYPES, ITEM_ID, PURCHASE, REMOVE_FROM_CART, USER_ID, VIEW,
    age_days, count_if, filter_events_as_of, require_columns, stable, window_start,
)

USER_ITEM_COLUMNS = [
    "user_id", "item_id", "view_count", "cart_count", "purchase_count", "confidence", "last_interaction_ts",
    "last_view_ts", "last_add_ts", "last_cart_exit_ts", "last_purchase_ts", "affinity_interactions",
]
INTERACTIONS_COLUMNS = [
    "user_id", "item_id", "confidence", "view_count", "cart_count", "purchase_count",
    "last_interaction_ts", "has_purchased", "as_of_date",
]


def aggregate_user_items(events: DataFrame, *, as_of: dt.date, settings: FeatureSettings) -> DataFrame:
    """Events -> one row per (user, item) the user viewed, carted or bought before the cut-off.

    ``confidence`` is the sum over those events of ``weight(type) * 0.5 ** (age_days / half_life_days)``,
    the age measured from the cut-off. Removals and reviews carry no weight but removals (and purchases)
    close an open cart, so ``last_cart_exit_ts`` is the latest of either.
    """
    require_columns(events, [USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS], step="aggregate_user_items")
    item_events = (
        events.transform(filter_events_as_of, as_of=as_of)
        .where(F.col(ITEM_ID).isNotNull())
        .where(F.col(EVENT_TYPE).isin(*INTERACTION_TYPES, REMOVE_FROM_CART))
    )
    event_type, ts = F.col(EVENT_TYPE), F.col(EVENT_TS)
    weight = (F.when(event_type == VIEW, F.lit(settings.view_weight))
              .when(event_type == ADD_TO_CART, F.lit(settings.cart_weight))
              .when(event_type == PURCHASE, F.lit(settings.purchase_weight)))
    decay = F.pow(F.lit(0.5), age_days(ts, as_of=as_of) / F.lit(settings.half_life_days))
    is_interaction = event_type.isin(*INTERACTION_TYPES)
    in_affinity_window = ts >= window_start(as_of, settings.affinity_window_days)
    return (
        item_events.groupBy(USER_ID, ITEM_ID)
        .agg(
            count_if(event_type == VIEW).cast("int").alias("view_count"),
            count_if(event_type == ADD_TO_CART).cast("int").alias("cart_count"),
            count_if(event_type == PURCHASE).cast("int").alias("purchase_count"),
            stable(F.coalesce(F.sum(weight * decay), F.lit(0.0))).alias("confidence"),
            F.max(F.when(is_interaction, ts)).alias("last_interaction_ts"),
            F.max(F.when(event_type == VIEW, ts)).alias("last_view_ts"),
            F.max(F.when(event_type == ADD_TO_CART, ts)).alias("last_add_ts"),
            F.max(F.when(event_type.isin(REMOVE_FROM_CART, PURCHASE), ts)).alias("last_cart_exit_ts"),
            F.max(F.when(event_type == PURCHASE, ts)).alias("last_purchase_ts"),
            count_if(is_interaction & in_affinity_window).cast("int").alias("affinity_interactions"),
        )
        # A pair seen only through removals has nothing to recommend from.
        .where(F.col("last_interaction_ts").isNotNull())
        .select(*USER_ITEM_COLUMNS)
    )


def interactions_from_user_items(user_items: DataFrame, *, as_of: dt.date) -> DataFrame:
    """The ``interactions`` table: implicit confidence per (user, item), ALS's input."""
    require_columns(user_items, USER_ITEM_COLUMNS, step="interactions_from_user_items")
    return user_items.select(
        USER_ID, ITEM_ID, "confidence", "view_count", "cart_count", "purchase_count", "last_interaction_ts",
        (F.col("purchase_count") > 0).alias("has_purchased"),
        F.lit(as_of).alias("as_of_date"),
    )
