"""Implicit-feedback ALS with Spark ML: hyperparameters, the fit's cluster settings, cached ratings, top-k.

Every fit is ``pyspark.ml.recommendation.ALS(implicitPrefs=True)``. What makes it fast is Spark's own
knobs, chosen as docs/recommend.md#making-spark-als-fast measured them:

- ``numUserBlocks`` / ``numItemBlocks`` sized to the cluster's task slots and the data
  (:func:`als_blocks`), read without ``sparkContext`` so it also works on Spark Connect;
- the storage levels of ALS's intermediate and final RDDs, and ``checkpointInterval`` (the checkpoint
  directory is the session's ``spark.checkpoint.dir``);
- ratings prepared once per confidence weight set and cached for every fit of the tuning search
  (:class:`RatingsCache`), with the column types ALS wants, so no fit repeats the aggregation of
  events or the id joins.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from inboxlift.models.recommend.data import CONFIDENCE, ITEM_IDX, USER_IDX, with_confidence
from inboxlift.models.similar import top_k_blocked
from inboxlift.settings import RecommendSettings
from inboxlift.schemas import require_columns
from inboxlift.session import is_connect_session, master_of, spark_storage_level

# Rows of the range whose partitions tell how many task slots the cluster has (see task_slots).
_SLOT_PROBE_ROWS = 1 << 16


@dataclass(frozen=True)
class AlsParams:
    """One ALS model: the hyperparameters tuned on validation, and the confidence weights."""

    rank: int
    reg_param: float
    alpha: float
    weights: tuple[float, float, float]
    max_iter: int = 10
    seed: int = 42

    @property
    def label(self) -> str:
        w = "/".join(f"{x:g}" for x in self.weights)
        return (f"rank={self.rank} reg={self.reg_param:g} alpha={self.alpha:g} weights={w} "
                f"iterations={self.max_iter}")

    def as_params(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}.{k}": json.dumps(list(v)) if isinstance(v, tuple) else str(v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, str], prefix: str) -> "AlsParams | None":
        """The params :meth:`as_params` wrote, or None when a run does not have them."""
        try:
            return cls(rank=int(params[f"{prefix}.rank"]), reg_param=float(params[f"{prefix}.reg_param"]),
                       alpha=float(params[f"{prefix}.alpha"]),
                       weights=tuple(float(x) for x in json.loads(params[f"{prefix}.weights"])),
                       max_iter=int(params[f"{prefix}.max_iter"]), seed=int(params[f"{prefix}.seed"]))
        except (KeyError, ValueError, TypeError):
            return None


@dataclass(frozen=True)
class AlsFitSettings:
    """How Spark runs a fit (not what it fits): blocks, storage levels, checkpoints.

    Resolved once per run for the cluster and the data (:func:`fit_settings`); every fit of the run
    uses the same, so a fit's result depends only on its :class:`AlsParams` and the data.
    """

    num_user_blocks: int
    num_item_blocks: int
    intermediate_storage_level: str = "MEMORY_AND_DISK"
    final_storage_level: str = "MEMORY_AND_DISK"
    checkpoint_interval: int = 10

    def as_params(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}.{k}": str(v) for k, v in asdict(self).items()}


# A local master: local, local[N], local[*], local[N,F], local[*,F]; a local test cluster:
# local-cluster[executors,cores,memory].
_LOCAL = re.compile(r"local(?:\[\s*(?P<threads>\d+|\*)\s*(?:,\s*\d+\s*)?\])?")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(?P<executors>\d+)\s*,\s*(?P<cores>\d+)\s*,\s*\d+\s*\]")


def local_task_slots(master: str, *, cpus: int | None = None, on_this_machine: bool = True) -> int | None:
    """The tasks a local master runs at once (its threads; ``*`` is this machine's cores, or
    ``cpus``), or None when ``master`` is not local (a cluster's slots are asked of Spark,
    :func:`task_slots`) and for ``*`` when the master is not ``on_this_machine`` (a Spark Connect
    client cannot count the server's cores)."""
    master = master.strip()
    cluster = _LOCAL_CLUSTER.fullmatch(master)
    if cluster:
        return int(cluster["executors"]) * int(cluster["cores"])
    local = _LOCAL.fullmatch(master)
    if not local:
        return None
    threads = local["threads"]
    if threads is None:
        return 1
    if threads == "*":
        if cpus is None and not on_this_machine:
            return None
        return max(1, cpus if cpus is not None else (os.cpu_count() or 1))
    return max(1, int(threads))


def task_slots(spark: SparkSession) -> int:
    """The cluster's task slots, the tasks it runs at once, without ``sparkContext`` (Spark Connect too).

    A local master's threads (``local[2]``: 2; ``local[*]``: the cores, counted here unless the
    session is a Spark Connect client) when the master is local: the local session sets
    ``spark.default.parallelism`` to twice the cores for its shuffles, which is not how many tasks
    run at once. Otherwise ``spark.default.parallelism`` when the session sets it; else the number
    of partitions Spark gives a range, which is its default parallelism (the executors' cores on a
    cluster, ``spark.sql.leafNodeDefaultParallelism`` when set): a one-row aggregate.
    """
    local = local_task_slots(master_of(spark), on_this_machine=not is_connect_session(spark))
    if local is not None:
        return local
    configured = spark.conf.get("spark.default.parallelism", None)
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            pass
    probe = spark.range(_SLOT_PROBE_ROWS).select(F.spark_partition_id().alias("p")).agg(F.max("p").alias("top"))
    return int(probe.first()["top"]) + 1


def als_blocks(*, pairs: int, slots: int, min_pairs_per_block: int) -> int:
    """ALS blocks for ``pairs`` ratings on ``slots`` task slots.

    One block per slot keeps every core busy in each iteration's user and item steps; fewer blocks
    when the data is small, since each block pair costs a shuffle block and a task whatever its size
    (docs/recommend.md measured both). Never fewer than 1.
    """
    by_data = max(1, math.ceil(pairs / max(1, min_pairs_per_block)))
    return max(1, min(slots, by_data))


def fit_settings(settings: RecommendSettings, *, pairs: int, slots: int) -> AlsFitSettings:
    """A fit's settings: blocks from settings, or (0) sized to ``slots`` task slots and ``pairs`` ratings."""
    def sized(configured: int) -> int:
        if configured > 0:
            return configured
        return als_blocks(pairs=pairs, slots=slots, min_pairs_per_block=settings.als_min_pairs_per_block)

    return AlsFitSettings(num_user_blocks=sized(settings.num_user_blocks),
                          num_item_blocks=sized(settings.num_item_blocks),
                          intermediate_storage_level=settings.intermediate_storage_level,
                          final_storage_level=settings.final_storage_level,
                          checkpoint_interval=settings.checkpoint_interval)


def checkpoint_dir(spark: SparkSession) -> str | None:
    """The session's checkpoint directory (``spark.checkpoint.dir``), or None: ALS then skips checkpoints."""
    return spark.conf.get("spark.checkpoint.dir", None) or None


def als_estimator(params: AlsParams, fit: AlsFitSettings) -> ALS:
    """Implicit-feedback ALS on (``user_idx``, ``item_idx``, ``confidence``)."""
    return ALS(
        rank=params.rank, maxIter=params.max_iter, regParam=params.reg_param, alpha=params.alpha,
        implicitPrefs=True, userCol=USER_IDX, itemCol=ITEM_IDX, ratingCol=CONFIDENCE, seed=params.seed,
        coldStartStrategy="drop", nonnegative=False,
        numUserBlocks=fit.num_user_blocks, numItemBlocks=fit.num_item_blocks,
        intermediateStorageLevel=fit.intermediate_storage_level, finalStorageLevel=fit.final_storage_level,
        checkpointInterval=fit.checkpoint_interval,
    )


def ratings_frame(pairs: DataFrame, *, weights: Sequence[float]) -> DataFrame:
    """``user_idx`` int, ``item_idx`` int, ``confidence`` float: the columns and types ALS reads as they are.

    Pairs without a user or an item index (ALS cannot place them) and at confidence 0 are left out.
    """
    require_columns(pairs, [USER_IDX, ITEM_IDX, "view_w", "cart_w", "purchase_w"], step="ratings_frame")
    known = pairs.where(F.col(USER_IDX).isNotNull() & F.col(ITEM_IDX).isNotNull())
    return with_confidence(known, weights=weights).select(
        F.col(USER_IDX).cast("int").alias(USER_IDX), F.col(ITEM_IDX).cast("int").alias(ITEM_IDX),
        F.col(CONFIDENCE).cast("float").alias(CONFIDENCE))


class RatingsCache:
    """ALS ratings per confidence weight set, each prepared once and cached until :meth:`release`.

    The tuning search fits many candidates on the same pairs: each fit then reads the cached ratings
    instead of aggregating events and joining the id maps again.
    """

    def __init__(self, pairs: DataFrame, *, storage_level: str = "MEMORY_AND_DISK") -> None:
        self.pairs = pairs
        self.storage_level = spark_storage_level(storage_level)
        self._frames: dict[tuple[float, ...], DataFrame] = {}
        self._counts: dict[tuple[float, ...], int] = {}
        # Fits running at once (the tuning's rounds) share the cache: the first builds a weight set's
        # ratings, the others wait for it rather than build and cache their own copy.
        self._lock = threading.Lock()

    def ratings(self, weights: Sequence[float]) -> DataFrame:
        key = tuple(float(w) for w in weights)
        with self._lock:
            if key not in self._frames:
                frame = ratings_frame(self.pairs, weights=key).persist(self.storage_level)
                self._counts[key] = frame.count()   # materialised once, here, not inside the first fit
                self._frames[key] = frame
            return self._frames[key]

    def count(self, weights: Sequence[float]) -> int:
        self.ratings(weights)
        return self._counts[tuple(float(w) for w in weights)]

    def release(self) -> None:
        for frame in self._frames.values():
            frame.unpersist()
        self._frames.clear()
        self._counts.clear()


def fit_als(ratings: DataFrame, params: AlsParams, fit: AlsFitSettings) -> ALSModel:
    """Fit Spark ML's implicit ALS on ``user_idx, item_idx, confidence`` (see :func:`ratings_frame`)."""
    require_columns(ratings, [USER_IDX, ITEM_IDX, CONFIDENCE], step="fit_als")
    return als_estimator(params, fit).fit(ratings.select(USER_IDX, ITEM_IDX, CONFIDENCE))


def als_top_k(model: ALSModel, users: DataFrame, *, k: int, block_size: int, chunk_size: int,
              exclusions: DataFrame | None = None, candidate_items: DataFrame | None = None) -> DataFrame:
    """Top ``k`` items per user of ``users`` (column ``user_idx``) by ALS score, blocked (no ``recommendForAllUsers``).

    Args:
        exclusions: ``user_idx, item_idx`` pairs never to recommend (seen, bought, disliked).
        candidate_items: ``item_idx`` of the items that may be recommended (default: all the model knows).

    Returns:
        ``user_idx, rank, item_idx, score``; users unknown to the model get no rows.
    """
    queries = model.userFactors.join(users.select(F.col(USER_IDX).alias("id")).distinct(), on="id", how="inner")
    pairs = None
    if exclusions is not None:
        # As pairs, hashed to the users' blocks: no per-user list is built (see models.similar).
        pairs = exclusions.select(F.col(USER_IDX).alias("id"), F.col(ITEM_IDX).alias("excluded_id"))
    candidates = model.itemFactors
    if candidate_items is not None:
        candidates = candidates.join(candidate_items.select(F.col(ITEM_IDX).alias("id")).distinct(), on="id",
                                     how="inner")
    return top_k_blocked(queries, candidates, k=k, block_size=block_size, chunk_size=chunk_size,
                         exclusions=pairs).select(
        F.col("query_id").alias(USER_IDX), "rank", F.col("item_id").alias(ITEM_IDX),
        F.col("score").cast("double").alias("score"))
