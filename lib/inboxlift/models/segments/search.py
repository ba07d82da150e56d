"""The k search: Spark ML's K-means and bisecting K-means over a k range, silhouette, stability, the choice.

Every fit here runs on the cached sample of scaled features that
:class:`~inboxlift.models.segments.estimator.SegmentSearch` prepares; the rules are in
``docs/segments.md`` ("Choosing k").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
from pyspark.errors import IllegalArgumentException
from pyspark.ml import PipelineModel
from pyspark.ml.clustering import BisectingKMeans, BisectingKMeansModel, KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.sql import DataFrame

from inboxlift.metrics_cluster import pairwise_adjusted_rand_index
from inboxlift.models.segments.features import (
    ALGORITHMS, ANCHORED_COL, CLUSTER_COL, FEATURES_COL, USER_ID, anchor_stages,
)
from inboxlift.session import concurrently
from inboxlift.settings import SegmentSettings

# Metric names say what was measured: the silhouette uses squared Euclidean distance on a sample of
# users; the cost is the within-cluster sum of squared distances in the scaled feature space, of the
# search sample for a candidate and of all users for the chosen model.
SILHOUETTE = "silhouette_sqeuclidean_sample"
SEARCH_COST = "within_cluster_sse_scaled_search_sample"
COST = "within_cluster_sse_scaled"
STABILITY_MEAN = "stability_ari_mean_between_seeds"
STABILITY_MIN = "stability_ari_min_between_seeds"

Clusterer = KMeans | BisectingKMeans
ClusterModel = KMeansModel | BisectingKMeansModel


@dataclass(frozen=True)
class KCandidate:
    """One (algorithm, k) of the search: its best fit over the seeds, how many clusters it found, how good."""

    algorithm: str
    k: int
    clusters: int
    silhouette: float
    cost: float          # within-cluster sum of squares of the search sample, the best seed's
    seconds: float       # the wall time of its seeds' fits, added up (other fits may have run beside them)
    seed: int = 0        # the seed of the lowest cost


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


def clusterer(params: SegmentSettings, *, algorithm: str, k: int, seed: int) -> Clusterer:
    """An unfitted Spark ML K-means (k-means|| initialisation) or bisecting K-means writing ``_seg_cluster``.

    K-means reads ``_seg_features``; bisecting K-means reads ``_seg_anchored`` (:func:`with_anchor`).
    """
    if algorithm == "kmeans":
        return KMeans(k=k, seed=seed, maxIter=params.max_iter, tol=params.tol, initMode="k-means||",
                      initSteps=params.init_steps, solver=params.kmeans_solver, featuresCol=FEATURES_COL,
                      predictionCol=CLUSTER_COL)
    if algorithm == "bisecting_kmeans":
        return BisectingKMeans(k=k, seed=seed, maxIter=params.max_iter, featuresCol=ANCHORED_COL,
                               predictionCol=CLUSTER_COL)
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")


def with_anchor(points: DataFrame, *, algorithms: Sequence[str]) -> DataFrame:
    """``points`` with the anchored vector too when bisecting K-means is among ``algorithms``.

    Done before the search's sample is cached, so bisecting K-means fits on the cache as K-means
    does instead of caching an anchored copy of its own for every k.
    """
    if "bisecting_kmeans" not in algorithms:
        return points
    return PipelineModel(stages=anchor_stages()).transform(points)


def silhouette(assigned: DataFrame, *, features_col: str = FEATURES_COL, prediction_col: str = CLUSTER_COL) -> float:
    """Spark's silhouette with squared Euclidean distance; NaN for a single cluster."""
    evaluator = ClusteringEvaluator(featuresCol=features_col, predictionCol=prediction_col,
                                    metricName="silhouette", distanceMeasure="squaredEuclidean")
    try:
        return float(evaluator.evaluate(assigned))
    except IllegalArgumentException:
        # Spark refuses a silhouette of one cluster: there is nothing to compare.
        return float("nan")


def search_seeds(params: SegmentSettings) -> list[int]:
    """``seed`` then each stability seed: every (algorithm, k) of the search is fitted with each."""
    return [params.seed, *[s for s in params.stability_seeds if s != params.seed]]


