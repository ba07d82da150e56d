"""inboxlift's collective K-means: the steps in numpy, the wire, and the barrier job through Spark."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql import functions as F
from pyspark.sql import types as T

from inboxlift.models.kmeans import (OP_LLOYD, OP_SAMPLE, OP_SEED, OP_WEIGHTS, CollectiveKMeans,
                                     CollectiveKMeansModel, LocalPartitions, PartitionPoints, fit_centres,
                                     partition_matrix, recv_message, send_message, weighted_kmeans_pp)

# Two groups on a line, far apart: {0, 1, 2} and {10, 11}. Nearest-centre means: 1 and 10.5;
# cost = (1 + 0 + 1) + (0.25 + 0.25) = 2.5.
LINE = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])


def test_a_lloyd_step_sums_counts_and_costs_each_partition_by_hand():
    points = PartitionPoints(LINE, partition=0)
    sums, counts, cost = points.answer(OP_LLOYD, [np.array([[0.0], [10.0]])])
    # Rows 0, 1, 2 -> centre 0 (sum 3); rows 10, 11 -> centre 10 (sum 21).
    assert sums.tolist() == [[3.0], [21.0]] and counts.tolist() == [3.0, 2.0]
    # Costs 0 + 1 + 4 against centre 0, 0 + 1 against centre 10.
    assert cost.tolist() == [6.0]


def test_a_point_halfway_goes_to_the_lower_index():
    points = PartitionPoints(np.array([[5.0]]), partition=0)
    centres = np.array([[10.0], [0.0]])
    assert points.labels(centres).tolist() == [0] and points.distances(centres).tolist() == [25.0]
    weights = points.answer(OP_WEIGHTS, [np.array([[0.0], [10.0], [7.0]])])[0]
    assert weights.tolist() == [0.0, 0.0, 1.0]


def test_seeding_keeps_each_rows_distance_to_its_nearest_centre_so_far():
    points = PartitionPoints(LINE, partition=0)
    assert points.answer(OP_SEED, [np.array([[0.0]])])[0].tolist() == [0 + 1 + 4 + 100 + 121]
    # A second centre at 10 only lowers the far rows: 0 + 1 + 4 + 0 + 1.
    assert points.answer(OP_SEED, [np.array([[10.0]])])[0].tolist() == [6.0]
    # Sampling probability is cost x factor: with factor 0 nothing, with a huge factor every row with a cost.
    assert len(points.answer(OP_SAMPLE, [np.array([0.0, 1, 0])])[0]) == 0
    assert points.answer(OP_SAMPLE, [np.array([1e9, 1, 0])])[0][:, 0].tolist() == [1.0, 2.0, 11.0]


@pytest.mark.parametrize("parts", [[LINE], [LINE[:2], LINE[2:]], [LINE[:1], np.empty((0, 0)), LINE[1:4], LINE[4:]]])
def test_the_fit_finds_the_two_groups_however_the_rows_are_partitioned(parts):
    fitted = fit_centres(LocalPartitions(parts), k=2, max_iter=20, tol=0.0, init_steps=2, seed=3)
    assert sorted(fitted.centres[:, 0].tolist()) == [1.0, 10.5]
    assert fitted.cost == pytest.approx(2.5)
    assert 1 <= fitted.iterations < 20   # converged: nothing moved in the last iteration


def test_the_cost_is_measured_against_the_final_centres_when_a_tolerance_stops_the_fit():
    # No k-means|| round: the one centre is a row of LINE; the first step moves it to the mean, 4.8,
    # and a tolerance of 100 stops there. The cost must be the mean's, not the starting row's:
    # 4.8^2 + 3.8^2 + 2.8^2 + 5.2^2 + 6.2^2 = 110.8.
    fitted = fit_centres(LocalPartitions([LINE]), k=2, max_iter=20, tol=100.0, init_steps=0, seed=3)
    assert fitted.iterations == 1 and fitted.centres[:, 0].tolist() == [pytest.approx(4.8)]
    assert fitted.cost == pytest.approx(110.8)


def test_fewer_distinct_points_than_k_give_fewer_centres():
    rows = np.array([[1.0, 1.0]] * 4 + [[5.0, 5.0]] * 3 + [[9.0, 0.0]] * 2)
    fitted = fit_centres(LocalPartitions([rows]), k=5, max_iter=10, tol=0.0, init_steps=2, seed=0)
    assert sorted(map(tuple, fitted.centres.tolist())) == [(1.0, 1.0), (5.0, 5.0), (9.0, 0.0)]
    assert fitted.cost == 0.0


def test_no_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="the input has no rows"):
        fit_centres(LocalPartitions([np.empty((0, 0))]), k=2, max_iter=5, tol=0.0, init_steps=2, seed=0)


def test_weighted_seeding_respects_weights_and_distinct_points():
    candidates = np.array([[0.0], [0.1], [50.0], [100.0]])
    # The point at 0.1 weighs nothing: three centres must be the other three.
    centres = weighted_kmeans_pp(candidates, np.array([5.0, 0.0, 1.0, 1.0]), 3, seed=1)
    assert sorted(centres[:, 0].tolist()) == [0.0, 50.0, 100.0]
    # Means are weighted: 3 x 0 and 1 x 4 -> 1.
    assert weighted_kmeans_pp(np.array([[0.0], [4.0]]), np.array([3.0, 1.0]), 1, seed=0)[:, 0].tolist() == [1.0]


def test_messages_cross_a_socket_unchanged():
    left, right = socket.socketpair()
    with left, right:
        matrix = np.arange(6, dtype=float).reshape(2, 3)
        send_message(left, OP_LLOYD, [matrix, np.array([0.5, -1.0]), np.empty((0, 3))])
        op, arrays = recv_message(right)
    assert op == OP_LLOYD
    assert arrays[0].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert arrays[1].tolist() == [0.5, -1.0] and arrays[2].shape == (0, 3)


def test_partition_matrix_explains_unusable_rows():
    import pyarrow as pa

    batch = pa.RecordBatch.from_pydict({"points": [[1.0, 2.0], [3.0, 4.0]]})
    assert partition_matrix([batch, batch]).tolist() == [[1.0, 2.0], [3.0, 4.0]] * 2
    with pytest.raises(ValueError, match="differ in length"):
        partition_matrix([pa.RecordBatch.from_pydict({"points": [[1.0, 2.0], [3.0]]})])
    with pytest.raises(ValueError, match="NaN or infinite"):
        partition_matrix([pa.RecordBatch.from_pydict({"points": [[1.0, float("nan")]]})])
    with pytest.raises(ValueError, match="1 rows have no feature vector"):
        partition_matrix([pa.RecordBatch.from_pydict({"points": [[1.0, 2.0], None]})])


# ---- through Spark ---------------------------------------------------------------------------------

def _three_groups(spark, partitions: int):
    rows = [(i, Vectors.dense([float(x), float(y)])) for i, (x, y) in enumerate(
        [(0, 0), (0, 1), (1, 0), (1, 1), (20, 0), (21, 0), (20, 1), (0, 30), (1, 30)])]
    schema = T.StructType([T.StructField("id", T.LongType()), T.StructField("features", VectorUDT())])
    return spark.createDataFrame(rows, schema).repartition(partitions, "id")


def test_spark_fit_in_one_barrier_job_matches_the_groups_by_hand(spark, tmp_path):
    frame = _three_groups(spark, 2)
    model = CollectiveKMeans(k=3, seed=7, maxIter=20, tol=0.0).fit(frame)
    # Group means: (0.5, 0.5), (20 1/3, 1/3), (0.5, 30); cost 4 x 0.5 + (2/3 + 2/3 + 4/3) ... by hand:
    # square group: each point 0.25 + 0.25 = 0.5, total 2; line of three: x offsets -1/3, 2/3, -1/3 and
    # y offsets -1/3, -1/3, 2/3 -> 2/3 + 2/3 = 4/3; pair: 0.25 + 0.25 = 0.5. Total 2 + 4/3 + 0.5.
    centres = sorted(map(tuple, np.round(np.array(model.clusterCenters()), 6).tolist()))
    assert centres == [(0.5, 0.5), (0.5, 30.0), (20.333333, 0.333333)]
    assert model.summary.trainingCost == pytest.approx(2 + 4 / 3 + 0.5)
    assigned = {r.id: r.prediction for r in model.transform(frame).select("id", "prediction").collect()}
    assert len({assigned[i] for i in (0, 1, 2, 3)}) == 1 and len({assigned[i] for i in (4, 5, 6)}) == 1
    assert len(set(assigned.values())) == 3

    # Saved inside a pipeline and loaded back, it assigns the same.
    pipeline = Pipeline(stages=[CollectiveKMeans(k=3, seed=7, predictionCol="cluster")]).fit(frame)
    pipeline.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    assert isinstance(loaded.stages[0], CollectiveKMeansModel)
    before = pipeline.transform(frame).select("id", "cluster").orderBy("id").collect()
    assert loaded.transform(frame).select("id", "cluster").orderBy("id").collect() == before


def test_spark_fit_takes_arrays_and_more_partitions_than_slots(spark):
    frame = (spark.range(40).withColumn("points", F.array((F.col("id") % 2 * 100).cast("double"), F.lit(1.0)))
             .repartition(7))   # the test session has 2 slots: the fit repartitions to 2
    model = CollectiveKMeans(k=2, seed=1, featuresCol="points").fit(frame)
    assert sorted(c.tolist() for c in model.clusterCenters()) == [[0.0, 1.0], [100.0, 1.0]]
    assert model.summary.trainingCost == 0.0


def test_spark_fit_reports_bad_input_clearly(spark):
    nan = spark.createDataFrame([(1, [1.0, 2.0]), (2, [float("nan"), 1.0])], "id int, points array<double>")
    with pytest.raises(ValueError, match="NaN or infinite"):
        CollectiveKMeans(k=2, featuresCol="points").fit(nan.coalesce(1))
    with pytest.raises(ValueError, match="must be a vector or a numeric array"):
        CollectiveKMeans(k=2, featuresCol="id").fit(nan)
    with pytest.raises(ValueError, match="k must be at least 2"):
        CollectiveKMeans(k=1, featuresCol="points").fit(nan)


def test_transform_picks_the_nearest_centre_with_spark_functions(spark):
    model = CollectiveKMeansModel(centers=[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], featuresCol="v")
    frame = VectorAssembler(inputCols=["x", "y"], outputCol="v").transform(spark.createDataFrame(
        [(1, 1.0, 1.0), (2, 9.0, -1.0), (3, 1.0, 8.0), (4, 5.0, 0.0)], "id int, x double, y double"))
    # Row 4 is halfway between centres 0 and 1: the lower index wins.
    assert [r.prediction for r in model.transform(frame).orderBy("id").collect()] == [0, 1, 2, 0]


def test_the_same_groups_as_spark_mls_kmeans(spark):
    from pyspark.ml.clustering import KMeans

    frame = _three_groups(spark, 2)
    ours = CollectiveKMeans(k=3, seed=2, tol=0.0).fit(frame)
    spark_ml = KMeans(k=3, seed=2, tol=0.0, initMode="k-means||").fit(frame)
    assert sorted(map(tuple, np.round(ours.clusterCenters(), 9).tolist())) == \
        sorted(map(tuple, np.round(spark_ml.clusterCenters(), 9).tolist()))
    assert ours.summary.trainingCost == pytest.approx(spark_ml.summary.trainingCost)


@pytest.mark.parametrize("shuffled", [False, True])
def test_a_failing_input_fails_the_fit_instead_of_hanging(spark, shuffled):
    from pyspark.errors import PySparkException
    from py4j.protocol import Py4JJavaError

    broken = spark.range(10).select(
        F.when(F.col("id") == 3, F.raise_error(F.lit("broken row 3")))
        .otherwise(F.array(F.col("id").cast("double"))).alias("points"))
    # Unshuffled, the row fails inside the barrier stage itself; shuffled, in the stage before it.
    broken = broken.repartition(2) if shuffled else broken
    with pytest.raises((PySparkException, Py4JJavaError, ConnectionError), match="broken row 3"):
        CollectiveKMeans(k=2, featuresCol="points", timeout=60).fit(broken)


def test_task_slots_are_the_clusters_not_the_default_parallelism(spark):
    from inboxlift.models.kmeans import task_slots

    # The test session is local[2] with spark.default.parallelism 1: two tasks can run at once.
    assert spark.sparkContext.master == "local[2]"
    assert task_slots(spark.sparkContext) == 2

    class Local:
        _jsc = None
        defaultParallelism = 8

        def __init__(self, master):
            self.master = master

    assert [task_slots(Local(m)) for m in ("local", "local[3]", "local[4,2]")] == [1, 3, 4]
    assert task_slots(Local("spark://host:7077")) == 8
