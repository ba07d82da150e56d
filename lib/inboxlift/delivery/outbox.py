"""The outbox as its readers see it: a message is ``sent`` once ``deliveries`` records its 250.

The send stage does not rewrite an outbox row when its message leaves: the row holds the message's
bodies, so flipping its ``status`` would rewrite every sent message's row (and its file) for one
word. ``deliveries`` already records the 250, so readers that ask "was it sent?" (plan's history,
render, export, report) read the outbox through :func:`with_delivered_status`, which reports
``status = sent`` (``status_reason`` null) for those messages; a ``sent`` written into the table by
an earlier release still reads as ``sent``. README "Sending" describes the rule.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from inboxlift.delivery import states as S
from inboxlift.storage import Lake

OUTBOX_TABLE = "outbox"
STATUS_SENT = "sent"


def delivered_messages(deliveries: DataFrame) -> DataFrame:
    """``message_id``: each message ``deliveries`` records as accepted by the relay, once."""
    return deliveries.where(F.col("state") == F.lit(S.SENT)).select("message_id").distinct()


def with_delivered_status(outbox: DataFrame, *, deliveries: DataFrame | None) -> DataFrame:
    """``outbox`` with ``status = sent`` and a null ``status_reason`` for its delivered messages.

    A 250 wins over any stored status (render may have withdrawn the message while it was leaving),
    as it did when send wrote the status into the table."""
    if deliveries is None:
        return outbox
    # delivered_messages holds each message once: the left join keeps one row per outbox row.
    delivered = delivered_messages(deliveries).select("message_id", F.lit(True).alias("_is_delivered"))
    is_delivered = F.coalesce(F.col("_is_delivered"), F.lit(False))
    columns = []
    for name in outbox.columns:
        if name == "status":
            columns.append(F.when(is_delivered, F.lit(STATUS_SENT)).otherwise(F.col(name)).alias(name))
        elif name == "status_reason":
            columns.append(F.when(is_delivered, F.lit(None).cast("string")).otherwise(F.col(name)).alias(name))
        else:
            columns.append(F.col(name))
    return outbox.join(delivered, "message_id", how="left").select(*columns)


def read_outbox(lake: Lake) -> DataFrame:
    """The ``outbox`` table with the status its messages have now (:func:`with_delivered_status`)."""
    deliveries = lake.read(S.DELIVERIES_TABLE) if lake.exists(S.DELIVERIES_TABLE) else None
    return with_delivered_status(lake.read(OUTBOX_TABLE), deliveries=deliveries)


def without_delivered(messages: DataFrame, *, lake: Lake) -> DataFrame:
    """``messages`` (keyed by ``message_id``) but those already delivered: a sent message's outbox
    row is never rewritten."""
    if not lake.exists(S.DELIVERIES_TABLE):
        return messages
    return messages.join(delivered_messages(lake.read(S.DELIVERIES_TABLE)), "message_id", how="left_anti")
