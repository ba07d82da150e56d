"""The recommenders' data: persistent 32-bit id maps, and (user, item) confidences from ``events``.

**Ids.** ALS needs 32-bit integer ids. :func:`new_id_rows` numbers ids not seen before after the
largest index in use, so a persistent map (``id_map_users``, ``id_map_items``) only ever grows: an id
keeps its index for ever and no two ids share one. Numbering is deterministic (by hash bucket, then
id) and needs no single-partition sort.

**Pairs** come from ``events`` (views, carts, purchases before a cut-off), aggregated per (user, item)
into exponentially decayed counts per event type (:func:`decayed_pairs`, age measured from the
cut-off). Confidence is their weighted sum (:func:`with_confidence`), the definition of
``interactions.confidence``, recomputable for any cut-off. Details: docs/recommend.md.
"""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.transforms.features_common import (
    ADD_TO_CART,
    INTERACTION_TYPES,
    ITEM_ID,
    PURCHASE,
    USER_ID,
    VIEW,
    require_columns,
)

USER_IDX, ITEM_IDX = "user_idx", "item_idx"
CONFIDENCE, LAST_TS = "confidence", "last_ts"
MAX_INDEX = 2**31 - 1
ID_BUCKETS = 64

__all__ = ["USER_ID", "ITEM_ID", "USER_IDX", "ITEM_IDX", "CONFIDENCE", "LAST_TS", "INTERACTION_TYPES",
           "new_id_rows", "to_indexes", "events_between", "decayed_pairs", "with_confidence", "window_items"]


# ---- ids ---------------------------------------------------------------------------------------

def new_id_rows(ids: DataFrame, *, existing: DataFrame | None, id_col: str, idx_col: str,
                buckets: int = ID_BUCKETS) -> DataFrame:
    """Index rows for the ids of ``ids`` that ``existing`` does not hold yet.

    New ids are numbered from ``max(existing index) + 1`` without gaps: by hash bucket of the id,
    then by id within a bucket, so the same set of new ids always gets the same indexes and no
    partition has to hold them all. Raises ``OverflowError`` past 2**31 - 1 (ALS ids are ints).

    Returns:
        ``id_col, idx_col`` (int), one row per new id; empty when there is none.
    """
    require_columns(ids, [id_col], step="new_id_rows")
    fresh = ids.select(id_col).where(F.col(id_col).isNotNull()).distinct()
    if existing is not None:
        require_columns(existing, [id_col, idx_col], step="new_id_rows (existing)")
        fresh = fresh.join(existing.select(id_col), on=id_col, how="left_anti")
    bucket, position = "_bucket", "_position"
    numbered = fresh.withColumn(bucket, F.pmod(F.xxhash64(F.col(id_col)), F.lit(buckets))).withColumn(
        position, F.row_number().over(Window.partitionBy(bucket).orderBy(id_col)))
    sizes = numbered.groupBy(bucket).agg(F.count(F.lit(1)).alias("_size"))
    # Global and small: at most `buckets` rows.
    before = Window.orderBy(bucket).rowsBetween(Window.unboundedPreceding, -1)
    offsets = sizes.select(bucket, "_size", F.coalesce(F.sum("_size").over(before), F.lit(0)).alias("_offset"))
    totals = offsets.agg(F.sum("_size").alias("added"))
    if existing is not None:
        totals = totals.crossJoin(existing.agg(F.max(idx_col).alias("top")))
    row = totals.first()
    added = int(row["added"] or 0)
    top = row["top"] if existing is not None else None
    base = -1 if top is None else int(top)
    if base + added > MAX_INDEX:
        raise OverflowError(f"{added} new ids after index {base} would pass the 32-bit limit {MAX_INDEX}")
    return numbered.join(F.broadcast(offsets.select(bucket, "_offset")), on=bucket, how="inner").select(
        id_col, (F.lit(base + 1) + F.col("_offset") + F.col(position) - 1).cast("int").alias(idx_col))


