"""Review sentiment: a Spark ML text classifier trained on reviews labelled by their star rating.

Labels: 4-5 stars positive (1), 1-2 negative (0), 3 stars and unrated reviews left out of training
(they are still scored). Features are built for text in any script: word tokens (Unicode-aware,
English stop words removed) and their bigrams, plus character bigrams, which carry Chinese text
where there are no spaces between words; all hashed, IDF-weighted, into a logistic regression.

The held-out split is by a hash of the event id, so it does not depend on partitioning or on the
order rows arrive in: a review is in the test set in every run.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
from pyspark.ml.feature import IDF, NGram, HashingTF, RegexTokenizer, SQLTransformer, StopWordsRemover
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.session import materialize
from inboxlift.settings import FeatureSettings, MlflowSettings
from inboxlift.schemas import require_columns
from inboxlift.transforms.features_reviews import REVIEW_COLUMNS, REVIEW_SCORE_COLUMNS

TEXT = "review_text"
MODEL_ARTIFACT = "sentiment_model"
RUN_NAME = "review_sentiment"
POSITIVE_MIN_RATING, NEGATIVE_MAX_RATING = 4, 2
HOLDOUT_RULE = "pmod(xxhash64(event_id), 100) < test_percent"


@dataclass(frozen=True)
class SentimentParams:
    """How the sentiment pipeline is built and trained (from ``features.sentiment_*`` settings)."""

    num_features: int = 262144
    reg_param: float = 0.01
    elastic_net: float = 0.0
    max_iter: int = 50
    test_percent: int = 20
    min_reviews: int = 20
    negative_threshold: float = 0.5

    @classmethod
    def from_settings(cls, settings: FeatureSettings) -> "SentimentParams":
        return cls(
            num_features=settings.sentiment_num_features, reg_param=settings.sentiment_reg_param,
            elastic_net=settings.sentiment_elastic_net, max_iter=settings.sentiment_max_iter,
            test_percent=settings.sentiment_test_percent, min_reviews=settings.sentiment_min_reviews,
            negative_threshold=settings.negative_review_threshold,
        )


@dataclass(frozen=True)
class SentimentFit:
    """The outcome of :func:`fit_sentiment`: a model with its run, or the reason there is none."""

    model: PipelineModel | None
    run_id: str | None = None
    model_uri: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None


def label_reviews(reviews: DataFrame, *, test_percent: int) -> DataFrame:
    """Rated reviews with text -> ``event_id, review_text, label`` (1.0 / 0.0) and ``is_test``; 3 stars dropped."""
    require_columns(reviews, ["event_id", "rating", TEXT], step="label_reviews")
    rating = F.col("rating")
    label = F.when(rating >= POSITIVE_MIN_RATING, F.lit(1.0)).when(rating <= NEGATIVE_MAX_RATING, F.lit(0.0))
    return (
        reviews.where(F.col(TEXT).isNotNull())
        .select("event_id", TEXT, label.alias("label"),
                (F.pmod(F.xxhash64("event_id"), F.lit(100)) < test_percent).alias("is_test"))
        .where(F.col("label").isNotNull())
    )


def build_pipeline(params: SentimentParams) -> Pipeline:
    """The untrained pipeline: text -> tokens and bigrams -> hashed TF-IDF -> logistic regression."""
    # A missing text scores as an empty one instead of failing the tokenizer.
    text = SQLTransformer(statement=f"SELECT *, coalesce({TEXT}, '') AS _text FROM __THIS__")
    # (?U) makes \w Unicode-aware: without it Java's \w is ASCII and Chinese text would vanish.
    words = RegexTokenizer(inputCol="_text", outputCol="_words", pattern=r"(?U)\w+", gaps=False)
    content_words = StopWordsRemover(inputCol="_words", outputCol="_content_words")
    word_bigrams = NGram(n=2, inputCol="_content_words", outputCol="_word_bigrams")
    chars = RegexTokenizer(inputCol="_text", outputCol="_chars", pattern=r"(?U)\w", gaps=False)
    char_bigrams = NGram(n=2, inputCol="_chars", outputCol="_char_bigrams")
    terms = SQLTransformer(
        statement="SELECT *, concat(_content_words, _word_bigrams, _char_bigrams) AS _terms FROM __THIS__")
    tf = HashingTF(inputCol="_terms", outputCol="_tf", numFeatures=params.num_features)
    idf = IDF(inputCol="_tf", outputCol="features")
    classifier = LogisticRegression(featuresCol="features", labelCol="label", maxIter=params.max_iter,
                                    regParam=params.reg_param, elasticNetParam=params.elastic_net)
    return Pipeline(stages=[text, words, content_words, word_bigrams, chars, char_bigrams, terms, tf, idf,
                            classifier])


def evaluate(scored: DataFrame) -> dict[str, float]:
    """Held-out metrics; NaN where the test set lacks a class (AUC and per-class F1 are undefined).

    Each of the five evaluators runs its own job over ``scored``: pass rows already computed and kept
    (as :func:`fit_sentiment` does), or the whole pipeline runs five times over the held-out reviews.
    """
    metrics = {
        "test_auc_roc": BinaryClassificationEvaluator(labelCol="label", rawPredictionCol="rawPrediction",
                                                      metricName="areaUnderROC"),
        "test_f1_weighted": MulticlassClassificationEvaluator(labelCol="label", metricName="f1"),
        "test_f1_negative": MulticlassClassificationEvaluator(labelCol="label", metricName="fMeasureByLabel",
                                                              metricLabel=0.0),
        "test_f1_positive": MulticlassClassificationEvaluator(labelCol="label", metricName="fMeasureByLabel",
                                                              metricLabel=1.0),
        "test_accuracy": MulticlassClassificationEvaluator(labelCol="label", metricName="accuracy"),
    }
    return {name: float(evaluator.evaluate(scored)) for name, evaluator in metrics.items()}


def _model_signature():
    import pandas as pd
    from mlflow.models import infer_signature

    # Made-up sentences, never customer text: the signature only needs the column types.
    examples = pd.DataFrame({TEXT: ["great quality, love it", "质量太差"]})
    return infer_signature(examples, pd.DataFrame({"prediction": [1.0, 0.0]}))


def fit_sentiment(reviews: DataFrame, *, params: SentimentParams, mlflow_settings: MlflowSettings,
                  as_of: dt.date, tags: dict[str, str] | None = None) -> SentimentFit:
    """Train on the labelled reviews' training split, evaluate on the held-out split, log one MLflow run.

    The run holds the parameters, the held-out metrics (``test_*``), a description of the training
    and evaluation data (``evaluation_data.json``) and the fitted pipeline (``sentiment_model``,
    Spark flavour, with a signature). Returns without a run when there are fewer than
    ``params.min_reviews`` labelled training reviews or only one class.
    """
    import mlflow

    from inboxlift.models.tracking import model_code_paths, tracked_run

    require_columns(reviews, REVIEW_COLUMNS, step="fit_sentiment")
    labelled = reviews.transform(label_reviews, test_percent=params.test_percent)
    counts = {"train_positive": 0, "train_negative": 0, "test_positive": 0, "test_negative": 0}
    # At most four rows: (split, label) counts.
    for row in labelled.groupBy("is_test", "label").count().collect():
        split = "test" if row["is_test"] else "train"
        counts[f"{split}_{'positive' if row['label'] == 1.0 else 'negative'}"] = int(row["count"])
    n_train = counts["train_positive"] + counts["train_negative"]
    if n_train < params.min_reviews or min(counts["train_positive"], counts["train_negative"]) == 0:
        return SentimentFit(model=None, counts=counts, skipped=(
            f"{n_train} labelled training reviews ({counts['train_positive']} positive, "
            f"{counts['train_negative']} negative); need {params.min_reviews} and both classes"))

    train = labelled.where(~F.col("is_test")).persist()
    test = labelled.where(F.col("is_test"))
    run_params = {**{f"sentiment_{k}": v for k, v in params.__dict__.items()}, "as_of_date": as_of.isoformat(),
                  "label_rule": f"rating >= {POSITIVE_MIN_RATING} -> 1, rating <= {NEGATIVE_MAX_RATING} -> 0, "
                                "3 stars dropped", "holdout_rule": HOLDOUT_RULE}
    try:
        with tracked_run(mlflow_settings, run_name=RUN_NAME,
                         tags={"model": RUN_NAME, "as_of_date": as_of.isoformat(), **(tags or {})},
                         params=run_params) as run:
            model = build_pipeline(params).fit(train)
            has_both_test_classes = min(counts["test_positive"], counts["test_negative"]) > 0
            if has_both_test_classes:
                # Scored once and kept (the three columns the evaluators read), not once per evaluator.
                scored = materialize(model.transform(test).select("label", "rawPrediction", "prediction"))
                metrics = evaluate(scored)
                del scored
            else:
                metrics = {name: math.nan for name in ("test_auc_roc", "test_f1_weighted", "test_f1_negative",
                                                       "test_f1_positive", "test_accuracy")}
            mlflow.log_metrics(metrics)
            mlflow.log_metrics({f"n_{k}": float(v) for k, v in counts.items()})
            mlflow.log_dict({
                "source": "events of type review with text, before the as-of cut-off",
                "as_of_date": as_of.isoformat(),
                "labels": run_params["label_rule"],
                "split": HOLDOUT_RULE.replace("test_percent", str(params.test_percent)),
                "counts": counts,
            }, "evaluation_data.json")
            # Requirements are given, not inferred: inference reloads the model in a fresh Spark
            # process, which costs minutes and finds nothing beyond pyspark.
            info = mlflow.spark.log_model(model, artifact_path=MODEL_ARTIFACT, signature=_model_signature(),
                                          pip_requirements=mlflow.spark.get_default_pip_requirements(),
                                          code_paths=model_code_paths())
    finally:
        train.unpersist()
    return SentimentFit(model=model, run_id=run.info.run_id, model_uri=info.model_uri, metrics=metrics,
                        counts=counts)


def score_reviews(reviews: DataFrame, *, model: PipelineModel, threshold: float, run_id: str | None,
                  as_of: dt.date) -> DataFrame:
    """Reviews -> the ``review_sentiment`` rows: probability of positive, its label, whether negative."""
    require_columns(reviews, REVIEW_COLUMNS, step="score_reviews")
    scored = model.transform(reviews)
    positive = vector_to_array(F.col("probability"))[1]
    label = F.when(positive >= threshold, F.lit(1)).otherwise(F.lit(0))
    return scored.select(
        "event_id", "user_id", "item_id", "event_ts", "rating",
        positive.alias("sentiment_score"),
        label.alias("sentiment_label"),
        (label == 0).alias("is_negative"),
        F.lit(run_id).cast("string").alias("model_run_id"),
        F.lit(as_of).alias("as_of_date"),
    ).select(*REVIEW_SCORE_COLUMNS)
