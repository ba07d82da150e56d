"""Segments: pure pieces against hand-computed values, then one training on planted groups, logged,
registered, loaded back and used for scoring, run twice."""

from __future__ import annotations

import dataclasses
import math

import mlflow
import numpy as np
import pytest
from chispa import assert_df_equality
from mlflow import MlflowClient
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.linalg import Vectors
from pyspark.sql import functions as F
from sklearn.metrics import adjusted_rand_score

from conftest import settings_in
from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.metrics_cluster import (
    adjusted_rand_index,
    ari_from_contingency,
    pairwise_adjusted_rand_index,
)
from inboxlift.models import registry
from inboxlift.models.segments import (
    CLUSTER_COL,
    NAMING_RULES,
    KCandidate,
    SegmentCentroid,
    SegmentSearch,
    anchor_stages,
    assign_segments,
    choose_candidate,
    cluster_profiles,
    clusterer,
    elbow_k,
    name_segment,
    name_segments,
    plot_k_search,
    plot_profiles,
    preprocessing_stages,
    silhouette_sample,
    with_distance_to_centroid,
)
from inboxlift.settings import SegmentNaming, SegmentSettings
from inboxlift.storage import Lake
from inboxlift.stages.segments import (
    SEGMENT_COLUMNS,
    NoChampionError,
    champion_artifacts,
    run_segment,
    run_segment_train,
)

FEATURE_SCHEMA = ("user_id string, recency_days int, orders int, monetary decimal(18,2), open_rate double, "
                  "tenure_days int, band string, cats array<string>")
# Column names differ from user_features' on purpose: roles, not names, drive profiles and names.
TEST_PARAMS = SegmentSettings(
    feature_columns=["recency_days", "orders", "monetary", "open_rate", "tenure_days"],
    log_columns=["recency_days", "orders", "monetary"],
    null_fill={"recency_days": 365.0},
    roles={"recency": "recency_days", "frequency": "orders", "monetary": "monetary", "open_rate": "open_rate",
           "tenure": "tenure_days", "price_band": "band", "categories": "cats"},
    algorithms=["kmeans", "bisecting_kmeans"], k_min=3, k_max=5, max_iter=8, seed=5, stability_seeds=[17],
    silhouette_sample_rows=100, top_categories=2, registered_model="test-segments",
)
NAMING = SegmentNaming()

# Four planted groups: (name the rules should give, recency, orders, monetary, open rate, tenure, band, categories).
PLANTED = [
    ("VIP loyal", 6, 25, 3000.0, 0.60, 700, "premium", ["shoes", "bags"]),
    ("at-risk big spenders", 120, 12, 2400.0, 0.20, 600, "luxury", ["watches", "bags"]),
    ("dormant", 300, 2, 80.0, 0.05, 900, "budget", ["books", "toys"]),
    ("new browsers", 15, 0, 0.0, 0.50, 15, "budget", ["toys"]),
]
PER_GROUP = 30


def planted_rows(per_group: int = PER_GROUP, seed: int = 3, prefix: str = "u") -> list[tuple]:
    """Well-separated groups with small noise; the planted group index is the last field."""
    rng = np.random.default_rng(seed)
    rows = []
    for g, (_, recency, orders, monetary, open_rate, tenure, band, cats) in enumerate(PLANTED):
        for i in range(per_group):
            buyer = orders > 0
            rows.append((
                f"{prefix}{g}-{i:03d}",
                int(max(1, recency + rng.integers(-3, 4))),
                int(max(0, orders + rng.integers(-2, 3))) if buyer else 0,
                round(float(max(0.0, monetary * (1 + rng.normal(0, 0.05)))), 2) if buyer else 0.0,
                float(np.clip(open_rate + rng.normal(0, 0.03), 0, 1)),
                int(max(1, tenure + rng.integers(-5, 6))),
                band,
                cats,
                g,
            ))
    return rows


