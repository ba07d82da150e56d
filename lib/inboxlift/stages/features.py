"""The features stage: events, users, products -> review_sentiment, interactions, item_features, user_features.

Each output table is replaced as a whole on every run (one snapshot, the latest as-of date, in the
``as_of_date`` column); earlier snapshots stay reachable through Delta time travel. Running the
stage twice for the same as-of date leaves the same tables.

As-of rule (see :mod:`inboxlift.transforms.features_common`): features as of D see events with
``event_ts < D + 1 day 00:00 UTC``; later events change nothing.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from pyspark.sql import DataFrame

from inboxlift.context import RunContext
from inboxlift.models.sentiment import SentimentParams, fit_sentiment, score_reviews
from inboxlift.transforms.features import (
    REVIEW_SCORE_SCHEMA, aggregate_user_items, aggregate_users, assemble_user_features, interactions_from_user_items,
    item_features, select_reviews,
)
from inboxlift.transforms.features_common import cutoff_of, filter_events_as_of
from inboxlift.transforms.features_returns import net_of_returns

EVENTS, USERS, PRODUCTS = "events", "users", "products"
USER_FEATURES, ITEM_FEATURES, INTERACTIONS, REVIEW_SENTIMENT = (
    "user_features", "item_features", "interactions", "review_sentiment")
OUTPUT_TABLES = (REVIEW_SENTIMENT, INTERACTIONS, ITEM_FEATURES, USER_FEATURES)


@dataclass(frozen=True)
class FeaturesReport:
    as_of: dt.date
    cutoff: dt.datetime
    rows: dict[str, int]
    sentiment_metrics: dict[str, float] = field(default_factory=dict)
    sentiment_counts: dict[str, int] = field(default_factory=dict)
    sentiment_run_id: str | None = None
    sentiment_model_uri: str | None = None
    sentiment_skipped: str | None = None

    def summary(self) -> str:
        lines = [f"features as of {self.as_of} (events before {self.cutoff:%Y-%m-%d %H:%M} UTC)"]
        lines += [f"  {name}: {self.rows[name]} rows" for name in OUTPUT_TABLES if name in self.rows]
        if self.sentiment_skipped:
            lines.append(f"  sentiment model: not trained ({self.sentiment_skipped})")
        else:
            def fmt(name: str) -> str:
                value = self.sentiment_metrics.get(name, math.nan)
                return "n/a" if math.isnan(value) else f"{value:.3f}"

            train = self.sentiment_counts.get("train_positive", 0) + self.sentiment_counts.get("train_negative", 0)
            test = self.sentiment_counts.get("test_positive", 0) + self.sentiment_counts.get("test_negative", 0)
            lines.append(f"  sentiment model: held-out F1 (weighted) {fmt('test_f1_weighted')}, "
                         f"AUC {fmt('test_auc_roc')} ({train} train / {test} test reviews)")
            lines.append(f"  MLflow run {self.sentiment_run_id} ({self.sentiment_model_uri})")
        return "\n".join(lines)


def _read(ctx: RunContext, name: str) -> DataFrame:
    return ctx.lake.read_required(name, needed_by="the features stage", hint="run ingest first")


def run_features(ctx: RunContext, *, as_of: dt.date | None = None) -> FeaturesReport:
    """Compute and write the four feature tables as of ``as_of`` (default: the clock's UTC date)."""
    as_of = as_of or ctx.clock.today()
    settings = ctx.settings.features
    events, users, products = _read(ctx, EVENTS), _read(ctx, USERS), _read(ctx, PRODUCTS)
    # Purchases net of cancellations and returns (transforms.features_returns); only returns up to the
    # as-of cut-off count, so a later return does not change features of an earlier day.
    events = events.transform(filter_events_as_of, as_of=as_of, with_user=False).transform(net_of_returns)

    reviews = events.transform(select_reviews, as_of=as_of)
    params = SentimentParams.from_settings(settings)
    fit = fit_sentiment(reviews, params=params, mlflow_settings=ctx.settings.mlflow, as_of=as_of,
                        tags={"stage": "features"})
    if fit.model is not None:
        scores = score_reviews(reviews, model=fit.model, threshold=params.negative_threshold, run_id=fit.run_id,
                               as_of=as_of)
    else:
        scores = ctx.spark.createDataFrame([], REVIEW_SCORE_SCHEMA)
    written = {REVIEW_SENTIMENT: ctx.lake.overwrite(REVIEW_SENTIMENT, scores, overwrite_schema=True)}
    # Read back, so features use the scores as stored instead of re-running the model.
    review_scores = ctx.lake.read(REVIEW_SENTIMENT)

    # The (user, item) aggregate feeds interactions and user features; computed once.
    user_items = events.transform(aggregate_user_items, as_of=as_of, settings=settings).persist()
    try:
        written[INTERACTIONS] = ctx.lake.overwrite(
            INTERACTIONS, user_items.transform(interactions_from_user_items, as_of=as_of), overwrite_schema=True)
        written[ITEM_FEATURES] = ctx.lake.overwrite(
            ITEM_FEATURES, events.transform(item_features, products=products, review_scores=review_scores,
                                            as_of=as_of, settings=settings), overwrite_schema=True)
        aggregates = aggregate_users(events, users=users, products=products, review_scores=review_scores,
                                     as_of=as_of, settings=settings, user_items=user_items).persist()
        try:
            written[USER_FEATURES] = ctx.lake.overwrite(
                USER_FEATURES, users.transform(assemble_user_features, aggregates=aggregates, as_of=as_of,
                                               settings=settings), overwrite_schema=True)
        finally:
            aggregates.unpersist()
    finally:
        user_items.unpersist()

    # Each table was replaced whole, so the rows its write reports are its rows; a backend that does
    # not report them (native Delta) is counted.
    rows = {name: written[name].rows_written if written[name].rows_written is not None
            else ctx.lake.read(name).count() for name in OUTPUT_TABLES}
    return FeaturesReport(
        as_of=as_of, cutoff=cutoff_of(as_of), rows=rows, sentiment_metrics=fit.metrics, sentiment_counts=fit.counts,
        sentiment_run_id=fit.run_id, sentiment_model_uri=fit.model_uri, sentiment_skipped=fit.skipped,
    )
