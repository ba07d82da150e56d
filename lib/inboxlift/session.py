"""The only place a SparkSession is built.

On Databricks or any running cluster the active session is reused as it is:
nothing is set that could break a shared or serverless cluster. Locally a
session is sized for the machine, with Delta Lake's extensions switched on
when its jars can be found on disk (they cannot be downloaded everywhere).
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pyspark.sql import SparkSession

from inboxlift.settings import SparkSettings

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


@dataclass(frozen=True)
class SessionInfo:
    spark: SparkSession
    is_local: bool
    is_databricks: bool
    has_delta_jars: bool

    def describe(self) -> str:
        where = "Databricks" if self.is_databricks else ("local" if self.is_local else "cluster")
        delta = "native Delta jars on the classpath" if self.has_delta_jars else "no Delta jars (delta-rs backend)"
        return f"Spark {self.spark.version} ({where}, master {self.spark.sparkContext.master}); {delta}"


def is_databricks(environ: Mapping[str, str]) -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in environ


def find_delta_jars(search_dirs: list[str] | None = None) -> list[str]:
    """Delta Lake jars already on disk (pyspark's jars folder, SPARK_HOME, Ivy caches)."""
    import pyspark

    dirs = search_dirs if search_dirs is not None else [
        str(Path(pyspark.__file__).parent / "jars"),
        str(Path.home() / ".ivy2" / "jars"),
        str(Path.home() / ".ivy2.5.2" / "jars"),
    ]
    jars: list[str] = []
    for d in dirs:
        jars += glob.glob(os.path.join(d, "delta-spark_*.jar")) + glob.glob(os.path.join(d, "delta-storage-*.jar"))
    has_spark_jar = any(os.path.basename(j).startswith("delta-spark_") for j in jars)
    return sorted(jars) if has_spark_jar else []


def delta_classes_loaded(spark: SparkSession) -> bool:
    """Whether the JVM can load Delta Lake's DeltaTable class (False on Spark Connect without it)."""
    try:
        jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def _machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 8.0


def local_driver_memory(settings: SparkSettings) -> str:
    if settings.driver_memory != "auto":
        return settings.driver_memory
    # Local mode runs executors inside the driver JVM; Python workers and the OS need the rest.
    gib = max(1, min(32, int(_machine_memory_gib() * 0.4)))
    return f"{gib}g"


def local_conf(settings: SparkSettings, *, environ: Mapping[str, str], delta_jars: list[str]) -> dict[str, str]:
    """The configuration of a local session, as a plain mapping (tested without a JVM)."""
    cores = os.cpu_count() or 2
    shuffle = settings.shuffle_partitions or 2 * cores
    in_ci = environ.get("CI", "").lower() in {"1", "true", "yes"}
    conf = {
        "spark.driver.memory": local_driver_memory(settings),
        "spark.sql.shuffle.partitions": str(shuffle),
        "spark.default.parallelism": str(shuffle),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": "false" if in_ci or not settings.ui_enabled else "true",
        "spark.ui.showConsoleProgress": "false",
        # Python workers must be the driver's interpreter, or pickled functions fail to load.
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.sql.warehouse.dir": str(Path(settings.checkpoint_dir).absolute().parent / "warehouse"),
        "spark.driver.extraJavaOptions": " ".join([
            "-Dderby.system.home=" + str(Path(settings.checkpoint_dir).absolute().parent),
            "-Dlog4j2.configurationFile=" + str(Path(__file__).with_name("log4j2.properties")),
        ]),
    }
    if delta_jars:
        conf["spark.jars"] = ",".join(delta_jars)
        conf["spark.sql.extensions"] = DELTA_EXTENSION
        conf["spark.sql.catalog.spark_catalog"] = DELTA_CATALOG
    conf.update(settings.extra_conf)
    return conf


def build_session(
    settings: SparkSettings,
    *,
    environ: Mapping[str, str],
    app_name: str = "inboxlift",
) -> SessionInfo:
    """Reuse the active session (Databricks, a notebook, a cluster) or build a local one.

    Args:
        settings: sizing for a local session.
        environ: the process environment (to detect Databricks and CI).
        app_name: the application name shown by Spark.
    """
    active = SparkSession.getActiveSession()
    if active is not None or is_databricks(environ):
        spark = active or SparkSession.builder.getOrCreate()
        return SessionInfo(spark, is_local=False, is_databricks=is_databricks(environ),
                           has_delta_jars=is_databricks(environ) or delta_classes_loaded(spark))

    # Set before the JVM starts so every Python worker runs this interpreter.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    delta_jars = find_delta_jars()
    builder = SparkSession.builder.master(settings.master).appName(app_name)
    for key, value in local_conf(settings, environ=environ, delta_jars=delta_jars).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    Path(settings.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    spark.sparkContext.setCheckpointDir(str(Path(settings.checkpoint_dir).absolute()))
    return SessionInfo(spark, is_local=True, is_databricks=False,
                       has_delta_jars=bool(delta_jars) and delta_classes_loaded(spark))
