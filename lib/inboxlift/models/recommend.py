"""The recommender: implicit-feedback ALS, tuned and evaluated against popularity baselines, tracked in MLflow.

**Ids.** ALS needs 32-bit integer ids. :func:`new_id_rows` numbers ids not seen before after the
largest index in use, so a persistent map (``id_map_users``, ``id_map_items``) only ever grows:
an id keeps its index for ever and no two ids share one. Numbering is deterministic (by hash
bucket, then id) and needs no single-partition sort.

**Training data** come from ``events`` (views, carts, purchases before a cut-off), aggregated per
(user, item) into exponentially decayed counts per event type (:func:`decayed_pairs`, half-life
``features.half_life_days``, age measured from the cut-off). Confidence is their weighted sum
(:func:`with_confidence`): the features' weights, or each weight set of ``recommend.confidence_weights``
— the same definition as ``interactions.confidence``, recomputable for any cut-off.

**Evaluation protocol** (time-based, nothing from the future). With ``C`` the cut-off (the end of
the as-of day), the test window is ``[C - test_days, C)`` and the validation window the
``validation_days`` before it.

- A model is trained on the events before its window; its *relevant* items for a user are the items
  the user interacted with (``relevance: interaction``) or bought (``purchase``) in the window and
  had never interacted with before it. Items seen before the window are removed from every
  candidate list (they could never be a hit), which is why they are not relevant either.
- *Evaluated users* have at least one relevant item and some training history (ALS knows them);
  ``users_evaluated_share`` is their share of all users with a relevant item (the rest are cold
  users, served by fallbacks in production).
- ALS and the two baselines rank for exactly the same users with the same exclusions:
  ``popular`` (the items most distinct users interacted with in the ``popularity_days`` before the
  training cut-off) and ``popular_in_category`` (the same ranking within the user's top
  ``fallback_categories`` categories by summed confidence, then ``popular`` for what is left —
  the production fallback chain).

**Metrics** at ``k`` (``recommend.k``), each averaged over evaluated users; for a user with relevant
set ``R`` (``|R| >= 1``) and top-k list ``L``, ``rel_i = 1`` when the item at rank ``i`` is in ``R``:

- ``precision_at_k = |L ∩ R| / k`` (k even when fewer than k items were recommended);
- ``recall_at_k = |L ∩ R| / |R|``;
- ``ndcg_at_k = DCG / IDCG``, ``DCG = sum_i rel_i / log2(i + 1)``, ``IDCG`` the DCG of a perfect list
  (``sum_{i <= min(k, |R|)} 1 / log2(i + 1)``);
- ``map_at_k``: the mean over users of ``AP@k = (1 / min(k, |R|)) * sum_i rel_i * precision_at_i``
  (the normalisation by ``min(k, |R|)`` makes a perfect list score 1 for a user with fewer than k
  relevant items);
- ``catalog_coverage_at_k``: distinct items in the evaluated users' top-k lists over the items in the
  training data.

**Tuning**: every point of ``ranks x reg_params x alphas x confidence weights`` is trained on the data
before the validation window and scored by NDCG@k on it; the best (ties: listed first) is trained on
the data before the test window and evaluated there beside the baselines, then trained on all data
before ``C``: that model is the one logged and registered.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.models.als import CatalogueTooLarge, fit_collective_als, release_factors
from inboxlift.models.similar import top_k_blocked
from inboxlift.settings import RecommendSettings

USER_ID, ITEM_ID = "user_id", "item_id"
USER_IDX, ITEM_IDX = "user_idx", "item_idx"
CONFIDENCE = "confidence"
VIEW, ADD_TO_CART, PURCHASE = "view", "add_to_cart", "purchase"
INTERACTION_TYPES = (VIEW, ADD_TO_CART, PURCHASE)
# Sources of recommendation rows, in the order a user's list is filled.
SOURCES = ("als", "content", "popular_in_category", "popular")
SOURCE_PRIORITY = {s: i for i, s in enumerate(SOURCES)}
MODEL_ARTIFACT = "als_model"
MODELS = ("als", "popular_in_category", "popular")
METRICS = ("precision", "recall", "ndcg", "map", "catalog_coverage")
MAX_INDEX = 2**31 - 1
ID_BUCKETS = 64


def metric_name(metric: str, k: int) -> str:
    """``ndcg`` -> ``ndcg_at_10``: MLflow names may not hold ``@``."""
    return f"{metric}_at_{k}"


def _require(df: DataFrame, columns: Sequence[str], *, step: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{step}: input lacks columns {missing}; it has {sorted(df.columns)}")


# ---- ids ---------------------------------------------------------------------------------------

def new_id_rows(ids: DataFrame, *, existing: DataFrame | None, id_col: str, idx_col: str,
                buckets: int = ID_BUCKETS) -> DataFrame:
    """Index rows for the ids of ``ids`` that ``existing`` does not hold yet.

    New ids are numbered from ``max(existing index) + 1`` without gaps: by hash bucket of the id,
    then by id within a bucket, so the same set of new ids always gets the same indexes and no
    partition has to hold them all. Raises ``OverflowError`` past 2**31 - 1 (ALS ids are ints).

    Returns:
        ``id_col, idx_col`` (int), one row per new id; empty when there is none.
    """
    _require(ids, [id_col], step="new_id_rows")
    fresh = ids.select(id_col).where(F.col(id_col).isNotNull()).distinct()
    if existing is not None:
        _require(existing, [id_col, idx_col], step="new_id_rows (existing)")
        fresh = fresh.join(existing.select(id_col), on=id_col, how="left_anti")
    bucket, position = "_bucket", "_position"
    numbered = fresh.withColumn(bucket, F.pmod(F.xxhash64(F.col(id_col)), F.lit(buckets))).withColumn(
        position, F.row_number().over(Window.partitionBy(bucket).orderBy(id_col)))
    sizes = numbered.groupBy(bucket).agg(F.count(F.lit(1)).alias("_size"))
    # At most `buckets` rows: a window without partitions is fine here.
    before = Window.orderBy(bucket).rowsBetween(Window.unboundedPreceding, -1)
    offsets = sizes.select(bucket, "_size", F.coalesce(F.sum("_size").over(before), F.lit(0)).alias("_offset"))
    totals = offsets.agg(F.sum("_size").alias("added"))
    if existing is not None:
        totals = totals.crossJoin(existing.agg(F.max(idx_col).alias("top")))
    row = totals.first()
    added = int(row["added"] or 0)
    top = row["top"] if existing is not None else None
    base = -1 if top is None else int(top)
    if base + added > MAX_INDEX:
        raise OverflowError(f"{added} new ids after index {base} would pass the 32-bit limit {MAX_INDEX}")
    return numbered.join(F.broadcast(offsets.select(bucket, "_offset")), on=bucket, how="inner").select(
        id_col, (F.lit(base + 1) + F.col("_offset") + F.col(position) - 1).cast("int").alias(idx_col))


def to_indexes(df: DataFrame, *, user_map: DataFrame | None = None, item_map: DataFrame | None = None) -> DataFrame:
    """Replace ``user_id`` / ``item_id`` by their indexes (rows whose id has no index are dropped).

    The maps hold each id once (:func:`new_id_rows`), so the joins cannot multiply rows.
    """
    out = df
    if user_map is not None:
        out = out.join(user_map.select(USER_ID, USER_IDX), on=USER_ID, how="inner").drop(USER_ID)
    if item_map is not None:
        out = out.join(item_map.select(ITEM_ID, ITEM_IDX), on=ITEM_ID, how="inner").drop(ITEM_ID)
    return out


# ---- interactions from events ------------------------------------------------------------------

def _ts(value: dt.datetime):
    return F.lit(value).cast("timestamp")


def _events_between(events: DataFrame, *, start: dt.datetime | None, end: dt.datetime,
                    types: Sequence[str]) -> DataFrame:
    _require(events, [USER_ID, ITEM_ID, "event_type", "event_ts"], step="events")
    scoped = events.where(F.col("event_ts") < _ts(end)).where(F.col("event_type").isin(*types))
    if start is not None:
        scoped = scoped.where(F.col("event_ts") >= _ts(start))
    if "event_date" in events.columns:
        # Partition pruning, one day loose on both sides (see features_common.filter_events_as_of).
        scoped = scoped.where(F.col("event_date") <= F.lit(end.date() + dt.timedelta(days=1)))
        if start is not None:
            scoped = scoped.where(F.col("event_date") >= F.lit(start.date() - dt.timedelta(days=1)))
    return scoped.where(F.col(USER_ID).isNotNull() & F.col(ITEM_ID).isNotNull())


def decayed_pairs(events: DataFrame, *, cutoff: dt.datetime, half_life_days: float) -> DataFrame:
    """Events before ``cutoff`` -> one row per (user, item) viewed, carted or bought.

    Returns ``user_id, item_id, view_w, cart_w, purchase_w, has_purchased``: per event type, the
    sum over events of ``0.5 ** (age_days / half_life_days)``, the age measured from ``cutoff``.
    """
    scoped = _events_between(events, start=None, end=cutoff, types=INTERACTION_TYPES)
    age_days = (F.unix_seconds(_ts(cutoff)) - F.unix_seconds(F.col("event_ts"))).cast("double") / 86400.0
    decay = F.pow(F.lit(0.5), age_days / F.lit(float(half_life_days)))
    kind = F.col("event_type")

    def decayed(event_type: str):
        # Rounded so that re-runs over the same data give the same bits whatever the summation order.
        return F.round(F.coalesce(F.sum(F.when(kind == event_type, decay)), F.lit(0.0)), 9)

    return scoped.groupBy(USER_ID, ITEM_ID).agg(
        decayed(VIEW).alias("view_w"), decayed(ADD_TO_CART).alias("cart_w"), decayed(PURCHASE).alias("purchase_w"),
        F.max(kind == PURCHASE).alias("has_purchased"),
    ).select(USER_ID, ITEM_ID, "view_w", "cart_w", "purchase_w", "has_purchased")


def with_confidence(pairs: DataFrame, *, weights: Sequence[float]) -> DataFrame:
    """Adds ``confidence = view * view_w + cart * cart_w + purchase * purchase_w``; drops pairs at 0."""
    _require(pairs, ["view_w", "cart_w", "purchase_w"], step="with_confidence")
    view, cart, purchase = (float(w) for w in weights)
    confidence = (F.lit(view) * F.col("view_w") + F.lit(cart) * F.col("cart_w")
                  + F.lit(purchase) * F.col("purchase_w"))
    return pairs.withColumn(CONFIDENCE, confidence).where(F.col(CONFIDENCE) > 0)


def window_items(events: DataFrame, *, start: dt.datetime, end: dt.datetime, relevance: str) -> DataFrame:
    """(user, item) pairs with an interaction (or a purchase, for ``relevance='purchase'``) in ``[start, end)``."""
    types = (PURCHASE,) if relevance == "purchase" else INTERACTION_TYPES
    return _events_between(events, start=start, end=end, types=types).select(USER_ID, ITEM_ID).distinct()


# ---- ALS ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlsParams:
    """One ALS configuration: hyperparameters, confidence weights and fitting controls."""

    rank: int
    reg_param: float
    alpha: float
    weights: tuple[float, float, float]
    max_iter: int = 10
    seed: int = 42
    checkpoint_interval: int = 5
    num_user_blocks: int = 0
    num_item_blocks: int = 0
    solver: str = "collective"

    @property
    def label(self) -> str:
        w = "/".join(f"{x:g}" for x in self.weights)
        return f"rank={self.rank} reg={self.reg_param:g} alpha={self.alpha:g} weights={w}"

    def as_params(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}.{k}": json.dumps(list(v)) if isinstance(v, tuple) else str(v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, str], prefix: str) -> "AlsParams | None":
        """The params :meth:`as_params` wrote, or None when a run does not have them."""
        try:
            return cls(rank=int(params[f"{prefix}.rank"]), reg_param=float(params[f"{prefix}.reg_param"]),
                       alpha=float(params[f"{prefix}.alpha"]),
                       weights=tuple(float(x) for x in json.loads(params[f"{prefix}.weights"])),
                       max_iter=int(params[f"{prefix}.max_iter"]), seed=int(params[f"{prefix}.seed"]),
                       checkpoint_interval=int(params.get(f"{prefix}.checkpoint_interval", 5)),
                       solver=params.get(f"{prefix}.solver", "spark"),
                       num_user_blocks=int(params.get(f"{prefix}.num_user_blocks", 0)),
                       num_item_blocks=int(params.get(f"{prefix}.num_item_blocks", 0)))
        except (KeyError, ValueError, TypeError):
            return None


def param_grid(settings: RecommendSettings, *, default_weights: Sequence[float]) -> list[AlsParams]:
    """Every point of the tuning grid, in settings order (the first wins ties)."""
    weight_sets = [tuple(float(x) for x in w) for w in settings.confidence_weights] or [
        tuple(float(x) for x in default_weights)]
    return [AlsParams(rank=r, reg_param=float(reg), alpha=float(a), weights=w, max_iter=settings.max_iter,
                      seed=settings.seed, checkpoint_interval=settings.checkpoint_interval,
                      num_user_blocks=settings.num_user_blocks, num_item_blocks=settings.num_item_blocks,
                      solver=settings.als_solver)
            for w, r, reg, a in itertools.product(weight_sets, settings.ranks, settings.reg_params, settings.alphas)]


def als_estimator(params: AlsParams, *, default_blocks: int) -> ALS:
    """Implicit-feedback ALS on (``user_idx``, ``item_idx``, ``confidence``)."""
    return ALS(
        rank=params.rank, maxIter=params.max_iter, regParam=params.reg_param, alpha=params.alpha,
        implicitPrefs=True, userCol=USER_IDX, itemCol=ITEM_IDX, ratingCol=CONFIDENCE, seed=params.seed,
        checkpointInterval=params.checkpoint_interval, coldStartStrategy="drop", nonnegative=False,
        numUserBlocks=params.num_user_blocks or default_blocks, numItemBlocks=params.num_item_blocks or default_blocks,
    )


def default_blocks(spark) -> int:
    """ALS blocks when settings say 0: the session's shuffle partitions (at least 1)."""
    try:
        return max(1, int(spark.conf.get("spark.sql.shuffle.partitions")))
    except (ValueError, TypeError):
        return 10


