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
from run_all_shop import RunAll, RunAllInBackground

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
            # them interpreted (docs/testing.md, measured). The run-all on Connect keeps
            # Spark's defaults, so the product's own settings still run every stage.
            # pyspark's DataFrame query context is off as well: on a classic session it records the
            # Python call site of every Column made, with several JVM round trips each, which made
            # three of the suite's files 13 % slower (docs/testing.md, "No Python call-site capture").
            "spark.extra_conf": {"spark.sql.adaptive.enabled": "false",
                                 "spark.sql.codegen.wholeStage": "false",
                                 "spark.sql.codegen.factoryMode": "NO_CODEGEN",
                                 "spark.sql.sources.parallelPartitionDiscovery.threshold": "1000",
                                 "spark.python.sql.dataFrameDebugging.enabled": "false"},
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


# Modules whose tests read the run-all's result, or start a local Spark Connect server of their own: they
# run last. A local Connect server listens on pyspark's fixed port (15002), so the servers of test_connect_gc
# and test_connect_sentiment must not start while the run-all's is up; they wait for the run
# (``after_run_all``), which by then is over.
LAST_MODULES = ("test_connect.py", "test_pipeline.py", "test_connect_gc.py", "test_connect_sentiment.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    """``LAST_MODULES`` last (whole modules, in that order), the rest as collected."""
    def rank(item) -> int:
        name = item.path.name
        return LAST_MODULES.index(name) + 1 if name in LAST_MODULES else 0

    items[:] = sorted(items, key=rank)  # sorted() is stable: the order within each group stays


@pytest.fixture(scope="session", autouse=True)
def _run_all_started(request, tmp_path_factory):
    """Starts the suite's one ``inboxlift run-all`` before the first test when a selected test reads it.

    It runs in a subprocess (run_all_shop.py) beside the classic session's tests and is awaited by
    ``run_all``; a run still going when the session ends (``-x``, Ctrl-C) is killed.
    """
    wanted = any("run_all" in item.fixturenames for item in request.session.items)
    run = RunAllInBackground(tmp_path_factory.mktemp("run_all")) if wanted else None
    yield run
    if run is not None:
        run.stop()


@pytest.fixture(scope="session")
def run_all(_run_all_started) -> RunAll:
    """The suite's one ``inboxlift run-all`` (on Spark Connect, in a subprocess; see run_all_shop.py)."""
    return _run_all_started.result()


@pytest.fixture
def after_run_all(_run_all_started) -> None:
    """For a test that starts its own local Connect server: the run-all's server must be gone first."""
    if _run_all_started is not None:
        _run_all_started.result()
