"""User segments: K-means and bisecting K-means over user features, chosen by silhouette, named by rules.

**The pipeline** is one Spark ML ``PipelineModel``, logged to MLflow and loaded as it is by scoring,
so new users go through exactly the preprocessing the model was trained with:

====================  ==================================================================================
stage                 what it does
====================  ==================================================================================
SQLTransformer        reads ``segments.feature_columns`` as doubles; a null (or NaN) becomes its
                      ``segments.null_fill`` value (0 when not listed); ``segments.log_columns`` become
                      ``log1p(max(x, 0))`` (counts and money are skewed; refunds can make money negative)
VectorAssembler       one vector
StandardScaler        centred, unit variance
PCA (optional)        ``segments.pca_components`` > 0: the scaled vector on that many components
anchor (bisecting)    bisecting K-means only: a constant 1.0 appended to the vector (see below)
KMeansModel or        the raw cluster, ``_seg_cluster`` (k-means|| initialisation for K-means)
BisectingKMeansModel
SQLTransformer        raw cluster -> ``segment_id``, ``segment_name``, and ``prediction`` (= segment_id,
                      the column MLflow's pyfunc returns)
====================  ==================================================================================

Why the anchor: Spark's bisecting K-means splits a cluster by nudging its centre by 1e-4 times the
centre's norm; on centred data the root centre is the origin, the nudge is zero and the data is
never split (one cluster whatever ``k``). A constant coordinate makes every centre's norm at least
1 and changes no distance (every point and centre has the same 1.0 there).

**Choosing k.** Each algorithm in ``segments.algorithms`` is fitted for every k in
``[k_min, k_max]`` on the scaled features. The choice is the (algorithm, k) with the highest
silhouette with squared Euclidean distance (Spark's ``ClusteringEvaluator``), measured on a
deterministic sample of at most ``segments.silhouette_sample_rows`` users (the users with the
smallest ``xxhash64(user_id, seed)``: the same users in every run); ties go to the smaller k, then
to the algorithm listed first. The within-cluster sum of squares (cost, in the scaled space, on
all users) is reported beside it with each algorithm's elbow (the k farthest below the straight line
from the first to the last k of the normalised cost curve). **Stability:** the chosen
(algorithm, k) is refitted with each of ``segments.stability_seeds``; the adjusted Rand index
between every two seeds' assignments of all users is reported (mean and minimum).

**Segment ids** are ordered by descending mean monetary value (then orders, size, raw cluster),
so the same segmentation gets the same ids whatever seed or initialisation labelled its clusters.

**Profiles** (one row per segment): size, share, the mean of every feature and role column in its
own units (days, orders, money, rates; the mean over users who have a value), the most common price
band, the share of users whose price band is ``naming.bargain_price_band``, and the top categories
(the categories most often among the users' ``top_categories``).

**Names** come from these rules, applied in order to each segment's profile ``c`` against the mean
of all users ``p``; the first rule that holds names the segment. A rule is skipped when a role it
uses has no column (``segments.roles``) or no value; a ratio rule is skipped when ``p`` is 0.
Thresholds are ``segments.naming``. When two segments get the same name, the one with the higher
segment id gets a suffix (" 2", " 3", ...). The same table is in ``docs/segments.md``.

=====  =====================  ==================================================================================
order  name                   rule
=====  =====================  ==================================================================================
1      VIP loyal              c.monetary >= vip_monetary_ratio * p.monetary and c.frequency >=
                              vip_frequency_ratio * p.frequency and c.recency < at_risk_recency_days
2      at-risk big spenders   c.monetary >= big_spender_monetary_ratio * p.monetary and c.recency >=
                              at_risk_recency_days
3      new browsers           c.tenure <= new_tenure_days and c.frequency <= low_frequency_ratio * p.frequency
4      dormant                c.inactivity >= dormant_days (c.recency when no inactivity column)
5      bargain hunters        c.bargain_band_share >= bargain_band_share_ratio * p.bargain_band_share, or
                              c.order_value <= bargain_order_value_ratio * p.order_value
6      engaged readers        c.open_rate >= engaged_open_rate_ratio * p.open_rate
7      browsers               c.frequency <= low_frequency_ratio * p.frequency (look, rarely or never buy)
8      loyal regulars         c.frequency >= p.frequency
9      occasional shoppers    every other segment
=====  =====================  ==================================================================================
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from pyspark.errors import AnalysisException, IllegalArgumentException
from pyspark.ml import Pipeline, PipelineModel, Transformer
from pyspark.ml.clustering import BisectingKMeans, BisectingKMeansModel, KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import PCA, SQLTransformer, StandardScaler, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from inboxlift.metrics_cluster import pairwise_adjusted_rand_index
from inboxlift.models.kmeans import CollectiveKMeans, CollectiveKMeansModel, task_slots
from inboxlift.settings import SegmentNaming, SegmentSettings

USER_ID = "user_id"
SEGMENT_ID = "segment_id"
SEGMENT_NAME = "segment_name"
DISTANCE = "distance"
PREDICTION = "prediction"
ASSIGNMENT_COLUMNS = [USER_ID, SEGMENT_ID, SEGMENT_NAME, DISTANCE]

ALGORITHMS = ("kmeans", "bisecting_kmeans")
NUMERIC_ROLES = ("recency", "frequency", "monetary", "order_value", "activity", "inactivity", "open_rate", "tenure")
ROLES = (*NUMERIC_ROLES, "price_band", "categories")

# Metric names say what was measured: the silhouette uses squared Euclidean distance on a sample of
# users; the cost is the within-cluster sum of squared distances in the scaled feature space, on all users.
SILHOUETTE = "silhouette_sqeuclidean_sample"
COST = "within_cluster_sse_scaled"
STABILITY_MEAN = "stability_ari_mean_between_seeds"
STABILITY_MIN = "stability_ari_min_between_seeds"
MODEL_ARTIFACT = "segment_pipeline"
PROFILES_ARTIFACT = "segments/profiles.json"
POPULATION_ARTIFACT = "segments/population.json"
K_SEARCH_ARTIFACT = "segments/k_search.csv"

FEATURES_COL = "_seg_features"
POINTS_COL = "_seg_points"
_SCALED_COL = "_seg_scaled"
_RAW_VECTOR_COL = "_seg_raw"
_ANCHOR_COL = "_seg_anchor"
_ANCHORED_COL = "_seg_anchored"
CLUSTER_COL = "_seg_cluster"
_SAMPLE_RANK = "_seg_sample_rank"


# ---- parameters and results ----------------------------------------------------------------------

@dataclass(frozen=True)
class KCandidate:
    """One fitted (algorithm, k): how many clusters it found and how good they are."""

    algorithm: str
    k: int
    clusters: int
    silhouette: float
    cost: float
    seconds: float


@dataclass(frozen=True)
class Choice:
    algorithm: str
    k: int
    silhouette: float
    cost: float
    elbows: dict[str, int | None]
    reason: str


@dataclass(frozen=True)
class Stability:
    """Agreement of the chosen (algorithm, k) across seeds: the ARI of every pair of seeds."""

    seeds: tuple[int, ...]
    pairwise: dict[tuple[int, int], float]

    @property
    def mean(self) -> float:
        return sum(self.pairwise.values()) / len(self.pairwise) if self.pairwise else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.pairwise.values()) if self.pairwise else float("nan")


@dataclass(frozen=True)
class SegmentCentroid:
    """A segment's profile as the naming rules see it: role -> mean in original units."""

    cluster: int
    size: int
    means: dict[str, float | None]
    bargain_band_share: float | None = None


