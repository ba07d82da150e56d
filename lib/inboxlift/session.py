"""The only place a SparkSession is built.

On Databricks or any running cluster the active session is reused as it is:
nothing is set that could break a shared or serverless cluster. Locally a
session is sized for the machine, with Delta Lake's extensions switched on
when its jars can be found on disk (they cannot be downloaded everywhere).
With ``spark.remote`` set, the session is a Spark Connect client: ``local[N]``
starts pyspark's own Connect server in this process, ``sc://host:port``
connects to a running one (Databricks serverless and shared clusters are
Spark Connect too). Nothing here touches ``sparkContext`` or the JVM gateway,
so the same code serves both kinds of session.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from multiprocessing.pool import ThreadPool
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.util import inheritable_thread_target

from inboxlift.settings import SparkSettings

T = TypeVar("T")
R = TypeVar("R")

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


@dataclass(frozen=True)
class SessionInfo:
    spark: SparkSession
    is_local: bool
    is_databricks: bool
    has_delta_jars: bool
    is_connect: bool = False
    # Set for a session the project did not build: where its checkpoints go, or why not where settings say.
    checkpoint_note: str = ""

    def describe(self) -> str:
        where = "Databricks" if self.is_databricks else ("local" if self.is_local else "cluster")
        kind = "Spark Connect" if self.is_connect else "classic"
        delta = "native Delta jars on the classpath" if self.has_delta_jars else "no Delta jars (delta-rs backend)"
        text = f"Spark {self.spark.version} ({where}, {kind}, master {master_of(self.spark)}); {delta}"
        return f"{text}\n{self.checkpoint_note}" if self.checkpoint_note else text


def is_connect_session(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect client (no JVM in this process to talk to)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


# How many ml_finalizers_at_safe_points blocks are open that turned Python's cyclic collector off.
_COLLECTOR_HELD = 0


@contextlib.contextmanager
def ml_finalizers_at_safe_points(spark: SparkSession) -> Iterator[None]:
    """On Spark Connect, let Python's cyclic garbage collector run only where no RPC is in flight.

    pyspark 4.2's Connect client deletes a fitted model from the server's ML cache in the model's
    finalizer, with a blocking RPC. A model caught in a reference cycle is finalized by the cyclic
    collector, which Python starts at whatever allocation crosses its threshold: also one made inside
    another RPC of the same thread (``spark.conf.get``, a schema request). The nested delete then
    waits on the channel the outer call holds, and the run hangs without an error (seen in a local
    ``run-all`` on Connect, in the ``plan`` stage after the model stages; pyspark 4.2.0 turns the
    collector off only around its own ``ExecutePlan`` calls). Inside this block the automatic
    collector is off; the block's end and :func:`collect_ml_garbage` (between the fits of a search)
    collect where no RPC is in flight. Reference counting, which frees most objects at once, is
    untouched. On a classic session, or with the collector already off, nothing changes.
    """
    global _COLLECTOR_HELD
    if not is_connect_session(spark) or not gc.isenabled():
        yield
        return
    gc.disable()
    _COLLECTOR_HELD += 1
    try:
        yield
    finally:
        _COLLECTOR_HELD -= 1
        gc.enable()
        gc.collect()


def collect_ml_garbage() -> None:
    """A safe point inside :func:`ml_finalizers_at_safe_points`: collect now (no RPC is in flight).

    Frees the models of a search's earlier fits (and their server-side cache entries) as it goes;
    outside such a block Python's own collector is on and this does nothing.
    """
    if _COLLECTOR_HELD:
        gc.collect()


# Spark's storage levels by the names Spark (Scala) gives them. PySpark's constants of the same names
# are the serialised levels (Python objects are always pickled), so ``StorageLevel.MEMORY_AND_DISK``
# in Python is Scala's MEMORY_AND_DISK_SER. For DataFrames the JVM keeps the rows, and Spark's own
# defaults (``DataFrame.persist()``, ``localCheckpoint()``) are the deserialised levels.
SPARK_STORAGE_LEVELS: dict[str, StorageLevel] = {
    "MEMORY_AND_DISK": StorageLevel.MEMORY_AND_DISK_DESER,
    "MEMORY_AND_DISK_SER": StorageLevel(True, True, False, False),
    "MEMORY_ONLY": StorageLevel(False, True, False, True),
    "MEMORY_ONLY_SER": StorageLevel(False, True, False, False),
    "DISK_ONLY": StorageLevel.DISK_ONLY,
}

# What a stage keeps for reuse: memory, spilling to disk, rows kept as the JVM's objects. The
# serialised form cost more time and CPU (measured in the README, "Kept frames: Spark's
# deserialised storage").
KEEP = SPARK_STORAGE_LEVELS["MEMORY_AND_DISK"]


def spark_storage_level(name: str) -> StorageLevel:
    """The storage level Spark means by ``name`` ("MEMORY_AND_DISK" is deserialised, as in Scala)."""
    try:
        return SPARK_STORAGE_LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown storage level {name!r}: one of {', '.join(SPARK_STORAGE_LEVELS)}") from None


def materialize(frame: DataFrame, storage_level: StorageLevel | None = None) -> DataFrame:
    """``frame`` computed now and kept for reuse, its plan cut: a local checkpoint, on both kinds of session.

    What is built on the result starts from a reference to the computed rows instead of ``frame``'s
    whole plan. A persisted frame keeps its plan, and that costs twice:

    - On Spark Connect the client sends the whole plan tree with every command, the server converts
      and analyses it again each time, and protobuf refuses a message nested more than 100 levels
      deep: the recommender's evaluation passes that depth (``Exceeded upb_DecodeOptions_MaxDepth``).
    - On a classic session Catalyst analyses a new frame's whole plan for every ``join``, ``select``
      or action built on it (``DeduplicateRelations`` walks it each time), and the stages' plans are
      deep. On the suite's small data that analysis cost more than the jobs; measured in the
      README, "Kept frames cut their plans".

    The rows stay in the executors' block managers (``storage_level``, by default :data:`KEEP`: memory
    and disk, deserialised, Spark's own default for a local checkpoint)
    with no lineage to recompute them: an executor lost while a stage uses them fails the stage,
    which is then re-run. ``unpersist()`` does not free a local checkpoint (measured on a classic
    session): Spark's ``ContextCleaner`` frees the blocks once nothing refers to the frame (on
    Connect the client drops the server's reference when its Python frame is collected), and until
    then they spill to disk under memory pressure like any cached blocks.
    """
    level = storage_level or KEEP
    return frame.localCheckpoint(eager=True, storageLevel=level)


def concurrently(step: Callable[[T], R], items: Iterable[T], *, parallelism: int, spark: SparkSession) -> list[R]:
    """``[step(item) for item in items]`` with up to ``parallelism`` steps running at once; the results
    keep the items' order.

    Spark ML's own tuning does it this way (``CrossValidator(parallelism=n)``): threads of this driver
    each submit their own jobs, which Spark's scheduler runs side by side, so small jobs that each
    leave cores idle fill them together. Each thread gets the session's job tags and local properties
    (``inheritable_thread_target``), on a classic session and on Spark Connect alike. A step's
    exception is raised here once the running steps end.
    """
    items = list(items)
    if parallelism <= 1 or len(items) <= 1:
        return [step(item) for item in items]
    with ThreadPool(processes=min(parallelism, len(items))) as pool:
        return pool.map(inheritable_thread_target(spark)(step), items, chunksize=1)


def master_of(spark: SparkSession) -> str:
    """The master URL as the session's configuration states it (works on both kinds of session)."""
    try:
        return spark.conf.get("spark.master", "unknown") or "unknown"
    except Exception:  # noqa: BLE001 - a serverless session may refuse to show it
        return "unknown"


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
    """Whether Spark can resolve the ``delta`` data source on this session.

    Asked through the DataFrame API (a read of a path that does not exist), so it works the same
    on a classic session and on Spark Connect: without Delta the error is ``DATA_SOURCE_NOT_FOUND``;
    with it, Delta itself complains about the missing path.
    """
    probe = f"/nonexistent/inboxlift-delta-probe-{os.getpid()}"
    try:
        spark.read.format("delta").load(probe).schema
    except Exception as exc:  # noqa: BLE001 - classified below by its error condition
        condition = getattr(exc, "getCondition", lambda: None)() or ""
        return condition != "DATA_SOURCE_NOT_FOUND" and "DATA_SOURCE_NOT_FOUND" not in str(exc)
    return True