def fit_als(ratings: DataFrame, params: AlsParams) -> ALSModel:
    """Fit implicit ALS on ``user_idx, item_idx, confidence`` with ``params.solver``: inboxlift's
    collective ALS (:mod:`inboxlift.models.als`) or Spark ML's ``ALS``. Both give an ``ALSModel``.

    The collective fit needs every task's item sums in memory: when its tasks report a catalogue for
    which they would pass ``models.als.MAX_ITEM_SUMS_BYTES``, it stops before any step and Spark's
    ALS fits instead; the fallback is printed.
    """
    _require(ratings, [USER_IDX, ITEM_IDX, CONFIDENCE], step="fit_als")
    pairs = ratings.select(USER_IDX, ITEM_IDX, CONFIDENCE)
    if params.solver == "collective":
        try:
            return fit_collective_als(pairs, user_col=USER_IDX, item_col=ITEM_IDX, rating_col=CONFIDENCE,
                                      rank=params.rank, max_iter=params.max_iter, reg_param=params.reg_param,
                                      alpha=params.alpha, seed=params.seed)
        except CatalogueTooLarge as error:
            print(f"{error}; fitting with Spark's ALS instead")
    elif params.solver != "spark":
        raise ValueError(f"fit_als: solver must be 'collective' or 'spark', got {params.solver!r}")
    estimator = als_estimator(params, default_blocks=default_blocks(ratings.sparkSession))
    return estimator.fit(pairs)