def planted_frame(spark, **kwargs):
    from decimal import Decimal

    rows = [(*r[:3], Decimal(str(r[3])), *r[4:8]) for r in planted_rows(**kwargs)]
    truth = [(r[0], r[8]) for r in planted_rows(**kwargs)]
    return (spark.createDataFrame(rows, FEATURE_SCHEMA),
            spark.createDataFrame(truth, "user_id string, planted int"))


# ---- adjusted Rand index -------------------------------------------------------------------------

def test_ari_formula_matches_hand_computation():
    # [0,0,1,1] vs [0,0,1,2]: index 1, expected 2*1/6, max 1.5 -> (1 - 1/3) / (1.5 - 1/3) = 4/7.
    assert ari_from_contingency({(0, 0): 2, (1, 1): 1, (1, 2): 1}) == pytest.approx(4 / 7)
    # [0,0,0,1,1,1] vs [0,0,1,1,2,2]: index 2, expected 6*3/15 = 1.2, max 4.5 -> 0.8 / 3.3.
    assert ari_from_contingency({(0, 0): 2, (0, 1): 1, (1, 1): 1, (1, 2): 2}) == pytest.approx(0.8 / 3.3)
    # Same partition under other label values: 1.
    assert ari_from_contingency({(0, "b"): 3, (1, "a"): 2}) == 1.0
    # Degenerate: one row, or everything in one cluster on both sides.
    assert ari_from_contingency({(0, 0): 1}) == 1.0
    assert ari_from_contingency({}) == 1.0


def test_ari_in_spark_agrees_with_scikit_learn(spark):
    rng = np.random.default_rng(0)
    left = rng.integers(0, 4, 200).tolist()
    right = [a if rng.random() < 0.7 else int(rng.integers(0, 5)) for a in left]
    df = spark.createDataFrame(list(zip(range(200), left, right)), "id int, a int, b int")
    assert adjusted_rand_index(df, left="a", right="b") == pytest.approx(adjusted_rand_score(left, right), abs=1e-12)
    third = rng.integers(0, 3, 200).tolist()
    df3 = spark.createDataFrame(list(zip(left, right, third)), "a int, b int, c int")
    pairs = pairwise_adjusted_rand_index(df3, columns=["a", "b", "c"])
    assert pairs[("a", "c")] == pytest.approx(adjusted_rand_score(left, third), abs=1e-12)
    assert pairs[("b", "c")] == pytest.approx(adjusted_rand_score(right, third), abs=1e-12)


def test_ari_ignores_null_labels_and_handles_empty_input(spark):
    df = spark.createDataFrame([(0, 0), (0, 0), (1, 1), (1, None), (None, 2)], "a int, b int")
    assert adjusted_rand_index(df, left="a", right="b") == 1.0
    empty = spark.createDataFrame([], "a int, b int")
    assert adjusted_rand_index(empty, left="a", right="b") == 1.0
    with pytest.raises(ValueError, match=r"lacks columns \['c'\]"):
        adjusted_rand_index(df, left="a", right="c")


# ---- naming rules on hand-made centroids ---------------------------------------------------------

def centroid(cluster=0, size=10, bargain=None, **means) -> SegmentCentroid:
    roles = ("recency", "frequency", "monetary", "order_value", "activity", "inactivity", "open_rate", "tenure")
    return SegmentCentroid(cluster=cluster, size=size, means={r: means.get(r) for r in roles},
                           bargain_band_share=bargain)


ALL = centroid(cluster=-1, size=100, recency=40.0, frequency=4.0, monetary=400.0, order_value=80.0,
               inactivity=20.0, open_rate=0.2, tenure=200.0, bargain=0.3)


