"""The segment search on Spark ML's solvers: preprocessing, samples, the choice of k, planted segments recovered."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from chispa import assert_df_equality
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.linalg import Vectors

from inboxlift.metrics_cluster import adjusted_rand_index
from inboxlift.models.segments import SegmentSearch
from inboxlift.models.segments.features import anchor_stages, hash_sample, preprocessing_stages, silhouette_sample
from inboxlift.models.segments.estimator import REFIT_COST_TOLERANCE, refit_on_all_users, search_partitions
from inboxlift.models.segments.features import FEATURES_COL
from inboxlift.models.segments.scoring import assignment_cost, clusterer_stage, with_distance_to_centroid
from inboxlift.models.segments.search import KCandidate, choose_candidate, clusterer, elbow_k, search_k, with_anchor
from planted_segments import FEATURE_SCHEMA, PER_GROUP, PLANTED, TEST_PARAMS, planted_frame


# ---- choosing k ------------------------------------------------------------------------------------

def test_elbow_is_the_point_farthest_below_the_chord():
    # Normalised: x = 0, 1/3, 2/3, 1; y = 1, 0.2, 1/15, 0; gaps below the chord 0.467 (k=3), 0.267 (k=4).
    assert elbow_k([(2, 100.0), (3, 40.0), (4, 30.0), (5, 25.0)]) == 3
    assert elbow_k([(2, 100.0), (3, 50.0)]) is None
    assert elbow_k([(2, 100.0), (3, 95.0), (4, 20.0), (5, 15.0)]) == 4


def test_choice_is_the_best_silhouette_with_ties_to_the_smaller_k():
    candidates = [KCandidate("kmeans", 3, 3, 0.50, 90.0, 0.1), KCandidate("kmeans", 4, 4, 0.61, 60.0, 0.1),
                  KCandidate("bisecting_kmeans", 3, 3, 0.61, 95.0, 0.1),
                  KCandidate("bisecting_kmeans", 4, 1, float("nan"), 200.0, 0.1)]
    choice = choose_candidate(candidates, algorithms=["kmeans", "bisecting_kmeans"], search_rows=500,
                              silhouette_rows=100)
    assert (choice.algorithm, choice.k) == ("bisecting_kmeans", 3)
    assert "0.6100" in choice.reason and "sample of 100 users" in choice.reason and "fitted on 500 users" in choice.reason
    with pytest.raises(ValueError, match="cannot be segmented"):
        choose_candidate(candidates[-1:], algorithms=["kmeans"], search_rows=1, silhouette_rows=1)


# ---- preprocessing and samples ---------------------------------------------------------------------

def test_preprocessing_fills_nulls_clips_and_logs(spark):
    params = dataclasses.replace(TEST_PARAMS, feature_columns=["recency_days", "monetary"],
                                 log_columns=["monetary"], null_fill={"recency_days": 365.0})
    rows = spark.createDataFrame([("a", None, -5.0), ("b", 10, float("nan")), ("c", 20, math.e - 1)],
                                 "user_id string, recency_days int, monetary double")
    sql_stage = preprocessing_stages(params)[0]
    out = sql_stage.transform(rows).select("user_id", "_seg_in_recency_days", "_seg_in_monetary")
    expected = spark.createDataFrame(
        # null recency -> 365; negative money clipped to 0 -> log1p 0 = 0; NaN -> fill 0 -> 0; e-1 -> 1.
        [("a", 365.0, 0.0), ("b", 10.0, 0.0), ("c", 20.0, 1.0)],
        "user_id string, _seg_in_recency_days double, _seg_in_monetary double")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True, allow_nan_equality=True)


def test_distance_to_centroid(spark):
    rows = spark.createDataFrame([("a", Vectors.dense([3.0, 4.0]), 0), ("b", Vectors.dense([1.0, 1.0]), 1)],
                                 ["user_id", "v", "c"])
    out = with_distance_to_centroid(rows, features_col="v", cluster_col="c", centers=[[0.0, 0.0], [1.0, 2.0]])
    got = {r["user_id"]: r["distance"] for r in out.collect()}
    assert got == pytest.approx({"a": 5.0, "b": 1.0})


def test_assignment_cost_is_the_squared_distance_to_the_assigned_centre(spark):
    # Two pairs of points 2 apart, far from each other: centres (0, 1) and (10, 11), each point 1
    # from its centre, cost 4 x 1 = 4 (what Spark reports for the fit). The same model on a
    # point at (0, 5): 4 from (0, 1), 16 more.
    points = spark.createDataFrame([(Vectors.dense([x, y]),) for x, y in [(0, 0), (0, 2), (10, 10), (10, 12)]],
                                   [FEATURES_COL])
    model = clusterer(TEST_PARAMS, algorithm="kmeans", k=2, seed=1).fit(points)
    assert sorted(list(c) for c in model.clusterCenters()) == [[0.0, 1.0], [10.0, 11.0]]
    assert assignment_cost(model, points) == pytest.approx(4.0) == pytest.approx(model.summary.trainingCost)
    more = points.union(spark.createDataFrame([(Vectors.dense([0.0, 5.0]),)], [FEATURES_COL]))
    assert assignment_cost(model, more) == pytest.approx(20.0)


def _uniform_points(spark, n: int = 400):
    # A uniform square has no clusters: where K-means stops depends on its iterations.
    rng = np.random.default_rng(11)
    return spark.createDataFrame([(Vectors.dense(p),) for p in rng.uniform(0, 10, size=(n, 2)).tolist()],
                                 [FEATURES_COL]).persist()


def test_a_refit_worse_than_the_sample_fit_on_all_users_is_not_kept(spark):
    points = _uniform_points(spark)
    try:
        converged = dataclasses.replace(TEST_PARAMS, max_iter=50, tol=1e-9)
        one_step = dataclasses.replace(TEST_PARAMS, max_iter=1)
        good = clusterer(converged, algorithm="kmeans", k=6, seed=5).fit(points)
        good_cost = good.summary.trainingCost
        # Refits stopped after one iteration cannot match the converged fit: every seed is tried,
        # each costs more, and the converged fit (standing for the sample's) is what is kept.
        model, cost, refit = refit_on_all_users(one_step, algorithm="kmeans", k=6, seeds=[5, 17, 3],
                                                sample_fit=good, everyone=points)
        assert model is good and refit.kept_seed is None and cost == pytest.approx(good_cost)
        assert refit.sample_fit_cost == pytest.approx(good_cost)
        assert [seed for seed, _ in refit.tried] == [5, 17, 3]
        assert all(c > good_cost * (1 + REFIT_COST_TOLERANCE) for _, c in refit.tried)
        # The other way round: the converged refit from the same seed (the same initial centres,
        # more iterations) beats the one-step fit, so it is kept and no other seed is tried; its
        # cost is the one Spark reports for it.
        rough = clusterer(one_step, algorithm="kmeans", k=6, seed=5).fit(points)
        model, cost, refit = refit_on_all_users(converged, algorithm="kmeans", k=6, seeds=[5, 17],
                                                sample_fit=rough, everyone=points)
        assert refit.kept_seed == 5 and [seed for seed, _ in refit.tried] == [5]
        assert cost == pytest.approx(model.summary.trainingCost) and cost < refit.sample_fit_cost
    finally:
        points.unpersist()


def test_silhouette_sample_is_deterministic_and_bounded(spark):
    users = spark.createDataFrame([(f"u{i}",) for i in range(50)], "user_id string")
    first = [r.user_id for r in silhouette_sample(users, rows=10, seed=1).collect()]
    again = [r.user_id for r in silhouette_sample(users.repartition(3), rows=10, seed=1).collect()]
    assert len(first) == 10 and sorted(first) == sorted(again)
    assert silhouette_sample(users, rows=100, seed=1).count() == 50


def test_search_sample_is_hash_picked_about_its_size_and_holds_the_silhouette_sample(spark):
    users = spark.createDataFrame([(f"u{i}",) for i in range(2000)], "user_id string")

    def ids(frame):
        return {r.user_id for r in frame.collect()}

    sample = ids(hash_sample(users, rows=500, total=2000, seed=7))
    # A quarter of the hash range: 500 expected, standard deviation sqrt(2000 * 0.25 * 0.75) = 19.4.
    assert 440 <= len(sample) <= 560
    assert ids(hash_sample(users.repartition(3), rows=500, total=2000, seed=7)) == sample
    assert ids(hash_sample(users, rows=200, total=2000, seed=7)) < sample
    assert ids(hash_sample(users, rows=500, total=2000, seed=8)) != sample
    # All users when there are no more than asked for.
    assert hash_sample(users, rows=2000, total=2000, seed=7) is users
    # The silhouette's users (the smallest hashes) are in the search sample: the same as from all users.
    assert ids(silhouette_sample(hash_sample(users, rows=500, total=2000, seed=7), rows=100, seed=7)) == \
        ids(silhouette_sample(users, rows=100, seed=7))


# ---- Spark ML's clusterers on planted segments -----------------------------------------------------

def test_bisecting_kmeans_splits_centred_data(spark):
    # Spark's bisecting K-means cannot split a cluster centred on the origin; the anchor coordinate fixes it.
    features, _ = planted_frame(spark, per_group=6)
    prep = Pipeline(stages=preprocessing_stages(TEST_PARAMS)).fit(features)
    points = PipelineModel(stages=anchor_stages()).transform(prep.transform(features))
    model = clusterer(dataclasses.replace(TEST_PARAMS, max_iter=3), algorithm="bisecting_kmeans", k=4,
                      seed=1).fit(points)
    assert len(model.clusterCenters()) == 4


@pytest.mark.parametrize("solver", ["row", "block"])
def test_spark_ml_kmeans_recovers_the_planted_segments(spark, solver):
    features, truth = planted_frame(spark)
    params = dataclasses.replace(TEST_PARAMS, algorithms=["kmeans"], kmeans_solver=solver, k_min=4, k_max=4,
                                 stability_seeds=[], search_sample_rows=1000)
    model = SegmentSearch(params).fit(features)
    assert type(clusterer_stage(model.pipeline)).__name__ == "KMeansModel"
    assigned = model.transform(features).join(truth, on="user_id", how="inner")
    assert assigned.count() == len(PLANTED) * PER_GROUP
    assert adjusted_rand_index(assigned, left="segment_id", right="planted") >= 0.8
    # No extra seed: nothing to compare, and stability says so rather than claim agreement.
    assert model.stability.pairwise == {} and math.isnan(model.stability.mean)


def test_each_candidate_is_the_lowest_cost_of_its_seeds(spark):
    features, _ = planted_frame(spark, per_group=10)
    params = dataclasses.replace(TEST_PARAMS, k_min=3, k_max=3, stability_seeds=[17, 3])
    prep = Pipeline(stages=preprocessing_stages(params)).fit(features)
    points = with_anchor(prep.transform(features), algorithms=params.algorithms).persist()
    try:
        candidates, fits = search_k(params, points, points)
    finally:
        points.unpersist()
    assert [(c.algorithm, c.k) for c in candidates] == [("kmeans", 3), ("bisecting_kmeans", 3)]
    for candidate in candidates:
        by_seed = fits[(candidate.algorithm, candidate.k)]
        assert list(by_seed) == [5, 17, 3]
        costs = {seed: model.summary.trainingCost for seed, model in by_seed.items()}
        assert candidate.cost == min(costs.values()) and costs[candidate.seed] == candidate.cost


def test_fits_running_side_by_side_give_the_same_candidates_as_one_at_a_time(spark):
    features, _ = planted_frame(spark, per_group=10)
    params = dataclasses.replace(TEST_PARAMS, k_min=3, k_max=4, stability_seeds=[17])
    prep = Pipeline(stages=preprocessing_stages(params)).fit(features)
    points = with_anchor(prep.transform(features), algorithms=params.algorithms).repartition(2).persist()
    try:
        alone, alone_fits = search_k(dataclasses.replace(params, search_parallelism=1), points, points)
        together, together_fits = search_k(dataclasses.replace(params, search_parallelism=3), points, points)
    finally:
        points.unpersist()
    # Same (algorithm, k) order, same chosen seed, cost, clusters and silhouette: a fit depends on its
    # own parameters and the data only.
    strip = lambda cs: [dataclasses.replace(c, seconds=0.0) for c in cs]  # noqa: E731
    assert strip(together) == strip(alone)
    assert [(c.algorithm, c.k) for c in alone] == [("kmeans", 3), ("kmeans", 4), ("bisecting_kmeans", 3),
                                                   ("bisecting_kmeans", 4)]
    for key, fits in alone_fits.items():
        assert list(together_fits[key]) == [5, 17]
        for seed, model in fits.items():
            np.testing.assert_allclose(np.array(together_fits[key][seed].clusterCenters()),
                                       np.array(model.clusterCenters()))


def test_the_sample_is_cached_in_partitions_of_search_partition_rows_users():
    params = dataclasses.replace(TEST_PARAMS, search_sample_rows=200_000, search_partition_rows=50_000)
    assert search_partitions(params, training_rows=1_000_000) == 4      # 200,000 sampled / 50,000
    assert search_partitions(params, training_rows=120_000) == 3        # all 120,000 users: 2.4, rounded up
    assert search_partitions(params, training_rows=2_000) == 1
    assert search_partitions(params, training_rows=0) == 1
    assert search_partitions(dataclasses.replace(params, search_partition_rows=1_000), training_rows=2_000) == 2


def test_the_search_on_a_sample_picks_the_same_k_as_on_all_users(spark):
    features, truth = planted_frame(spark)
    params = dataclasses.replace(TEST_PARAMS, stability_seeds=[], k_min=3, k_max=5)
    on_sample = SegmentSearch(dataclasses.replace(params, search_sample_rows=80)).fit(features)
    on_all = SegmentSearch(dataclasses.replace(params, search_sample_rows=10_000)).fit(features)
    users = len(PLANTED) * PER_GROUP
    assert on_all.search_rows == users and on_all.refit_seconds == 0.0
    # 80 of 200 expected; sd sqrt(200 * 0.4 * 0.6) = 6.9.
    assert 55 <= on_sample.search_rows <= 105 and on_sample.training_rows == users
    assert (on_sample.choice.algorithm, on_sample.choice.k) == (on_all.choice.algorithm, on_all.choice.k)
    assert on_sample.choice.k == len(PLANTED)
    # The chosen (algorithm, k) is refitted on all users: every planted user is in its group's segment.
    assigned = on_sample.transform(features).join(truth, on="user_id", how="inner")
    assert adjusted_rand_index(assigned, left="segment_id", right="planted") >= 0.8
    assert on_sample.profiles["size"].sum() == users


def test_search_with_pca_recovers_planted_groups(spark):
    features, truth = planted_frame(spark, per_group=10)
    params = dataclasses.replace(TEST_PARAMS, pca_components=2, algorithms=["kmeans"], k_min=4, k_max=4,
                                 stability_seeds=[])
    model = SegmentSearch(params).fit(features)
    assert len(clusterer_stage(model.pipeline).clusterCenters()[0]) == 2
    assigned = model.transform(features).join(truth, on="user_id", how="inner")
    assert adjusted_rand_index(assigned, left="segment_id", right="planted") >= 0.8


def test_search_refuses_missing_columns_empty_input_and_a_sample_too_small(spark):
    empty = spark.createDataFrame([], FEATURE_SCHEMA)
    with pytest.raises(ValueError, match="0 users cannot make 3 segments"):
        SegmentSearch(TEST_PARAMS).fit(empty)
    with pytest.raises(ValueError, match=r"lacks columns \['tenure_days'\]"):
        SegmentSearch(TEST_PARAMS).fit(empty.drop("tenure_days"))
    with pytest.raises(ValueError, match="log_columns"):
        SegmentSearch(dataclasses.replace(TEST_PARAMS, log_columns=["nope"]))
    with pytest.raises(ValueError, match="search_sample_rows must be at least k_max"):
        SegmentSearch(dataclasses.replace(TEST_PARAMS, search_sample_rows=4))
    with pytest.raises(ValueError, match="search_parallelism must be at least 1, got 0"):
        SegmentSearch(dataclasses.replace(TEST_PARAMS, search_parallelism=0))
    with pytest.raises(ValueError, match="search_partition_rows must be at least 1, got 0"):
        SegmentSearch(dataclasses.replace(TEST_PARAMS, search_partition_rows=0))
