"""User segments: Spark ML K-means and bisecting K-means over user features, k searched on a sample,
chosen by silhouette, profiled and named by rules. Described in ``docs/segments.md``.

- :mod:`.features`: settings checks, the preprocessing stages, the hash-picked samples of users
- :mod:`.search`: the clusterers, the k search, stability across seeds, the choice
- :mod:`.naming`: per-segment profiles, the naming rules, names that tell segments apart
- :mod:`.estimator`: :class:`SegmentSearch`, the recipe from features to a :class:`SegmentModel`
- :mod:`.scoring`: assigning users with a fitted pipeline, the silhouette promotion compares
- :mod:`.tracking`: what a run logs to MLflow, what a notebook loads back, the plots
"""

from inboxlift.models.segments.estimator import Refit, SegmentModel, SegmentSearch
from inboxlift.models.segments.features import silhouette_sample
from inboxlift.models.segments.scoring import assign_segments, pipeline_silhouette
from inboxlift.models.segments.search import SILHOUETTE, STABILITY_MEAN
from inboxlift.models.segments.tracking import (
    MODEL_ARTIFACT, ChampionArtifacts, load_model_artifacts, log_segment_model, plot_k_search, plot_profiles,
)

__all__ = [
    "MODEL_ARTIFACT", "SILHOUETTE", "STABILITY_MEAN", "ChampionArtifacts", "Refit", "SegmentModel", "SegmentSearch",
    "assign_segments", "load_model_artifacts", "log_segment_model", "pipeline_silhouette", "plot_k_search",
    "plot_profiles", "silhouette_sample",
]