@dataclass(frozen=True)
class NamedSegment:
    cluster: int
    segment_id: int
    name: str
    rule: str


@dataclass
class SegmentModel:
    """A fitted segmentation: the pipeline that assigns users, and how it was chosen."""

    pipeline: PipelineModel
    params: SegmentSettings
    candidates: list[KCandidate]
    choice: Choice
    stability: Stability
    profiles: pd.DataFrame
    population: dict[str, float | None]
    training_rows: int
    silhouette_rows: int
    missing_roles: list[str] = field(default_factory=list)

    def transform(self, features: DataFrame) -> DataFrame:
        """``user_id, segment_id, segment_name, distance`` for every row of ``features``."""
        return assign_segments(features, pipeline=self.pipeline)

    def k_search(self) -> pd.DataFrame:
        return k_search_frame(self.candidates)


# ---- preprocessing -------------------------------------------------------------------------------

def _sql_double(value: float) -> str:
    return f"CAST({float(value)!r} AS DOUBLE)"


def _input_name(column: str) -> str:
    return f"_seg_in_{column}"


def check_params(params: SegmentSettings) -> None:
    """Raise ``ValueError`` naming the first inconsistent segment setting."""
    if not params.feature_columns:
        raise ValueError("segments.feature_columns is empty")
    not_features = sorted(set(params.log_columns) - set(params.feature_columns))
    if not_features:
        raise ValueError(f"segments.log_columns {not_features} are not in segments.feature_columns")
    unknown_roles = sorted(set(params.roles) - set(ROLES))
    if unknown_roles:
        raise ValueError(f"segments.roles has unknown roles {unknown_roles}; known: {list(ROLES)}")
    unknown_algorithms = sorted(set(params.algorithms) - set(ALGORITHMS))
    if unknown_algorithms or not params.algorithms:
        raise ValueError(f"segments.algorithms must be some of {list(ALGORITHMS)}, got {params.algorithms}")
    if not 2 <= params.k_min <= params.k_max:
        raise ValueError(f"segments.k_min and k_max must satisfy 2 <= k_min <= k_max, "
                         f"got {params.k_min}, {params.k_max}")
    if params.pca_components < 0 or params.pca_components > len(params.feature_columns):
        raise ValueError(f"segments.pca_components must be 0..{len(params.feature_columns)}, "
                         f"got {params.pca_components}")


def preprocessing_stages(params: SegmentSettings) -> list:
    """Unfitted stages turning ``feature_columns`` into the scaled vector ``_seg_features``."""
    logged = set(params.log_columns)
    expressions = []
    for column in params.feature_columns:
        fill = _sql_double(params.null_fill.get(column, 0.0))
        value = f"coalesce(nanvl(CAST(`{column}` AS DOUBLE), {fill}), {fill})"
        if column in logged:
            # log1p is undefined below -1; refunds can make money negative, so clip at 0 first.
            value = f"log1p(greatest({value}, CAST(0.0 AS DOUBLE)))"
        expressions.append(f"{value} AS `{_input_name(column)}`")
    stages: list = [
        SQLTransformer(statement=f"SELECT *, {', '.join(expressions)} FROM __THIS__"),
        VectorAssembler(inputCols=[_input_name(c) for c in params.feature_columns], outputCol=_RAW_VECTOR_COL),
    ]
    if params.pca_components:
        stages += [StandardScaler(inputCol=_RAW_VECTOR_COL, outputCol=_SCALED_COL, withMean=True, withStd=True),
                   PCA(k=params.pca_components, inputCol=_SCALED_COL, outputCol=FEATURES_COL)]
    else:
        stages.append(StandardScaler(inputCol=_RAW_VECTOR_COL, outputCol=FEATURES_COL, withMean=True, withStd=True))
    return stages


def anchor_stages() -> list[Transformer]:
    """The constant coordinate bisecting K-means needs on centred data (see the module docstring)."""
    return [SQLTransformer(statement=f"SELECT *, CAST(1.0 AS DOUBLE) AS {_ANCHOR_COL} FROM __THIS__"),
            VectorAssembler(inputCols=[FEATURES_COL, _ANCHOR_COL], outputCol=_ANCHORED_COL)]


