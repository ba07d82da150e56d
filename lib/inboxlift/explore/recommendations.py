"""The champion recommender against its baselines, example users and similar items (``notebooks/recommendations.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.context import RunContext
from inboxlift.models import registry
from inboxlift.models.tracking import tracking_client

TEST_SPLIT = "test"


@dataclass(frozen=True)
class ChampionMetrics:
    """The champion's test-window metrics: one row per recommender or baseline, one column per metric."""

    name: str
    version: str
    run_id: str
    chosen: str
    table: pd.DataFrame


def champion_metrics(ctx: RunContext) -> ChampionMetrics:
    """The champion version's ``test/<model>/<metric>`` figures, as logged by ``recommend-train``."""
    name = ctx.settings.recommend.registered_model
    client = tracking_client(ctx.settings.mlflow)
    champion = registry.champion(client, name)
    if champion is None:
        from inboxlift.stages.recommend import NoChampionError

        raise NoChampionError(f"no version of model {name!r} has the alias 'champion': run recommend-train first")
    run = client.get_run(champion.run_id)
    rows: dict[str, dict[str, float]] = {}
    for key, value in run.data.metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == TEST_SPLIT:
            rows.setdefault(parts[1], {})[parts[2]] = value
    table = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    table.index.name = "model"
    return ChampionMetrics(name=name, version=str(champion.version), run_id=champion.run_id,
                           chosen=run.data.tags.get("chosen_recommender", ""), table=table)


def plot_metrics(metrics: ChampionMetrics):
    """Grouped bars: each metric for every recommender and baseline on the test window."""
    from matplotlib.figure import Figure

    table = metrics.table
    figure = Figure(figsize=(10, 4))
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(table.index), 1)
    for i, model in enumerate(table.index):
        axes.bar([x + i * width for x in range(len(table.columns))], table.loc[model].tolist(), width=width,
                 label=model)
    axes.set_xticks([x + 0.4 - width / 2 for x in range(len(table.columns))], table.columns)
    axes.set_title(f"{metrics.name} v{metrics.version} ({metrics.chosen}) against baselines, test window")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def example_user_ids(interactions: DataFrame, recommendations: DataFrame, *, n: int = 3) -> list[str]:
    """The ``n`` users with the most interactions that have recommendations (ties: smallest id)."""
    with_recs = recommendations.select("user_id").distinct()
    busiest = (interactions.groupBy("user_id").agg(F.count(F.lit(1)).alias("items"))
               .join(with_recs, on="user_id", how="inner")
               .orderBy(F.col("items").desc(), F.col("user_id")).limit(n))
    return [row["user_id"] for row in busiest.collect()]   # n rows


def _named(items: DataFrame, products: DataFrame, *, item_col: str = "item_id") -> DataFrame:
    names = products.select(F.col("item_id").alias(item_col), "name", "category")
    return items.join(names, on=item_col, how="left")


def user_examples(ctx: RunContext, user_ids: list[str], *, history: int = 10) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per user: their strongest interactions (what they did) and their recommendations, with product names."""
    products = ctx.lake.read("products")
    chosen = F.col("user_id").isin(user_ids)
    strongest = Window.partitionBy("user_id").orderBy(F.col("confidence").desc(), F.col("item_id"))
    past = (ctx.lake.read("interactions").where(chosen).withColumn("n", F.row_number().over(strongest))
            .where(F.col("n") <= history).drop("n"))
    past = _named(past, products).select("user_id", "item_id", "name", "category", "confidence").toPandas()
    recs = _named(ctx.lake.read("recommendations").where(chosen), products) \
        .select("user_id", "rank", "item_id", "name", "category", "score", "source").toPandas()
    out = {}
    for user_id in user_ids:
        mine = past[past["user_id"] == user_id].sort_values(["confidence", "item_id"], ascending=[False, True])
        theirs = recs[recs["user_id"] == user_id].sort_values("rank")
        out[user_id] = (mine.drop(columns="user_id").reset_index(drop=True),
                        theirs.drop(columns="user_id").reset_index(drop=True))
    return out


def similar_item_examples(ctx: RunContext, *, n: int = 3) -> pd.DataFrame:
    """``similar_items`` of the ``n`` items with the most interactions, with both items' names."""
    top = (ctx.lake.read("interactions").groupBy("item_id").agg(F.count(F.lit(1)).alias("users"))
           .orderBy(F.col("users").desc(), F.col("item_id")).limit(n).select("item_id"))
    products = ctx.lake.read("products")
    similar = ctx.lake.read("similar_items").join(top, on="item_id", how="inner")
    similar = _named(similar, products).withColumnRenamed("name", "item").drop("category")
    similar = _named(similar, products, item_col="similar_item_id").withColumnRenamed("name", "similar_item")
    return (similar.select("item_id", "item", "rank", "similar_item_id", "similar_item", "category", "score")
            .orderBy("item_id", "rank").toPandas())   # n * similar_items rows
