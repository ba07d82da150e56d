"""The per-partition step: Arrow record batches of recipients in, rendered messages out.

:func:`render_batches` is what ``DataFrame.mapInArrow`` runs on every partition; it is plain Python
over ``pyarrow.RecordBatch`` objects, so tests call it without Spark. Each input row gives exactly
one output row: a message (``reason`` null) or a failure (``reason`` and ``error`` set, the message
columns null). Columns that pass through unchanged (ids, ``send_at``) are copied as Arrow arrays,
not converted to Python objects and back.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import pyarrow as pa
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import MapType, StringType, StructField, StructType, TimestampType

from inboxlift.render.message import STATUS_ERROR, STATUS_RENDERED, RenderConfig, render_row

# What the row function reads (the recipients frame may carry more columns).
ROW_COLUMNS = (
    "campaign_id", "campaign_type", "user_id", "variant", "template", "locale", "subject_template", "send_at",
    "context", "has_user", "email", "first_name", "timezone", "email_consent", "products",
)
PASS_THROUGH = ("campaign_id", "campaign_type", "user_id", "variant", "send_at", "plan_run_id", "template")

OUTBOX_COLUMNS = (
    "message_id", "campaign_id", "campaign_type", "user_id", "variant", "to_email", "from_email", "subject",
    "html", "text", "headers", "send_at", "status", "rendered_at", "plan_run_id",
)
OUTPUT_BATCH_ROWS = 1000
RENDER_ERROR_COLUMNS = ("campaign_id", "user_id", "template", "reason", "error", "rendered_at")

_S = StringType()
RENDERED_SCHEMA = StructType([
    StructField("message_id", _S), StructField("campaign_id", _S), StructField("campaign_type", _S),
    StructField("user_id", _S), StructField("variant", _S), StructField("to_email", _S),
    StructField("from_email", _S), StructField("subject", _S), StructField("html", _S), StructField("text", _S),
    StructField("headers", MapType(_S, _S)), StructField("send_at", TimestampType()), StructField("status", _S),
    StructField("rendered_at", TimestampType()), StructField("plan_run_id", _S), StructField("template", _S),
    StructField("reason", _S), StructField("error", _S),
])
RENDERED_ARROW_SCHEMA = to_arrow_schema(RENDERED_SCHEMA, timezone="UTC")


def _column(batch: pa.RecordBatch, name: str, target: pa.DataType) -> pa.Array:
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, type=target)
    values = batch.column(name)
    return values if values.type == target else values.cast(target)


def render_batch(batch: pa.RecordBatch, config: RenderConfig) -> pa.RecordBatch:
    """One batch of recipients -> one batch of ``RENDERED_SCHEMA`` rows, row for row."""
    present = [c for c in ROW_COLUMNS if c in batch.schema.names]
    rows: list[dict[str, Any]] = batch.select(present).to_pylist()
    results = [render_row(row, config) for row in rows]
    n = batch.num_rows
    ok = [r["reason"] is None for r in results]
    computed = {
        name: [r.get(name) for r in results]
        for name in ("message_id", "to_email", "subject", "html", "text", "reason", "error")
    }
    headers = [list(r["headers"].items()) if r.get("headers") else None for r in results]
    schema = RENDERED_ARROW_SCHEMA
    arrays = {
        **{name: pa.array(values, type=schema.field(name).type) for name, values in computed.items()},
        **{name: _column(batch, name, schema.field(name).type) for name in PASS_THROUGH},
        "headers": pa.array(headers, type=schema.field("headers").type),
        "from_email": pa.array([config.from_address if good else None for good in ok], type=pa.string()),
        "status": pa.array([STATUS_RENDERED if good else STATUS_ERROR for good in ok], type=pa.string()),
        "rendered_at": pa.array([config.rendered_at] * n, type=schema.field("rendered_at").type),
    }
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


def render_batches(batches: Iterable[pa.RecordBatch], config: RenderConfig, *,
                   max_rows: int = OUTPUT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function (bind ``config`` with functools.partial).

    Output batches hold at most ``max_rows`` messages: a message is some 10-20 kB of HTML and text,
    so Spark's default input batch (10,000 rows) would come back as one batch of 100+ MB.
    """
    for batch in batches:
        for start in range(0, batch.num_rows, max_rows):
            yield render_batch(batch.slice(start, max_rows), config)