def clusterer(params: SegmentSettings, *, algorithm: str, k: int,
              seed: int) -> CollectiveKMeans | KMeans | BisectingKMeans:
    """An unfitted K-means (k-means|| initialisation) or bisecting K-means writing ``_seg_cluster``."""
    if algorithm == "kmeans" and params.kmeans_solver == "collective":
        return CollectiveKMeans(k=k, seed=seed, maxIter=params.max_iter, tol=params.tol, initSteps=params.init_steps,
                                featuresCol=FEATURES_COL, predictionCol=CLUSTER_COL)
    if algorithm == "kmeans":
        return KMeans(k=k, seed=seed, maxIter=params.max_iter, tol=params.tol, initMode="k-means||",
                      initSteps=params.init_steps, solver=params.kmeans_solver, featuresCol=FEATURES_COL,
                      predictionCol=CLUSTER_COL)
    if algorithm == "bisecting_kmeans":
        return BisectingKMeans(k=k, seed=seed, maxIter=params.max_iter, featuresCol=_ANCHORED_COL,
                               predictionCol=CLUSTER_COL)
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")


def fit_clusterer(params: SegmentSettings, train: DataFrame, *, algorithm: str, k: int, seed: int):
    """``clusterer(...)`` fitted on ``train``; the fitted model reads ``_seg_features`` (a vector).

    When ``train`` also holds ``_seg_points`` (the same scaled features as an array, converted once
    when ``train`` was cached), the collective K-means fits on that: a vector-to-array conversion
    costs about as much as the whole fit on 1M users, and the search fits many times.
    """
    estimator = clusterer(params, algorithm=algorithm, k=k, seed=seed)
    if isinstance(estimator, CollectiveKMeans) and POINTS_COL in train.columns:
        return estimator.setFeaturesCol(POINTS_COL).fit(train).setFeaturesCol(FEATURES_COL)
    return estimator.fit(train)


def _for_algorithm(frame: DataFrame, algorithm: str) -> DataFrame:
    if algorithm != "bisecting_kmeans":
        return frame
    return PipelineModel(stages=anchor_stages()).transform(frame)


def silhouette_sample(features: DataFrame, *, rows: int, seed: int) -> DataFrame:
    """At most ``rows`` users: those with the smallest ``xxhash64(user_id, seed)`` (user id breaks ties).

    A hash, not ``sample()``: the same users are picked in every run and on every partitioning.
    """
    rank = F.xxhash64(F.col(USER_ID), F.lit(seed))
    return (features.withColumn(_SAMPLE_RANK, rank).orderBy(_SAMPLE_RANK, USER_ID).limit(rows)
            .drop(_SAMPLE_RANK))


def _silhouette(assigned: DataFrame, *, features_col: str, prediction_col: str) -> float:
    evaluator = ClusteringEvaluator(featuresCol=features_col, predictionCol=prediction_col,
                                    metricName="silhouette", distanceMeasure="squaredEuclidean")
    try:
        return float(evaluator.evaluate(assigned))
    except IllegalArgumentException:
        # Spark refuses a silhouette of one cluster: there is nothing to compare.
        return float("nan")


# ---- choosing k ----------------------------------------------------------------------------------

def elbow_k(points: Sequence[tuple[int, float]]) -> int | None:
    """The k of a cost curve farthest below the chord from its first to its last point (None for < 3 points).

    Both axes are scaled to [0, 1] first, so the answer does not depend on the cost's units.
    """
    finite = sorted((k, c) for k, c in points if not math.isnan(c))
    if len(finite) < 3:
        return None
    (k0, c0), (k1, c1) = finite[0], finite[-1]
    if c0 == c1:
        return None
    best_k, best_gap = None, 0.0
    for k, c in finite[1:-1]:
        x = (k - k0) / (k1 - k0)
        y = (c - c1) / (c0 - c1)
        # The chord runs from (0, 1) to (1, 0): its height at x is 1 - x.
        gap = (1 - x) - y
        if gap > best_gap:
            best_k, best_gap = k, gap
    return best_k


def choose_candidate(candidates: Sequence[KCandidate], *, algorithms: Sequence[str], sample_rows: int) -> Choice:
    """The highest silhouette; ties to the smaller k, then to the algorithm listed first."""
    usable = [c for c in candidates if not math.isnan(c.silhouette)]
    if not usable:
        raise ValueError("no candidate segmentation has two clusters or more: the users cannot be segmented")
    order = {a: i for i, a in enumerate(algorithms)}
    ranked = sorted(usable, key=lambda c: (-c.silhouette, c.k, order.get(c.algorithm, len(order))))
    best = ranked[0]
    elbows = {a: elbow_k([(c.k, c.cost) for c in candidates if c.algorithm == a]) for a in algorithms}
    runner_up = (f"; runner-up {ranked[1].algorithm} k={ranked[1].k} at {ranked[1].silhouette:.4f}"
                 if len(ranked) > 1 else "")
    elbow_text = ", ".join(f"{a} k={k}" if k is not None else f"{a} none" for a, k in elbows.items())
    found = f" ({best.clusters} clusters found)" if best.clusters != best.k else ""
    reason = (f"{best.algorithm} with k={best.k}{found}: the highest silhouette (squared Euclidean, on a sample of "
              f"{sample_rows} users) among {len(candidates)} candidates, {best.silhouette:.4f}{runner_up}. "
              f"Within-cluster sum of squares {best.cost:.1f}; elbow of the cost curve: {elbow_text}.")
    return Choice(best.algorithm, best.k, best.silhouette, best.cost, elbows, reason)


def k_search_frame(candidates: Sequence[KCandidate]) -> pd.DataFrame:
    """The k search as a small table: one row per (algorithm, k)."""
    columns = ["algorithm", "k", "clusters", SILHOUETTE, COST, "fit_seconds"]
    return pd.DataFrame([(c.algorithm, c.k, c.clusters, c.silhouette, c.cost, c.seconds) for c in candidates],
                        columns=columns)


# ---- profiles and names --------------------------------------------------------------------------