def blas_implementation(spark) -> str:
    """The JVM BLAS ALS uses (native when a system BLAS is found), or "unknown" (e.g. on Spark Connect)."""
    try:
        jvm = spark.sparkContext._jvm  # noqa: SLF001 - the only way to ask the JVM which BLAS it loaded
        return str(jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName())
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def als_top_k(model: ALSModel, users: DataFrame, *, k: int, block_size: int, chunk_size: int,
              exclusions: DataFrame | None = None, candidate_items: DataFrame | None = None) -> DataFrame:
    """Top ``k`` items per user of ``users`` (column ``user_idx``) by ALS score, blocked (no ``recommendForAllUsers``).

    Args:
        exclusions: ``user_idx, item_idx`` pairs never to recommend (seen, bought, disliked).
        candidate_items: ``item_idx`` of the items that may be recommended (default: all the model knows).

    Returns:
        ``user_idx, rank, item_idx, score``; users unknown to the model get no rows.
    """
    queries = model.userFactors.join(users.select(F.col(USER_IDX).alias("id")).distinct(), on="id", how="inner")
    pairs = None
    if exclusions is not None:
        # As pairs, hashed to the users' blocks: no per-user list is built (see models.similar).
        pairs = exclusions.select(F.col(USER_IDX).alias("id"), F.col(ITEM_IDX).alias("excluded_id"))
    candidates = model.itemFactors
    if candidate_items is not None:
        candidates = candidates.join(candidate_items.select(F.col(ITEM_IDX).alias("id")).distinct(), on="id",
                                     how="inner")
    return top_k_blocked(queries, candidates, k=k, block_size=block_size, chunk_size=chunk_size,
                         exclusions=pairs).select(
        F.col("query_id").alias(USER_IDX), "rank", F.col("item_id").alias(ITEM_IDX),
        F.col("score").cast("double").alias("score"))


