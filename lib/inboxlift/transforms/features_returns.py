"""Purchases net of cancellations and returns, before any feature counts them.

A retailer's export records a cancellation or a return as a line of its own (an invoice starting
with ``C``, a negative quantity), imported as a ``return`` event of the same customer and item; it
does not say which earlier invoice it undoes. The rule, for each (customer, item): the units
returned are taken off that customer's purchases of the item made **at or before the latest
return**, the most recent purchase first (a return most often undoes the last order). So:

- a purchase line whose units are all returned is removed: not an order line, no money, no
  interaction; an order all of whose lines are removed is **not an order**;
- a line partly returned keeps its remaining units (``quantity`` becomes the net units), so
  monetary value, average order value and the CLV inputs are net;
- returned units beyond the purchases in the data (bought before the export starts) take nothing
  off: monetary value is never negative.

Views and carts of a cancelled purchase stay: the customer did look. See README "Feature reference".
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from inboxlift.transforms.features_common import (
    EVENT_ID, EVENT_TS, EVENT_TYPE, ITEM_ID, PURCHASE, QUANTITY, USER_ID, require_columns,
)

RETURN = "return"


def net_of_returns(events: DataFrame) -> DataFrame:
    """Events with each purchase's ``quantity`` net of its customer's later returns of the item.

    Fully returned purchases are dropped; other events pass unchanged (return events included, which
    no feature counts). A purchase without a quantity counts as one unit, and keeps a null quantity
    when nothing of it was returned.
    """
    require_columns(events, [EVENT_ID, USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS, QUANTITY], step="net_of_returns")
    is_customer_item = F.col(USER_ID).isNotNull() & F.col(ITEM_ID).isNotNull()
    returned = (events.where((F.col(EVENT_TYPE) == RETURN) & is_customer_item)
                .groupBy(USER_ID, ITEM_ID)
                .agg(F.sum(F.coalesce(F.col(QUANTITY), F.lit(1))).alias("_returned"),
                     F.max(EVENT_TS).alias("_last_return_ts")))
    is_purchase = F.col(EVENT_TYPE) == PURCHASE
    others = events.where(~is_purchase | F.col(EVENT_TYPE).isNull())
    # One row per (user, item) on the right: the join cannot multiply purchases.
    purchases = events.where(is_purchase).join(returned, on=[USER_ID, ITEM_ID], how="left")
    units = F.coalesce(F.col(QUANTITY), F.lit(1))
    is_eligible = F.coalesce(F.col(EVENT_TS) <= F.col("_last_return_ts"), F.lit(False))
    # The same customer's later eligible purchases of the item take the returns first; event id breaks ties.
    later = (Window.partitionBy(USER_ID, ITEM_ID).orderBy(F.col(EVENT_TS).desc(), F.col(EVENT_ID).desc())
             .rowsBetween(Window.unboundedPreceding, -1))
    taken_by_later = F.coalesce(F.sum(F.when(is_eligible, units)).over(later), F.lit(0))
    cancelled = F.when(is_eligible, F.least(units, F.greatest(F.col("_returned") - taken_by_later, F.lit(0)))
                       ).otherwise(F.lit(0))
    netted = (purchases.withColumn("_cancelled", cancelled)
              .where(units - F.col("_cancelled") > 0)
              .withColumn(QUANTITY, F.when(F.col("_cancelled") > 0, (units - F.col("_cancelled")).cast("int"))
                          .otherwise(F.col(QUANTITY)))
              .drop("_returned", "_last_return_ts", "_cancelled"))
    return others.unionByName(netted.select(*events.columns))