@pytest.mark.parametrize("segment, expected", [
    # monetary 900 >= 2*400, orders 7 >= 1.5*4, recency 10 < 45.
    (centroid(recency=10.0, frequency=7.0, monetary=900.0, tenure=300.0), "VIP loyal"),
    # Rich and frequent but 50 days since the last order: no longer VIP, at risk.
    (centroid(recency=50.0, frequency=7.0, monetary=900.0, tenure=300.0), "at-risk big spenders"),
    # monetary 600 >= 1.5*400 (not 2x), recent: not VIP, not at risk; frequency 5 >= 4: loyal regulars.
    (centroid(recency=10.0, frequency=5.0, monetary=600.0, tenure=300.0, inactivity=5.0), "loyal regulars"),
    # tenure 20 <= 30 and orders 1 <= 0.5*4.
    (centroid(recency=20.0, frequency=1.0, monetary=30.0, tenure=20.0, inactivity=2.0), "new browsers"),
    # Inactivity 90 >= 60 days (recency alone would not say so: it is 30).
    (centroid(recency=30.0, frequency=1.0, monetary=50.0, tenure=400.0, inactivity=90.0), "dormant"),
    # Without an inactivity value the rule falls back to recency.
    (centroid(recency=70.0, frequency=1.0, monetary=50.0, tenure=400.0), "dormant"),
    # 50% budget users vs 30% overall >= 1.5x.
    (centroid(recency=10.0, frequency=2.0, monetary=150.0, tenure=300.0, inactivity=3.0, bargain=0.5),
     "bargain hunters"),
    # Or: order value 40 <= 0.6*80.
    (centroid(recency=10.0, frequency=2.0, monetary=150.0, order_value=40.0, tenure=300.0, inactivity=3.0),
     "bargain hunters"),
    (centroid(recency=10.0, frequency=2.0, monetary=150.0, order_value=70.0, open_rate=0.35, tenure=300.0,
              inactivity=3.0), "engaged readers"),
    # Orders 0 <= 0.5*4, not new, not dormant: they look and rarely buy.
    (centroid(recency=400.0, frequency=0.0, monetary=0.0, open_rate=0.2, tenure=400.0, inactivity=30.0), "browsers"),
    # Orders 3: neither <= 2 nor >= 4.
    (centroid(recency=10.0, frequency=3.0, monetary=150.0, order_value=70.0, open_rate=0.2, tenure=300.0,
              inactivity=3.0), "occasional shoppers"),
])
def test_naming_rules_on_hand_made_centroids(segment, expected):
    assert name_segment(segment, ALL, NAMING)[0] == expected


def test_rules_with_missing_roles_are_skipped_and_a_name_is_always_given():
    no_money = centroid(recency=10.0, frequency=9.0, tenure=300.0)
    # No monetary column: neither VIP nor big spenders; frequency 9 >= 4 makes loyal regulars.
    assert name_segment(no_money, ALL, NAMING)[0] == "loyal regulars"
    nothing = centroid()
    assert name_segment(nothing, centroid(cluster=-1), NAMING)[0] == "occasional shoppers"
    # A population mean of 0 cannot anchor a ratio: the ratio rules are skipped, not all true.
    zero = centroid(cluster=-1, recency=40.0, frequency=0.0, monetary=0.0, tenure=200.0)
    assert name_segment(centroid(recency=10.0, frequency=0.0, monetary=0.0, tenure=300.0), zero,
                        NAMING)[0] == "occasional shoppers"
    assert NAMING_RULES[-1][0] == "occasional shoppers"


def test_segment_ids_follow_monetary_and_duplicate_names_get_suffixes():
    # Three clusters numbered by the clusterer 0..2; two of them are dormant.
    a = centroid(cluster=0, size=5, recency=200.0, frequency=1.0, monetary=20.0, tenure=500.0)
    b = centroid(cluster=1, size=5, recency=10.0, frequency=9.0, monetary=950.0, tenure=500.0)
    c = centroid(cluster=2, size=5, recency=300.0, frequency=1.0, monetary=60.0, tenure=500.0)
    named = name_segments([a, b, c], ALL, NAMING)
    assert [(n.cluster, n.segment_id, n.name) for n in named] == [
        (1, 0, "VIP loyal"), (2, 1, "dormant"), (0, 2, "dormant 2")]
    # Relabelled clusters (another seed's numbering) give the same ids and names.
    renumbered = [dataclasses.replace(a, cluster=2), dataclasses.replace(b, cluster=0),
                  dataclasses.replace(c, cluster=1)]
    assert [(n.segment_id, n.name) for n in name_segments(renumbered, ALL, NAMING)] == \
        [(0, "VIP loyal"), (1, "dormant"), (2, "dormant 2")]


