"""MLflow for segments: what a ``segment-train`` run logs, what a notebook loads back, and the two plots.

The run's contents are listed in ``docs/segments.md`` ("MLflow and the registry").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from inboxlift.models.segments.estimator import SegmentModel
from inboxlift.models.segments.features import PREDICTION, SEGMENT_ID, SEGMENT_NAME
from inboxlift.models.segments.search import COST, SEARCH_COST, SILHOUETTE, STABILITY_MEAN, STABILITY_MIN
from inboxlift.models.tracking import model_code_paths
from inboxlift.settings import SegmentSettings

MODEL_ARTIFACT = "segment_pipeline"
PROFILES_ARTIFACT = "segments/profiles.json"
POPULATION_ARTIFACT = "segments/population.json"
K_SEARCH_ARTIFACT = "segments/k_search.csv"
SELECTION_RULE = "max silhouette_sqeuclidean_sample; ties: smaller k, then algorithm order"


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

    Logs the params, the search's silhouette and cost per k (metric steps are k), the choice and
    why, stability, the chosen model's cost on all users, the pipeline (with signature), the profile
    and k-search tables and the plots.
    ``data`` describes the training data (table, version, rows) and is logged as params.
    """
    import mlflow
    import mlflow.spark

    mlflow.log_params({**_flat_params(model.params), **{f"data.{k}": str(v) for k, v in data.items()},
                       "data.training_rows": str(model.training_rows),
                       "data.search_rows": str(model.search_rows),
                       "data.silhouette_rows": str(model.silhouette_rows),
                       "chosen_algorithm": model.choice.algorithm, "chosen_k": str(model.choice.k),
                       "selection_rule": SELECTION_RULE})
    for c in model.candidates:
        metrics = {f"{c.algorithm}/{SEARCH_COST}": c.cost, f"{c.algorithm}/clusters_found": float(c.clusters),
                   f"{c.algorithm}/fit_seconds": c.seconds}
        if not math.isnan(c.silhouette):
            metrics[f"{c.algorithm}/{SILHOUETTE}"] = c.silhouette
        mlflow.log_metrics(metrics, step=c.k)
    chosen = {"chosen_k": float(model.choice.k), SILHOUETTE: model.choice.silhouette, SEARCH_COST: model.choice.cost,
              COST: model.training_cost, "refit_seconds": model.refit_seconds,
              "segments": float(len(model.profiles)), STABILITY_MEAN: model.stability.mean,
              STABILITY_MIN: model.stability.minimum}
    chosen.update({f"elbow_k/{a}": float(k) for a, k in model.choice.elbows.items() if k is not None})
    if model.refit is not None:
        # Each refit tried on all users (step: its order) against the sample's fit's cost there.
        chosen.update({"refit_fits": float(len(model.refit.tried)), "refit_sample_fit_cost": model.refit.sample_fit_cost})
        for step, (seed, cost) in enumerate(model.refit.tried):
            mlflow.log_metrics({"refit_cost": cost, "refit_seed": float(seed)}, step=step)
    mlflow.log_metrics({k: v for k, v in chosen.items() if not math.isnan(v)})
    stable = model.stability.mean >= model.params.min_stability_ari
    refit_kept = ("" if model.refit is None else "sample fit" if model.refit.kept_seed is None
                  else f"seed {model.refit.kept_seed}")
    mlflow.set_tags({"selection_reason": model.choice.reason, "stability_ok": str(stable).lower(),
                     "refit_kept": refit_kept,
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
                           pip_requirements=mlflow.spark.get_default_pip_requirements(),
                           code_paths=model_code_paths())
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



# ---- plots -----------------------------------------------------------------------------------------

def plot_k_search(k_search: pd.DataFrame, *, chosen: tuple[str, int] | None = None):
    """Silhouette and cost by k, one line per algorithm, the chosen (algorithm, k) circled."""
    from matplotlib.figure import Figure

    # Versions trained before the search ran on a sample logged the cost of all users under COST.
    cost = SEARCH_COST if SEARCH_COST in k_search.columns else COST
    figure = Figure(figsize=(10, 4), layout="constrained")
    silhouette_ax, cost_ax = figure.subplots(1, 2)
    for algorithm, rows in k_search.groupby("algorithm", sort=False):
        rows = rows.sort_values("k")
        silhouette_ax.plot(rows["k"], rows[SILHOUETTE], marker="o", label=algorithm)
        cost_ax.plot(rows["k"], rows[cost], marker="o", label=algorithm)
        if chosen and chosen[0] == algorithm:
            at = rows[rows["k"] == chosen[1]]
            for ax, column in ((silhouette_ax, SILHOUETTE), (cost_ax, cost)):
                ax.scatter(at["k"], at[column], s=180, facecolors="none", edgecolors="red", linewidths=2,
                           label=f"chosen: {algorithm} k={chosen[1]}" if ax is silhouette_ax else None, zorder=3)
    silhouette_ax.set(title="Silhouette (squared Euclidean, sample)", xlabel="k", ylabel="silhouette")
    cost_ax.set(title="Cost: within-cluster sum of squares (scaled, search sample)", xlabel="k", ylabel="sum of squares")
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
