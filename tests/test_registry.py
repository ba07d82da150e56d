"""Champion / challenger on a real (SQLite) MLflow registry, with scores chosen by hand."""

from __future__ import annotations

import math
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from inboxlift.models import registry
from inboxlift.models.tracking import configure_mlflow


@pytest.fixture(scope="module")
def client(base_settings) -> MlflowClient:
    # The session's store: creating a SQLite store's tables takes long, so tests share one.
    configure_mlflow(base_settings.mlflow)
    return MlflowClient(tracking_uri=mlflow.get_tracking_uri())


@pytest.fixture
def name() -> str:
    return f"test-registry-{uuid.uuid4().hex[:8]}"


def new_version(client: MlflowClient, name: str) -> str:
    """A run with a tiny artifact, registered as a new version of ``name``."""
    with mlflow.start_run() as run:
        mlflow.log_text("not a real model", "model/README.txt")
    version = registry.register_model_version(client, name=name, run_id=run.info.run_id, artifact_path="model",
                                              tags={"kind": "test"})
    return str(version.version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_first_version_becomes_champion(client, name):
    assert registry.champion(client, name) is None
    v1 = new_version(client, name)
    decision = registry.promote(client, name, v1, score=0.5, metric="silhouette")
    assert decision.is_champion and decision.previous_champion is None and decision.champion_score is None
    assert aliases(client, name) == {"champion": v1}
    tags = client.get_model_version(name, v1).tags
    assert tags["score.silhouette"] == "0.5" and tags["promotion"] == "champion" and tags["kind"] == "test"
    source = client.get_model_version(name, v1).source
    assert source.endswith("/model")


def test_better_version_takes_champion_and_worse_one_is_challenger(client, name):
    v1, v2, v3 = (new_version(client, name) for _ in range(3))
    registry.promote(client, name, v1, score=0.50, metric="silhouette")
    seen = []

    def rescore(champion):
        # What the champion scores on today's data (different from the 0.50 stored).
        seen.append(str(champion.version))
        return {v1: 0.40, v2: 0.60}[str(champion.version)]

    up = registry.promote(client, name, v2, score=0.45, metric="silhouette", champion_score_fn=rescore)
    assert up.is_champion and up.previous_champion == v1 and up.champion_score == 0.40
    assert "beats" in up.reason and "same data" in up.reason
    down = registry.promote(client, name, v3, score=0.55, metric="silhouette", champion_score_fn=rescore)
    assert down.alias == "challenger" and down.champion_score == 0.60
    assert seen == [v1, v2]
    assert aliases(client, name) == {"champion": v2, "challenger": v3}
    assert client.get_model_version(name, v3).tags["champion_score.silhouette"] == "0.6"


def test_lower_is_better_and_ties_keep_the_champion(client, name):
    v1, v2, v3 = (new_version(client, name) for _ in range(3))
    registry.promote(client, name, v1, score=10.0, metric="rmse", higher_is_better=False)
    tie = registry.promote(client, name, v2, score=10.0, metric="rmse", higher_is_better=False)
    assert tie.alias == "challenger"
    # Without a rescoring function the champion's stored score is used, and the reason says so.
    assert "stored when it was promoted" in tie.reason
    lower = registry.promote(client, name, v3, score=9.0, metric="rmse", higher_is_better=False)
    assert lower.is_champion and aliases(client, name) == {"champion": v3, "challenger": v2}


def test_nan_never_wins_and_an_unscorable_champion_is_replaced(client, name):
    v1, v2, v3 = (new_version(client, name) for _ in range(3))
    registry.promote(client, name, v1, score=0.3, metric="m")
    nan = registry.promote(client, name, v2, score=math.nan, metric="m", champion_score_fn=lambda c: 0.1)
    assert nan.alias == "challenger"
    gone = registry.promote(client, name, v3, score=0.2, metric="m", champion_score_fn=lambda c: None)
    assert gone.is_champion and "cannot be evaluated" in gone.reason


def test_a_challenger_promoted_later_loses_the_challenger_alias(client, name):
    v1, v2 = new_version(client, name), new_version(client, name)
    registry.promote(client, name, v1, score=0.5, metric="m")
    registry.promote(client, name, v2, score=0.4, metric="m", champion_score_fn=lambda c: 0.5)
    assert aliases(client, name) == {"champion": v1, "challenger": v2}
    # The data changed: the champion now scores worse than the challenger did.
    again = registry.promote(client, name, v2, score=0.4, metric="m", champion_score_fn=lambda c: 0.3)
    assert again.is_champion and aliases(client, name) == {"champion": v2}


def test_float_noise_is_not_an_improvement(client, name):
    v1, v2 = new_version(client, name), new_version(client, name)
    registry.promote(client, name, v1, score=0.5, metric="m")
    noise = registry.promote(client, name, v2, score=0.5 + 1e-12, metric="m", champion_score_fn=lambda c: 0.5)
    assert noise.alias == "challenger"
