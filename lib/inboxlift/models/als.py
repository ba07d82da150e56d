"""Implicit-feedback ALS with each task holding its users' pairs for the whole fit: one Spark job.

Spark ML's ``ALS`` rebuilds its rating blocks with several shuffles before the first iteration and
then moves factors between blocks with two shuffles per iteration; on 5M pairs of rank 10 about
half of its fit is block building. :func:`fit_collective_als` solves **the same equations** in one
barrier job (the plumbing of :mod:`inboxlift.models.collective`):

- The pairs are hash-partitioned by user, once, into as many partitions as the cluster has task
  slots. Each task keeps its users' pairs as one sparse matrix (users x items) and its users'
  factors; **user factors never leave their task** until the fit ends.
- Item step (driver): each task sends, for every item, the sums over its own users that item's
  normal equations need (``sum (c-1) x xᵀ`` packed as the upper triangle, ``sum c x``) and its
  users' Gram matrix ``XᵀX``; the driver adds them up and solves every item's system.
- User step (tasks): the driver sends the item factors; each task solves its users' systems.
- At the end each task yields its users' factors (the job's output, written as Parquet under the
  checkpoint directory) and the driver makes the item factors a DataFrame; both become a Spark ML
  ``ALSModel``, so scoring, saving, MLflow and the blocked top-k work as with Spark's own fit.

The equations are Spark's implicit ALS (Hu, Koren and Volinsky, with Spark's extension to
negative ratings): for a user with pairs (item i, rating r), ``c - 1 = alpha * |r|``, preference
1 where r > 0, and

    (YᵀY + sum_i (c_i - 1) y_i y_iᵀ + regParam * n I) x = sum_{i: r_i > 0} c_i y_i

with n the user's number of positive ratings (ALS-WR scaling, as Spark does); items likewise.
Each system is solved exactly (LAPACK's LU, float64; Spark uses Cholesky: the same solution up to
rounding). Iterations go as Spark's: items from users,
then users from items. Initial user factors are Gaussian, normalised to length 1, drawn from a
counter-based hash of (seed, user id), so a fit gives the same factors however the users are
partitioned (Spark's initial factors depend on its blocks; the two fits start from different points
of the same distribution).

What travels per iteration: ``tasks x items x (rank (rank + 3) / 2 + ...)`` float64 towards the
driver and ``items x rank`` back to each task, independent of the number of users: 20,000 items of
rank 10 are 10 MB per task. When the tasks report a catalogue whose sums would pass
``MAX_ITEM_SUMS_BYTES`` per task, the fit stops with :class:`CatalogueTooLarge` before any step
(``fit_als`` then fits with Spark's ALS and says so).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from inboxlift.models.collective import (
    DEFAULT_TIMEOUT_S, OP_HELLO, Tasks, UnusableInput, recv_message, report_unusable, run_collective,
    send_message, spark_context, task_connection, task_slots,
)

OP_SETUP, OP_ITEM_SUMS, OP_USERS, OP_STOP = range(2, 6)
MAX_ITEM_SUMS_BYTES = 512 * 1024 ** 2   # one task's item sums per iteration, above which Spark's ALS is used
FACTOR_BATCH_ROWS = 65_536              # user factors per output batch
FACTOR_SCHEMA = pa.schema([("id", pa.int32()), ("features", pa.list_(pa.float32()))])   # ALSModel's factors


class CatalogueTooLarge(ValueError):
    """The item sums a task would send per iteration pass ``MAX_ITEM_SUMS_BYTES``."""


def item_sums_bytes(items: int, rank: int) -> int:
    """What one task sends per iteration: per item, r (r + 1) / 2 packed sums and r right-hand sides, float64."""
    return items * (rank * (rank + 1) // 2 + rank) * 8


# ---- the arithmetic (numpy; tested without Spark) ---------------------------------------------------

def packed_outer(factors: np.ndarray) -> np.ndarray:
    """Each row's outer product ``f fᵀ``, its upper triangle packed row by row: (n, r (r + 1) / 2)."""
    upper = np.triu_indices(factors.shape[1])
    return factors[:, upper[0]] * factors[:, upper[1]]


