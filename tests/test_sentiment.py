"""Review sentiment model: labels from ratings, learning on a small English + Chinese set, the MLflow run."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math

import mlflow
import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

from inboxlift.models.sentiment import MODEL_ARTIFACT, SentimentParams, fit_sentiment, label_reviews, score_reviews

AS_OF = dt.date(2026, 11, 20)
TS = dt.datetime(2026, 11, 1, 12, 0)
REVIEW_SCHEMA = "event_id string, user_id string, item_id string, event_ts timestamp, rating int, review_text string"

POSITIVE_EN = ["love it", "excellent quality", "works perfectly", "great value", "highly recommend", "fast delivery"]
NEGATIVE_EN = ["broke after a week", "terrible quality", "waste of money", "very disappointed", "arrived damaged",
               "does not work"]
POSITIVE_ZH = ["非常好", "质量很好", "物超所值", "强烈推荐", "很喜欢"]
NEGATIVE_ZH = ["质量太差", "很失望", "不推荐", "浪费钱", "收到时已损坏"]


def _texts(phrases: list[str], sep: str) -> list[str]:
    return [a + sep + b for a, b in itertools.permutations(phrases, 2)]


def _labelled_rows() -> list[tuple]:
    rows = []
    groups = [(_texts(POSITIVE_EN, ", "), 5), (_texts(NEGATIVE_EN, ", "), 1),
              (_texts(POSITIVE_ZH, "，"), 4), (_texts(NEGATIVE_ZH, "，"), 2)]
    for texts, rating in groups:
        for text in texts:
            rows.append((f"r{len(rows):04d}", f"u{len(rows) % 7}", f"i{len(rows) % 5}", TS, rating, text))
    return rows


@pytest.fixture(scope="module")
def reviews(spark):
    neutral = [("n1", "u1", "i1", TS, 3, "it is okay"), ("n2", "u2", "i2", TS, 3, "还可以"),
               ("n3", "u3", "i3", TS, None, "no rating here")]
    return spark.createDataFrame(_labelled_rows() + neutral, REVIEW_SCHEMA)


@pytest.fixture(scope="module")
def fit(reviews, base_settings):
    params = SentimentParams(num_features=4096, reg_param=0.01, max_iter=30, test_percent=20, min_reviews=20)
    return fit_sentiment(reviews, params=params, mlflow_settings=base_settings.mlflow, as_of=AS_OF,
                         tags={"test": "sentiment"})


def test_labels_come_from_ratings_and_three_stars_are_left_out(spark):
    rows = [("a", "u", "i", TS, 5, "x"), ("b", "u", "i", TS, 4, "x"), ("c", "u", "i", TS, 3, "x"),
            ("d", "u", "i", TS, 2, "x"), ("e", "u", "i", TS, 1, "x"), ("f", "u", "i", TS, None, "x"),
            ("g", "u", "i", TS, 5, None)]
    labelled = spark.createDataFrame(rows, REVIEW_SCHEMA).transform(label_reviews, test_percent=20)
    expected = spark.createDataFrame([("a", 1.0), ("b", 1.0), ("d", 0.0), ("e", 0.0)], "event_id string, label double")
    assert_df_equality(labelled.select("event_id", "label"), expected, ignore_row_order=True, ignore_nullable=True)


def test_labels_of_an_empty_input(spark):
    labelled = spark.createDataFrame([], REVIEW_SCHEMA).transform(label_reviews, test_percent=20)
    assert labelled.isEmpty()


def test_holdout_split_depends_only_on_the_event_id(spark, reviews):
    split = reviews.transform(label_reviews, test_percent=20).select("event_id", "is_test")
    reshuffled = reviews.repartition(3, "user_id").transform(label_reviews, test_percent=20).select("event_id", "is_test")
    assert_df_equality(split, reshuffled, ignore_row_order=True)
    n_test = split.where("is_test").count()
    # 30 + 30 + 20 + 20 = 100 labelled reviews; a 20% hash split lands near 20, never at the extremes.
    assert split.count() == 100
    assert 5 <= n_test <= 40


def test_the_model_learns_english_and_chinese(spark, fit):
    assert fit.skipped is None
    assert fit.counts["train_positive"] + fit.counts["test_positive"] == 50
    assert fit.counts["train_negative"] + fit.counts["test_negative"] == 50
    assert fit.metrics["test_f1_weighted"] >= 0.8
    assert fit.metrics["test_auc_roc"] >= 0.9
    unseen = spark.createDataFrame([
        ("x1", "u9", "i9", TS, None, "excellent quality and fast delivery"),
        ("x2", "u9", "i9", TS, None, "terrible quality, a waste of money"),
        ("x3", "u9", "i9", TS, None, "质量很好，很喜欢"),
        ("x4", "u9", "i9", TS, None, "很失望，浪费钱"),
        ("x5", "u9", None, TS, None, None),
    ], REVIEW_SCHEMA)
    scored = unseen.transform(score_reviews, model=fit.model, threshold=0.5, run_id=fit.run_id, as_of=AS_OF)
    expected = spark.createDataFrame(
        [("x1", 1, False), ("x2", 0, True), ("x3", 1, False), ("x4", 0, True)],
        "event_id string, sentiment_label int, is_negative boolean")
    assert_df_equality(scored.where("event_id != 'x5'").select("event_id", "sentiment_label", "is_negative"),
                       expected, ignore_row_order=True, ignore_nullable=True)
    # A review without text is still scored (as an empty text) instead of failing the run.
    assert scored.where("event_id = 'x5'").select("sentiment_score").first()[0] is not None


def test_the_run_is_logged_and_its_model_loads_back_and_scores_the_same(spark, fit, reviews, base_settings):
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    run = client.get_run(fit.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model"] == "review_sentiment"
    for name in ("test_auc_roc", "test_f1_weighted", "test_f1_negative", "test_f1_positive", "test_accuracy"):
        assert math.isclose(run.data.metrics[name], fit.metrics[name])
    assert run.data.params["sentiment_reg_param"] == "0.01"
    assert run.data.params["as_of_date"] == "2026-11-20"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == base_settings.mlflow.experiment
    description = json.loads(mlflow.artifacts.load_text(f"runs:/{fit.run_id}/evaluation_data.json"))
    assert description["counts"] == fit.counts

    loaded = mlflow.spark.load_model(fit.model_uri)
    original = fit.model.transform(reviews).select("event_id", F.col("probability").cast("string").alias("p"))
    reloaded = loaded.transform(reviews).select("event_id", F.col("probability").cast("string").alias("p"))
    assert_df_equality(original, reloaded, ignore_row_order=True)
    assert MODEL_ARTIFACT in fit.model_uri or fit.model_uri.startswith("models:/")


def test_too_few_reviews_skip_training_without_a_run(spark, base_settings):
    few = spark.createDataFrame(_labelled_rows()[:5], REVIEW_SCHEMA)
    result = fit_sentiment(few, params=SentimentParams(min_reviews=20), mlflow_settings=base_settings.mlflow,
                           as_of=AS_OF)
    assert result.model is None and result.run_id is None
    assert "need 20" in result.skipped


def test_scores_are_probabilities_consistent_with_labels(spark, fit, reviews):
    scored = reviews.transform(score_reviews, model=fit.model, threshold=0.5, run_id=fit.run_id, as_of=AS_OF)
    inconsistent = scored.where(
        (F.col("sentiment_score") < 0) | (F.col("sentiment_score") > 1)
        | ((F.col("sentiment_score") >= 0.5) != (F.col("sentiment_label") == 1))
        | (F.col("is_negative") != (F.col("sentiment_label") == 0)))
    assert inconsistent.isEmpty()
    assert scored.count() == reviews.count()
    assert_approx_df_equality(
        scored.where("event_id = 'r0000'").select("event_id", "model_run_id"),
        spark.createDataFrame([("r0000", fit.run_id)], "event_id string, model_run_id string"),
        precision=0, ignore_nullable=True)
