"""User feature distributions and the RFM grid (``notebooks/features.py``)."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.schemas import require_columns

NO_PURCHASE = "no purchase"


def feature_histograms(user_features: DataFrame, columns: Sequence[str], *, bins: int = 20) -> dict[str, pd.DataFrame]:
    """Per column: equal-width bins between its min and max, with users per bin (nulls in their own row).

    Returns:
        column -> DataFrame ``bin_low``, ``bin_high``, ``users`` (``bin_low`` null for the null row).
    """
    require_columns(user_features, list(columns), step="feature_histograms")
    ranges = user_features.agg(*[F.min(c).cast("double").alias(f"{c}__min") for c in columns],
                               *[F.max(c).cast("double").alias(f"{c}__max") for c in columns]).first()
    widths = {}
    for column in columns:
        low, high = ranges[f"{column}__min"], ranges[f"{column}__max"]
        widths[column] = (low, (high - low) / bins if low is not None and high > low else 1.0)

    def bin_of(column: str) -> Any:
        low, width = widths[column]
        if low is None:
            return F.lit(None).cast("int")
        index = F.least(F.floor((F.col(column).cast("double") - F.lit(low)) / F.lit(width)), F.lit(bins - 1))
        # least() skips nulls: a user without a value would land in the last bin.
        return F.when(F.col(column).isNotNull(), index).cast("int")

    # Every column's bins in one job: (column, bin) pairs exploded per user, then counted.
    pairs = F.explode(F.array(*[F.struct(F.lit(c).alias("feature"), bin_of(c).alias("bin")) for c in columns]))
    counts = (user_features.select(pairs.alias("pair")).select("pair.feature", "pair.bin")
              .groupBy("feature", "bin").count().toPandas())   # at most (bins + 1) rows per column
    out = {}
    for column in columns:
        low, width = widths[column]
        mine = counts[counts["feature"] == column].sort_values("bin", na_position="last")
        out[column] = pd.DataFrame({
            "bin_low": [None if pd.isna(b) else low + b * width for b in mine["bin"]],
            "bin_high": [None if pd.isna(b) else low + (b + 1) * width for b in mine["bin"]],
            "users": mine["count"].astype(int).tolist(),
        })
    return out


def _score(column: str, edges: Sequence[float], *, higher_is_better: bool) -> Any:
    """1..len(edges)+1 by how many quantile edges the value exceeds (reversed where lower is better)."""
    above = sum((F.col(column) > F.lit(edge)).cast("int") for edge in edges) if edges else F.lit(0)
    score = F.lit(1) + above
    return score if higher_is_better else F.lit(len(edges) + 2) - score


def rfm_grid(user_features: DataFrame, *, recency: str, frequency: str, monetary: str,
             quantiles: int = 5) -> pd.DataFrame:
    """Users by recency score (5 = bought most recently) and frequency score, with their mean spend.

    Scores are quantile buckets of buyers (approximate quantiles, 1% error); users without an order
    (frequency 0 or null: their recency is their tenure, not a purchase) are one row of their own.

    Returns:
        ``r_score``, ``f_score`` (strings; "no purchase" for non-buyers), ``users``, ``mean_monetary``.
    """
    require_columns(user_features, [recency, frequency, monetary], step="rfm_grid")
    is_buyer = F.coalesce(F.col(frequency), F.lit(0)) > 0
    buyers = user_features.where(is_buyer)
    probabilities = [i / quantiles for i in range(1, quantiles)]
    r_edges, f_edges = buyers.approxQuantile([recency, frequency], probabilities, 0.01) \
        if not buyers.isEmpty() else ([], [])
    r_edges, f_edges = sorted(set(r_edges)), sorted(set(f_edges))
    r_score = F.when(~is_buyer, F.lit(NO_PURCHASE)).otherwise(
        _score(recency, r_edges, higher_is_better=False).cast("string"))
    f_score = F.when(~is_buyer, F.lit(NO_PURCHASE)).otherwise(
        _score(frequency, f_edges, higher_is_better=True).cast("string"))
    grid = (user_features.groupBy(r_score.alias("r_score"), f_score.alias("f_score"))
            .agg(F.count(F.lit(1)).alias("users"), F.avg(monetary).alias("mean_monetary"))
            .orderBy("r_score", "f_score"))
    return grid.toPandas()   # at most quantiles**2 + 1 rows


def plot_histograms(histograms: dict[str, pd.DataFrame]):
    """One bar chart per feature (non-null bins)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 2.6 * ((len(histograms) + 2) // 3)))
    for i, (column, bins) in enumerate(histograms.items()):
        axes = figure.add_subplot((len(histograms) + 2) // 3, 3, i + 1)
        shown = bins.dropna(subset=["bin_low"])
        widths = (shown["bin_high"] - shown["bin_low"]).tolist()
        axes.bar(shown["bin_low"].tolist(), shown["users"].tolist(), width=widths, align="edge")
        axes.set_title(column, fontsize=9)
        axes.set_ylabel("users", fontsize=8)
    figure.tight_layout()
    return figure


def plot_rfm_grid(grid: pd.DataFrame):
    """Heat map of users per recency x frequency score among buyers."""
    from matplotlib.figure import Figure

    buyers = grid[grid["r_score"] != NO_PURCHASE]
    table = buyers.pivot(index="r_score", columns="f_score", values="users").fillna(0).sort_index(ascending=False)
    figure = Figure(figsize=(5.5, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(table.to_numpy(), cmap="Blues")
    axes.set_xticks(range(len(table.columns)), table.columns)
    axes.set_yticks(range(len(table.index)), table.index)
    axes.set_xlabel("frequency score")
    axes.set_ylabel("recency score (higher: more recent)")
    for (y, x), users in pd.DataFrame(table.to_numpy()).stack().items():
        axes.text(x, y, f"{int(users)}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="users")
    figure.tight_layout()
    return figure
