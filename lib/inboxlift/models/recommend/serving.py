"""Serving a recommender: the rows of each user's list, source by source, and their merge.

What ``inboxlift run recommend`` writes to ``recommendations`` (the stage, :mod:`inboxlift.stages.recommend`,
reads the tables and the champion and writes the result): the served recommender's top k
(:func:`served_rows`), new arrivals by content (:func:`content_rows`), and the popularity fallbacks,
merged per user in source order (:func:`assemble_recommendations`), none of them recommending what
:func:`recommendation_exclusions` rules out.
"""

from __future__ import annotations

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.models.recommend.als import als_top_k
from inboxlift.models.recommend.data import ITEM_ID, ITEM_IDX, USER_ID, USER_IDX
from inboxlift.models.recommend.itemcf import CANDIDATE_FACTOR, blend, item_similarities, itemcf_top_k
from inboxlift.models.recommend.training import ALS_KIND, HYBRID_KIND, ITEMCF_KIND, RecommenderChoice
from inboxlift.models.similar import GROUP, ID, top_k_blocked

# Sources of recommendation rows. A user's list starts with the served recommender's rows (one of the
# first three: its kind, or "itemcf" for a hybrid's user unknown to ALS), then content, then fallbacks.
SOURCES = (ALS_KIND, HYBRID_KIND, ITEMCF_KIND, "content", "popular_in_category", "popular")
SOURCE_PRIORITY = {ALS_KIND: 0, HYBRID_KIND: 0, ITEMCF_KIND: 0, "content": 1, "popular_in_category": 2, "popular": 3}


def recommendation_exclusions(*, interactions: DataFrame, item_categories: DataFrame, negative: DataFrame | None,
                              exclude_purchased: bool, consumable_categories: list[str]) -> DataFrame:
    """(user_id, item_id) pairs no source may recommend: bought (except consumables) and negatively reviewed items.

    Args:
        interactions: the ``interactions`` table (``has_purchased``).
        item_categories: ``item_id, category``.
        negative: ``user_id, item_id`` of negative reviews, or None.
    """
    parts = []
    if exclude_purchased:
        consumable = [c.lower() for c in consumable_categories]
        bought = (interactions.where(F.col("has_purchased")).select(USER_ID, ITEM_ID)
                  .join(item_categories.select(ITEM_ID, "category"), on=ITEM_ID, how="left"))
        if consumable:
            bought = bought.where(~F.coalesce(F.lower(F.col("category")).isin(*consumable), F.lit(False)))
        parts.append(bought.select(USER_ID, ITEM_ID))
    if negative is not None:
        parts.append(negative.select(USER_ID, ITEM_ID))
    if not parts:
        return interactions.select(USER_ID, ITEM_ID).limit(0)
    out = parts[0]
    for part in parts[1:]:
        out = out.unionByName(part)
    return out.where(F.col(USER_ID).isNotNull() & F.col(ITEM_ID).isNotNull()).distinct()


def content_rows(*, anchors: DataFrame, new_items: DataFrame, vectors: DataFrame, exclusions: DataFrame,
                 slots: int, neighbours: int, block_size: int, chunk_size: int) -> DataFrame:
    """Up to ``slots`` new arrivals per user, by content similarity to the user's anchor items.

    Each new item's ``neighbours`` nearest items by content (within its top-level category) are
    found block-wise; a user's score for a new item is its best similarity to one of the user's
    anchors. Returns ``user_idx, item_idx, score, position``.
    """
    if slots <= 0:
        return anchors.select(USER_IDX, ITEM_IDX, F.lit(0.0).alias("score"), F.lit(1).alias("position")).limit(0)
    queries = vectors.join(new_items.select(F.col(ITEM_IDX).alias(ID)).distinct(), on=ID, how="inner")
    nearest = top_k_blocked(queries, vectors, k=neighbours, block_size=block_size, chunk_size=chunk_size,
                            group_col=GROUP, exclude_self=True).where(F.col("score") > 0)
    picks = (anchors.join(nearest.select(F.col("query_id").alias("_new"), F.col("item_id").alias(ITEM_IDX), "score"),
                          on=ITEM_IDX, how="inner")
             .groupBy(USER_IDX, F.col("_new").alias("_item")).agg(F.max("score").alias("score"))
             .withColumnRenamed("_item", ITEM_IDX)
             .join(exclusions, on=[USER_IDX, ITEM_IDX], how="left_anti"))
    order = Window.partitionBy(USER_IDX).orderBy(F.col("score").desc(), F.col(ITEM_IDX))
    return (picks.withColumn("position", F.row_number().over(order)).where(F.col("position") <= slots)
            .select(USER_IDX, ITEM_IDX, F.col("score").cast("double").alias("score"), "position"))


def assemble_recommendations(*, users: DataFrame, primary: DataFrame, content: DataFrame, fallback_for,
                             top_n: int) -> DataFrame:
    """Merge the sources into one list per user of at most ``top_n`` rows.

    Content rows keep their (at most ``content_slots``) places; the served recommender's rows
    (``primary``: ``user_idx, rank, item_idx, score, source``) fill the rest, then
    ``fallback_for(needs, chosen)`` (which gets ``user_idx, need`` and the pairs already chosen)
    returns ``popular_in_category`` / ``popular`` rows. Ranks follow the source order
    (recommender, content, popular_in_category, popular), then each source's own order.

    Returns ``user_idx, rank, item_idx, score, source``.
    """
    content_count = content.groupBy(USER_IDX).agg(F.count(F.lit(1)).alias("_content"))
    primary_kept = (
        primary.join(content.select(USER_IDX, ITEM_IDX), on=[USER_IDX, ITEM_IDX], how="left_anti")
        .join(content_count, on=USER_IDX, how="left")
        .withColumn("_keep", F.row_number().over(Window.partitionBy(USER_IDX).orderBy("rank", ITEM_IDX)))
        .where(F.col("_keep") <= F.lit(top_n) - F.coalesce(F.col("_content"), F.lit(0)))
        .select(USER_IDX, ITEM_IDX, "score", "source", F.col("_keep").alias("position")))
    chosen = primary_kept.unionByName(content.select(USER_IDX, ITEM_IDX, "score", F.lit("content").alias("source"),
                                                     "position"))
    chosen_count = chosen.groupBy(USER_IDX).agg(F.count(F.lit(1)).alias("_chosen"))
    needs = (users.select(USER_IDX).distinct().join(chosen_count, on=USER_IDX, how="left")
             .select(USER_IDX, (F.lit(top_n) - F.coalesce(F.col("_chosen"), F.lit(0))).alias("need"))
             .where(F.col("need") > 0))
    fallback = fallback_for(needs, chosen.select(USER_IDX, ITEM_IDX)).select(USER_IDX, ITEM_IDX, "score", "source",
                                                                              "position")
    rows = chosen.unionByName(fallback)
    priority = F.create_map(*[x for s, p in SOURCE_PRIORITY.items() for x in (F.lit(s), F.lit(p))])
    order = Window.partitionBy(USER_IDX).orderBy(priority[F.col("source")], F.col("position"), F.col(ITEM_IDX))
    return rows.select(USER_IDX, F.row_number().over(order).cast("int").alias("rank"), ITEM_IDX,
                       F.col("score").cast("double").alias("score"), "source")


def served_rows(choice: RecommenderChoice, *, model: ALSModel, baskets: DataFrame | None, users: DataFrame,
                exclusions: DataFrame, in_stock: DataFrame, k: int, block_size: int, chunk_size: int) -> DataFrame:
    """The served recommender's top ``k`` per user: ``user_idx, rank, item_idx, score, source``.

    ALS and item-CF rows are labelled by their kind; a hybrid's rows are ``hybrid`` for users ALS
    knows and ``itemcf`` for the others (their list is item-CF's alone).
    """
    def als_rows(depth: int) -> DataFrame:
        return als_top_k(model, users, k=depth, block_size=block_size, chunk_size=chunk_size,
                         exclusions=exclusions, candidate_items=in_stock)

    def itemcf_rows(depth: int) -> DataFrame:
        similarities = item_similarities(baskets, params=choice.itemcf)
        return itemcf_top_k(baskets, similarities, k=depth, users=users, exclusions=exclusions,
                            candidate_items=in_stock)

    if choice.kind == ALS_KIND:
        return als_rows(k).withColumn("source", F.lit(ALS_KIND))
    if choice.kind == ITEMCF_KIND:
        return itemcf_rows(k).withColumn("source", F.lit(ITEMCF_KIND))
    depth = CANDIDATE_FACTOR * k
    blended = blend(als_rows(depth), itemcf_rows(depth), als_weight=choice.als_weight, k=k)
    return blended.select(USER_IDX, "rank", ITEM_IDX, "score",
                          F.when(F.col("has_als"), F.lit(HYBRID_KIND)).otherwise(F.lit(ITEMCF_KIND)).alias("source"))