def profile_columns(params: SegmentSettings, available: Sequence[str]) -> list[str]:
    """Feature columns and numeric role columns present in the data, each once, features first."""
    columns = list(params.feature_columns)
    for role in NUMERIC_ROLES:
        column = params.roles.get(role)
        if column and column in available and column not in columns:
            columns.append(column)
    return columns


def cluster_profiles(assigned: DataFrame, *, cluster_col: str, params: SegmentSettings) -> tuple[pd.DataFrame, dict]:
    """Per cluster: size, the mean of each profile column, price band facts, top categories.

    Returns the profile table (one row per cluster, so small) and the same means over all users.
    """
    columns = profile_columns(params, assigned.columns)
    band_col = params.roles.get("price_band")
    has_band = bool(band_col) and band_col in assigned.columns
    categories_col = params.roles.get("categories")
    has_categories = bool(categories_col) and categories_col in assigned.columns

    aggregates = [F.count(F.lit(1)).alias("size"),
                  *[F.avg(F.col(c).cast("double")).alias(f"mean_{c}") for c in columns]]
    if has_band:
        is_bargain = F.col(band_col) == F.lit(params.naming.bargain_price_band)
        aggregates.append(F.avg(F.when(is_bargain, 1.0).otherwise(0.0)).alias("bargain_band_share"))
    # rollup adds the all-users row (cluster null; a real cluster is never null) in the same pass.
    rolled = assigned.rollup(cluster_col).agg(*aggregates).toPandas()
    # One row per cluster (k rows) and one all-users row from here on: small by construction.
    is_total = rolled[cluster_col].isna()
    population: dict[str, float | None] = {
        k: _finite_or_none(v) for k, v in rolled[is_total].iloc[0].to_dict().items() if k != cluster_col}
    rows = rolled[~is_total].astype({cluster_col: "int64"}).reset_index(drop=True)

    if has_band:
        bands = (assigned.where(F.col(band_col).isNotNull())
                 .groupBy(cluster_col, F.col(band_col).alias("band")).agg(F.count(F.lit(1)).alias("users")))
        # Total order (users, then band name) so a tie gives the same band in every run.
        by_users = Window.partitionBy(cluster_col).orderBy(F.desc("users"), F.asc("band"))
        top_band = (bands.withColumn("_rank", F.row_number().over(by_users)).where(F.col("_rank") == 1)
                    .select(cluster_col, "band").collect())
        best = {int(r[cluster_col]): r["band"] for r in top_band}
        rows["top_price_band"] = rows[cluster_col].map(lambda c: best.get(int(c)))
    if has_categories:
        counts = (assigned.select(cluster_col, F.explode(F.col(categories_col)).alias("category"))
                  .where(F.col("category").isNotNull())
                  .groupBy(cluster_col, "category").agg(F.count(F.lit(1)).alias("users")))
        by_users = Window.partitionBy(cluster_col).orderBy(F.desc("users"), F.asc("category"))
        top = (counts.withColumn("_rank", F.row_number().over(by_users))
               .where(F.col("_rank") <= params.top_categories)
               .select(cluster_col, "_rank", "category").collect())
        ranked: dict[int, list[tuple[int, str]]] = {}
        for r in top:
            ranked.setdefault(int(r[cluster_col]), []).append((int(r["_rank"]), r["category"]))
        rows["top_categories"] = rows[cluster_col].map(lambda c: [name for _, name in sorted(ranked.get(int(c), []))])
    return rows, population


def _role_means(row: Mapping[str, Any], params: SegmentSettings) -> dict[str, float | None]:
    means = {}
    for role in NUMERIC_ROLES:
        column = params.roles.get(role)
        value = row.get(f"mean_{column}") if column else None
        means[role] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return means


def _at_least(c: float | None, ratio: float, p: float | None) -> bool:
    return c is not None and p is not None and p > 0 and c >= ratio * p


def _at_most(c: float | None, ratio: float, p: float | None) -> bool:
    return c is not None and p is not None and p > 0 and c <= ratio * p


def _ge(c: float | None, threshold: float) -> bool:
    return c is not None and c >= threshold


def _lt(c: float | None, threshold: float) -> bool:
    return c is not None and c < threshold


Rule = Callable[[SegmentCentroid, SegmentCentroid, SegmentNaming], bool]


def _dormancy(c: SegmentCentroid) -> float | None:
    return c.means.get("inactivity") if c.means.get("inactivity") is not None else c.means.get("recency")


# (name, rule as written in the docs, predicate on (segment, all users, thresholds)), first match wins.
NAMING_RULES: list[tuple[str, str, Rule]] = [
    ("VIP loyal",
     "monetary >= vip_monetary_ratio * all; frequency >= vip_frequency_ratio * all; recency < at_risk_recency_days",
     lambda c, p, t: (_at_least(c.means["monetary"], t.vip_monetary_ratio, p.means["monetary"])
                      and _at_least(c.means["frequency"], t.vip_frequency_ratio, p.means["frequency"])
                      and _lt(c.means["recency"], t.at_risk_recency_days))),
    ("at-risk big spenders",
     "monetary >= big_spender_monetary_ratio * all; recency >= at_risk_recency_days",
     lambda c, p, t: (_at_least(c.means["monetary"], t.big_spender_monetary_ratio, p.means["monetary"])
                      and _ge(c.means["recency"], t.at_risk_recency_days))),
    ("new browsers",
     "tenure <= new_tenure_days; frequency <= low_frequency_ratio * all",
     lambda c, p, t: (c.means["tenure"] is not None and c.means["tenure"] <= t.new_tenure_days
                      and _at_most(c.means["frequency"], t.low_frequency_ratio, p.means["frequency"]))),
    ("dormant",
     "inactivity (else recency) >= dormant_days",
     lambda c, p, t: _ge(_dormancy(c), t.dormant_days)),
    ("bargain hunters",
     "bargain band share >= bargain_band_share_ratio * all, or order_value <= bargain_order_value_ratio * all",
     lambda c, p, t: (_at_least(c.bargain_band_share, t.bargain_band_share_ratio, p.bargain_band_share)
                      or _at_most(c.means["order_value"], t.bargain_order_value_ratio, p.means["order_value"]))),
    ("engaged readers",
     "open_rate >= engaged_open_rate_ratio * all",
     lambda c, p, t: _at_least(c.means["open_rate"], t.engaged_open_rate_ratio, p.means["open_rate"])),
    ("browsers",
     "frequency <= low_frequency_ratio * all",
     lambda c, p, t: _at_most(c.means["frequency"], t.low_frequency_ratio, p.means["frequency"])),
    ("loyal regulars",
     "frequency >= all",
     lambda c, p, t: _at_least(c.means["frequency"], 1.0, p.means["frequency"])),
    ("occasional shoppers", "any other segment", lambda c, p, t: True),
]