def to_indexes(df: DataFrame, *, user_map: DataFrame | None = None, item_map: DataFrame | None = None) -> DataFrame:
    """Replace ``user_id`` / ``item_id`` by their indexes (rows whose id has no index are dropped).

    The maps hold each id once (:func:`new_id_rows`), so the joins cannot multiply rows.
    """
    out = df
    if user_map is not None:
        out = out.join(user_map.select(USER_ID, USER_IDX), on=USER_ID, how="inner").drop(USER_ID)
    if item_map is not None:
        out = out.join(item_map.select(ITEM_ID, ITEM_IDX), on=ITEM_ID, how="inner").drop(ITEM_ID)
    return out


# ---- pairs from events -------------------------------------------------------------------------

def _ts(value: dt.datetime):
    return F.lit(value).cast("timestamp")


def events_between(events: DataFrame, *, start: dt.datetime | None, end: dt.datetime,
                   types: Sequence[str]) -> DataFrame:
    """Events of ``types`` in ``[start, end)`` (from the beginning when ``start`` is None), ids not null."""
    require_columns(events, [USER_ID, ITEM_ID, "event_type", "event_ts"], step="events")
    scoped = events.where(F.col("event_ts") < _ts(end)).where(F.col("event_type").isin(*types))
    if start is not None:
        scoped = scoped.where(F.col("event_ts") >= _ts(start))
    if "event_date" in events.columns:
        # Partition pruning, one day loose on both sides (see features_common.filter_events_as_of).
        scoped = scoped.where(F.col("event_date") <= F.lit(end.date() + dt.timedelta(days=1)))
        if start is not None:
            scoped = scoped.where(F.col("event_date") >= F.lit(start.date() - dt.timedelta(days=1)))
    return scoped.where(F.col(USER_ID).isNotNull() & F.col(ITEM_ID).isNotNull())


def decayed_pairs(events: DataFrame, *, cutoff: dt.datetime, half_life_days: float) -> DataFrame:
    """Events before ``cutoff`` -> one row per (user, item) viewed, carted or bought.

    Returns ``user_id, item_id, view_w, cart_w, purchase_w, has_purchased, last_ts``: per event
    type, the sum over events of ``0.5 ** (age_days / half_life_days)``, the age measured from
    ``cutoff``; ``last_ts`` is the pair's latest event (item-based CF's baskets are the latest pairs).
    """
    scoped = events_between(events, start=None, end=cutoff, types=INTERACTION_TYPES)
    age_days = (F.unix_seconds(_ts(cutoff)) - F.unix_seconds(F.col("event_ts"))).cast("double") / 86400.0
    decay = F.pow(F.lit(0.5), age_days / F.lit(float(half_life_days)))
    kind = F.col("event_type")

    def decayed(event_type: str):
        # Rounded so that re-runs over the same data give the same bits whatever the summation order.
        return F.round(F.coalesce(F.sum(F.when(kind == event_type, decay)), F.lit(0.0)), 9)

    return scoped.groupBy(USER_ID, ITEM_ID).agg(
        decayed(VIEW).alias("view_w"), decayed(ADD_TO_CART).alias("cart_w"), decayed(PURCHASE).alias("purchase_w"),
        F.max(kind == PURCHASE).alias("has_purchased"), F.max("event_ts").alias(LAST_TS),
    ).select(USER_ID, ITEM_ID, "view_w", "cart_w", "purchase_w", "has_purchased", LAST_TS)


def with_confidence(pairs: DataFrame, *, weights: Sequence[float]) -> DataFrame:
    """Adds ``confidence = view * view_w + cart * cart_w + purchase * purchase_w``; drops pairs at 0."""
    require_columns(pairs, ["view_w", "cart_w", "purchase_w"], step="with_confidence")
    view, cart, purchase = (float(w) for w in weights)
    confidence = (F.lit(view) * F.col("view_w") + F.lit(cart) * F.col("cart_w")
                  + F.lit(purchase) * F.col("purchase_w"))
    return pairs.withColumn(CONFIDENCE, confidence).where(F.col(CONFIDENCE) > 0)


def window_items(events: DataFrame, *, start: dt.datetime, end: dt.datetime, relevance: str) -> DataFrame:
    """(user, item) pairs with an interaction (or a purchase, for ``relevance='purchase'``) in ``[start, end)``."""
    types = (PURCHASE,) if relevance == "purchase" else INTERACTION_TYPES
    return events_between(events, start=start, end=end, types=types).select(USER_ID, ITEM_ID).distinct()