# ---- choosing k ----------------------------------------------------------------------------------

def test_elbow_is_the_point_farthest_below_the_chord():
    # Normalised: x = 0, 1/3, 2/3, 1; y = 1, 0.2, 1/15, 0; gaps below the chord 0.467 (k=3), 0.267 (k=4).
    assert elbow_k([(2, 100.0), (3, 40.0), (4, 30.0), (5, 25.0)]) == 3
    assert elbow_k([(2, 100.0), (3, 50.0)]) is None
    assert elbow_k([(2, 100.0), (3, 95.0), (4, 20.0), (5, 15.0)]) == 4


def test_choice_is_the_best_silhouette_with_ties_to_the_smaller_k():
    candidates = [KCandidate("kmeans", 3, 3, 0.50, 90.0, 0.1), KCandidate("kmeans", 4, 4, 0.61, 60.0, 0.1),
                  KCandidate("bisecting_kmeans", 3, 3, 0.61, 95.0, 0.1),
                  KCandidate("bisecting_kmeans", 4, 1, float("nan"), 200.0, 0.1)]
    choice = choose_candidate(candidates, algorithms=["kmeans", "bisecting_kmeans"], sample_rows=100)
    assert (choice.algorithm, choice.k) == ("bisecting_kmeans", 3)
    assert "0.6100" in choice.reason and "sample of 100 users" in choice.reason
    with pytest.raises(ValueError, match="cannot be segmented"):
        choose_candidate(candidates[-1:], algorithms=["kmeans"], sample_rows=1)


# ---- Spark pieces, hand-computed -----------------------------------------------------------------

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


def test_silhouette_sample_is_deterministic_and_bounded(spark):
    users = spark.createDataFrame([(f"u{i}",) for i in range(50)], "user_id string")
    first = [r.user_id for r in silhouette_sample(users, rows=10, seed=1).collect()]
    again = [r.user_id for r in silhouette_sample(users.repartition(3), rows=10, seed=1).collect()]
    assert len(first) == 10 and sorted(first) == sorted(again)
    assert silhouette_sample(users, rows=100, seed=1).count() == 50


def test_profiles_by_hand(spark):
    schema = "user_id string, _seg_cluster int, orders int, monetary double, band string, cats array<string>"
    assigned = spark.createDataFrame([
        ("a", 0, 2, 100.0, "budget", ["x", "y"]),
        ("b", 0, 4, None, "budget", ["y"]),
        ("c", 0, 0, 50.0, "mid", ["z", "y"]),
        ("d", 1, 10, 1000.0, None, []),
        ("e", 1, 20, 3000.0, "luxury", None),
    ], schema)
    params = dataclasses.replace(TEST_PARAMS, feature_columns=["orders", "monetary"], log_columns=[],
                                 roles={"frequency": "orders", "monetary": "monetary", "price_band": "band",
                                        "categories": "cats"}, top_categories=2)
    profiles, population = cluster_profiles(assigned, cluster_col=CLUSTER_COL, params=params)
    rows = {int(r[CLUSTER_COL]): r for r in profiles.to_dict("records")}
    assert rows[0]["size"] == 3 and rows[1]["size"] == 2
    assert rows[0]["mean_orders"] == pytest.approx(2.0)
    # The mean over users who have a value: (100 + 50) / 2.
    assert rows[0]["mean_monetary"] == pytest.approx(75.0)
    assert rows[0]["top_price_band"] == "budget" and rows[1]["top_price_band"] == "luxury"
    assert rows[0]["bargain_band_share"] == pytest.approx(2 / 3)
    assert rows[1]["bargain_band_share"] == pytest.approx(0.0)
    # y in 3 lists, then x and z once each: the tie goes to the name first in order.
    assert rows[0]["top_categories"] == ["y", "x"]
    assert rows[1]["top_categories"] == []
    assert population["size"] == 5
    assert population["mean_orders"] == pytest.approx(36 / 5)
    assert population["mean_monetary"] == pytest.approx(4150 / 4)
    assert population["bargain_band_share"] == pytest.approx(2 / 5)