# ---- popularity and fallbacks ------------------------------------------------------------------

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
    recent = _events_between(events, start=end - dt.timedelta(days=days), end=end, types=INTERACTION_TYPES)
    counts = recent.groupBy(ITEM_ID).agg(F.countDistinct(USER_ID).cast("double").alias("popularity"))
    ranked = to_indexes(counts.join(item_categories.select(ITEM_ID, "category"), on=ITEM_ID, how="left"),
                        item_map=item_map)
    if candidate_items is not None:
        ranked = ranked.join(candidate_items.select(ITEM_IDX).distinct(), on=ITEM_IDX, how="inner")
    order = [F.col("popularity").desc(), F.col(ITEM_IDX).asc()]
    # One row per item with recent interactions: a global order over the catalogue, not over users.
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
    _require(pairs, [USER_IDX, ITEM_IDX, CONFIDENCE], step="user_top_categories")
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


# ---- metrics -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankingMetrics:
    """Mean ranking metrics at k over the evaluated users (definitions in the module docstring)."""

    k: int
    users: int
    precision: float
    recall: float
    ndcg: float
    map: float
    catalog_coverage: float

    def named(self, prefix: str) -> dict[str, float]:
        """``{"<prefix>/precision_at_10": ..., ...}``: the exact MLflow metric names."""
        return {f"{prefix}/{metric_name(m, self.k)}": float(getattr(self, m)) for m in METRICS}