def solve_normal(packed: np.ndarray, gram: np.ndarray, reg: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``(unpacked + gram + diag(reg)) x = rhs`` for every row (LAPACK, batched).

    Args:
        packed: (n, r (r + 1) / 2) upper triangles, row by row (:func:`packed_outer` sums);
        gram: (r, r) added to every system; reg: (n,) added to every diagonal; rhs: (n, r).
    """
    n, rank = rhs.shape
    upper = np.triu_indices(rank)
    systems = np.empty((n, rank, rank))
    systems[:, upper[0], upper[1]] = packed
    systems[:, upper[1], upper[0]] = packed
    systems += gram
    systems[:, np.arange(rank), np.arange(rank)] += reg[:, None]
    try:
        return np.linalg.solve(systems, rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        # A singular system (fewer users than the rank, and no positive rating to regularise it):
        # the least-squares solution of smallest norm, for the whole batch.
        return (np.linalg.pinv(systems, hermitian=True) @ rhs[:, :, None])[:, :, 0]


def initial_factors(ids: np.ndarray, rank: int, seed: int) -> np.ndarray:
    """Gaussian vectors of length 1, one per id, from a hash of (seed, id, component): the same for
    an id whichever task draws it."""
    counters = (ids.astype(np.uint64)[:, None] * np.uint64(2 * rank) + np.arange(2 * rank, dtype=np.uint64))
    bits = _splitmix64(counters ^ _splitmix64(np.full(1, seed, dtype=np.uint64)))
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)   # in (0, 1)
    u1, u2 = uniform[:, :rank], uniform[:, rank:]
    gaussian = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)                   # Box-Muller
    return gaussian / np.linalg.norm(gaussian, axis=1, keepdims=True)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class PartitionRatings:
    """One task's users: their pairs as sparse matrices and their factors, and the steps on them."""

    def __init__(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, *, n_items: int, rank: int,
                 alpha: float, seed: int) -> None:
        # Rows grouped by user (CSR); a duplicate pair stays two entries and the products add both,
        # as Spark adds every rating row to its user's equations.
        order = np.argsort(users)
        grouped = users[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if grouped.size else np.empty(0, np.int64)
        self.user_ids = grouped[starts]
        indptr = np.r_[starts, grouped.size].astype(np.int64)
        columns, ratings = items[order], ratings[order]
        shape = (self.user_ids.size, n_items)
        c1 = alpha * np.abs(ratings)
        positive = (ratings > 0).astype(np.float64)
        self.c1 = sp.csr_matrix((c1, columns, indptr), shape=shape)
        self.weight = sp.csr_matrix((positive * (1.0 + c1), columns, indptr), shape=shape)
        self.positives = np.add.reduceat(positive, starts) if starts.size else np.empty(0)
        self.item_positives = np.bincount(columns, weights=positive, minlength=n_items)
        self.item_seen = np.bincount(columns, minlength=n_items).astype(np.float64)
        self.factors = initial_factors(self.user_ids, rank, seed)

    def item_sums(self) -> list[np.ndarray]:
        x = self.factors
        # c1.T is the CSC view of the same arrays: scipy then walks the users in order and adds into
        # the items' rows (8.8 MB for 20,000 items of rank 10, in cache), four times faster than
        # gathering users' rows through a transposed copy.
        return [self.c1.T @ packed_outer(x), self.weight.T @ x, x.T @ x]

    def solve_users(self, item_factors: np.ndarray, reg: float) -> None:
        if not self.user_ids.size:
            return
        y = item_factors
        self.factors = solve_normal(self.c1 @ packed_outer(y), y.T @ y, reg * self.positives, self.weight @ y)

    def answer(self, op: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if op == OP_SETUP:
            return [self.item_positives, self.item_seen]
        if op == OP_ITEM_SUMS:
            return self.item_sums()
        if op == OP_USERS:
            self.solve_users(arrays[0], float(arrays[1][0]))
            return []
        raise ValueError(f"ALS: unknown step {op}")


@dataclass
class ItemSolution:
    factors: np.ndarray      # (n_items, rank)
    seen: np.ndarray         # (n_items,) bool: the item has pairs (it gets a row in itemFactors)


def fit_items(tasks, *, n_items: int, rank: int, reg: float, max_iter: int,
              setup: Sequence[np.ndarray] = ()) -> ItemSolution:
    """The driver's loop over connected tasks (anything with ``ask(op, arrays)``, see :class:`Tasks`);
    ``setup`` goes with the first step (over sockets: the fit's settings, see :func:`serve_ratings`)."""
    setup = tasks.ask(OP_SETUP, list(setup))
    positives = np.sum([a[0] for a in setup], axis=0)
    seen = np.sum([a[1] for a in setup], axis=0) > 0
    items = np.zeros((n_items, rank))
    for _ in range(max_iter):
        answers = tasks.ask(OP_ITEM_SUMS, [])
        packed = np.sum([a[0] for a in answers], axis=0)
        rhs = np.sum([a[1] for a in answers], axis=0)
        gram = np.sum([a[2] for a in answers], axis=0)
        # Only items with pairs are solved (and kept); an index without pairs stays 0.
        items[seen] = solve_normal(packed[seen], gram, reg * positives[seen], rhs[seen])
        tasks.ask(OP_USERS, [items, np.array([reg])])
    return ItemSolution(factors=items, seen=seen)


# ---- the task's side -------------------------------------------------------------------------------

def partition_pairs(batches: Iterable[pa.RecordBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) of a partition's ``user, item, rating`` batches; UnusableInput says what is wrong."""
    users, items, ratings = [], [], []
    for batch in batches:
        if batch.num_rows == 0:
            continue
        nulls = sum(batch.column(i).null_count for i in range(3))
        if nulls:
            raise UnusableInput(f"{nulls} null user ids, item ids or ratings")
        users.append(batch.column(0).to_numpy().astype(np.int64))
        items.append(batch.column(1).to_numpy().astype(np.int64))
        ratings.append(batch.column(2).to_numpy().astype(np.float64))
    if not users:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    users, items, ratings = np.concatenate(users), np.concatenate(items), np.concatenate(ratings)
    if (users < 0).any() or (items < 0).any():
        raise UnusableInput("user and item ids must be non-negative (ALS indexes them)")
    if not np.isfinite(ratings).all():
        raise UnusableInput("ratings hold NaN or infinite values")
    return users, items, ratings


def _factor_batches(ids: np.ndarray, factors: np.ndarray) -> Iterator[pa.RecordBatch]:
    rank = factors.shape[1]
    for start in range(0, ids.size, FACTOR_BATCH_ROWS):
        part = slice(start, start + FACTOR_BATCH_ROWS)
        values = pa.array(factors[part].astype(np.float32).ravel())
        offsets = pa.array(np.arange(0, len(values) + 1, rank, dtype=np.int32))
        features = pa.ListArray.from_arrays(offsets, values)
        yield pa.RecordBatch.from_arrays([pa.array(ids[part].astype(np.int32)), features], schema=FACTOR_SCHEMA)


def serve_ratings(batches: Iterator[pa.RecordBatch], *, address: tuple[str, int], token: bytes,
                  timeout: float) -> Iterator[pa.RecordBatch]:
    """The barrier task: load the partition's pairs, answer the driver's steps, yield the users' factors."""
    sock, partition, tasks = task_connection(address=address, token=token, timeout=timeout)
    with sock:
        try:
            users, items, ratings = partition_pairs(batches)
        except UnusableInput as error:
            report_unusable(sock, partition, tasks, error)
            raise
        n_items = int(items.max()) + 1 if items.size else 0
        send_message(sock, OP_HELLO, [np.array([partition, tasks, users.size, n_items])])
        op, arrays = recv_message(sock)   # the settings, once every task has said how many items it saw
        n_items, rank, alpha, seed = (int(arrays[0][0]), int(arrays[0][1]), float(arrays[0][2]), int(arrays[0][3]))
        part = PartitionRatings(users, items, ratings, n_items=n_items, rank=rank, alpha=alpha, seed=seed)
        send_message(sock, op, part.answer(op, arrays))
        while True:
            op, arrays = recv_message(sock)
            if op == OP_STOP:
                break
            send_message(sock, op, part.answer(op, arrays))
    yield from _factor_batches(part.user_ids, part.factors)


# ---- the driver ------------------------------------------------------------------------------------

_FOLDERS: dict[str, str] = {}   # model uid -> its user-factor folder, for this process's collective fits


def release_factors(model: ALSModel) -> None:
    """Delete the user-factor folder of a collective fit that is done with (a tuning candidate, once
    scored); the model cannot be used afterwards. Models of Spark's ALS: nothing to do."""
    folder = _FOLDERS.pop(model.uid, None)
    if folder is None:
        return
    spark = model.userFactors.sparkSession
    path = spark._jvm.org.apache.hadoop.fs.Path(folder)  # noqa: SLF001 - Hadoop's FileSystem: any store
    path.getFileSystem(spark._jsc.hadoopConfiguration()).delete(path, True)  # noqa: SLF001


def _factors_folder(spark) -> str:
    """A new folder for one fit's user factors, under the checkpoint directory (else the warehouse)."""
    base = spark.sparkContext.getCheckpointDir() or spark.conf.get("spark.sql.warehouse.dir")
    return f"{base.rstrip('/')}/als-user-factors-{secrets.token_hex(8)}"


def fit_collective_als(ratings: DataFrame, *, user_col: str, item_col: str, rating_col: str, rank: int,
                       max_iter: int, reg_param: float, alpha: float, seed: int,
                       timeout: float = DEFAULT_TIMEOUT_S) -> ALSModel:
    """Implicit ALS on ``ratings`` in one barrier job; a Spark ML ``ALSModel`` (userCol/itemCol set)."""
    context = spark_context(ratings, name="ALS", instead="set recommend.als_solver: spark")
    if rank <= 0 or max_iter <= 0 or reg_param < 0 or alpha < 0:
        raise ValueError(f"ALS: rank and max_iter must be positive, reg_param and alpha non-negative; got "
                         f"rank={rank}, max_iter={max_iter}, reg_param={reg_param}, alpha={alpha}")
    pairs = (ratings.select(F.col(user_col).cast("long"), F.col(item_col).cast("long"),
                            F.col(rating_col).cast("double"))
             .repartition(task_slots(context), F.col(user_col)))
    solution: dict[str, ItemSolution] = {}

    def driver(tasks: Tasks) -> None:
        n_items = max(int(hello[0][3]) for hello in tasks.hellos)
        if n_items == 0:
            raise ValueError("ALS: no ratings to fit")
        if item_sums_bytes(n_items, rank) > MAX_ITEM_SUMS_BYTES:
            raise CatalogueTooLarge(f"ALS: {n_items:,d} items of rank {rank} would need "
                                    f"{item_sums_bytes(n_items, rank) / 2**20:,.0f} MiB of sums per task (limit "
                                    f"{MAX_ITEM_SUMS_BYTES / 2**20:,.0f})")
        solution["items"] = fit_items(tasks, n_items=n_items, rank=rank, reg=reg_param, max_iter=max_iter,
                                      setup=[np.array([n_items, rank, alpha, seed])])

    # The job's output (each task's user factors) is written where Spark keeps checkpoints: a
    # DataFrame that still depended on the barrier job could not be read in part (limit) and would
    # re-run the job, with no driver to answer, if a block were lost.
    spark = ratings.sparkSession
    folder = _factors_folder(spark)
    run_collective(pairs, serve_ratings, from_arrow_schema(FACTOR_SCHEMA), driver, stop_op=OP_STOP, name="ALS",
                   timeout=timeout, finish=lambda frame: frame.write.mode("error").parquet(folder))
    user_factors = spark.read.parquet(folder)
    items = solution["items"]
    ids = np.flatnonzero(items.seen)
    item_table = pa.Table.from_batches(list(_factor_batches(ids, items.factors[ids])), schema=FACTOR_SCHEMA)
    item_factors = spark.createDataFrame(item_table)
    uid = f"ALSModel_collective_{secrets.token_hex(6)}"
    java_model = spark._jvm.org.apache.spark.ml.recommendation.ALSModel(  # noqa: SLF001 - no Python constructor
        uid, rank, user_factors._jdf, item_factors._jdf)
    _FOLDERS[uid] = folder
    model = ALSModel(java_model)
    model._set(userCol=user_col, itemCol=item_col, coldStartStrategy="drop")  # noqa: SLF001
    model._transfer_params_to_java()  # noqa: SLF001
    return model