def test_bisecting_kmeans_splits_centred_data(spark):
    # Spark's bisecting K-means cannot split a cluster centred on the origin; the anchor coordinate fixes it.
    features, _ = planted_frame(spark, per_group=6)
    prep = Pipeline(stages=preprocessing_stages(TEST_PARAMS)).fit(features)
    points = PipelineModel(stages=anchor_stages()).transform(prep.transform(features))
    params = dataclasses.replace(TEST_PARAMS, max_iter=3)
    model = clusterer(params, algorithm="bisecting_kmeans", k=4, seed=1).fit(points)
    assert len(model.clusterCenters()) == 4


def test_search_with_pca_recovers_planted_groups(spark):
    features, truth = planted_frame(spark, per_group=6)
    params = dataclasses.replace(TEST_PARAMS, pca_components=2, algorithms=["kmeans"], k_min=4, k_max=4,
                                 stability_seeds=[])
    model = SegmentSearch(params).fit(features)
    assert len(clusterer_centres(model)[0]) == 2
    assigned = model.transform(features).join(truth, on="user_id", how="inner")
    assert adjusted_rand_index(assigned, left="segment_id", right="planted") >= 0.8
    # No extra seed: nothing to compare, and stability says so rather than claim agreement.
    assert model.stability.pairwise == {} and math.isnan(model.stability.mean)


def clusterer_centres(model):
    from inboxlift.models.segments import clusterer_stage

    return clusterer_stage(model.pipeline).clusterCenters()


def test_search_refuses_missing_columns_and_empty_input(spark):
    empty = spark.createDataFrame([], FEATURE_SCHEMA)
    with pytest.raises(ValueError, match="0 users cannot make 3 segments"):
        SegmentSearch(TEST_PARAMS).fit(empty)
    with pytest.raises(ValueError, match=r"lacks columns \['tenure_days'\]"):
        SegmentSearch(TEST_PARAMS).fit(empty.drop("tenure_days"))
    with pytest.raises(ValueError, match="log_columns"):
        SegmentSearch(dataclasses.replace(TEST_PARAMS, log_columns=["nope"]))


# ---- training on planted groups: stage, MLflow, registry, scoring --------------------------------

@pytest.fixture(scope="module")
def trained(spark, spark_info, base_settings, tmp_path_factory):
    """One segment-train on planted groups (a row with nulls included), then one scoring."""
    work = tmp_path_factory.mktemp("segments")
    settings = dataclasses.replace(settings_in(base_settings, work), segments=TEST_PARAMS)
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    ctx = RunContext(spark=spark, settings=settings, lake=lake, clock=FixedClock.at("2026-11-20T12:00:00"))
    features, truth = planted_frame(spark)
    with_nulls = spark.createDataFrame([("u-nulls", None, None, None, None, 700, None, None)], FEATURE_SCHEMA)
    lake.overwrite("user_features", features.unionByName(with_nulls))
    report = run_segment_train(ctx)
    score = run_segment(ctx)
    return ctx, report, score, features, truth


def test_training_recovers_the_planted_groups(trained):
    ctx, report, _, features, truth = trained
    model = report.model
    assert model.choice.k == 4
    assigned = model.transform(features).join(truth, on="user_id", how="inner")
    assert assigned.count() == len(PLANTED) * PER_GROUP
    assert adjusted_rand_index(assigned, left="segment_id", right="planted") >= 0.8
    # Every candidate of both algorithms was fitted and measured.
    assert {(c.algorithm, c.k) for c in model.candidates} == {(a, k) for a in ("kmeans", "bisecting_kmeans")
                                                              for k in (3, 4, 5)}
    assert model.stability.seeds == (5, 17)
    assert model.stability.mean >= 0.8


