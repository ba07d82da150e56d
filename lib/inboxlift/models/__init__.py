"""Models: review sentiment, ALS recommendations, K-means segments, their evaluation and MLflow tracking.

Each fit is one MLflow run (see :mod:`inboxlift.models.tracking`); models never read or write tables.
"""