def ranking_metrics(recommended: DataFrame, relevant: DataFrame, *, users: DataFrame, k: int,
                    catalog_size: int, user_col: str = USER_IDX, item_col: str = ITEM_IDX) -> RankingMetrics:
    """Precision, recall, NDCG and MAP at ``k`` and catalogue coverage, averaged over ``users``.

    Args:
        recommended: ``user, rank, item`` (ranks 1.. distinct per user); ranks above k are ignored.
        relevant: ``user, item`` (distinct).
        users: the evaluated users (column ``user``); each must have a relevant item to count.
        catalog_size: the coverage denominator.
    """
    _require(recommended, [user_col, "rank", item_col], step="ranking_metrics (recommended)")
    _require(relevant, [user_col, item_col], step="ranking_metrics (relevant)")
    evaluated = users.select(user_col).distinct()
    relevant_counts = (relevant.select(user_col, item_col).distinct().join(evaluated, on=user_col, how="inner")
                       .groupBy(user_col).agg(F.count(F.lit(1)).alias("_relevant")))
    top = recommended.where(F.col("rank") <= k).join(relevant_counts.select(user_col), on=user_col, how="inner")
    hits = top.join(relevant.select(user_col, item_col).distinct(), on=[user_col, item_col], how="inner")
    hit_no = F.row_number().over(Window.partitionBy(user_col).orderBy("rank", item_col))
    per_user_hits = (hits.withColumn("_hit_no", hit_no)
                     .groupBy(user_col).agg(
                         F.count(F.lit(1)).alias("_hits"),
                         F.sum(1.0 / F.log2(F.col("rank") + 1.0)).alias("_dcg"),
                         F.sum(F.col("_hit_no") / F.col("rank")).alias("_ap_sum")))
    ideal = F.least(F.lit(k), F.col("_relevant"))
    idcg = F.aggregate(F.sequence(F.lit(1), ideal), F.lit(0.0).cast("double"),
                       lambda acc, i: acc + 1.0 / F.log2(i.cast("double") + 1.0))
    per_user = relevant_counts.join(per_user_hits, on=user_col, how="left").select(
        (F.coalesce(F.col("_hits"), F.lit(0)) / F.lit(float(k))).alias("precision"),
        (F.coalesce(F.col("_hits"), F.lit(0)) / F.col("_relevant")).alias("recall"),
        (F.coalesce(F.col("_dcg"), F.lit(0.0)) / idcg).alias("ndcg"),
        (F.coalesce(F.col("_ap_sum"), F.lit(0.0)) / ideal).alias("map"),
    )
    means = per_user.agg(F.count(F.lit(1)).alias("users"),
                         *[F.avg(m).alias(m) for m in ("precision", "recall", "ndcg", "map")])
    covered = top.agg(F.countDistinct(item_col).alias("covered"))
    row = means.crossJoin(covered).first()  # one row: both aggregates in one job
    n_users, covered = int(row["users"]), int(row["covered"])

    def mean(name: str) -> float:
        return float(row[name]) if n_users and row[name] is not None else 0.0

    return RankingMetrics(k=k, users=n_users, precision=mean("precision"), recall=mean("recall"), ndcg=mean("ndcg"),
                          map=mean("map"), catalog_coverage=covered / catalog_size if catalog_size else 0.0)


# ---- one split: train before a cut-off, evaluate on the window after it ------------------------

@dataclass
class SplitData:
    """What every model is evaluated on for one window (indexes, not ids)."""

    name: str
    train_cutoff: dt.datetime
    end: dt.datetime
    pairs: DataFrame             # user_idx, item_idx, view_w, cart_w, purchase_w, has_purchased (persisted)
    relevant: DataFrame          # user_idx, item_idx: new-to-user items of the window, evaluated users only
    users: DataFrame             # user_idx of the evaluated users
    popularity: DataFrame        # item_popularity as of the train cut-off
    user_categories: DataFrame   # user_top_categories from the training pairs
    users_evaluated: int
    users_with_relevant: int
    train_items: int

    @property
    def users_evaluated_share(self) -> float:
        return self.users_evaluated / self.users_with_relevant if self.users_with_relevant else 0.0

    def release(self) -> None:
        for frame in (self.pairs, self.relevant, self.users, self.popularity, self.user_categories):
            frame.unpersist()


