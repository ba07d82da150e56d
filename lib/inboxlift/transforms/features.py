"""Features: the public transforms of the features stage, gathered in one place.

- :func:`user_features` — ``user_features``, one row per user;
- :func:`item_features` — ``item_features``, one row per item;
- :func:`aggregate_user_items` + :func:`interactions_from_user_items` — ``interactions``, ALS's input;
- :func:`select_reviews` — the reviews the sentiment model reads (``inboxlift.models.sentiment``).

They live in ``features_*`` modules by subject; the as-of rule shared by all of them is in
:mod:`inboxlift.transforms.features_common`, and every output column is described in the README's Feature reference.
"""

from inboxlift.transforms.features_activity import activity_columns, aggregate_user_activity
from inboxlift.transforms.features_common import cutoff_of, filter_events_as_of
from inboxlift.transforms.features_interactions import (
    INTERACTIONS_COLUMNS, aggregate_user_items, interactions_from_user_items,
)
from inboxlift.transforms.features_items import item_feature_columns, item_features
from inboxlift.transforms.features_reviews import (
    REVIEW_SCORE_COLUMNS, REVIEW_SCORE_SCHEMA, aggregate_user_reviews, select_reviews,
)
from inboxlift.transforms.features_user import (
    UserAggregates, aggregate_send_hours, aggregate_user_item_signals, aggregate_users, assemble_user_features,
    population_send_hour, rfm_cut_points, user_feature_columns, user_features, with_lifecycle_stage, with_rfm_scores,
    with_send_hour,
)

__all__ = [
    "UserAggregates", "aggregate_users", "assemble_user_features", "population_send_hour", "rfm_cut_points",
    "INTERACTIONS_COLUMNS", "REVIEW_SCORE_COLUMNS", "REVIEW_SCORE_SCHEMA", "activity_columns",
    "aggregate_send_hours", "aggregate_user_activity", "aggregate_user_item_signals", "aggregate_user_items",
    "aggregate_user_reviews", "cutoff_of", "filter_events_as_of", "interactions_from_user_items",
    "item_feature_columns", "item_features", "select_reviews", "user_feature_columns", "user_features",
    "with_lifecycle_stage", "with_rfm_scores", "with_send_hour",
]
