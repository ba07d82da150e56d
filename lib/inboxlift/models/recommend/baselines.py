"""Popularity baselines and the fallback chain: ``popular`` and ``popular_in_category``.

The same ranking serves twice: as the baselines every recommender is evaluated against, and as the
fallbacks of the ``recommendations`` table for users the recommenders cannot serve (docs/recommend.md).
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.models.recommend.data import (
    CONFIDENCE,
    INTERACTION_TYPES,
    ITEM_ID,
    ITEM_IDX,
    USER_ID,
    USER_IDX,
    events_between,
    to_indexes,
)
from inboxlift.schemas import require_columns


def item_popularity(events: DataFrame, *, item_categories: DataFrame, end: dt.datetime, days: int,
                    item_map: DataFrame, candidate_items: DataFrame | None = None) -> DataFrame:
    """Items by distinct users interacting in ``[end - days, end)``.

    Args:
        item_categories: ``item_id, category`` (one row per item).
        candidate_items: when given (``item_idx``), only these items are ranked (e.g. in stock).

    Returns:
        ``item_idx, category, popularity, pop_rank, category_rank``: ranks from 1, most users first,
        ties by item index.
    """
    recent = events_between(events, start=end - dt.timedelta(days=days), end=end, types=INTERACTION_TYPES)
    counts = recent.groupBy(ITEM_ID).agg(F.countDistinct(USER_ID).cast("double").alias("popularity"))
    ranked = to_indexes(counts.join(item_categories.select(ITEM_ID, "category"), on=ITEM_ID, how="left"),
                        item_map=item_map)
    if candidate_items is not None:
        ranked = ranked.join(candidate_items.select(ITEM_IDX).distinct(), on=ITEM_IDX, how="inner")
    order = [F.col("popularity").desc(), F.col(ITEM_IDX).asc()]
    # Global and small: one row per item with recent interactions, an order over the catalogue, not over users.
    return ranked.select(
        ITEM_IDX, "category", "popularity",
        F.row_number().over(Window.orderBy(*order)).alias("pop_rank"),
        F.when(F.col("category").isNotNull(),
               F.row_number().over(Window.partitionBy("category").orderBy(*order))).alias("category_rank"),
    )


def user_top_categories(pairs: DataFrame, *, item_categories: DataFrame, n: int) -> DataFrame:
    """Each user's ``n`` categories with the greatest summed confidence (ties by name).

    Args:
        pairs: ``user_idx, item_idx, confidence``.
        item_categories: ``item_idx, category``.

    Returns:
        ``user_idx, category, user_category_rank`` (1 = top).
    """
    require_columns(pairs, [USER_IDX, ITEM_IDX, CONFIDENCE], step="user_top_categories")
    sums = (pairs.join(item_categories.select(ITEM_IDX, "category"), on=ITEM_IDX, how="inner")
            .where(F.col("category").isNotNull())
            .groupBy(USER_IDX, "category").agg(F.sum(CONFIDENCE).alias("_weight")))
    rank = F.row_number().over(Window.partitionBy(USER_IDX).orderBy(F.col("_weight").desc(), F.col("category")))
    return sums.select(USER_IDX, "category", rank.alias("user_category_rank")).where(
        F.col("user_category_rank") <= n)


def popularity_candidates(users: DataFrame, *, popularity: DataFrame, exclusions: DataFrame | None,
                          user_categories: DataFrame | None) -> DataFrame:
    """The fallback chain for each user: popular items in their top categories, then popular items.

    Args:
        users: ``user_idx, need``: how many rows each user should get.
        popularity: from :func:`item_popularity`.
        exclusions: ``user_idx, item_idx`` never to return (seen, bought, already chosen...).
        user_categories: from :func:`user_top_categories`; None gives plain ``popular``.

    Returns:
        ``user_idx, item_idx, source, position, score``: ``position`` 1..need in list order,
        ``score`` the item's popularity. A user gets fewer rows only when the catalogue runs out.
    """
    excluded_counts = (exclusions.groupBy(USER_IDX).agg(F.count(F.lit(1)).alias("_excluded"))
                       if exclusions is not None else None)
    wanted = users.select(USER_IDX, "need").where(F.col("need") > 0)
    if excluded_counts is not None:
        wanted = wanted.join(excluded_counts, on=USER_IDX, how="left")
    else:
        wanted = wanted.withColumn("_excluded", F.lit(0))
    # The first need + excluded entries of a ranked list always hold `need` usable items (if it is that long):
    # an exploded range joined on rank is an equi-join, never a users x items comparison.
    depth = wanted.select(USER_IDX, "need", (F.col("need") + F.coalesce(F.col("_excluded"), F.lit(0))).alias("_depth"))
    ranks = depth.select(USER_IDX, "need", F.explode(F.sequence(F.lit(1), F.col("_depth"))).alias("_r"))
    popular_items = popularity.select(ITEM_IDX, "popularity", F.col("pop_rank").alias("_r"))
    popular = ranks.join(F.broadcast(popular_items), on="_r", how="inner").select(
        USER_IDX, "need", ITEM_IDX, F.lit("popular").alias("source"), F.lit(1 << 30).alias("_group"),
        F.col("_r"), F.col("popularity").alias("score"))
    parts = [popular]
    if user_categories is not None:
        by_category = popularity.where(F.col("category").isNotNull()).select(
            ITEM_IDX, "category", "popularity", F.col("category_rank").alias("_r"))
        category = (ranks.join(user_categories, on=USER_IDX, how="inner")
                    .join(by_category, on=["category", "_r"], how="inner")
                    .select(USER_IDX, "need", ITEM_IDX, F.lit("popular_in_category").alias("source"),
                            F.col("user_category_rank").alias("_group"), F.col("_r"),
                            F.col("popularity").alias("score")))
        parts.insert(0, category)
    candidates = parts[0]
    for part in parts[1:]:
        candidates = candidates.unionByName(part)
    if exclusions is not None:
        candidates = candidates.join(exclusions.select(USER_IDX, ITEM_IDX), on=[USER_IDX, ITEM_IDX], how="left_anti")
    first = Window.partitionBy(USER_IDX, ITEM_IDX).orderBy("_group", "_r")
    order = Window.partitionBy(USER_IDX).orderBy("_group", "_r", ITEM_IDX)
    return (candidates.withColumn("_first", F.row_number().over(first)).where(F.col("_first") == 1)
            .withColumn("position", F.row_number().over(order))
            .where(F.col("position") <= F.col("need"))
            .select(USER_IDX, ITEM_IDX, "source", F.col("position").cast("int").alias("position"),
                    F.col("score").cast("double").alias("score")))
