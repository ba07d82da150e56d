"""The features stage on a lake: the four tables, the sentiment run, the report; run twice, same tables."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
from chispa import assert_df_equality
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F
from pyspark.sql.types import MapType

from inboxlift.stages.features import OUTPUT_TABLES, run_features
from test_features_data import (
    AS_OF, EVENTS_SCHEMA, activity_events, at, ev, events, product, products, user, users,
)

POSITIVE = ["love it", "excellent quality", "works perfectly", "great value", "highly recommend", "fast delivery",
            "非常好", "质量很好"]
NEGATIVE = ["broke after a week", "terrible quality", "waste of money", "very disappointed", "arrived damaged",
            "does not work", "质量太差", "很失望"]


def review_events() -> list[tuple]:
    rows = []
    for i, text in enumerate(POSITIVE):
        rows.append(ev("review", f"u{i % 3 + 1}", at(-(i + 2)), item="i1", rating=5, text=text, event_id=f"rp{i}"))
    for i, text in enumerate(NEGATIVE):
        rows.append(ev("review", f"u{i % 3 + 1}", at(-(i + 2)), item="i2", rating=1, text=text, event_id=f"rn{i}"))
    rows.append(ev("review", "u1", at(-3), item="i2", rating=3, text="it is okay", event_id="r3"))
    rows.append(ev("review", "u1", at(1), item="i2", rating=1, text="later", event_id="rlate"))
    return rows


@pytest.fixture
def shop(ctx, spark):
    ctx.lake.append("events", events(spark, activity_events() + review_events()), partition_by=["event_date"])
    ctx.lake.append("users", users(spark, [user("u1"), user("u2"), user("u3"), user("u4")]))
    ctx.lake.append("products", products(spark, [product("i1"), product("i2", category="Home")]))
    features = dataclasses.replace(ctx.settings.features, sentiment_min_reviews=4, sentiment_max_iter=10,
                                   sentiment_num_features=1024)
    return dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, features=features))


def snapshot(ctx, name):
    df = ctx.lake.read(name)
    # Each run is its own MLflow run: the lineage column differs by design, nothing else may.
    df = df.drop("model_run_id")
    return df.select(*[F.array_sort(F.map_entries(f.name)).alias(f.name) if isinstance(f.dataType, MapType)
                       else F.col(f.name) for f in df.schema.fields])


def test_stage_writes_four_tables_and_a_sentiment_run_and_twice_is_the_same(shop):
    first = run_features(shop)
    # 8 + 8 labelled reviews, a 3-star one and u1's "great"; u1..u3 have events, u4 only a profile
    assert first.rows == {"review_sentiment": 18, "interactions": 2, "item_features": 2, "user_features": 4}
    assert first.as_of == AS_OF and first.sentiment_skipped is None
    tables = {name: snapshot(shop, name) for name in OUTPUT_TABLES}
    tables = {name: df.sparkSession.createDataFrame(df.collect(), df.schema) for name, df in tables.items()}
    versions = {name: shop.lake.version(name) for name in OUTPUT_TABLES}

    second = run_features(shop)
    assert second.rows == first.rows
    for name in OUTPUT_TABLES:
        assert_df_equality(snapshot(shop, name), tables[name], ignore_row_order=True)
        assert shop.lake.version(name) == versions[name] + 1  # replaced, not appended

    run = MlflowClient(tracking_uri=mlflow.get_tracking_uri()).get_run(second.sentiment_run_id)
    assert run.data.tags["stage"] == "features" and "test_auc_roc" in run.data.metrics
    summary = second.summary()
    assert "user_features: 4 rows" in summary and second.sentiment_run_id in summary and "F1" in summary
    # Every review with text before the cut-off is scored, 3 stars included; the later one is not
    ids = {r[0] for r in shop.lake.read("review_sentiment").select("event_id").collect()}
    assert "rlate" not in ids and "r3" in ids


def test_stage_as_of_an_earlier_day(shop):
    report = run_features(shop, as_of=AS_OF.replace(day=1))
    dates = {r[0] for r in shop.lake.read("user_features").select("as_of_date").distinct().collect()}
    assert dates == {AS_OF.replace(day=1)}
    assert report.rows["user_features"] == 4


def test_stage_needs_the_ingested_tables(ctx):
    with pytest.raises(FileNotFoundError, match="'events'.*run ingest first"):
        run_features(ctx)


def test_events_schema_is_what_ingest_writes():
    from inboxlift.transforms.ingest import EVENT_FIELDS

    ours = {f.name: f.dataType for f in EVENTS_SCHEMA.fields}
    assert {f.name: f.dataType for f in EVENT_FIELDS.fields}.items() <= ours.items()