def test_segments_are_named_by_the_rules_and_ordered_by_monetary(trained):
    _, report, _, features, truth = trained
    profiles = report.model.profiles
    # Ids by descending monetary mean: VIP 3000, at-risk 2400, dormant 80, new 0.
    assert list(profiles["segment_name"]) == ["VIP loyal", "at-risk big spenders", "dormant", "new browsers"]
    assert list(profiles["segment_id"]) == [0, 1, 2, 3]
    # Each planted group lands in the segment named after it.
    majority = (report.model.transform(features).join(truth, on="user_id", how="inner")
                .groupBy("planted", "segment_name").count().collect())
    best = {}
    for r in majority:
        if r["count"] > best.get(r["planted"], (None, 0))[1]:
            best[r["planted"]] = (r["segment_name"], r["count"])
    assert {g: best[g][0] for g in best} == {g: PLANTED[g][0] for g in range(len(PLANTED))}
    vip = profiles.iloc[0]
    assert vip["mean_monetary"] == pytest.approx(3000.0, rel=0.05)
    assert vip["mean_recency_days"] == pytest.approx(6.0, abs=1.5)
    assert vip["top_categories"] == ["bags", "shoes"] and vip["top_price_band"] == "premium"
    assert profiles["size"].sum() == len(PLANTED) * PER_GROUP + 1
    assert profiles["share"].sum() == pytest.approx(1.0)


