"""Assigning users with a fitted segment pipeline: segment, name, distance to the centre; the fair silhouette."""

from __future__ import annotations

from typing import Sequence

from pyspark.errors import AnalysisException
from pyspark.ml import PipelineModel
from pyspark.ml.clustering import BisectingKMeansModel, KMeansModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.models.segments.features import DISTANCE, FEATURES_COL, SEGMENT_ID, SEGMENT_NAME, USER_ID
from inboxlift.models.segments.search import silhouette
from inboxlift.schemas import require_columns

ASSIGNMENT_COLUMNS = [USER_ID, SEGMENT_ID, SEGMENT_NAME, DISTANCE]


def clusterer_stage(pipeline: PipelineModel) -> KMeansModel | BisectingKMeansModel:
    """The fitted clusterer inside a segment pipeline."""
    for stage in pipeline.stages:
        if isinstance(stage, (KMeansModel, BisectingKMeansModel)):
            return stage
    raise ValueError(f"not a segment pipeline: no K-means stage among {[type(s).__name__ for s in pipeline.stages]}")


def with_distance_to_centroid(assigned: DataFrame, *, features_col: str, cluster_col: str,
                              centers: Sequence[Sequence[float]]) -> DataFrame:
    """Add ``distance``: the Euclidean distance from each row's vector to its cluster's centre.

    The centres (k x d numbers) travel as a literal; the arithmetic is plain element-wise Spark
    expressions (code-generated, no higher-order function and no Python per row).
    """
    center_table = F.array(*[F.array(*[F.lit(float(x)) for x in center]) for center in centers])
    center = F.element_at(center_table, F.col(cluster_col).cast("int") + 1)
    values = vector_to_array(F.col(features_col))
    width = len(centers[0]) if centers else 0
    squares = [(values.getItem(j) - center.getItem(j)) * (values.getItem(j) - center.getItem(j)) for j in range(width)]
    return assigned.withColumn(DISTANCE, F.sqrt(sum(squares, F.lit(0.0))))


def assignment_cost(model: KMeansModel | BisectingKMeansModel, points: DataFrame) -> float:
    """The sum over ``points`` of the squared distance from each point to the centre ``model``
    assigns it to: K-means' cost of any fitted model on any points, e.g. a sample's fit on all users."""
    assigned = with_distance_to_centroid(model.transform(points), features_col=model.getFeaturesCol(),
                                         cluster_col=model.getPredictionCol(),
                                         centers=[list(c) for c in model.clusterCenters()])
    total = assigned.agg(F.sum(F.col(DISTANCE) * F.col(DISTANCE))).first()[0]
    return float(total or 0.0)


def assign_segments(features: DataFrame, *, pipeline: PipelineModel) -> DataFrame:
    """``user_id, segment_id, segment_name, distance`` for every user of ``features`` (no retraining)."""
    require_columns(features, [USER_ID], step="assign_segments")
    model = clusterer_stage(pipeline)
    return (pipeline.transform(features)
            .transform(with_distance_to_centroid, features_col=model.getFeaturesCol(),
                       cluster_col=model.getPredictionCol(), centers=[list(c) for c in model.clusterCenters()])
            .select(USER_ID, F.col(SEGMENT_ID).cast("int").alias(SEGMENT_ID), SEGMENT_NAME,
                    F.col(DISTANCE).cast("double").alias(DISTANCE)))


def pipeline_silhouette(sample: DataFrame, *, labels_from: PipelineModel, space: PipelineModel) -> float | None:
    """The silhouette (squared Euclidean) of ``labels_from``'s segments in ``space``'s scaled feature space.

    Two models are compared fairly by measuring both with this function on the same sample and
    the same space. Returns None when ``labels_from`` cannot score the sample (e.g. a column it
    was trained on is gone), NaN when it puts the whole sample in one segment.
    """
    try:
        # Analysis is eager: a column the model needs and the sample lacks fails here.
        labels = labels_from.transform(sample).select(USER_ID, F.col(SEGMENT_ID).alias("_seg_label"))
    except AnalysisException:
        return None
    points = space.transform(sample).select(USER_ID, FEATURES_COL)
    # user_id is unique in user_features, so the inner join keeps one row per sampled user.
    joined = points.join(labels, on=USER_ID, how="inner")
    return silhouette(joined, features_col=FEATURES_COL, prediction_col="_seg_label")
