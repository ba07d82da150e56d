"""DataFrame steps around the partition function: plan + users + products -> recipients -> rendered.

All joins and re-ordering are Spark built-ins; only :func:`render_recipients` runs Python, once per
partition (``mapInArrow``). Nothing is collected.
"""

from __future__ import annotations

import functools

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from inboxlift.render.message import RenderConfig
from inboxlift.render.partition import RENDERED_SCHEMA, render_batches
from inboxlift.transforms.ingest import require_columns

HOLDOUT = "holdout"
PLAN_COLUMNS = (
    "campaign_id", "campaign_type", "user_id", "variant", "template", "locale", "subject_template", "send_at",
    "item_ids", "item_sources", "context", "plan_run_id",
)
USER_COLUMNS = ("user_id", "email", "first_name", "timezone", "email_consent")
PRODUCT_COLUMNS = ("item_id", "name", "brand", "price", "currency", "image_url", "url", "in_stock")
RECIPIENT_KEY = ["campaign_id", "user_id"]


def is_holdout() -> Column:
    return F.coalesce(F.col("variant") == F.lit(HOLDOUT), F.lit(False))


def filter_sendable(plan: DataFrame) -> DataFrame:
    """The plan without its holdout rows (they get no email; they are kept for measurement)."""
    return plan.where(~is_holdout())


def render_partitions(spark: SparkSession) -> int | None:
    """How many partitions rendering runs in: ``spark.sql.shuffle.partitions`` when it is a number
    (Databricks may say "auto", and then Spark decides)."""
    value = spark.conf.get("spark.sql.shuffle.partitions", None)
    return int(value) if value and str(value).isdigit() and int(value) > 0 else None


def with_planned_products(recipients: DataFrame, *, products: DataFrame) -> DataFrame:
    """``recipients`` (one row per campaign and user) with ``products``: the planned items joined
    with the catalogue, in plan order (``position``). An item missing from the catalogue keeps its
    id with ``is_found`` null; a recipient without planned items gets an empty list.

    Explode, join, re-aggregate: each recipient's other columns ride along as one struct (identical
    on its exploded rows, so ``first`` is exact). A recipient's exploded rows sit in one partition, so
    where ``recipients`` is already partitioned by user (see :func:`with_recipient_data`) and the
    catalogue is broadcast, the aggregation needs no exchange at all.
    """
    require_columns(recipients, RECIPIENT_KEY + ["item_ids", "item_sources"], step="with_planned_products")
    require_columns(products, PRODUCT_COLUMNS, step="with_planned_products")
    # The item lists themselves are done with once exploded: they do not ride along.
    others = [c for c in recipients.columns if c not in RECIPIENT_KEY + ["item_ids", "item_sources"]]
    items = (
        recipients.select(*RECIPIENT_KEY, F.struct(*others).alias("_recipient"),
                          F.posexplode_outer(F.arrays_zip(F.col("item_ids").alias("item_id"),
                                                          F.col("item_sources").alias("source")))
                          .alias("position", "item"))
        .select(*RECIPIENT_KEY, "_recipient", "position", F.col("item.item_id").alias("item_id"),
                F.col("item.source").alias("source"))
    )
    catalogue = products.select(*PRODUCT_COLUMNS, F.lit(True).alias("is_found"))
    # products is keyed by item_id (ingest merges by it), so this join keeps one row per planned item.
    cards = items.join(catalogue, on="item_id", how="left")
    # posexplode_outer gives a recipient without items one row with a null position: no card.
    # The price travels as its decimal text ("1234.50"): Python builds a Decimal from Arrow's decimal
    # at ~3 µs apiece, ten per email, while formatting is cached per price text anyway.
    fields = [F.col(c).cast("string").alias(c) if c == "price" else F.col(c) for c in PRODUCT_COLUMNS[1:]]
    card = F.when(F.col("position").isNotNull(), F.struct("position", "item_id", "source", *fields, "is_found"))
    return (
        cards.groupBy(*RECIPIENT_KEY)
        # Sorting structs orders by their first field, the position in the plan.
        .agg(F.first("_recipient").alias("_recipient"), F.sort_array(F.collect_list(card)).alias("products"))
        .select(*RECIPIENT_KEY, "_recipient.*", "products")
    )


def with_recipient_data(plan: DataFrame, *, users: DataFrame, products: DataFrame,
                        partitions: int | None = None) -> DataFrame:
    """The plan with the user's address, name, time zone and consent, and the planned products.

    ``has_user`` is false where the user is no longer in ``users`` (the row then fails as unknown_user).

    ``partitions`` fixes how many partitions (so parallel tasks) rendering gets: the plan's light rows
    are hash partitioned by user into that many, which the users join and the product aggregation
    reuse. Without it, adaptive execution sizes partitions by bytes, and a plan whose shuffled data is
    small (tens of MB) ends up in one partition: the Python rendering, most of the work, would then
    run on one core.
    """
    require_columns(plan, PLAN_COLUMNS, step="with_recipient_data")
    require_columns(users, USER_COLUMNS, step="with_recipient_data")
    people = users.select(*USER_COLUMNS, F.lit(True).alias("has_user"))
    light = plan.select(*PLAN_COLUMNS)
    if partitions:
        light = light.repartition(partitions, "user_id")
    addressed = (
        # users is keyed by user_id (ingest merges by it): one row per plan row.
        light.join(people, on="user_id", how="left")
        .withColumn("has_user", F.coalesce(F.col("has_user"), F.lit(False)))
    )
    return with_planned_products(addressed, products=products)


def render_recipients(recipients: DataFrame, *, config: RenderConfig) -> DataFrame:
    """One ``RENDERED_SCHEMA`` row per recipient: a message, or a failure with reason and error."""
    return recipients.mapInArrow(functools.partial(render_batches, config=config), RENDERED_SCHEMA)