def test_mlflow_run_holds_what_was_measured(trained):
    ctx, report, _, _, _ = trained
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    run = client.get_run(report.run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    chosen = next(c for c in report.model.candidates
                  if (c.algorithm, c.k) == (report.model.choice.algorithm, report.model.choice.k))
    assert metrics["chosen_k"] == 4
    assert metrics["silhouette_sqeuclidean_sample"] == pytest.approx(chosen.silhouette)
    assert metrics["within_cluster_sse_scaled"] == pytest.approx(chosen.cost)
    assert metrics["stability_ari_mean_between_seeds"] == pytest.approx(report.model.stability.mean)
    history = client.get_metric_history(report.run_id, "kmeans/silhouette_sqeuclidean_sample")
    assert sorted(m.step for m in history) == [3, 4, 5]
    assert params["data.table"] == "user_features" and params["data.training_rows"] == "121"
    assert params["k_min"] == "3" and params["naming.dormant_days"] == "60.0"
    assert "highest silhouette" in tags["selection_reason"]
    artifacts = {a.path for a in client.list_artifacts(report.run_id)} | \
        {a.path for d in ("segments", "plots") for a in client.list_artifacts(report.run_id, d)}
    assert {"segment_pipeline", "segments/profiles.json", "segments/k_search.csv", "segments/stability.json",
            "plots/k_search.png", "plots/segment_profiles.png"} <= artifacts
    # The profile table and k search load back as they were logged.
    loaded = champion_artifacts(ctx)
    assert list(loaded.profiles["segment_name"]) == list(report.model.profiles["segment_name"])
    assert list(loaded.profiles["size"]) == list(report.model.profiles["size"])
    assert loaded.k_search["silhouette_sqeuclidean_sample"].tolist() == pytest.approx(
        report.model.k_search()["silhouette_sqeuclidean_sample"].tolist())
    info = mlflow.models.get_model_info(f"runs:/{report.run_id}/segment_pipeline")
    assert info.signature.inputs.input_names() == TEST_PARAMS.feature_columns
    assert info.signature.outputs.input_names() == ["prediction"]


def test_registered_pipeline_loads_back_and_assigns_the_same_segments(trained, spark):
    ctx, report, _, features, _ = trained
    loaded = mlflow.spark.load_model(f"models:/{TEST_PARAMS.registered_model}@champion")
    in_memory = report.model.transform(features)
    from_registry = assign_segments(features, pipeline=loaded)
    assert_df_equality(from_registry.drop("distance"), in_memory.drop("distance"), ignore_row_order=True)
    distances = in_memory.join(from_registry.withColumnRenamed("distance", "d2"), on="user_id", how="inner")
    assert distances.where(F.abs(F.col("distance") - F.col("d2")) > 1e-9).isEmpty()


def test_first_version_is_champion_and_scoring_writes_every_user(trained):
    ctx, report, score, _, _ = trained
    assert report.promotion.alias == "champion" and report.promotion.previous_champion is None
    table = ctx.lake.read("user_segments")
    assert table.columns == SEGMENT_COLUMNS
    assert table.count() == len(PLANTED) * PER_GROUP + 1
    assert [tuple(r) for r in table.select("model_version", "run_id").distinct().collect()] == \
        [(report.version, report.run_id)]
    assert table.where(F.col("scored_at") != F.lit("2026-11-20 12:00:00").cast("timestamp")).isEmpty()
    assert table.where(F.col("distance").isNull() | (F.col("distance") < 0)).isEmpty()
    # The all-null user is scored too (nulls read as the configured fills).
    assert table.where(F.col("user_id") == "u-nulls").count() == 1
    assert score.users == len(PLANTED) * PER_GROUP + 1
    assert "VIP loyal" in score.summary() and "champion" in report.summary()


def test_new_users_are_scored_without_retraining(trained):
    ctx, report, _, features, truth = trained
    newcomers, _ = planted_frame(ctx.spark, per_group=3, seed=99, prefix="new")
    ctx.lake.append("user_features", newcomers)
    run_segment(ctx)
    table = ctx.lake.read("user_segments")
    assert table.count() == len(PLANTED) * PER_GROUP + 1 + len(PLANTED) * 3
    got = {r["user_id"]: r["segment_name"] for r in table.where(F.col("user_id").startswith("new")).collect()}
    assert got == {f"new{g}-{i:03d}": PLANTED[g][0] for g in range(len(PLANTED)) for i in range(3)}
    assert [tuple(r) for r in table.select("model_version").distinct().collect()] == [(report.version,)]


def test_training_again_gives_the_same_segments_and_a_challenger(trained):
    ctx, first, _, features, _ = trained
    second = run_segment_train(ctx)
    assert list(second.model.profiles["segment_name"]) == list(first.model.profiles["segment_name"])
    # Users added since the first training make the second one's data differ a little; the
    # assignments of the planted users are the same.
    both = (first.model.transform(features).select("user_id", F.col("segment_id").alias("a"))
            .join(second.model.transform(features).select("user_id", F.col("segment_id").alias("b")),
                  on="user_id", how="inner"))
    assert both.where(F.col("a") != F.col("b")).isEmpty()
    # Same segments, same silhouette on the same data: a tie keeps the sitting champion.
    assert second.promotion.alias == "challenger"
    assert second.promotion.previous_champion == first.version
    assert second.promotion.champion_score == pytest.approx(second.promotion.score, abs=1e-9)
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    assert str(registry.champion(client, TEST_PARAMS.registered_model).version) == first.version
    assert str(client.get_model_version_by_alias(TEST_PARAMS.registered_model, "challenger").version) == \
        second.version


def test_scoring_without_a_champion_says_so(ctx):
    settings = dataclasses.replace(ctx.settings, segments=dataclasses.replace(TEST_PARAMS,
                                                                             registered_model="test-segments-none"))
    with pytest.raises(NoChampionError, match="run segment-train first"):
        run_segment(dataclasses.replace(ctx, settings=settings))


def test_plots_draw_from_the_small_tables(trained):
    _, report, _, _, _ = trained
    k_figure = plot_k_search(report.model.k_search(), chosen=(report.model.choice.algorithm, 4))
    assert len(k_figure.axes) == 2 and len(k_figure.axes[0].lines) == 2
    profile_figure = plot_profiles(report.model.profiles, population=report.model.population)
    heat = profile_figure.axes[1]
    assert [t.get_text() for t in heat.get_yticklabels()] == \
        [f"{i} {n}" for i, n in enumerate(report.model.profiles["segment_name"])]
