"""Agreement between two clusterings of the same rows, computed with Spark aggregates.

The adjusted Rand index (Hubert and Arabie, 1985) compares two labelings of the same rows, 1.0 for
identical partitions (whatever the label values), about 0.0 for independent ones. Spark computes
the contingency table (one ``groupBy`` over the two label columns); the formula then runs on that
small table on the driver. The table has at most ``k_left * k_right`` rows, whatever the number of
users.
"""

from __future__ import annotations

import itertools
from collections import Counter
from math import comb
from typing import Hashable, Mapping, Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.schemas import require_columns


def ari_from_contingency(counts: Mapping[tuple[Hashable, Hashable], int]) -> float:
    """The adjusted Rand index of a contingency table ``{(left_label, right_label): rows}``.

    Degenerate tables (fewer than two rows, or both sides one cluster each) give 1.0, as
    scikit-learn's ``adjusted_rand_score`` does: the two labelings cannot disagree there.
    """
    n = sum(counts.values())
    left: Counter = Counter()
    right: Counter = Counter()
    for (a, b), rows in counts.items():
        left[a] += rows
        right[b] += rows
    # Integer pair counts keep the formula exact until the last division.
    index = sum(comb(rows, 2) for rows in counts.values())
    left_pairs = sum(comb(rows, 2) for rows in left.values())
    right_pairs = sum(comb(rows, 2) for rows in right.values())
    total_pairs = comb(n, 2)
    if total_pairs == 0:
        return 1.0
    expected = left_pairs * right_pairs / total_pairs
    maximum = (left_pairs + right_pairs) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def contingency_counts(df: DataFrame, *, columns: Sequence[str]) -> dict[tuple, int]:
    """``{(label_1, ..., label_m): rows}`` over rows where no label is null (one Spark aggregation)."""
    require_columns(df, columns, step="contingency_counts")
    # One row per distinct label combination: bounded by the product of the cluster counts.
    rows = df.dropna(subset=list(columns)).groupBy(*columns).agg(F.count(F.lit(1)).alias("_rows")).collect()
    return {tuple(r[c] for c in columns): int(r["_rows"]) for r in rows}


def adjusted_rand_index(df: DataFrame, *, left: str, right: str) -> float:
    """The adjusted Rand index between label columns ``left`` and ``right`` (rows with a null label ignored)."""
    return ari_from_contingency(contingency_counts(df, columns=[left, right]))


def pairwise_adjusted_rand_index(df: DataFrame, *, columns: Sequence[str]) -> dict[tuple[str, str], float]:
    """The adjusted Rand index of every pair of ``columns``, from a single joint contingency table.

    One aggregation over all columns at once replaces one pass per pair; the joint table is
    marginalised per pair on the driver.
    """
    if len(columns) < 2:
        return {}
    joint = contingency_counts(df, columns=columns)
    result = {}
    for i, j in itertools.combinations(range(len(columns)), 2):
        pair: Counter = Counter()
        for labels, rows in joint.items():
            pair[(labels[i], labels[j])] += rows
        result[(columns[i], columns[j])] = ari_from_contingency(pair)
    return result
