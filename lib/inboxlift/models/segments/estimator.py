"""The segmentation estimator: search k on a cached sample, refit the choice on all users, profile and name.

:class:`SegmentSearch` is configured from ``settings.segments`` and returns a :class:`SegmentModel`;
it reads no table and logs nothing (``stages/segments.py`` does). The recipe is in ``docs/segments.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.clustering import BisectingKMeansModel, KMeansModel
from pyspark.sql import DataFrame

from inboxlift.models.segments.features import (
    CLUSTER_COL, FEATURES_COL, ROLES, USER_ID, anchor_stages, check_params, hash_sample, preprocessing_stages,
    required_columns, silhouette_sample,
)
from inboxlift.models.segments.naming import (
    centroid_from_row, centroids_from_profiles, cluster_profiles, finish_profiles, name_segments, relabel_stage,
)
from inboxlift.models.segments.scoring import assign_segments, assignment_cost
from inboxlift.models.segments.search import (
    Choice, KCandidate, Stability, choose_candidate, clusterer, k_search_frame, search_k, seed_stability, with_anchor,
)
from inboxlift.schemas import require_columns
from inboxlift.settings import SegmentSettings


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
    training_rows: int          # all users: what the chosen model was fitted on
    search_rows: int            # the sample the k search and the stability seeds fitted on
    silhouette_rows: int
    training_cost: float        # within-cluster sum of squares of the chosen model, all users
    refit_seconds: float        # the chosen model's fit on all users (0 when the sample was all users)
    missing_roles: list[str] = field(default_factory=list)
    refit: Refit | None = None  # how the refit on all users went (None when the sample was all users)

    def transform(self, features: DataFrame) -> DataFrame:
        """``user_id, segment_id, segment_name, distance`` for every row of ``features``."""
        return assign_segments(features, pipeline=self.pipeline)

    def k_search(self) -> pd.DataFrame:
        return k_search_frame(self.candidates)


# A refit is kept when its cost on all users is at most this much above the sample fit's there: a
# refit in the sample fit's optimum has the lower cost (it is fitted on all users), one in a worse
# optimum a higher one (docs/segments.md has the measured gap).
REFIT_COST_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Refit:
    """The refit of the chosen (algorithm, k) on all users: every seed tried, in order, with its cost
    on all users; the sample's fit's cost there; the seed kept (None: the sample's fit was kept)."""

    sample_fit_cost: float
    tried: tuple[tuple[int, float], ...]
    kept_seed: int | None


def refit_on_all_users(params: SegmentSettings, *, algorithm: str, k: int, seeds: list[int],
                       sample_fit: KMeansModel | BisectingKMeansModel,
                       everyone: DataFrame) -> tuple[KMeansModel | BisectingKMeansModel, float, Refit]:
    """Fit (algorithm, k) on ``everyone`` (cached by the caller) with ``seeds`` in order until a fit
    is no worse than ``sample_fit`` on all users (``REFIT_COST_TOLERANCE``); when none is, the
    sample's fit is kept. A fresh initialisation on all users can end in a worse local optimum than
    the one the sample's best seed found (as Spark ML's K-means has no initial model to start from
    the sample's centres): this keeps the refit from undoing the search.

    Returns ``(model, cost on all users, Refit)``.
    """
    sample_cost = assignment_cost(sample_fit, everyone)
    tried: list[tuple[int, float]] = []
    for seed in seeds:
        model = clusterer(params, algorithm=algorithm, k=k, seed=seed).fit(everyone)
        cost = assignment_cost(model, everyone)
        tried.append((seed, cost))
        if cost <= sample_cost * (1.0 + REFIT_COST_TOLERANCE):
            return model, cost, Refit(sample_fit_cost=sample_cost, tried=tuple(tried), kept_seed=seed)
    return sample_fit, sample_cost, Refit(sample_fit_cost=sample_cost, tried=tuple(tried), kept_seed=None)


def search_partitions(params: SegmentSettings, *, training_rows: int) -> int:
    """Partitions of the cached search sample: one per ``search_partition_rows`` of its expected
    size (``search_sample_rows``, or all users when fewer), at least one.

    Each K-means fit runs dozens of small Spark jobs, each a task per partition, so on a small
    sample fewer partitions are faster (measured in docs/segments.md). A
    repartition, not a coalesce: a coalesce would also narrow the scan of ``user_features`` that
    the sample is filtered from.
    """
    rows = min(params.search_sample_rows, training_rows)
    return max(1, math.ceil(rows / params.search_partition_rows))


class SegmentSearch:
    """Estimator: searches algorithms and k, checks stability, profiles and names the chosen segments.

    Configured from :class:`~inboxlift.settings.SegmentSettings` (``settings.segments``); ``fit``
    returns a :class:`SegmentModel`.
    """

    def __init__(self, params: SegmentSettings) -> None:
        check_params(params)
        self.params = params

    def fit(self, features: DataFrame) -> SegmentModel:
        params = self.params
        require_columns(features, required_columns(params), step="segments (user_features)")
        # Checked before anything is fitted: the scaler cannot fit on no rows.
        enough = features.limit(params.k_min).count()
        if enough < params.k_min:
            raise ValueError(f"segments: {enough} users cannot make {params.k_min} segments")
        # The scaler (and PCA) learn from all users, so the sample and the final model share one space.
        preprocessing = Pipeline(stages=preprocessing_stages(params)).fit(features)
        training_rows = features.count()
        sample = hash_sample(features, rows=params.search_sample_rows, total=training_rows, seed=params.seed)
        # Every candidate and every stability seed fits on the same scaled sample: computed once and
        # cached, in partitions of about search_partition_rows users (search_partitions). With its
        # input cached, Spark ML's K-means does not cache a copy of its own.
        points = with_anchor(preprocessing.transform(sample).select(USER_ID, FEATURES_COL),
                             algorithms=params.algorithms).repartition(
            search_partitions(params, training_rows=training_rows)).persist()
        # The smallest hashes of the sample are the smallest of all users: the same users that
        # promotion measures the silhouette on (see hash_sample).
        silhouette_points = silhouette_sample(points, rows=params.silhouette_sample_rows, seed=params.seed).persist()
        try:
            search_rows = points.count()
            silhouette_rows = silhouette_points.count()
            candidates, models = search_k(params, points, silhouette_points)
            choice = choose_candidate(candidates, algorithms=params.algorithms, search_rows=search_rows,
                                      silhouette_rows=silhouette_rows)
            fits = models[(choice.algorithm, choice.k)]
            seed = next(c.seed for c in candidates if (c.algorithm, c.k) == (choice.algorithm, choice.k))
            chosen = fits[seed]
            stability = seed_stability(points, fits)
        finally:
            silhouette_points.unpersist()
            points.unpersist()

        refit_seconds, refit = 0.0, None
        training_cost = float(chosen.summary.trainingCost)
        if search_rows < training_rows:
            # The chosen (algorithm, k) fitted on all users: the seed whose fit won on the sample
            # first, then the others by their cost on the sample, until a fit is as good on all
            # users as the sample's own (refit_on_all_users). Cached: each try fits and costs it.
            started = time.perf_counter()
            everyone = with_anchor(preprocessing.transform(features).select(USER_ID, FEATURES_COL),
                                   algorithms=[choice.algorithm]).persist()
            try:
                order = [seed, *sorted((s for s in fits if s != seed), key=lambda s: fits[s].summary.trainingCost)]
                chosen, training_cost, refit = refit_on_all_users(
                    params, algorithm=choice.algorithm, k=choice.k, seeds=order, sample_fit=fits[seed],
                    everyone=everyone)
            finally:
                everyone.unpersist()
            refit_seconds = time.perf_counter() - started

        anchors = anchor_stages() if choice.algorithm == "bisecting_kmeans" else []
        assigning = PipelineModel(stages=[*preprocessing.stages, *anchors, chosen])
        # Three aggregations (means, price bands, categories) read the assigned users: assign them once.
        assigned = assigning.transform(features).persist()
        try:
            raw_profiles, population_means = cluster_profiles(assigned, cluster_col=CLUSTER_COL, params=params)
        finally:
            assigned.unpersist()
        centroids = centroids_from_profiles(raw_profiles, cluster_col=CLUSTER_COL, params=params)
        population = centroid_from_row(population_means, params=params, cluster=-1)
        named = name_segments(centroids, population, params.naming)
        pipeline = PipelineModel(stages=[*assigning.stages, relabel_stage(named)])
        profiles = finish_profiles(raw_profiles, named, total=training_rows)
        missing_roles = [role for role in ROLES if params.roles.get(role) not in features.columns]
        return SegmentModel(pipeline=pipeline, params=params, candidates=candidates, choice=choice,
                            stability=stability, profiles=profiles, population=population_means,
                            training_rows=training_rows, search_rows=search_rows, silhouette_rows=silhouette_rows,
                            training_cost=training_cost, refit_seconds=refit_seconds,
                            missing_roles=missing_roles, refit=refit)
