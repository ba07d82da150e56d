"""The segment stages: ``segment-train`` (search, log, register, promote) and ``segment`` (score every user).

``run_segment_train`` fits :class:`~inboxlift.models.segments.SegmentSearch` on ``user_features``
inside one MLflow run, registers the pipeline under ``segments.registered_model`` and gives it the
alias ``champion`` only if its silhouette beats the current champion's, both measured on the same
sample of today's users in the new model's feature space (otherwise ``challenger``).

``run_segment`` loads the ``champion`` version and assigns every user of ``user_features`` (users
created since training included) without retraining; it replaces ``user_segments``:

``user_id, segment_id, segment_name, distance, model_version, run_id, scored_at``

where ``distance`` is to the segment's centre in the model's scaled feature space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
import mlflow.spark
from mlflow import MlflowClient
from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.context import RunContext
from inboxlift.models import registry
from inboxlift.models.segments import (
    MODEL_ARTIFACT,
    SILHOUETTE,
    STABILITY_MEAN,
    ChampionArtifacts,
    Refit,
    SegmentModel,
    SegmentSearch,
    assign_segments,
    load_model_artifacts,
    log_segment_model,
    pipeline_silhouette,
    plot_k_search,
    plot_profiles,
    silhouette_sample,
)
from inboxlift.models.tracking import tracked_run, tracking_client

FEATURES_TABLE = "user_features"
SEGMENTS_TABLE = "user_segments"
SEGMENT_COLUMNS = ["user_id", "segment_id", "segment_name", "distance", "model_version", "run_id", "scored_at"]
PROMOTION_METRIC = f"promotion/{SILHOUETTE}_same_data"


class NoChampionError(RuntimeError):
    """Scoring found no ``champion`` version of the segment model: run segment-train first."""


def _refit_outcome(refit: Refit) -> str:
    tried = ", ".join(f"seed {seed}: cost {cost:,.1f}" for seed, cost in refit.tried)
    kept = ("kept the sample's fit, no refit matched its cost" if refit.kept_seed is None
            else f"kept seed {refit.kept_seed}")
    return f"{kept}; the sample's fit costs {refit.sample_fit_cost:,.1f} on all users; tried {tried}"


@dataclass(frozen=True)
class SegmentTrainReport:
    run_id: str
    model_name: str
    version: str
    promotion: registry.Promotion
    model: SegmentModel

    def summary(self) -> str:
        m = self.model
        lines = [
            f"segment-train: run {self.run_id}, {self.model_name} version {self.version} -> {self.promotion.alias}",
            f"  {self.promotion.reason}",
            f"  {m.choice.reason}",
            f"  k searched on {m.search_rows} of {m.training_rows} users"
            + (f"; {m.choice.algorithm} k={m.choice.k} refitted on all users in {m.refit_seconds:.1f} s"
               f" ({_refit_outcome(m.refit)})" if m.refit is not None else ""),
            f"  stability over seeds {list(m.stability.seeds)}: adjusted Rand index mean {m.stability.mean:.3f}, "
            f"min {m.stability.minimum:.3f}"
            + ("" if m.stability.mean >= m.params.min_stability_ari
               else f" (below {m.params.min_stability_ari}: the segments depend on the seed)"),
            f"  {'algorithm':<18}{'k':>3}{'found':>7}{'silhouette':>12}{'sample cost':>14}",
        ]
        for c in m.candidates:
            mark = " <-" if (c.algorithm, c.k) == (m.choice.algorithm, m.choice.k) else ""
            lines.append(f"  {c.algorithm:<18}{c.k:>3}{c.clusters:>7}{c.silhouette:>12.4f}{c.cost:>14.1f}{mark}")
        lines.append(f"  {'id':>3}  {'segment':<24}{'users':>9}{'share':>8}  top categories")
        for row in m.profiles.to_dict("records"):
            categories = ", ".join(row.get("top_categories") or [])
            lines.append(f"  {row['segment_id']:>3}  {row['segment_name']:<24}{row['size']:>9}{row['share']:>8.1%}  "
                         f"{categories}")
        if m.missing_roles:
            lines.append(f"  roles without a column in user_features (their naming rules are skipped): "
                         f"{', '.join(m.missing_roles)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SegmentScoreReport:
    model_name: str
    version: str
    run_id: str
    users: int
    per_segment: tuple[tuple[int, str, int], ...]

    def summary(self) -> str:
        lines = [f"segment: {self.users} users assigned by {self.model_name} version {self.version} "
                 f"(champion, run {self.run_id}) into {SEGMENTS_TABLE}"]
        for segment_id, name, users in self.per_segment:
            lines.append(f"  {segment_id:>3}  {name:<24}{users:>9}")
        return "\n".join(lines)


def _client(ctx: RunContext) -> MlflowClient:
    return tracking_client(ctx.settings.mlflow)


def run_segment_train(ctx: RunContext) -> SegmentTrainReport:
    """Search, log and register a segmentation of ``user_features``; promote it if it beats the champion."""
    params = ctx.settings.segments
    features = ctx.lake.read(FEATURES_TABLE)
    data = {"table": FEATURES_TABLE, "table_version": ctx.lake.version(FEATURES_TABLE),
            "as_of": ctx.clock.now().isoformat()}
    run_name = f"segment-train {ctx.clock.now():%Y-%m-%dT%H:%MZ}"
    with tracked_run(ctx.settings.mlflow, run_name=run_name, tags={"inboxlift.stage": "segment-train"}) as run:
        model = SegmentSearch(params).fit(features)
        log_segment_model(model, features=features, data=data)
        client = MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())
        version = registry.register_model_version(
            client, name=params.registered_model, run_id=run.info.run_id, artifact_path=MODEL_ARTIFACT,
            tags={"algorithm": model.choice.algorithm, "k": str(model.choice.k),
                  STABILITY_MEAN: f"{model.stability.mean:.4f}"},
            description=model.choice.reason)

        # Champion and challenger are measured on the same users, in the challenger's feature space.
        sample = silhouette_sample(features, rows=params.silhouette_sample_rows, seed=params.seed).persist()
        try:
            score = pipeline_silhouette(sample, labels_from=model.pipeline, space=model.pipeline)
            promotion = registry.promote(
                client, params.registered_model, str(version.version),
                score=float("nan") if score is None else score, metric=PROMOTION_METRIC, higher_is_better=True,
                champion_score_fn=champion_scorer(params.registered_model, sample=sample, space=model.pipeline))
        finally:
            sample.unpersist()
        registry.log_promotion(promotion, champion_metric=f"promotion/champion_{SILHOUETTE}_same_data")
    return SegmentTrainReport(run_id=run.info.run_id, model_name=params.registered_model, version=str(version.version),
                              promotion=promotion, model=model)


def _load_pipeline(name: str, version: str) -> PipelineModel:
    return mlflow.spark.load_model(f"models:/{name}/{version}")


def champion_scorer(name: str, *, sample: DataFrame, space: PipelineModel) -> Callable[[Any], float | None]:
    """The silhouette of a registered version's segments on ``sample`` in ``space``; None when it cannot score.

    A version whose pipeline no longer loads cannot score: one saved with a clusterer class this
    release no longer has (inboxlift's collective K-means, before Spark ML became the one solver).
    """
    def score(version: Any) -> float | None:
        try:
            pipeline = _load_pipeline(name, version.version)
        except ImportError:
            return None
        return pipeline_silhouette(sample, labels_from=pipeline, space=space)

    return score


def run_segment(ctx: RunContext) -> SegmentScoreReport:
    """Assign every user of ``user_features`` with the champion segmentation; replace ``user_segments``."""
    name = ctx.settings.segments.registered_model
    client = _client(ctx)
    champion = registry.champion(client, name)
    if champion is None:
        raise NoChampionError(f"no version of model {name!r} has the alias 'champion': run segment-train first")
    # The version resolved once, so the rows say exactly which model assigned them.
    pipeline = _load_pipeline(name, champion.version)
    assigned = assign_segments(ctx.lake.read(FEATURES_TABLE), pipeline=pipeline).select(
        "user_id", "segment_id", "segment_name", "distance",
        F.lit(str(champion.version)).alias("model_version"),
        F.lit(champion.run_id).alias("run_id"),
        F.lit(ctx.clock.now()).cast("timestamp").alias("scored_at"),
    )
    ctx.lake.overwrite(SEGMENTS_TABLE, assigned.select(*SEGMENT_COLUMNS))
    per_segment = tuple(segment_counts(ctx))
    return SegmentScoreReport(model_name=name, version=str(champion.version), run_id=champion.run_id,
                              users=sum(n for _, _, n in per_segment), per_segment=per_segment)


def segment_counts(ctx: RunContext) -> list[tuple[int, str, int]]:
    """Users per segment in ``user_segments`` (one row per segment), or [] when the table does not exist."""
    if not ctx.lake.exists(SEGMENTS_TABLE):
        return []
    rows = (ctx.lake.read(SEGMENTS_TABLE).groupBy("segment_id", "segment_name").count()
            .orderBy("segment_id").collect())
    return [(int(r["segment_id"]), r["segment_name"], int(r["count"])) for r in rows]


def champion_artifacts(ctx: RunContext) -> ChampionArtifacts:
    """The champion's profile table, all-users means, k search and selection reason (small tables, no Spark)."""
    name = ctx.settings.segments.registered_model
    client = _client(ctx)
    champion = registry.champion(client, name)
    if champion is None:
        raise NoChampionError(f"no version of model {name!r} has the alias 'champion': run segment-train first")
    return load_model_artifacts(client, name=name, version=champion.version)


def champion_plots(artifacts: ChampionArtifacts) -> dict[str, Any]:
    """The champion's figures by file stem: silhouette and cost by k, and the segment profiles."""
    return {
        "k_search": plot_k_search(artifacts.k_search, chosen=(artifacts.algorithm, artifacts.k)),
        "segment_profiles": plot_profiles(artifacts.profiles, population=artifacts.population),
    }


def save_plots(figures: Mapping[str, Any], *, directory: str | Path) -> list[Path]:
    """Write each figure as ``<directory>/<stem>.png``; returns the paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, figure in figures.items():
        path = folder / f"{stem}.png"
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths
