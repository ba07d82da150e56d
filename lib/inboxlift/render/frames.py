"""DataFrame steps around the partition function: plan + users + products -> recipients -> rendered.

:func:`render_plan` is the whole step. The users join is Spark's; the planned products are joined
one of two ways:

- **map-side** (the default while the catalogue, or else the set of items the plan names, has at
  most ``render.task_catalogue_max_items`` products): those catalogue rows are fetched once (their
  number is bounded by the catalogue, never by the users) and travel with the render function to
  every task, where each Python worker looks items up in a dictionary. Spark then moves each
  recipient once, with its list of item ids;
- **in Spark** (more items than that): explode the planned items, join the catalogue, re-aggregate
  them in plan order (:func:`with_planned_products`). Nothing is collected; it costs the JVM some
  20% more CPU per message than the map-side join (bench/bench_render.py).

Only the render function runs Python, once per partition (``mapInArrow``).
"""

from __future__ import annotations

import functools

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from inboxlift.render.message import RenderConfig
from inboxlift.render.partition import RENDERED_SCHEMA, TaskCatalogue, render_batches
from inboxlift.schemas import require_columns

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
    """The plan with the user's address, name, time zone and consent (:func:`with_addresses`), and
    the planned products joined in Spark (:func:`with_planned_products`)."""
    return with_planned_products(with_addresses(plan, users=users, partitions=partitions), products=products)


def with_addresses(plan: DataFrame, *, users: DataFrame, partitions: int | None = None) -> DataFrame:
    """The plan with the user's address, name, time zone and consent.

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
    # The plan day is part of the Message-ID; a plan written before plan_date existed has none.
    day = F.col("plan_date") if "plan_date" in plan.columns else F.lit(None).cast("date")
    light = plan.select(*PLAN_COLUMNS, day.alias("plan_date"))
    if partitions:
        light = light.repartition(partitions, "user_id")
    addressed = (
        # users is keyed by user_id (ingest merges by it): one row per plan row.
        light.join(people, on="user_id", how="left")
        .withColumn("has_user", F.coalesce(F.col("has_user"), F.lit(False)))
    )
    return addressed


def catalogue_columns(products: DataFrame) -> DataFrame:
    """``PRODUCT_COLUMNS`` of ``products``, the price as decimal text (as the product cards read it)."""
    require_columns(products, PRODUCT_COLUMNS, step="catalogue_columns")
    return products.select(*PRODUCT_COLUMNS).withColumn("price", F.col("price").cast("string"))


def planned_catalogue(plan: DataFrame, products: DataFrame) -> DataFrame:
    """:func:`catalogue_columns` of the items ``plan`` names."""
    require_columns(plan, ["item_ids"], step="planned_catalogue")
    planned = plan.select(F.explode("item_ids").alias("item_id")).distinct()
    return catalogue_columns(products).join(planned, on="item_id", how="left_semi")


def task_catalogue(plan: DataFrame, products: DataFrame, *, max_items: int) -> TaskCatalogue | None:
    """The catalogue rows the render function needs, as a :class:`TaskCatalogue`: the whole catalogue
    when it has at most ``max_items`` products (no pass over the plan), else the items the plan names
    when they are at most ``max_items``; None otherwise (or when ``max_items`` is 0): then Spark
    joins them instead.

    Fetches at most ``max_items + 1`` rows: bounded by the catalogue, whatever the number of users.
    """
    if max_items <= 0:
        return None
    rows = catalogue_columns(products) if products.count() <= max_items else planned_catalogue(plan, products)
    table = rows.limit(max_items + 1).toArrow()
    return TaskCatalogue.from_arrow(table) if table.num_rows <= max_items else None


def render_plan(plan: DataFrame, *, users: DataFrame, products: DataFrame, config: RenderConfig,
                partitions: int | None = None, task_catalogue_max_items: int = 0) -> DataFrame:
    """One ``RENDERED_SCHEMA`` row per plan row: the users joined, the products joined map-side when
    the catalogue, or else the set of planned items, has at most ``task_catalogue_max_items``
    products (see :func:`task_catalogue` and the module docstring), else in Spark."""
    addressed = with_addresses(plan, users=users, partitions=partitions)
    catalogue = task_catalogue(plan, products, max_items=task_catalogue_max_items)
    if catalogue is None:
        return render_recipients(with_planned_products(addressed, products=products), config=config)
    return addressed.mapInArrow(functools.partial(render_batches, config=config, catalogue=catalogue),
                                RENDERED_SCHEMA)


def render_recipients(recipients: DataFrame, *, config: RenderConfig) -> DataFrame:
    """One ``RENDERED_SCHEMA`` row per recipient: a message, or a failure with reason and error."""
    return recipients.mapInArrow(functools.partial(render_batches, config=config), RENDERED_SCHEMA)
