"""Planted segments for the segment tests: clearly separated groups of users in a small user_features frame."""

from __future__ import annotations

from decimal import Decimal

import numpy as np

from inboxlift.settings import SegmentSettings

FEATURE_SCHEMA = ("user_id string, recency_days int, orders int, monetary decimal(18,2), open_rate double, "
                  "tenure_days int, band string, cats array<string>")
# Column names differ from user_features' on purpose: roles, not names, drive profiles and names.
TEST_PARAMS = SegmentSettings(
    feature_columns=["recency_days", "orders", "monetary", "open_rate", "tenure_days"],
    log_columns=["recency_days", "orders", "monetary"],
    null_fill={"recency_days": 365.0},
    roles={"recency": "recency_days", "frequency": "orders", "monetary": "monetary", "open_rate": "open_rate",
           "tenure": "tenure_days", "price_band": "band", "categories": "cats"},
    algorithms=["kmeans", "bisecting_kmeans"], k_min=3, k_max=5, max_iter=8, seed=5, stability_seeds=[17],
    search_sample_rows=100, silhouette_sample_rows=100, top_categories=2, registered_model="test-segments",
)

# Four planted groups: (name the rules should give, recency, orders, monetary, open rate, tenure, band, categories).
# Prospects never bought: their days since the last purchase are their tenure, as the features stage writes it.
PLANTED = [
    ("VIP loyal", 6, 25, 3000.0, 0.60, 700, "premium", ["shoes", "bags"]),
    ("at-risk big spenders", 120, 12, 2400.0, 0.20, 600, "luxury", ["watches", "bags"]),
    ("dormant", 300, 2, 80.0, 0.05, 900, "budget", ["books", "toys"]),
    ("prospects", 200, 0, 0.0, 0.50, 200, "budget", ["toys"]),
]
PER_GROUP = 50


def planted_rows(per_group: int = PER_GROUP, seed: int = 3, prefix: str = "u") -> list[tuple]:
    """Well-separated groups with small noise; the planted group index is the last field."""
    rng = np.random.default_rng(seed)
    rows = []
    for g, (_, recency, orders, monetary, open_rate, tenure, band, cats) in enumerate(PLANTED):
        for i in range(per_group):
            buyer = orders > 0
            rows.append((
                f"{prefix}{g}-{i:03d}",
                int(max(1, recency + rng.integers(-3, 4))),
                int(max(1, orders + rng.integers(-2, 3))) if buyer else 0,
                round(float(max(1.0, monetary * (1 + rng.normal(0, 0.05)))), 2) if buyer else 0.0,
                float(np.clip(open_rate + rng.normal(0, 0.03), 0, 1)),
                int(max(1, tenure + rng.integers(-5, 6))),
                band,
                cats,
                g,
            ))
    return rows


def planted_frame(spark, **kwargs):
    """``(user_features, truth)``: the planted users, and each one's planted group (``user_id, planted``)."""
    rows = planted_rows(**kwargs)
    features = [(*r[:3], Decimal(str(r[3])), *r[4:8]) for r in rows]
    truth = [(r[0], r[8]) for r in rows]
    return (spark.createDataFrame(features, FEATURE_SCHEMA),
            spark.createDataFrame(truth, "user_id string, planted int"))