def name_segment(centroid: SegmentCentroid, population: SegmentCentroid, naming: SegmentNaming) -> tuple[str, str]:
    """The first naming rule that holds for ``centroid``: ``(name, rule text)``."""
    for name, text, rule in NAMING_RULES:
        if rule(centroid, population, naming):
            return name, text
    raise AssertionError("the last naming rule always holds")


def segment_order(centroids: Sequence[SegmentCentroid]) -> list[int]:
    """Clusters in segment-id order: mean monetary value descending, then orders, size, raw cluster.

    A missing mean sorts last, so the order never depends on how the clusterer numbered clusters.
    """
    def key(c: SegmentCentroid) -> tuple:
        monetary, frequency = c.means.get("monetary"), c.means.get("frequency")
        return (monetary is None, -(monetary or 0.0), frequency is None, -(frequency or 0.0), -c.size, c.cluster)

    return [c.cluster for c in sorted(centroids, key=key)]


def name_segments(centroids: Sequence[SegmentCentroid], population: SegmentCentroid,
                  naming: SegmentNaming) -> list[NamedSegment]:
    """Segment ids and unique names for clusters, in segment-id order.

    A name given to more than one segment gets a suffix (" 2", " 3", ...) on every segment after the first.
    """
    by_cluster = {c.cluster: c for c in centroids}
    seen: dict[str, int] = {}
    named = []
    for segment_id, cluster in enumerate(segment_order(centroids)):
        name, rule = name_segment(by_cluster[cluster], population, naming)
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name} {seen[name]}"
        named.append(NamedSegment(cluster=cluster, segment_id=segment_id, name=unique, rule=rule))
    return named


