"""Ranking metrics at k, computed by Spark ML's ``RankingEvaluator``, and the result of one evaluation.

For a user with relevant set R (|R| >= 1) and top-k list L, ``rel_i = 1`` when the item at rank i is
in R; each metric is the mean over the evaluated users (users with no recommendation count 0):

- ``precision_at_k = |L ∩ R| / k`` (Spark's ``precisionAtK``);
- ``recall_at_k = |L ∩ R| / |R|`` (``recallAtK``);
- ``ndcg_at_k = DCG / IDCG`` with binary gains (``ndcgAtK``);
- ``map_at_k``: AP@k = ``(1 / min(k, |R|)) * sum_i rel_i * precision_at_i`` (``meanAveragePrecisionAtK``);
- ``catalog_coverage_at_k``: distinct items in the top-k lists over the items in the training data —
  not a per-user ranking metric, so ``RankingEvaluator`` has none; computed here in the same pass
  that builds the lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.ml.evaluation import RankingEvaluator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.models.recommend.data import ITEM_IDX, USER_IDX
from inboxlift.session import materialize
from inboxlift.schemas import require_columns

METRICS = ("precision", "recall", "ndcg", "map", "catalog_coverage")
# The metrics RankingEvaluator computes, by its names.
EVALUATOR_METRICS = {"precision": "precisionAtK", "recall": "recallAtK", "ndcg": "ndcgAtK",
                     "map": "meanAveragePrecisionAtK"}


def metric_name(metric: str, k: int) -> str:
    """``ndcg`` -> ``ndcg_at_10``: MLflow names may not hold ``@``."""
    return f"{metric}_at_{k}"


@dataclass(frozen=True)
class RankingMetrics:
    """Mean ranking metrics at k over the evaluated users (definitions in the module docstring)."""

    k: int
    users: int
    precision: float
    recall: float
    ndcg: float
    map: float
    catalog_coverage: float

    def named(self, prefix: str) -> dict[str, float]:
        """``{"<prefix>/precision_at_10": ..., ...}``: the exact MLflow metric names."""
        return {f"{prefix}/{metric_name(m, self.k)}": float(getattr(self, m)) for m in METRICS}


def ranked_lists(recommended: DataFrame, relevant: DataFrame, *, users: DataFrame, k: int) -> DataFrame:
    """One row per evaluated user with a relevant item: ``user_idx, prediction, label``.

    ``prediction``: the user's top-k items in rank order (empty when nothing was recommended);
    ``label``: the relevant items. Both ``array<double>``, as ``RankingEvaluator`` reads them.
    """
    require_columns(recommended, [USER_IDX, "rank", ITEM_IDX], step="ranked_lists (recommended)")
    require_columns(relevant, [USER_IDX, ITEM_IDX], step="ranked_lists (relevant)")
    evaluated = users.select(USER_IDX).distinct()
    labels = (relevant.select(USER_IDX, ITEM_IDX).distinct().join(evaluated, on=USER_IDX, how="inner")
              .groupBy(USER_IDX).agg(F.array_sort(F.collect_list(F.col(ITEM_IDX).cast("double"))).alias("label")))
    top = recommended.where(F.col("rank") <= k).select(USER_IDX, F.struct("rank", ITEM_IDX).alias("_r"))
    predictions = top.groupBy(USER_IDX).agg(F.array_sort(F.collect_list("_r")).alias("_rs"))
    return labels.join(predictions, on=USER_IDX, how="left").select(
        USER_IDX, F.coalesce(F.transform("_rs", lambda r: r[ITEM_IDX].cast("double")),
                             F.array().cast("array<double>")).alias("prediction"), "label")


def ranking_metrics(recommended: DataFrame, relevant: DataFrame, *, users: DataFrame, k: int,
                    catalog_size: int, metrics: tuple[str, ...] = tuple(EVALUATOR_METRICS)) -> RankingMetrics:
    """Precision, recall, NDCG and MAP at ``k`` (``RankingEvaluator``) and catalogue coverage.

    Args:
        recommended: ``user_idx, rank, item_idx`` (ranks 1.. distinct per user); ranks above k are ignored.
        relevant: ``user_idx, item_idx``.
        users: the evaluated users (``user_idx``); each must have a relevant item to count.
        catalog_size: the coverage denominator.
        metrics: the evaluator metrics wanted (the tuning search asks for ``("ndcg",)`` alone); the
            others are reported as NaN.
    """
    lists = materialize(ranked_lists(recommended, relevant, users=users, k=k))
    try:
        # One job counts the users and the distinct items recommended (and fills the cache); each
        # metric then reads the cached lists.
        n_users, covered = _users_and_coverage(lists)
        values = {m: float("nan") for m in EVALUATOR_METRICS}
        for metric in metrics:
            values[metric] = (RankingEvaluator(metricName=EVALUATOR_METRICS[metric], k=k, predictionCol="prediction",
                                               labelCol="label").evaluate(lists) if n_users else 0.0)
    finally:
        lists.unpersist()
    return RankingMetrics(k=k, users=n_users, catalog_coverage=covered / catalog_size if catalog_size else 0.0,
                          **values)


def _users_and_coverage(lists: DataFrame) -> tuple[int, int]:
    items = lists.select(F.explode("prediction").alias("_item")).agg(F.count_distinct("_item").alias("covered"))
    row = lists.agg(F.count(F.lit(1)).alias("users")).crossJoin(items).first()   # one row, one job
    return int(row["users"]), int(row["covered"])


@dataclass(frozen=True)
class Evaluation:
    """Every model's metrics on one split (recommenders and baselines), for the same users."""

    split: str
    metrics: dict[str, RankingMetrics]
    users_evaluated: int
    users_with_relevant: int

    @property
    def users_evaluated_share(self) -> float:
        return self.users_evaluated / self.users_with_relevant if self.users_with_relevant else 0.0

    def named(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for model, metrics in self.metrics.items():
            out.update(metrics.named(f"{self.split}/{model}"))
        out[f"{self.split}/users_evaluated"] = float(self.users_evaluated)
        out[f"{self.split}/users_with_relevant_items"] = float(self.users_with_relevant)
        out[f"{self.split}/users_evaluated_share"] = self.users_evaluated_share
        return out

    def table(self) -> list[str]:
        k = next(iter(self.metrics.values())).k
        names = [metric_name(m, k) for m in METRICS]
        lines = [f"  {'model':<21}" + "".join(f"{n:>{len(n) + 2}}" for n in names)]
        for model, m in self.metrics.items():
            values = [f"{getattr(m, x):>{len(n) + 2}.4f}" for x, n in zip(METRICS, names)]
            lines.append(f"  {model:<21}" + "".join(values))
        lines.append(f"  users evaluated: {self.users_evaluated} of {self.users_with_relevant} with relevant items "
                     f"({self.users_evaluated_share:.1%})")
        return lines
