"""One local SparkSession for the whole run (one shuffle partition, UI off), fresh lakes per test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from inboxlift.clock import FixedClock
from inboxlift.context import RunContext
from inboxlift.session import build_session
from inboxlift.settings import Settings, load_settings
from inboxlift.storage import Lake, choose_backend
from run_all_shop import RunAll, run_all_on_connect

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["deltars", "native"]


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    work = tmp_path_factory.mktemp("inboxlift")
    return load_settings(
        "local",
        conf_dir=ROOT / "conf",
        overrides={
            "spark.master": "local[2]",
            "spark.shuffle_partitions": 1,
            "spark.driver_memory": "3g",
            "spark.ui_enabled": False,
            "spark.checkpoint_dir": str(work / "checkpoints"),
            # The suite's jobs run on a few rows each: compiling Java for them costs more than running
            # them interpreted (README, "What `make run` does", measured). The run-all on Connect keeps
            # Spark's defaults, so the product's own settings still run every stage.
            "spark.extra_conf": {"spark.sql.adaptive.enabled": "false",
                                 "spark.sql.codegen.wholeStage": "false",
                                 "spark.sql.codegen.factoryMode": "NO_CODEGEN",
                                 "spark.sql.sources.parallelPartitionDiscovery.threshold": "1000"},
            "storage.lake_dir": str(work / "lake"),
            "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "mlflow.artifact_location": str(work / "mlartifacts"),
            "paths.landing_dir": str(work / "landing"),
            "paths.output_dir": str(work / "output"),
            "generate.truth_dir": str(work / "truth"),
            "delivery.journal_dir": str(work / "delivery"),
        },
    )


@pytest.fixture(scope="session")
def spark_info(base_settings: Settings):
    info = build_session(base_settings.spark, environ={"CI": "true"}, app_name="inboxlift-tests")
    yield info
    info.spark.stop()


@pytest.fixture(scope="session")
def spark(spark_info):
    return spark_info.spark


def settings_in(base: Settings, tmp_path: Path, backend: str = "auto") -> Settings:
    """Settings whose lake, landing, output and delivery journal folders are under ``tmp_path``."""
    return dataclasses.replace(
        base,
        storage=dataclasses.replace(base.storage, lake_dir=str(tmp_path / "lake"), backend=backend),
        paths=dataclasses.replace(base.paths, landing_dir=str(tmp_path / "landing"),
                                  output_dir=str(tmp_path / "output")),
        generate=dataclasses.replace(base.generate, truth_dir=str(tmp_path / "truth")),
        delivery=dataclasses.replace(base.delivery, journal_dir=str(tmp_path / "delivery")),
    )


@pytest.fixture(params=BACKENDS)
def lake(request, spark, spark_info, base_settings, tmp_path) -> Lake:
    """A fresh, empty lake on each backend; native Delta only where its jars are present."""
    if request.param == "native" and not spark_info.has_delta_jars:
        pytest.skip("native Delta backend: Delta Lake's Spark jars are not on this machine's classpath")
    settings = settings_in(base_settings, tmp_path, backend=request.param)
    return Lake(spark, settings.storage,
                backend=choose_backend(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars))


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock.at("2026-11-20T12:00:00")


@pytest.fixture
def ctx(spark, spark_info, base_settings, tmp_path, clock) -> RunContext:
    """A run context on the default backend with its own lake under tmp_path."""
    settings = settings_in(base_settings, tmp_path)
    lake = Lake.open(spark, settings.storage, has_delta_jars=spark_info.has_delta_jars)
    return RunContext(spark=spark, settings=settings, lake=lake, clock=clock)


@pytest.fixture(scope="session")
def run_all(tmp_path_factory) -> RunAll:
    """The suite's one ``inboxlift run-all`` (on Spark Connect, in a subprocess; see run_all_shop.py)."""
    return run_all_on_connect(tmp_path_factory.mktemp("run_all"))