def centroids_from_profiles(profiles: pd.DataFrame, *, cluster_col: str,
                            params: SegmentSettings) -> list[SegmentCentroid]:
    return [SegmentCentroid(cluster=int(row[cluster_col]), size=int(row["size"]), means=_role_means(row, params),
                            bargain_band_share=_finite_or_none(row.get("bargain_band_share")))
            for row in profiles.to_dict("records")]


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def relabel_stage(named: Sequence[NamedSegment]) -> SQLTransformer:
    """Raw cluster -> ``segment_id``, ``segment_name`` and ``prediction`` (= segment_id, for MLflow's pyfunc)."""
    by_cluster = {n.cluster: n for n in named}
    clusters = range(max(by_cluster) + 1)
    ids = ", ".join(str(by_cluster[c].segment_id) if c in by_cluster else "NULL" for c in clusters)

    def quoted(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    names = ", ".join(quoted(by_cluster[c].name) if c in by_cluster else "NULL" for c in clusters)
    segment_id = f"CAST(element_at(array({ids}), {CLUSTER_COL} + 1) AS INT)"
    return SQLTransformer(statement=(
        f"SELECT *, {segment_id} AS {SEGMENT_ID}, CAST(element_at(array({names}), {CLUSTER_COL} + 1) AS STRING) "
        f"AS {SEGMENT_NAME}, {segment_id} AS {PREDICTION} FROM __THIS__"))


# ---- assignment ----------------------------------------------------------------------------------

def clusterer_stage(pipeline: PipelineModel) -> CollectiveKMeansModel | KMeansModel | BisectingKMeansModel:
    """The fitted clusterer inside a segment pipeline."""
    for stage in pipeline.stages:
        if isinstance(stage, (CollectiveKMeansModel, KMeansModel, BisectingKMeansModel)):
            return stage
    raise ValueError(f"not a segment pipeline: no K-means stage among {[type(s).__name__ for s in pipeline.stages]}")


def with_distance_to_centroid(assigned: DataFrame, *, features_col: str, cluster_col: str,
                              centers: Sequence[Sequence[float]]) -> DataFrame:
    """Add ``distance``: the Euclidean distance from each row's vector to its cluster's centre.

    The centres (k x d numbers) travel as a literal; the arithmetic is plain element-wise Spark
    expressions (code-generated, no higher-order function and no Python per row).
    """
    center_table = F.array(*[F.array(*[F.lit(float(x)) for x in center]) for center in centers])
    center = F.element_at(center_table, F.col(cluster_col).cast("int") + 1)
    values = vector_to_array(F.col(features_col))
    width = len(centers[0]) if centers else 0
    squares = [(values.getItem(j) - center.getItem(j)) * (values.getItem(j) - center.getItem(j)) for j in range(width)]
    return assigned.withColumn(DISTANCE, F.sqrt(sum(squares, F.lit(0.0))))


def assign_segments(features: DataFrame, *, pipeline: PipelineModel) -> DataFrame:
    """``user_id, segment_id, segment_name, distance`` for every user of ``features`` (no retraining)."""
    if USER_ID not in features.columns:
        raise ValueError(f"assign_segments: input lacks columns ['{USER_ID}']; it has {sorted(features.columns)}")
    model = clusterer_stage(pipeline)
    return (pipeline.transform(features)
            .transform(with_distance_to_centroid, features_col=model.getFeaturesCol(),
                       cluster_col=model.getPredictionCol(), centers=[list(c) for c in model.clusterCenters()])
            .select(USER_ID, F.col(SEGMENT_ID).cast("int").alias(SEGMENT_ID), SEGMENT_NAME,
                    F.col(DISTANCE).cast("double").alias(DISTANCE)))


def pipeline_silhouette(sample: DataFrame, *, labels_from: PipelineModel, space: PipelineModel) -> float | None:
    """The silhouette (squared Euclidean) of ``labels_from``'s segments in ``space``'s scaled feature space.

    Two models are compared fairly by measuring both with this function on the same sample and
    the same space. Returns None when ``labels_from`` cannot score the sample (e.g. a column it
    was trained on is gone), NaN when it puts the whole sample in one segment.
    """
    try:
        # Analysis is eager: a column the model needs and the sample lacks fails here.
        labels = labels_from.transform(sample).select(USER_ID, F.col(SEGMENT_ID).alias("_seg_label"))
    except AnalysisException:
        return None
    points = space.transform(sample).select(USER_ID, FEATURES_COL)
    # user_id is unique in user_features, so the inner join keeps one row per sampled user.
    joined = points.join(labels, on=USER_ID, how="inner")
    return _silhouette(joined, features_col=FEATURES_COL, prediction_col="_seg_label")


# ---- the estimator -------------------------------------------------------------------------------

def required_columns(params: SegmentSettings) -> list[str]:
    return [USER_ID, *params.feature_columns]


class SegmentSearch:
    """Estimator: searches algorithms and k, checks stability, profiles and names the chosen segments.

    Configured from :class:`~inboxlift.settings.SegmentSettings` (``settings.segments``); ``fit``
    returns a :class:`SegmentModel`. Reads no table and logs nothing: the stage does that.
    """

    def __init__(self, params: SegmentSettings) -> None:
        check_params(params)
        self.params = params

    def fit(self, features: DataFrame) -> SegmentModel:
        params = self.params
        missing = [c for c in required_columns(params) if c not in features.columns]
        if missing:
            raise ValueError(f"segments: user_features lacks columns {missing}; it has {sorted(features.columns)}")
        # Checked before anything is fitted: the scaler cannot fit on no rows.
        enough = features.limit(params.k_min).count()
        if enough < params.k_min:
            raise ValueError(f"segments: {enough} users cannot make {params.k_min} segments")
        preprocessing = Pipeline(stages=preprocessing_stages(params)).fit(features)
        # Every candidate is fitted on the same scaled vectors, so they are computed once and kept;
        # with its input cached, KMeans does not cache a copy of its own.
        train = preprocessing.transform(features).select(USER_ID, FEATURES_COL)
        if params.kmeans_solver == "collective" and "kmeans" in params.algorithms:
            # As many partitions as task slots, once: each barrier fit then reads the cache as it is.
            train = (train.withColumn(POINTS_COL, vector_to_array(F.col(FEATURES_COL)))
                     .repartition(task_slots(features.sparkSession.sparkContext)))
        train = train.persist()
        sample = silhouette_sample(features, rows=params.silhouette_sample_rows, seed=params.seed).persist()
        sample_points = preprocessing.transform(sample).select(USER_ID, FEATURES_COL).persist()
        try:
            training_rows = train.count()
            sample_rows = sample_points.count()
            candidates, models = self._search(train, sample_points)
            choice = choose_candidate(candidates, algorithms=params.algorithms, sample_rows=sample_rows)
            chosen = models[(choice.algorithm, choice.k)]
            stability = self._stability(train, chosen, choice)
        finally:
            for frame in (train, sample_points, sample):
                frame.unpersist()

        anchors = anchor_stages() if choice.algorithm == "bisecting_kmeans" else []
        assigning = PipelineModel(stages=[*preprocessing.stages, *anchors, chosen])
        # Three aggregations (means, price bands, categories) read the assigned users: assign them once.
        assigned = assigning.transform(features).persist()
        try:
            raw_profiles, population_means = cluster_profiles(assigned, cluster_col=CLUSTER_COL, params=params)
        finally:
            assigned.unpersist()
        centroids = centroids_from_profiles(raw_profiles, cluster_col=CLUSTER_COL, params=params)
        population = SegmentCentroid(cluster=-1, size=int(population_means["size"]),
                                     means=_role_means(population_means, params),
                                     bargain_band_share=_finite_or_none(population_means.get("bargain_band_share")))
        named = name_segments(centroids, population, params.naming)
        pipeline = PipelineModel(stages=[*assigning.stages, relabel_stage(named)])
        profiles = _finish_profiles(raw_profiles, named, total=training_rows)
        missing_roles = [role for role in ROLES if params.roles.get(role) not in features.columns]
        return SegmentModel(pipeline=pipeline, params=params, candidates=candidates, choice=choice,
                            stability=stability, profiles=profiles, population=population_means,
                            training_rows=training_rows, silhouette_rows=sample_rows, missing_roles=missing_roles)

    def _search(self, train: DataFrame, sample_points: DataFrame) -> tuple[list[KCandidate], dict]:
        params = self.params
        candidates, models = [], {}
        for algorithm in params.algorithms:
            train_input = _for_algorithm(train, algorithm)
            sample_input = _for_algorithm(sample_points, algorithm)
            for k in range(params.k_min, params.k_max + 1):
                started = time.perf_counter()
                model = fit_clusterer(params, train_input, algorithm=algorithm, k=k, seed=params.seed)
                seconds = time.perf_counter() - started
                clusters = len(model.clusterCenters())
                silhouette = (_silhouette(model.transform(sample_input), features_col=FEATURES_COL,
                                          prediction_col=CLUSTER_COL) if clusters > 1 else float("nan"))
                candidates.append(KCandidate(algorithm, k, clusters, silhouette, float(model.summary.trainingCost),
                                             seconds))
                models[(algorithm, k)] = model
        return candidates, models

    def _stability(self, train: DataFrame, chosen: Any, choice: Choice) -> Stability:
        params = self.params
        seeds = [params.seed, *[s for s in params.stability_seeds if s != params.seed]]
        train_input = _for_algorithm(train, choice.algorithm)
        assigned = train_input
        for seed in seeds:
            model = chosen if seed == params.seed else fit_clusterer(
                params, train_input, algorithm=choice.algorithm, k=choice.k, seed=seed)
            # Each seed's labels go in their own column, so one pass assigns all of them; the
            # collective K-means reads the cached array copy instead of converting the vector again.
            overrides = {model.predictionCol: f"_seg_seed_{seed}"}
            if isinstance(model, CollectiveKMeansModel) and POINTS_COL in train_input.columns:
                overrides[model.featuresCol] = POINTS_COL
            assigned = model.copy(overrides).transform(assigned)
        columns = [f"_seg_seed_{seed}" for seed in seeds]
        pairwise = pairwise_adjusted_rand_index(assigned, columns=columns)
        return Stability(seeds=tuple(seeds),
                         pairwise={(int(a.rsplit("_", 1)[1]), int(b.rsplit("_", 1)[1])): v
                                   for (a, b), v in pairwise.items()})


def _finish_profiles(raw: pd.DataFrame, named: Sequence[NamedSegment], *, total: int) -> pd.DataFrame:
    """The profile table in segment-id order, with names, rules and shares."""
    by_cluster = {n.cluster: n for n in named}
    profiles = raw.copy()
    profiles.insert(0, SEGMENT_ID, profiles[CLUSTER_COL].map(lambda c: by_cluster[int(c)].segment_id))
    profiles.insert(1, SEGMENT_NAME, profiles[CLUSTER_COL].map(lambda c: by_cluster[int(c)].name))
    profiles.insert(2, "naming_rule", profiles[CLUSTER_COL].map(lambda c: by_cluster[int(c)].rule))
    profiles.insert(4, "share", profiles["size"] / total if total else 0.0)
    profiles = profiles.rename(columns={CLUSTER_COL: "model_cluster"})
    return profiles.sort_values(SEGMENT_ID).reset_index(drop=True)


# ---- MLflow --------------------------------------------------------------------------------------

def _mlflow_type(data_type: T.DataType) -> str:
    if isinstance(data_type, T.LongType):
        return "long"
    if isinstance(data_type, (T.IntegerType, T.ShortType, T.ByteType)):
        return "integer"
    if isinstance(data_type, T.FloatType):
        return "float"
    if isinstance(data_type, (T.DoubleType, T.DecimalType)):
        # The pipeline reads every feature as a double; MLflow has no decimal type.
        return "double"
    if isinstance(data_type, T.BooleanType):
        return "boolean"
    return "string"


def model_signature(features: DataFrame, params: SegmentSettings):
    """Inputs: the feature columns with their types (from the schema, no data read); output: the segment id."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    types = {f.name: f.dataType for f in features.schema.fields}
    inputs = Schema([ColSpec(_mlflow_type(types[c]), c, required=False) for c in params.feature_columns])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("integer", PREDICTION)]))


def _flat_params(params: SegmentSettings) -> dict[str, str]:
    flat = {}
    for key, value in asdict(params).items():
        if isinstance(value, dict) and key == "naming":
            flat.update({f"naming.{k}": str(v) for k, v in value.items()})
        elif isinstance(value, (list, dict)):
            flat[key] = json.dumps(value, sort_keys=True)
        else:
            flat[key] = str(value)
    return flat


def log_segment_model(model: SegmentModel, *, features: DataFrame, data: Mapping[str, Any]) -> str:
    """Log a fitted segmentation into the active MLflow run; returns the model's artifact path.

    Logs the params, the per-k silhouette and cost (metric steps are k), the choice and why,
    stability, the pipeline (with signature), the profile and k-search tables and the plots.
    ``data`` describes the training data (table, version, rows) and is logged as params.
    """
    import mlflow
    import mlflow.spark

    mlflow.log_params({**_flat_params(model.params), **{f"data.{k}": str(v) for k, v in data.items()},
                       "data.training_rows": str(model.training_rows),
                       "data.silhouette_rows": str(model.silhouette_rows),
                       "chosen_algorithm": model.choice.algorithm, "chosen_k": str(model.choice.k),
                       "selection_rule": "max silhouette_sqeuclidean_sample; ties: smaller k, then algorithm order"})
    for c in model.candidates:
        metrics = {f"{c.algorithm}/{COST}": c.cost, f"{c.algorithm}/clusters_found": float(c.clusters),
                   f"{c.algorithm}/fit_seconds": c.seconds}
        if not math.isnan(c.silhouette):
            metrics[f"{c.algorithm}/{SILHOUETTE}"] = c.silhouette
        mlflow.log_metrics(metrics, step=c.k)
    chosen = {"chosen_k": float(model.choice.k), SILHOUETTE: model.choice.silhouette, COST: model.choice.cost,
              "segments": float(len(model.profiles)), STABILITY_MEAN: model.stability.mean,
              STABILITY_MIN: model.stability.minimum}
    chosen.update({f"elbow_k/{a}": float(k) for a, k in model.choice.elbows.items() if k is not None})
    mlflow.log_metrics({k: v for k, v in chosen.items() if not math.isnan(v)})
    stable = model.stability.mean >= model.params.min_stability_ari
    mlflow.set_tags({"selection_reason": model.choice.reason, "stability_ok": str(stable).lower(),
                     "missing_roles": ",".join(model.missing_roles)})
    mlflow.log_text(model.choice.reason + "\n", "segments/selection.txt")
    mlflow.log_dict({"seeds": list(model.stability.seeds),
                     "pairwise_ari": [{"seed_a": a, "seed_b": b, "ari": v}
                                      for (a, b), v in model.stability.pairwise.items()]},
                    "segments/stability.json")
    mlflow.log_text(model.profiles.to_json(orient="records", indent=1), PROFILES_ARTIFACT)
    mlflow.log_text(model.profiles.to_csv(index=False), "segments/profiles.csv")
    mlflow.log_dict(model.population, POPULATION_ARTIFACT)
    mlflow.log_text(model.k_search().to_csv(index=False), K_SEARCH_ARTIFACT)
    mlflow.log_figure(plot_k_search(model.k_search(), chosen=(model.choice.algorithm, model.choice.k)),
                      "plots/k_search.png")
    mlflow.log_figure(plot_profiles(model.profiles, population=model.population), "plots/segment_profiles.png")
    # Explicit requirements: MLflow would otherwise infer them by loading the model in a new Python
    # process, which starts a second Spark session; the pipeline needs pyspark only.
    mlflow.spark.log_model(model.pipeline, artifact_path=MODEL_ARTIFACT,
                           signature=model_signature(features, model.params),
                           pip_requirements=mlflow.spark.get_default_pip_requirements())
    return MODEL_ARTIFACT


@dataclass(frozen=True)
class ChampionArtifacts:
    """What a notebook needs to show a registered segmentation: its tables, no Spark."""

    name: str
    version: str
    run_id: str
    profiles: pd.DataFrame
    population: dict[str, float | None]
    k_search: pd.DataFrame
    selection_reason: str
    algorithm: str
    k: int


def load_model_artifacts(client, *, name: str, version: str) -> ChampionArtifacts:
    """The profile table, all-users means and k search logged with version ``version`` of ``name``."""
    import tempfile
    from pathlib import Path

    model_version = client.get_model_version(name, version)
    run_id = model_version.run_id
    with tempfile.TemporaryDirectory() as tmp:
        def text(path: str) -> str:
            return Path(client.download_artifacts(run_id, path, tmp)).read_text(encoding="utf-8")

        profiles = pd.DataFrame(json.loads(text(PROFILES_ARTIFACT)))
        population = json.loads(text(POPULATION_ARTIFACT))
        k_search = pd.read_csv(Path(client.download_artifacts(run_id, K_SEARCH_ARTIFACT, tmp)))
    run = client.get_run(run_id)
    return ChampionArtifacts(name=name, version=str(version), run_id=run_id, profiles=profiles,
                             population=population, k_search=k_search,
                             selection_reason=run.data.tags.get("selection_reason", ""),
                             algorithm=run.data.params["chosen_algorithm"], k=int(run.data.params["chosen_k"]))


# ---- plots ---------------------------------------------------------------------------------------

def plot_k_search(k_search: pd.DataFrame, *, chosen: tuple[str, int] | None = None):
    """Silhouette and cost by k, one line per algorithm, the chosen (algorithm, k) circled."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    silhouette_ax, cost_ax = figure.subplots(1, 2)
    for algorithm, rows in k_search.groupby("algorithm", sort=False):
        rows = rows.sort_values("k")
        silhouette_ax.plot(rows["k"], rows[SILHOUETTE], marker="o", label=algorithm)
        cost_ax.plot(rows["k"], rows[COST], marker="o", label=algorithm)
        if chosen and chosen[0] == algorithm:
            at = rows[rows["k"] == chosen[1]]
            for ax, column in ((silhouette_ax, SILHOUETTE), (cost_ax, COST)):
                ax.scatter(at["k"], at[column], s=180, facecolors="none", edgecolors="red", linewidths=2,
                           label=f"chosen: {algorithm} k={chosen[1]}" if ax is silhouette_ax else None, zorder=3)
    silhouette_ax.set(title="Silhouette (squared Euclidean, sample)", xlabel="k", ylabel="silhouette")
    cost_ax.set(title="Cost: within-cluster sum of squares (scaled)", xlabel="k", ylabel="sum of squares")
    silhouette_ax.legend()
    cost_ax.legend()
    return figure


def plot_profiles(profiles: pd.DataFrame, *, population: Mapping[str, Any] | None = None,
                  columns: Sequence[str] | None = None):
    """Each segment's share of users, and its feature means against all users' (log2 of the ratio, annotated
    with the mean in original units)."""
    import numpy as np
    from matplotlib.figure import Figure

    columns = list(columns or [c for c in profiles.columns if c.startswith("mean_")])
    labels = [f"{int(r[SEGMENT_ID])} {r[SEGMENT_NAME]}" for r in profiles.to_dict("records")]
    means = profiles[columns].astype(float).to_numpy()
    if population is not None:
        overall = np.array([float(population.get(c) or np.nan) for c in columns])
    else:
        weights = profiles["size"].to_numpy(dtype=float)
        overall = np.nansum(means * weights[:, None], axis=0) / weights.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log2(np.where(overall > 0, (means + 1e-9) / overall, np.nan))
    ratio = np.clip(ratio, -3, 3)

    figure = Figure(figsize=(4 + 1.1 * len(columns), 1.6 + 0.55 * len(labels)), layout="constrained")
    share_ax, heat_ax = figure.subplots(1, 2, width_ratios=[1, max(2, len(columns) / 2)])
    share_ax.barh(labels, profiles["share"].to_numpy(dtype=float), color="tab:blue")
    share_ax.invert_yaxis()
    share_ax.set(title="share of users", xlabel="share")
    image = heat_ax.imshow(ratio, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
    heat_ax.set_xticks(range(len(columns)), [c.removeprefix("mean_") for c in columns], rotation=45, ha="right")
    heat_ax.set_yticks(range(len(labels)), labels)
    for i in range(means.shape[0]):
        for j in range(means.shape[1]):
            if not np.isnan(means[i, j]):
                heat_ax.text(j, i, f"{means[i, j]:.3g}", ha="center", va="center", fontsize=8)
    heat_ax.set_title("segment mean vs all users (log2 ratio; numbers: mean in own units)")
    figure.colorbar(image, ax=heat_ax, label="log2(mean / all users')")
    return figure
