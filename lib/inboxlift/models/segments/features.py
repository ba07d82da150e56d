"""The segment features: settings checks, the preprocessing stages, and the hash-picked samples of users.

The preprocessing (one Spark ML ``PipelineModel`` inside the segment pipeline, so scoring applies
exactly what training fitted) is described in ``docs/segments.md``.
"""

from __future__ import annotations

from pyspark.ml import Transformer
from pyspark.ml.feature import PCA, SQLTransformer, StandardScaler, VectorAssembler
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from inboxlift.settings import SegmentSettings

USER_ID = "user_id"
SEGMENT_ID = "segment_id"
SEGMENT_NAME = "segment_name"
DISTANCE = "distance"
PREDICTION = "prediction"

ALGORITHMS = ("kmeans", "bisecting_kmeans")
NUMERIC_ROLES = ("recency", "frequency", "monetary", "order_value", "activity", "inactivity", "open_rate", "tenure")
ROLES = (*NUMERIC_ROLES, "price_band", "categories")

FEATURES_COL = "_seg_features"        # the scaled vector every clusterer reads
ANCHORED_COL = "_seg_anchored"        # the same with the bisecting anchor appended
CLUSTER_COL = "_seg_cluster"          # the clusterer's raw cluster
_SCALED_COL = "_seg_scaled"
_RAW_VECTOR_COL = "_seg_raw"
_ANCHOR_COL = "_seg_anchor"
_HASH_COL = "_seg_hash"

_LONG_SPAN = 1 << 64                  # xxhash64 is a signed 64-bit value: [-2^63, 2^63)


def required_columns(params: SegmentSettings) -> list[str]:
    return [USER_ID, *params.feature_columns]


def check_params(params: SegmentSettings) -> None:
    """Raise ``ValueError`` naming the first inconsistent segment setting."""
    if not params.feature_columns:
        raise ValueError("segments.feature_columns is empty")
    not_features = sorted(set(params.log_columns) - set(params.feature_columns))
    if not_features:
        raise ValueError(f"segments.log_columns {not_features} are not in segments.feature_columns")
    unknown_roles = sorted(set(params.roles) - set(ROLES))
    if unknown_roles:
        raise ValueError(f"segments.roles has unknown roles {unknown_roles}; known: {list(ROLES)}")
    unknown_algorithms = sorted(set(params.algorithms) - set(ALGORITHMS))
    if unknown_algorithms or not params.algorithms:
        raise ValueError(f"segments.algorithms must be some of {list(ALGORITHMS)}, got {params.algorithms}")
    if not 2 <= params.k_min <= params.k_max:
        raise ValueError(f"segments.k_min and k_max must satisfy 2 <= k_min <= k_max, "
                         f"got {params.k_min}, {params.k_max}")
    if params.pca_components < 0 or params.pca_components > len(params.feature_columns):
        raise ValueError(f"segments.pca_components must be 0..{len(params.feature_columns)}, "
                         f"got {params.pca_components}")
    if params.search_sample_rows < params.k_max:
        raise ValueError(f"segments.search_sample_rows must be at least k_max ({params.k_max}), "
                         f"got {params.search_sample_rows}")
    if params.silhouette_sample_rows < 2:
        raise ValueError(f"segments.silhouette_sample_rows must be at least 2, got {params.silhouette_sample_rows}")
    for name in ("search_partition_rows", "search_parallelism"):
        if getattr(params, name) < 1:
            raise ValueError(f"segments.{name} must be at least 1, got {getattr(params, name)}")


def _sql_double(value: float) -> str:
    return f"CAST({float(value)!r} AS DOUBLE)"


def input_name(column: str) -> str:
    """The pipeline's column for ``column`` after null filling and the log: the clusterer's units."""
    return f"_seg_in_{column}"


def preprocessing_stages(params: SegmentSettings) -> list:
    """Unfitted stages turning ``feature_columns`` into the scaled vector ``_seg_features``."""
    logged = set(params.log_columns)
    expressions = []
    for column in params.feature_columns:
        fill = _sql_double(params.null_fill.get(column, 0.0))
        value = f"coalesce(nanvl(CAST(`{column}` AS DOUBLE), {fill}), {fill})"
        if column in logged:
            # log1p is undefined below -1; refunds can make money negative, so clip at 0 first.
            value = f"log1p(greatest({value}, CAST(0.0 AS DOUBLE)))"
        expressions.append(f"{value} AS `{input_name(column)}`")
    stages: list = [
        SQLTransformer(statement=f"SELECT *, {', '.join(expressions)} FROM __THIS__"),
        VectorAssembler(inputCols=[input_name(c) for c in params.feature_columns], outputCol=_RAW_VECTOR_COL),
    ]
    if params.pca_components:
        stages += [StandardScaler(inputCol=_RAW_VECTOR_COL, outputCol=_SCALED_COL, withMean=True, withStd=True),
                   PCA(k=params.pca_components, inputCol=_SCALED_COL, outputCol=FEATURES_COL)]
    else:
        stages.append(StandardScaler(inputCol=_RAW_VECTOR_COL, outputCol=FEATURES_COL, withMean=True, withStd=True))
    return stages


def anchor_stages() -> list[Transformer]:
    """A constant 1.0 appended to the scaled vector, which bisecting K-means needs on centred data.

    Spark's bisecting K-means splits a cluster by nudging its centre by 1e-4 times the centre's
    norm; on centred data the root centre is the origin, the nudge is zero and nothing is ever
    split. The constant makes every centre's norm at least 1 and changes no distance.
    """
    return [SQLTransformer(statement=f"SELECT *, CAST(1.0 AS DOUBLE) AS {_ANCHOR_COL} FROM __THIS__"),
            VectorAssembler(inputCols=[FEATURES_COL, _ANCHOR_COL], outputCol=ANCHORED_COL)]


def user_hash(seed: int) -> Column:
    """``xxhash64(user_id, seed)``: the order in which samples pick users, the same in every run."""
    return F.xxhash64(F.col(USER_ID), F.lit(seed))


def hash_sample(features: DataFrame, *, rows: int, total: int, seed: int) -> DataFrame:
    """About ``rows`` of the ``total`` users of ``features`` (all of them when ``total <= rows``).

    A user is picked when its hash falls in the lowest ``rows / total`` of the hash range: a filter
    where the features are read, with no sort (the search then repartitions the sample). The
    count is ``rows`` give or take about its square root. The picked users have the smallest
    hashes, so :func:`silhouette_sample` of the sample is that of all users whenever the sample holds
    ``silhouette_sample_rows`` users or more.
    """
    if total <= rows:
        return features
    threshold = -(1 << 63) + (_LONG_SPAN * rows) // total
    return features.where(user_hash(seed) < F.lit(threshold))


def silhouette_sample(features: DataFrame, *, rows: int, seed: int) -> DataFrame:
    """At most ``rows`` users: those with the smallest ``xxhash64(user_id, seed)`` (user id breaks ties).

    A hash, not ``sample()``: the same users are picked in every run and on every partitioning.
    """
    return (features.withColumn(_HASH_COL, user_hash(seed)).orderBy(_HASH_COL, USER_ID).limit(rows)
            .drop(_HASH_COL))
