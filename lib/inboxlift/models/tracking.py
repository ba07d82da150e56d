"""MLflow set-up shared by every model: tracking and registry URIs, the experiment, runs.

Locally (the embedded mode) tracking is a SQLite file and artifacts a folder; both are created on
first use. On Databricks the URIs are ``databricks`` and the workspace manages artifacts. Runs carry
user ids at most — never e-mail addresses or names.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException

from inboxlift.settings import MlflowSettings

_LOCAL_SCHEMES = {"", "file", "sqlite"}


def is_local_uri(uri: str) -> bool:
    """Whether a tracking URI is a file or SQLite store on this machine."""
    return urlparse(uri).scheme in _LOCAL_SCHEMES or (len(uri) > 1 and uri[1] == ":")  # C:\ paths


def _sqlite_path(uri: str) -> Path | None:
    # sqlite:///relative/x.db and sqlite:////absolute/x.db: the path is what follows "sqlite:///".
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def _absolute_tracking_uri(uri: str) -> str:
    """A local URI with its path made absolute, so a later change of folder does not move the store."""
    sqlite_path = _sqlite_path(uri)
    if sqlite_path is not None:
        return f"sqlite:///{sqlite_path.absolute()}"
    parsed = urlparse(uri)
    if parsed.scheme in {"", "file"}:
        return Path(parsed.path if parsed.scheme else uri).absolute().as_uri()
    return uri


def model_code_paths() -> list[str]:
    """What every logged model carries as ``code_paths``: the ``inboxlift`` package folder.

    MLflow puts it on ``sys.path`` when the model is loaded, so a model loads (and anything of the
    project it uses is importable) in a process where the wheel is not installed: a serving
    endpoint, another workspace, a plain ``mlflow.pyfunc.load_model``.
    """
    import inboxlift

    return [str(Path(inboxlift.__file__).resolve().parent)]


def configure_mlflow(settings: MlflowSettings) -> str:
    """Point MLflow at ``settings`` and return the id of the experiment (created when missing).

    For a local store, the SQLite file's folder and the artifact folder are created, and a new
    experiment stores its artifacts under ``settings.artifact_location``.
    """
    local = is_local_uri(settings.tracking_uri)
    tracking_uri = _absolute_tracking_uri(settings.tracking_uri) if local else settings.tracking_uri
    if local:
        sqlite_path = _sqlite_path(tracking_uri)
        folder = sqlite_path.parent if sqlite_path is not None else Path(urlparse(tracking_uri).path)
        folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    if settings.registry_uri:
        mlflow.set_registry_uri(settings.registry_uri)

    experiment = mlflow.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifact_location = None
        if local and settings.artifact_location:
            artifacts = Path(settings.artifact_location).absolute()
            artifacts.mkdir(parents=True, exist_ok=True)
            artifact_location = artifacts.as_uri()
        try:
            experiment_id = mlflow.create_experiment(settings.experiment, artifact_location=artifact_location)
        except MlflowException:
            # Another process created it between our look-up and our create.
            existing = mlflow.get_experiment_by_name(settings.experiment)
            if existing is None:
                raise
            experiment_id = existing.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def tracked_run(settings: MlflowSettings, *, run_name: str, tags: Mapping[str, str] | None = None,
                params: Mapping[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Configure MLflow and open one run in the settings' experiment, logging ``params`` up front.

    A run failing inside the block is ended as FAILED (MLflow's context manager does that).
    """
    experiment_id = configure_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})) as run:
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        yield run


def tracking_client(settings: MlflowSettings) -> mlflow.MlflowClient:
    """An ``MlflowClient`` on the store and registry of ``settings`` (configured first)."""
    configure_mlflow(settings)
    return mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri())
