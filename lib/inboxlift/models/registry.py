"""The MLflow model registry, for any model: register a logged model, then champion or challenger.

The rule (:func:`promote`): a new version takes the alias ``champion`` only if it beats the
current champion on the given metric, both evaluated on the same data; otherwise it takes the
alias ``challenger``. Scoring jobs load ``models:/<name>@champion``, so a worse model is never
used just because it is newer. Every decision is written on the new version as tags
(``score.<metric>``, ``champion_score.<metric>``, ``promotion``, ``promotion_reason``), so the
registry shows why a version is or is not the champion.

Works with any registry MLflow supports (a local SQLite store, Databricks, Unity Catalog): only
public ``MlflowClient`` calls are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
CHALLENGER = "challenger"
SCORE_TAG = "score.{metric}"
CHAMPION_SCORE_TAG = "champion_score.{metric}"


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` decided for one new version."""

    name: str
    version: str
    alias: str
    metric: str
    score: float
    previous_champion: str | None
    champion_score: float | None
    reason: str

    @property
    def is_champion(self) -> bool:
        return self.alias == CHAMPION


def register_model_version(client: MlflowClient, *, name: str, run_id: str, artifact_path: str,
                           tags: Mapping[str, str] | None = None, description: str | None = None) -> ModelVersion:
    """Register the model logged at ``artifact_path`` of run ``run_id`` as a new version of ``name``.

    The registered model is created on first use. The version's source is the run's artifact
    location, so the version stays loadable however the run's artifacts are served.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    artifact_uri = client.get_run(run_id).info.artifact_uri.rstrip("/")
    return client.create_model_version(
        name=name, source=f"{artifact_uri}/{artifact_path}", run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()}, description=description,
    )


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version of ``name`` holding ``alias``, or None (no such model, or the alias is unset)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The current champion version of ``name``, or None."""
    return version_by_alias(client, name, CHAMPION)


def _beats(new: float, old: float, *, higher_is_better: bool, min_improvement: float) -> bool:
    # A NaN score never wins, and a tie keeps the sitting champion (no churn for no gain).
    if math.isnan(new):
        return False
    if math.isnan(old):
        return True
    return new > old + min_improvement if higher_is_better else new < old - min_improvement


def promote(client: MlflowClient, name: str, version: str, *, score: float, metric: str,
            higher_is_better: bool = True, min_improvement: float = 1e-9,
            champion_score_fn: Callable[[ModelVersion], float | None] | None = None) -> Promotion:
    """Give version ``version`` of ``name`` the alias ``champion`` or ``challenger``.

    Args:
        score: the new version's value of ``metric``, on the evaluation data.
        metric: the metric's exact name (stored in the tags).
        higher_is_better: the metric's direction.
        min_improvement: the new score must be better by more than this (absolute); the default
            keeps floating-point noise between two equal models from counting as a win.
        champion_score_fn: the current champion's value of ``metric`` on the same evaluation
            data as ``score``; it returns None when the champion cannot be evaluated on that
            data (e.g. it needs columns the data no longer has), and then the new version takes
            over. Without it, the score stored on the champion when it was promoted is used,
            which is measured on the data of its own time: the reason says so.

    Returns:
        The decision, with the scores compared and the reason in words.
    """
    current = champion(client, name)
    previous = current.version if current is not None else None
    champion_score: float | None = None
    if current is None:
        alias, reason = CHAMPION, f"no champion yet: version {version} becomes champion"
    elif str(current.version) == str(version):
        champion_score = score
        alias, reason = CHAMPION, f"version {version} is already the champion"
    else:
        if champion_score_fn is not None:
            champion_score = champion_score_fn(current)
            basis = "on the same data"
        else:
            stored = current.tags.get(SCORE_TAG.format(metric=metric))
            champion_score = float(stored) if stored is not None else None
            basis = "as stored when it was promoted (other data)"
        direction = "higher" if higher_is_better else "lower"
        if champion_score is None:
            alias = CHAMPION
            reason = (f"champion version {current.version} cannot be evaluated for {metric} {basis}: "
                      f"version {version} ({metric}={score:.4f}) becomes champion")
        elif _beats(score, champion_score, higher_is_better=higher_is_better,
                                                        min_improvement=min_improvement):
            alias = CHAMPION
            reason = (f"version {version} beats champion version {current.version} on {metric} ({direction} is "
                      f"better): {score:.4f} vs {champion_score:.4f} {basis}")
        else:
            alias = CHALLENGER
            reason = (f"version {version} does not beat champion version {current.version} on {metric} "
                      f"({direction} is better): {score:.4f} vs {champion_score:.4f} {basis}; it is the challenger")

    client.set_model_version_tag(name, version, SCORE_TAG.format(metric=metric), repr(float(score)))
    if champion_score is not None:
        client.set_model_version_tag(name, version, CHAMPION_SCORE_TAG.format(metric=metric),
                                     repr(float(champion_score)))
    client.set_model_version_tag(name, version, "promotion", alias)
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    # Setting an alias moves it: the previous holder loses it in the same call.
    client.set_registered_model_alias(name, alias, version)
    if alias == CHAMPION:
        challenger = version_by_alias(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
    return Promotion(name=name, version=str(version), alias=alias, metric=metric, score=float(score),
                     previous_champion=str(previous) if previous is not None else None,
                     champion_score=champion_score, reason=reason)


def log_promotion(promotion: Promotion, *, champion_metric: str) -> None:
    """Write a promotion decision to the active MLflow run: the new version's score under the
    promotion's metric and, when there was a champion to compare with, the champion's score under
    ``champion_metric``; tags ``registered_model``, ``registered_version``, ``promotion`` and
    ``promotion_reason``. A NaN score (nothing to evaluate) is not logged as a metric."""
    import mlflow

    metrics = {promotion.metric: promotion.score}
    if promotion.champion_score is not None and promotion.previous_champion is not None:
        metrics[champion_metric] = promotion.champion_score
    mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
    mlflow.set_tags({"registered_model": promotion.name, "registered_version": promotion.version,
                     "promotion": promotion.alias, "promotion_reason": promotion.reason})