@dataclass(frozen=True)
class Evaluation:
    """ALS and both baselines on one split."""

    split: str
    params: AlsParams
    metrics: dict[str, RankingMetrics]
    users_evaluated: int
    users_with_relevant: int

    @property
    def users_evaluated_share(self) -> float:
        return self.users_evaluated / self.users_with_relevant if self.users_with_relevant else 0.0

    def named(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for model, metrics in self.metrics.items():
            out.update(metrics.named(f"{self.split}/{model}"))
        out[f"{self.split}/users_evaluated"] = float(self.users_evaluated)
        out[f"{self.split}/users_with_relevant_items"] = float(self.users_with_relevant)
        out[f"{self.split}/users_evaluated_share"] = self.users_evaluated_share
        return out

    def table(self) -> list[str]:
        k = next(iter(self.metrics.values())).k
        names = [metric_name(m, k) for m in METRICS]
        lines = [f"  {'model':<21}" + "".join(f"{n:>{len(n) + 2}}" for n in names)]
        for model in MODELS:
            if model in self.metrics:
                m = self.metrics[model]
                values = [f"{getattr(m, x):>{len(n) + 2}.4f}" for x, n in zip(METRICS, names)]
                lines.append(f"  {model:<21}" + "".join(values))
        lines.append(f"  users evaluated: {self.users_evaluated} of {self.users_with_relevant} with relevant items "
                     f"({self.users_evaluated_share:.1%})")
        return lines


@dataclass(frozen=True)
class TuningPoint:
    params: AlsParams
    ndcg: float
    seconds: float


@dataclass
class TrainedRecommender:
    """The result of :meth:`RecommenderTraining.run`."""

    params: AlsParams
    model: ALSModel
    tuning: list[TuningPoint]
    test: Evaluation
    fit_seconds: float
    training_pairs: int
    training_users: int
    training_items: int
    cutoffs: dict[str, str] = field(default_factory=dict)


class RecommenderTraining:
    """Tune, evaluate and fit ALS on ``events`` as of a cut-off (see the module docstring).

    Args:
        events: the ``events`` table (``user_id, item_id, event_type, event_ts[, event_date]``).
        item_categories: ``item_id, category``, one row per item.
        user_map, item_map: the id maps, covering every user and item of ``events``.
        cutoff: the end of the data used; the test window ends here.
        default_weights, half_life_days: the features' confidence weights and decay.
    """

    def __init__(self, *, events: DataFrame, item_categories: DataFrame, user_map: DataFrame, item_map: DataFrame,
                 settings: RecommendSettings, cutoff: dt.datetime, default_weights: Sequence[float],
                 half_life_days: float) -> None:
        self.events = events
        self.item_categories = to_indexes(item_categories.select(ITEM_ID, "category"), item_map=item_map)
        self.item_categories_by_id = item_categories.select(ITEM_ID, "category")
        self.user_map = user_map
        self.item_map = item_map
        self.settings = settings
        self.cutoff = cutoff
        self.default_weights = tuple(float(w) for w in default_weights)
        self.half_life_days = half_life_days
        self.test_start = cutoff - dt.timedelta(days=settings.test_days)
        self.validation_start = self.test_start - dt.timedelta(days=settings.validation_days)

    # -- data

    def pairs_before(self, cutoff: dt.datetime) -> DataFrame:
        """Decayed (user_idx, item_idx) counts before ``cutoff``."""
        pairs = decayed_pairs(self.events, cutoff=cutoff, half_life_days=self.half_life_days)
        return to_indexes(pairs, user_map=self.user_map, item_map=self.item_map)

    def split(self, name: str, *, train_cutoff: dt.datetime, end: dt.datetime) -> SplitData:
        s = self.settings
        pairs = self.pairs_before(train_cutoff).persist()
        window = to_indexes(window_items(self.events, start=train_cutoff, end=end, relevance=s.relevance),
                            user_map=self.user_map, item_map=self.item_map)
        new_to_user = window.join(pairs.select(USER_IDX, ITEM_IDX), on=[USER_IDX, ITEM_IDX], how="left_anti")
        with_relevant = new_to_user.select(USER_IDX).distinct()
        users = with_relevant.join(pairs.select(USER_IDX).distinct(), on=USER_IDX, how="inner").persist()
        relevant = new_to_user.join(users, on=USER_IDX, how="inner").persist()
        popularity = item_popularity(self.events, item_categories=self.item_categories_by_id, end=train_cutoff,
                                     days=s.popularity_days, item_map=self.item_map).persist()
        categories = user_top_categories(with_confidence(pairs, weights=self.default_weights),
                                         item_categories=self.item_categories, n=s.fallback_categories).persist()
        counts = (users.agg(F.count(F.lit(1)).alias("evaluated"))
                  .crossJoin(with_relevant.agg(F.count(F.lit(1)).alias("with_relevant")))
                  .crossJoin(pairs.agg(F.countDistinct(ITEM_IDX).alias("items"))).first())
        return SplitData(name=name, train_cutoff=train_cutoff, end=end, pairs=pairs, relevant=relevant, users=users,
                         popularity=popularity, user_categories=categories, users_evaluated=int(counts["evaluated"]),
                         users_with_relevant=int(counts["with_relevant"]), train_items=int(counts["items"]))

    # -- models

    def fit(self, pairs: DataFrame, params: AlsParams) -> ALSModel:
        return fit_als(with_confidence(pairs, weights=params.weights), params)

    def als_ranking(self, model: ALSModel, data: SplitData) -> DataFrame:
        s = self.settings
        return als_top_k(model, data.users, k=s.k, block_size=s.user_block_size, chunk_size=s.item_block_size,
                         exclusions=data.pairs.select(USER_IDX, ITEM_IDX))

    def baseline_ranking(self, data: SplitData, *, by_category: bool) -> DataFrame:
        users = data.users.select(USER_IDX, F.lit(self.settings.k).alias("need"))
        return popularity_candidates(
            users, popularity=data.popularity, exclusions=data.pairs.select(USER_IDX, ITEM_IDX),
            user_categories=data.user_categories if by_category else None,
        ).select(USER_IDX, F.col("position").alias("rank"), ITEM_IDX)

    def score(self, ranking: DataFrame, data: SplitData) -> RankingMetrics:
        # Persisted: the ranking (an ALS scoring pass) feeds both the per-user metrics and the coverage.
        top = ranking.where(F.col("rank") <= self.settings.k).persist()
        try:
            return ranking_metrics(top, data.relevant, users=data.users, k=self.settings.k,
                                   catalog_size=data.train_items)
        finally:
            top.unpersist()

    def evaluate(self, model: ALSModel, data: SplitData, params: AlsParams, *, baselines: bool = True) -> Evaluation:
        metrics = {"als": self.score(self.als_ranking(model, data), data)}
        if baselines:
            metrics["popular_in_category"] = self.score(self.baseline_ranking(data, by_category=True), data)
            metrics["popular"] = self.score(self.baseline_ranking(data, by_category=False), data)
        return Evaluation(split=data.name, params=params, metrics=metrics, users_evaluated=data.users_evaluated,
                          users_with_relevant=data.users_with_relevant)

    def tune(self, grid: Sequence[AlsParams]) -> list[TuningPoint]:
        """Each grid point's NDCG@k on the validation window (trained on the data before it)."""
        if len(grid) == 1:
            return [TuningPoint(params=grid[0], ndcg=math.nan, seconds=0.0)]
        data = self.split("validation", train_cutoff=self.validation_start, end=self.test_start)
        points = []
        try:
            for params in grid:
                started = time.perf_counter()
                model = self.fit(data.pairs, params)
                try:
                    ndcg = self.evaluate(model, data, params, baselines=False).metrics["als"].ndcg
                finally:
                    release_factors(model)
                points.append(TuningPoint(params=params, ndcg=ndcg, seconds=time.perf_counter() - started))
        finally:
            data.release()
        return points

    def test_split(self) -> SplitData:
        return self.split("test", train_cutoff=self.test_start, end=self.cutoff)

    def run(self, grid: Sequence[AlsParams]) -> tuple[TrainedRecommender, SplitData]:
        """Tune, evaluate the chosen params on the test window, fit on everything before the cut-off.

        Returns the result and the test split, still persisted (for the champion's evaluation on the
        same data); call its ``release()`` when done.
        """
        tuning = self.tune(grid)
        chosen = max(tuning, key=lambda p: (-math.inf if math.isnan(p.ndcg) else p.ndcg,
                                            -tuning.index(p))).params
        test = self.test_split()
        test_model = self.fit(test.pairs, chosen)
        try:
            evaluation = self.evaluate(test_model, test, chosen)
        finally:
            release_factors(test_model)
        full = self.pairs_before(self.cutoff).persist()
        try:
            started = time.perf_counter()
            model = self.fit(full, chosen)
            seconds = time.perf_counter() - started
            counts = full.agg(F.count(F.lit(1)), F.countDistinct(USER_IDX), F.countDistinct(ITEM_IDX)).first()
        finally:
            full.unpersist()
        cutoffs = {"validation_start": self.validation_start.isoformat(), "test_start": self.test_start.isoformat(),
                   "cutoff": self.cutoff.isoformat()}
        return TrainedRecommender(params=chosen, model=model, tuning=tuning, test=evaluation, fit_seconds=seconds,
                                  training_pairs=int(counts[0]), training_users=int(counts[1]),
                                  training_items=int(counts[2]), cutoffs=cutoffs), test


# ---- MLflow ------------------------------------------------------------------------------------

def model_signature():
    """ALS scores (user_idx, item_idx) pairs: ``prediction`` is the implicit preference score."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("integer", USER_IDX), ColSpec("integer", ITEM_IDX)]),
                          outputs=Schema([ColSpec("float", "prediction")]))


def flat_settings(settings: RecommendSettings) -> dict[str, str]:
    return {f"settings.{k}": json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else str(v)
            for k, v in asdict(settings).items()}


def plot_against_baselines(evaluation: Evaluation):
    """Grouped bars: each metric at k for ALS and the baselines on the test window."""
    import numpy as np
    from matplotlib.figure import Figure

    k = evaluation.metrics["als"].k
    models = [m for m in MODELS if m in evaluation.metrics]
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(METRICS))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [getattr(evaluation.metrics[model], m) for m in METRICS]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=model)
    ax.set_xticks(x, [metric_name(m, k) for m in METRICS])
    ax.set(title=f"Test window: ALS vs baselines ({evaluation.users_evaluated} users)", ylabel="mean over users")
    ax.legend()
    return figure


def log_recommender(trained: TrainedRecommender, *, data: Mapping[str, Any], settings: RecommendSettings,
                    examples: Mapping[str, list[dict[str, Any]]], blas: str) -> str:
    """Log one training into the active MLflow run; returns the model's artifact path.

    Logs settings and the chosen params, the data description (``data``: tables, versions, id-map
    versions, cut-offs), the tuning grid (``validation/als/ndcg_at_k``, step = grid position), every
    test metric under its exact name, the plot, example recommendations and the model with signature.
    """
    import mlflow
    import mlflow.spark

    k = settings.k
    mlflow.log_params({**flat_settings(settings), **trained.params.as_params("chosen"),
                       **{f"data.{name}": str(value) for name, value in data.items()},
                       **{f"data.{name}": value for name, value in trained.cutoffs.items()},
                       "data.training_pairs": str(trained.training_pairs),
                       "data.training_users": str(trained.training_users),
                       "data.training_items": str(trained.training_items),
                       "evaluation.relevance": settings.relevance,
                       "evaluation.protocol": "time split; relevant = new-to-user items in the window; "
                                              "seen items excluded; users with history and a relevant item"})
    for step, point in enumerate(trained.tuning):
        if not math.isnan(point.ndcg):
            mlflow.log_metrics({f"validation/als/{metric_name('ndcg', k)}": point.ndcg,
                                "validation/fit_and_score_seconds": point.seconds}, step=step)
    mlflow.log_text("\n".join(["position,rank,reg_param,alpha,weights,ndcg,seconds"] + [
        f"{i},{p.params.rank},{p.params.reg_param},{p.params.alpha},{'/'.join(map(str, p.params.weights))},"
        f"{p.ndcg},{p.seconds:.2f}" for i, p in enumerate(trained.tuning)]) + "\n", "recommend/tuning.csv")
    mlflow.log_metrics({**trained.test.named(), "fit_seconds": trained.fit_seconds})
    mlflow.set_tags({"blas": blas, "chosen_params": trained.params.label})
    mlflow.log_text("\n".join(trained.test.table()) + "\n", "recommend/test_metrics.txt")
    mlflow.log_figure(plot_against_baselines(trained.test), "plots/als_vs_baselines.png")
    mlflow.log_dict(dict(examples), "recommend/example_recommendations.json")
    mlflow.spark.log_model(trained.model, artifact_path=MODEL_ARTIFACT, signature=model_signature(),
                           pip_requirements=mlflow.spark.get_default_pip_requirements())
    return MODEL_ARTIFACT


def load_als(model_uri: str) -> ALSModel:
    """The ALS model logged at ``model_uri`` (MLflow stores it wrapped in a one-stage pipeline)."""
    import mlflow.spark

    loaded = mlflow.spark.load_model(model_uri)
    stages = getattr(loaded, "stages", [loaded])
    model = stages[0]
    if not isinstance(model, ALSModel):
        raise TypeError(f"{model_uri} holds a {type(model).__name__}, not an ALSModel")
    return model
