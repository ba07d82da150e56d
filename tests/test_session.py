"""The session builder: local configuration, Delta jar discovery, reuse of an active session."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from pyspark import StorageLevel
from pyspark.sql import functions as F

from inboxlift.session import (
    KEEP, build_session, concurrently, find_delta_jars, local_conf, materialize, spark_storage_level,
)
from inboxlift.settings import SparkSettings


def test_local_conf_sizes_and_settles_the_session():
    conf = local_conf(SparkSettings(driver_memory="6g", shuffle_partitions=4), environ={}, delta_jars=[])
    assert conf["spark.driver.memory"] == "6g"
    assert conf["spark.sql.shuffle.partitions"] == "4"
    assert conf["spark.sql.adaptive.enabled"] == "true"
    assert conf["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert conf["spark.pyspark.python"] == sys.executable
    assert conf["spark.ui.enabled"] == "true"
    assert "spark.sql.extensions" not in conf
    # ALS's checkpoint directory comes from the conf (Spark >= 4.0), not from a sparkContext call
    assert conf["spark.checkpoint.dir"] == str((Path("var/checkpoints")).absolute())


def test_local_pages_are_small_so_many_tiny_broadcasts_fit_a_small_driver():
    # Without it, a 3 GiB driver's 64 MiB pages left the suite's run-all on Connect out of memory
    # in the recommend stage (CI of 2026-12-05).
    for memory in ("3g", "9g", "32g"):
        conf = local_conf(SparkSettings(driver_memory=memory), environ={}, delta_jars=[])
        assert conf["spark.buffer.pageSize"] == "4m"
    mine = local_conf(SparkSettings(extra_conf={"spark.buffer.pageSize": "16m"}), environ={}, delta_jars=[])
    assert mine["spark.buffer.pageSize"] == "16m"


def test_the_suite_session_runs_with_the_small_pages(spark):
    assert spark.conf.get("spark.buffer.pageSize") == "4m"


def test_ui_is_off_under_ci_and_delta_is_wired_when_jars_exist():
    jars = ["/x/delta-spark_2.13-4.4.1.jar", "/x/delta-storage-4.4.1.jar"]
    conf = local_conf(SparkSettings(extra_conf={"spark.sql.ansi.enabled": "false"}), environ={"CI": "true"},
                      delta_jars=jars)
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.jars"] == ",".join(jars)
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert conf["spark.sql.ansi.enabled"] == "false"


def test_find_delta_jars_needs_the_spark_jar(tmp_path):
    (tmp_path / "delta-storage-4.4.1.jar").write_bytes(b"")
    assert find_delta_jars([str(tmp_path)]) == []
    (tmp_path / "delta-spark_2.13-4.4.1.jar").write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in find_delta_jars([str(tmp_path)])] == [
        "delta-spark_2.13-4.4.1.jar", "delta-storage-4.4.1.jar",
    ]


def test_an_active_session_is_reused_as_it_is(spark, base_settings):
    info = build_session(SparkSettings(master="local[1]", shuffle_partitions=64), environ={})
    assert info.spark is spark
    assert info.is_local is False
    # Nothing was changed on the running session.
    assert spark.conf.get("spark.sql.shuffle.partitions") == "1"


def test_the_session_runs_python_workers_on_this_interpreter(spark):
    from pyspark.sql import functions as F

    def interpreter(batches):
        import sys as worker_sys

        import pyarrow as pa

        for _ in batches:
            yield pa.RecordBatch.from_pydict({"exe": [worker_sys.executable]})

    seen = spark.range(1).mapInArrow(interpreter, "exe string").select(F.col("exe")).first()[0]
    assert seen == sys.executable


def test_log_level_and_checkpoints_are_static_settings_not_context_calls(tmp_path):
    conf = local_conf(SparkSettings(log_level="ERROR", checkpoint_dir=str(tmp_path / "ck")), environ={},
                      delta_jars=[])
    assert conf["spark.log.level"] == "ERROR"
    assert conf["spark.checkpoint.dir"] == str(tmp_path / "ck")


def test_delta_probe_goes_through_the_dataframe_api(spark, spark_info):
    from inboxlift.session import delta_classes_loaded, is_connect_session, master_of

    # This machine has no Delta jars: the probe must say so rather than fail.
    assert delta_classes_loaded(spark) is spark_info.has_delta_jars
    assert master_of(spark) == "local[2]"
    assert is_connect_session(spark) is False


def test_a_materialized_frame_keeps_its_rows_and_drops_its_plan(spark):
    """What is built on a kept frame starts from its rows: Catalyst no longer re-analyses the steps before it."""
    frame = (spark.createDataFrame([(i, f"u{i % 3}") for i in range(12)], "n int, user string")
             .where(F.col("n") > 4).groupBy("user").agg(F.sum("n").alias("total")))
    kept = materialize(frame)
    try:
        # By hand: n 5..11; u0 has 6 and 9, u1 has 7 and 10, u2 has 5, 8 and 11
        assert sorted(map(tuple, kept.collect())) == [("u0", 15), ("u1", 17), ("u2", 24)]
        kept.createOrReplaceTempView("kept_frame")
        plan = spark.sql("EXPLAIN EXTENDED SELECT * FROM kept_frame").collect()[0][0]
        logical = plan.split("== Physical Plan ==")[0]
        # The persisted frame's plan still held the filter and the aggregation
        assert "Aggregate" not in logical and "(n#" not in logical and "LogicalRDD" in logical
    finally:
        spark.catalog.dropTempView("kept_frame")


def test_storage_levels_mean_what_spark_means_by_their_names():
    """PySpark's StorageLevel.MEMORY_AND_DISK is serialised; Spark's MEMORY_AND_DISK, which settings name, is not."""
    assert StorageLevel.MEMORY_AND_DISK.deserialized is False  # the trap: PySpark's constant
    level = spark_storage_level("MEMORY_AND_DISK")
    assert (level.useDisk, level.useMemory, level.useOffHeap, level.deserialized) == (True, True, False, True)
    assert spark_storage_level("MEMORY_AND_DISK_SER").deserialized is False
    assert spark_storage_level("MEMORY_AND_DISK_SER").useDisk is True
    only = spark_storage_level("MEMORY_ONLY")
    assert (only.useDisk, only.useMemory, only.deserialized) == (False, True, True)
    assert spark_storage_level("DISK_ONLY") == StorageLevel.DISK_ONLY
    assert KEEP == spark_storage_level("MEMORY_AND_DISK")
    with pytest.raises(ValueError, match="unknown storage level 'OFF_HEAP'"):
        spark_storage_level("OFF_HEAP")


def test_kept_frames_are_stored_deserialised_in_the_jvm(spark):
    frame = spark.range(5).persist(KEEP)
    try:
        stored = frame.storageLevel  # read back from the JVM's cache manager
        assert (stored.useDisk, stored.useMemory, stored.deserialized) == (True, True, True)
        assert frame.count() == 5
    finally:
        frame.unpersist()


class _Overlap:
    """A step that records how many steps run at the same moment; with ``together`` steps, each waits
    (10 s at most) until that many are running, so a pool that runs fewer at once fails, not races."""

    def __init__(self, together: int = 1) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.barrier = threading.Barrier(together, timeout=10) if together > 1 else None

    def __call__(self, item: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        if self.barrier is not None:
            self.barrier.wait()
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        if item < 0:
            raise ValueError(f"step {item} failed")
        return item * 10


def test_concurrently_runs_up_to_parallelism_steps_at_once_and_keeps_the_order(spark):
    step = _Overlap(together=3)
    assert concurrently(step, [3, 1, 2, 5, 4, 0], parallelism=3, spark=spark) == [30, 10, 20, 50, 40, 0]
    assert step.most == 3
    one = _Overlap()
    assert concurrently(one, [2, 1, 4], parallelism=1, spark=spark) == [20, 10, 40]
    assert one.most == 1
    assert concurrently(_Overlap(), [], parallelism=4, spark=spark) == []
    with pytest.raises(ValueError, match="step -1 failed"):
        concurrently(_Overlap(), [1, -1, 2], parallelism=2, spark=spark)


def test_concurrent_steps_run_spark_jobs_on_the_session(spark):
    # Each thread submits its own job; every answer comes back to its own item.
    counts = concurrently(lambda n: spark.range(n).where(F.col("id") % 2 == 0).count(), [10, 7, 100, 1],
                          parallelism=4, spark=spark)
    assert counts == [5, 4, 50, 1]
