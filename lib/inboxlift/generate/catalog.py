"""The product catalogue and the lookup that turns a random draw into an item.

Item popularity is planted by rank: ``item_idx`` 0 is the most popular item,
and ``item_id`` numbers are a permutation of the ranks so ids say nothing about
popularity. Every item draw in the event generator is a (pool, rank) pair:
pool ``g`` holds the items of taste group ``g``'s favourite categories, ordered
so that the group's brands and price band come first, then by popularity; the
last pool holds every item by popularity. A Zipf-distributed rank into a pool
gives both the long tail and the taste structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from inboxlift.generate import draws
from inboxlift.generate.text import SECONDS_PER_DAY, iso_utc
from inboxlift.generate.vocab import (
    BRAND_PRICE_MULTIPLIERS, BRANDS, LEAVES, PRICE_BANDS, PRODUCT_BLURBS, PRODUCT_MODELS, TASTE_GROUPS,
)

SHOP_URL = "https://shop.example.com"
CURRENCY = "USD"
# Price relative to its category's base price: below 0.8 is budget, above 1.3 premium.
BUDGET_BELOW = 0.8
PREMIUM_ABOVE = 1.3
OUT_OF_STOCK_SHARE = 0.06
NEW_ARRIVAL_SHARE = 0.05
# Items per output file for products.csv; the catalogue is small next to events.
ITEMS_PER_FILE = 1_000_000

GLOBAL_POOL = len(TASTE_GROUPS)

_LEAF_COUNT = len(LEAVES)
_LEAF_STRIDE = 7  # coprime with the number of leaves, so the first items cover every leaf once
assert math.gcd(_LEAF_STRIDE, _LEAF_COUNT) == 1
assert {g.price_band for g in TASTE_GROUPS} <= set(PRICE_BANDS)


@dataclass(frozen=True)
class CatalogWindow:
    """The instants the catalogue needs, as epoch seconds."""

    end_s: int
    window_start_s: int
    floor_s: int
    new_arrival_days: int


def _lit_array(values) -> Column:
    return F.array(*[F.lit(v) for v in values])





def id_permutation(n: int, seed: int) -> tuple[int, int]:
    """``(a, b)`` such that ``(rank * a + b) % n`` is a bijection of [0, n)."""
    a = max(1, int(n * 0.618)) | 1
    while math.gcd(a, n) != 1:
        a += 2
    return a, seed % n


def build_items(spark: SparkSession, *, seed: int, items: int, window: CatalogWindow) -> DataFrame:
    """One row per item with landing fields and planted attributes; ``item_idx`` is the popularity rank."""
    a, b = id_permutation(items, seed)
    partitions = max(1, math.ceil(items / ITEMS_PER_FILE))
    idx = F.col("item_idx")

    def u(draw: str) -> Column:
        return draws.uniform(seed, "item-" + draw, idx)

    leaf = F.when(idx < _LEAF_COUNT, (idx * _LEAF_STRIDE + seed) % _LEAF_COUNT).otherwise(
        draws.below(_LEAF_COUNT, u("leaf"))).cast("int")
    brand_no = draws.below(len(BRAND_PRICE_MULTIPLIERS), u("brand"))
    brands_by_leaf = F.array(*[_lit_array(BRANDS[leaf_.department]) for leaf_ in LEAVES])
    base_price = draws.constant_at([float(leaf_.base_price) for leaf_ in LEAVES], F.col("leaf"))
    raw_price = base_price * draws.constant_at(BRAND_PRICE_MULTIPLIERS, F.col("brand_no")) * F.exp(
        0.25 * draws.normal(seed, "item-price", idx))
    # Charm prices (x.99), as shops quote them.
    price = (F.floor(raw_price) + 0.99).cast("decimal(12,2)")
    ratio = F.col("price").cast("double") / base_price
    price_band = (F.when(ratio < BUDGET_BELOW, F.lit("budget"))
                  .when(ratio > PREMIUM_ABOVE, F.lit("premium")).otherwise(F.lit("mid")))
    # At least one new arrival whatever the size, so "new in" emails always have something;
    # the median rank keeps it neither the most nor the least popular item.
    is_new = (u("new") < NEW_ARRIVAL_SHARE) | (idx == items // 2)
    new_span = window.new_arrival_days * SECONDS_PER_DAY
    old_span = window.window_start_s - SECONDS_PER_DAY - window.floor_s
    launched = F.when(F.col("is_new_arrival"), window.end_s - F.floor(u("launch") * new_span)).otherwise(
        window.window_start_s - SECONDS_PER_DAY - F.floor(u("launch") * old_span)).cast("long")
    name = F.concat_ws(" ", F.col("brand"), draws.pick(PRODUCT_MODELS, u("model")),
                       draws.constant_at([leaf_.noun for leaf_ in LEAVES], F.col("leaf")))
    slug = F.regexp_replace(F.lower(F.col("name")), "[^a-z0-9]+", "-")
    stock = F.when(u("stock") < OUT_OF_STOCK_SHARE, F.lit(0)).otherwise(
        F.floor(F.exp(3.3 + draws.normal(seed, "item-stock", idx)))).cast("int")

    return (
        spark.range(0, items, 1, partitions).withColumnRenamed("id", "item_idx")
        .withColumn("item_id", F.format_string("i%06d", (idx * a + b) % items + 1))
        .withColumn("leaf", leaf)
        .withColumn("brand_no", brand_no)
        .withColumn("brand", F.element_at(F.element_at(brands_by_leaf, F.col("leaf") + 1), F.col("brand_no") + 1))
        .withColumn("price", price)
        .withColumn("price_band", price_band)
        .withColumn("is_new_arrival", is_new)
        .withColumn("launched_s", launched)
        .withColumn("updated_s", F.greatest(F.col("launched_s"),
                                            window.end_s - F.floor(u("updated") * 30 * SECONDS_PER_DAY)).cast("long"))
        .withColumn("name", name)
        .withColumn("quality", 3.0 + 1.8 * u("quality"))
        .select(
            "item_idx", "item_id", "leaf",
            draws.constant_at([leaf_.path for leaf_ in LEAVES], F.col("leaf")).alias("category_path"),
            "brand", "price", "price_band", "name",
            F.concat(F.col("name"), F.lit(": "), draws.pick(PRODUCT_BLURBS, u("blurb")), F.lit(".")).alias(
                "description"),
            F.lit(CURRENCY).alias("currency"),
            F.concat(F.lit(SHOP_URL + "/images/"), F.col("item_id"), F.lit(".jpg")).alias("image_url"),
            F.concat(F.lit(SHOP_URL + "/p/"), F.col("item_id"), F.lit("-"), slug).alias("url"),
            stock.alias("stock"),
            "launched_s", "updated_s", "is_new_arrival", "quality",
        )
    )


def build_item_lookup(items: DataFrame) -> DataFrame:
    """``(pool_id, pool_rank)`` -> item: one pool per taste group plus the global pool.

    The key is unique by construction (a row number per pool), so joining on it
    never multiplies event rows.
    """
    leaf_paths = [leaf.path for leaf in LEAVES]
    groups_by_leaf = [[g for g, group in enumerate(TASTE_GROUPS) if path in group.categories] for path in leaf_paths]
    pool = F.col("pool_id")
    brand_match = F.array_contains(draws.constant_at([list(g.brands) for g in TASTE_GROUPS], pool), F.col("brand"))
    band_match = F.col("price_band") == draws.constant_at([g.price_band for g in TASTE_GROUPS], pool)
    # Brand counts double: a favourite brand is a stronger pull than a price band.
    affinity = brand_match.cast("int") * 2 + band_match.cast("int")
    in_pool_order = Window.partitionBy("pool_id").orderBy(F.desc("affinity"), F.asc("item_idx"))

    columns = ["item_idx", "item_id", "leaf", "category_path", "brand", "price", "launched_s", "quality",
               # Lower-cased once here rather than for every search in the events.
               F.lower(F.col("brand")).alias("brand_query")]
    taste_pools = (
        items
        .withColumn("pool_id", F.explode(
            F.element_at(F.array(*[F.array(*[F.lit(g) for g in gs]).cast("array<int>") for gs in groups_by_leaf]),
                         F.col("leaf") + 1)))
        .withColumn("affinity", affinity)
        .withColumn("pool_rank", (F.row_number().over(in_pool_order) - 1).cast("int"))
        .select("pool_id", "pool_rank", *columns)
    )
    global_pool = items.select(F.lit(GLOBAL_POOL).alias("pool_id"), F.col("item_idx").cast("int").alias("pool_rank"),
                               *columns)
    return taste_pools.unionByName(global_pool)


def pool_sizes(lookup: DataFrame) -> list[int]:
    """Items per pool, indexed by pool id (taste groups, then the global pool).

    A handful of numbers (one per taste group), not data that grows with users.
    """
    counts = {r["pool_id"]: r["count"] for r in lookup.groupBy("pool_id").count().collect()}
    return [int(counts.get(p, 0)) for p in range(GLOBAL_POOL + 1)]


def taste_group_truth(spark: SparkSession) -> DataFrame:
    rows = [(g, grp.name, list(grp.categories), list(grp.brands), grp.price_band, grp.weight)
            for g, grp in enumerate(TASTE_GROUPS)]
    schema = ("taste_group int, taste_group_name string, preferred_categories array<string>, "
              "preferred_brands array<string>, price_band string, share double")
    return spark.createDataFrame(rows, schema)


def products_landing_fields() -> dict[str, Column]:
    """The PRODUCTS_LANDING columns as text, keyed by name."""
    return {
        "item_id": F.col("item_id"),
        "name": F.col("name"),
        "description": F.col("description"),
        "category_path": F.col("category_path"),
        "brand": F.col("brand"),
        "price": F.col("price").cast("string"),
        "currency": F.col("currency"),
        "image_url": F.col("image_url"),
        "url": F.col("url"),
        "stock": F.col("stock").cast("string"),
        "launched_at": iso_utc(F.col("launched_s")),
        "updated_at": iso_utc(F.col("updated_s")),
    }

