"""Item-based collaborative filtering from co-occurrence, and its blend with ALS (the hybrid).

**Baskets.** A user's basket is their ``basket_items`` most recent items (latest interaction first,
ties by item index): views, carts and purchases alike, so pairs cover "bought together" and "viewed,
then bought". The cap bounds the pairs a user adds to ``basket_items * (basket_items - 1)``.

**Similarity** of items i and j: cosine of their basket columns, ``co(i, j) / sqrt(n_i * n_j)``, with
``co`` the baskets holding both, ``n`` the baskets holding one; pairs in fewer than ``min_support``
baskets are dropped. Pairs are made by a self-join of baskets on the user, in Spark SQL: never an
items x items cross join. Each item keeps its ``neighbours`` most similar items.

**Scores.** A user's score for item j is ``sum over basket items i of sim(i, j)``, each basket item
counting once; items the user has seen are excluded. **Hybrid**: ALS's and item-CF's top lists, each divided by the
user's best score of that source, blended ``w * als + (1 - w) * itemcf``. Why cosine, and the
measurements: docs/recommend.md#item-based-cf.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.models.recommend.data import ITEM_IDX, LAST_TS, USER_IDX
from inboxlift.schemas import require_columns

SIMILAR_ITEM_IDX = "similar_item_idx"
# Blending draws from each source's top (CANDIDATE_FACTOR * k) items of a user: an item further down
# both lists would need the other source's best score to reach the top k.
CANDIDATE_FACTOR = 5
# Scores are sums of products in whatever order Spark adds them; rounded before ranking, so a rerun
# ranks ties the same way.
_SCORE_DIGITS = 9


@dataclass(frozen=True)
class ItemCfParams:
    """Item-based CF: basket cap per user, neighbours kept per item, least co-occurrence counted."""

    basket_items: int = 10
    neighbours: int = 30
    min_support: int = 2

    def as_params(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}.{k}": json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, str], prefix: str) -> "ItemCfParams | None":
        try:
            return cls(**{k: int(json.loads(params[f"{prefix}.{k}"])) for k in asdict(cls())})
        except (KeyError, ValueError, TypeError):
            return None


def recent_baskets(pairs: DataFrame, *, basket_items: int) -> DataFrame:
    """Each user's ``basket_items`` latest pairs: ``user_idx, item_idx``.

    Args:
        pairs: ``user_idx, item_idx, last_ts`` (one row per pair, e.g. from ``data.decayed_pairs``).
    """
    require_columns(pairs, [USER_IDX, ITEM_IDX, LAST_TS], step="recent_baskets")
    latest = Window.partitionBy(USER_IDX).orderBy(F.col(LAST_TS).desc(), F.col(ITEM_IDX))
    return (pairs.where(F.col(USER_IDX).isNotNull() & F.col(ITEM_IDX).isNotNull())
            .withColumn("_recent", F.row_number().over(latest)).where(F.col("_recent") <= basket_items)
            .select(USER_IDX, ITEM_IDX))


def item_similarities(baskets: DataFrame, *, params: ItemCfParams,
                      candidate_items: DataFrame | None = None) -> DataFrame:
    """Each item's ``params.neighbours`` most similar items by co-occurrence cosine (itself never).

    Args:
        baskets: from :func:`recent_baskets`.
        candidate_items: when given (``item_idx``), only these items may be neighbours (e.g. in stock).

    Returns ``item_idx, rank, similar_item_idx, score`` (rank 1 the most similar; ties by index).
    """
    require_columns(baskets, [USER_IDX, ITEM_IDX], step="item_similarities")
    held = baskets.select(USER_IDX, ITEM_IDX).distinct()
    counts = held.groupBy(ITEM_IDX).agg(F.count(F.lit(1)).alias("_n"))
    left = held.select(USER_IDX, F.col(ITEM_IDX).alias("_i"))
    right = held.select(USER_IDX, F.col(ITEM_IDX).alias("_j"))
    together = (left.join(right, on=USER_IDX, how="inner").where(F.col("_i") != F.col("_j"))
                .groupBy("_i", "_j").agg(F.count(F.lit(1)).alias("_co"))
                .where(F.col("_co") >= params.min_support))
    n_i = counts.select(F.col(ITEM_IDX).alias("_i"), F.col("_n").alias("_ni"))
    n_j = counts.select(F.col(ITEM_IDX).alias("_j"), F.col("_n").alias("_nj"))
    cosine = F.round(F.col("_co") / F.sqrt(F.col("_ni").cast("double") * F.col("_nj")), _SCORE_DIGITS)
    scored = (together.join(n_i, on="_i", how="inner").join(n_j, on="_j", how="inner")
              .select("_i", "_j", cosine.alias("score")))
    if candidate_items is not None:
        allowed = candidate_items.select(F.col(ITEM_IDX).alias("_j")).distinct()
        scored = scored.join(allowed, on="_j", how="inner")
    order = Window.partitionBy("_i").orderBy(F.col("score").desc(), F.col("_j"))
    return (scored.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= params.neighbours)
            .select(F.col("_i").alias(ITEM_IDX), F.col("rank").cast("int").alias("rank"),
                    F.col("_j").alias(SIMILAR_ITEM_IDX), "score"))


def itemcf_top_k(baskets: DataFrame, similarities: DataFrame, *, k: int, exclusions: DataFrame | None = None,
                 users: DataFrame | None = None, candidate_items: DataFrame | None = None) -> DataFrame:
    """Top ``k`` items per user by item-based CF (see the module docstring).

    Args:
        baskets: from :func:`recent_baskets`.
        similarities: from :func:`item_similarities`.
        exclusions: ``user_idx, item_idx`` never to recommend (seen, bought, disliked).
        users: ``user_idx`` to score (default: every user with a basket).
        candidate_items: ``item_idx`` that may be recommended (default: any).

    Returns:
        ``user_idx, rank, item_idx, score``; a user whose basket items have no neighbours gets no rows.
    """
    anchors = baskets.select(USER_IDX, F.col(ITEM_IDX).alias("_anchor"))
    if users is not None:
        anchors = anchors.join(users.select(USER_IDX).distinct(), on=USER_IDX, how="inner")
    neighbours = similarities.select(F.col(ITEM_IDX).alias("_anchor"), F.col(SIMILAR_ITEM_IDX).alias(ITEM_IDX),
                                     F.col("score").alias("_sim"))
    if candidate_items is not None:
        neighbours = neighbours.join(candidate_items.select(ITEM_IDX).distinct(), on=ITEM_IDX, how="inner")
    scores = (anchors.join(neighbours, on="_anchor", how="inner")
              .groupBy(USER_IDX, ITEM_IDX).agg(F.round(F.sum("_sim"), _SCORE_DIGITS).alias("score")))
    if exclusions is not None:
        scores = scores.join(exclusions.select(USER_IDX, ITEM_IDX), on=[USER_IDX, ITEM_IDX], how="left_anti")
    return _ranked(scores, k=k)


def blend(als: DataFrame, itemcf: DataFrame, *, als_weight: float, k: int) -> DataFrame:
    """The hybrid: each source's scores divided by the user's best of that source, then blended.

    ``als_weight * als + (1 - als_weight) * itemcf``, an item missing from a source's list scoring 0
    there; negative ALS scores count as 0. Weight 1 is ALS's ranking, weight 0 item-CF's.

    Args:
        als, itemcf: ``user_idx, item_idx, score`` (each source's top list of a user).

    Returns:
        ``user_idx, rank, item_idx, score, has_als`` (``has_als``: the user had ALS candidates).
    """
    def normalised(frame: DataFrame, name: str) -> DataFrame:
        positive = F.greatest(F.col("score").cast("double"), F.lit(0.0))
        best = F.max(positive).over(Window.partitionBy(USER_IDX))
        return frame.select(USER_IDX, ITEM_IDX, F.when(best > 0, positive / best).otherwise(F.lit(0.0)).alias(name))

    both = normalised(als, "_als").join(normalised(itemcf, "_cf"), on=[USER_IDX, ITEM_IDX], how="full_outer")
    has_als = F.max(F.col("_als").isNotNull()).over(Window.partitionBy(USER_IDX))
    score = F.round(F.lit(float(als_weight)) * F.coalesce(F.col("_als"), F.lit(0.0))
                    + F.lit(1.0 - float(als_weight)) * F.coalesce(F.col("_cf"), F.lit(0.0)), _SCORE_DIGITS)
    blended = both.select(USER_IDX, ITEM_IDX, score.alias("score"), has_als.alias("has_als"))
    order = Window.partitionBy(USER_IDX).orderBy(F.col("score").desc(), F.col(ITEM_IDX))
    return (blended.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= k)
            .select(USER_IDX, F.col("rank").cast("int").alias("rank"), ITEM_IDX, "score", "has_als"))


def _ranked(scores: DataFrame, *, k: int) -> DataFrame:
    order = Window.partitionBy(USER_IDX).orderBy(F.col("score").desc(), F.col(ITEM_IDX))
    return (scores.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= k)
            .select(USER_IDX, F.col("rank").cast("int").alias("rank"), ITEM_IDX,
                    F.col("score").cast("double").alias("score")))