def align_checkpoint_dir(spark: SparkSession, wanted: str) -> str:
    """Point an existing session's ``spark.checkpoint.dir`` at ``wanted`` where Spark allows it; say what holds.

    Spark reads the checkpoint directory when its context starts, and refuses to change
    ``spark.checkpoint.dir`` afterwards (``CANNOT_MODIFY_CONFIG``); ``setCheckpointDir`` needs the
    ``sparkContext``, which Spark Connect does not have. So on Databricks the job cluster sets it
    (``deploy/databricks.yml``) and this only checks, and says so when the two disagree.
    """
    if "://" not in wanted:
        wanted = str(Path(wanted).absolute())
    current = spark.conf.get("spark.checkpoint.dir", None) or None
    if current == wanted:
        return f"checkpoints: {current}"
    try:
        spark.conf.set("spark.checkpoint.dir", wanted)
    except Exception:  # noqa: BLE001 - CANNOT_MODIFY_CONFIG (classic and Connect raise different types)
        where = current or "nowhere: ALS runs without checkpoints"
        return (f"checkpoints: {where} (spark.checkpoint_dir {wanted} can only be set when the cluster starts: "
                "put it in the cluster's spark.checkpoint.dir)")
    return f"checkpoints: {wanted}"


LOCAL_PAGE_SIZE = "4m"


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
        # Spark sizes a Tungsten page from the heap (64 MiB from a 3 GiB local driver up), and every
        # broadcast hash relation allocates at least one page while it is built. Under AQE a stage
        # like recommend builds dozens of tiny broadcasts at once; their mostly empty pages filled
        # the suite's 3 GiB Connect server ("Not enough memory to build and broadcast the table").
        # 4 MiB pages still allow 32 GiB per task (8,192 pages), the largest `auto` driver.
        # Measured: README, "Memory of a local session".
        "spark.buffer.pageSize": LOCAL_PAGE_SIZE,
        # Both are static settings read when the context starts (Spark 4), so they need no
        # SparkContext call afterwards and reach a local Spark Connect server the same way.
        "spark.log.level": settings.log_level,
        "spark.checkpoint.dir": str(Path(settings.checkpoint_dir).absolute()),
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
    """Reuse the active session (Databricks, a notebook, a cluster) or build a local or Connect one.

    Args:
        settings: sizing for a local session; ``settings.remote`` asks for Spark Connect.
        environ: the process environment (to detect Databricks and CI).
        app_name: the application name shown by Spark.
    """
    active = SparkSession.getActiveSession()
    if active is not None or is_databricks(environ):
        spark = active or SparkSession.builder.getOrCreate()
        connect = is_connect_session(spark)
        return SessionInfo(spark, is_local=False, is_databricks=is_databricks(environ),
                           has_delta_jars=is_databricks(environ) or delta_classes_loaded(spark), is_connect=connect,
                           checkpoint_note=align_checkpoint_dir(spark, settings.checkpoint_dir))

    # Set before the JVM starts so every Python worker runs this interpreter.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    Path(settings.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    if settings.remote:
        return _connect_session(settings, environ=environ, app_name=app_name)
    delta_jars = find_delta_jars()
    builder = SparkSession.builder.master(settings.master).appName(app_name)
    for key, value in local_conf(settings, environ=environ, delta_jars=delta_jars).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    return SessionInfo(spark, is_local=True, is_databricks=False,
                       has_delta_jars=bool(delta_jars) and delta_classes_loaded(spark))


def _connect_session(settings: SparkSettings, *, environ: Mapping[str, str], app_name: str) -> SessionInfo:
    """A Spark Connect client: to pyspark's own local server (``local[N]``) or to ``sc://...``."""
    remote = settings.remote or ""
    is_local = remote.startswith("local")
    builder = SparkSession.builder.remote(remote).appName(app_name)
    if is_local:
        # The local server is started from these (static ones included); afterwards the client
        # re-applies them and Spark refuses the static ones with a warning each, which says nothing
        # a user could act on.
        delta_jars = find_delta_jars()
        conf = local_conf(settings, environ=environ, delta_jars=delta_jars)
    else:
        delta_jars = []
        conf = {"spark.sql.shuffle.partitions": str(settings.shuffle_partitions)} \
            if settings.shuffle_partitions else {}
        conf.update(settings.extra_conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to set spark", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*is NOT supported in Spark Connect", category=UserWarning)
        spark = builder.getOrCreate()
    return SessionInfo(spark, is_local=is_local, is_databricks=False,
                       has_delta_jars=delta_classes_loaded(spark) if (delta_jars or not is_local) else False,
                       is_connect=True)
