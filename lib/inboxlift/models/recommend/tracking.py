"""Everything the recommenders log to MLflow, in one place: params, metrics, plots, the model.

A ``recommend-train`` run holds every setting (``settings.*``), the choice (``chosen.*``: the
recommender, its ALS and item-CF parameters, the hybrid weight, the source of ``similar_items``), the
fit's cluster settings (``fit.*``), the data description (``data.*``), the search
(``validation/als/ndcg_at_k`` by step, ``recommend/tuning.csv``, ``plots/validation_curve.png``), every
test metric under its exact name, ``plots/recommenders_vs_baselines.png``, example recommendations
and the ALS model with its signature. Names: docs/recommend.md#metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any, Mapping

from pyspark.ml.recommendation import ALSModel

from inboxlift.models.recommend.data import ITEM_IDX, USER_IDX
from inboxlift.models.recommend.evaluate import METRICS, Evaluation, metric_name
from inboxlift.models.recommend.training import ALS_KIND, TrainedRecommender
from inboxlift.models.tracking import model_code_paths
from inboxlift.settings import RecommendSettings

MODEL_ARTIFACT = "als_model"
CHOSEN = "chosen"


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
    """Grouped bars: each metric at k for every recommender and baseline on the test window."""
    import numpy as np
    from matplotlib.figure import Figure

    k = next(iter(evaluation.metrics.values())).k
    models = list(evaluation.metrics)
    figure = Figure(figsize=(10, 4), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(METRICS))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [getattr(evaluation.metrics[model], m) for m in METRICS]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=model)
    ax.set_xticks(x, [metric_name(m, k) for m in METRICS])
    ax.set(title=f"Test window: recommenders vs baselines ({evaluation.users_evaluated} users)",
           ylabel="mean over users")
    ax.legend()
    return figure


def plot_validation_curve(trained: TrainedRecommender, *, k: int):
    """Validation NDCG@k of every ALS fit of the search by rank (one colour per round), with item-CF's
    and each hybrid's score as lines; the chosen ALS point is circled."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), layout="constrained")
    ax = figure.subplots()
    rounds = sorted({p.round for p in trained.tuning})
    for number in rounds:
        points = [p for p in trained.tuning if p.round == number]
        iterations = points[0].params.max_iter
        ax.scatter([p.params.rank for p in points], [p.ndcg for p in points], s=28, alpha=0.8,
                   label=f"ALS, round {number + 1} ({iterations} iterations, {len(points)} fits)")
    chosen = [p for p in trained.tuning if p.params == trained.choice.als]
    if chosen:
        ax.scatter([chosen[-1].params.rank], [chosen[-1].ndcg], s=160, facecolors="none", edgecolors="black",
                   label=f"chosen ALS: {trained.choice.als.label}")
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3))])
    for name, value in trained.validation.items():
        if name != ALS_KIND and not math.isnan(value):
            ax.axhline(value, linestyle=next(styles, "--"), color="grey", label=f"{name}: {value:.4f}")
    ax.set_xscale("log", base=2)
    ax.set(title=f"Validation NDCG@{k}; served: {trained.choice.kind}", xlabel="ALS rank",
           ylabel=f"ndcg_at_{k}")
    ax.legend(fontsize=7, loc="lower right")
    return figure


def log_recommender(trained: TrainedRecommender, *, data: Mapping[str, Any], settings: RecommendSettings,
                    examples: Mapping[str, list[dict[str, Any]]]) -> str:
    """Log one training into the active MLflow run; returns the model's artifact path."""
    import mlflow
    import mlflow.spark

    k = settings.k
    params = {**flat_settings(settings), **trained.choice.as_params(CHOSEN), **trained.fit.as_params("fit"),
              **{f"data.{name}": str(value) for name, value in data.items()},
              **{f"data.{name}": value for name, value in trained.cutoffs.items()},
              "data.training_pairs": str(trained.training_pairs),
              "data.training_users": str(trained.training_users),
              "data.training_items": str(trained.training_items),
              "evaluation.relevance": settings.relevance,
              "evaluation.protocol": "time split; relevant = new-to-user items in the window; "
                                     "seen items excluded; users with history and a relevant item"}
    if trained.test_hybrid_weight is not None:
        params["test.hybrid_als_weight"] = str(trained.test_hybrid_weight)
    mlflow.log_params(params)
    for step, point in enumerate(trained.tuning):
        mlflow.log_metrics({f"validation/als/{metric_name('ndcg', k)}": point.ndcg,
                            "validation/als/rank": float(point.params.rank),
                            "validation/als/iterations": float(point.params.max_iter),
                            "validation/fit_and_score_seconds": point.seconds}, step=step)
    for name, value in trained.validation.items():
        if name != ALS_KIND:
            mlflow.log_metric(f"validation/{name.replace(' ', '_').replace('=', '_')}/{metric_name('ndcg', k)}", value)
    mlflow.log_text("\n".join(["step,round,rank,reg_param,alpha,weights,iterations,ndcg,seconds"] + [
        f"{i},{p.round},{p.params.rank},{p.params.reg_param},{p.params.alpha},"
        f"{'/'.join(map(str, p.params.weights))},{p.params.max_iter},{p.ndcg},{p.seconds:.2f}"
        for i, p in enumerate(trained.tuning)]) + "\n", "recommend/tuning.csv")
    mlflow.log_metrics({**trained.test.named(), "fit_seconds": trained.fit_seconds})
    mlflow.set_tags({"chosen_recommender": trained.choice.kind, "chosen_params": trained.choice.label})
    mlflow.log_text("\n".join(trained.test.table()) + "\n", "recommend/test_metrics.txt")
    mlflow.log_figure(plot_against_baselines(trained.test), "plots/recommenders_vs_baselines.png")
    if trained.tuning:
        mlflow.log_figure(plot_validation_curve(trained, k=k), "plots/validation_curve.png")
    mlflow.log_dict(dict(examples), "recommend/example_recommendations.json")
    mlflow.spark.log_model(trained.model, artifact_path=MODEL_ARTIFACT, signature=model_signature(),
                           pip_requirements=mlflow.spark.get_default_pip_requirements(),
                           code_paths=model_code_paths())
    return MODEL_ARTIFACT


def log_scoring(report_metrics: Mapping[str, float]) -> None:
    """The scoring run's figures (rows and first-row shares per source) into the active run."""
    import mlflow

    mlflow.log_metrics(dict(report_metrics))


def load_als(model_uri: str) -> ALSModel:
    """The ALS model logged at ``model_uri`` (MLflow stores it wrapped in a one-stage pipeline)."""
    import mlflow.spark

    loaded = mlflow.spark.load_model(model_uri)
    stages = getattr(loaded, "stages", [loaded])
    model = stages[0]
    if not isinstance(model, ALSModel):
        raise TypeError(f"{model_uri} holds a {type(model).__name__}, not an ALSModel")
    return model

