"""Segments: the adjusted Rand index against hand computation, then the stages on planted groups (Spark ML's
K-means, the search on a sample), logged, registered, loaded back, used for scoring, run twice."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import mlflow
import numpy as np
import pytest
from chispa import assert_df_equality
from mlflow import MlflowClient
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
from inboxlift.models.segments import assign_segments, plot_k_search, plot_profiles, silhouette_sample
from inboxlift.models.segments.search import COST, SEARCH_COST
from inboxlift.storage import Lake
from inboxlift.stages.segments import (
    SEGMENT_COLUMNS,
    NoChampionError,
    champion_artifacts,
    champion_scorer,
    run_segment,
    run_segment_train,
)
from planted_segments import FEATURE_SCHEMA, PER_GROUP, PLANTED, TEST_PARAMS, planted_frame

USERS = len(PLANTED) * PER_GROUP + 1   # the planted users and one with nulls


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


# ---- training on planted groups: stage, MLflow, registry, scoring --------------------------------

@pytest.fixture(scope="module")
def trained(spark, spark_info, base_settings, tmp_path_factory):
    """One segment-train on planted groups (a row with nulls included), searched on a sample of about
    half the users, then one scoring."""
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


def test_training_on_a_sample_recovers_the_planted_groups(trained):
    ctx, report, _, features, truth = trained
    model = report.model
    assert model.choice.k == 4
    # The search ran on about 100 of the 201 users (sd 7), the chosen model on all of them.
    assert 75 <= model.search_rows <= 125 and model.training_rows == USERS and model.refit_seconds > 0
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
    # Ids by descending monetary mean: VIP 3000, at-risk 2400, dormant 80, prospects 0. The prospects
    # (no order, 200 days since they joined) are not named dormant.
    assert list(profiles["segment_name"]) == ["VIP loyal", "at-risk big spenders", "dormant", "prospects"]
    assert list(profiles["segment_id"]) == [0, 1, 2, 3]
    # Every planted prospect has no order; the buyers' segments none, but for the user with nulls
    # (orders unknown) wherever it lands.
    shares = profiles["no_order_share"].tolist()
    assert shares[3] == 1.0 and shares[:2] == [0.0, 0.0] and shares[2] <= 1 / PER_GROUP
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
    assert profiles["size"].sum() == USERS
    assert profiles["share"].sum() == pytest.approx(1.0)


def test_mlflow_run_holds_what_was_measured(trained):
    ctx, report, _, _, _ = trained
    model = report.model
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    run = client.get_run(report.run_id)
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    chosen = next(c for c in model.candidates if (c.algorithm, c.k) == (model.choice.algorithm, model.choice.k))
    assert metrics["chosen_k"] == 4
    assert metrics["silhouette_sqeuclidean_sample"] == pytest.approx(chosen.silhouette)
    assert metrics[SEARCH_COST] == pytest.approx(chosen.cost)
    # The refit's cost covers all users: more than the sample's.
    assert metrics[COST] == pytest.approx(model.training_cost) and model.training_cost > chosen.cost
    assert metrics["stability_ari_mean_between_seeds"] == pytest.approx(model.stability.mean)
    history = client.get_metric_history(report.run_id, f"kmeans/{SEARCH_COST}")
    assert sorted(m.step for m in history) == [3, 4, 5]
    assert params["data.table"] == "user_features" and params["data.training_rows"] == str(USERS)
    assert params["data.search_rows"] == str(model.search_rows) and params["search_sample_rows"] == "100"
    assert params["k_min"] == "3" and params["naming.prospect_min_share"] == "0.9"
    assert "highest silhouette" in tags["selection_reason"]
    artifacts = {a.path for a in client.list_artifacts(report.run_id)} | \
        {a.path for d in ("segments", "plots") for a in client.list_artifacts(report.run_id, d)}
    assert {"segment_pipeline", "segments/profiles.json", "segments/k_search.csv", "segments/stability.json",
            "plots/k_search.png", "plots/segment_profiles.png"} <= artifacts
    # The profile table and k search load back as they were logged.
    loaded = champion_artifacts(ctx)
    assert list(loaded.profiles["segment_name"]) == list(model.profiles["segment_name"])
    assert list(loaded.profiles["name_reason"]) == list(model.profiles["name_reason"])
    assert list(loaded.profiles["size"]) == list(model.profiles["size"])
    assert loaded.k_search["silhouette_sqeuclidean_sample"].tolist() == pytest.approx(
        model.k_search()["silhouette_sqeuclidean_sample"].tolist())
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
    # MLflow's pyfunc flavour scores too: its prediction is the segment id.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{TEST_PARAMS.registered_model}@champion")
    rows = features.orderBy("user_id").limit(5)
    predicted = pyfunc.predict(rows.select(*TEST_PARAMS.feature_columns).toPandas())
    expected = [r["segment_id"] for r in in_memory.join(rows.select("user_id"), on="user_id", how="inner")
                .orderBy("user_id").collect()]
    assert list(np.asarray(predicted).ravel()) == expected


def test_first_version_is_champion_and_scoring_writes_every_user(trained):
    ctx, report, score, _, _ = trained
    assert report.promotion.alias == "champion" and report.promotion.previous_champion is None
    table = ctx.lake.read("user_segments")
    assert table.columns == SEGMENT_COLUMNS
    assert table.count() == USERS
    assert [tuple(r) for r in table.select("model_version", "run_id").distinct().collect()] == \
        [(report.version, report.run_id)]
    assert table.where(F.col("scored_at") != F.lit("2026-11-20 12:00:00").cast("timestamp")).isEmpty()
    assert table.where(F.col("distance").isNull() | (F.col("distance") < 0)).isEmpty()
    # The all-null user is scored too (nulls read as the configured fills).
    assert table.where(F.col("user_id") == "u-nulls").count() == 1
    assert score.users == USERS
    assert "VIP loyal" in score.summary() and "champion" in report.summary()
    assert f"k searched on {report.model.search_rows} of {USERS} users" in report.summary()


def test_scoring_twice_leaves_the_same_table(trained):
    ctx, _, _, _, _ = trained
    before = ctx.lake.read("user_segments").collect()
    run_segment(ctx)
    assert_df_equality(ctx.lake.read("user_segments"), ctx.spark.createDataFrame(before, ctx.lake.read(
        "user_segments").schema), ignore_row_order=True)


def test_new_users_are_scored_without_retraining(trained):
    ctx, report, _, features, truth = trained
    newcomers, _ = planted_frame(ctx.spark, per_group=3, seed=99, prefix="new")
    ctx.lake.append("user_features", newcomers)
    run_segment(ctx)
    table = ctx.lake.read("user_segments")
    assert table.count() == USERS + len(PLANTED) * 3
    got = {r["user_id"]: r["segment_name"] for r in table.where(F.col("user_id").startswith("new")).collect()}
    assert got == {f"new{g}-{i:03d}": PLANTED[g][0] for g in range(len(PLANTED)) for i in range(3)}
    assert [tuple(r) for r in table.select("model_version").distinct().collect()] == [(report.version,)]


def test_training_again_gives_the_same_segments_a_challenger_and_the_same_table(trained):
    ctx, first, _, features, _ = trained
    before = ctx.lake.read("user_segments").collect()
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
    # The champion did not change, so scoring again writes the same table.
    run_segment(ctx)
    assert_df_equality(ctx.lake.read("user_segments"), ctx.spark.createDataFrame(before, ctx.lake.read(
        "user_segments").schema), ignore_row_order=True)


def test_a_champion_whose_pipeline_no_longer_loads_cannot_score(trained, tmp_path, monkeypatch):
    """A champion saved with a clusterer class that is gone (the collective K-means) is replaced, not a crash."""
    ctx, report, _, features, _ = trained
    (tmp_path / "gone_clusterer.py").write_text(textwrap.dedent("""
        from pyspark.ml import Model
        from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable

        class GoneModel(Model, DefaultParamsReadable, DefaultParamsWritable):
            def _transform(self, dataset):
                return dataset
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from gone_clusterer import GoneModel
    from pyspark.ml import PipelineModel

    name = "test-segments-gone"
    with mlflow.start_run():
        mlflow.spark.log_model(PipelineModel(stages=[GoneModel()]), artifact_path="segment_pipeline",
                               pip_requirements=[], registered_model_name=name)
    monkeypatch.delitem(sys.modules, "gone_clusterer")
    (tmp_path / "gone_clusterer.py").unlink()
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    version = client.get_model_version(name, "1")
    sample = silhouette_sample(features, rows=50, seed=1)
    assert champion_scorer(name, sample=sample, space=report.model.pipeline)(version) is None
    # A version that loads is measured.
    scorer = champion_scorer(TEST_PARAMS.registered_model, sample=sample, space=report.model.pipeline)
    assert 0.0 < scorer(registry.champion(client, TEST_PARAMS.registered_model)) <= 1.0


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