def search_k(params: SegmentSettings, points: DataFrame, silhouette_points: DataFrame
             ) -> tuple[list[KCandidate], dict[tuple[str, int], dict[int, ClusterModel]]]:
    """Every algorithm of ``params.algorithms`` for every k of ``[k_min, k_max]``, fitted on ``points``
    with each of :func:`search_seeds`.

    A candidate is its lowest-cost fit (the seeds are restarts, as scikit-learn's ``n_init``: one
    initialisation can land in a poor optimum); the silhouette is that fit's, measured on
    ``silhouette_points``. Both frames are scaled features (with the anchor where bisecting K-means
    is searched), cached by the caller. Up to ``params.search_parallelism`` fits, then silhouettes,
    run at once (:func:`~inboxlift.session.concurrently`); each fit's result depends only on its
    (algorithm, k, seed) and the data, not on what runs beside it. Returns the candidates and every
    fit by (algorithm, k) and seed.
    """
    spark = points.sparkSession
    keys = [(algorithm, k) for algorithm in params.algorithms for k in range(params.k_min, params.k_max + 1)]
    seeds = search_seeds(params)

    def fit(task: tuple[str, int, int]) -> tuple[ClusterModel, float]:
        algorithm, k, seed = task
        started = time.perf_counter()
        model = clusterer(params, algorithm=algorithm, k=k, seed=seed).fit(points)
        return model, time.perf_counter() - started

    tasks = [(algorithm, k, seed) for algorithm, k in keys for seed in seeds]
    runs = dict(zip(tasks, concurrently(fit, tasks, parallelism=params.search_parallelism, spark=spark)))
    models = {key: {seed: runs[(*key, seed)][0] for seed in seeds} for key in keys}
    seconds = {key: sum(runs[(*key, seed)][1] for seed in seeds) for key in keys}

    def best_of(key: tuple[str, int]) -> tuple[int, int, float, float]:
        fits = models[key]
        # min() keeps the first of equal costs: the seeds' order breaks ties.
        seed = min(fits, key=lambda s: float(fits[s].summary.trainingCost))
        best = fits[seed]
        clusters = len(best.clusterCenters())
        score = silhouette(best.transform(silhouette_points)) if clusters > 1 else float("nan")
        return seed, clusters, score, float(best.summary.trainingCost)

    scored = concurrently(best_of, keys, parallelism=params.search_parallelism, spark=spark)
    candidates = [KCandidate(algorithm, k, clusters, score, cost, seconds[(algorithm, k)], seed)
                  for (algorithm, k), (seed, clusters, score, cost) in zip(keys, scored)]
    return candidates, models


def seed_stability(points: DataFrame, fits: dict[int, ClusterModel]) -> Stability:
    """The adjusted Rand index between every two seeds' fits of one (algorithm, k), over ``points``' users."""
    assigned = points
    for seed, model in fits.items():
        # Each seed's labels go in their own column, so one pass assigns all of them.
        assigned = model.copy({model.predictionCol: f"_seg_seed_{seed}"}).transform(assigned)
    columns = [f"_seg_seed_{seed}" for seed in fits]
    pairwise = pairwise_adjusted_rand_index(assigned.select(USER_ID, *columns), columns=columns)
    return Stability(seeds=tuple(fits),
                     pairwise={(int(a.rsplit("_", 1)[1]), int(b.rsplit("_", 1)[1])): v
                               for (a, b), v in pairwise.items()})


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


def choose_candidate(candidates: Sequence[KCandidate], *, algorithms: Sequence[str], search_rows: int,
                     silhouette_rows: int) -> Choice:
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
              f"{silhouette_rows} users) among {len(candidates)} candidates fitted on {search_rows} users, "
              f"{best.silhouette:.4f}{runner_up}. Elbow of the search's cost curve: {elbow_text}.")
    return Choice(best.algorithm, best.k, best.silhouette, best.cost, elbows, reason)


def k_search_frame(candidates: Sequence[KCandidate]) -> pd.DataFrame:
    """The k search as a small table: one row per (algorithm, k)."""
    columns = ["algorithm", "k", "clusters", SILHOUETTE, SEARCH_COST, "fit_seconds", "seed"]
    return pd.DataFrame([(c.algorithm, c.k, c.clusters, c.silhouette, c.cost, c.seconds, c.seed) for c in candidates],
                        columns=columns)
