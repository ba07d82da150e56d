"""K-means with each partition's points held in its Python worker for the whole fit: one Spark job.

Spark ML's ``KMeans`` runs one Spark job per iteration over its cached input (and several for the
k-means|| initialisation); on ~20 dense features most of its time goes to per-row overhead, not
arithmetic. :class:`CollectiveKMeans` reads its input **once**:

1. The driver opens a TCP listener on ``spark.driver.host`` and starts **one barrier job**
   (``mapInArrow(..., barrier=True)``): Spark launches all of its tasks at the same time or none,
   so every partition is loaded before any step needs it. With more partitions than the
   cluster has task slots, the input is first repartitioned to the slot count.
2. Each task turns its partition into one ``rows x d`` float64 matrix, connects to the driver and
   says hello (its partition, its row count, its width, or why its data is unusable).
3. The driver runs the algorithm below and sends each step to every task; a task answers with
   sums over its own rows (a k x d matrix, k counts, a cost), never with its rows, except for the
   few sampled candidates of the initialisation. Numbers travel as raw float64 arrays.
4. The driver sends ``stop``; the tasks end and the job completes.

This is the pattern distributed trainers on Spark use (barrier scheduling, a rendezvous on the
driver, then their own messages). It needs classic Spark (not Spark Connect), executors that can
open a connection to the driver, and memory for ``rows x d x 8`` bytes per task. Spark's own
barrier ``allGather`` is not used for the steps: each call waited about a second here (20
iterations: 18-20 s against 0.3 s over sockets). Each connection proves itself with a random
32-byte token made for that fit.

**The algorithm** is Spark's, step for step:

- *k-means|| initialisation*: a first centre drawn uniformly from all rows; then ``init_steps``
  rounds, each sampling every row with probability ``min(1, 2k * d(x)^2 / phi)`` (``d(x)`` the
  distance to the nearest centre so far, ``phi`` their sum over all rows); every candidate is
  weighted by the rows nearest to it, and weighted k-means++ plus 30 weighted Lloyd iterations
  on the driver reduce the candidates to ``k``. When there are ``k`` or fewer distinct
  candidates, they are the centres (fewer than ``k`` clusters, as Spark's ``KMeans`` does).
- *Lloyd iterations*: every row goes to its nearest centre (squared Euclidean, lowest index on a
  tie), each centre moves to its rows' mean, an empty cluster keeps its centre. The fit stops
  after ``maxIter`` iterations or when no centre moved more than ``tol``.
- *Cost*: the sum of squared distances from every row to its nearest final centre.

The fitted :class:`CollectiveKMeansModel` assigns rows with Spark's built-in functions (no Python
per row) and saves and loads with Spark ML's own persistence, alone or inside a ``PipelineModel``.
The driver-side algorithm and the task-side steps are plain numpy (:func:`fit_centres`,
:class:`PartitionPoints`), so they are tested without Spark too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasMaxIter, HasPredictionCol, HasSeed, HasTol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from inboxlift.models.collective import (
    DEFAULT_TIMEOUT_S, OP_HELLO, Tasks, UnusableInput, recv_message, report_unusable, run_collective,
    send_message, spark_context, task_connection, task_slots,
)

LOCAL_ITERATIONS = 30       # weighted Lloyd iterations reducing the k-means|| candidates (Spark's figure)
LOCAL_RESTARTS = 10         # seedings of that reduction; the best is kept
CHUNK_ROWS = 8_192          # rows per distance block in a task: 8,192 x k scores stay in cache (k=80: 82 ms per 500k rows, 165 ms at 65,536)

# ---- the steps a task answers --------------------------------------------------------------------

OP_ROW, OP_SEED, OP_SAMPLE, OP_WEIGHTS, OP_LLOYD, OP_COST, OP_STOP = range(2, 9)


class PartitionPoints:
    """One partition's rows as a matrix, and every step of the fit computed over them.

    ``costs`` is the squared distance of each row to its nearest centre so far; it is kept between
    the initialisation's steps, as Spark keeps it.
    """

    def __init__(self, points: np.ndarray, *, partition: int) -> None:
        self.points = np.ascontiguousarray(points, dtype=np.float64)
        self.partition = partition
        self.norms = np.einsum("ij,ij->i", self.points, self.points)
        self.costs = np.full(len(self.points), np.inf)

    def _chunks(self) -> Iterator[slice]:
        for start in range(0, len(self.points), CHUNK_ROWS):
            yield slice(start, start + CHUNK_ROWS)

    def _scores(self, rows: slice, centres: np.ndarray) -> np.ndarray:
        """``x.c - |c|^2 / 2`` for ``rows`` x ``centres``: the largest is the nearest centre, since
        ``|x - c|^2 = |x|^2 - 2 (x.c - |c|^2 / 2)`` (one matrix product and one subtraction)."""
        scores = self.points[rows] @ centres.T
        scores -= 0.5 * np.einsum("ij,ij->i", centres, centres)[None, :]
        return scores

    def _closest(self, rows: slice, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For ``rows``: the nearest centre (``argmax``: the lowest index on a tie) and the squared
        distance to it."""
        scores = self._scores(rows, centres)
        labels = scores.argmax(axis=1)
        best = np.take_along_axis(scores, labels[:, None], axis=1)[:, 0]
        return labels, np.maximum(self.norms[rows] - 2.0 * best, 0.0)

    def distances(self, centres: np.ndarray) -> np.ndarray:
        """Each row's squared distance to its nearest centre (no label: a max, not an argmax).

        The scores are laid out centre by row (``k x rows``), so the max runs down contiguous rows:
        for 16 centres (a k-means|| round) 15 ms per 500k rows of 20 features, against 36 ms for a
        max along each row's 16 scores. (An argmax does not gain from it, so labels stay row-major.)
        """
        costs = np.empty(len(self.points))
        half_norms = 0.5 * np.einsum("ij,ij->i", centres, centres)
        for rows in self._chunks():
            scores = centres @ self.points[rows].T
            scores -= half_norms[:, None]
            costs[rows] = np.maximum(self.norms[rows] - 2.0 * scores.max(axis=0), 0.0)
        return costs

    def labels(self, centres: np.ndarray) -> np.ndarray:
        """Each row's nearest centre (lowest index on a tie)."""
        labels = np.empty(len(self.points), dtype=np.int64)
        for rows in self._chunks():
            labels[rows] = self._scores(rows, centres).argmax(axis=1)
        return labels

    def answer(self, op: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if op == OP_ROW:                                   # [index] -> the row
            return [self.points[int(arrays[0][0])].copy()]
        if op == OP_SEED:                                  # [new centres] -> [sum of costs]
            if len(self.points):
                self.costs = np.minimum(self.costs, self.distances(arrays[0]))
            return [np.array([self.costs.sum()])]
        if op == OP_SAMPLE:                                # [2k / phi, seed, round] -> sampled rows
            factor, seed, round_ = arrays[0]
            rng = np.random.default_rng([int(seed), int(round_), self.partition])
            chosen = rng.random(len(self.points)) < self.costs * factor
            return [self.points[chosen]]
        if op == OP_WEIGHTS:                               # [candidates] -> rows nearest to each
            labels = self.labels(arrays[0])
            return [np.bincount(labels, minlength=len(arrays[0])).astype(np.float64)]
        if op == OP_LLOYD:                                 # [centres] -> [sums, counts, cost]
            centres = arrays[0]
            k = len(centres)
            sums = np.zeros_like(centres)
            counts = np.zeros(k)
            cost = 0.0
            for rows in self._chunks():
                labels, costs = self._closest(rows, centres)
                cost += float(costs.sum())
                members = np.zeros((len(labels), k))
                members[np.arange(len(labels)), labels] = 1.0
                sums += members.T @ self.points[rows]
                counts += np.bincount(labels, minlength=k)
            return [sums, counts, np.array([cost])]
        if op == OP_COST:                                  # [centres] -> [cost]
            return [np.array([self.distances(arrays[0]).sum() if len(self.points) else 0.0])]
        raise ValueError(f"unknown step {op}")


# ---- the driver's side: the algorithm over any set of partitions ---------------------------------

class Partitions:
    """What the algorithm needs from the partitions: their sizes, and a step answered by all of them
    or by one (``only``: its position in ``counts``)."""

    counts: list[int]

    def ask(self, op: int, arrays: Sequence[np.ndarray], *, only: int | None = None) -> list[list[np.ndarray]]:
        raise NotImplementedError


class LocalPartitions(Partitions):
    """Partitions held in this process: the algorithm without Spark (tests, notebooks)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [PartitionPoints(p, partition=i) for i, p in enumerate(parts)]
        self.counts = [len(p.points) for p in self.parts]

    def ask(self, op, arrays, *, only=None):
        targets = self.parts if only is None else [self.parts[only]]
        return [p.answer(op, [np.asarray(a, dtype=np.float64) for a in arrays]) for p in targets]


@dataclass(frozen=True)
class Fitted:
    centres: np.ndarray
    cost: float
    iterations: int


def _squared_to(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    squared = (np.einsum("ij,ij->i", points, points)[:, None] - 2.0 * points @ centres.T
               + np.einsum("ij,ij->i", centres, centres)[None, :])
    return np.maximum(squared, 0.0)


def _weighted_cost(points: np.ndarray, weights: np.ndarray, centres: np.ndarray) -> float:
    return float(weights @ _squared_to(points, centres).min(axis=1))


def _weighted_lloyd(points: np.ndarray, weights: np.ndarray, centres: np.ndarray, iterations: int) -> np.ndarray:
    centres = centres.copy()
    for _ in range(iterations):
        labels = _squared_to(points, centres).argmin(axis=1)
        mass = np.bincount(labels, weights=weights, minlength=len(centres))
        sums = np.stack([np.bincount(labels, weights=weights * points[:, j], minlength=len(centres))
                         for j in range(points.shape[1])], axis=1)
        moved = mass > 0
        centres[moved] = sums[moved] / mass[moved, None]
    return centres


def weighted_kmeans_pp(points: np.ndarray, weights: np.ndarray, k: int, *, seed: int,
                       iterations: int = LOCAL_ITERATIONS, restarts: int = LOCAL_RESTARTS) -> np.ndarray:
    """``k`` centres from weighted points: the best of ``restarts`` greedy k-means++ seedings, each
    followed by weighted Lloyd iterations (best = lowest weighted cost on the points).

    Greedy: each new centre is the best (lowest weighted cost) of ``2 + ln k`` draws proportional
    to weight x squared distance, as scikit-learn seeds. The candidates are few (about
    ``2k x init_steps``), so restarts cost milliseconds; one seeding alone left groups of unequal
    size merged often enough to matter (see docs/segments.md).
    """
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    best, best_cost = None, np.inf
    for _ in range(restarts):
        chosen = [int(rng.choice(len(points), p=weights / weights.sum()))]
        nearest = _squared_to(points, points[chosen])[:, 0]
        while len(chosen) < k:
            mass = weights * nearest
            if mass.sum() <= 0:   # every remaining point sits on a chosen one
                break
            draws = rng.choice(len(points), size=trials, p=mass / mass.sum())
            options = np.minimum(nearest[None, :], _squared_to(points, points[draws]).T)
            pick = int(np.argmin(options @ weights))
            chosen.append(int(draws[pick]))
            nearest = options[pick]
        centres = _weighted_lloyd(points, weights, points[chosen], iterations)
        cost = _weighted_cost(points, weights, centres)
        if cost < best_cost:
            best, best_cost = centres, cost
    return best


def _total(answers: list[list[np.ndarray]], index: int) -> np.ndarray:
    return np.sum([a[index] for a in answers], axis=0)


def fit_centres(parts: Partitions, *, k: int, max_iter: int, tol: float, init_steps: int, seed: int) -> Fitted:
    """K-means (k-means|| initialisation, then Lloyd) over ``parts``; see the module docstring."""
    total = sum(parts.counts)
    if total == 0:
        raise ValueError("K-means: the input has no rows")
    rng = np.random.default_rng(seed)
    first = int(rng.integers(total))
    owner = int(np.searchsorted(np.cumsum(parts.counts), first, side="right"))
    local = first - sum(parts.counts[:owner])
    centres = parts.ask(OP_ROW, [np.array([local])], only=owner)[0][0][None, :]

    candidates = centres
    phi = float(_total(parts.ask(OP_SEED, [candidates]), 0)[0])
    for round_ in range(init_steps):
        if phi <= 0:
            break
        sampled = np.concatenate([a[0].reshape(-1, centres.shape[1])
                                  for a in parts.ask(OP_SAMPLE, [np.array([2.0 * k / phi, seed, round_])])])
        if not len(sampled):
            continue
        candidates = np.concatenate([candidates, sampled])
        phi = float(_total(parts.ask(OP_SEED, [sampled]), 0)[0])
    candidates = np.unique(candidates, axis=0)
    if len(candidates) <= k:
        centres = candidates
    else:
        weights = _total(parts.ask(OP_WEIGHTS, [candidates]), 0)
        keep = weights > 0
        centres = weighted_kmeans_pp(candidates[keep], weights[keep], k, seed=seed)

    iterations, cost, converged = 0, None, False
    while iterations < max_iter and not converged:
        answers = parts.ask(OP_LLOYD, [centres])
        sums, counts = _total(answers, 0), _total(answers, 1)
        moved = counts > 0
        updated = centres.copy()
        updated[moved] = sums[moved] / counts[moved, None]
        converged = bool(np.all(((updated - centres) ** 2).sum(axis=1) <= tol * tol))
        # A step's cost is measured against the centres it started from: it is the final cost
        # only when no centre moved at all.
        cost = float(_total(answers, 2)[0]) if np.array_equal(updated, centres) else None
        centres = updated
        iterations += 1
    if cost is None:
        cost = float(_total(parts.ask(OP_COST, [centres]), 0)[0])
    return Fitted(centres=centres, cost=cost, iterations=iterations)


# ---- the task's side -------------------------------------------------------------------------------

class UnusablePoints(UnusableInput):
    """A partition's feature vectors cannot be clustered (nulls, NaN, different lengths)."""


def partition_matrix(batches: Iterable[pa.RecordBatch]) -> np.ndarray:
    """The single list column of ``batches`` as one ``rows x d`` matrix; UnusablePoints says what is wrong."""
    blocks, width = [], None
    for batch in batches:
        if batch.num_rows == 0:
            continue
        column = batch.column(0)
        if column.null_count:
            raise UnusablePoints(f"{column.null_count} rows have no feature vector (null)")
        lengths = np.diff(column.offsets.to_numpy())
        if width is None:
            width = int(lengths[0])
        if np.any(lengths != width):
            raise UnusablePoints(f"feature vectors differ in length ({sorted(set(lengths.tolist()))[:5]})")
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        if not np.isfinite(values).all():
            raise UnusablePoints("feature vectors hold NaN or infinite values")
        blocks.append(values.reshape(-1, width))
    if not blocks:
        return np.empty((0, 0))
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def serve_partition(batches: Iterator[pa.RecordBatch], *, address: tuple[str, int], token: bytes,
                    timeout: float) -> Iterator[pa.RecordBatch]:
    """The barrier task: load the partition, then answer the driver's steps until it says stop."""
    sock, partition, tasks = task_connection(address=address, token=token, timeout=timeout)
    with sock:
        try:
            points = PartitionPoints(partition_matrix(batches), partition=partition)
        except UnusablePoints as error:
            # Only the data's own faults are reported as such; any other failure (e.g. Spark failing
            # to compute the input) fails the task, and the driver raises Spark's error.
            report_unusable(sock, partition, tasks, error)
            raise
        send_message(sock, OP_HELLO, [np.array([partition, tasks, len(points.points), points.points.shape[1]])])
        while True:
            op, arrays = recv_message(sock)
            if op == OP_STOP:
                break
            send_message(sock, op, points.answer(op, arrays))
    yield pa.RecordBatch.from_pydict({"partition": [partition]}, schema=pa.schema([("partition", pa.int32())]))


class SocketPartitions(Partitions):
    """The barrier job's tasks (:class:`~inboxlift.models.collective.Tasks`) with each one's row count;
    every partition with rows must have the same width."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks
        self.counts = [int(hello[0][2]) for hello in tasks.hellos]
        widths = {int(hello[0][3]) for hello in tasks.hellos if int(hello[0][2])}
        if len(widths) > 1:
            raise ValueError(f"K-means input: feature vectors of {' and '.join(map(str, sorted(widths)))} values")

    def ask(self, op, arrays, *, only=None):
        return self.tasks.ask(op, arrays, only=only)


def fit_on_spark(points: DataFrame, *, k: int, max_iter: int, tol: float, init_steps: int, seed: int,
                 timeout: float = DEFAULT_TIMEOUT_S) -> Fitted:
    """Run :func:`fit_centres` over ``points`` (one array<double> column) in one barrier job."""
    context = spark_context(points, name="K-means", instead="set segments.kmeans_solver: row")
    slots = task_slots(context)
    if points.rdd.getNumPartitions() > slots:
        # Barrier tasks all run at once, so there can be no more of them than slots.
        points = points.repartition(slots)

    def driver(tasks: Tasks) -> Fitted:
        return fit_centres(SocketPartitions(tasks), k=k, max_iter=max_iter, tol=tol, init_steps=init_steps,
                           seed=seed)

    fitted, _ = run_collective(points, serve_partition, "partition int", driver, stop_op=OP_STOP, name="K-means",
                               finish=lambda frame: frame.collect(), timeout=timeout)
    return fitted


# ---- Spark ML estimator and model ------------------------------------------------------------------

def features_as_array(dataset: DataFrame, column: str) -> Column:
    """``column`` as array<double>, from a Spark ML vector or any numeric array."""
    data_type = dataset.schema[column].dataType
    if isinstance(data_type, VectorUDT):
        return vector_to_array(F.col(column), "float64")
    if isinstance(data_type, T.ArrayType) and isinstance(data_type.elementType, T.NumericType):
        return F.col(column).cast(T.ArrayType(T.DoubleType()))
    raise ValueError(f"K-means features column {column!r} must be a vector or a numeric array, not {data_type.simpleString()}")


class _KMeansParams(HasFeaturesCol, HasPredictionCol):
    def setFeaturesCol(self, value: str):
        return self._set(featuresCol=value)

    def setPredictionCol(self, value: str):
        return self._set(predictionCol=value)


class CollectiveKMeans(Estimator, _KMeansParams, HasSeed, HasMaxIter, HasTol, DefaultParamsReadable,
                       DefaultParamsWritable):
    """K-means, k-means|| initialisation, fitted in one Spark job (see the module docstring)."""

    k = Param(Params._dummy(), "k", "number of clusters (at least 2)", typeConverter=TypeConverters.toInt)
    initSteps = Param(Params._dummy(), "initSteps", "k-means|| rounds", typeConverter=TypeConverters.toInt)
    timeout = Param(Params._dummy(), "timeout", "seconds to wait for a task's connection or answer",
                    typeConverter=TypeConverters.toFloat)

    @keyword_only
    def __init__(self, *, k: int = 2, seed: int = 0, maxIter: int = 20, tol: float = 1e-4, initSteps: int = 2,
                 featuresCol: str = "features", predictionCol: str = "prediction",
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self._setDefault(k=2, maxIter=20, tol=1e-4, initSteps=2, timeout=DEFAULT_TIMEOUT_S)
        self._set(**self._input_kwargs)

    def getK(self) -> int:
        return self.getOrDefault(self.k)

    def _fit(self, dataset: DataFrame) -> "CollectiveKMeansModel":
        k, init_steps = self.getK(), self.getOrDefault(self.initSteps)
        if k < 2:
            raise ValueError(f"K-means: k must be at least 2, got {k}")
        if init_steps < 1:
            raise ValueError(f"K-means: initSteps must be at least 1, got {init_steps}")
        points = dataset.select(features_as_array(dataset, self.getFeaturesCol()).alias("points"))
        fitted = fit_on_spark(points, k=k, max_iter=self.getMaxIter(), tol=self.getTol(), init_steps=init_steps,
                              seed=self.getSeed(), timeout=self.getOrDefault(self.timeout))
        model = CollectiveKMeansModel(centers=fitted.centres.tolist(), trainingCost=fitted.cost,
                                      numIter=fitted.iterations)
        return self._copyValues(model)


@dataclass(frozen=True)
class KMeansSummary:
    """What Spark's ``KMeansSummary`` offers that inboxlift reads."""

    k: int
    trainingCost: float
    numIter: int


class CollectiveKMeansModel(Model, _KMeansParams, DefaultParamsReadable, DefaultParamsWritable):
    """Fitted centres; ``transform`` adds the nearest centre's index (int) as ``predictionCol``."""

    centers = Param(Params._dummy(), "centers", "cluster centres", typeConverter=TypeConverters.toListListFloat)
    trainingCost = Param(Params._dummy(), "trainingCost", "sum of squared distances to the nearest centre",
                         typeConverter=TypeConverters.toFloat)
    numIter = Param(Params._dummy(), "numIter", "Lloyd iterations run", typeConverter=TypeConverters.toInt)

    @keyword_only
    def __init__(self, *, centers: list | None = None, trainingCost: float = 0.0, numIter: int = 0,
                 featuresCol: str = "features", predictionCol: str = "prediction") -> None:
        super().__init__()
        self._set(**self._input_kwargs)

    def clusterCenters(self) -> list[np.ndarray]:
        return [np.array(c) for c in self.getOrDefault(self.centers)]

    @property
    def summary(self) -> KMeansSummary:
        return KMeansSummary(k=len(self.getOrDefault(self.centers)),
                             trainingCost=self.getOrDefault(self.trainingCost),
                             numIter=self.getOrDefault(self.numIter))

    def _transform(self, dataset: DataFrame) -> DataFrame:
        centres = np.array(self.getOrDefault(self.centers))
        points = "_kmeans_points"
        values = [F.col(points).getItem(j) for j in range(centres.shape[1])]
        scores = []
        for index, centre in enumerate(centres):
            # |x - c|^2 = |x|^2 + 2 (|c|^2 / 2 - x.c): the smallest |c|^2/2 - x.c is the nearest centre.
            score = F.lit(float(0.5 * centre @ centre))
            for value, coordinate in zip(values, centre):
                score = score - value * F.lit(float(coordinate))
            scores.append(score.alias(f"_kmeans_score_{index}"))
        names = [f"_kmeans_score_{index}" for index in range(len(centres))]
        # array_position finds the first score equal to the least: the lowest index on a tie.
        nearest = (F.array_position(F.array(*names), F.least(*names)) - 1).cast("int")
        return (dataset.withColumn(points, features_as_array(dataset, self.getFeaturesCol()))
                .select("*", *scores)
                .withColumn(self.getPredictionCol(), nearest)
                .drop(points, *names))
